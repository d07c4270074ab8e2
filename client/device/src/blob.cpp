#include "blob.hpp"

#include <cstring>

namespace fedge {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "blobs are little-endian; this reader copies bytes as they are");

const char* dtype_name(DType dtype) { return dtype == DType::Float32 ? "float32" : "int64"; }

size_t Array::size() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

const Array* Blob::find(const std::string& name) const {
  for (const Array& array : arrays)
    if (array.name == name) return &array;
  return nullptr;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

Blob unpack_blob(const std::string& data, const std::string& what) {
  if (data.size() < 4)
    throw InputError(what + " is " + std::to_string(data.size()) +
                     " bytes: too short for a header");
  uint32_t length;
  std::memcpy(&length, data.data(), 4);
  if (length > data.size() - 4)
    throw InputError(what + " is cut short: its header needs " + std::to_string(length) +
                     " bytes, the blob has " + std::to_string(data.size() - 4) + " after 4");
  Blob blob;
  Json header = Json::parse(data.substr(4, length), what + "'s header");
  const Json& listed = header.at("arrays", what + "'s header");
  Json::Object rest;
  for (const auto& member : header.object(what + "'s header"))
    if (member.first != "arrays") rest.push_back(member);
  blob.header = Json(std::move(rest));

  size_t offset = 4 + static_cast<size_t>(length);
  for (const Json& entry : listed.array(what + "'s \"arrays\"")) {
    std::string where = what + "'s array entry";
    Array array;
    array.name = entry.at("name", where).string(where + " \"name\"");
    where = what + ": array '" + array.name + "'";
    const std::string& dtype = entry.at("dtype", where).string(where + " dtype");
    if (dtype == "float32") array.dtype = DType::Float32;
    else if (dtype == "int64") array.dtype = DType::Int64;
    else throw InputError(where + " has dtype " + dtype + "; blobs hold float32, int64");
    size_t count = 1;
    for (const Json& n : entry.at("shape", where).array(where + " shape")) {
      int64_t d = n.integer(where + " shape");
      if (d < 0) throw InputError(where + " has a negative dimension");
      array.shape.push_back(d);
      if (d != 0 && count > (size_t{1} << 40) / static_cast<size_t>(d))
        throw InputError(where + " is too large");
      count *= static_cast<size_t>(d);
    }
    size_t bytes = count * 8 / (array.dtype == DType::Float32 ? 2 : 1);
    if (bytes > data.size() - offset)
      throw InputError(what + " is cut short: array '" + array.name + "' needs " +
                       std::to_string(bytes) + " bytes at offset " + std::to_string(offset) +
                       ", the blob has " + std::to_string(data.size()));
    if (array.dtype == DType::Float32) {
      array.f32.resize(count);
      std::memcpy(array.f32.data(), data.data() + offset, bytes);
    } else {
      array.i64.resize(count);
      std::memcpy(array.i64.data(), data.data() + offset, bytes);
    }
    offset += bytes;
    blob.arrays.push_back(std::move(array));
  }
  if (offset != data.size())
    throw InputError(what + " has " + std::to_string(data.size() - offset) +
                     " bytes after its last array");
  return blob;
}

std::string pack_blob(const Json& header, const std::vector<Array>& arrays) {
  Json full = header;
  Json::Array listed;
  for (const Array& array : arrays) {
    Json::Array shape;
    for (int64_t d : array.shape) shape.emplace_back(d);
    listed.emplace_back(Json::Object{{"name", array.name},
                                     {"shape", Json(std::move(shape))},
                                     {"dtype", dtype_name(array.dtype)}});
  }
  full.set("arrays", Json(std::move(listed)));
  std::string text = full.dump();
  uint32_t length = static_cast<uint32_t>(text.size());
  std::string out(reinterpret_cast<const char*>(&length), 4);
  out += text;
  for (const Array& array : arrays) {
    if (array.dtype == DType::Float32)
      out.append(reinterpret_cast<const char*>(array.f32.data()), array.f32.size() * 4);
    else
      out.append(reinterpret_cast<const char*>(array.i64.data()), array.i64.size() * 8);
  }
  return out;
}

}  // namespace fedge
