// mixprec::nn::linear: the one implementation of the fp32-weight-gradient linear layer, behind both front
// doors: mixprec::nn::Linear (C++) and mixprec.nn.Linear (Python, through the op mixprec::linear).
#include "mixprec/nn.h"

#include <ATen/autocast_mode.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>
#include <torch/nn/init.h>

#include <cmath>
#include <map>
#include <mutex>

#include "mixprec/ops.h"

namespace mixprec::nn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// autocast's rule for its lower-precision ops: floating tensors other than fp64 take its dtype.
torch::Tensor autocast_to(const torch::Tensor& t, std::optional<at::ScalarType> dtype) {
  if (!t.defined() || !dtype || !t.is_floating_point() || t.scalar_type() == *dtype ||
      t.scalar_type() == at::kDouble) {
    return t;
  }
  return t.to(*dtype);
}

bool is_subclass(const torch::Tensor& t) {  // a Python tensor subclass, e.g. FSDP2's DTensor
  return t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python);
}

// A zero-size leaf per device that every layer's autograd node takes as an extra input, so that its
// AccumulateGrad node is in every graph the layer is in (on the layer's device: the engine runs that node
// on the device's own thread). The engine runs it only in a plain .backward() (no inputs=, not
// autograd::grad), the one kind of backward in which torch itself would add into weight.grad.
struct Probe {
  torch::Tensor leaf;
  decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::Tensor&>())) node;
};

const Probe& probe_for(const c10::Device& device) {
  static std::mutex mutex;
  // Never freed (a leaked heap object, not a static one): the nodes must outlive every graph, and no
  // autograd node may be destroyed at exit after torch's own statics are gone.
  static auto* probes = new std::map<std::string, Probe>();
  const std::lock_guard<std::mutex> lock(mutex);
  auto [it, inserted] = probes->try_emplace(device.str());
  if (inserted) {
    it->second.leaf = torch::empty({0}, torch::TensorOptions().device(device).requires_grad(true));
    it->second.node = torch::autograd::impl::grad_accumulator(it->second.leaf);
  }
  return it->second;
}

bool in_plain_backward(const c10::Device& device) {
  const auto* nodes = torch::autograd::get_current_graph_task_nodes_in_graph();
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (nodes == nullptr || exec_info == nullptr) return false;
  torch::autograd::Node* node = probe_for(device).node.get();
  if (nodes->count(node) == 0) return false;
  if (exec_info->empty()) return true;  // a plain backward runs every node
  const auto it = exec_info->find(node);
  return it != exec_info->end() && it->second.should_execute() && !it->second.captures_;
}

// Whether the backward may add into weight.grad itself instead of returning a new gradient: a plain
// .backward() that accumulates into .grad anyway, an accumulator of the weight's shape there, and nothing
// (a tensor hook, a post-accumulate hook, a double backward) that needs the new part on its own.
bool adds_in_place(const torch::Tensor& weight, const c10::Device& device) {
  const torch::Tensor& grad = weight.grad();
  return grad.defined() && grad.is_floating_point() && grad.layout() == at::kStrided && grad.is_contiguous() &&
         grad.sizes() == weight.sizes() && grad.device() == weight.device() && !is_subclass(grad) &&
         torch::autograd::impl::hooks(weight).empty() && !torch::autograd::impl::post_acc_grad_hooks(weight) &&
         in_plain_backward(device);
}

// Autograd makes the caller's stream wait for the gradients it hands over; a gradient added in place is not
// handed over, so make the caller's stream (current when backward's final callbacks run) wait too.
void after_backward_wait_for(const c10::Device& device) {
  const c10::impl::VirtualGuardImpl guard(device.type());
  const c10::Stream producer = guard.getStream(device);
  torch::autograd::Engine::get_default_engine().queue_callback([producer] {
    const c10::impl::VirtualGuardImpl g(producer.device_type());
    const c10::Stream consumer = g.getStream(producer.device());
    if (consumer == producer) return;
    c10::Event event(producer.device_type());
    event.record(producer);
    event.block(consumer);
  });
}

torch::Tensor rows(const torch::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  // The bias is optional<Tensor>: autograd::Function tracks an undefined plain Tensor as a variable and fails.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& maybe_bias, const torch::Tensor& probe) {
    const torch::Tensor bias = maybe_bias.value_or(torch::Tensor());
    // Autocast would cast inside at::linear and hide the 16-bit operands from backward: cast here with its
    // rule, keep the 16-bit input for the wgrad GEMM, and run at::linear with autocast excluded.
    const c10::DeviceType device_type = input.device().type();
    std::optional<at::ScalarType> dtype;
    if (at::autocast::is_autocast_enabled(device_type)) {
      dtype = at::autocast::get_autocast_dtype(device_type);
    }
    const torch::Tensor x = autocast_to(input, dtype), w = autocast_to(weight, dtype), b = autocast_to(bias, dtype);
    torch::Tensor output;
    {
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      output = at::linear(x, w, b);
    }
    ctx->save_for_backward({x, w});
    // The parameter itself, to reach its .grad (a leaf: no reference cycle through the graph).
    ctx->saved_data["weight"] = weight.is_leaf() ? weight : torch::Tensor();
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["probe_device"] = probe.device();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();  // backward runs in grad mode only for create_graph
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& w = saved[1];
    torch::Tensor go = grad_outputs[0];
    if (go.scalar_type() != x.scalar_type()) go = go.to(x.scalar_type());
    torch::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) grad_input = go.matmul(w);
    if (ctx->needs_input_grad(1)) {
      const torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      const c10::Device probe_device = ctx->saved_data["probe_device"].toDevice();
      if (x.scalar_type() == at::kDouble) {  // the GEMM op is for fp32 and narrower; fp64 stays fp64
        grad_weight = rows(go).t().matmul(rows(x));
      } else if (create_graph) {  // differentiable, with the GEMM op's arithmetic: exact products, fp32 sums
        grad_weight = rows(go).t().to(at::kFloat).matmul(rows(x).to(at::kFloat));
      } else if (weight.defined() && adds_in_place(weight, probe_device)) {
        torch::Tensor& accumulator = weight.mutable_grad();
        if (accumulator.scalar_type() != at::kFloat) accumulator = accumulator.to(at::kFloat);  // from another use
        ops::linear_wgrad_accum_(accumulator, go, x);  // AccumulateGrad then has nothing to add
        if (x.device().type() != c10::kCPU) after_backward_wait_for(x.device());
      } else {
        // Autograd casts it to the weight's grad_dtype: fp32 for converted weights (a no-op), the weight's
        // own dtype otherwise (a computed weight, FSDP2's unsharded parameter).
        grad_weight = ops::linear_wgrad(go, x);
      }
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      // fp32 (fp64 for fp64) sum over the batch, rounded once to the bias's dtype by autograd.
      grad_bias = rows(go).sum(0, /*keepdim=*/false, at::promote_types(go.scalar_type(), at::kFloat));
    }
    return {grad_input, grad_weight, grad_bias, torch::Tensor()};
  }
};

}  // namespace

void keep_fp32_grad(const torch::Tensor& weight) {
  if (!weight.is_leaf() || !weight.requires_grad() || is_subclass(weight) || weight.scalar_type() == at::kDouble) {
    return;
  }
  const torch::Tensor grad = weight.grad();
  if (grad.defined() && grad.scalar_type() != at::kFloat) {
    torch::Tensor fp32 = grad.to(at::kFloat);
    const_cast<torch::Tensor&>(weight).mutable_grad() = torch::Tensor();  // no grad of another dtype meanwhile
    weight.set_grad_dtype(at::kFloat);
    const_cast<torch::Tensor&>(weight).mutable_grad() = fp32;
  } else {
    // Set even for an fp32 weight: an explicit grad_dtype survives a later cast to 16 bits.
    weight.set_grad_dtype(at::kFloat);
  }
}

torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (weight.is_leaf() && weight.requires_grad() && weight.scalar_type() == at::kDouble &&
      weight.grad_dtype() != at::kDouble && !weight.grad().defined()) {
    weight.set_grad_dtype(std::nullopt);  // converted in fp32, cast to fp64 since: gradients in fp64 again
  }
  std::optional<torch::Tensor> maybe_bias;
  if (bias.defined()) maybe_bias = bias;
  return LinearFunction::apply(input, weight, maybe_bias, probe_for(weight.device()).leaf);
}

// Above autograd (CompositeImplicitAutograd): the autograd function records its own node, and Python's
// mixprec.nn.linear / keep_fp32_grad are these very functions.
TORCH_LIBRARY_IMPL(mixprec, CompositeImplicitAutograd, m) {
  m.impl("linear", [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    return linear(input, weight, bias.value_or(at::Tensor()));
  });
  m.impl("keep_fp32_grad_", [](const at::Tensor& weight) { keep_fp32_grad(weight); });
}

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

LinearImpl::LinearImpl(const torch::nn::LinearImpl& other) : options(other.options) {
  weight = register_parameter("weight", other.weight);
  bias = register_parameter("bias", other.bias, /*requires_grad=*/other.bias.defined() && other.bias.requires_grad());
  keep_fp32_grad(weight);
}

void LinearImpl::reset() {
  weight = register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty(options.out_features()));
  } else {
    bias = register_parameter("bias", {}, /*requires_grad=*/false);
  }
  reset_parameters();
  keep_fp32_grad(weight);  // also for clone(), which calls reset() and copies the values in
}

void LinearImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const auto fans = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    const double bound = std::get<0>(fans) > 0 ? 1.0 / std::sqrt(static_cast<double>(std::get<0>(fans))) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::nn::Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias() << ")";
}

torch::Tensor LinearImpl::forward(const torch::Tensor& input) { return linear(input, weight, bias); }

}  // namespace mixprec::nn
