// mixprec::GradScaler: dynamic loss scaling for LibTorch, with torch.amp.GradScaler's semantics (the
// defaults reproduce it exactly) plus opt-in hysteresis, scale bounds and a static mode. The same class
// is Python's mixprec.GradScaler underneath (bound as the torch custom class torch.classes.mixprec.GradScaler).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Dict.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>
#include <torch/ordered_dict.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "mixprec/version.h"

namespace mixprec {

/// Options of GradScaler, LibTorch style (chainable setters). Defaults are torch.amp.GradScaler's.
struct GradScalerOptions {
  TORCH_ARG(double, init_scale) = 65536.0;
  TORCH_ARG(double, growth_factor) = 2.0;
  TORCH_ARG(double, backoff_factor) = 0.5;
  TORCH_ARG(int64_t, growth_interval) = 2000;
  TORCH_ARG(bool, enabled) = true;
  /// Overflows tolerated before backing off (Megatron/DeepSpeed); 1 = back off on every overflow.
  TORCH_ARG(int64_t, hysteresis) = 1;
  /// With consecutive_hysteresis, only that many overflows *in a row* back off (DeepSpeed's rule).
  TORCH_ARG(bool, consecutive_hysteresis) = false;
  TORCH_ARG(double, min_scale) = 0.0;
  TORCH_ARG(std::optional<double>, max_scale) = std::nullopt;
  /// false: a static loss scale (init_scale) that never changes; overflowing steps are still skipped.
  TORCH_ARG(bool, dynamic) = true;
  /// Record which parameters' gradients overflowed (last_overflow()): the unscale pass also takes each
  /// gradient's max |g| into a small device buffer (no extra pass), kept on the device for the last
  /// overflowing step. Costs a few tiny device ops per step; off by default.
  TORCH_ARG(bool, track_overflows) = false;
  /// Data parallelism: each optimizer's overflow flag is MAX-reduced over this group where its gradients are
  /// checked (one all-reduce of one float per optimizer and iteration, asynchronous on NCCL), so every rank
  /// skips the same steps and moves the scale alike even when only one rank's gradients overflowed (e.g.
  /// FSDP's shards, or gradients changed after DDP's reduction). Every rank must check the same optimizers in
  /// the same order (unscale_ / step), as any collective requires. Unset: each rank decides alone.
  TORCH_ARG(c10::intrusive_ptr<c10d::ProcessGroup>, process_group) = nullptr;
};

/// One parameter whose gradient held inf/NaN (GradScaler::last_overflow()).
struct OverflowSource {
  std::string name;  ///< from the names given to last_overflow(), else "param[i]" (i: the order in which the
                     ///< scaler first saw its optimizer's parameters with gradients; per optimizer, so with
                     ///< several optimizers positions repeat: pass named_parameters())
  at::Tensor param;  ///< undefined when the parameter no longer exists
  double max_abs;    ///< max |g| as the scaled gradient held it: inf or NaN
};

/// The last step whose gradients overflowed, as GradScaler::last_overflow() reads it back.
struct OverflowReport {
  int64_t step;         ///< how many update() calls came before it (0 = the first iteration)
  double scale;         ///< the loss scale of that step
  int64_t num_tensors;  ///< gradients checked in that step
  std::vector<OverflowSource> sources;
  /// E.g. "step 12 (loss scale 65536): blocks.3.mlp.fc1.weight: inf (1 of 149 tensors)".
  std::string str() const;
};

class GradScaler {
 public:
  explicit GradScaler(c10::Device device = c10::kCPU, GradScalerOptions options = {});

  /// loss * scale (on the loss's device; no host sync). The first call creates the scale on the device of
  /// `outputs` (of its first tensor for a list), as torch's does; the constructor's device only serves
  /// calls that need the scale before any scale().
  at::Tensor scale(const at::Tensor& outputs);
  std::vector<at::Tensor> scale(at::TensorList outputs);

  /// Unscales the optimizer's gradients in place (one launch per device) and records inf/NaN.
  /// Calling it twice before update(), or after step(), is an error, as in torch.
  void unscale_(torch::optim::Optimizer& optimizer);

  /// Steps the optimizer unless its gradients overflowed, as Python's mixprec.GradScaler.step does. A
  /// mixprec::optim optimizer skips itself on the device (no host sync). With `AdamOptions::fused(true)` in
  /// its defaults it follows torch's protocol for optimizers that handle scaling
  /// (`_step_supports_amp_scaling`): unless unscale_() came first, its gradients are only checked (read, not
  /// written), then it receives the scale and the overflow flag and divides the gradients by the scale
  /// inside its fused step (writing them back unscaled, as torch's fused optimizers do; a skipped step
  /// leaves them scaled): no separate unscale pass. Otherwise (the default) its gradients are unscaled
  /// first, as torch unscales a plain optimizer, and it receives the flag: the same `.grad` and parameters as
  /// Python's default. Any other optimizer is unscaled first and skipped by a host check of the flag, as
  /// torch does.
  void step(torch::optim::Optimizer& optimizer);

  /// Moves the scale from this iteration's overflow flags (all optimizers), on the device.
  void update();
  /// Sets the scale to new_scale instead.
  void update(double new_scale);

  /// The current scale (a host sync); init_scale before first use; 1.0 when disabled.
  double get_scale() const;
  bool is_enabled() const { return options_.enabled(); }
  const GradScalerOptions& options() const { return options_; }

  /// torch.amp.GradScaler's setters; they take effect at the next update(). A factor of exactly 1 holds the
  /// scale (growth 1: a cap, backoff 1: a floor), as with torch's setters; the constructor requires
  /// growth_factor > 1 and backoff_factor < 1, as torch's does. Reading them back (options()) never touches
  /// the device.
  void set_growth_factor(double growth_factor);
  void set_backoff_factor(double backoff_factor);
  void set_growth_interval(int64_t growth_interval);
  /// The scale the scale tensor starts from when it is created (the first scale()); an existing scale is kept,
  /// as assigning torch's `_init_scale` does.
  void set_init_scale(double init_scale);
  /// Assigning torch's `_scale`: the scaler takes this one-element float32 tensor (its memory, as a 0-dim view)
  /// as its scale from now on, creating the trackers beside it if there were none; nullopt drops the scale and
  /// trackers, created again from init_scale at the next scale().
  void set_scale_tensor(const std::optional<at::Tensor>& scale);
  /// Assigning torch's `_growth_tracker`: a one-element int32 tensor on the scale's device; nullopt restarts the
  /// count.
  void set_growth_tracker_tensor(const std::optional<at::Tensor>& tracker);
  /// Turns overflow tracking on or off (from the next unscale or step); off drops what was recorded.
  void set_track_overflows(bool track);
  /// Sets (or, null, clears) GradScalerOptions::process_group, from the next gradient check on.
  void set_process_group(c10::intrusive_ptr<c10d::ProcessGroup> group);

  /// The last overflowing step since tracking began (track_overflows), naming the offending parameters
  /// from `named_parameters` (a module's named_parameters(); identity decides); nullopt when no tracked
  /// step overflowed. Reads the record back from the device: a host sync, only when asked.
  /// Overflowing steps since tracking began: an int64 0-dim tensor on the scale's device (no host sync;
  /// undefined before the first tracked update()).
  const at::Tensor& overflow_count() const { return overflow_count_; }
  /// Gradients an optimizer left scaled in the last update()'s iteration. An optimizer that takes the scale
  /// itself (a read-only check, then its fused step divides) and skips an overflowing step leaves its
  /// gradients holding g * scale; one entry per optimizer that took the scale, with the parameters whose
  /// gradients it was handed (identities: the overflow record holds them weakly, so no address is reused)
  /// and the factor its gradients hold relative to the true ones (float32 0-dim on the scale's device: that
  /// step's scale if it skipped, else 1). Tracked with track_overflows; empty when no optimizer took the
  /// scale, which the host knows: the Monitor reads the factors back only otherwise.
  struct ScaledGradients {
    std::vector<const c10::TensorImpl*> params;
    at::Tensor factor;
  };
  const std::vector<ScaledGradients>& scaled_gradients() const { return scaled_gradients_; }
  std::optional<OverflowReport> last_overflow(const torch::OrderedDict<std::string, at::Tensor>& named_parameters) const;
  /// As above, the parameters named by position ("param[i]").
  std::optional<OverflowReport> last_overflow() const;

  /// torch.amp.GradScaler's state_dict keys ("scale", "growth_factor", "backoff_factor",
  /// "growth_interval", "_growth_tracker") plus mixprec's ("hysteresis", "_hysteresis_tracker",
  /// "consecutive_hysteresis", "min_scale", "max_scale", "dynamic"), all as numbers (flags 0/1, no
  /// max_scale = inf); empty when disabled.
  c10::Dict<std::string, double> state_dict() const;
  /// Loads a state dict of ours or of torch.amp.GradScaler (missing mixprec keys keep their values).
  void load_state_dict(const c10::Dict<std::string, double>& state);

  /// The state dict's keys as numbers, into `archive` (which may hold other entries: a module's, an
  /// optimizer's, as long as none of them is named like one of the scaler's keys, e.g. a parameter "scale":
  /// then give the scaler a sub-archive); `load` reads those keys only. `torch::save(scaler, path)` / `torch::load(scaler, path)`
  /// work as for modules and optimizers (the operators below).
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);
  /// The growth count the tracker starts from when it is created: 0, or what load_state_dict loaded (torch's
  /// `_init_growth_tracker`).
  double init_growth_tracker() const { return init_growth_tracker_; }

  // ---- the optimizer-agnostic core (what the Python binding drives) ----------------------------------

  /// The process groups over which gradients are sharded (each rank checks its shard): the flags are MAX-reduced
  /// over each (after the scaler's own process_group), so every rank skips alike, as torch's scaler does for
  /// FSDP2's DTensor gradients. Empty for whole gradients.
  using ShardGroups = std::vector<c10::intrusive_ptr<c10d::ProcessGroup>>;
  /// Unscale `grads` for the optimizer identified by `key` (e.g. its address or Python id). With `params`
  /// (the parameters the gradients belong to, one per gradient) an overflow can be traced to them.
  void unscale_grads_(int64_t key, at::TensorList grads, at::TensorList params = {},
                      const ShardGroups& shard_groups = {});
  /// Sharded gradients (FSDP2): the parameters (the optimizer's, in an order every rank shares) whose max |g|
  /// the flag's reduction over the shard groups carries, for this iteration. Give them before unscale_grads_ /
  /// prepare_scaled_step with shard groups, on every rank alike, whether or not it tracks overflows: the
  /// collective is then `[flag, max |g| per parameter]` everywhere (every rank measures its shards' maxima in
  /// the unscale pass itself), so ranks that disagree on tracking (track_overflows on one rank only) still make
  /// matching collectives, and every tracking rank names the same sources (GradScaler.last_overflow under
  /// FSDP2).
  void set_shard_parameters(int64_t key, at::TensorList params);
  /// The optimizer's overflow flag (0-dim float32, the sum over devices, on the scale's device).
  at::Tensor found_inf(int64_t key);

  /// What an optimizer that handles scaling itself receives (torch's `grad_scale` / `found_inf`).
  struct ScaledStep {
    std::optional<at::Tensor> grad_scale;  ///< the scale (0-dim float32) when the grads are still scaled
    at::Tensor found_inf;                  ///< 0-dim float32 on the scale's device
  };
  /// torch's rule for such optimizers: when `grads` have not been unscaled this iteration, they are only
  /// checked for inf/NaN (read, not written) and the scale is handed over; after unscale_() the flag alone.
  ScaledStep prepare_scaled_step(int64_t key, at::TensorList grads, at::TensorList params = {},
                                 const ShardGroups& shard_groups = {});
  /// Whether any optimizer has a record this iteration: unscaled, stepped, or read / reset through torch's
  /// `_per_optimizer_states` (torch refuses to pickle or deep-copy then).
  bool in_iteration() const { return !per_optimizer_.empty(); }
  /// update() calls so far (since construction: not saved): the step number OverflowReport gives.
  int64_t updates() const { return updates_; }
  /// Whether the scale tensor exists yet (scale(), init_scale_on() or a tensor getter creates it).
  bool has_scale() const { return scale_.defined(); }
  /// Creates the scale tensors on `device` unless they exist (torch's _lazy_init_scale_growth_tracker).
  void init_scale_on(c10::Device device) { lazy_init(device); }
  /// Whether the optimizer's gradients have been unscaled since the last update().
  bool is_unscaled(int64_t key) const;
  /// The optimizer's stage this iteration, as torch's OptState: 0 ready, 1 unscaled, 2 stepped.
  int64_t stage(int64_t key) const;
  /// The keys of the optimizers with a record this iteration.
  std::vector<int64_t> optimizer_keys() const;
  /// Overwrites an optimizer's record, as code that edits torch's `_per_optimizer_states` does (e.g. back to
  /// ready with no flags to run the iteration again: a fresh record, which stays an entry as in torch).
  void set_optimizer_state(int64_t key, int64_t stage, const std::map<std::string, at::Tensor>& found_inf_per_device);
  /// Stores flags that checks made elsewhere produced (a Python subclass's own `_unscale_grads_`) as an
  /// optimizer's record, then, with a process group, all-reduces them as the scaler's own checks are.
  void record_checks(int64_t key, int64_t stage, const std::map<std::string, at::Tensor>& found_inf_per_device);
  /// Creates a ready record without flags unless the optimizer has one (reading torch's `_per_optimizer_states`,
  /// a defaultdict, creates it: it counts as an entry, e.g. against pickling, until update()).
  void ensure_optimizer_state(int64_t key);
  /// Drops an optimizer's record (every record with no key), as popping torch's per-optimizer state does.
  void forget_optimizer(std::optional<int64_t> key = std::nullopt);
  /// Fails if the optimizer already stepped since the last update().
  void check_not_stepped(int64_t key) const;
  /// Records that the optimizer stepped (checks that it had not already since the last update()).
  void mark_stepped(int64_t key);
  /// Replaces every recorded flag of the optimizer with `found_inf` (e.g. after an all-reduce).
  void set_found_inf(int64_t key, const at::Tensor& found_inf);
  /// The optimizer's flags recorded this iteration, by device string (empty before its unscale or check):
  /// the tensors themselves, so a change made in place (an all-reduce) is what step() and update() read,
  /// as with torch's `_found_inf_per_device`.
  std::map<std::string, at::Tensor> found_inf_per_device(int64_t key) const;
  /// The scale tensor (one element, float32, on the scale's device), created on first use.
  at::Tensor scale_tensor();
  at::Tensor growth_tracker_tensor();
  at::Tensor hysteresis_tracker_tensor();

 private:
  enum class Stage { Ready, Unscaled, Stepped };
  struct OptimizerState {
    Stage stage = Stage::Ready;
    std::map<std::string, at::Tensor> found_inf_per_device;  // keyed by device string
    bool tracked = false;       // track_overflows: the unscale pass filled the record's amax
    int64_t checked = 0;        // gradients checked
    bool handed_scale = false;  // prepare_scaled_step handed the scale over: .grad stays scaled on overflow
    std::vector<at::Tensor> shard_params;  // set_shard_parameters: whose maxima the shard reduction carries
  };
  /// One optimizer's record of the last overflowing step, on the scale's device and updated by update()
  /// with one record_overflow_ op (no host sync). Its parameters are every one the scaler has seen for the
  /// optimizer (a set that may vary per step: unused branches have no gradient), held weakly so that the
  /// record never keeps a model alive.
  struct OverflowRecord {
    std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> params;
    std::map<const c10::TensorImpl*, int64_t> index;  // position of each parameter in `params`
    at::Tensor record;  // float64 [3 + params]: step (-1: none yet), scale, gradients checked, max |g| each
    at::Tensor amax;    // float32 [params]: this step's max |g| (the unscale pass's output), zero between steps
  };

  /// The positions of `params` in the optimizer's record (created or grown as needed); `identity` when they
  /// are the record's parameters in order.
  std::vector<int64_t> place_params(int64_t key, at::TensorList params, bool& identity);
  /// Runs the fused unscale-and-check over `grads` (an inv_scale of 1 makes it a read-only check) and
  /// records the per-device flags in `st`; the stage is left to the caller.
  void check_grads(int64_t key, OptimizerState& st, at::TensorList grads, at::TensorList params,
                   const at::Tensor& inv_scale);
  /// With a process group (options_) or shard groups, replaces the optimizer's flags by their MAX over each.
  void reduce_found_inf(int64_t key, OptimizerState& st, const ShardGroups& shard_groups = {});
  /// The sum of every optimizer's flags this iteration, on the scale's device; undefined when none.
  at::Tensor iteration_found_inf() const;
  /// Folds this iteration's per-tensor maxima into the overflow records (where `found_inf` is non-zero).
  void record_overflows(const at::Tensor& found_inf);
  void lazy_init(c10::Device device);
  at::Tensor combined_found_inf(const OptimizerState& st) const;

  GradScalerOptions options_;
  c10::Device device_;
  at::Tensor scale_, growth_tracker_, hysteresis_tracker_;
  double init_growth_tracker_ = 0;
  int64_t init_hysteresis_tracker_;
  std::map<int64_t, OptimizerState> per_optimizer_;
  int64_t updates_ = 0;  // update() calls so far: the step number overflow reports give
  std::map<int64_t, OverflowRecord> overflow_records_;
  at::Tensor overflow_count_;
  std::vector<ScaledGradients> scaled_gradients_;
  at::Tensor scratch_record_, scratch_amax_;  // record_overflow_'s operands when no optimizer is tracked
};

/// `torch::save(scaler, ...)`, as for optimizers and modules.
inline torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive, const GradScaler& scaler) {
  scaler.save(archive);
  return archive;
}
/// `torch::load(scaler, ...)`, as for optimizers and modules.
inline torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, GradScaler& scaler) {
  scaler.load(archive);
  return archive;
}

}  // namespace mixprec
