// mixprec::Monitor: what precision is doing during training, logged every N steps: loss, loss scale,
// skipped steps and the parameters that overflowed, the fraction of gradient elements fp16 would flush to
// zero, make subnormal or overflow at the current scale, an exponent histogram, the gradient norm, step
// time, tokens/s and peak memory. Between logged steps it reads nothing back from the device; a logged
// step costs one grad_stats pass and one host read. Records go to a JSON-lines file and/or a progress
// line; Python's mixprec.Monitor is this class underneath and adds TensorBoard.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/ordered_dict.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "mixprec/grad_scaler.h"
#include "mixprec/version.h"

namespace mixprec {

/// Options of Monitor, LibTorch style.
struct MonitorOptions {
  /// Log every `every` steps (> 0).
  TORCH_ARG(int64_t, every) = 100;
  /// A JSON-lines file to append one record per logged step to; "" writes none.
  TORCH_ARG(std::string, jsonl) = "";
  /// Print a one-line summary per logged step to stdout.
  TORCH_ARG(bool, progress) = true;
  /// The exponent histogram: bins for floor(log2 |g|) = min_exponent .. min_exponent + num_bins - 1.
  TORCH_ARG(int64_t, min_exponent) = -40;
  TORCH_ARG(int64_t, num_bins) = 64;
  /// Steps a resumed run has already taken (>= 0): the count continues from there, so records and the
  /// `every` grid follow the run's own step numbers.
  TORCH_ARG(int64_t, start_step) = 0;
};

/// One logged step (Monitor::step()).
struct MonitorRecord {
  int64_t step = 0;           ///< steps seen so far (the one just finished counts)
  int64_t interval = 0;       ///< steps this record covers
  double loss = 0;            ///< mean loss over those steps
  double loss_scale = 1;      ///< after this step's update (1 without a scaler)
  int64_t skipped_steps = 0;  ///< overflowing (skipped) steps among them
  int64_t skipped_total = 0;  ///< since the monitor began
  std::string overflow;       ///< the scaler's last_overflow() text when a step was skipped in the interval, its
                              ///< step in the monitor's numbering (start_step included; one update() per step)
  // Over all gradient elements at this step, judged at loss_scale (see ops::grad_stats):
  int64_t grad_elements = 0;
  double zero_fraction = 0, flush_fraction = 0, subnormal_fraction = 0, overflow_fraction = 0,
         nonfinite_fraction = 0;
  double grad_norm = 0;
  int64_t min_exponent = 0;
  std::vector<double> exponent_histogram;  ///< counts of floor(log2 |g|) from min_exponent up
  double step_time = 0;       ///< mean wall-clock seconds per step over the interval (the first interval is
                              ///< timed from the monitor's construction: build it right before the loop)
  double tokens_per_second = 0;
  double peak_memory = 0;     ///< bytes: CUDA peak allocated on the loss's device, else the process's peak RSS

  /// One JSON object on one line (non-finite numbers as NaN / Infinity, as Python's json reads them).
  std::string json() const;
  /// E.g. "step 200 | loss 2.3412 | scale 32768 | skipped 1 | flush 0.12% | ... | 45.1 ms/step".
  std::string progress_line() const;
};

class Monitor {
 public:
  /// `named_parameters` (a module's named_parameters()) are the gradients the statistics read and the names
  /// overflows are reported by. A `scaler` (kept by pointer: it must outlive the monitor) gets overflow
  /// tracking turned on, and supplies the loss scale and the skipped steps.
  explicit Monitor(torch::OrderedDict<std::string, at::Tensor> named_parameters, GradScaler* scaler = nullptr,
                   MonitorOptions options = {});

  /// Call once per optimizer step, after scaler.update(). `loss` is the step's (unscaled) loss, a
  /// one-element tensor: it stays on the device until the step is logged. Returns the record on a logged
  /// step (every `every` steps), having written it to the sinks; nullopt otherwise, having read nothing.
  std::optional<MonitorRecord> step(const at::Tensor& loss, int64_t tokens = 0);
  /// step() reading `grads` (one per parameter of named_parameters, in order; nullopt: no gradient) instead of
  /// the parameters' .grad: e.g. the local shards of parameters whose gradients are tensor subclasses (FSDP2's
  /// DTensors), which the statistics cannot read. Only a logged step reads them (see logs_next()).
  std::optional<MonitorRecord> step(const at::Tensor& loss, int64_t tokens,
                                    const std::vector<std::optional<at::Tensor>>& grads);
  /// Whether the next step() logs.
  bool logs_next() const { return (steps_ + 1) % options_.every() == 0; }

  /// Declares the gradient of parameter `name` a shard (sharded data parallelism): a logged step sums its
  /// statistics over each of `groups` (max |g|: the largest), so every rank logs the whole gradient's. That is
  /// two collectives per group on each logged step, which every rank makes: every rank must declare the same
  /// parameters with the same groups. Python's Monitor declares FSDP2's DTensor parameters itself.
  void shard(const std::string& name, GradScaler::ShardGroups groups);

  /// Closes the jsonl file; a step() after it is an error. The destructor closes it too.
  void close();

  /// The grad_stats rows (float64 [gradients, 8 + num_bins]) of the last logged step and their names, in the
  /// order of `named_parameters` (those with gradients). Each row describes the true gradient: one an
  /// optimizer left scaled (see GradScaler::scaled_gradients()) is judged as the unscaled values would be.
  const at::Tensor& last_stats() const { return last_stats_; }
  const std::vector<std::string>& last_stats_names() const { return last_stats_names_; }
  const MonitorOptions& options() const { return options_; }

 private:
  MonitorRecord make_record(const std::vector<std::optional<at::Tensor>>& grads);
  void write_jsonl(const MonitorRecord& r);
  /// Sums the rows of declared shards over their groups (see shard()); `row_of[i]`: parameter i's row of
  /// last_stats_, -1 without a gradient.
  void reduce_shards(const std::vector<int64_t>& row_of);

  torch::OrderedDict<std::string, at::Tensor> params_;
  GradScaler* scaler_;
  MonitorOptions options_;
  std::ofstream jsonl_;
  bool jsonl_failed_ = false;  // the last write failed and may have left part of its line
  bool closed_ = false;
  int64_t steps_ = 0;
  std::vector<at::Tensor> losses_;  // this interval's, detached, on their device
  int64_t tokens_ = 0;
  int64_t skipped_before_ = 0;
  at::Tensor count_at_start_;  // the scaler's overflow counter when the monitor began (device, a copy)
  at::Tensor counter_;  // which counter that was (a tracking restart makes a new one); held, so never confused
  std::chrono::steady_clock::time_point interval_start_;
  at::Tensor last_stats_;
  std::vector<std::string> last_stats_names_;
  std::vector<GradScaler::ShardGroups> shard_groups_;  // per parameter; empty: a whole gradient
  std::unordered_map<std::string, size_t> index_of_;   // parameter name -> position (shard()'s lookups)
  std::optional<c10::Device> shard_device_;  // where the last record's sharded gradients lie (the reductions run there)
};

}  // namespace mixprec
