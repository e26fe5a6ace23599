// mixprec::GradScaler: torch.amp.GradScaler's state machine in C++, on mixprec's unscale_and_check_ and
// update_scale_ ops, plus its binding as the torch custom class torch.classes.mixprec.GradScaler (which
// python/mixprec/grad_scaler.py drives; Python only walks torch.optim param groups).
#include "mixprec/grad_scaler.h"

#include <ATen/Context.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/custom_class.h>
#include <torch/library.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "grad_scaler_class.h"
#include "mixprec/ops.h"
#include "mixprec/optim.h"
#include "custom_class_of.h"
#include "ops/prefetch.h"

namespace mixprec {

namespace {
// torch's setters (and its load_state_dict) take any factor, and training code uses exactly 1 to hold the
// scale: set_growth_factor(1) caps it, set_backoff_factor(1) puts a floor under it. A growth factor below 1
// or a backoff factor above 1 (a swapped pair) is refused. The constructor keeps torch's own assertions
// (growth_factor > 1, backoff_factor < 1).
void check_growth_factor(double growth_factor) {
  TORCH_CHECK_VALUE(growth_factor >= 1.0 && std::isfinite(growth_factor),
                    "mixprec::GradScaler: growth_factor must be a finite number >= 1.0 (1 holds the scale), got ",
                    growth_factor);
}
void check_backoff_factor(double backoff_factor) {
  TORCH_CHECK_VALUE(backoff_factor > 0.0 && backoff_factor <= 1.0,
                    "mixprec::GradScaler: backoff_factor must be in (0, 1] (1 holds the scale), got ", backoff_factor);
}

// A dynamic scale starting outside [min_scale, max_scale] would be clamped by the first update against the
// direction it moves (a static one never meets the bounds).
void check_init_scale_within_bounds(const GradScalerOptions& o, double init_scale) {
  if (!o.dynamic()) return;
  TORCH_CHECK_VALUE(init_scale >= o.min_scale() && init_scale <= o.max_scale().value_or(init_scale),
                    "mixprec::GradScaler: init_scale (", init_scale, ") must lie within [min_scale, max_scale] = [",
                    o.min_scale(), ", ", o.max_scale().value_or(std::numeric_limits<double>::infinity()), "]");
}

void check_options(const GradScalerOptions& o, bool constructing) {
  if (constructing) {
    // A loaded scale is taken as it stands, as torch's loader takes it: a run whose scale fell to 0 (min_scale
    // 0 and a string of overflows) or was set to inf by update(new_scale) resumes from its checkpoint.
    TORCH_CHECK_VALUE(o.init_scale() > 0 && std::isfinite(o.init_scale()),
                      "mixprec::GradScaler: init_scale must be a finite number > 0, got ", o.init_scale());
    TORCH_CHECK_VALUE(o.growth_factor() > 1.0 && std::isfinite(o.growth_factor()),
                      "mixprec::GradScaler: growth_factor must be > 1.0, got ", o.growth_factor());
    TORCH_CHECK_VALUE(o.backoff_factor() > 0.0 && o.backoff_factor() < 1.0,
                      "mixprec::GradScaler: backoff_factor must be in (0, 1), got ", o.backoff_factor());
  } else {
    check_growth_factor(o.growth_factor());
    check_backoff_factor(o.backoff_factor());
  }
  TORCH_CHECK_VALUE(o.growth_interval() > 0, "mixprec::GradScaler: growth_interval must be > 0, got ",
                    o.growth_interval());
  TORCH_CHECK_VALUE(o.hysteresis() >= 1, "mixprec::GradScaler: hysteresis must be >= 1, got ", o.hysteresis());
  TORCH_CHECK_VALUE(o.min_scale() >= 0, "mixprec::GradScaler: min_scale must be >= 0, got ", o.min_scale());
  if (o.max_scale().has_value()) {
    TORCH_CHECK_VALUE(*o.max_scale() >= o.min_scale(), "mixprec::GradScaler: min_scale (", o.min_scale(),
                      ") must not exceed max_scale (", *o.max_scale(), ")");
  }
  if (constructing) check_init_scale_within_bounds(o, o.init_scale());
}

// The parameters whose gradients are set, and those gradients, in the same order.
struct ParamGrads {
  std::vector<at::Tensor> params, grads;
};

// Appends the parameters of `params` whose gradients are set, and the gradients. False (stopping there)
// at a gradient that is a tensor subclass (FSDP2's DTensor), whose local shard only Python can take.
// A sparse COO gradient (nn.Embedding(sparse=True)) goes in as its values, by torch's rule: an fp16 one is
// coalesced first (duplicate indices summed, which can overflow) and replaces the parameter's .grad.
bool append_grads(at::TensorList params, ParamGrads& out) {
  detail::prefetch_params_and_grads(params);
  for (const at::Tensor& p : params) {
    // A parameter that is a tensor subclass (FSDP2's DTensor) sends the optimizer to Python's path even when it
    // has no gradient on this rank: that path makes the shard groups' collectives, which every rank must make.
    if (p.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) return false;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    if (g.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) return false;
    out.params.push_back(p);
    if (g.is_sparse()) {
      if (g.scalar_type() == at::kHalf) p.mutable_grad() = g.coalesce();
      out.grads.push_back(p.grad()._values());
    } else {
      out.grads.push_back(g);
    }
  }
  return true;
}

ParamGrads optimizer_grads(torch::optim::Optimizer& optimizer) {
  ParamGrads out;
  for (auto& group : optimizer.param_groups()) {
    TORCH_CHECK(append_grads(group.params(), out),
                "mixprec::GradScaler: a parameter or gradient is a tensor subclass (e.g. a DTensor); unscale its local shard");
  }
  return out;
}



int64_t key_of(const torch::optim::Optimizer& optimizer) { return reinterpret_cast<int64_t>(&optimizer); }

// torch's rule: a CUDA scaler on a machine without CUDA (a script or a checkpointed scaler from a GPU machine)
// disables itself with a warning, so the same training code runs unscaled. (Python's scaler applies it before it
// builds this one, with Python's warning: warnings from C++ reach stderr only.)
bool usable(c10::Device device, bool enabled) {
  if (enabled && device.is_cuda() && !at::hasCUDA()) {
    TORCH_WARN("mixprec::GradScaler is enabled, but CUDA is not available. Disabling.");
    return false;
  }
  return enabled;
}
}  // namespace

GradScaler::GradScaler(c10::Device device, GradScalerOptions options)
    : options_(std::move(options)), device_(device), init_hysteresis_tracker_(options_.hysteresis()) {
  options_.enabled(usable(device_, options_.enabled()));
  if (options_.enabled()) check_options(options_, /*constructing=*/true);
}

void GradScaler::lazy_init(c10::Device device) {
  if (scale_.defined()) return;
  const auto opts = at::TensorOptions().device(device);
  scale_ = at::full({}, options_.init_scale(), opts.dtype(at::kFloat));
  growth_tracker_ = at::full({}, init_growth_tracker_, opts.dtype(at::kInt));
  hysteresis_tracker_ = at::full({}, static_cast<double>(init_hysteresis_tracker_), opts.dtype(at::kInt));
}

at::Tensor GradScaler::scale_tensor() {
  lazy_init(device_);
  return scale_;
}
at::Tensor GradScaler::growth_tracker_tensor() {
  lazy_init(device_);
  return growth_tracker_;
}
at::Tensor GradScaler::hysteresis_tracker_tensor() {
  lazy_init(device_);
  return hysteresis_tracker_;
}

at::Tensor GradScaler::scale(const at::Tensor& outputs) {
  if (!options_.enabled()) return outputs;
  // As torch's: the scale is created on the first output's device (e.g. cuda:1 for a scaler built as "cuda"
  // before torch.cuda.set_device), so unscaling that device's gradients needs no cross-device copy.
  lazy_init(outputs.device());
  return outputs * scale_.to(outputs.device(), /*non_blocking=*/true);
}

std::vector<at::Tensor> GradScaler::scale(at::TensorList outputs) {
  std::vector<at::Tensor> out;
  out.reserve(outputs.size());
  for (const auto& t : outputs) out.push_back(scale(t));
  return out;
}

std::vector<int64_t> GradScaler::place_params(int64_t key, at::TensorList params, bool& identity) {
  OverflowRecord& rec = overflow_records_[key];
  std::vector<int64_t> positions(params.size());
  identity = params.size() == rec.params.size();
  const size_t known = rec.params.size();
  for (size_t i = 0; i < params.size(); ++i) {
    c10::TensorImpl* impl = params[i].unsafeGetTensorImpl();
    auto [it, inserted] = rec.index.emplace(impl, static_cast<int64_t>(rec.params.size()));
    // A weak reference keeps the TensorImpl's memory (not its storage), so an address is never reused.
    if (inserted) rec.params.emplace_back(params[i].getIntrusivePtr());
    positions[i] = it->second;
    identity = identity && positions[i] == static_cast<int64_t>(i);
  }
  const auto total = static_cast<int64_t>(rec.params.size());
  if (!rec.record.defined()) {
    rec.record = at::zeros({3 + total}, scale_.options().dtype(at::kDouble));
    rec.record.narrow(0, 0, 1).fill_(-1.0);  // no overflow yet
    rec.amax = at::zeros({total}, scale_.options());
  } else if (rec.params.size() > known) {  // new parameters: the record grows; amax is all zeros between steps
    const auto grown = static_cast<int64_t>(rec.params.size() - known);
    rec.record = at::cat({rec.record, at::zeros({grown}, rec.record.options())});
    rec.amax = at::zeros({total}, scale_.options());
  }
  return positions;
}

void GradScaler::check_grads(int64_t key, OptimizerState& st, at::TensorList grads, at::TensorList params,
                             const at::Tensor& inv_scale) {
  TORCH_INTERNAL_ASSERT(params.empty() || params.size() == grads.size());
  // As torch's scaler: gradients of a create_graph backward require grad; unscaling them is not part of any
  // graph (and the op refuses to write into tracked tensors under grad mode).
  c10::NoGradGuard no_grad;
  // Sharded gradients measure their maxima whether or not this rank tracks: a rank that does needs every
  // rank's (reduce_found_inf).
  const bool track = (options_.track_overflows() || !st.shard_params.empty()) && !params.empty();
  std::map<std::string, std::vector<at::Tensor>> by_device;
  std::map<std::string, std::vector<int64_t>> positions_by_device;
  bool identity = false;
  std::vector<int64_t> positions;
  if (track) positions = place_params(key, params, identity);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.layout() == at::kStrided, "mixprec::GradScaler: gradients must be dense or sparse COO (whose "
                "values are checked), got layout ", g.layout());
    // A complex gradient is checked and unscaled as its real and imaginary parts (torch's scaler refuses it);
    // its max |g| is the largest part. A conjugate view is unscaled through its memory (conj(g) * s is
    // conj(g * s), and finiteness is the same), not through a resolved copy that would drop the result.
    by_device[g.device().str()].push_back(g.is_complex() ? at::view_as_real(g.is_conj() ? g.conj() : g) : g);
    if (track) positions_by_device[g.device().str()].push_back(positions[i]);
  }
  const at::Tensor amax = track ? overflow_records_[key].amax : at::Tensor();
  std::map<std::string, at::Tensor> found;
  for (auto& [device, list] : by_device) {
    const c10::Device dev(device);
    const auto opts = at::TensorOptions().device(dev).dtype(at::kFloat);
    // 0-dim like torch's flags: torch's fused optimizers broadcast it against their 0-dim step counts.
    at::Tensor flag = at::zeros({}, opts);
    // The record's amax is zero between steps; with the same parameters in the same order on the scale's
    // device (the usual case) the kernel writes straight into it, otherwise through a scatter.
    std::optional<at::Tensor> local;
    if (track) {
      local = identity && by_device.size() == 1 && dev == amax.device() ? amax
                                                                         : at::zeros({int64_t(list.size())}, opts);
    }
    // One launch per device, whatever mix of fp32/fp16/bf16 the list holds.
    ops::unscale_and_check_(list, flag, inv_scale.to(dev, /*non_blocking=*/true), local);
    if (track && !local->is_same(amax)) {
      const at::Tensor index =
          at::tensor(positions_by_device[device], at::kLong).to(amax.device(), /*non_blocking=*/true);
      // Blocking into host memory: the CPU-side index_copy_ must see the finished copy.
      amax.index_copy_(0, index, local->to(amax.device(), /*non_blocking=*/!amax.device().is_cpu()));
    }
    found.emplace(device, flag);
  }
  st.found_inf_per_device = std::move(found);
  st.tracked = track;
  st.checked = static_cast<int64_t>(grads.size());
}

void GradScaler::reduce_found_inf(int64_t key, OptimizerState& st, const ShardGroups& shard_groups) {
  std::vector<c10d::ProcessGroup*> groups;
  if (options_.process_group()) groups.push_back(options_.process_group().get());
  for (const auto& group : shard_groups) {
    if (group && std::find(groups.begin(), groups.end(), group.get()) == groups.end()) groups.push_back(group.get());
  }
  if (groups.empty()) return;
  // Every rank takes the largest flag: one float (the sum over this rank's devices) per optimizer and group. A
  // rank with no gradients this time contributes 0, and the shard groups come from the parameters (Python's
  // GradScaler._grads), so every rank makes the same collectives.
  const at::Tensor flag = st.found_inf_per_device.empty() ? at::zeros({}, scale_.options()) : combined_found_inf(st);
  c10d::AllreduceOptions reduce;
  reduce.reduceOp = c10d::ReduceOp::MAX;
  if (shard_groups.empty() || st.shard_params.empty()) {
    std::vector<at::Tensor> flags{flag};
    for (c10d::ProcessGroup* group : groups) group->allreduce(flags, reduce)->wait();
    set_found_inf(key, flags[0]);
    return;
  }
  // Sharded gradients: each rank measured its own shards, so the per-parameter maxima travel with the flag, in
  // one float64 vector (exact for both) over the parameters set_shard_parameters gave, which every rank gives
  // alike: its shape depends on nothing a rank decides alone (its gradients, whether it tracks). MAX reductions
  // need not propagate NaN (NCCL's and gloo's do not promise it), so the record's order NaN > inf > finite is
  // encoded in finite-order terms: NaN as +inf, inf as the largest double, and decoded after.
  const auto n = static_cast<int64_t>(st.shard_params.size());
  const at::TensorOptions wide = flag.options().dtype(at::kDouble);
  at::Tensor maxima = at::zeros({n}, wide);
  at::Tensor positions;
  auto record = overflow_records_.find(key);
  const bool measured = record != overflow_records_.end() && record->second.amax.defined();
  if (measured) {
    std::vector<int64_t> at_position;
    at_position.reserve(st.shard_params.size());
    for (const at::Tensor& p : st.shard_params) at_position.push_back(record->second.index.at(p.unsafeGetTensorImpl()));
    positions = at::tensor(at_position, at::kLong).to(record->second.amax.device(), /*non_blocking=*/true);
    maxima = record->second.amax.index_select(0, positions).to(wide);
  }
  const at::Tensor largest = at::full({}, std::numeric_limits<double>::max(), wide);
  const at::Tensor inf = at::full({}, std::numeric_limits<double>::infinity(), wide);
  const at::Tensor encoded = at::where(maxima.isnan(), inf, at::where(maxima.isinf(), largest, maxima));
  std::vector<at::Tensor> packed{at::cat({flag.to(at::kDouble).reshape({1}), encoded})};
  for (c10d::ProcessGroup* group : groups) group->allreduce(packed, reduce)->wait();
  if (measured && options_.track_overflows()) {
    const at::Tensor reduced = packed[0].narrow(0, 1, n);
    const at::Tensor nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), wide);
    at::Tensor& amax = record->second.amax;
    const at::Tensor decoded = at::where(reduced.isinf(), nan, at::where(reduced.eq(largest), inf, reduced));
    amax.index_copy_(0, positions, decoded.to(amax.device()).to(amax.scalar_type()));
    // What the other ranks measured is this rank's record too, gradients here or not: update() records it
    // (and zeroes the maxima for the next step).
    st.tracked = true;
  } else if (measured) {
    record->second.amax.zero_();  // measured for the ranks that track; update() keeps no record here
  }
  set_found_inf(key, packed[0].narrow(0, 0, 1).reshape({}).to(at::kFloat));
}

void GradScaler::set_shard_parameters(int64_t key, at::TensorList params) {
  if (!options_.enabled()) return;
  TORCH_CHECK(scale_.defined(), "Attempted unscale_ but the scale is not set. This may indicate your script did not "
              "use scaler.scale(loss or outputs) earlier in the iteration.");
  OptimizerState& st = per_optimizer_[key];
  st.shard_params.assign(params.begin(), params.end());
  // The record holds every one of them (those already there keep their place), so each has a position whether
  // or not it has a gradient on this rank; a rank that does not track measures them too, for those that do.
  if (!params.empty()) {
    bool identity = false;
    place_params(key, params, identity);
  }
}

void GradScaler::unscale_grads_(int64_t key, at::TensorList grads, at::TensorList params,
                                const ShardGroups& shard_groups) {
  if (!options_.enabled()) return;
  OptimizerState& st = per_optimizer_[key];
  TORCH_CHECK(st.stage != Stage::Unscaled,
              "unscale_() has already been called on this optimizer since the last update().");
  TORCH_CHECK(st.stage != Stage::Stepped, "unscale_() is being called after step().");
  TORCH_CHECK(scale_.defined(),
              "Attempted unscale_ but the scale is not set. This may indicate your script did not use "
              "scaler.scale(loss or outputs) earlier in the iteration.");
  // Computed in double and rounded once, as torch does.
  check_grads(key, st, grads, params, scale_.to(at::kDouble).reciprocal().to(at::kFloat));
  st.stage = Stage::Unscaled;  // before the collective: a failed one must not lead to unscaling twice
  reduce_found_inf(key, st, shard_groups);
}

GradScaler::ScaledStep GradScaler::prepare_scaled_step(int64_t key, at::TensorList grads, at::TensorList params,
                                                       const ShardGroups& shard_groups) {
  TORCH_CHECK(options_.enabled(), "mixprec::GradScaler: prepare_scaled_step() on a disabled scaler");
  check_not_stepped(key);
  TORCH_CHECK(scale_.defined(),
              "Attempted step but the scale is not set. This may indicate your script did not use "
              "scaler.scale(loss or outputs) earlier in the iteration.");
  OptimizerState& st = per_optimizer_[key];
  // An optimizer that takes the flag itself but has no gradients this time steps with a zero flag (a no-op),
  // as torch's scaler hands such an optimizer the sum of no flags; update() still needs another's checks.
  const auto flag = [&] {
    return st.found_inf_per_device.empty() ? at::zeros({}, scale_.options()) : combined_found_inf(st);
  };
  if (st.stage == Stage::Unscaled) return {std::nullopt, flag()};
  // Multiplying by exactly 1 leaves every value as it is, and the kernels then skip the write.
  check_grads(key, st, grads, params, at::ones({}, scale_.options()));
  st.handed_scale = true;
  reduce_found_inf(key, st, shard_groups);
  return {scale_, flag()};
}

void GradScaler::unscale_(torch::optim::Optimizer& optimizer) {
  const ParamGrads pg = optimizer_grads(optimizer);
  unscale_grads_(key_of(optimizer), pg.grads, pg.params);
}

at::Tensor GradScaler::combined_found_inf(const OptimizerState& st) const {
  TORCH_CHECK(!st.found_inf_per_device.empty(), "No inf checks were recorded for this optimizer.");
  at::Tensor total;
  for (const auto& [device, flag] : st.found_inf_per_device) {
    const at::Tensor here = flag.to(scale_.device(), /*non_blocking=*/true);
    total = total.defined() ? total + here : here.clone();
  }
  return total;
}

at::Tensor GradScaler::found_inf(int64_t key) {
  auto it = per_optimizer_.find(key);
  TORCH_CHECK(it != per_optimizer_.end() && it->second.stage != Stage::Ready,
              "mixprec::GradScaler: no gradients were unscaled for this optimizer in this iteration");
  return combined_found_inf(it->second);
}

bool GradScaler::is_unscaled(int64_t key) const {
  auto it = per_optimizer_.find(key);
  return it != per_optimizer_.end() && it->second.stage == Stage::Unscaled;
}

int64_t GradScaler::stage(int64_t key) const {
  auto it = per_optimizer_.find(key);
  return it == per_optimizer_.end() ? 0 : static_cast<int64_t>(it->second.stage);
}

std::vector<int64_t> GradScaler::optimizer_keys() const {
  std::vector<int64_t> keys;
  keys.reserve(per_optimizer_.size());
  for (const auto& [key, st] : per_optimizer_) keys.push_back(key);
  return keys;
}

void GradScaler::set_optimizer_state(int64_t key, int64_t stage,
                                     const std::map<std::string, at::Tensor>& found_inf_per_device) {
  TORCH_CHECK_VALUE(stage >= 0 && stage <= 2, "stage must be 0 (ready), 1 (unscaled) or 2 (stepped), got ", stage);
  for (const auto& [device, flag] : found_inf_per_device) {
    TORCH_CHECK_VALUE(flag.defined() && flag.numel() == 1 && flag.scalar_type() == at::kFloat,
                      "found_inf_per_device[", device, "] must be a one-element float32 tensor");
  }
  OptimizerState& st = per_optimizer_[key];
  if (stage == 0 && found_inf_per_device.empty()) st = OptimizerState{};  // torch's fresh record, kept as an entry
  st.stage = static_cast<Stage>(stage);
  st.found_inf_per_device = found_inf_per_device;
}

void GradScaler::record_checks(int64_t key, int64_t stage, const std::map<std::string, at::Tensor>& found_inf_per_device) {
  set_optimizer_state(key, stage, found_inf_per_device);
  reduce_found_inf(key, per_optimizer_[key]);  // with a process group, every rank takes the largest flag
}

void GradScaler::ensure_optimizer_state(int64_t key) { per_optimizer_.try_emplace(key); }

void GradScaler::forget_optimizer(std::optional<int64_t> key) {
  if (key.has_value()) {
    per_optimizer_.erase(*key);
  } else {
    per_optimizer_.clear();
  }
}

void GradScaler::check_not_stepped(int64_t key) const {
  auto it = per_optimizer_.find(key);
  TORCH_CHECK(it == per_optimizer_.end() || it->second.stage != Stage::Stepped,
              "step() has already been called since the last update().");
}

void GradScaler::mark_stepped(int64_t key) {
  check_not_stepped(key);
  per_optimizer_[key].stage = Stage::Stepped;
}

void GradScaler::set_process_group(c10::intrusive_ptr<c10d::ProcessGroup> group) {
  options_.process_group(std::move(group));
}

std::map<std::string, at::Tensor> GradScaler::found_inf_per_device(int64_t key) const {
  auto it = per_optimizer_.find(key);
  return it == per_optimizer_.end() ? std::map<std::string, at::Tensor>{} : it->second.found_inf_per_device;
}

void GradScaler::set_found_inf(int64_t key, const at::Tensor& found_inf) {
  OptimizerState& st = per_optimizer_[key];
  st.found_inf_per_device.clear();
  st.found_inf_per_device.emplace(found_inf.device().str(), found_inf);
}

void GradScaler::step(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled()) {
    optimizer.step();
    return;
  }
  const int64_t key = key_of(optimizer);
  check_not_stepped(key);
  TORCH_CHECK(scale_.defined(), "Attempted step but the scale is not set. This may indicate your script did not use "
              "scaler.scale(loss or outputs) earlier in the iteration.");
  if (auto* adam = dynamic_cast<optim::Adam*>(&optimizer)) {
    // Python's rule, from the optimizer's defaults: a fused one divides by the scale itself (unless unscale_()
    // came first); otherwise the gradients are unscaled first. Either way the step reads the flag on the device:
    // an overflowing step writes nothing.
    const auto* defaults = dynamic_cast<const optim::AdamOptions*>(&optimizer.defaults());
    if (defaults != nullptr && defaults->fused()) {
      const ParamGrads pg = optimizer_grads(optimizer);
      const ScaledStep handed = prepare_scaled_step(key, pg.grads, pg.params);
      adam->step_scaled(handed.grad_scale, handed.found_inf);
    } else {
      if (!is_unscaled(key)) unscale_(optimizer);
      adam->step_scaled(std::nullopt, found_inf(key));
    }
  } else {
    if (!is_unscaled(key)) unscale_(optimizer);
    if (found_inf(key).item<float>() == 0.0f) optimizer.step();  // a host check, as torch does
  }
  mark_stepped(key);
}

at::Tensor GradScaler::iteration_found_inf() const {
  at::Tensor combined;  // a fresh tensor: the flags themselves stay as the optimizers saw them
  for (const auto& [key, st] : per_optimizer_) {
    for (const auto& [device, flag] : st.found_inf_per_device) {
      const at::Tensor here = flag.to(scale_.device(), /*non_blocking=*/true);
      if (combined.defined()) {
        combined.add_(here);
      } else {
        combined = here.clone();
      }
    }
  }
  return combined;
}

void GradScaler::update() {
  if (!options_.enabled()) return;
  TORCH_CHECK(scale_.defined(), "Attempted update but the scale is not set. This may indicate your script did not "
              "use scaler.scale(loss or outputs) earlier in the iteration.");
  const at::Tensor combined = iteration_found_inf();
  TORCH_CHECK(combined.defined(), "No inf checks were recorded prior to update.");
  if (options_.track_overflows()) record_overflows(combined);
  if (options_.dynamic()) {
    ops::update_scale_(scale_, growth_tracker_, hysteresis_tracker_, combined, options_.growth_factor(),
                       options_.backoff_factor(), options_.growth_interval(), options_.hysteresis(),
                       options_.min_scale(), options_.max_scale(), options_.consecutive_hysteresis());
  }
  per_optimizer_.clear();
  ++updates_;
}

void GradScaler::update(double new_scale) {
  if (!options_.enabled()) return;
  lazy_init(device_);
  if (options_.track_overflows()) {
    // The scale is set by hand, but the step's overflows (if it ran one) are still worth recording.
    const at::Tensor combined = iteration_found_inf();
    if (combined.defined()) record_overflows(combined);
  }
  scale_.fill_(new_scale);
  per_optimizer_.clear();
  ++updates_;
}

void GradScaler::record_overflows(const at::Tensor& found_inf) {
  if (!overflow_count_.defined()) overflow_count_ = at::zeros({}, scale_.options().dtype(at::kLong));
  // Gradients stay scaled when an optimizer that takes the scale skips an overflowing step; it skips on its
  // own flag, so each such optimizer's gradients get their own factor (taken before the scale moves).
  scaled_gradients_.clear();
  for (const auto& [key, st] : per_optimizer_) {
    if (!st.handed_scale || !st.tracked || st.found_inf_per_device.empty()) continue;
    auto it = overflow_records_.find(key);
    if (it == overflow_records_.end()) continue;
    ScaledGradients entry;
    entry.params.reserve(it->second.index.size());
    for (const auto& [impl, position] : it->second.index) entry.params.push_back(impl);
    entry.factor = at::where(combined_found_inf(st).ne(0), scale_.reshape({}), at::ones({}, scale_.options()));
    scaled_gradients_.push_back(std::move(entry));
  }
  // One small op per optimizer (record_overflow_): on an overflow the record takes this step's maxima,
  // step number and scale; the maxima are zeroed for the next step. The first also counts the step.
  // Records without flags (read or reset, never unscaled or stepped) take no part.
  bool first = true;
  const auto count = [&] { return first ? std::optional<at::Tensor>(overflow_count_) : std::nullopt; };
  for (auto& [key, st] : per_optimizer_) {
    if (!st.tracked) continue;
    auto it = overflow_records_.find(key);
    if (it == overflow_records_.end() || !it->second.record.defined()) continue;  // tracking was restarted
    ops::record_overflow_(it->second.record, it->second.amax, found_inf, scale_, updates_, st.checked, count());
    first = false;
  }
  if (first) {  // no tracked optimizer (e.g. DTensor shards unscaled from Python): still count the step
    if (!scratch_record_.defined()) {
      scratch_record_ = at::zeros({3}, scale_.options().dtype(at::kDouble));
      scratch_amax_ = at::zeros({0}, scale_.options());
    }
    ops::record_overflow_(scratch_record_, scratch_amax_, found_inf, scale_, updates_, 0, count());
  }
}

void GradScaler::set_track_overflows(bool track) {
  options_.track_overflows(track);
  if (!track) {
    for (auto& [key, st] : per_optimizer_) st.tracked = false;  // this iteration's maxima are dropped too
    overflow_records_.clear();
    overflow_count_ = at::Tensor();
    scaled_gradients_.clear();
  }
}

std::optional<OverflowReport> GradScaler::last_overflow(
    const torch::OrderedDict<std::string, at::Tensor>& named_parameters) const {
  // The latest step any record holds; records from older steps (an optimizer that has not stepped since)
  // do not belong to it.
  int64_t last = -1;
  std::vector<std::pair<const OverflowRecord*, at::Tensor>> read;
  for (const auto& [key, rec] : overflow_records_) {
    if (!rec.record.defined()) continue;
    at::Tensor host = rec.record.to(at::kCPU);  // [step, scale, checked, amax...]
    last = std::max(last, static_cast<int64_t>(host.const_data_ptr<double>()[0]));
    read.emplace_back(&rec, std::move(host));
  }
  if (last < 0) return std::nullopt;
  std::map<const c10::TensorImpl*, std::string> names;
  for (const auto& item : named_parameters) names.emplace(item.value().unsafeGetTensorImpl(), item.key());
  OverflowReport report{last, 0.0, 0, {}};
  for (const auto& [rec, host] : read) {
    const double* v = host.const_data_ptr<double>();
    if (static_cast<int64_t>(v[0]) != last) continue;
    report.scale = v[1];
    report.num_tensors += static_cast<int64_t>(v[2]);
    for (size_t i = 0; i < rec->params.size(); ++i) {
      const double a = v[3 + i];
      if (std::isfinite(a)) continue;
      at::Tensor param;
      if (auto alive = rec->params[i].lock()) param = at::Tensor(std::move(alive));
      auto it = param.defined() ? names.find(param.unsafeGetTensorImpl()) : names.end();
      std::string name = it != names.end() ? it->second : "param[" + std::to_string(i) + "]";
      report.sources.push_back({std::move(name), std::move(param), a});
    }
  }
  return report;
}

std::optional<OverflowReport> GradScaler::last_overflow() const {
  return last_overflow(torch::OrderedDict<std::string, at::Tensor>());
}

std::string OverflowReport::str() const {
  std::ostringstream out;
  out << "step " << step << " (loss scale " << scale << "): ";
  constexpr size_t kShown = 8;  // a NaN that spread through the model would otherwise list every tensor
  for (size_t i = 0; i < sources.size() && i < kShown; ++i) {
    out << (i ? ", " : "") << sources[i].name << ": " << (std::isnan(sources[i].max_abs) ? "nan" : "inf");
  }
  if (sources.size() > kShown) out << ", ... " << sources.size() - kShown << " more";
  if (sources.empty()) out << "no tracked gradient was non-finite (the overflow came from elsewhere)";
  out << " (" << sources.size() << " of " << num_tensors << " tensors)";
  return out.str();
}

void GradScaler::set_growth_factor(double growth_factor) {
  check_growth_factor(growth_factor);
  options_.growth_factor(growth_factor);
}

void GradScaler::set_init_scale(double init_scale) {
  TORCH_CHECK_VALUE(init_scale > 0 && std::isfinite(init_scale),
                    "mixprec::GradScaler: init_scale must be a finite number > 0, got ", init_scale);
  check_init_scale_within_bounds(options_, init_scale);
  options_.init_scale(init_scale);
}

void GradScaler::set_backoff_factor(double backoff_factor) {
  check_backoff_factor(backoff_factor);
  options_.backoff_factor(backoff_factor);
}

void GradScaler::set_scale_tensor(const std::optional<at::Tensor>& scale) {
  if (!scale.has_value() || !scale->defined()) {  // created afresh from init_scale at the next scale()
    scale_ = growth_tracker_ = hysteresis_tracker_ = at::Tensor();
    return;
  }
  TORCH_CHECK_TYPE(scale->scalar_type() == at::kFloat && scale->numel() == 1,
                   "mixprec::GradScaler: the scale (_scale) must be a one-element float32 tensor, got ",
                   scale->scalar_type(), " of ", scale->numel(), " elements");
  const at::Tensor adopted = scale->detach().view(at::IntArrayRef{});  // its memory: in-place updates show in the caller's tensor
  const c10::Device device = adopted.device();
  if (scale_.defined() && scale_.device() != device) {
    // The overflow bookkeeping lives on the scale's device: it starts again there (as set_track_overflows(false)).
    overflow_records_.clear();
    overflow_count_ = scratch_record_ = scratch_amax_ = at::Tensor();
    scaled_gradients_.clear();
  }
  if (!growth_tracker_.defined()) {
    growth_tracker_ = at::full({}, init_growth_tracker_, adopted.options().dtype(at::kInt));
    hysteresis_tracker_ = at::full({}, static_cast<double>(init_hysteresis_tracker_), adopted.options().dtype(at::kInt));
  } else if (growth_tracker_.device() != device) {
    growth_tracker_ = growth_tracker_.to(device);
    hysteresis_tracker_ = hysteresis_tracker_.to(device);
  }
  scale_ = adopted;
}

void GradScaler::set_growth_tracker_tensor(const std::optional<at::Tensor>& tracker) {
  if (!tracker.has_value() || !tracker->defined()) {  // counting starts again from the initial value
    if (growth_tracker_.defined()) growth_tracker_ = at::full({}, init_growth_tracker_, growth_tracker_.options());
    return;
  }
  TORCH_CHECK_TYPE(tracker->scalar_type() == at::kInt && tracker->numel() == 1,
                   "mixprec::GradScaler: the growth tracker (_growth_tracker) must be a one-element int32 tensor, got ",
                   tracker->scalar_type(), " of ", tracker->numel(), " elements");
  const at::Tensor adopted = tracker->detach().view(at::IntArrayRef{});
  if (!scale_.defined()) lazy_init(adopted.device());
  TORCH_CHECK_VALUE(adopted.device() == scale_.device(), "mixprec::GradScaler: the growth tracker must be on the "
                    "scale's device (", scale_.device(), "), got ", adopted.device());
  growth_tracker_ = adopted;
}

void GradScaler::set_growth_interval(int64_t growth_interval) {
  TORCH_CHECK_VALUE(growth_interval > 0, "mixprec::GradScaler: growth_interval must be > 0, got ", growth_interval);
  options_.growth_interval(growth_interval);
}

double GradScaler::get_scale() const {
  if (!options_.enabled()) return 1.0;
  return scale_.defined() ? scale_.item<double>() : options_.init_scale();
}

c10::Dict<std::string, double> GradScaler::state_dict() const {
  c10::Dict<std::string, double> d;
  if (!options_.enabled()) return d;
  d.insert("scale", get_scale());
  d.insert("growth_factor", options_.growth_factor());
  d.insert("backoff_factor", options_.backoff_factor());
  d.insert("growth_interval", static_cast<double>(options_.growth_interval()));
  d.insert("_growth_tracker", growth_tracker_.defined() ? growth_tracker_.item<double>() : init_growth_tracker_);
  d.insert("hysteresis", static_cast<double>(options_.hysteresis()));
  d.insert("_hysteresis_tracker", hysteresis_tracker_.defined() ? hysteresis_tracker_.item<double>()
                                                                : static_cast<double>(init_hysteresis_tracker_));
  d.insert("consecutive_hysteresis", options_.consecutive_hysteresis() ? 1.0 : 0.0);
  d.insert("min_scale", options_.min_scale());
  d.insert("max_scale", options_.max_scale().value_or(std::numeric_limits<double>::infinity()));
  d.insert("dynamic", options_.dynamic() ? 1.0 : 0.0);
  return d;
}

void GradScaler::load_state_dict(const c10::Dict<std::string, double>& state) {
  if (!options_.enabled()) return;
  TORCH_CHECK(!state.empty(),
              "The source state dict is empty, possibly because it was saved from a disabled instance of GradScaler.");
  auto number = [&](const char* key) {
    TORCH_CHECK(state.contains(key), "mixprec::GradScaler::load_state_dict: the state dict has no '", key, "'");
    return state.at(key);
  };
  // Integer fields: a whole number in int64's range before the cast (a NaN or inf would be undefined).
  auto integer = [&](const char* key) {
    const double v = number(key);
    TORCH_CHECK_VALUE(std::isfinite(v) && v == std::trunc(v) && std::abs(v) < 9.0e18,
                      "mixprec::GradScaler::load_state_dict: '", key, "' must be a whole number, got ", v);
    return static_cast<int64_t>(v);
  };
  // Everything is read and checked into a copy first: a bad state dict leaves the scaler as it was.
  GradScalerOptions next = options_;
  next.init_scale(number("scale"));
  next.growth_factor(number("growth_factor"));
  next.backoff_factor(number("backoff_factor"));
  next.growth_interval(integer("growth_interval"));
  const double growth_tracker = static_cast<double>(integer("_growth_tracker"));
  // mixprec's own keys; a torch.amp.GradScaler state dict has none of them.
  if (state.contains("hysteresis")) next.hysteresis(integer("hysteresis"));
  const int64_t hysteresis_tracker = state.contains("_hysteresis_tracker") ? integer("_hysteresis_tracker") : next.hysteresis();
  if (state.contains("consecutive_hysteresis")) next.consecutive_hysteresis(number("consecutive_hysteresis") != 0);
  if (state.contains("min_scale")) next.min_scale(number("min_scale"));
  if (state.contains("max_scale")) {
    const double v = number("max_scale");
    next.max_scale(std::isinf(v) ? std::nullopt : std::optional<double>(v));
  }
  if (state.contains("dynamic")) next.dynamic(number("dynamic") != 0);
  check_options(next, /*constructing=*/false);
  options_ = next;
  init_growth_tracker_ = growth_tracker;
  init_hysteresis_tracker_ = hysteresis_tracker;
  if (scale_.defined()) {
    scale_.fill_(options_.init_scale());
    growth_tracker_.fill_(init_growth_tracker_);
    hysteresis_tracker_.fill_(init_hysteresis_tracker_);
  }
}

void GradScaler::save(torch::serialize::OutputArchive& archive) const {
  for (const auto& item : state_dict()) {
    try {
      archive.write(item.key(), c10::IValue(item.value()));
    } catch (const c10::Error& e) {
      // The archive's own message ("Parameter field mismatch for the field 'scale'") names neither the scaler
      // nor the way out.
      TORCH_CHECK(false, "mixprec::GradScaler::save: the archive already holds an entry '", item.key(),
                  "' of another kind (a module's parameter or submodule of that name?); save the scaler into its own "
                  "archive, or into a sub-archive: torch::serialize::OutputArchive sub; scaler.save(sub); "
                  "archive.write(\"scaler\", sub). (", e.what_without_backtrace(), ")");
    }
  }
}

void GradScaler::load(torch::serialize::InputArchive& archive) {
  // Only the keys state_dict() writes: the archive may hold a module's or an optimizer's entries beside them.
  static const char* const kKeys[] = {"scale", "growth_factor", "backoff_factor", "growth_interval",
                                      "_growth_tracker", "hysteresis", "_hysteresis_tracker",
                                      "consecutive_hysteresis", "min_scale", "max_scale", "dynamic"};
  c10::Dict<std::string, double> d;
  for (const char* key : kKeys) {
    c10::IValue v;
    if (!archive.try_read(key, v)) continue;
    TORCH_CHECK(v.isDouble() || v.isInt() || v.isBool(), "mixprec::GradScaler::load: '", key,
                "' in the archive is not a number");
    d.insert(key, v.isDouble() ? v.toDouble() : (v.isInt() ? static_cast<double>(v.toInt()) : v.toBool()));
  }
  load_state_dict(d);
}

// ---- torch.classes.mixprec.GradScaler -----------------------------------------------------------------------

namespace {

using detail::GradScalerClass;
using Self = c10::intrusive_ptr<GradScalerClass>;

// The parameters whose gradients are set, and the gradients, read in C++ so Python hands over one list of
// parameters instead of walking them. Nothing when a gradient is a tensor subclass (FSDP2's DTensor):
// Python then hands over the local shards itself.
GradScaler::ShardGroups resolve_groups(const std::vector<std::string>& names) {
  GradScaler::ShardGroups groups;
  for (const auto& name : names) groups.push_back(c10d::resolve_process_group(name));
  return groups;
}

std::optional<ParamGrads> grads_of(at::TensorList params) {
  ParamGrads out;
  out.params.reserve(params.size());
  out.grads.reserve(params.size());
  if (!append_grads(params, out)) return std::nullopt;
  return out;
}

}  // namespace

namespace detail {

c10::intrusive_ptr<GradScalerClass> grad_scaler_of(const c10::IValue& object) {
  return custom_class_of<GradScalerClass>(object, "GradScaler");
}

bool unscale_params(GradScaler& scaler, int64_t key, at::TensorList params) {
  auto pg = grads_of(params);
  if (pg.has_value()) scaler.unscale_grads_(key, pg->grads, pg->params);
  return pg.has_value();
}

std::optional<GradScaler::ScaledStep> prepare_scaled_step_params(GradScaler& scaler, int64_t key,
                                                                 at::TensorList params) {
  auto pg = grads_of(params);
  if (!pg.has_value()) return std::nullopt;
  return scaler.prepare_scaled_step(key, pg->grads, pg->params);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.class_<GradScalerClass>("GradScaler")
      .def(torch::init<std::string, double, double, double, int64_t, bool, int64_t, bool, double, std::optional<double>,
                       bool>())
      .def("scale", [](const Self& s, const at::Tensor& t) { return s->impl.scale(t); })
      // Gradients Python took (FSDP2's local shards), and the groups they are sharded over (by name).
      // `params`: the parameters of `grads`, one each; `all_params`: the optimizer's (for the overflow record).
      .def("unscale_grads_",
           [](const Self& s, int64_t key, std::vector<at::Tensor> grads, std::vector<at::Tensor> params,
              std::vector<at::Tensor> all_params, std::vector<std::string> shard_groups) {
             const GradScaler::ShardGroups groups = resolve_groups(shard_groups);
             if (!groups.empty()) s->impl.set_shard_parameters(key, all_params);
             s->impl.unscale_grads_(key, grads, params, groups);
           })
      // As unscale_grads_ / prepare_scaled_step with the parameters' gradients; (false, ...) when a gradient
      // is a tensor subclass and nothing was done.
      .def("unscale_params_",
           [](const Self& s, int64_t key, std::vector<at::Tensor> params) {
             return detail::unscale_params(s->impl, key, params);
           })
      .def("prepare_scaled_step_params",
           [](const Self& s, int64_t key, std::vector<at::Tensor> params) {
             using Result = std::tuple<bool, std::optional<at::Tensor>, std::optional<at::Tensor>>;
             auto r = detail::prepare_scaled_step_params(s->impl, key, params);
             if (!r.has_value()) return Result(false, std::nullopt, std::nullopt);  // (None: no undefined tensor)
             return Result(true, r->grad_scale, r->found_inf);
           })
      .def("found_inf", [](const Self& s, int64_t key) { return s->impl.found_inf(key); })
      .def("found_inf_per_device",
           [](const Self& s, int64_t key) {
             c10::Dict<std::string, at::Tensor> out;
             for (const auto& [device, flag] : s->impl.found_inf_per_device(key)) out.insert(device, flag);
             return out;
           })
      .def("prepare_scaled_step",
           [](const Self& s, int64_t key, std::vector<at::Tensor> grads, std::vector<at::Tensor> params,
              std::vector<at::Tensor> all_params, std::vector<std::string> shard_groups) {
             const GradScaler::ShardGroups groups = resolve_groups(shard_groups);
             if (!groups.empty() && !s->impl.is_unscaled(key)) s->impl.set_shard_parameters(key, all_params);
             GradScaler::ScaledStep r = s->impl.prepare_scaled_step(key, grads, params, groups);
             return std::make_tuple(r.grad_scale, r.found_inf);
           })
      .def("in_iteration", [](const Self& s) { return s->impl.in_iteration(); })
      .def("has_scale", [](const Self& s) { return s->impl.has_scale(); })
      .def("get_growth_factor", [](const Self& s) { return s->impl.options().growth_factor(); })
      .def("get_backoff_factor", [](const Self& s) { return s->impl.options().backoff_factor(); })
      .def("get_growth_interval", [](const Self& s) { return s->impl.options().growth_interval(); })
      .def("set_growth_factor", [](const Self& s, double v) { s->impl.set_growth_factor(v); })
      .def("set_backoff_factor", [](const Self& s, double v) { s->impl.set_backoff_factor(v); })
      .def("set_growth_interval", [](const Self& s, int64_t v) { s->impl.set_growth_interval(v); })
      .def("get_init_scale", [](const Self& s) { return s->impl.options().init_scale(); })
      .def("get_init_growth_tracker", [](const Self& s) { return s->impl.init_growth_tracker(); })
      .def("set_init_scale", [](const Self& s, double v) { s->impl.set_init_scale(v); })
      .def("is_unscaled", [](const Self& s, int64_t key) { return s->impl.is_unscaled(key); })
      .def("stage", [](const Self& s, int64_t key) { return s->impl.stage(key); })
      .def("optimizer_keys", [](const Self& s) { return s->impl.optimizer_keys(); })
      .def("set_optimizer_state",
           [](const Self& s, int64_t key, int64_t stage, c10::Dict<std::string, at::Tensor> flags) {
             std::map<std::string, at::Tensor> found;
             for (const auto& entry : flags) found.emplace(entry.key(), entry.value());
             s->impl.set_optimizer_state(key, stage, found);
           })
      .def("forget_optimizer", [](const Self& s, std::optional<int64_t> key) { s->impl.forget_optimizer(key); })
      .def("check_not_stepped", [](const Self& s, int64_t key) { s->impl.check_not_stepped(key); })
      .def("mark_stepped", [](const Self& s, int64_t key) { s->impl.mark_stepped(key); })
      .def("set_found_inf", [](const Self& s, int64_t key, const at::Tensor& f) { s->impl.set_found_inf(key, f); })
      .def("set_track_overflows", [](const Self& s, bool v) { s->impl.set_track_overflows(v); })
      // Python names its torch.distributed group by its group name ("" clears it); C++ resolves the same
      // c10d::ProcessGroup.
      .def("set_process_group",
           [](const Self& s, const std::string& group_name) {
             s->impl.set_process_group(group_name.empty() ? c10::intrusive_ptr<c10d::ProcessGroup>()
                                                          : c10d::resolve_process_group(group_name));
           })
      .def("track_overflows", [](const Self& s) { return s->impl.options().track_overflows(); })
      // (step, scale, tensors checked, names, max |g|s, text) of the last overflow, named from the given
      // (name, parameter) pairs; None when no tracked step overflowed.
      .def("last_overflow",
           [](const Self& s, std::vector<std::string> names, std::vector<at::Tensor> params) {
             TORCH_CHECK(names.size() == params.size(), "last_overflow: ", names.size(), " names for ",
                         params.size(), " parameters");
             torch::OrderedDict<std::string, at::Tensor> named;
             for (size_t i = 0; i < names.size(); ++i) named.insert(names[i], params[i]);
             using Result = std::tuple<int64_t, double, int64_t, std::vector<std::string>, std::vector<double>,
                                       std::string>;
             std::optional<Result> out;
             if (auto r = s->impl.last_overflow(named)) {
               std::vector<std::string> source_names;
               std::vector<double> max_abs;
               for (const auto& src : r->sources) {
                 source_names.push_back(src.name);
                 max_abs.push_back(src.max_abs);
               }
               out = Result(r->step, r->scale, r->num_tensors, source_names, max_abs, r->str());
             }
             return out;
           })
      .def("update", [](const Self& s) { s->impl.update(); })
      .def("update_to", [](const Self& s, double v) { s->impl.update(v); })
      .def("get_scale", [](const Self& s) { return s->impl.get_scale(); })
      .def("is_enabled", [](const Self& s) { return s->impl.is_enabled(); })
      .def("scale_tensor", [](const Self& s) { return s->impl.scale_tensor(); })
      .def("set_scale_tensor", [](const Self& s, std::optional<at::Tensor> t) { s->impl.set_scale_tensor(t); })
      .def("record_checks",
           [](const Self& s, int64_t key, int64_t stage, c10::Dict<std::string, at::Tensor> flags) {
             std::map<std::string, at::Tensor> found;
             for (const auto& entry : flags) found.emplace(entry.key(), entry.value());
             s->impl.record_checks(key, stage, found);
           })
      .def("set_growth_tracker_tensor",
           [](const Self& s, std::optional<at::Tensor> t) { s->impl.set_growth_tracker_tensor(t); })
      .def("ensure_optimizer_state", [](const Self& s, int64_t key) { s->impl.ensure_optimizer_state(key); })
      .def("init_scale_on", [](const Self& s, const std::string& device) { s->impl.init_scale_on(device); })
      .def("growth_tracker_tensor", [](const Self& s) { return s->impl.growth_tracker_tensor(); })
      .def("hysteresis_tracker_tensor", [](const Self& s) { return s->impl.hysteresis_tracker_tensor(); })
      .def("state_dict", [](const Self& s) { return s->impl.state_dict(); })
      .def("load_state_dict",
           [](const Self& s, c10::Dict<std::string, double> d) { s->impl.load_state_dict(d); });
  detail::register_monitor_class(m);
}

}  // namespace mixprec
