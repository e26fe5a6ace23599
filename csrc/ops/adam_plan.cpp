#include "ops/adam_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "ops/cast_plan.h"
#include "ops/checks.h"

namespace mixprec::detail {

namespace {
constexpr const char* kOp = "mixprec::adam_step_";

bool is_float_param(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_list(at::TensorList list, const char* name, size_t n, c10::Device device) {
  TORCH_CHECK(list.size() == n, kOp, ": ", name, " must have one tensor per param (", n, "), got ", list.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), kOp, ": ", name, "[", i, "] is an undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, kOp, ": ", name, "[", i,
                "] must be a dense (strided) tensor; sparse gradients are not supported, got layout ", t.layout());
    TORCH_CHECK(t.device() == device, kOp, ": ", name, "[", i, "] is on ", t.device(), " but params[0] is on ", device,
                "; every tensor must be on the same device");
  }
}

void check_optional_scalar(const std::optional<at::Tensor>& t, const char* name, c10::Device device) {
  if (t.has_value() && t->defined()) check_one_element(*t, kOp, name, at::kFloat, device);
}
}  // namespace

MasterMode parse_master_mode(std::string_view mode) {
  if (mode == "none") return MasterMode::None;
  if (mode == "fp32") return MasterMode::Fp32;
  if (mode == "remainder") return MasterMode::Remainder;
  TORCH_CHECK(false, kOp, ": master_mode must be \"none\", \"fp32\" or \"remainder\", got \"", std::string(mode), "\"");
}

AdamArgs make_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                        bool maximize, c10::string_view master_mode, c10::string_view rounding,
                        std::optional<int64_t> seed, const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& clip_coef,
                        std::optional<at::TensorList> max_exp_avg_sqs) {
  return {params,
          grads,
          exp_avgs,
          exp_avg_sqs,
          masters,
          steps,
          lr,
          beta1,
          beta2,
          eps,
          weight_decay,
          decoupled_weight_decay,
          maximize,
          parse_master_mode(std::string_view(master_mode.data(), master_mode.size())),
          parse_rounding(std::string_view(rounding.data(), rounding.size()), kOp),
          seed,
          lr_tensor,
          grad_scale,
          found_inf,
          clip_coef,
          max_exp_avg_sqs};
}

namespace {

// Each row advances its own count: two rows counting in one place would advance it twice (and on CUDA race).
void check_distinct_steps(at::TensorList steps) {
  std::vector<std::pair<const void*, size_t>> at;
  at.reserve(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) at.emplace_back(steps[i].const_data_ptr(), i);
  std::sort(at.begin(), at.end());
  for (size_t k = 1; k < at.size(); ++k) {
    TORCH_CHECK(at[k].first != at[k - 1].first, kOp, ": steps[", std::min(at[k - 1].second, at[k].second),
                      "] and steps[", std::max(at[k - 1].second, at[k].second),
                      "] are the same memory; every row needs its own step count");
  }
}

}  // namespace

void check_adam_args(const AdamArgs& a) {
  // Any hyper-parameter torch's step computes with (torch's fused step checks none; a scheduler may take lr
  // below 0), except beta1 = 1, which makes the bias correction a division by zero.
  TORCH_CHECK(a.beta1 != 1.0, kOp, ": beta1 must not be 1 (the step divides by 1 - beta1^step), got ", a.beta1);
  const size_t n = a.params.size();
  if (n == 0) return;
  const c10::Device device = a.params[0].device();
  check_list(a.params, "params", n, device);
  check_list(a.grads, "grads", n, device);
  check_list(a.exp_avgs, "exp_avgs", n, device);
  check_list(a.exp_avg_sqs, "exp_avg_sqs", n, device);
  check_list(a.steps, "steps", n, device);
  if (a.max_exp_avg_sqs.has_value()) check_list(*a.max_exp_avg_sqs, "max_exp_avg_sqs", n, device);
  if (a.master_mode == MasterMode::None) {
    TORCH_CHECK(a.masters.empty(), kOp, ": masters must be empty when master_mode is \"none\", got ", a.masters.size(),
                " tensors");
  } else {
    check_list(a.masters, "masters", n, device);
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(is_float_param(p.scalar_type()), kOp, ": params[", i, "] must be float32, float16 or bfloat16, got ",
                p.scalar_type());
    TORCH_CHECK(is_float_param(a.grads[i].scalar_type()), kOp, ": grads[", i,
                "] must be float32, float16 or bfloat16, got ", a.grads[i].scalar_type());
    TORCH_CHECK(a.grads[i].sizes() == p.sizes(), kOp, ": grads[", i, "] has shape ", a.grads[i].sizes(),
                " but params[", i, "] has shape ", p.sizes());
    for (const auto& [list, name] : {std::pair{a.exp_avgs, "exp_avgs"}, std::pair{a.exp_avg_sqs, "exp_avg_sqs"}}) {
      const at::Tensor& m = list[i];
      TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kBFloat16, kOp, ": ", name, "[", i,
                  "] must be float32 or bfloat16 (moments keep their own dtype), got ", m.scalar_type());
      TORCH_CHECK(m.sizes() == p.sizes(), kOp, ": ", name, "[", i, "] has shape ", m.sizes(), " but params[", i,
                  "] has shape ", p.sizes());
    }
    TORCH_CHECK(a.exp_avg_sqs[i].scalar_type() == a.exp_avgs[i].scalar_type(), kOp, ": exp_avg_sqs[", i,
                "] must have the dtype of exp_avgs[", i, "] (", a.exp_avgs[i].scalar_type(), "), got ",
                a.exp_avg_sqs[i].scalar_type());
    if (a.max_exp_avg_sqs.has_value()) {
      const at::Tensor& vmax = (*a.max_exp_avg_sqs)[i];
      TORCH_CHECK(vmax.scalar_type() == a.exp_avgs[i].scalar_type(), kOp, ": max_exp_avg_sqs[", i,
                  "] must have the dtype of exp_avgs[", i, "] (", a.exp_avgs[i].scalar_type(), "), got ",
                  vmax.scalar_type());
      TORCH_CHECK(vmax.sizes() == p.sizes(), kOp, ": max_exp_avg_sqs[", i, "] has shape ", vmax.sizes(),
                  " but params[", i, "] has shape ", p.sizes());
    }
    const at::Tensor& st = a.steps[i];
    if (!(st.layout() == at::kStrided && st.numel() == 1 && st.scalar_type() == at::kFloat && st.device() == device)) {
      // The name is only composed for the message: a string per row would cost more than the row's checks.
      check_one_element(st, kOp, ("steps[" + std::to_string(i) + "]").c_str(), at::kFloat, device);
    }
    if (a.master_mode == MasterMode::Fp32) {
      TORCH_CHECK(a.masters[i].scalar_type() == at::kFloat, kOp, ": masters[", i,
                  "] must be float32 when master_mode is \"fp32\", got ", a.masters[i].scalar_type());
      TORCH_CHECK(a.masters[i].sizes() == p.sizes(), kOp, ": masters[", i, "] has shape ", a.masters[i].sizes(),
                  " but params[", i, "] has shape ", p.sizes());
    } else if (a.master_mode == MasterMode::Remainder) {
      TORCH_CHECK(p.scalar_type() == at::kBFloat16, kOp, ": params[", i,
                  "] must be bfloat16 when master_mode is \"remainder\", got ", p.scalar_type());
      TORCH_CHECK(a.masters[i].scalar_type() == at::kShort, kOp, ": masters[", i,
                  "] must be int16 remainders when master_mode is \"remainder\", got ", a.masters[i].scalar_type());
      TORCH_CHECK(a.masters[i].sizes() == p.sizes(), kOp, ": masters[", i, "] has shape ", a.masters[i].sizes(),
                  " but params[", i, "] has shape ", p.sizes());
    }
  }
  check_distinct_steps(a.steps);
  // Each list the step writes (the grads too, divided in place, when grad_scale is given): a parameter listed
  // twice would be stepped by two chunks at once. The state lists are only checked within each tensor (they
  // follow the parameters).
  check_written_list(a.params, kOp, "params");
  if (a.grad_scale.has_value() && a.grad_scale->defined()) check_written_list(a.grads, kOp, "grads");
  for (const auto& [list, name] : {std::pair{a.exp_avgs, "exp_avgs"}, std::pair{a.exp_avg_sqs, "exp_avg_sqs"},
                                   std::pair{a.masters, "masters"}}) {
    for (size_t i = 0; i < list.size(); ++i) check_no_internal_overlap(list[i], kOp, name, i);
  }
  check_optional_scalar(a.lr_tensor, "lr_tensor", device);
  check_optional_scalar(a.grad_scale, "grad_scale", device);
  check_optional_scalar(a.found_inf, "found_inf", device);
  check_optional_scalar(a.clip_coef, "clip_coef", device);
}

namespace {
thread_local PrecheckedLaunches* active_prechecks = nullptr;
}  // namespace

PrecheckedLaunches::PrecheckedLaunches() : previous_(active_prechecks) { active_prechecks = this; }

PrecheckedLaunches::~PrecheckedLaunches() { active_prechecks = previous_; }

void PrecheckedLaunches::add(at::TensorList params, at::TensorList grads) {
  lists_.push_back({params.data(), params.size(), grads.data(), grads.size()});
}

bool launch_prechecked(at::TensorList params, at::TensorList grads) {
  const PrecheckedLaunches* guard = active_prechecks;
  if (guard == nullptr || params.empty()) return false;
  const PrecheckedLaunches::Lists key{params.data(), params.size(), grads.data(), grads.size()};
  return std::find(guard->lists_.begin(), guard->lists_.end(), key) != guard->lists_.end();
}

AdamPlan::AdamPlan(const AdamArgs& a) : args_(a) {
  const size_t n = a.params.size();
  const bool has_master = a.master_mode != MasterMode::None;
  const bool amsgrad = a.max_exp_avg_sqs.has_value();
  const at::TensorList masters_in = has_master ? a.masters : a.params;
  const at::TensorList vmax_in = amsgrad ? *a.max_exp_avg_sqs : a.exp_avg_sqs;
  rng_base.reserve(n);
  uint64_t next = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    bool in_place = p.is_non_overlapping_and_dense();
    for (const at::Tensor* t : {&a.grads[i], &a.exp_avgs[i], &a.exp_avg_sqs[i]}) {
      in_place = in_place && t->is_non_overlapping_and_dense() && t->strides() == p.strides();
    }
    if (has_master) {
      in_place = in_place && a.masters[i].is_non_overlapping_and_dense() && a.masters[i].strides() == p.strides();
    }
    if (amsgrad) in_place = in_place && vmax_in[i].is_non_overlapping_and_dense() && vmax_in[i].strides() == p.strides();
    if (!in_place) copied_.push_back(i);
    rng_base.push_back(next);
    next += (static_cast<uint64_t>(p.numel()) + 7) / 8 * 8;
  }
  const at::TensorList in[6] = {a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, masters_in, vmax_in};
  at::TensorList* out[6] = {&params, &grads, &exp_avgs, &exp_avg_sqs, &masters, &max_exp_avg_sqs};
  if (copied_.empty()) {  // the usual case: the kernels walk the op's own lists
    for (int k = 0; k < 6; ++k) *out[k] = in[k];
    return;
  }
  for (int k = 0; k < 6; ++k) own_[k].assign(in[k].begin(), in[k].end());
  for (size_t i : copied_) {
    for (int k = 0; k < 4; ++k) own_[k][i] = in[k][i].contiguous();
    own_[4][i] = has_master ? in[4][i].contiguous() : own_[0][i];  // without a master, the param's copy
    own_[5][i] = amsgrad ? in[5][i].contiguous() : own_[3][i];
  }
  for (int k = 0; k < 6; ++k) *out[k] = own_[k];
}

void AdamPlan::finish() {
  const bool has_master = args_.master_mode != MasterMode::None;
  const bool writes_grads = args_.grad_scale.has_value() && args_.grad_scale->defined();
  for (size_t i : copied_) {
    // const_cast: the schema marks these lists as mutated.
    const_cast<at::Tensor&>(args_.params[i]).copy_(params[i]);
    const_cast<at::Tensor&>(args_.exp_avgs[i]).copy_(exp_avgs[i]);
    const_cast<at::Tensor&>(args_.exp_avg_sqs[i]).copy_(exp_avg_sqs[i]);
    if (has_master) const_cast<at::Tensor&>(args_.masters[i]).copy_(masters[i]);
    if (writes_grads) const_cast<at::Tensor&>(args_.grads[i]).copy_(grads[i]);
    if (args_.max_exp_avg_sqs.has_value()) const_cast<at::Tensor&>((*args_.max_exp_avg_sqs)[i]).copy_(max_exp_avg_sqs[i]);
  }
}

}  // namespace mixprec::detail
