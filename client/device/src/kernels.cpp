// Faster 2-D convolution kernels for the train and predict programs.
//
// ExecuTorch 1.5.1 ships only its portable convolution and convolution backward: plain
// loops that compute a 4-D linear index for every multiply-add, which made a digits CNN
// epoch ~40x slower than eager PyTorch (87 % of the time in these two kernels). These do
// the same arithmetic plane by plane over contiguous rows, for the common case: float32,
// contiguous NCHW, not transposed, any stride, padding, dilation and groups. Anything else
// goes to the portable kernels, which remain linked. They are given to each loaded method
// (Module::load_method's kernel list), so the runtime's own registry is left as it is.
#include "kernels.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;

// The portable kernels, exported by libexecutorch_kernels_optimized.so.
namespace torch::executor::native {
Tensor& convolution_out(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, ArrayRef<int64_t> stride,
                        ArrayRef<int64_t> padding, ArrayRef<int64_t> dilation, bool transposed,
                        ArrayRef<int64_t> output_padding, int64_t groups, Tensor& out);
std::tuple<Tensor&, Tensor&, Tensor&> convolution_backward_out(
    KernelRuntimeContext& ctx, const Tensor& grad_output, const Tensor& input,
    const Tensor& weight, std::optional<ArrayRef<int64_t>> bias_sizes, ArrayRef<int64_t> stride,
    ArrayRef<int64_t> padding, ArrayRef<int64_t> dilation, bool transposed,
    ArrayRef<int64_t> output_padding, int64_t groups, ArrayRef<bool> output_mask,
    Tensor& grad_input, Tensor& grad_weight, Tensor& grad_bias);
}  // namespace torch::executor::native

namespace fedge {
namespace {

namespace portable = torch::executor::native;

bool contiguous(const Tensor& t) {
  if (t.scalar_type() != ScalarType::Float) return false;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.size(d) != 1 && t.strides()[d] != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The geometry of one convolution; `ok` is false where the fast path does not apply.
struct Geometry {
  bool ok = false;
  int64_t n, c, h, w, oc, kh, kw, oh, ow, groups, cg, ocg;
  int64_t sh, sw, ph, pw, dh, dw;
};

int64_t at(ArrayRef<int64_t> values, size_t i, int64_t fallback) {
  if (values.size() == 0) return fallback;
  return values.size() > i ? values[i] : values[0];
}

Geometry geometry(const Tensor& input, const Tensor& weight, ArrayRef<int64_t> stride,
                  ArrayRef<int64_t> padding, ArrayRef<int64_t> dilation, bool transposed,
                  int64_t groups) {
  Geometry g;
  if (transposed || input.dim() != 4 || weight.dim() != 4 || groups < 1 ||
      !contiguous(input) || !contiguous(weight) || stride.size() > 2 || padding.size() > 2 ||
      dilation.size() > 2)
    return g;
  g.n = input.size(0), g.c = input.size(1), g.h = input.size(2), g.w = input.size(3);
  g.oc = weight.size(0), g.kh = weight.size(2), g.kw = weight.size(3);
  g.groups = groups, g.cg = g.c / groups, g.ocg = g.oc / groups;
  g.sh = at(stride, 0, 1), g.sw = at(stride, 1, 1);
  g.ph = at(padding, 0, 0), g.pw = at(padding, 1, 0);
  g.dh = at(dilation, 0, 1), g.dw = at(dilation, 1, 1);
  if (g.c % groups != 0 || g.oc % groups != 0 || weight.size(1) != g.cg || g.sh < 1 ||
      g.sw < 1 || g.dh < 1 || g.dw < 1 || g.ph < 0 || g.pw < 0)
    return g;
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.ok = g.oh > 0 && g.ow > 0;
  return g;
}

// The output columns whose input column ox * s + offset lies inside [0, size).
void column_range(int64_t out, int64_t size, int64_t s, int64_t offset, int64_t& first,
                  int64_t& end) {
  first = offset >= 0 ? 0 : (-offset + s - 1) / s;
  end = size - offset <= 0 ? 0 : std::min(out, (size - 1 - offset) / s + 1);
  if (end < first) end = first;
}

// im2col: the group's input channels of one sample (`x`, C/groups planes) as a
// [C/groups * kh * kw, oh * ow] matrix, zeros where the kernel reaches into the padding.
void unfold(const Geometry& g, const float* x, float* cols) {
  const int64_t points = g.oh * g.ow;
  for (int64_t i = 0; i < g.cg; ++i) {
    const float* xp = x + i * g.h * g.w;
    for (int64_t r = 0; r < g.kh; ++r) {
      for (int64_t s = 0; s < g.kw; ++s) {
        float* row = cols + ((i * g.kh + r) * g.kw + s) * points;
        const int64_t offset = s * g.dw - g.pw;
        int64_t c0, c1;
        column_range(g.ow, g.w, g.sw, offset, c0, c1);
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          float* out = row + oy * g.ow;
          const int64_t iy = oy * g.sh - g.ph + r * g.dh;
          if (iy < 0 || iy >= g.h) {
            std::fill(out, out + g.ow, 0.0f);
            continue;
          }
          const float* in = xp + iy * g.w;
          std::fill(out, out + c0, 0.0f);
          for (int64_t ox = c0; ox < c1; ++ox) out[ox] = in[ox * g.sw + offset];
          std::fill(out + c1, out + g.ow, 0.0f);
        }
      }
    }
  }
}

// col2im, accumulating: the transpose of unfold, added into `gx`.
void fold_add(const Geometry& g, const float* cols, float* gx) {
  const int64_t points = g.oh * g.ow;
  for (int64_t i = 0; i < g.cg; ++i) {
    float* gp = gx + i * g.h * g.w;
    for (int64_t r = 0; r < g.kh; ++r) {
      for (int64_t s = 0; s < g.kw; ++s) {
        const float* row = cols + ((i * g.kh + r) * g.kw + s) * points;
        const int64_t offset = s * g.dw - g.pw;
        int64_t c0, c1;
        column_range(g.ow, g.w, g.sw, offset, c0, c1);
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          const int64_t iy = oy * g.sh - g.ph + r * g.dh;
          if (iy < 0 || iy >= g.h) continue;
          const float* in = row + oy * g.ow;
          float* out = gp + iy * g.w;
          for (int64_t ox = c0; ox < c1; ++ox) out[ox * g.sw + offset] += in[ox];
        }
      }
    }
  }
}

// a · b over n values, in eight independent lanes (which the compiler vectorizes).
float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

// y[p] += w * x[p]
void axpy(float w, const float* x, float* y, int64_t n) {
  for (int64_t p = 0; p < n; ++p) y[p] += w * x[p];
}

std::vector<float>& scratch(int which, size_t size) {
  thread_local std::vector<float> buffers[2];
  if (buffers[which].size() < size) buffers[which].resize(size);
  return buffers[which];
}

Tensor& conv(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& weight,
             const std::optional<Tensor>& bias, ArrayRef<int64_t> stride,
             ArrayRef<int64_t> padding, ArrayRef<int64_t> dilation, bool transposed,
             ArrayRef<int64_t> output_padding, int64_t groups, Tensor& out) {
  Geometry g = geometry(input, weight, stride, padding, dilation, transposed, groups);
  bool fast = g.ok && out.scalar_type() == ScalarType::Float &&
              (!bias.has_value() || (contiguous(*bias) && bias->numel() == g.oc));
  if (fast) {
    executorch::aten::SizesType sizes[4] = {static_cast<int32_t>(g.n), static_cast<int32_t>(g.oc),
                                            static_cast<int32_t>(g.oh), static_cast<int32_t>(g.ow)};
    fast = executorch::runtime::resize_tensor(out, {sizes, 4}) == Error::Ok && contiguous(out);
  }
  if (!fast)
    return portable::convolution_out(ctx, input, weight, bias, stride, padding, dilation,
                                     transposed, output_padding, groups, out);
  const float* x = input.const_data_ptr<float>();
  const float* k = weight.const_data_ptr<float>();
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* y = out.mutable_data_ptr<float>();
  const int64_t points = g.oh * g.ow, depth = g.cg * g.kh * g.kw;
  float* cols = scratch(0, static_cast<size_t>(depth * points)).data();
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t group = 0; group < g.groups; ++group) {
      unfold(g, x + (n * g.c + group * g.cg) * g.h * g.w, cols);
      for (int64_t o = group * g.ocg; o < (group + 1) * g.ocg; ++o) {
        float* row = y + (n * g.oc + o) * points;
        std::fill(row, row + points, b ? b[o] : 0.0f);
        const float* taps = k + o * depth;
        for (int64_t d = 0; d < depth; ++d) axpy(taps[d], cols + d * points, row, points);
      }
    }
  }
  return out;
}

std::tuple<Tensor&, Tensor&, Tensor&> conv_backward(
    KernelRuntimeContext& ctx, const Tensor& grad_output, const Tensor& input,
    const Tensor& weight, std::optional<ArrayRef<int64_t>> bias_sizes, ArrayRef<int64_t> stride,
    ArrayRef<int64_t> padding, ArrayRef<int64_t> dilation, bool transposed,
    ArrayRef<int64_t> output_padding, int64_t groups, ArrayRef<bool> output_mask,
    Tensor& grad_input, Tensor& grad_weight, Tensor& grad_bias) {
  Geometry g = geometry(input, weight, stride, padding, dilation, transposed, groups);
  const bool want_input = output_mask.size() > 0 && output_mask[0];
  const bool want_weight = output_mask.size() > 1 && output_mask[1];
  const bool want_bias = output_mask.size() > 2 && output_mask[2];
  bool fast = g.ok && output_mask.size() == 3 && contiguous(grad_output) &&
              grad_output.dim() == 4 && grad_output.size(0) == g.n &&
              grad_output.size(1) == g.oc && grad_output.size(2) == g.oh &&
              grad_output.size(3) == g.ow;
  using executorch::runtime::resize_tensor;
  if (fast && want_input)
    fast = resize_tensor(grad_input, input.sizes()) == Error::Ok && contiguous(grad_input);
  if (fast && want_weight)
    fast = resize_tensor(grad_weight, weight.sizes()) == Error::Ok && contiguous(grad_weight);
  if (fast && want_bias) {
    executorch::aten::SizesType size = static_cast<int32_t>(g.oc);
    fast = (!bias_sizes.has_value() || (bias_sizes->size() == 1 && (*bias_sizes)[0] == g.oc)) &&
           resize_tensor(grad_bias, {&size, 1}) == Error::Ok && contiguous(grad_bias);
  }
  if (!fast)
    return portable::convolution_backward_out(ctx, grad_output, input, weight, bias_sizes,
                                              stride, padding, dilation, transposed,
                                              output_padding, groups, output_mask, grad_input,
                                              grad_weight, grad_bias);
  const float* go = grad_output.const_data_ptr<float>();
  const float* x = input.const_data_ptr<float>();
  const float* k = weight.const_data_ptr<float>();
  float* gi = want_input ? grad_input.mutable_data_ptr<float>() : nullptr;
  float* gw = want_weight ? grad_weight.mutable_data_ptr<float>() : nullptr;
  float* gb = want_bias ? grad_bias.mutable_data_ptr<float>() : nullptr;
  if (gi) std::fill(gi, gi + grad_input.numel(), 0.0f);
  if (gw) std::fill(gw, gw + grad_weight.numel(), 0.0f);
  if (gb) std::fill(gb, gb + grad_bias.numel(), 0.0f);
  const int64_t points = g.oh * g.ow, depth = g.cg * g.kh * g.kw;
  const size_t size = static_cast<size_t>(depth * points);
  float* cols = gw ? scratch(0, size).data() : nullptr;
  float* grad_cols = gi ? scratch(1, size).data() : nullptr;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t group = 0; group < g.groups; ++group) {
      const int64_t first = (n * g.c + group * g.cg) * g.h * g.w;
      if (cols) unfold(g, x + first, cols);
      if (grad_cols) std::fill(grad_cols, grad_cols + size, 0.0f);
      for (int64_t o = group * g.ocg; o < (group + 1) * g.ocg; ++o) {
        const float* gr = go + (n * g.oc + o) * points;
        if (gb) {
          float sum = 0;
          for (int64_t p = 0; p < points; ++p) sum += gr[p];
          gb[o] += sum;
        }
        if (cols)
          for (int64_t d = 0; d < depth; ++d)
            gw[o * depth + d] += dot(gr, cols + d * points, points);
        if (grad_cols) {
          const float* taps = k + o * depth;
          for (int64_t d = 0; d < depth; ++d) axpy(taps[d], gr, grad_cols + d * points, points);
        }
      }
      if (grad_cols) fold_add(g, grad_cols, gi + first);
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

// The boxed form the runtime calls: the schema's 11 arguments, its three outputs, then (in
// the program's argument list) the returned tuple, which aliases the outputs.
void conv_backward_boxed(KernelRuntimeContext& ctx, executorch::runtime::Span<EValue*> stack) {
  if (stack.size() < 14) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  conv_backward(ctx, stack[0]->toTensor(), stack[1]->toTensor(), stack[2]->toTensor(),
                stack[3]->toOptional<ArrayRef<int64_t>>(), stack[4]->toIntList(),
                stack[5]->toIntList(), stack[6]->toIntList(), stack[7]->toBool(),
                stack[8]->toIntList(), stack[9]->toInt(), stack[10]->toBoolList(),
                stack[11]->toTensor(), stack[12]->toTensor(), stack[13]->toTensor());
}

constexpr char kConvolution[] = "aten::convolution.out";
constexpr char kConvolutionBackward[] = "aten::convolution_backward.out";

}  // namespace

std::vector<executorch::runtime::Kernel> fast_kernels() {
  return {executorch::extension::make_boxed_kernel(kConvolution,
                                                   EXECUTORCH_FN(conv, kConvolution)),
          executorch::runtime::Kernel(kConvolutionBackward, conv_backward_boxed)};
}

}  // namespace fedge
