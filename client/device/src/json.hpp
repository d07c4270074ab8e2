// A minimal JSON value, parser and writer (RFC 8259; no external library).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fedge {

// Bad input: one line saying what is wrong (main prints "error: <what>" and exits 2).
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };
  using Array = std::vector<Json>;
  using Object = std::vector<std::pair<std::string, Json>>;  // in the text's order

  Json() = default;
  Json(std::nullptr_t) {}
  Json(bool b) : type_(Type::Bool), bool_(b) {}
  Json(double d) : type_(Type::Number), number_(d) {}
  Json(int i) : Json(static_cast<double>(i)) {}
  Json(int64_t i) : Json(static_cast<double>(i)) {}
  Json(size_t i) : Json(static_cast<double>(i)) {}
  Json(const char* s) : type_(Type::String), string_(s) {}
  Json(std::string s) : type_(Type::String), string_(std::move(s)) {}
  Json(Array a) : type_(Type::Array), array_(std::make_shared<Array>(std::move(a))) {}
  Json(Object o) : type_(Type::Object), object_(std::make_shared<Object>(std::move(o))) {}

  // Throws InputError naming `what` and the position of the first error.
  static Json parse(const std::string& text, const std::string& what);
  // Compact text; a non-finite number is written as null (output stays strict JSON).
  std::string dump() const;

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }
  bool is_bool() const { return type_ == Type::Bool; }

  // Typed access: InputError "<what> is not a ..." when the type differs.
  double number(const std::string& what) const;
  int64_t integer(const std::string& what) const;  // a number with no fraction
  bool boolean(const std::string& what) const;
  const std::string& string(const std::string& what) const;
  const Array& array(const std::string& what) const;
  const Object& object(const std::string& what) const;

  // Object members: nullptr when absent (or when this is not an object).
  const Json* find(const std::string& key) const;
  // The member, or InputError "<what> has no "<key>"".
  const Json& at(const std::string& key, const std::string& what) const;
  // Appends a member to an object (the caller keeps keys unique).
  void set(const std::string& key, Json value);

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::shared_ptr<Array> array_;
  std::shared_ptr<Object> object_;
};

}  // namespace fedge
