#include "http.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>

#include "json.hpp"

namespace fedge {
namespace {

constexpr size_t kMaxHeaderBytes = 64 * 1024;
constexpr size_t kMaxBodyBytes = size_t{1} << 30;
constexpr double kConnectSeconds = 10;

using Clock = std::chrono::steady_clock;

std::string openssl_error(const std::string& fallback) {
  unsigned long code = ERR_get_error();
  std::string text = fallback;
  if (code != 0) {
    char buffer[256];
    ERR_error_string_n(code, buffer, sizeof buffer);
    text = buffer;
  }
  ERR_clear_error();
  return text;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// A connected socket (and TLS session) with one deadline for everything done on it.
class Connection {
 public:
  Connection(Clock::time_point deadline) : deadline_(deadline) {}
  ~Connection() {
    if (ssl_ != nullptr) SSL_free(ssl_);
    if (fd_ >= 0) ::close(fd_);
  }

  void connect(const std::string& host, const std::string& port) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
    if (rc != 0) throw NetworkError("cannot resolve " + host + ": " + gai_strerror(rc));
    std::string cause = "no address";
    auto connect_deadline = std::min(deadline_, Clock::now() + std::chrono::milliseconds(
                                                    static_cast<int>(kConnectSeconds * 1000)));
    for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
      int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
      int result = ::connect(fd, a->ai_addr, a->ai_addrlen);
      if (result != 0 && errno == EINPROGRESS) {
        fd_ = fd;
        if (wait(POLLOUT, connect_deadline)) {
          int error = 0;
          socklen_t length = sizeof error;
          ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
          result = error == 0 ? 0 : -1;
          errno = error;
        } else {
          result = -1;
          errno = ETIMEDOUT;
        }
        fd_ = -1;
      }
      if (result == 0) {
        fd_ = fd;
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        ::freeaddrinfo(found);
        return;
      }
      cause = std::strerror(errno);
      ::close(fd);
    }
    ::freeaddrinfo(found);
    throw NetworkError("cannot connect to " + host + ":" + port + ": " + cause);
  }

  void start_tls(SSL_CTX* ctx, const std::string& host, bool host_is_ip) {
    ssl_ = SSL_new(ctx);
    if (ssl_ == nullptr) throw NetworkError("TLS: " + openssl_error("SSL_new failed"));
    SSL_set_fd(ssl_, fd_);
    if (host_is_ip) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), host.c_str());
    } else {
      SSL_set_tlsext_host_name(ssl_, host.c_str());
      SSL_set1_host(ssl_, host.c_str());
    }
    while (true) {
      int rc = SSL_connect(ssl_);
      if (rc == 1) return;
      int error = SSL_get_error(ssl_, rc);
      if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
        if (!wait(error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_))
          throw NetworkError("the TLS handshake timed out");
        continue;
      }
      long verified = SSL_get_verify_result(ssl_);
      if (verified != X509_V_OK)
        throw NetworkError(std::string("the gateway's TLS certificate is not accepted: ") +
                           X509_verify_cert_error_string(verified));
      std::string cause = openssl_error(error == SSL_ERROR_SYSCALL ? "the connection closed"
                                                                    : "unknown error");
      if (cause.find("wrong version number") != std::string::npos)
        cause += " (the gateway does not speak TLS: if it runs --insecure, give http://)";
      throw NetworkError("the TLS handshake failed: " + cause);
    }
  }

  void write_all(const std::string& data) {
    size_t done = 0;
    while (done < data.size()) {
      long n;
      if (ssl_ != nullptr) {
        int rc = SSL_write(ssl_, data.data() + done, static_cast<int>(data.size() - done));
        if (rc <= 0) {
          int error = SSL_get_error(ssl_, rc);
          if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
            if (!wait(error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_))
              throw NetworkError("sending the request timed out");
            continue;
          }
          throw NetworkError("sending the request failed: " + openssl_error("connection lost"));
        }
        n = rc;
      } else {
        n = ::send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
        if (n < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            if (!wait(POLLOUT, deadline_)) throw NetworkError("sending the request timed out");
            continue;
          }
          throw NetworkError(std::string("sending the request failed: ") + std::strerror(errno));
        }
      }
      done += static_cast<size_t>(n);
    }
  }

  // Up to `size` bytes; 0 at the end of the stream.
  size_t read_some(char* buffer, size_t size) {
    while (true) {
      if (ssl_ != nullptr) {
        int rc = SSL_read(ssl_, buffer, static_cast<int>(std::min<size_t>(size, 1 << 20)));
        if (rc > 0) return static_cast<size_t>(rc);
        int error = SSL_get_error(ssl_, rc);
        if (error == SSL_ERROR_ZERO_RETURN) return 0;
        if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
          if (!wait(error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_))
            throw NetworkError("waiting for the answer timed out");
          continue;
        }
        if (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) return 0;  // EOF, no notify
        throw NetworkError("reading the answer failed: " + openssl_error("connection lost"));
      }
      long n = ::recv(fd_, buffer, size, 0);
      if (n >= 0) return static_cast<size_t>(n);
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        if (!wait(POLLIN, deadline_)) throw NetworkError("waiting for the answer timed out");
        continue;
      }
      throw NetworkError(std::string("reading the answer failed: ") + std::strerror(errno));
    }
  }

 private:
  bool wait(short events, Clock::time_point deadline) {
    while (true) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, events, 0};
      int rc = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
      if (rc > 0) return true;
      if (rc < 0 && errno != EINTR) return false;
    }
  }

  Clock::time_point deadline_;
  int fd_ = -1;
  SSL* ssl_ = nullptr;
};

// Reads the response: status line, headers, then a Content-Length (or chunked, or
// until-close) body.
class Reader {
 public:
  explicit Reader(Connection& c) : c_(c) {}

  Response read(bool head_only_body) {
    std::string head;
    while (true) {
      size_t end = buffer_.find("\r\n\r\n");
      if (end != std::string::npos) {
        head = buffer_.substr(0, end);
        buffer_.erase(0, end + 4);
        break;
      }
      if (buffer_.size() > kMaxHeaderBytes) throw NetworkError("the answer's headers are too long");
      if (!fill()) throw NetworkError("the gateway closed the connection without an answer");
    }
    Response response;
    size_t line_end = head.find("\r\n");
    std::string status_line = head.substr(0, line_end);
    if (status_line.compare(0, 5, "HTTP/") != 0 || status_line.size() < 12)
      throw NetworkError("the answer is not HTTP: " + status_line.substr(0, 40));
    response.status = std::atoi(status_line.c_str() + status_line.find(' ') + 1);
    long long length = -1;
    bool chunked = false;
    size_t pos = line_end == std::string::npos ? head.size() : line_end + 2;
    while (pos < head.size()) {
      size_t next = head.find("\r\n", pos);
      if (next == std::string::npos) next = head.size();
      std::string line = head.substr(pos, next - pos);
      pos = next + 2;
      size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string name = lower(line.substr(0, colon));
      std::string value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(" \t"));
      value.erase(value.find_last_not_of(" \t") + 1);
      if (name == "content-length") length = std::atoll(value.c_str());
      else if (name == "transfer-encoding")
        chunked = lower(value).find("chunked") != std::string::npos;
      else if (name == "content-type") response.content_type = value;
    }
    if (response.status == 204 || response.status == 304 || response.status < 200 ||
        head_only_body)
      return response;
    if (chunked) {
      response.body = read_chunked();
    } else if (length >= 0) {
      if (static_cast<unsigned long long>(length) > kMaxBodyBytes)
        throw NetworkError("the answer's body is too large");
      response.body = take(static_cast<size_t>(length));
    } else {
      while (fill()) {
        if (buffer_.size() > kMaxBodyBytes) throw NetworkError("the answer's body is too large");
      }
      response.body = std::move(buffer_);
    }
    return response;
  }

 private:
  bool fill() {
    char chunk[65536];
    size_t n = c_.read_some(chunk, sizeof chunk);
    buffer_.append(chunk, n);
    return n > 0;
  }

  std::string take(size_t n) {
    while (buffer_.size() < n)
      if (!fill()) throw NetworkError("the answer ended early: its body was cut short");
    std::string out = buffer_.substr(0, n);
    buffer_.erase(0, n);
    return out;
  }

  std::string line() {
    size_t end;
    while ((end = buffer_.find("\r\n")) == std::string::npos)
      if (!fill() || buffer_.size() > kMaxHeaderBytes) throw NetworkError("a bad chunked body");
    std::string out = buffer_.substr(0, end);
    buffer_.erase(0, end + 2);
    return out;
  }

  std::string read_chunked() {
    std::string body;
    while (true) {
      size_t size = std::strtoul(line().c_str(), nullptr, 16);
      if (size == 0) break;
      if (body.size() + size > kMaxBodyBytes) throw NetworkError("the answer's body is too large");
      body += take(size);
      line();
    }
    while (!line().empty()) {
    }  // trailers
    return body;
  }

  Connection& c_;
  std::string buffer_;
};

}  // namespace

Http::Http(const std::string& url, const std::string& token, const std::string& ca_file)
    : url_(url), token_(token) {
  std::string rest;
  if (url.compare(0, 7, "http://") == 0) {
    rest = url.substr(7);
  } else if (url.compare(0, 8, "https://") == 0) {
    rest = url.substr(8);
    tls_ = true;
  } else {
    throw InputError("--gateway " + url + " is not an http:// or https:// URL");
  }
  size_t slash = rest.find('/');
  std::string authority = rest.substr(0, slash);
  prefix_ = slash == std::string::npos ? "" : rest.substr(slash);
  while (!prefix_.empty() && prefix_.back() == '/') prefix_.pop_back();
  port_ = tls_ ? "443" : "80";
  if (!authority.empty() && authority[0] == '[') {
    size_t close = authority.find(']');
    if (close == std::string::npos)
      throw InputError("--gateway " + url + " has a bad IPv6 address");
    host_ = authority.substr(1, close - 1);
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') throw InputError("--gateway " + url + " is not a URL");
      port_ = authority.substr(close + 2);
    }
  } else {
    size_t colon = authority.rfind(':');
    host_ = authority.substr(0, colon);
    if (colon != std::string::npos) port_ = authority.substr(colon + 1);
  }
  bool digits = !port_.empty() && port_.size() <= 5 &&
                std::all_of(port_.begin(), port_.end(),
                            [](char c) { return c >= '0' && c <= '9'; });
  if (host_.empty() || !digits || std::stoi(port_) < 1 || std::stoi(port_) > 65535 ||
      authority.find('@') != std::string::npos || prefix_.find_first_of("?#") != std::string::npos)
    throw InputError("--gateway " + url + " is not http(s)://HOST[:PORT] with a port in 1..65535");
  in6_addr address6;
  in_addr address4;
  host_is_ip_ = ::inet_pton(AF_INET, host_.c_str(), &address4) == 1 ||
                ::inet_pton(AF_INET6, host_.c_str(), &address6) == 1;
  if (!tls_) return;
  if (ca_file.empty())
    throw InputError("--gateway " + url + " is https: give the gateway's CA certificate with --ca");
  if (!std::ifstream(ca_file).good())
    throw InputError("cannot read the CA certificate " + ca_file);
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == nullptr) throw InputError("TLS: " + openssl_error("cannot create a TLS context"));
  ssl_ctx_ = ctx;
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
  if (SSL_CTX_load_verify_locations(ctx, ca_file.c_str(), nullptr) != 1)
    throw InputError("--ca " + ca_file + " is not a PEM CA certificate: " +
                     openssl_error("unreadable"));
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
}

Http::~Http() {
  if (ssl_ctx_ != nullptr) SSL_CTX_free(static_cast<SSL_CTX*>(ssl_ctx_));
}

Response Http::request(const std::string& method, const std::string& path,
                       const std::string& body, const std::string& content_type,
                       double timeout_seconds) {
  auto deadline = Clock::now() + std::chrono::milliseconds(
                                     static_cast<int64_t>(timeout_seconds * 1000));
  Connection connection(deadline);
  connection.connect(host_, port_);
  if (tls_) connection.start_tls(static_cast<SSL_CTX*>(ssl_ctx_), host_, host_is_ip_);
  std::string host_header = host_.find(':') != std::string::npos ? "[" + host_ + "]" : host_;
  if (port_ != (tls_ ? "443" : "80")) host_header += ":" + port_;
  std::string request = method + " " + prefix_ + path + " HTTP/1.1\r\n" +
                        "Host: " + host_header + "\r\n" +
                        "Authorization: Bearer " + token_ + "\r\n" +
                        "User-Agent: fedge-device/0.1\r\n"
                        "Accept: application/json, application/octet-stream\r\n"
                        "Connection: close\r\n";
  if (method == "POST") {
    if (!content_type.empty()) request += "Content-Type: " + content_type + "\r\n";
    request += "Content-Length: " + std::to_string(body.size()) + "\r\n";
  }
  request += "\r\n";
  connection.write_all(request);
  if (!body.empty()) connection.write_all(body);
  Reader reader(connection);
  try {
    return reader.read(method == "HEAD");
  } catch (const NetworkError& error) {
    if (tls_) throw;
    throw NetworkError(std::string(error.what()) +
                       " (if the gateway serves TLS, give https:// and --ca)");
  }
}

}  // namespace fedge
