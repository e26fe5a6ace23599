// mixprec::Policy (one parser for every precision name users know), AutocastGuard, apply(), and the
// torch custom class torch.classes.mixprec.Policy that Python's mixprec.Policy wraps.
#include "mixprec/policy.h"

#include "mixprec/nn.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <sstream>
#include <unordered_set>

namespace mixprec {

namespace {

constexpr const char* kAccepted =
    "float32, mixed_float16, mixed_bfloat16, float16, bfloat16 (mixprec/Keras); 32-true, 16-mixed, bf16-mixed, "
    "16-true, bf16-true, 32, 16, bf16 (Lightning); no, fp16 (Accelerate); or jmp's explicit "
    "\"params=<dtype>,compute=<dtype>,output=<dtype>\" with dtypes float32/f32, float16/f16/half, bfloat16/bf16";

std::string lower_trimmed(std::string s) {
  s.erase(std::remove_if(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); }), s.end());
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

c10::ScalarType parse_dtype(const std::string& s, const std::string& whole) {
  static const std::map<std::string, c10::ScalarType> names = {
      {"float32", c10::kFloat}, {"f32", c10::kFloat},  {"fp32", c10::kFloat},      {"float", c10::kFloat},
      {"full", c10::kFloat},    {"float16", c10::kHalf}, {"f16", c10::kHalf},      {"fp16", c10::kHalf},
      {"half", c10::kHalf},     {"bfloat16", c10::kBFloat16}, {"bf16", c10::kBFloat16}};
  auto it = names.find(s);
  TORCH_CHECK(it != names.end(), "mixprec::Policy: unknown dtype \"", s, "\" in \"", whole, "\"; accepted names: ",
              kAccepted);
  return it->second;
}

Policy make(const std::string& name, c10::ScalarType compute, c10::ScalarType param, c10::ScalarType output) {
  Policy p;
  p.name = name;
  p.compute_dtype = compute;
  p.param_dtype = param;
  p.master_dtype = param == c10::kFloat ? c10::kFloat : param;  // pure 16-bit: no master copy
  p.output_dtype = output;
  return p;
}

const char* dtype_name(c10::ScalarType t) {
  return t == c10::kHalf ? "float16" : (t == c10::kBFloat16 ? "bfloat16" : "float32");
}

at::Tensor cast_floating(const at::Tensor& t, c10::ScalarType dtype) {
  return t.defined() && t.is_floating_point() && t.scalar_type() != dtype ? t.to(dtype) : t;
}

}  // namespace

at::Tensor Policy::cast_to_compute(const at::Tensor& t) const { return cast_floating(t, compute_dtype); }
at::Tensor Policy::cast_to_param(const at::Tensor& t) const { return cast_floating(t, param_dtype); }
at::Tensor Policy::cast_to_output(const at::Tensor& t) const { return cast_floating(t, output_dtype); }

optim::AdamWOptions Policy::adam_options(double lr) const {
  optim::AdamWOptions options(lr);
  if (param_dtype != c10::ScalarType::Float && master_dtype != c10::ScalarType::Float) {
    const uint64_t seed = at::detail::getDefaultCPUGenerator().current_seed();
    options.master_weights("none").rounding("stochastic").seed(static_cast<int64_t>(seed % (uint64_t{1} << 62)));
  }
  return options;
}

bool Policy::keeps_fp32(const std::string& module_type) const {
  return std::any_of(keep_fp32.begin(), keep_fp32.end(),
                     [&](const std::string& k) { return !k.empty() && module_type.find(k) != std::string::npos; });
}

Policy Policy::from_string(const std::string& raw) {
  const std::string s = lower_trimmed(raw);
  static const std::map<std::string, std::string> aliases = {
      {"float32", "float32"},         {"32-true", "float32"},         {"32", "float32"},
      {"no", "float32"},              {"mixed_float16", "mixed_float16"}, {"16-mixed", "mixed_float16"},
      {"16", "mixed_float16"},        {"fp16", "mixed_float16"},      {"mixed_bfloat16", "mixed_bfloat16"},
      {"bf16-mixed", "mixed_bfloat16"}, {"bf16", "mixed_bfloat16"},   {"float16", "float16"},
      {"16-true", "float16"},         {"bfloat16", "bfloat16"},       {"bf16-true", "bfloat16"}};
  auto it = aliases.find(s);
  if (it != aliases.end()) {
    const std::string& canon = it->second;
    if (canon == "float32") return make(canon, c10::kFloat, c10::kFloat, c10::kFloat);
    if (canon == "mixed_float16") return make(canon, c10::kHalf, c10::kFloat, c10::kHalf);
    if (canon == "mixed_bfloat16") return make(canon, c10::kBFloat16, c10::kFloat, c10::kBFloat16);
    if (canon == "float16") return make(canon, c10::kHalf, c10::kHalf, c10::kHalf);
    return make(canon, c10::kBFloat16, c10::kBFloat16, c10::kBFloat16);
  }
  TORCH_CHECK(s.find('=') != std::string::npos, "mixprec::Policy: unknown policy \"", raw, "\"; accepted: ", kAccepted);
  // jmp's explicit form: comma-separated key=dtype pairs. As jmp reads them: params default to float32, compute
  // follows params, output follows compute.
  std::map<std::string, c10::ScalarType> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto eq = item.find('=');
    TORCH_CHECK(eq != std::string::npos, "mixprec::Policy: \"", item, "\" in \"", raw,
                "\" is not key=dtype; accepted: ", kAccepted);
    std::string key = item.substr(0, eq);
    if (key == "p" || key == "param") key = "params";
    if (key == "c") key = "compute";
    if (key == "o") key = "output";
    TORCH_CHECK(key == "params" || key == "compute" || key == "output", "mixprec::Policy: unknown key \"", key,
                "\" in \"", raw, "\" (keys: params, compute, output)");
    parts[key] = parse_dtype(item.substr(eq + 1), raw);
  }
  const c10::ScalarType params = parts.count("params") ? parts["params"] : c10::kFloat;
  const c10::ScalarType compute = parts.count("compute") ? parts["compute"] : params;
  const c10::ScalarType output = parts.count("output") ? parts["output"] : compute;
  std::string canon = std::string("params=") + dtype_name(params) + ",compute=" + dtype_name(compute) +
                      ",output=" + dtype_name(output);
  return make(canon, compute, params, output);
}

AutocastGuard::AutocastGuard(const Policy& policy, c10::DeviceType device_type)
    : device_type_(device_type),
      prev_enabled_(at::autocast::is_autocast_enabled(device_type)),
      prev_dtype_(at::autocast::get_autocast_dtype(device_type)),
      prev_cache_enabled_(at::autocast::is_autocast_cache_enabled()) {
  TORCH_CHECK(at::autocast::is_autocast_available(device_type), "mixprec::AutocastGuard: autocast is not available for ",
              device_type, " devices");
  const bool enable = policy.compute_dtype != c10::kFloat;
  if (enable) {
    TORCH_CHECK(device_type != c10::DeviceType::CPU || policy.compute_dtype == c10::kBFloat16 ||
                    policy.compute_dtype == c10::kHalf,
                "mixprec::AutocastGuard: policy \"", policy.name, "\" computes in ", policy.compute_dtype,
                ", which CPU autocast cannot use");
    at::autocast::set_autocast_dtype(device_type, policy.compute_dtype);
  }
  at::autocast::set_autocast_enabled(device_type, enable);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, prev_enabled_);
  at::autocast::set_autocast_dtype(device_type_, prev_dtype_);
  at::autocast::set_autocast_cache_enabled(prev_cache_enabled_);
}

void apply(torch::nn::Module& module, const Policy& policy) {
  // Check everything first, so a failure leaves the module untouched.
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    TORCH_CHECK(at::isFloatingType(item.value().scalar_type()), "mixprec::apply: parameter \"", item.key(),
                "\" has dtype ", item.value().scalar_type(), "; only floating-point parameters can follow a policy");
  }
  torch::NoGradGuard no_grad;
  // The module itself by reference (named_modules(include_self) needs it held by a shared_ptr, and LibTorch code
  // keeps its top-level module on the stack: `Net net; net.to(device)` works, so must apply(net, policy)).
  std::vector<torch::nn::Module*> modules{&module};
  for (const auto& child : module.modules(/*include_self=*/false)) modules.push_back(child.get());
  // A parameter a kept module shares with a module stored in the policy's dtype (tied weights) takes that dtype,
  // whichever module comes first: the kept module's inputs are adapted by autocast, the other's are not. As
  // Python's Policy.apply.
  std::unordered_set<const c10::TensorImpl*> shared_with_cast;
  for (torch::nn::Module* m : modules) {
    if (policy.keeps_fp32(m->name())) continue;
    for (const auto& p : m->parameters(/*recurse=*/false)) shared_with_cast.insert(p.unsafeGetTensorImpl());
  }
  for (torch::nn::Module* each : modules) {
    torch::nn::Module& m = *each;
    const c10::ScalarType target = policy.keeps_fp32(m.name()) ? c10::kFloat : policy.param_dtype;
    // Steps, scales and scaling state that must stay exact (the layers' own to(dtype) keeps them too), and FP8
    // scaling state ("fp8_*" buffers) in any module, as Python's Policy.apply keeps it (a module of the user's
    // own holding a state for nn::float8_linear).
    auto* exact = dynamic_cast<nn::KeepsFp32*>(&m);
    const auto exact_name = [exact](const std::string& name) { return exact != nullptr && exact->keeps_fp32(name); };
    bool cast = false;
    for (auto& p : m.named_parameters(/*recurse=*/false)) {
      if (exact_name(p.key())) continue;
      const c10::ScalarType want =
          shared_with_cast.count(p.value().unsafeGetTensorImpl()) != 0 ? policy.param_dtype : target;
      if (p.value().scalar_type() != want) {
        p.value().set_data(p.value().to(want));
        // As Module::to casts .grad with its parameter; an fp32 gradient a converted layer keeps (grad_dtype
        // float32) stays.
        const torch::Tensor grad = p.value().grad();
        const std::optional<c10::ScalarType> grad_dtype = p.value().grad_dtype();
        if (grad.defined() && grad_dtype.has_value() && grad.scalar_type() != *grad_dtype) {
          p.value().mutable_grad() = grad.to(*grad_dtype);
        }
        cast = true;
      }
    }
    // What a layer does after its own casts (KeepsFp32::dtype_changed): a QAT layer's gradient dtype follows the
    // weight; a weight quantized before the cast is not the weight any more, so the 8-bit layers' caches go.
    if (cast && exact != nullptr) exact->dtype_changed();
    if (cast) {
      if (auto* int8 = dynamic_cast<nn::Int8LinearImpl*>(&m)) int8->weight_cache = {};
    }
    for (auto& b : m.named_buffers(/*recurse=*/false)) {
      if (exact_name(b.key()) || b.key().rfind("fp8_", 0) == 0) continue;
      if (at::isFloatingType(b.value().scalar_type()) && b.value().scalar_type() != target) {
        b.value().set_data(b.value().to(target));
      }
    }
  }
}

// ---- torch.classes.mixprec.Policy ----------------------------------------------------------------------------

namespace {
struct PolicyClass : torch::CustomClassHolder {
  Policy policy;
  explicit PolicyClass(const std::string& name) : policy(Policy::from_string(name)) {}
};
using PolicyPtr = c10::intrusive_ptr<PolicyClass>;
}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.class_<PolicyClass>("Policy")
      .def(torch::init<std::string>())
      .def("name", [](const PolicyPtr& s) { return s->policy.name; })
      .def("compute_dtype", [](const PolicyPtr& s) { return static_cast<int64_t>(s->policy.compute_dtype); })
      .def("param_dtype", [](const PolicyPtr& s) { return static_cast<int64_t>(s->policy.param_dtype); })
      .def("master_dtype", [](const PolicyPtr& s) { return static_cast<int64_t>(s->policy.master_dtype); })
      .def("output_dtype", [](const PolicyPtr& s) { return static_cast<int64_t>(s->policy.output_dtype); })
      .def("needs_loss_scaling", [](const PolicyPtr& s) { return s->policy.needs_loss_scaling(); })
      // Policy::adam_options's mixprec settings, for Python's Policy.optimizer: (master_weights, rounding, seed;
      // -1: none).
      .def("adam_settings",
           [](const PolicyPtr& s) {
             const optim::AdamWOptions o = s->policy.adam_options();
             return std::make_tuple(o.master_weights(), o.rounding(), o.seed());
           })
      .def("keep_fp32", [](const PolicyPtr& s) { return s->policy.keep_fp32; })
      .def("set_keep_fp32",
           [](const PolicyPtr& s, std::vector<std::string> names) { s->policy.keep_fp32 = std::move(names); })
      .def("keeps_fp32",
           [](const PolicyPtr& s, const std::string& type_name) { return s->policy.keeps_fp32(type_name); })
      // Pickling, copy.deepcopy and torch.save of a Python Policy (and of what holds one: configs, autocast
      // objects) go through this state: the name and the kept module types, re-parsed on load.
      .def_pickle(
          [](const PolicyPtr& s) { return std::make_tuple(s->policy.name, s->policy.keep_fp32); },
          [](std::tuple<std::string, std::vector<std::string>> state) {
            auto out = c10::make_intrusive<PolicyClass>(std::get<0>(state));
            out->policy.keep_fp32 = std::move(std::get<1>(state));
            return out;
          });
}

}  // namespace mixprec
