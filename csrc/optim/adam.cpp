// The Adam core shared by both front doors (mixprec::optim::AdamCore), the C++ front door
// (mixprec::optim::Adam / AdamW) and the Python one's binding (torch.classes.mixprec.AdamCore, driven by
// python/mixprec/optim.py).
#include "mixprec/optim.h"

#include <torch/custom_class.h>
#include <torch/serialize/archive.h>

#include <limits>
#include <typeinfo>
#include <unordered_map>
#include <unordered_set>

#include "mixprec/ops.h"
#include "ops/adam_plan.h"
#include "custom_class_of.h"
#include "ops/prefetch.h"
#include "optim/adam_core_class.h"

namespace mixprec::optim {

namespace {

bool is_low_precision(c10::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// torch.optim steps a complex parameter as two independent real ones (view_as_real of the parameter, its
// gradient and its moments), and keeps its state complex; so does the core, and the kernels see only reals.
// A conjugate-view parameter or moment is refused, as by torch (a resolved copy would drop the update). A
// conjugate-view gradient, which autograd makes (the gradient of p.conj()) and torch's step refuses, is read
// through a resolved copy (as_real_grad); with grad_scale, its unscaled values stay in that copy.
torch::Tensor as_real(const torch::Tensor& t) { return t.is_complex() ? torch::view_as_real(t) : t; }
torch::Tensor as_real_grad(const torch::Tensor& g) { return g.is_complex() ? as_real(g.resolve_conj()) : g; }

// `master` (fp32) where `param` (16-bit) is the rounding of it the step writes, the param's value elsewhere: a
// master that no longer refines its param is replaced by it, element by element. With stochastic rounding
// both neighbours count (a write-back may have taken either); with nearest rounding only the nearest, so a
// write that lands one ulp away on the master's side is seen too. NaNs never match, so a NaN in either takes
// the param's value.
torch::Tensor consistent_master_of(const torch::Tensor& param, const torch::Tensor& master, bool stochastic) {
  const torch::Tensor p = param.detach();
  const torch::Tensor nearest = master.to(p.scalar_type());
  if (!stochastic) return at::where(p == nearest, master, p.to(at::kFloat));
  const torch::Tensor back = nearest.to(at::kFloat);
  const double inf = std::numeric_limits<double>::infinity();
  const torch::Tensor up = at::nextafter(nearest, at::full({}, inf, nearest.options()));
  const torch::Tensor down = at::nextafter(nearest, at::full({}, -inf, nearest.options()));
  const torch::Tensor other = at::where(master > back, up, at::where(master < back, down, nearest));
  const torch::Tensor kept = at::logical_or(p == nearest, p == other);
  return at::where(kept, master, p.to(at::kFloat));
}

// `remainder` where it and the bf16 `param` form a pair split_bf16_remainder can give (a pair read from a
// checkpoint), 0 elsewhere: the merge of a changed param with an old remainder can leave the param's
// neighbourhood (±0 with a negative remainder merges to a NaN).
torch::Tensor consistent_remainder_of(const torch::Tensor& param, const torch::Tensor& remainder) {
  const torch::Tensor p = param.detach();
  auto [hi, lo] = ops::split_bf16_remainder(ops::merge_bf16_remainder(p, remainder));
  const torch::Tensor same = at::logical_and(hi.view(at::kShort) == p.view(at::kShort), lo == remainder);
  return at::where(same, remainder, at::zeros({}, remainder.options()));
}

// consistent_master_of written into `master`; a contiguous pair in slices of 2^24 elements, so that the
// temporaries (about 20 bytes per element) stay small even for a 1B-element embedding on a resume.
template <typename Consistent>
void make_consistent(const torch::Tensor& param, const torch::Tensor& master, const Consistent& consistent) {
  constexpr int64_t kSlice = int64_t{1} << 24;
  const int64_t n = master.numel();
  if (n <= kSlice || !param.is_contiguous() || !master.is_contiguous()) {
    master.copy_(consistent(param, master));
    return;
  }
  const torch::Tensor p = param.detach().view(-1), m = master.view(-1);
  for (int64_t start = 0; start < n; start += kSlice) {
    const int64_t len = std::min(kSlice, n - start);
    const torch::Tensor ms = m.narrow(0, start, len);
    ms.copy_(consistent(p.narrow(0, start, len), ms));
  }
}

void make_master_consistent(const torch::Tensor& param, const torch::Tensor& master, bool stochastic) {
  make_consistent(param, master, [stochastic](const torch::Tensor& p, const torch::Tensor& m) {
    return consistent_master_of(p, m, stochastic);
  });
}

torch::Tensor consistent_master(const torch::Tensor& param, const torch::Tensor& master, bool stochastic) {
  torch::Tensor out = master.clone();
  make_master_consistent(param, out, stochastic);
  return out;
}

}  // namespace

// ---- the core: rules ----------------------------------------------------------------------------------------

void AdamCore::check_options(const AdamOptions& o) {
  TORCH_CHECK_VALUE(o.lr() >= 0, "Invalid learning rate: ", o.lr(), " (lr must be >= 0)");
  TORCH_CHECK_VALUE(o.eps() >= 0, "Invalid epsilon value: ", o.eps(), " (eps must be >= 0)");
  const auto [b1, b2] = o.betas();
  TORCH_CHECK_VALUE(b1 >= 0 && b1 < 1, "Invalid beta parameter at index 0: ", b1, " (must be in [0, 1))");
  TORCH_CHECK_VALUE(b2 >= 0 && b2 < 1, "Invalid beta parameter at index 1: ", b2, " (must be in [0, 1))");
  TORCH_CHECK_VALUE(o.weight_decay() >= 0, "Invalid weight_decay value: ", o.weight_decay(), " (must be >= 0)");
  check_step_options(o);
}

void AdamCore::check_step_options(const AdamOptions& o) {
  TORCH_CHECK_VALUE(std::get<0>(o.betas()) != 1.0, "betas[0] must not be 1 (the step divides by 1 - betas[0]^step)");
  const std::string& mw = o.master_weights();
  TORCH_CHECK_VALUE(mw == "auto" || mw == "fp32" || mw == "remainder" || mw == "none",
                    "master_weights must be one of ('auto', 'fp32', 'remainder', 'none'), got '", mw, "'");
  TORCH_CHECK_VALUE(o.moment_dtype() == at::kFloat || o.moment_dtype() == at::kBFloat16,
                    "moment_dtype must be torch.float32 or torch.bfloat16, got ", o.moment_dtype());
  TORCH_CHECK_VALUE(o.rounding() == "nearest" || o.rounding() == "stochastic",
                    "rounding must be one of ('nearest', 'stochastic'), got '", o.rounding(), "'");
  TORCH_CHECK_VALUE(o.seed() >= -1, "seed must be a non-negative integer (or -1: none), got ", o.seed());
  TORCH_CHECK_VALUE(o.rng_calls() >= 0, "rng_calls must be a non-negative integer, got ", o.rng_calls());
}

std::string AdamCore::master_mode(const torch::Tensor& p, const std::string& choice) {
  // A float64 parameter is its own master whatever the choice: torch's float64 arithmetic, moments and all.
  if (p.scalar_type() == at::kDouble && choice != "remainder") return "float64";
  if (choice == "auto") return is_low_precision(p.scalar_type()) ? "fp32" : "none";
  TORCH_CHECK_VALUE(choice != "remainder" || p.scalar_type() == at::kBFloat16,
                    "master_weights='remainder' needs bfloat16 parameters, got ", p.scalar_type());
  if (choice == "fp32" && p.scalar_type() == at::kFloat) return "none";  // an fp32 param is its own master
  return choice;
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
}  // namespace

int64_t AdamCore::step_seed(int64_t seed, int64_t rng_calls) {
  // splitmix64: well-mixed, distinct Philox keys for consecutive steps of one seed.
  return static_cast<int64_t>(splitmix64((static_cast<uint64_t>(seed) << 20) ^ static_cast<uint64_t>(rng_calls)));
}

int64_t AdamCore::stream_seed(int64_t step_seed, int64_t group, int64_t launch, int64_t shard) {
  if (group == 0 && launch == 0 && shard == 0) return step_seed;  // a one-group, one-dtype step keeps its key
  const uint64_t stream = splitmix64((static_cast<uint64_t>(group) << 40) ^ (static_cast<uint64_t>(launch) << 32) ^
                                     static_cast<uint64_t>(shard));
  return static_cast<int64_t>(splitmix64(static_cast<uint64_t>(step_seed) ^ stream));
}

bool AdamCore::prepare_state(const torch::Tensor& param, AdamParamState& st, const std::string& mode,
                             c10::ScalarType moment_dtype, bool amsgrad, bool stochastic) {
  bool replaced = false;
  const auto like = [&](c10::ScalarType dtype) {
    return torch::zeros_like(param, param.options().dtype(dtype), at::MemoryFormat::Preserve);
  };
  if (!st.step().defined()) {
    st.step(torch::zeros({}, param.options().dtype(at::kFloat)));
    replaced = true;
  } else if (st.step().device() != param.device() || st.step().scalar_type() != at::kFloat) {
    st.step(st.step().to(param.device(), at::kFloat));  // e.g. torch's CPU step counts
    replaced = true;
  }
  std::vector<torch::Tensor*> moments = {&st.exp_avg(), &st.exp_avg_sq()};  // TORCH_ARG's mutable getters
  if (amsgrad) moments.push_back(&st.max_exp_avg_sq());  // kept, unread, when AMSGrad is off (as torch keeps it)
  for (torch::Tensor* t : moments) {
    if (!t->defined()) {
      *t = like(moment_dtype);
      replaced = true;
    } else if (t->scalar_type() != moment_dtype || t->device() != param.device()) {
      *t = t->to(param.device(), moment_dtype);
      replaced = true;
    }
  }
  if (mode == "fp32" && !st.master().defined() && st.remainder().defined() &&
      st.remainder().scalar_type() == at::kShort && param.scalar_type() == at::kBFloat16 &&
      st.remainder().sizes() == param.sizes()) {
    // Switching from remainders keeps the exact value they held with the param.
    const torch::Tensor rem = st.remainder().to(param.device());
    st.master(ops::merge_bf16_remainder(param.detach(), consistent_remainder_of(param, rem))
                  .clone(at::MemoryFormat::Preserve));
    replaced = true;
  } else if (mode == "fp32" && !st.master().defined()) {
    // One copy (to() alone would return a 16-bit param converted, then clone() copied it again).
    st.master(param.detach().to(param.options().dtype(at::kFloat), /*non_blocking=*/false, /*copy=*/true,
                                at::MemoryFormat::Preserve));
    replaced = true;
  } else if (mode == "fp32" && (st.master().scalar_type() != at::kFloat || st.master().device() != param.device())) {
    // e.g. a state dict that went through torch's loader, which casts state to the param's dtype: its values
    // are checked against the param before the step (sync_masters).
    st.master(st.master().to(param.options().dtype(at::kFloat), /*non_blocking=*/false, /*copy=*/true,
                             at::MemoryFormat::Preserve));
    replaced = true;
  }
  if (mode == "remainder" && st.remainder().defined()) {
    if (st.remainder().scalar_type() != at::kShort) {
      // The low half of a value cannot survive a cast to bf16 (torch's loader): the param alone is exact.
      st.remainder(torch::Tensor());
    } else if (st.remainder().device() != param.device()) {
      st.remainder(st.remainder().to(param.device()));
      replaced = true;
    }
  }
  if (mode == "remainder" && !st.remainder().defined()) {
    if (st.master().defined()) {
      // Switching from fp32 masters keeps the exact value: the param takes its bf16 half, the state the rest.
      auto [bf16, remainder] =
          ops::split_bf16_remainder(
              consistent_master(param, st.master().to(param.device(), at::kFloat), stochastic));
      param.detach().copy_(bf16);
      st.remainder(remainder);
      st.master(torch::Tensor());
    } else {  // the bf16 value is exact: its remainder is zero
      st.remainder(like(at::kShort));
    }
    replaced = true;
  }
  // A kind of master this row no longer steps with is stale from now on (the param moves without it): kept,
  // it would be taken up again, out of date, if the row went back to that kind (bf16 -> fp32 -> bf16).
  if (mode != "fp32" && st.master().defined()) {
    st.master(torch::Tensor());
    replaced = true;
  }
  if (mode != "remainder" && st.remainder().defined()) {
    st.remainder(torch::Tensor());
    replaced = true;
  }
  return replaced;
}

AdamOptions::AdamOptions(double lr) : lr_(lr) {}

AdamOptions::AdamOptions(const torch::optim::AdamOptions& o)
    : lr_(o.lr()), betas_(o.betas()), eps_(o.eps()), weight_decay_(o.weight_decay()), amsgrad_(o.amsgrad()) {}

AdamOptions::AdamOptions(const torch::optim::AdamWOptions& o)
    : lr_(o.lr()), betas_(o.betas()), eps_(o.eps()), weight_decay_(o.weight_decay()), amsgrad_(o.amsgrad()) {}

void AdamOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master_weights);
  archive.write("moment_dtype", c10::IValue(static_cast<int64_t>(moment_dtype())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rng_calls);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(fused);
}

void AdamOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  c10::IValue amsgrad_value;
  if (archive.try_read("amsgrad", amsgrad_value)) amsgrad(amsgrad_value.toBool());  // absent in older checkpoints
  // mixprec's own options are absent from torch::optim::Adam(W) checkpoints: Adam::load keeps the group's.
  c10::IValue v;
  has_mixprec_fields_ = archive.try_read("master_weights", v);
  if (has_mixprec_fields_) master_weights(v.toStringRef());
  if (archive.try_read("maximize", v)) maximize(v.toBool());
  if (archive.try_read("moment_dtype", v)) moment_dtype(static_cast<c10::ScalarType>(v.toInt()));
  if (archive.try_read("rounding", v)) rounding(v.toStringRef());
  if (archive.try_read("seed", v)) seed(v.toInt());
  if (archive.try_read("rng_calls", v)) rng_calls(v.toInt());
  if (archive.try_read("fused", v)) fused(v.toBool());
}

void AdamParamState::serialize(torch::serialize::OutputArchive& archive) const {
  // The step count goes out as torch::optim::Adam(W)'s int64, so that their load reads a mixprec checkpoint
  // (the float32 count is an exact integer; one host read per parameter, when saving only).
  if (step().defined()) archive.write("step", c10::IValue(static_cast<int64_t>(step().item<double>())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(remainder);
}

void AdamParamState::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue saved_step;
  if (archive.try_read("step", saved_step)) {
    // torch::optim::Adam(W) counts steps in an int64; mixprec in a float32 tensor (as torch.optim in Python).
    step(saved_step.isInt() ? torch::tensor(static_cast<float>(saved_step.toInt())) : saved_step.toTensor());
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, max_exp_avg_sq);  // absent in older checkpoints: stays undefined
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, master);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, remainder);
}

Adam::Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults)
    : Adam(param_groups, std::move(defaults), /*decoupled=*/false) {}

namespace {

// A copy of `options` of its own type (AdamWOptions stay AdamWOptions).
std::unique_ptr<AdamOptions> copy_options(const AdamOptions& options) {
  const torch::optim::OptimizerOptions& base = options;  // clone() is public there
  return std::unique_ptr<AdamOptions>(static_cast<AdamOptions*>(base.clone().release()));
}

// AdamW's options are AdamWOptions, Adam's AdamOptions, as torch's optimizers keep theirs.
std::unique_ptr<AdamOptions> options_for(const AdamOptions& options, bool decoupled) {
  return decoupled ? std::make_unique<AdamWOptions>(options) : std::make_unique<AdamOptions>(options);
}

}  // namespace

Adam::Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults, bool decoupled)
    : torch::optim::Optimizer(param_groups, options_for(defaults, decoupled)), decoupled_(decoupled) {
  AdamCore::check_options(defaults);
  // torch's constructor gave every group a copy of the defaults (it merges only its own optimizers' options):
  // put each group's own options back.
  TORCH_INTERNAL_ASSERT(param_groups_.size() == param_groups.size());
  for (size_t i = 0; i < param_groups.size(); ++i) {
    auto options = group_options(param_groups[i]);
    AdamCore::check_step_options(*options);  // torch checks the defaults' ranges only
    param_groups_[i].set_options(std::move(options));
  }
}

void Adam::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  auto options = group_options(param_group);  // checked before anything is added (as a step would, not the
  AdamCore::check_step_options(*options);      // constructor's ranges: torch's add_param_group takes any)
  torch::optim::Optimizer::add_param_group(param_group);
  param_groups_.back().set_options(std::move(options));
}

std::unique_ptr<AdamOptions> Adam::group_options(const torch::optim::OptimizerParamGroup& param_group) const {
  const auto& defaults = static_cast<const AdamOptions&>(*defaults_);
  if (!param_group.has_options()) return copy_options(defaults);
  const torch::optim::OptimizerOptions& given = param_group.options();
  // The group's options, and what its type's constructor gives (a field equal to that was not set).
  AdamOptions user, fresh;
  if (const auto* ours = dynamic_cast<const AdamOptions*>(&given)) {
    user = *ours;
    // What the constructor of the type the user wrote gives (AdamWOptions: weight_decay 1e-2).
    fresh = dynamic_cast<const AdamWOptions*>(ours) != nullptr ? AdamOptions(AdamWOptions()) : AdamOptions();
  } else if (const auto* adam = dynamic_cast<const torch::optim::AdamOptions*>(&given)) {
    user = AdamOptions(*adam);
    fresh = AdamOptions(torch::optim::AdamOptions());
  } else if (const auto* adamw = dynamic_cast<const torch::optim::AdamWOptions*>(&given)) {
    user = AdamOptions(*adamw);
    fresh = AdamOptions(torch::optim::AdamWOptions());
  } else {
    TORCH_CHECK_VALUE(false, "mixprec::optim::Adam: a param group has options of another optimizer; give it "
                      "mixprec::optim::AdamOptions or torch::optim::AdamOptions / AdamWOptions");
  }
  auto out = copy_options(defaults);
  // torch::optim::Optimizer's merge rule for its own optimizers (torch 2.14; torch 2.11 keeps a group's options
  // as given), field by field, on every torch version.
  const auto merge = [&](auto get, auto set) {
    if (get(user) != get(fresh)) set(*out, get(user));
  };
#define MIXPREC_MERGE(field) \
  merge([](const AdamOptions& o) { return o.field(); }, [](AdamOptions& o, const auto& v) { o.field(v); })
  MIXPREC_MERGE(lr);
  MIXPREC_MERGE(betas);
  MIXPREC_MERGE(eps);
  MIXPREC_MERGE(weight_decay);
  MIXPREC_MERGE(amsgrad);
  MIXPREC_MERGE(maximize);
  MIXPREC_MERGE(master_weights);
  MIXPREC_MERGE(moment_dtype);
  MIXPREC_MERGE(rounding);
  MIXPREC_MERGE(seed);
  MIXPREC_MERGE(rng_calls);
  MIXPREC_MERGE(fused);
#undef MIXPREC_MERGE
  return out;
}

torch::Tensor Adam::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  step_scaled(std::nullopt, std::nullopt);
  return loss;
}

// ---- the core: cached lists and the launch ------------------------------------------------------------------

namespace {

// The tensor a bucket's kernel takes as the master: the fp32 master or the int16 remainder.
const torch::Tensor& master_of(const AdamParamState& st, const std::string& mode) {
  static const torch::Tensor none;
  if (mode == "fp32") return st.master();
  if (mode == "remainder") return st.remainder();
  return none;
}

const torch::Tensor& grad_of(at::TensorList params, const AdamCore::StepInputs& in, size_t i) {
  static const torch::Tensor none;
  if (in.grads.has_value()) {
    const auto& g = (*in.grads)[i];
    return g.has_value() ? *g : none;
  }
  return params[i].grad();
}

void check_float64_grads(const std::vector<torch::Tensor>& p, at::TensorList grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].scalar_type() == at::kDouble, "mixprec's Adam: the gradient of a float64 parameter ",
                      "must be float64, got ", grads[i].scalar_type());
    TORCH_CHECK_VALUE(grads[i].sizes() == p[i].sizes() && grads[i].device() == p[i].device(),
                      "mixprec's Adam: a float64 parameter's gradient must match its shape and device, got ",
                      grads[i].sizes(), " on ", grads[i].device(), " for ", p[i].sizes(), " on ", p[i].device());
  }
}

void step_float64(const std::vector<torch::Tensor>& p, const std::vector<torch::Tensor>& m,
                  const std::vector<torch::Tensor>& v, const std::vector<torch::Tensor>& vmax,  // empty without AMSGrad
                 
                  const std::vector<torch::Tensor>& s, at::TensorList grads, const AdamOptions& options, bool decoupled,
                  const ops::AdamStepExtras& extras) {
  // mixprec's kernels compute in fp32, which float64 users do not want: these rows take torch's own fused
  // float64 step, driven as torch.optim drives it (count the step first, take a skipped one back after).
  // The gradients were checked (check_float64_grads) before any bucket stepped.
  at::_foreach_add_(s, 1);
  // torch's fused kernels walk each tensor as numel() elements of memory (torch.optim hands them only dense
  // parameters whose gradients share their layout). Other rows (a strided view as the parameter, a
  // transposed or expanded gradient) step on contiguous copies, written back afterwards.
  std::vector<torch::Tensor> P(p), G(grads.begin(), grads.end()), M(m), V(v), X(vmax);
  std::vector<size_t> copied;
  for (size_t i = 0; i < p.size(); ++i) {
    const auto strides = p[i].strides();
    const bool same = p[i].is_non_overlapping_and_dense() && G[i].strides() == strides &&
                      m[i].strides() == strides && v[i].strides() == strides &&
                      (vmax.empty() || vmax[i].strides() == strides);
    if (same) continue;
    copied.push_back(i);
    P[i] = p[i].contiguous();
    G[i] = G[i].contiguous();
    M[i] = m[i].contiguous();
    V[i] = v[i].contiguous();
    if (!vmax.empty()) X[i] = vmax[i].contiguous();
  }
  const auto [beta1, beta2] = options.betas();
  // The overloads differ in lr (a number, or a tensor read on the device).
  const auto run = [&](const auto& lr) {
    const auto call = [&](const auto& op) {
      op(P, G, M, V, X, s, lr, beta1, beta2, options.weight_decay(), options.eps(),
         options.amsgrad(), options.maximize(), extras.grad_scale, extras.found_inf);
    };
    if (decoupled) {
      call([](auto&&... a) { at::_fused_adamw_(std::forward<decltype(a)>(a)...); });
    } else {
      call([](auto&&... a) { at::_fused_adam_(std::forward<decltype(a)>(a)...); });
    }
  };
  if (extras.lr_tensor.has_value()) {
    run(extras.lr_tensor->reshape({}));
  } else {
    run(options.lr());
  }
  for (const size_t i : copied) {
    const auto back = [](const torch::Tensor& dst, const torch::Tensor& src) {
      if (!dst.is_same(src)) dst.copy_(src);
    };
    back(p[i], P[i]);
    back(m[i], M[i]);
    back(v[i], V[i]);
    if (!vmax.empty()) back(vmax[i], X[i]);
  }
  if (extras.found_inf.has_value()) {
    at::_foreach_sub_(s, std::vector<torch::Tensor>(s.size(), extras.found_inf->reshape({})));
  }
}

}  // namespace

void AdamCore::sync_masters(Plan& plan, bool stochastic) {
  for (Row& row : plan.rows) {
    // Inference tensors have no version counter; nothing can write them from outside inference mode either.
    if (!row.has_grad || !row.target.defined() || row.target.is_inference()) continue;
    if (row.version == static_cast<int64_t>(row.target._version()) && row.data == row.target.const_data_ptr() &&
        row.storage == row.target.storage().unsafeGetStorageImpl()) {
      continue;
    }
    if (plan.buckets[row.bucket].mode == "fp32") {
      // A master read from a checkpoint may come from a run with either rounding: both neighbours count.
      make_master_consistent(row.target, row.master, stochastic || row.version < 0);
    } else {
      // A remainder has no redundancy to tell a changed element from a kept one (any bf16 value pairs with
      // any remainder): a write that puts the optimizer's bits back (SAM's perturbation undone, an EMA swap)
      // keeps them exact, and a changed element continues within half a bf16 ulp of what was written. Only
      // pairs no split gives drop their remainder: ±0 with a negative one merged to a NaN.
      make_consistent(row.target, row.master, consistent_remainder_of);
    }
  }
}

bool AdamCore::plan_holds(const Plan& plan, at::TensorList params, const AdamOptions& options,
                          const StateLookup& state_of, std::vector<std::vector<torch::Tensor>>& grads) const {
  if (!plan.valid || plan.rows.size() != params.size() || plan.master_weights != options.master_weights() ||
      plan.moment_dtype != options.moment_dtype() || plan.amsgrad != options.amsgrad()) {
    return false;
  }
  detail::prefetch_params_and_grads(params);
  for (size_t i = 0; i < params.size(); ++i) {
    const Row& row = plan.rows[i];
    const torch::Tensor& p = params[i];
    if (p.unsafeGetTensorImpl() != row.param.unsafeGetTensorImpl() || p.scalar_type() != row.dtype ||
        p.device() != row.device) {
      return false;
    }
    const torch::Tensor& g = p.grad();
    if (g.defined() != row.has_grad) return false;
    if (!row.has_grad) continue;
    TORCH_CHECK(!g.is_sparse(), "mixprec's Adam does not support sparse gradients");
    const AdamParamState& st = state_of(p);
    // The plan holds these tensors, so equal pointers mean the very same tensors.
    if (st.step().unsafeGetTensorImpl() != row.step.unsafeGetTensorImpl() ||
        st.exp_avg().unsafeGetTensorImpl() != row.exp_avg.unsafeGetTensorImpl() ||
        st.exp_avg_sq().unsafeGetTensorImpl() != row.exp_avg_sq.unsafeGetTensorImpl() ||
        master_of(st, plan.buckets[row.bucket].mode).unsafeGetTensorImpl() != row.master.unsafeGetTensorImpl() ||
        (plan.amsgrad && st.max_exp_avg_sq().unsafeGetTensorImpl() != row.max_exp_avg_sq.unsafeGetTensorImpl())) {
      return false;
    }
    grads[row.bucket].push_back(as_real_grad(g));
  }
  return true;
}

std::vector<int64_t> AdamCore::build_plan(Plan& plan, at::TensorList params, const AdamOptions& options,
                                          const StateLookup& state_of, const StepInputs& in,
                                          std::vector<std::vector<torch::Tensor>>& grads) const {
  // What the previous plan knew of its masters survives a rebuild (a DTensor group rebuilds every step):
  // a row keeps its version where it has the same param and the very same master.
  const std::vector<Row> old_rows = std::move(plan.rows);
  plan = Plan{};
  plan.master_weights = options.master_weights();
  plan.moment_dtype = options.moment_dtype();
  plan.amsgrad = options.amsgrad();
  plan.rows.reserve(params.size());
  grads.clear();
  std::vector<int64_t> changed;
  // Checked before any state is created, so a refused group leaves none behind. Only parameters with a
  // gradient count, as in torch's step (a frozen int8 weight in the group is fine).
  std::unordered_set<const c10::TensorImpl*> seen;
  seen.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (!grad_of(params, in, i).defined()) continue;
    // torch only warns about a group that lists a parameter twice (and updates it twice); one fused pass cannot
    // update a tensor twice, so say which entry repeats instead of failing inside the kernel's checks.
    TORCH_CHECK_VALUE(seen.insert(params[i].unsafeGetTensorImpl()).second, "mixprec's Adam: parameter ", i,
                      " of the param group appears in it more than once; list each parameter once");
    const c10::ScalarType dtype = params[i].scalar_type();
    const bool complex = dtype == at::kComplexFloat || dtype == at::kComplexDouble;
    TORCH_CHECK_VALUE(params[i].is_floating_point() || complex, "mixprec's Adam: parameter ", i, " is ", dtype,
                      "; params must be float32, float16, bfloat16, float64, complex64 or complex128");
    // A complex parameter's state is complex (as torch's): no bf16 moments and no bf16 remainder exist for it.
    TORCH_CHECK_VALUE(!complex || options.master_weights() != "remainder", "mixprec's Adam: parameter ", i, " is ",
                      dtype, "; master_weights='remainder' needs bfloat16 parameters");
    TORCH_CHECK_VALUE(dtype != at::kComplexFloat || options.moment_dtype() == at::kFloat, "mixprec's Adam: parameter ",
                      i, " is ComplexFloat, whose moments are complex64; moment_dtype=", options.moment_dtype(),
                      " cannot hold them (use torch.float32, or a separate param group for complex parameters)");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& p = params[i];
    Row row;
    row.param = p;
    row.dtype = p.scalar_type();
    row.device = p.device();
    const torch::Tensor& g = grad_of(params, in, i);
    row.has_grad = g.defined();
    if (row.has_grad) {
      TORCH_CHECK(!g.is_sparse(), "mixprec's Adam does not support sparse gradients");
      const torch::Tensor& local = in.locals.has_value() ? (*in.locals)[i] : p;
      TORCH_CHECK(in.locals.has_value() || !p.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python),
                  "mixprec's Adam: parameter ", i, " is a tensor subclass (e.g. a DTensor); pass its local shard");
      const std::string mode = master_mode(as_real(local), options.master_weights());
      AdamParamState& st = state_of(p);
      const bool had_master = mode == "remainder" ? st.remainder().defined() : st.master().defined();
      // float64 params keep float64 moments, as torch's: fp32 moments would throw their precision away.
      c10::ScalarType moments = mode == "float64" ? at::kDouble : options.moment_dtype();
      if (local.is_complex()) moments = c10::toComplexType(moments);
      if (prepare_state(local, st, mode, moments, options.amsgrad(), options.rounding() != "nearest")) {
        changed.push_back(static_cast<int64_t>(i));
      }
      size_t b = 0;
      while (b < plan.buckets.size() && !(plan.buckets[b].device == local.device() && plan.buckets[b].mode == mode)) {
        ++b;
      }
      if (b == plan.buckets.size()) {
        plan.buckets.push_back(Bucket{local.device(), mode, {}, {}, {}, {}, {}, {}});
        grads.emplace_back();
      }
      Bucket& bucket = plan.buckets[b];
      row.bucket = b;
      row.step = st.step();
      row.exp_avg = st.exp_avg();
      row.exp_avg_sq = st.exp_avg_sq();
      row.master = master_of(st, mode);
      if (mode == "fp32" || mode == "remainder") {
        row.target = local;
        const Row* before = i < old_rows.size() ? &old_rows[i] : nullptr;
        if (before != nullptr && before->param.unsafeGetTensorImpl() == p.unsafeGetTensorImpl() &&
            before->master.unsafeGetTensorImpl() == row.master.unsafeGetTensorImpl()) {
          row.version = before->version;
          row.data = before->data;
          row.storage = before->storage;
        } else if (!had_master && !local.is_inference()) {
          row.version = static_cast<int64_t>(local._version());  // just taken from the param
          row.data = local.const_data_ptr();
          row.storage = local.storage().unsafeGetStorageImpl();
        }
      }
      bucket.p.push_back(as_real(local));
      bucket.m.push_back(as_real(row.exp_avg));
      bucket.v.push_back(as_real(row.exp_avg_sq));
      bucket.s.push_back(row.step);
      if (row.master.defined()) bucket.w.push_back(row.master);
      if (plan.amsgrad) {
        row.max_exp_avg_sq = st.max_exp_avg_sq();
        bucket.vmax.push_back(as_real(row.max_exp_avg_sq));
      }
      grads[b].push_back(as_real_grad(g));
    }
    plan.rows.push_back(std::move(row));
  }
  // Shards handed in per call are new tensors every step: nothing to reuse.
  plan.valid = !in.locals.has_value() && !in.grads.has_value();
  return changed;
}

std::vector<int64_t> AdamCore::step_group(size_t group, at::TensorList params, AdamOptions& options, bool decoupled,
                                          const StateLookup& state_of, const StepInputs& in) {
  check_step_options(options);
  TORCH_CHECK_VALUE(!in.locals.has_value() || in.locals->size() == params.size(),
                    "mixprec's Adam: locals must have one tensor per parameter");
  TORCH_CHECK_VALUE(!in.grads.has_value() || in.grads->size() == params.size(),
                    "mixprec's Adam: grads must have one entry per parameter");
  if (plans_.size() <= group) plans_.resize(group + 1);
  Plan& plan = plans_[group];
  std::vector<std::vector<torch::Tensor>> grads(plan.buckets.size());
  std::vector<int64_t> changed;
  if (in.locals.has_value() || in.grads.has_value() || !plan_holds(plan, params, options, state_of, grads)) {
    plan.valid = false;  // a check above may throw half way: never reuse a plan that was not rebuilt
    changed = build_plan(plan, params, options, state_of, in, grads);
  }
  bool any = false;
  for (const auto& g : grads) any = any || !g.empty();
  if (!any) return changed;
  for (const Bucket& bucket : plan.buckets) {  // the state's metadata, which the launches' checks read
    for (const auto* list : {&bucket.m, &bucket.v, &bucket.w, &bucket.s, &bucket.vmax}) {
      detail::prefetch_tensors(*list);
    }
  }
  for (size_t b = 0; b < plan.buckets.size(); ++b) {  // before anything is written or drawn
    if (plan.buckets[b].mode == "float64") check_float64_grads(plan.buckets[b].p, grads[b]);
  }

  std::optional<int64_t> seed;
  if (options.seed() >= 0) seed = step_seed(options.seed(), options.rng_calls());  // counted once launched
  const auto on = [](const std::optional<torch::Tensor>& t, c10::Device device) -> std::optional<torch::Tensor> {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    torch::Tensor r = t->device() == device ? *t : t->to(device, /*non_blocking=*/true);
    return r.dim() == 1 ? r : r.reshape({1});
  };
  const auto [beta1, beta2] = options.betas();
  std::vector<ops::AdamStepExtras> extras(plan.buckets.size());
  std::vector<std::optional<int64_t>> launch_seeds(plan.buckets.size());
  size_t launches = 0;
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    if (grads[b].empty()) continue;
    ++launches;
    const Bucket& bucket = plan.buckets[b];
    ops::AdamStepExtras& e = extras[b];
    e.lr_tensor = on(in.lr_tensor, bucket.device);
    if (e.lr_tensor.has_value() && e.lr_tensor->scalar_type() != at::kFloat) e.lr_tensor = e.lr_tensor->to(at::kFloat);
    e.grad_scale = on(in.grad_scale, bucket.device);
    e.found_inf = on(in.found_inf, bucket.device);
    if (plan.amsgrad && bucket.mode != "float64") e.max_exp_avg_sqs = bucket.vmax;
    if (seed.has_value()) {
      launch_seeds[b] = stream_seed(*seed, static_cast<int64_t>(group), static_cast<int64_t>(b), in.shard);
    }
  }
  // A group of several dtypes or master modes (Policy.apply's fp32 norms beside bf16 weights) takes one launch
  // per bucket, each checking its own arguments: a launch refused after another had stepped its rows would
  // leave the group half-stepped (and, under a scaler, those rows' gradients unscaled). So with more than one
  // launch, every launch's arguments are checked first, and the launches then skip their own checks.
  detail::PrecheckedLaunches prechecked;
  if (launches > 1) {
    for (size_t b = 0; b < plan.buckets.size(); ++b) {
      const Bucket& bucket = plan.buckets[b];
      if (grads[b].empty() || bucket.mode == "float64") continue;
      const ops::AdamStepExtras& e = extras[b];
      detail::check_adam_args(detail::make_adam_args(
          bucket.p, grads[b], bucket.m, bucket.v, bucket.w, bucket.s, options.lr(), beta1, beta2, options.eps(),
          options.weight_decay(), decoupled, options.maximize(), bucket.mode, options.rounding(), launch_seeds[b],
          e.lr_tensor, e.grad_scale, e.found_inf, e.clip_coef,
          e.max_exp_avg_sqs.has_value() ? std::optional<at::TensorList>(*e.max_exp_avg_sqs) : std::nullopt));
      prechecked.add(bucket.p, grads[b]);
    }
  }
  sync_masters(plan, options.rounding() != "nearest");
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    if (grads[b].empty()) continue;
    const Bucket& bucket = plan.buckets[b];
    if (bucket.mode == "float64") {
      step_float64(bucket.p, bucket.m, bucket.v, bucket.vmax, bucket.s, grads[b], options, decoupled, extras[b]);
      continue;
    }
    ops::adam_step_(bucket.p, grads[b], bucket.m, bucket.v, bucket.w, bucket.s, options.lr(), beta1, beta2,
                    options.eps(), options.weight_decay(), decoupled, options.maximize(), bucket.mode,
                    options.rounding(), launch_seeds[b], extras[b]);
  }
  if (seed.has_value()) options.rng_calls(options.rng_calls() + 1);  // a refused step drew nothing
  for (Row& row : plan.rows) {  // what the params hold now is the masters' rounding
    if (row.has_grad && row.target.defined() && !row.target.is_inference()) {
      row.version = static_cast<int64_t>(row.target._version());
      row.data = row.target.const_data_ptr();
      row.storage = row.target.storage().unsafeGetStorageImpl();
    }
  }
  return changed;
}

// ---- the C++ front door -------------------------------------------------------------------------------------

void Adam::step_scaled(const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf) {
  torch::NoGradGuard no_grad;
  const AdamCore::StateLookup state_of = [this](const torch::Tensor& p) -> AdamParamState& {
    auto& slot = state_[p.unsafeGetTensorImpl()];
    if (!slot) slot = std::make_unique<AdamParamState>();
    return static_cast<AdamParamState&>(*slot);
  };
  AdamCore::StepInputs inputs;
  inputs.grad_scale = grad_scale;
  inputs.found_inf = found_inf;
  // Every group's options before any group steps: a refused step writes nothing.
  for (size_t i = 0; i < param_groups_.size(); ++i) AdamCore::check_step_options(options_of(i));
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    core_.step_group(i, param_groups_[i].params(), options_of(i), decoupled_, state_of, inputs);
  }
}

AdamOptions& Adam::options_of(size_t group) {
  // torch's add_param_group, called through a base-class reference, would have given a group the defaults'
  // type; anything else means a group was edited by hand.
  auto* options = dynamic_cast<AdamOptions*>(&param_groups_[group].options());
  TORCH_CHECK_VALUE(options != nullptr, "mixprec::optim::Adam: param group ", group,
                    " has options of another optimizer; give it mixprec::optim::AdamOptions");
  return *options;
}

void Adam::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, AdamOptions>(archive, *this);
}

void Adam::load(torch::serialize::InputArchive& archive) {
  // torch's reader replaces each group's options and state as it goes and may refuse half way (a group of
  // another size), and the options checks below come after it: a refused load puts everything back, as the
  // Python optimizer's does. Options go back in place (code may hold a reference to a group's options).
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options_before;
  options_before.reserve(param_groups_.size());
  for (const auto& group : param_groups_) options_before.push_back(group.options().clone());
  decltype(state_) state_before;
  for (const auto& [key, st] : state_) state_before.emplace(key, st->clone());
  try {
    load_unchecked(archive);
  } catch (...) {
    for (size_t i = 0; i < param_groups_.size() && i < options_before.size(); ++i) {
      auto* now = dynamic_cast<AdamOptions*>(&param_groups_[i].options());
      const auto* before = dynamic_cast<const AdamOptions*>(options_before[i].get());
      if (now != nullptr && before != nullptr && typeid(*now) == typeid(*before)) {
        *now = *before;
      } else {
        param_groups_[i].set_options(std::move(options_before[i]));
      }
    }
    state_ = std::move(state_before);
    core_.invalidate();
    throw;
  }
}

void Adam::load_unchecked(torch::serialize::InputArchive& archive) {
  std::vector<AdamOptions> configured;
  configured.reserve(param_groups_.size());
  for (size_t i = 0; i < param_groups_.size(); ++i) configured.push_back(options_of(i));
  torch::optim::serialize<AdamParamState, AdamOptions>(archive, *this);
  core_.invalidate();  // the cached lists held the replaced state: freed now, rebuilt at the next step
  // torch's reader assigns the saved AdamOptions into each group's options object, which keeps its type (AdamW's
  // groups hold AdamWOptions) and its address: code holding a reference to a group's options (a schedule that
  // sets lr through it, as with torch::optim::AdamW) keeps a live one. Only a group that holds plain AdamOptions
  // gets AdamW's type.
  for (size_t i = 0; decoupled_ && i < param_groups_.size(); ++i) {
    if (dynamic_cast<AdamWOptions*>(&param_groups_[i].options()) == nullptr) {
      param_groups_[i].set_options(options_for(options_of(i), true));
    }
  }
  for (size_t i = 0; i < param_groups_.size() && i < configured.size(); ++i) {
    AdamOptions& loaded = options_of(i);
    if (!loaded.has_mixprec_fields_) {  // torch's checkpoint: its options, the group's mixprec settings
      const AdamOptions& mine = configured[i];
      loaded.maximize(mine.maximize())
          .master_weights(mine.master_weights())
          .moment_dtype(mine.moment_dtype())
          .rounding(mine.rounding())
          .seed(mine.seed())
          .rng_calls(mine.rng_calls())
          .fused(mine.fused());
      loaded.has_mixprec_fields_ = true;
    }
    AdamCore::check_step_options(loaded);  // a checkpoint's lr may be below 0 (a scheduler's), as torch loads it
  }
}

// ---- torch.classes.mixprec.AdamCore: the Python front door's handle on the core ----------------------------

namespace {

using detail::AdamCoreClass;
using CoreRef = c10::intrusive_ptr<AdamCoreClass>;

AdamOptions options_from(double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                         bool maximize, const std::string& master_weights, c10::ScalarType moment_dtype,
                         const std::string& rounding, std::optional<int64_t> seed, int64_t rng_calls) {
  TORCH_CHECK_VALUE(!seed.has_value() || *seed >= 0, "seed must be a non-negative integer or None, got ", *seed);
  return AdamOptions(lr)
      .betas({beta1, beta2})
      .eps(eps)
      .weight_decay(weight_decay)
      .amsgrad(amsgrad)
      .maximize(maximize)
      .master_weights(master_weights)
      .moment_dtype(moment_dtype)
      .rounding(rounding)
      .seed(seed.value_or(-1))
      .rng_calls(rng_calls);
}

std::optional<torch::Tensor> defined_or_none(const std::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t : std::nullopt;
}

}  // namespace

}  // namespace mixprec::optim

namespace mixprec::detail {

using optim::AdamCore;
using optim::AdamOptions;
using optim::AdamParamState;
using optim::defined_or_none;
using optim::options_from;

AdamParamState& AdamCoreClass::state_of(const torch::Tensor& p) {
  auto [it, inserted] = states.try_emplace(p.unsafeGetTensorImpl());
  if (inserted) it->second.param = p;
  return it->second.state;
}

std::tuple<int64_t, std::vector<int64_t>> AdamCoreClass::step_group(
    int64_t group, at::TensorList params, std::optional<std::vector<torch::Tensor>> locals,
    std::optional<std::vector<std::optional<torch::Tensor>>> grads, double lr,
    const std::optional<torch::Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
    bool decoupled, bool amsgrad, bool maximize, const std::string& master_weights, c10::ScalarType moment_dtype,
    const std::string& rounding, std::optional<int64_t> seed, int64_t rng_calls,
    const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf, int64_t shard) {
  TORCH_CHECK_VALUE(group >= 0, "group must be >= 0, got ", group);
  torch::NoGradGuard no_grad;
  AdamOptions options = options_from(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, master_weights,
                                     moment_dtype, rounding, seed, rng_calls);
  AdamCore::StepInputs inputs;
  inputs.lr_tensor = defined_or_none(lr_tensor);
  inputs.grad_scale = defined_or_none(grad_scale);
  inputs.found_inf = defined_or_none(found_inf);
  inputs.locals = std::move(locals);
  inputs.grads = std::move(grads);
  inputs.shard = shard;
  std::vector<int64_t> changed = core.step_group(
      static_cast<size_t>(group), params, options, decoupled,
      [this](const torch::Tensor& p) -> AdamParamState& { return state_of(p); }, inputs);
  return {options.rng_calls(), std::move(changed)};
}

c10::intrusive_ptr<AdamCoreClass> adam_core_of(const c10::IValue& object) {
  return custom_class_of<AdamCoreClass>(object, "AdamCore");
}

}  // namespace mixprec::detail

namespace mixprec::optim {

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.class_<AdamCoreClass>("AdamCore")
      .def(torch::init<>())
      .def("check_options",
           [](const CoreRef&, double lr, double beta1, double beta2, double eps, double weight_decay,
              const std::string& master_weights, c10::ScalarType moment_dtype, const std::string& rounding,
              std::optional<int64_t> seed, int64_t rng_calls) {
             AdamCore::check_options(options_from(lr, beta1, beta2, eps, weight_decay, false, false,
                                                  master_weights, moment_dtype, rounding, seed, rng_calls));
           })
      .def("check_step_options",
           [](const CoreRef&, double beta1, const std::string& master_weights, c10::ScalarType moment_dtype,
              const std::string& rounding, std::optional<int64_t> seed, int64_t rng_calls) {
             AdamCore::check_step_options(options_from(0.0, beta1, 0.0, 0.0, 0.0, false, false, master_weights,
                                                       moment_dtype, rounding, seed, rng_calls));
           })
      // One param group's step. Returns (rng_calls after the step, indices whose state was created or replaced).
      .def("step_group",
           [](const CoreRef& self, int64_t group, std::vector<torch::Tensor> params,
              std::optional<std::vector<torch::Tensor>> locals, std::optional<std::vector<std::optional<torch::Tensor>>> grads,
              double lr, std::optional<torch::Tensor> lr_tensor, double beta1, double beta2, double eps,
              double weight_decay, bool decoupled, bool amsgrad, bool maximize, const std::string& master_weights,
              c10::ScalarType moment_dtype, const std::string& rounding, std::optional<int64_t> seed,
              int64_t rng_calls, std::optional<torch::Tensor> grad_scale, std::optional<torch::Tensor> found_inf,
              int64_t shard) {
             return self->step_group(group, params, std::move(locals), std::move(grads), lr, lr_tensor, beta1, beta2,
                                     eps, weight_decay, decoupled, amsgrad, maximize, master_weights, moment_dtype,
                                     rounding, seed, rng_calls, grad_scale, found_inf, shard);
           })
      // Replaces all state with Python's: one row per parameter; an undefined step means no state.
      .def("set_states",
           [](const CoreRef& self, std::vector<torch::Tensor> params, std::vector<std::optional<torch::Tensor>> steps,
              std::vector<std::optional<torch::Tensor>> exp_avgs, std::vector<std::optional<torch::Tensor>> exp_avg_sqs,
              std::vector<std::optional<torch::Tensor>> masters, std::vector<std::optional<torch::Tensor>> remainders,
              std::vector<std::optional<torch::Tensor>> max_exp_avg_sqs) {
             const size_t n = params.size();
             TORCH_CHECK_VALUE(steps.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                                   masters.size() == n && remainders.size() == n && max_exp_avg_sqs.size() == n,
                               "set_states: every list needs one entry per parameter (", n, ")");
             self->core.invalidate();
             self->states.clear();
             const auto get = [](const std::optional<torch::Tensor>& t) { return t.value_or(torch::Tensor()); };
             for (size_t i = 0; i < n; ++i) {
               AdamParamState& st = self->state_of(params[i]);
               st.step(get(steps[i]));
               st.exp_avg(get(exp_avgs[i]));
               st.exp_avg_sq(get(exp_avg_sqs[i]));
               st.master(get(masters[i]));
               st.remainder(get(remainders[i]));
               st.max_exp_avg_sq(get(max_exp_avg_sqs[i]));
             }
           })
      // The state tensors of `param` the core holds (only the defined ones).
      .def("state_of",
           [](const CoreRef& self, const torch::Tensor& param) {
             c10::Dict<std::string, torch::Tensor> out;
             auto it = self->states.find(param.unsafeGetTensorImpl());
             if (it == self->states.end()) return out;
             const AdamParamState& st = it->second.state;
             const std::pair<const char*, const torch::Tensor*> fields[] = {
                 {"step", &st.step()}, {"exp_avg", &st.exp_avg()}, {"exp_avg_sq", &st.exp_avg_sq()},
                 {"master", &st.master()}, {"remainder", &st.remainder()}, {"max_exp_avg_sq", &st.max_exp_avg_sq()}};
             for (const auto& [name, t] : fields) {
               if (t->defined()) out.insert(name, *t);
             }
             return out;
           })
      // The cached lists and the state held for them: after a load or a state reset, the old state tensors are
      // freed now, not at the next step's set_states (which pushes the new state back).
      .def("invalidate", [](const CoreRef& self) {
        self->core.invalidate();
        self->states.clear();
      });
}

}  // namespace mixprec::optim
