// mixprec::optim::Adam / AdamW: the LibTorch twin of python/mixprec/optim.py, on the same fused op.
#include "mixprec/optim.h"

#include <torch/serialize/archive.h>

#include <map>

#include "mixprec/ops.h"

namespace mixprec::optim {

namespace {

bool is_low_precision(const torch::Tensor& p) {
  return p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16;
}

std::string master_mode_for(const torch::Tensor& p, const AdamOptions& o) {
  const std::string& choice = o.master_weights();
  if (choice == "auto") return is_low_precision(p) ? "fp32" : "none";
  if (choice == "remainder") {
    TORCH_CHECK(p.scalar_type() == at::kBFloat16, "mixprec::optim: master_weights \"remainder\" needs bfloat16 params, got ",
                p.scalar_type());
  }
  if (choice == "fp32" && p.scalar_type() == at::kFloat) return "none";
  return choice;
}

int64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<int64_t>(x ^ (x >> 31));
}

void check_options(const AdamOptions& o) {
  TORCH_CHECK(o.lr() >= 0, "mixprec::optim: invalid learning rate: ", o.lr(), " (lr must be >= 0)");
  TORCH_CHECK(o.eps() >= 0, "mixprec::optim: invalid epsilon value: ", o.eps(), " (eps must be >= 0)");
  const auto [b1, b2] = o.betas();
  TORCH_CHECK(b1 >= 0 && b1 < 1, "mixprec::optim: invalid beta parameter at index 0: ", b1, " (must be in [0, 1))");
  TORCH_CHECK(b2 >= 0 && b2 < 1, "mixprec::optim: invalid beta parameter at index 1: ", b2, " (must be in [0, 1))");
  TORCH_CHECK(o.weight_decay() >= 0, "mixprec::optim: invalid weight_decay value: ", o.weight_decay());
  TORCH_CHECK(!o.amsgrad(), "mixprec::optim: amsgrad=true is not supported by the fused step (it keeps no maximum of "
              "the second moments); use torch::optim::Adam with amsgrad");
  const std::string& mw = o.master_weights();
  TORCH_CHECK(mw == "auto" || mw == "fp32" || mw == "remainder" || mw == "none",
              "mixprec::optim: master_weights must be \"auto\", \"fp32\", \"remainder\" or \"none\", got \"", mw, "\"");
  TORCH_CHECK(o.moment_dtype() == at::kFloat || o.moment_dtype() == at::kBFloat16,
              "mixprec::optim: moment_dtype must be float32 or bfloat16, got ", o.moment_dtype());
  TORCH_CHECK(o.rounding() == "nearest" || o.rounding() == "stochastic",
              "mixprec::optim: rounding must be \"nearest\" or \"stochastic\", got \"", o.rounding(), "\"");
}

}  // namespace

AdamOptions::AdamOptions(double lr) : lr_(lr) {}

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
}

void AdamOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  c10::IValue amsgrad_value;
  if (archive.try_read("amsgrad", amsgrad_value)) amsgrad(amsgrad_value.toBool());  // absent in older checkpoints
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, master_weights);
  c10::IValue dtype;
  archive.read("moment_dtype", dtype);
  moment_dtype(static_cast<c10::ScalarType>(dtype.toInt()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, rounding);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, rng_calls);
}

void AdamParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(master);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(remainder);
}

void AdamParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, master);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, remainder);
}

Adam::Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults)
    : Adam(param_groups, std::move(defaults), /*decoupled=*/false) {}

Adam::Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults, bool decoupled)
    : torch::optim::Optimizer(param_groups, std::make_unique<AdamOptions>(defaults)), decoupled_(decoupled) {
  check_options(defaults);
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

void Adam::step_scaled(const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf) {
  torch::NoGradGuard no_grad;
  for (auto& group : param_groups_) {
    auto& options = static_cast<AdamOptions&>(group.options());
    check_options(options);
    struct Bucket {
      std::vector<torch::Tensor> p, g, m, v, w, s;
    };
    std::map<std::pair<std::string, std::string>, Bucket> buckets;  // (device, master mode)
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK(!p.grad().is_sparse(), "mixprec::optim::Adam does not support sparse gradients");
      const std::string mode = master_mode_for(p, options);
      auto key = p.unsafeGetTensorImpl();
      auto it = state_.find(key);
      if (it == state_.end()) {
        auto st = std::make_unique<AdamParamState>();
        st->step(torch::zeros({}, p.options().dtype(at::kFloat)));
        st->exp_avg(torch::zeros_like(p, p.options().dtype(options.moment_dtype())));
        st->exp_avg_sq(torch::zeros_like(p, p.options().dtype(options.moment_dtype())));
        it = state_.emplace(key, std::move(st)).first;
      }
      auto& st = static_cast<AdamParamState&>(*it->second);
      // A state loaded from elsewhere: steps onto the param's device, masters from the params.
      if (st.step().device() != p.device()) st.step(st.step().to(p.device(), at::kFloat));
      if (mode == "fp32" && !st.master().defined()) st.master(p.detach().to(at::kFloat).clone());
      if (mode == "remainder" && !st.remainder().defined()) {
        if (st.master().defined()) {
          // Switching from fp32 masters keeps the exact value: the param takes its bf16 half, the state the rest.
          auto [bf16, remainder] = ops::split_bf16_remainder(st.master());
          p.detach().copy_(bf16);
          st.remainder(remainder);
          st.master(torch::Tensor());
        } else {  // the bf16 value is exact: its remainder is zero
          st.remainder(torch::zeros_like(p, p.options().dtype(at::kShort)));
        }
      }
      Bucket& b = buckets[{p.device().str(), mode}];
      b.p.push_back(p);
      b.g.push_back(p.grad());
      b.m.push_back(st.exp_avg());
      b.v.push_back(st.exp_avg_sq());
      b.s.push_back(st.step());
      if (mode == "fp32") b.w.push_back(st.master());
      if (mode == "remainder") b.w.push_back(st.remainder());
    }
    if (buckets.empty()) continue;
    std::optional<int64_t> seed;
    if (options.seed() >= 0) {
      seed = splitmix64((static_cast<uint64_t>(options.seed()) << 20) ^ static_cast<uint64_t>(options.rng_calls()));
      options.rng_calls(options.rng_calls() + 1);
    }
    for (auto& [key, b] : buckets) {
      const c10::Device device = b.p[0].device();
      ops::AdamStepExtras extras;
      if (grad_scale.has_value() && grad_scale->defined()) extras.grad_scale = grad_scale->to(device).reshape({1});
      if (found_inf.has_value() && found_inf->defined()) extras.found_inf = found_inf->to(device).reshape({1});
      const auto [beta1, beta2] = options.betas();
      ops::adam_step_(b.p, b.g, b.m, b.v, b.w, b.s, options.lr(), beta1, beta2, options.eps(), options.weight_decay(),
                      decoupled_, options.maximize(), key.second, options.rounding(), seed, extras);
    }
  }
}

void Adam::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, AdamOptions>(archive, *this);
}

void Adam::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdamParamState, AdamOptions>(archive, *this);
}

}  // namespace mixprec::optim
