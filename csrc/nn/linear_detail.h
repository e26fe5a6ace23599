// What the linear layers' autograd functions share (csrc/nn/linear.cpp defines it): autocast's cast rule,
// the in-place fp32 weight-gradient accumulation and its conditions, and torch::nn::Linear's parameters.
// Internal to libmixprec.
#pragma once

#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/options/linear.h>

#include <optional>
#include <utility>

namespace mixprec::nn::detail {

/// The dtype autocast computes in on `t`'s device now, or none where it is off. A device autocast has no
/// state for (meta, a LibTorch program's shape inference) has none: asking torch about it would throw.
std::optional<at::ScalarType> autocast_dtype(const torch::Tensor& t);
/// autocast's rule for its lower-precision ops: floating tensors other than fp64 take `dtype` (if any).
torch::Tensor autocast_to(const torch::Tensor& t, std::optional<at::ScalarType> dtype);
/// The input a layer's autograd function takes under autocast: cast by autocast's rule before the function,
/// on the graph (as autocast casts torch's linear's input), so a create_graph backward reaches the input
/// through the cast. The weight is cast inside the function instead (its gradient comes from the 16-bit
/// operands in fp32).
torch::Tensor autocast_input(const torch::Tensor& input);
/// The dtype autocast_to would give `t`, without casting it.
at::ScalarType autocast_dtype_of(const torch::Tensor& t, std::optional<at::ScalarType> dtype);
/// A reused weight cache holds the weight quantized in `cached`, the dtype the filling call computed in; this
/// call (autocast's state for `input`'s device now) must compute in the same one, or the codes would not be
/// the ones this call quantizes: a clear error naming both, for `op`.
void check_cache_dtype(at::ScalarType cached, const torch::Tensor& input, const torch::Tensor& weight,
                       const char* op);

/// The operands an 8-bit layer (`op`, quantizing to `format`: "FP8" or "INT8") computes with, after
/// autocast's casts (`w_dtype`: the weight's dtype then, also when a cache stands in for it): floating point
/// but not float64, the same dtype (as torch::nn::Linear requires), and feature counts that match.
void check_8bit_operands(const char* op, const char* format, const torch::Tensor& x, const torch::Tensor& w,
                         at::ScalarType w_dtype);

/// `t` as [rows, features] (symbolic sizes: under torch.compile with dynamic shapes the token count stays a
/// symbol; a plain size() would specialize the graph on it).
torch::Tensor rows(const torch::Tensor& t);
/// `like`'s (symbolic) sizes with the last one replaced by `features`: a layer's output shape from its input's,
/// or its input gradient's from the output gradient's.
c10::SymDimVector with_features(const torch::Tensor& like, const c10::SymInt& features);

/// Whether `t` is a Python tensor subclass (e.g. FSDP2's DTensor).
bool is_subclass(const torch::Tensor& t);

/// A zero-size leaf per device that every layer's autograd node takes as an extra input, so that its
/// AccumulateGrad node is in every graph the layer is in (on the layer's device: the engine runs that node
/// on the device's own thread). The engine runs it only in a plain .backward() (no inputs=, not
/// autograd::grad), the one kind of backward in which torch itself would add into weight.grad.
struct Probe {
  torch::Tensor leaf;
  decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::Tensor&>())) node;
  torch::Tensor plain;  // the same, not requiring grad
};
const Probe& probe_for(const c10::Device& device);
/// The probe a layer's autograd function takes: the leaf when the weight requires grad (only then can the
/// backward add into weight.grad), else a tensor that does not require grad, so that a frozen layer on an
/// input without grad gives an output without grad and builds no graph, as torch.nn.Linear's.
const torch::Tensor& probe_input(const torch::Tensor& weight);

/// Whether the backward may add into weight.grad itself instead of returning a new gradient: a plain
/// .backward() that accumulates into .grad anyway, an accumulator of the weight's shape there, and nothing
/// (a tensor hook, a post-accumulate hook, a double backward) that needs the new part on its own.
bool adds_in_place(const torch::Tensor& weight, const c10::Device& device);

/// Whether `t` can be read on the host now without harm: not a meta tensor, and not while a CUDA graph captures
/// the current stream of its device.
bool can_read(const torch::Tensor& t);

/// Autograd makes the caller's stream wait for the gradients it hands over; a gradient added in place is not
/// handed over, so this makes the caller's stream (current when backward's final callbacks run) wait too.
void after_backward_wait_for(const c10::Device& device);

/// torch::nn::Linear's initialisation: kaiming-uniform weight, uniform(+-1/sqrt(in)) bias.
void init_linear_parameters(const torch::Tensor& weight, const torch::Tensor& bias);
/// Registers "weight" [out, in] and "bias" [out] (or an undefined one) on `m` and initialises them.
void register_linear_parameters(torch::nn::Module& m, const torch::nn::LinearOptions& options, torch::Tensor& weight,
                                torch::Tensor& bias);
/// A converting constructor's parameters: `other`'s own tensors, not copies.
void adopt_linear_parameters(torch::nn::Module& m, const torch::nn::LinearImpl& other, torch::Tensor& weight,
                             torch::Tensor& bias);

// is_first_microbatch's rule for an 8-bit layer's weight cache (Transformer Engine's argument): true empties
// the cache so that the call fills it again, except in a forward inside a backward (a recomputation of the
// first micro-batch), which reuses the filled one: it holds the weight the original forward quantized, and a
// recomputation may stop before it fills a new one. false needs a filled cache. `layer` names the layer.
template <typename Cache>
void prepare_weight_cache(Cache& cache, bool is_first_microbatch, const char* layer) {
  if (is_first_microbatch) {
    if (cache.empty() || torch::autograd::get_current_graph_task_id() == -1) cache = {};
  } else {
    TORCH_CHECK(!cache.empty(), layer, ": is_first_microbatch=false reuses the weight quantized by an earlier call "
                "with is_first_microbatch=true, and there was none");
  }
}

}  // namespace mixprec::nn::detail
