#include "train.hpp"

#include "kernels.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

namespace fedge {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::BufferDataLoader;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

namespace {

std::string g_runtime_message;  // the runtime's last error line, for our own messages

void runtime_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t,
                 const char* message, size_t length) {
  if (level != kError && level != kFatal) return;  // its debug and info chatter
  g_runtime_message.assign(message, length);
  while (!g_runtime_message.empty() &&
         (g_runtime_message.back() == '\n' || g_runtime_message.back() == ' '))
    g_runtime_message.pop_back();
  if (level == kFatal)
    std::fprintf(stderr, "fedge-device: executorch: %s\n", g_runtime_message.c_str());
}

// "InvalidArgument (the runtime's last error line)"
std::string runtime_error(Error error) {
  std::string text = executorch::runtime::to_string(error);
  if (!g_runtime_message.empty()) text += " (" + g_runtime_message + ")";
  g_runtime_message.clear();
  return text;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::vector<int64_t> shape_of(const Json& json, const std::string& what) {
  std::vector<int64_t> shape;
  for (const Json& n : json.array(what)) {
    int64_t d = n.integer(what);
    if (d < 0 || d > (int64_t{1} << 31)) throw InputError(what + " has a bad dimension");
    shape.push_back(d);
  }
  return shape;
}

size_t elements(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

std::vector<executorch::aten::SizesType> sizes32(const std::vector<int64_t>& shape) {
  return {shape.begin(), shape.end()};
}

std::string sizes_text(executorch::runtime::Span<const int32_t> sizes) {
  return shape_text(std::vector<int64_t>(sizes.begin(), sizes.end()));
}

}  // namespace

void init_runtime() {
  executorch::runtime::register_pal(
      executorch::runtime::PalImpl::create(runtime_log, __FILE__));
  executorch::runtime::runtime_init();
}

// -- the manifest, samples and settings ------------------------------------------------

Manifest Manifest::from_json(const Json& json, const std::string& what) {
  Manifest m;
  if (json.at("format", what).integer(what + " format") != 1)
    throw InputError(what + " has format " + json.at("format", what).dump() +
                     "; this device reads format 1");
  m.model = json.at("model", what).string(what + " model");
  const Json& input = json.at("input", what);
  m.input_shape = shape_of(input.at("shape", what + " input"), what + " input shape");
  const std::string& dtype = input.at("dtype", what + " input").string(what + " input dtype");
  if (dtype == "float32") m.input_dtype = DType::Float32;
  else if (dtype == "int64") m.input_dtype = DType::Int64;
  else throw InputError(what + " input dtype " + dtype + " is neither float32 nor int64");
  m.num_classes = json.at("num_classes", what).integer(what + " num_classes");
  m.max_batch = json.at("max_batch", what).integer(what + " max_batch");
  if (m.num_classes < 2 || m.max_batch < 1)
    throw InputError(what + " needs num_classes >= 2 and max_batch >= 1");
  for (const Json& entry : json.at("state", what).array(what + " state")) {
    StateEntry e;
    std::string where = what + " state entry";
    e.name = entry.at("name", where).string(where + " name");
    where += " '" + e.name + "'";
    e.shape = shape_of(entry.at("shape", where), where + " shape");
    e.size = elements(e.shape);
    e.parameter = entry.at("parameter", where).boolean(where + " parameter");
    const Json* frozen = entry.find("frozen");
    e.frozen = frozen != nullptr && frozen->boolean(where + " frozen");
    for (const StateEntry& other : m.state)
      if (other.name == e.name)
        throw InputError(what + " lists state entry '" + e.name + "' twice");
    m.state.push_back(std::move(e));
  }
  if (m.state.empty()) throw InputError(what + " lists no state entries");
  const Json& programs = json.at("programs", what);
  m.train_sha256 = programs.at("train", what + " programs").at("sha256", what + " train program")
                       .string(what + " train sha256");
  m.predict_sha256 = programs.at("predict", what + " programs")
                         .at("sha256", what + " predict program").string(what + " predict sha256");
  for (const std::string* sha : {&m.train_sha256, &m.predict_sha256}) {
    bool hex = sha->size() == 64 && std::all_of(sha->begin(), sha->end(), [](char c) {
                 return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
               });
    if (!hex)
      throw InputError(what + " names a program sha256 that is not 64 lowercase hex digits");
  }
  return m;
}

Samples Samples::from_blob(const Blob& blob, const std::string& what) {
  const Json* format = blob.header.find("format");
  if (format != nullptr && !(format->is_string() && format->string("") == "fedge-device-data/1"))
    throw InputError(what + " has format " + format->dump() +
                     ", not fedge-device-data/1 (`fedge device-data` writes it)");
  const Array* x = blob.find("x");
  const Array* y = blob.find("y");
  if (x == nullptr || y == nullptr)
    throw InputError(what + " needs arrays 'x' and 'y' (`fedge device-data` writes them)");
  if (y->dtype != DType::Int64 || y->shape.size() != 1)
    throw InputError(what + ": 'y' must be int64 [n], not " + dtype_name(y->dtype) + " " +
                     shape_text(y->shape));
  if (x->shape.empty() || x->shape[0] != y->shape[0])
    throw InputError(what + ": 'x' has shape " + shape_text(x->shape) + " for " +
                     std::to_string(y->shape[0]) + " labels");
  Samples s;
  s.dtype = x->dtype;
  s.sample_shape.assign(x->shape.begin() + 1, x->shape.end());
  s.count = static_cast<size_t>(y->shape[0]);
  s.sample_size = elements(s.sample_shape);
  s.xf = x->f32;
  s.xi = x->i64;
  s.y = y->i64;
  for (float v : s.xf)
    if (!std::isfinite(v)) throw InputError(what + ": 'x' holds NaN or Inf");
  return s;
}

Settings Settings::from_json(const Json& training, double val_fraction) {
  Settings s;
  s.val_fraction = val_fraction;
  try {
    training.object("the task's training settings");
    auto integer = [&](const char* key, int64_t& value) {
      if (const Json* v = training.find(key)) value = v->integer(std::string("training ") + key);
    };
    auto number = [&](const char* key, double& value) {
      if (const Json* v = training.find(key)) value = v->number(std::string("training ") + key);
    };
    integer("epochs", s.epochs);
    integer("batch_size", s.batch_size);
    number("lr", s.lr);
    integer("patience", s.patience);
    number("proximal_mu", s.proximal_mu);
    if (const Json* v = training.find("optimizer")) s.optimizer = v->string("training optimizer");
    int64_t seed = 0;
    integer("seed", seed);
    s.seed = static_cast<uint64_t>(seed);
  } catch (const InputError& error) {
    throw TaskError(error.what());
  }
  s.check();
  return s;
}

void Settings::check() const {
  auto bad = [](const std::string& what) { throw TaskError("training setting " + what); };
  if (epochs < 1) bad("epochs must be at least 1");
  if (batch_size < 1) bad("batch_size must be at least 1");
  if (!(lr > 0) || !std::isfinite(lr)) bad("lr must be a positive number");
  if (optimizer != "adam" && optimizer != "sgd")
    bad("optimizer is '" + optimizer + "'; this device has adam and sgd");
  if (patience < 1) bad("patience must be at least 1");
  if (!(proximal_mu >= 0) || !std::isfinite(proximal_mu)) bad("proximal_mu must be >= 0");
  if (!(val_fraction > 0 && val_fraction < 1)) bad("val_fraction must lie between 0 and 1");
}

Weights weights_from_blob(const Manifest& manifest, const Blob& blob, const std::string& what) {
  Weights weights;
  for (const StateEntry& entry : manifest.state) {
    const Array* array = blob.find(entry.name);
    if (array == nullptr) throw InputError(what + " lacks state entry '" + entry.name + "'");
    if (array->dtype != DType::Float32 || array->shape != entry.shape)
      throw InputError(what + ": '" + entry.name + "' is " + dtype_name(array->dtype) + " " +
                       shape_text(array->shape) + ", the manifest's is float32 " +
                       shape_text(entry.shape));
    weights.push_back(array->f32);
  }
  return weights;
}

std::vector<Array> trained_arrays(const Manifest& manifest, const Weights& weights) {
  std::vector<Array> arrays;
  for (size_t i = 0; i < manifest.state.size(); ++i) {
    if (manifest.state[i].frozen) continue;
    Array array;
    array.name = manifest.state[i].name;
    array.shape = manifest.state[i].shape;
    array.f32 = weights[i];
    arrays.push_back(std::move(array));
  }
  return arrays;
}

// -- randomness and the split ------------------------------------------------------------

uint64_t Random::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void Random::shuffle(std::vector<size_t>& items) {
  for (size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[next() % i]);
}

Split Split::make(size_t count, double val_fraction, uint64_t seed) {
  if (count < 2)
    throw TaskError("a device needs at least 2 samples (train + validation), has " +
                    std::to_string(count));
  auto n_val = static_cast<size_t>(std::nearbyint(val_fraction * static_cast<double>(count)));
  n_val = std::min(std::max<size_t>(n_val, 1), count - 1);
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  Random(seed).shuffle(order);
  Split split;
  split.val.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n_val));
  split.train.assign(order.begin() + static_cast<std::ptrdiff_t>(n_val), order.end());
  return split;
}

// -- the programs ---------------------------------------------------------------------------

struct Programs::Impl {
  std::string train_pte, predict_pte;  // the modules read these bytes while they live
  std::unique_ptr<Module> train, predict;
  size_t parameters = 0, buffers = 0;
};

namespace {

std::unique_ptr<Module> load_module(const std::string& bytes, const std::string& what,
                                    bool fast) {
  auto module = std::make_unique<Module>(
      std::make_unique<BufferDataLoader>(bytes.data(), bytes.size()));
  Error error = module->load(Program::Verification::InternalConsistency);
  if (error != Error::Ok)
    throw InputError(what + " is not an ExecuTorch program: " + runtime_error(error));
  error = module->load_method("forward", nullptr, nullptr, nullptr,
                              fast ? fast_kernels() : std::vector<executorch::runtime::Kernel>{});
  if (error != Error::Ok)
    throw InputError(what + "'s forward method cannot be loaded: " + runtime_error(error));
  return module;
}

// The program's inputs and outputs against the manifest (counts, state shapes, x).
void check_meta(Module& module, const Manifest& m, size_t extra_inputs, size_t outputs,
                const std::string& what) {
  auto meta = module.method_meta("forward");
  if (!meta.ok()) throw InputError(what + " has no forward method");
  if (meta->num_inputs() != m.state.size() + extra_inputs || meta->num_outputs() != outputs)
    throw InputError(what + " takes " + std::to_string(meta->num_inputs()) + " inputs and gives " +
                     std::to_string(meta->num_outputs()) + " outputs; its manifest needs " +
                     std::to_string(m.state.size() + extra_inputs) + " and " +
                     std::to_string(outputs));
  for (size_t i = 0; i <= m.state.size(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) throw InputError(what + "'s input " + std::to_string(i) + " is not a tensor");
    auto sizes = info->sizes();
    std::vector<int64_t> got(sizes.begin(), sizes.end());
    if (i < m.state.size()) {
      if (got != m.state[i].shape || info->scalar_type() != ScalarType::Float)
        throw InputError(what + " takes '" + m.state[i].name + "' as " + sizes_text(sizes) +
                         ", its manifest says float32 " + shape_text(m.state[i].shape));
      continue;
    }
    std::vector<int64_t> sample(got.empty() ? got.begin() : got.begin() + 1, got.end());
    ScalarType dtype = m.input_dtype == DType::Float32 ? ScalarType::Float : ScalarType::Long;
    if (got.empty() || sample != m.input_shape || info->scalar_type() != dtype)
      throw InputError(what + " takes x as " + sizes_text(sizes) + ", its manifest says " +
                       dtype_name(m.input_dtype) + " [b, " + shape_text(m.input_shape).substr(1));
    if (got[0] < m.max_batch)
      throw InputError(what + " takes batches of at most " + std::to_string(got[0]) +
                       " samples; its manifest says max_batch " + std::to_string(m.max_batch));
  }
}

}  // namespace

Programs::Programs(const Manifest& manifest, std::string train_pte, std::string predict_pte,
                   bool fast_kernels)
    : impl_(std::make_unique<Impl>()) {
  impl_->train_pte = std::move(train_pte);
  impl_->predict_pte = std::move(predict_pte);
  for (const StateEntry& e : manifest.state) (e.parameter ? impl_->parameters : impl_->buffers)++;
  impl_->train = load_module(impl_->train_pte, "the train program", fast_kernels);
  impl_->predict = load_module(impl_->predict_pte, "the predict program", fast_kernels);
  check_meta(*impl_->train, manifest, 3, 2 + impl_->parameters + impl_->buffers,
             "the train program");
  check_meta(*impl_->predict, manifest, 1, 1, "the predict program");
}

Programs::~Programs() = default;

// -- training ---------------------------------------------------------------------------------

namespace {

// One batch's inputs: the state (by reference to `weights`), x and y gathered from samples.
struct Batch {
  std::vector<float> xf;
  std::vector<int64_t> xi;
  std::vector<int64_t> y;
  float dropout = 1.0f;
  std::vector<TensorPtr> tensors;  // keep the tensors alive while the inputs refer to them

  std::vector<EValue> inputs(const Manifest& m, Weights& weights, const Samples& s,
                             const size_t* indices, size_t b, bool train) {
    tensors.clear();
    for (size_t i = 0; i < m.state.size(); ++i)
      tensors.push_back(executorch::extension::from_blob(weights[i].data(),
                                                         sizes32(m.state[i].shape)));
    std::vector<int64_t> shape{static_cast<int64_t>(b)};
    // The samples' values in the model's shape: check_samples saw that their numbers match.
    shape.insert(shape.end(), m.input_shape.begin(), m.input_shape.end());
    if (s.dtype == DType::Float32) {
      xf.resize(b * s.sample_size);
      for (size_t k = 0; k < b; ++k)
        std::memcpy(&xf[k * s.sample_size], &s.xf[indices[k] * s.sample_size],
                    s.sample_size * sizeof(float));
      tensors.push_back(executorch::extension::from_blob(xf.data(), sizes32(shape)));
    } else {
      xi.resize(b * s.sample_size);
      for (size_t k = 0; k < b; ++k)
        std::memcpy(&xi[k * s.sample_size], &s.xi[indices[k] * s.sample_size],
                    s.sample_size * sizeof(int64_t));
      tensors.push_back(executorch::extension::from_blob(xi.data(), sizes32(shape),
                                                         ScalarType::Long));
    }
    if (train) {
      y.resize(b);
      for (size_t k = 0; k < b; ++k) y[k] = s.y[indices[k]];
      tensors.push_back(executorch::extension::from_blob(y.data(), {static_cast<int>(b)},
                                                         ScalarType::Long));
      tensors.push_back(executorch::extension::from_blob(&dropout, {}));
    }
    std::vector<EValue> values;
    values.reserve(tensors.size());
    for (const TensorPtr& t : tensors) values.emplace_back(*t);
    return values;
  }
};

const float* float_output(const std::vector<EValue>& outputs, size_t i, size_t numel,
                          const std::string& what) {
  if (i >= outputs.size() || !outputs[i].isTensor())
    throw TaskError("the " + what + " program's output " + std::to_string(i) + " is not a tensor");
  const Tensor& t = outputs[i].toTensor();
  if (t.scalar_type() != ScalarType::Float || static_cast<size_t>(t.numel()) != numel)
    throw TaskError("the " + what + " program's output " + std::to_string(i) + " has " +
                    std::to_string(t.numel()) + " values, not the " + std::to_string(numel) +
                    " float32 its manifest implies");
  return t.const_data_ptr<float>();
}

}  // namespace

Trainer::Trainer(const Manifest& manifest, Programs& programs, const Samples& samples)
    : manifest_(manifest), programs_(programs), samples_(samples) {}

void check_samples(const Manifest& m, const Samples& samples) {
  if (samples.dtype != m.input_dtype)
    throw TaskError(std::string("the device's samples are ") + dtype_name(samples.dtype) +
                    ", the model '" + m.model + "' takes " + dtype_name(m.input_dtype));
  // Samples with as many values as the model's input (flat CSV rows for an image model)
  // take its shape, as `fedge client` reshapes them.
  const size_t values = elements(m.input_shape);
  if (samples.sample_size != values)
    throw TaskError("the device's samples have shape " + shape_text(samples.sample_shape) +
                    " (" + std::to_string(samples.sample_size) + " values), the model '" +
                    m.model + "' takes " + shape_text(m.input_shape) + " (" +
                    std::to_string(values) + " values)");
  for (int64_t label : samples.y)
    if (label < 0 || label >= m.num_classes)
      throw TaskError("the device's labels include class id " + std::to_string(label) +
                      ", outside 0.." + std::to_string(m.num_classes - 1) + " of the model '" +
                      m.model + "'");
}

Evaluation Trainer::evaluate(const Weights& weights, const std::vector<size_t>& indices) {
  const size_t classes = static_cast<size_t>(manifest_.num_classes);
  const size_t chunk = static_cast<size_t>(manifest_.max_batch);
  Weights& state = const_cast<Weights&>(weights);  // the runtime copies inputs; it writes none
  Batch batch;
  double loss = 0;
  size_t correct = 0;
  for (size_t start = 0; start < indices.size(); start += chunk) {
    size_t b = std::min(chunk, indices.size() - start);
    auto result = programs_.impl_->predict->execute(
        "forward", batch.inputs(manifest_, state, samples_, &indices[start], b, false));
    if (!result.ok())
      throw TaskError("the predict program failed on a batch of " + std::to_string(b) + ": " +
                      runtime_error(result.error()));
    const float* logits = float_output(*result, 0, b * classes, "predict");
    for (size_t k = 0; k < b; ++k) {
      const float* row = logits + k * classes;
      size_t best = 0;
      for (size_t c = 1; c < classes; ++c)
        if (row[c] > row[best]) best = c;
      double top = row[best], sum = 0;
      for (size_t c = 0; c < classes; ++c) sum += std::exp(static_cast<double>(row[c]) - top);
      size_t label = static_cast<size_t>(samples_.y[indices[start + k]]);
      loss += top + std::log(sum) - row[label];
      correct += best == label;
    }
  }
  double n = static_cast<double>(indices.size());
  return {loss / n, static_cast<double>(correct) / n};
}

Metrics Trainer::train(Weights& weights, const Split& split, const Settings& settings) {
  auto started = std::chrono::steady_clock::now();
  const Manifest& m = manifest_;
  const size_t count = m.state.size();
  const bool adam = settings.optimizer == "adam";
  const float lr = static_cast<float>(settings.lr);
  const float mu = static_cast<float>(settings.proximal_mu);

  Metrics metrics;
  metrics.num_examples = static_cast<int64_t>(split.train.size());
  Evaluation best = evaluate(weights, split.val);
  const Weights received = weights;
  Weights best_weights = weights;

  // Optimizer state per trained parameter: Adam's two moments, or SGD's momentum.
  Weights first(count), second(count), grads(count);
  for (size_t i = 0; i < count; ++i) {
    if (!m.state[i].parameter) continue;
    grads[i].assign(m.state[i].size, 0.0f);
    if (m.state[i].frozen) continue;
    first[i].assign(m.state[i].size, 0.0f);
    if (adam) second[i].assign(m.state[i].size, 0.0f);
  }
  int64_t steps = 0;
  Random random(settings.seed);
  std::vector<size_t> order = split.train;
  const size_t batch_size = static_cast<size_t>(settings.batch_size);
  const size_t chunk = std::min(batch_size, static_cast<size_t>(m.max_batch));
  Batch batch;
  double training_seconds = 0;
  int64_t epoch = 0;
  for (epoch = 1; epoch <= settings.epochs; ++epoch) {
    auto epoch_started = std::chrono::steady_clock::now();
    random.shuffle(order);
    double loss_sum = 0;
    size_t seen = 0;
    for (size_t start = 0; start < order.size(); start += batch_size) {
      size_t end = std::min(order.size(), start + batch_size);
      for (auto& g : grads) std::fill(g.begin(), g.end(), 0.0f);
      // A batch larger than max_batch runs in chunks; their gradients are averaged by size.
      for (size_t from = start; from < end; from += chunk) {
        size_t b = std::min(chunk, end - from);
        auto result = programs_.impl_->train->execute(
            "forward", batch.inputs(m, weights, samples_, &order[from], b, true));
        if (!result.ok())
          throw TaskError("the train program failed on a batch of " + std::to_string(b) + ": " +
                          runtime_error(result.error()));
        const auto& outputs = *result;
        double loss = *float_output(outputs, 0, 1, "train");
        loss_sum += loss * static_cast<double>(b);
        seen += b;
        const float share = static_cast<float>(b) / static_cast<float>(end - start);
        size_t out = 2;
        for (size_t i = 0; i < count; ++i) {  // gradients, in the state's order
          if (!m.state[i].parameter) continue;
          const float* g = float_output(outputs, out++, m.state[i].size, "train");
          std::vector<float>& sum = grads[i];
          if (share == 1.0f) std::copy(g, g + sum.size(), sum.begin());
          else for (size_t k = 0; k < sum.size(); ++k) sum[k] += share * g[k];
        }
        for (size_t i = 0; i < count; ++i) {  // the buffers' new values
          if (m.state[i].parameter) continue;
          const float* v = float_output(outputs, out++, m.state[i].size, "train");
          std::copy(v, v + m.state[i].size, weights[i].begin());
        }
      }
      ++steps;
      // Adam as PyTorch computes it (defaults: betas 0.9, 0.999, eps 1e-8).
      const double correction1 = 1 - std::pow(0.9, static_cast<double>(steps));
      const double correction2 = 1 - std::pow(0.999, static_cast<double>(steps));
      const float step_size = static_cast<float>(settings.lr / correction1);
      const float root2 = static_cast<float>(std::sqrt(correction2));
      for (size_t i = 0; i < count; ++i) {
        if (!m.state[i].parameter || m.state[i].frozen) continue;
        std::vector<float>& w = weights[i];
        std::vector<float>& g = grads[i];
        if (mu > 0)
          for (size_t k = 0; k < w.size(); ++k) g[k] += mu * (w[k] - received[i][k]);
        std::vector<float>& m1 = first[i];
        if (adam) {
          std::vector<float>& m2 = second[i];
          for (size_t k = 0; k < w.size(); ++k) {
            m1[k] += 0.1f * (g[k] - m1[k]);
            m2[k] = m2[k] * 0.999f + 0.001f * g[k] * g[k];
            w[k] += -step_size * m1[k] / (std::sqrt(m2[k]) / root2 + 1e-8f);
          }
        } else {  // SGD with momentum 0.9: v <- 0.9 v + g; w <- w - lr v
          for (size_t k = 0; k < w.size(); ++k) {
            m1[k] = 0.9f * m1[k] + g[k];
            w[k] -= lr * m1[k];
          }
        }
      }
    }
    training_seconds += seconds_since(epoch_started);
    metrics.train_loss = loss_sum / static_cast<double>(seen);
    if (!std::isfinite(metrics.train_loss)) {
      char text[160];
      std::snprintf(text, sizeof text, "local training diverged: the training loss became %g "
                    "in epoch %lld; a lower learning rate (lr) may help", metrics.train_loss,
                    static_cast<long long>(epoch));
      throw TaskError(text);
    }
    Evaluation now = evaluate(weights, split.val);
    if (now.loss < best.loss) {
      best = now;
      metrics.best_epoch = epoch;
      best_weights = weights;
    } else if (epoch - metrics.best_epoch >= settings.patience) {
      break;
    }
  }
  metrics.epochs = std::min(epoch, settings.epochs);
  metrics.stopped_early = metrics.epochs < settings.epochs;
  metrics.val_loss = best.loss;
  metrics.val_accuracy = best.accuracy;
  weights = std::move(best_weights);
  metrics.seconds_per_epoch = training_seconds / static_cast<double>(metrics.epochs);
  metrics.train_seconds = seconds_since(started);
  return metrics;
}

}  // namespace fedge
