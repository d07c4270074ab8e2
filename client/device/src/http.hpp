// A small HTTP/1.1 client: one connection per request (Connection: close), plain sockets for
// http://, OpenSSL for https:// (the server's certificate verified against a CA file, and
// its name or address checked).
#pragma once

#include <stdexcept>
#include <string>

namespace fedge {

// The request did not get an answer: the gateway cannot be reached, the connection broke,
// TLS failed, or the time ran out. Worth trying again.
struct NetworkError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Response {
  int status = 0;
  std::string content_type;
  std::string body;
};

class Http {
 public:
  // `url`: http://HOST[:PORT][/PREFIX] or https://... (which needs `ca_file`, a PEM file).
  // InputError for a URL it cannot use or a CA file it cannot read.
  Http(const std::string& url, const std::string& token, const std::string& ca_file);
  ~Http();
  Http(const Http&) = delete;
  Http& operator=(const Http&) = delete;

  // `path` starts with '/'. The answer's status and body (any status), or NetworkError.
  Response request(const std::string& method, const std::string& path,
                   const std::string& body = "", const std::string& content_type = "",
                   double timeout_seconds = 120);

  const std::string& url() const { return url_; }

 private:
  std::string url_, host_, port_, prefix_, token_;
  bool tls_ = false;
  bool host_is_ip_ = false;
  void* ssl_ctx_ = nullptr;  // SSL_CTX*
};

}  // namespace fedge
