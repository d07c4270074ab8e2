// fedge-device: trains in a fedge federation through an edge gateway, or alone (--local),
// with the ExecuTorch runtime and no Python or libtorch. See ../PROTOCOL.md.
#include <openssl/evp.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

#include "blob.hpp"
#include "http.hpp"
#include "json.hpp"
#include "train.hpp"

namespace fedge {
namespace {

constexpr const char* kClient = "fedge-device 0.1";
constexpr const char* kRuntime = "executorch 1.5.1";

// Ends the program: "error: <what>" and exit 2 (main catches it, as it does InputError).
struct Fatal : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace

// `text` as one printable line: control characters and bytes that are not UTF-8 become '?'
// (messages quote names from files and from the gateway).
std::string printable(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size();) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    size_t length = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool valid = length > 0 && i + length <= text.size();
    for (size_t k = 1; valid && k < length; ++k)
      valid = (static_cast<unsigned char>(text[i + k]) >> 6) == 2;
    if (!valid || (length == 1 && (c < 0x20 || c == 0x7F))) {
      out += '?';
      ++i;
      continue;
    }
    out.append(text, i, length);
    i += length;
  }
  return out;
}

namespace {

void log(const char* format, ...) __attribute__((format(printf, 1, 2)));
void log(const char* format, ...) {
  char text[2048];
  va_list args;
  va_start(args, format);
  std::vsnprintf(text, sizeof text, format, args);
  va_end(args);
  std::fprintf(stderr, "fedge-device: %s\n", printable(text).c_str());
}

const char* kUsage =
    "usage:\n"
    "  fedge-device --gateway URL --token FILE --data FILE [--ca FILE] [--val-fraction 0.2]\n"
    "               [--join-timeout 60] [--cache DIR] [--kernels fast|portable]\n"
    "  fedge-device --local DIR --data FILE [--test FILE] [--epochs 5] [--batch-size 32]\n"
    "               [--lr 0.003] [--optimizer adam|sgd] [--patience 2] [--seed 0]\n"
    "               [--val-fraction 0.2] [--proximal-mu 0] [--out FILE]\n"
    "               [--kernels fast|portable]\n"
    "Trains with ExecuTorch programs: through a fedge gateway (PROTOCOL.md), or alone on the\n"
    "program folder DIR (manifest.json, train.pte, predict.pte, weights.bin), printing one JSON\n"
    "line of metrics.\n";

// -- small helpers -------------------------------------------------------------------------

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot read " + what + " " + path + ": " + std::strerror(errno));
  std::ostringstream out;
  out << in.rdbuf();
  if (in.bad()) throw InputError("cannot read " + what + " " + path);
  return out.str();
}

// Whole or not at all: a temporary file renamed into place.
void write_file(const std::string& path, const std::string& data, const std::string& what) {
  std::string temporary = path + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.close();
    if (!out) {
      std::remove(temporary.c_str());
      throw InputError("cannot write " + what + " " + path + ": " + std::strerror(errno));
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::string cause = std::strerror(errno);
    std::remove(temporary.c_str());
    throw InputError("cannot write " + what + " " + path + ": " + cause);
  }
}

std::string sha256_hex(const std::string& data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(data.data(), data.size(), digest, &length, EVP_sha256(), nullptr) != 1)
    throw Fatal("SHA-256 failed");
  static const char* hex = "0123456789abcdef";
  std::string text;
  for (unsigned int i = 0; i < length; ++i) {
    text += hex[digest[i] >> 4];
    text += hex[digest[i] & 15];
  }
  return text;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The one line of a gateway's JSON error body ({"error": ...}), else the status.
std::string error_of(const Response& r) {
  try {
    Json answer = Json::parse(r.body, "the answer");
    const Json* error = answer.find("error");
    if (error != nullptr && error->is_string()) return error->string("");
  } catch (const InputError&) {
  }
  return "HTTP status " + std::to_string(r.status);
}

// Every shared object mapped into this process (from /proc/self/maps), in order.
Json mapped_libraries() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  std::set<std::string> seen;
  Json::Array paths;
  while (std::getline(maps, line)) {
    size_t slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string path = line.substr(slash);
    std::string base = path.substr(path.rfind('/') + 1);
    if (base.find(".so") == std::string::npos || !seen.insert(path).second) continue;
    paths.emplace_back(path);
  }
  return Json(std::move(paths));
}

// This process's peak resident memory: VmHWM, since getrusage's ru_maxrss carries over the
// peak of the process that forked it (a Python parent's hundreds of MiB) across exec.
int64_t peak_rss_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.compare(0, 6, "VmHWM:") == 0) return std::atoll(line.c_str() + 6);
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;  // KiB on Linux
}

// -- options --------------------------------------------------------------------------------

class Options {
 public:
  Options(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        help = true;
        continue;
      }
      if (arg.compare(0, 2, "--") != 0 || arg.size() == 2)
        throw InputError("unexpected argument '" + arg + "' (options start with --; see --help)");
      std::string name = arg.substr(2), value;
      size_t equals = name.find('=');
      if (equals != std::string::npos) {
        value = name.substr(equals + 1);
        name = name.substr(0, equals);
      } else {
        if (i + 1 >= argc) throw InputError("--" + name + " needs a value");
        value = argv[++i];
      }
      if (values_.count(name)) throw InputError("--" + name + " is given twice");
      values_[name] = value;
    }
  }

  // Refuses options the mode does not take, and requires `required`.
  void allow(const std::set<std::string>& allowed, const std::set<std::string>& required,
             const std::string& mode) const {
    for (const auto& option : values_)
      if (!allowed.count(option.first))
        throw InputError("unknown option --" + option.first + " for " + mode + " (see --help)");
    for (const std::string& name : required)
      if (!values_.count(name)) throw InputError(mode + " needs --" + name + " (see --help)");
  }

  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string text(const std::string& name, const std::string& fallback = "") const {
    auto found = values_.find(name);
    return found == values_.end() ? fallback : found->second;
  }
  double number(const std::string& name, double fallback) const {
    if (!has(name)) return fallback;
    const std::string& text = values_.at(name);
    char* end = nullptr;
    errno = 0;
    double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(value))
      throw InputError("--" + name + " " + text + " is not a number");
    return value;
  }
  int64_t integer(const std::string& name, int64_t fallback) const {
    if (!has(name)) return fallback;
    const std::string& text = values_.at(name);
    char* end = nullptr;
    errno = 0;
    long long value = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0)
      throw InputError("--" + name + " " + text + " is not an integer");
    return value;
  }

  bool help = false;

 private:
  std::map<std::string, std::string> values_;
};

Samples read_samples(const std::string& path) {
  return Samples::from_blob(unpack_blob(read_file(path, "the data file"), path), path);
}

Json result_metrics(const Metrics& m) {
  return Json(Json::Object{{"train_loss", m.train_loss},
                           {"val_loss", m.val_loss},
                           {"val_accuracy", m.val_accuracy},
                           {"epochs", m.epochs},
                           {"stopped_early", m.stopped_early ? 1 : 0},
                           {"train_seconds", m.train_seconds}});
}

std::string result_blob(const Manifest& manifest, const Weights& weights, const Metrics& m) {
  Json header(Json::Object{{"program", manifest.train_sha256},
                           {"num_examples", m.num_examples},
                           {"metrics", result_metrics(m)}});
  return pack_blob(header, trained_arrays(manifest, weights));
}

double val_fraction_of(const Options& options) {
  double v = options.number("val-fraction", 0.2);
  if (!(v > 0 && v < 1)) throw InputError("--val-fraction must lie between 0 and 1");
  return v;
}

// The split every task uses (as a deployed `fedge client` keeps one split for its run).
constexpr uint64_t kSplitSeed = 0;

// -- local mode -----------------------------------------------------------------------------

std::string kernels_option(const Options& options) {
  const std::string kernels = options.text("kernels", "fast");
  if (kernels != "fast" && kernels != "portable")
    throw InputError("--kernels is fast (fedge's convolution) or portable (ExecuTorch's own)");
  return kernels;
}

int run_local(const Options& options) {
  options.allow({"local", "data", "test", "epochs", "batch-size", "lr", "optimizer", "patience",
                 "seed", "val-fraction", "proximal-mu", "out", "kernels"},
                {"local", "data"}, "--local");
  const std::string dir = options.text("local");
  const std::string kernels = kernels_option(options);
  Settings settings;
  settings.epochs = options.integer("epochs", 5);
  settings.batch_size = options.integer("batch-size", 32);
  settings.lr = options.number("lr", 0.003);
  settings.optimizer = options.text("optimizer", "adam");
  settings.patience = options.integer("patience", 2);
  settings.seed = static_cast<uint64_t>(options.integer("seed", 0));
  settings.proximal_mu = options.number("proximal-mu", 0.0);
  settings.val_fraction = val_fraction_of(options);
  try {
    settings.check();
  } catch (const TaskError& error) {
    throw InputError(error.what());
  }

  const std::string manifest_path = dir + "/manifest.json";
  Manifest manifest = Manifest::from_json(
      Json::parse(read_file(manifest_path, "the manifest"), manifest_path), manifest_path);
  std::string programs[2];
  const char* files[2] = {"train.pte", "predict.pte"};
  const std::string* expected[2] = {&manifest.train_sha256, &manifest.predict_sha256};
  for (int i = 0; i < 2; ++i) {
    std::string path = dir + "/" + files[i];
    programs[i] = read_file(path, "the program");
    std::string got = sha256_hex(programs[i]);
    if (got != *expected[i])
      throw InputError(path + " does not match its manifest: its sha256 is " + got +
                       ", the manifest's " + *expected[i]);
  }
  const std::string weights_path = dir + "/weights.bin";
  Weights weights = weights_from_blob(
      manifest, unpack_blob(read_file(weights_path, "the weights"), weights_path), weights_path);
  Samples samples = read_samples(options.text("data"));
  std::unique_ptr<Samples> test;
  if (options.has("test")) test = std::make_unique<Samples>(read_samples(options.text("test")));

  init_runtime();
  Programs loaded(manifest, std::move(programs[0]), std::move(programs[1]), kernels == "fast");
  Json output;
  try {
    check_samples(manifest, samples);
    Trainer trainer(manifest, loaded, samples);
    Split split = Split::make(samples.count, settings.val_fraction, kSplitSeed);
    Metrics metrics = trainer.train(weights, split, settings);
    output = result_metrics(metrics);
    output.set("num_examples", metrics.num_examples);
    output.set("best_epoch", metrics.best_epoch);
    if (test) {
      Trainer tester(manifest, loaded, *test);
      try {
        check_samples(manifest, *test);
      } catch (const TaskError& error) {
        throw TaskError(std::string("--test: ") + error.what());
      }
      std::vector<size_t> all(test->count);
      for (size_t i = 0; i < all.size(); ++i) all[i] = i;
      if (all.empty()) throw TaskError("--test " + options.text("test") + " holds no samples");
      Evaluation evaluation = tester.evaluate(weights, all);
      output.set("test_loss", evaluation.loss);
      output.set("test_accuracy", evaluation.accuracy);
    }
    output.set("seconds_per_epoch", metrics.seconds_per_epoch);
    if (options.has("out"))
      write_file(options.text("out"), result_blob(manifest, weights, metrics), "--out");
  } catch (const TaskError& error) {
    throw InputError(error.what());
  }
  output.set("peak_rss_kib", peak_rss_kib());
  output.set("libraries", mapped_libraries());
  std::printf("%s\n", output.dump().c_str());
  return 0;
}

// -- gateway mode ----------------------------------------------------------------------------

class Gateway {
 public:
  Gateway(Http& http, double join_timeout) : http_(http), join_timeout_(join_timeout) {}

  // The gateway's answer; unreachable (or 5xx) is retried with growing pauses until
  // join_timeout seconds have passed without any answer. A 401 ends the program.
  Response call(const std::string& method, const std::string& path, const std::string& body = "",
                const std::string& content_type = "", double timeout = 120) {
    double pause = 1;
    while (true) {
      std::string cause;
      try {
        Response r = http_.request(method, path, body, content_type, timeout);
        if (r.status == 401)
          throw Fatal("the gateway at " + http_.url() + " refused this device's token: " +
                      error_of(r));
        if (r.status < 500) {
          last_answer_ = std::chrono::steady_clock::now();
          if (lost_) log("reached the gateway at %s again", http_.url().c_str());
          lost_ = false;
          return r;
        }
        cause = "it answered " + std::to_string(r.status) + ": " + error_of(r);
      } catch (const NetworkError& error) {
        cause = error.what();
      }
      double waited = seconds_since(last_answer_);
      if (waited >= join_timeout_) {
        char text[64];
        std::snprintf(text, sizeof text, "%.0f", waited);
        throw Fatal("gave up reaching the gateway at " + http_.url() + " after " + text +
                    " s: " + cause);
      }
      double sleep = std::min(pause, join_timeout_ - waited);
      log("cannot reach the gateway at %s (%s); trying again in %.0f s", http_.url().c_str(),
          cause.c_str(), std::ceil(sleep));
      lost_ = true;
      std::this_thread::sleep_for(std::chrono::duration<double>(sleep));
      pause = std::min(pause * 2, 10.0);
    }
  }

 private:
  Http& http_;
  double join_timeout_;
  std::chrono::steady_clock::time_point last_answer_ = std::chrono::steady_clock::now();
  bool lost_ = false;
};

// The programs of the run: downloaded once (by sha256), kept loaded while they stay the same.
class ProgramCache {
 public:
  ProgramCache(Gateway& gateway, std::string folder, bool fast_kernels)
      : gateway_(gateway), folder_(std::move(folder)), fast_kernels_(fast_kernels) {}

  // Null when the round is over (409) before the programs came.
  Programs* get(const Manifest& manifest) {
    // The programs, and what they were checked against: the inputs their manifest describes.
    std::string key = manifest.train_sha256 + manifest.predict_sha256 +
                      shape_text(manifest.input_shape) + std::to_string(manifest.max_batch) +
                      dtype_name(manifest.input_dtype) + std::to_string(manifest.num_classes);
    for (const StateEntry& e : manifest.state)
      key += "|" + e.name + shape_text(e.shape) + (e.parameter ? "p" : "b");
    if (key == key_ && loaded_) return loaded_.get();
    std::string train, predict;
    if (!fetch("train", manifest.train_sha256, train) ||
        !fetch("predict", manifest.predict_sha256, predict))
      return nullptr;
    loaded_.reset();
    key_.clear();
    manifest_ = manifest;
    loaded_ = std::make_unique<Programs>(manifest_, std::move(train), std::move(predict),
                                         fast_kernels_);
    key_ = key;
    return loaded_.get();
  }

 private:
  bool fetch(const std::string& kind, const std::string& sha, std::string& bytes) {
    std::string path = folder_.empty() ? "" : folder_ + "/" + sha + ".pte";
    if (!path.empty() && ::access(path.c_str(), R_OK) == 0) {
      bytes = read_file(path, "the cached program");
      if (sha256_hex(bytes) == sha) return true;
      log("the cached %s ignored: it does not match its sha256", path.c_str());
    }
    Response r = gateway_.call("GET", "/v1/programs/" + sha);
    if (r.status == 409) return false;
    if (r.status != 200)
      throw TaskError("the gateway did not send the " + kind + " program " + sha + ": " +
                      error_of(r));
    std::string got = sha256_hex(r.body);
    if (got != sha)
      throw Fatal("the " + kind + " program the gateway sent does not match its sha256 " + sha +
                  " (its bytes hash to " + got + "); refusing to run it");
    bytes = std::move(r.body);
    if (!path.empty()) {
      try {
        write_file(path, bytes, "the program cache");
      } catch (const InputError& error) {
        log("%s", error.what());
      }
    }
    return true;
  }

  Gateway& gateway_;
  std::string folder_;
  bool fast_kernels_;
  std::string key_;
  Manifest manifest_;  // the loaded programs were checked against it
  std::unique_ptr<Programs> loaded_;
};

bool safe_task_id(const std::string& id) {
  return !id.empty() && id.size() <= 100 && std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

// Tells the gateway why this device cannot train the task.
void report_failure(Gateway& gateway, const std::string& where, const std::string& round,
                    const std::string& why) {
  log("round %s: cannot train: %s", round.c_str(), why.c_str());
  Json body(Json::Object{{"error", printable(why)}});
  Response r = gateway.call("POST", where + "/failure", body.dump(), "application/json");
  if (r.status == 409)
    log("round %s: too late to report it: %s", round.c_str(), error_of(r).c_str());
  else if (r.status != 200)
    log("round %s: the gateway refused the failure report (%d): %s", round.c_str(), r.status,
        error_of(r).c_str());
}

// One task: train and post the result, or post why this device cannot.
void run_task(Gateway& gateway, ProgramCache& cache, const Json& task, const Samples& samples,
              const Split& split, double val_fraction) {
  const Json* id_json = task.find("task");
  if (id_json == nullptr || !id_json->is_string() || !safe_task_id(id_json->string(""))) {
    log("ignored a task without a usable task id: %s", task.dump().substr(0, 100).c_str());
    std::this_thread::sleep_for(std::chrono::seconds(1));
    return;
  }
  const std::string id = id_json->string("");
  const Json* round_json = task.find("round");
  std::string round = round_json && round_json->is_number() ? round_json->dump() : "?";
  const std::string where = "/v1/tasks/" + id;
  try {
    const Json* manifest_json = task.find("manifest");
    if (manifest_json == nullptr) throw TaskError("the task has no manifest");
    Manifest manifest = Manifest::from_json(*manifest_json, "the task's manifest");
    const Json* training = task.find("training");
    Settings settings = Settings::from_json(training ? *training : Json(Json::Object{}),
                                            val_fraction);
    check_samples(manifest, samples);
    Programs* programs = cache.get(manifest);
    if (programs == nullptr) {
      log("round %s: too late: the round ended before its programs came", round.c_str());
      return;
    }
    Response r = gateway.call("GET", where + "/weights");
    if (r.status == 409 || r.status == 404) {
      log("round %s: too late for its weights: %s", round.c_str(), error_of(r).c_str());
      return;
    }
    if (r.status != 200)
      throw TaskError("the gateway did not send the round's weights: " + error_of(r));
    Weights weights = weights_from_blob(manifest, unpack_blob(r.body, "the round's weights"),
                                        "the round's weights");
    log("round %s: training", round.c_str());
    Trainer trainer(manifest, *programs, samples);
    Metrics metrics = trainer.train(weights, split, settings);
    log("round %s: %lld epochs%s, val loss %.4f, val acc %.4f, %.1f s", round.c_str(),
        static_cast<long long>(metrics.epochs), metrics.stopped_early ? " (stopped early)" : "",
        metrics.val_loss, metrics.val_accuracy, metrics.train_seconds);
    r = gateway.call("POST", where + "/result", result_blob(manifest, weights, metrics),
                     "application/octet-stream");
    if (r.status == 200) log("round %s: result accepted", round.c_str());
    else if (r.status == 409) log("round %s: too late: %s", round.c_str(), error_of(r).c_str());
    else log("round %s: the gateway refused the result (%d): %s", round.c_str(), r.status,
             error_of(r).c_str());
  } catch (const TaskError& error) {  // Fatal errors end the program instead
    report_failure(gateway, where, round, error.what());
  } catch (const InputError& error) {  // a malformed manifest, weights or program
    report_failure(gateway, where, round, error.what());
  }
}

int run_gateway(const Options& options) {
  options.allow({"gateway", "token", "data", "ca", "val-fraction", "join-timeout", "cache",
                 "kernels"},
                {"gateway", "token", "data"}, "--gateway");
  double val_fraction = val_fraction_of(options);
  double join_timeout = options.number("join-timeout", 60);
  if (!(join_timeout > 0)) throw InputError("--join-timeout must be a positive number of seconds");
  std::string token = read_file(options.text("token"), "the token file");
  auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!token.empty() && space(token.back())) token.pop_back();
  while (!token.empty() && space(token.front())) token.erase(0, 1);
  auto visible = [](char c) { return c > 32 && c < 127; };
  if (token.empty() || !std::all_of(token.begin(), token.end(), visible))
    throw InputError("the token file " + options.text("token") +
                     " does not hold a token (`fedge tokens` writes NAME.token)");
  std::string folder = options.text("cache");
  if (!folder.empty()) {
    ::mkdir(folder.c_str(), 0700);
    struct stat info {};
    if (::stat(folder.c_str(), &info) != 0 || !S_ISDIR(info.st_mode) ||
        ::access(folder.c_str(), W_OK) != 0)
      throw InputError("--cache " + folder + " is not a folder this device can write");
  }
  Http http(options.text("gateway"), token, options.text("ca"));
  Samples samples = read_samples(options.text("data"));
  Split split;
  try {
    split = Split::make(samples.count, val_fraction, kSplitSeed);
  } catch (const TaskError& error) {
    throw InputError(options.text("data") + ": " + error.what());
  }
  init_runtime();

  Gateway gateway(http, join_timeout);
  Json hello(Json::Object{{"samples", samples.count}, {"runtime", kRuntime}, {"client", kClient}});
  Response r = gateway.call("POST", "/v1/hello", hello.dump(), "application/json");
  if (r.status != 200)
    throw Fatal("the gateway at " + http.url() + " refused this device's hello: " + error_of(r));
  double poll = 20;
  std::string name = "?";
  try {
    Json answer = Json::parse(r.body, "the gateway's hello");
    if (const Json* p = answer.find("poll_seconds"); p && p->is_number() && p->number("") > 0)
      poll = std::min(p->number(""), 300.0);
    if (const Json* d = answer.find("device"); d && d->is_string()) name = d->string("");
  } catch (const InputError&) {
  }
  log("joined the gateway at %s as %s (%zu samples: %zu to train, %zu to validate)",
      http.url().c_str(), name.c_str(), samples.count, split.train.size(), split.val.size());

  ProgramCache cache(gateway, folder, kernels_option(options) == "fast");
  auto refusing_since = std::chrono::steady_clock::now();
  bool refusing = false;
  char wait[32];
  std::snprintf(wait, sizeof wait, "%g", poll);
  while (true) {
    r = gateway.call("GET", std::string("/v1/task?wait=") + wait, "", "", poll + 30);
    if (r.status == 204) continue;
    if (r.status == 410) {
      std::string summary = "the run is over";
      try {
        Json answer = Json::parse(r.body, "the answer");
        const Json* finished = answer.find("finished");
        if (finished && finished->is_string()) summary = finished->string("");
      } catch (const InputError&) {
      }
      log("the run is finished: %s", summary.c_str());
      std::printf("%s\n", printable(summary).c_str());
      return 0;
    }
    if (r.status != 200) {  // not a task: retried, as an unreachable gateway is
      if (!refusing) refusing_since = std::chrono::steady_clock::now();
      refusing = true;
      if (seconds_since(refusing_since) >= join_timeout)
        throw Fatal("the gateway at " + http.url() + " keeps answering " +
                    std::to_string(r.status) + " to task requests: " + error_of(r));
      log("the gateway answered %d to a task request: %s", r.status, error_of(r).c_str());
      std::this_thread::sleep_for(std::chrono::seconds(2));
      continue;
    }
    refusing = false;
    Json task;
    try {
      task = Json::parse(r.body, "the task");
      task.object("the task");
    } catch (const InputError& error) {
      log("%s", error.what());
      std::this_thread::sleep_for(std::chrono::seconds(1));
      continue;
    }
    run_task(gateway, cache, task, samples, split, val_fraction);
  }
}

}  // namespace
}  // namespace fedge

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  try {
    fedge::Options options(argc, argv);
    if (options.help) {
      std::fputs(fedge::kUsage, stdout);
      return 0;
    }
    if (options.has("local") && options.has("gateway"))
      throw fedge::InputError("give --gateway URL or --local DIR, not both");
    if (options.has("local")) return fedge::run_local(options);
    if (options.has("gateway")) return fedge::run_gateway(options);
    throw fedge::InputError("give --gateway URL (train in a federation) or --local DIR (train "
                            "alone); see --help");
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", fedge::printable(error.what()).c_str());
  }
  return 2;
}
