// Training one task with the run's ExecuTorch programs (PROTOCOL.md, "Training on the device").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "blob.hpp"
#include "json.hpp"

namespace fedge {

// A task this device cannot train (its samples do not fit the model, training diverged):
// reported to the gateway as a failure; the device goes on.
struct TaskError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct StateEntry {
  std::string name;
  std::vector<int64_t> shape;
  size_t size = 0;  // elements
  bool parameter = false;
  bool frozen = false;
};

struct Manifest {
  std::string model;
  std::vector<int64_t> input_shape;
  DType input_dtype = DType::Float32;
  int64_t num_classes = 0;
  int64_t max_batch = 0;
  std::vector<StateEntry> state;
  std::string train_sha256, predict_sha256;

  // InputError naming `what` when the JSON is not a fedge device manifest (format 1).
  static Manifest from_json(const Json& json, const std::string& what);
};

// A device's local samples (PROTOCOL.md, "A device's local samples").
struct Samples {
  DType dtype = DType::Float32;
  std::vector<int64_t> sample_shape;
  size_t count = 0;
  size_t sample_size = 0;  // elements per sample
  std::vector<float> xf;  // float32 samples
  std::vector<int64_t> xi;  // int64 token ids
  std::vector<int64_t> y;

  // InputError naming `what` when the blob is not a fedge-device-data/1 blob.
  static Samples from_blob(const Blob& blob, const std::string& what);
};

// The task's "training" settings, and this device's validation share.
struct Settings {
  int64_t epochs = 5;
  int64_t batch_size = 32;
  double lr = 0.003;
  std::string optimizer = "adam";
  int64_t patience = 2;
  double proximal_mu = 0.0;
  uint64_t seed = 0;
  double val_fraction = 0.2;

  // TaskError when a setting is missing a sensible value (absent ones keep defaults).
  static Settings from_json(const Json& training, double val_fraction);
  void check() const;  // TaskError naming the setting that is out of range
};

struct Metrics {
  double train_loss = 0;  // the last epoch's, dropout on
  double val_loss = 0;  // the best epoch's
  double val_accuracy = 0;
  int64_t epochs = 0;  // epochs run
  int64_t best_epoch = 0;
  bool stopped_early = false;
  double train_seconds = 0;  // the whole task: evaluations and epochs
  double seconds_per_epoch = 0;  // training steps only, per epoch run
  int64_t num_examples = 0;  // training samples
};

// The state entries' values, in the manifest's order.
using Weights = std::vector<std::vector<float>>;

// The train and predict programs of one run, loaded and checked against the manifest.
class Programs {
 public:
  // InputError when a program is not a valid ExecuTorch program for `manifest`.
  // `fast_kernels`: fedge's own convolution kernels (kernels.cpp) instead of the portable ones.
  Programs(const Manifest& manifest, std::string train_pte, std::string predict_pte,
           bool fast_kernels = true);
  ~Programs();
  Programs(const Programs&) = delete;
  Programs& operator=(const Programs&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  friend class Trainer;
};

// The validation split, held for every task (PROTOCOL.md step 1): `indices` into Samples.
struct Split {
  std::vector<size_t> train, val;
  static Split make(size_t count, double val_fraction, uint64_t seed);
};

struct Evaluation {
  double loss = 0;  // mean cross-entropy
  double accuracy = 0;
};

class Trainer {
 public:
  Trainer(const Manifest& manifest, Programs& programs, const Samples& samples);

  // Trains `weights` (in: the received ones; out: the best epoch's) on `split`.
  Metrics train(Weights& weights, const Split& split, const Settings& settings);
  // Loss and accuracy of `weights` on the samples at `indices`, with predict.
  Evaluation evaluate(const Weights& weights, const std::vector<size_t>& indices);

 private:
  const Manifest& manifest_;
  Programs& programs_;
  const Samples& samples_;
};

// TaskError when `samples` cannot train the manifest's model (dtype, number of values per
// sample, labels). Batches take the model's input shape, whatever shape the samples have.
void check_samples(const Manifest& manifest, const Samples& samples);

// Weights from a blob holding every state entry with the manifest's shapes (InputError).
Weights weights_from_blob(const Manifest& manifest, const Blob& blob, const std::string& what);
// The trained (not frozen) entries as blob arrays.
std::vector<Array> trained_arrays(const Manifest& manifest, const Weights& weights);

// ExecuTorch's own log lines go through this (errors only); call before loading programs.
void init_runtime();

// splitmix64 and a Fisher–Yates shuffle: the device's only randomness (dropout aside).
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  uint64_t next();
  void shuffle(std::vector<size_t>& items);

 private:
  uint64_t state_;
};

}  // namespace fedge
