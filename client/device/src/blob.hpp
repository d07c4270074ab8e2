// fedge's blob format (PROTOCOL.md, "Binary bodies"): u32 little-endian N | N bytes of JSON
// header | the arrays' little-endian, C-ordered bytes, in the header's order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "json.hpp"

namespace fedge {

enum class DType { Float32, Int64 };

const char* dtype_name(DType dtype);

struct Array {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::Float32;
  std::vector<float> f32;  // the values when dtype is Float32
  std::vector<int64_t> i64;  // the values when dtype is Int64

  size_t size() const;  // the number of elements the shape holds
};

struct Blob {
  Json header;  // the header without its "arrays" entry
  std::vector<Array> arrays;

  const Array* find(const std::string& name) const;
};

// Throws InputError naming `what` (cut short, a bad header, sizes that do not add up).
Blob unpack_blob(const std::string& data, const std::string& what);
// `header` (a JSON object; its "arrays" entry is written here) followed by `arrays`.
std::string pack_blob(const Json& header, const std::vector<Array>& arrays);

// "[1, 8, 8]"
std::string shape_text(const std::vector<int64_t>& shape);

}  // namespace fedge
