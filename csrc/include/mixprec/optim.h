// mixprec::optim::Adam and AdamW for LibTorch: torch::optim::Optimizer subclasses on the fused
// adam_step_ op, with master weights kept in the optimizer state (saved and loaded by torch::save /
// torch::load of the optimizer, bit-exact resume included).
#pragma once

#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mixprec/version.h"

namespace mixprec::optim {

/// Options of Adam, LibTorch style (chainable setters); defaults are torch::optim::AdamOptions'.
/// mixprec::optim::AdamW takes AdamWOptions (weight_decay 1e-2, as torch::optim::AdamWOptions).
struct AdamOptions : public torch::optim::OptimizerCloneableOptions<AdamOptions> {
  AdamOptions(double lr = 1e-3);  // NOLINT(google-explicit-constructor): mirrors torch::optim
  /// torch's own options (lr, betas, eps, weight_decay, amsgrad) with mixprec's defaults for the rest, so code
  /// written for torch::optim::Adam / AdamW passes its options unchanged (param groups' options too).
  AdamOptions(const torch::optim::AdamOptions& o);   // NOLINT(google-explicit-constructor)
  AdamOptions(const torch::optim::AdamWOptions& o);  // NOLINT(google-explicit-constructor)
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0.0;
  /// AMSGrad: divide by the running maximum of the second moment (state max_exp_avg_sq), as torch's.
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(bool, maximize) = false;
  /// "auto" (fp32 masters for fp16/bf16 params), "fp32", "remainder" (bf16 + int16) or "none".
  TORCH_ARG(std::string, master_weights) = "auto";
  /// torch::kFloat or torch::kBFloat16.
  TORCH_ARG(c10::ScalarType, moment_dtype) = c10::ScalarType::Float;
  /// How 16-bit params are written: "nearest" or "stochastic".
  TORCH_ARG(std::string, rounding) = "nearest";
  /// Key for stochastic rounding (a fresh one per step is derived from it); -1: torch's generator.
  TORCH_ARG(int64_t, seed) = -1;
  /// Steps taken with `seed` so far (part of the saved state, so a resumed run repeats its draws).
  TORCH_ARG(int64_t, rng_calls) = 0;
  /// How a GradScaler drives the step (the optimizer's defaults decide; torch's rule for fused optimizers,
  /// Python's `fused=True`): true, the scaler only checks the gradients (read, not written) and the step
  /// divides by the scale itself, one pass fewer (a skipped step leaves them scaled, as torch's fused Adam
  /// does); false, they are unscaled first, as torch unscales a plain optimizer, and the step skips on the
  /// device. Either way no host synchronisation.
  TORCH_ARG(bool, fused) = false;

 public:  // TORCH_ARG leaves the section private
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }

 private:
  friend class Adam;
  // False after reading options without mixprec's own fields (a torch::optim::Adam(W) checkpoint): Adam::load
  // then keeps the group's configured master_weights, moment_dtype, rounding, seed and maximize.
  bool has_mixprec_fields_ = true;
};

// AdamWOptions' accessors: AdamOptions' own, with setters that return AdamWOptions& (as torch's do), so a
// chain such as `auto o = AdamWOptions(3e-4).amsgrad(true)` keeps the AdamW type and its defaults.
#define MIXPREC_ADAMW_ARG(T, name)                                   \
  AdamWOptions& name(const T& value) {                               \
    AdamOptions::name(value);                                        \
    return *this;                                                    \
  }                                                                  \
  AdamWOptions& name(T&& value) {                                    \
    AdamOptions::name(std::move(value));                             \
    return *this;                                                    \
  }                                                                  \
  const T& name() const noexcept { return AdamOptions::name(); }     \
  T& name() noexcept { return AdamOptions::name(); }

/// torch::optim::AdamWOptions' defaults (weight_decay 1e-2) for mixprec::optim::AdamW, with every setter
/// returning AdamWOptions&, so `AdamWOptions(3e-4).weight_decay(0.1)` chains as with torch and stays AdamW's.
/// mixprec::optim::AdamW's defaults and group options are of this type.
struct AdamWOptions : public AdamOptions {
  AdamWOptions(double lr = 1e-3) : AdamOptions(lr) { weight_decay(1e-2); }  // NOLINT(google-explicit-constructor)
  using Betas = std::tuple<double, double>;  // AdamOptions::betas_t, which TORCH_ARG leaves private
  MIXPREC_ADAMW_ARG(double, lr)
  MIXPREC_ADAMW_ARG(Betas, betas)
  MIXPREC_ADAMW_ARG(double, eps)
  MIXPREC_ADAMW_ARG(double, weight_decay)
  MIXPREC_ADAMW_ARG(bool, amsgrad)
  MIXPREC_ADAMW_ARG(bool, maximize)
  MIXPREC_ADAMW_ARG(std::string, master_weights)
  MIXPREC_ADAMW_ARG(c10::ScalarType, moment_dtype)
  MIXPREC_ADAMW_ARG(std::string, rounding)
  MIXPREC_ADAMW_ARG(int64_t, seed)
  MIXPREC_ADAMW_ARG(int64_t, rng_calls)
  MIXPREC_ADAMW_ARG(bool, fused)
  /// Options given in full (mixprec's AdamOptions, torch's AdamWOptions / AdamOptions) keep every field as set,
  /// so AdamW's one options parameter takes them all, as torch::optim::AdamW's takes a number or its options.
  AdamWOptions(const AdamOptions& o) : AdamOptions(o) {}  // NOLINT(google-explicit-constructor)
  AdamWOptions(const torch::optim::AdamWOptions& o) : AdamOptions(o) {}  // NOLINT(google-explicit-constructor)
  AdamWOptions(const torch::optim::AdamOptions& o) : AdamOptions(o) {}  // NOLINT(google-explicit-constructor)
  /// A copy that stays AdamWOptions (OptimizerParamGroup clones its options): a group given them takes, for
  /// the fields left at AdamWOptions' defaults, the optimizer's, as torch's merge rule says.
  std::unique_ptr<torch::optim::OptimizerOptions> clone() const override {
    return std::make_unique<AdamWOptions>(*this);
  }
};

#undef MIXPREC_ADAMW_ARG

/// Per-parameter state: step count, moments (with AMSGrad also the running maximum of exp_avg_sq, as in
/// torch::optim::AdamParamState), and the master copy (fp32) or bf16 remainder (int16).
struct AdamParamState : public torch::optim::OptimizerCloneableParamState<AdamParamState> {
  TORCH_ARG(torch::Tensor, step);
  TORCH_ARG(torch::Tensor, exp_avg);
  TORCH_ARG(torch::Tensor, exp_avg_sq);
  TORCH_ARG(torch::Tensor, max_exp_avg_sq);
  TORCH_ARG(torch::Tensor, master);
  TORCH_ARG(torch::Tensor, remainder);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// The one implementation of the master-weight Adam step behind both front doors: mixprec::optim::Adam /
/// AdamW here and mixprec.optim.Adam / AdamW in Python (through torch.classes.mixprec.AdamCore). It owns
/// the option checks, the master-mode rule, state creation and conversion, the stochastic-rounding seeds,
/// grouping by (device, master mode) and the launch of the fused op. The front doors keep the state
/// (AdamParamState objects) where their users expect it and hand it over through `StateLookup`.
///
/// The flattened lists of each param group are cached across steps. A step reuses them while every
/// parameter is the same tensor with the same dtype and device, has (or lacks) a gradient as before, and its
/// state holds the same tensors; the group's master_weights and moment_dtype must be unchanged too.
/// Anything else rebuilds that group's lists (and creates or converts state where needed).
///
/// The parameter is the truth, as with torch's optimizers; an fp32 master or a remainder only refines it.
/// Before a step, a parameter written by anyone else since the core's last step (its version counter moved:
/// a load_state_dict of the model, clipping or a projection in place, a rollback) and a master the core did
/// not take from the parameter itself (loaded or assigned state) are compared element by element: wherever
/// the parameter is not the rounding of the master the step writes (the nearest; with stochastic rounding
/// either neighbour), the master becomes the parameter's value. A master that rounds to its parameter (an
/// exact resume, whichever rounding a loaded master's run used) is kept. A remainder has no such redundancy
/// (any bf16 value pairs with any remainder): it is kept where it forms a pair split_bf16_remainder can give,
/// so a write that puts the optimizer's bits back (SAM, an EMA swap) stays exact and a changed element
/// continues within half a bf16 ulp of the written value; pairs no split gives (±0 with a negative
/// remainder, which merged to a NaN) drop it. A master kind a row stops using (its parameter became fp32, or master_weights changed) is dropped;
/// remainders turn into the fp32 master they refine. `param.data = t` (new memory) is seen too; a write
/// through `param.data.copy_(...)` moves no version counter and cannot be (torch gives `.data` its own
/// counter): write the parameter itself under no_grad.
class AdamCore {
 public:
  /// The state of a parameter, created empty on first use; the reference must stay valid for the step.
  using StateLookup = std::function<AdamParamState&(const torch::Tensor& param)>;

  /// Optional inputs of one step, as in ops::AdamStepExtras: moved to each bucket's device.
  struct StepInputs {
    std::optional<torch::Tensor> lr_tensor;   // on a device: read there instead of options.lr()
    std::optional<torch::Tensor> grad_scale;  // gradients are divided by it inside the step
    std::optional<torch::Tensor> found_inf;   // non-zero: nothing is written
    /// Tensors to update instead of the parameters (a DTensor's local shard), with their gradients.
    /// State is still keyed by the parameter. Lists given this way are not cached.
    std::optional<std::vector<torch::Tensor>> locals;
    std::optional<std::vector<std::optional<torch::Tensor>>> grads;
    /// Which shard of sharded parameters `locals` are (the rank's coordinate over the mesh dimensions that shard,
    /// not those that replicate): its stochastic-rounding draws differ from the other shards'.
    int64_t shard = 0;
  };

  /// Rejects bad options with a c10::ValueError (ValueError in Python) naming the option: torch's constructor
  /// ranges (lr, eps, weight_decay >= 0, betas in [0, 1)) and check_step_options. The constructors' check.
  static void check_options(const AdamOptions& options);
  /// What a step needs, as torch's step reads whatever a group holds (a scheduler may take lr below 0; torch
  /// checks ranges in its constructor only): mixprec's choices (master_weights, moment_dtype, rounding) and
  /// betas[0] != 1 (the bias correction divides by 1 - beta1^t; torch's step raises ZeroDivisionError).
  static void check_step_options(const AdamOptions& options);
  /// "fp32", "remainder", "none" or "float64" (a float64 param: torch's own float64 step): the master kept for `param` under the choice `master_weights`.
  static std::string master_mode(const torch::Tensor& param, const std::string& master_weights);
  /// The Philox key of one stochastic-rounding step: splitmix64((seed << 20) ^ rng_calls).
  static int64_t step_seed(int64_t seed, int64_t rng_calls);
  /// The Philox key of one launch of a step: `step_seed` for the first launch of group 0 (of shard 0), a
  /// well-mixed other key for each other (group, launch, shard), since every launch numbers its elements from 0:
  /// with one key, element i of every group, dtype bucket and FSDP shard would round alike.
  static int64_t stream_seed(int64_t step_seed, int64_t group, int64_t launch, int64_t shard);
  /// Creates or converts what `mode` needs in `state` for `param` (the tensor updated): float32 step on its
  /// device, moments of `moment_dtype` (with `amsgrad` also max_exp_avg_sq, zeros at first), the fp32 master
  /// or the int16 remainder (a master is split into the param and its remainder, keeping the exact value).
  /// A master of another dtype or device is converted to fp32 on the param's device (step_group then checks
  /// it against the param); a remainder that is not int16 (torch's loader casts state to the param's dtype)
  /// cannot be trusted and restarts from zero. A master kind `mode` does not use is dropped (a remainder
  /// becomes the fp32 master it refines). `stochastic`: the group rounds stochastically, so a master split
  /// into param and remainder is kept where the param is either of its roundings, not only the nearest.
  /// Returns whether any state tensor was replaced.
  static bool prepare_state(const torch::Tensor& param, AdamParamState& state, const std::string& mode,
                            c10::ScalarType moment_dtype, bool amsgrad = false, bool stochastic = false);

  /// One step of param group `group` (the index keys the cache). Parameters without a gradient are
  /// skipped. With a non-negative seed, options.rng_calls advances when anything was stepped. Returns the
  /// indices (into `params`) whose state tensors were created or replaced, for front doors that mirror them.
  std::vector<int64_t> step_group(size_t group, at::TensorList params, AdamOptions& options, bool decoupled,
                                  const StateLookup& state_of, const StepInputs& inputs);

  /// Drops the cached lists (and the references they hold to state tensors).
  void invalidate() { plans_.clear(); }

 private:
  struct Row {
    torch::Tensor param;  // held, so pointer comparisons are identity tests
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    c10::Device device = c10::kCPU;
    bool has_grad = false;
    size_t bucket = 0;
    torch::Tensor step, exp_avg, exp_avg_sq, master;  // master: the fp32 master or the remainder, if any
    torch::Tensor max_exp_avg_sq;                     // with AMSGrad
    // fp32 masters and remainders only: the tensor the step writes (the param or its local shard) and its
    // version counter right after the last write; -1 when unknown (a master or remainder this core did not
    // take from the param itself).
    torch::Tensor target;
    int64_t version = -1;
    const void* data = nullptr;  // the target's memory then: `param.data = t` rebinds it without a version
    const void* storage = nullptr;  // and its StorageImpl (a rebind whose new memory reuses the old address)
  };
  struct Bucket {
    c10::Device device = c10::kCPU;
    std::string mode;
    std::vector<torch::Tensor> p, m, v, w, s, vmax;
  };
  struct Plan {
    bool valid = false;
    bool amsgrad = false;
    std::string master_weights;
    c10::ScalarType moment_dtype = c10::ScalarType::Float;
    std::vector<Row> rows;
    std::vector<Bucket> buckets;
  };
  /// Re-takes, from its parameter, every fp32 master or remainder whose parameter may have been written by
  /// someone else since this core's last step (its version counter moved, or the master is not one the core
  /// took from it). `stochastic`: the param may be either rounding of its master, not only the nearest.
  static void sync_masters(Plan& plan, bool stochastic);
  bool plan_holds(const Plan& plan, at::TensorList params, const AdamOptions& options, const StateLookup& state_of,
                  std::vector<std::vector<torch::Tensor>>& grads) const;
  std::vector<int64_t> build_plan(Plan& plan, at::TensorList params, const AdamOptions& options,
                                  const StateLookup& state_of, const StepInputs& inputs,
                                  std::vector<std::vector<torch::Tensor>>& grads) const;
  std::vector<Plan> plans_;
};

/// Adam with master weights (L2 weight decay added to the gradient), a drop-in for torch::optim::Adam.
class Adam : public torch::optim::Optimizer {
 public:
  explicit Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults = {});
  explicit Adam(std::vector<torch::Tensor> params, AdamOptions defaults = {})
      : Adam({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

  torch::Tensor step(LossClosure closure = nullptr) override;

  /// The step a loss scaler drives: gradients are divided by `grad_scale` inside the fused kernel (and
  /// written back divided, as torch's fused optimizers leave them), and when `found_inf` (one-element
  /// float32) is non-zero nothing is written. No host synchronisation.
  void step_scaled(const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf);

  /// Writes torch::optim::Adam(W)'s layout (int64 step counts, its option keys) plus mixprec's own fields,
  /// so torch::optim::Adam / AdamW load it too (they ignore masters, remainders and mixprec's options).
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Loads what save() wrote, or a checkpoint of torch::optim::Adam / AdamW (integer step counts, torch's
  /// options only): masters are then taken from the parameters at the next step.
  void load(torch::serialize::InputArchive& archive) override;  // all or nothing

  /// As torch::optim::Optimizer::add_param_group, keeping the group's own options (mixprec's, or
  /// torch::optim::Adam(W)Options) merged with the defaults as torch merges its optimizers' (a field left at
  /// its constructor default takes the optimizer's default). torch's own add_param_group, which this hides,
  /// drops the options of optimizers it does not know; call it through the mixprec type.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

 protected:
  Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults, bool decoupled);

 private:
  /// A group's options as AdamOptions (they always are: the constructor and add_param_group set them).
  AdamOptions& options_of(size_t group);
  /// The options a group given with `param_group` gets: its own merged with the defaults (see
  /// add_param_group), or the defaults.
  std::unique_ptr<AdamOptions> group_options(const torch::optim::OptimizerParamGroup& param_group) const;

  bool decoupled_;
  AdamCore core_;
  void load_unchecked(torch::serialize::InputArchive& archive);
};

/// AdamW (decoupled weight decay, default 1e-2) with master weights, a drop-in for torch::optim::AdamW.
class AdamW : public Adam {
 public:
  /// As torch::optim::AdamW: a bare learning rate (`AdamW(params, 1e-3)`) or `{}` means AdamWOptions, whose
  /// weight_decay is 1e-2; options given in full are taken as set.
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamWOptions defaults = {})
      : Adam(param_groups, std::move(defaults), /*decoupled=*/true) {}
  explicit AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults = {})
      : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}
};

}  // namespace mixprec::optim
