// mixprec::nn::Linear for LibTorch: a drop-in torch::nn::Linear whose weight gradient is fp32, formed and
// accumulated by the weight-gradient GEMM itself (mixprec::ops::linear_wgrad*, cuBLASLt on CUDA).
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <ostream>
#include <string>
#include <utility>

#include "mixprec/fp8.h"
#include "mixprec/int8.h"
#include "mixprec/version.h"

namespace mixprec::nn {

/// `input @ weight^T + bias` whose backward forms dL/dweight with fp32 products and sums (the wgrad GEMM,
/// cuBLASLt on CUDA), never as a 16-bit tensor. The gradient reaches `weight.grad()` in the weight's
/// grad_dtype: fp32 after keep_fp32_grad (mixprec::nn::Linear does it), so it is an ordinary gradient
/// that every optimizer, mixprec::GradScaler and `zero_grad()` see. When `weight.grad()` already holds a
/// gradient (gradient accumulation) in a plain `backward()` (not autograd::grad, no `inputs`, no
/// create_graph) and no hook needs the new part on its own, the GEMM adds into it in place (beta = 1).
/// Input and bias gradients flow as usual (the bias's summed in fp32). Under autocast the GEMMs run in the
/// autocast dtype, as at::linear's would. The same function is Python's mixprec.nn.linear.
torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias = {});

/// Gives a leaf `weight` an fp32 gradient (grad_dtype float32), converting one it holds. Tensor subclasses
/// (FSDP2's DTensors, which assign gradients in their own dtypes) and float64 weights are left alone.
void keep_fp32_grad(const torch::Tensor& weight);

/// Undoes keep_fp32_grad: a leaf `weight`'s gradient in its own dtype again (grad_dtype its dtype), a gradient
/// it holds converted, as torch::nn::Linear's is (a layer converted to QAT, or cast to float64 since). The same
/// function is Python's mixprec.nn.own_dtype_grad.
void own_dtype_grad(const torch::Tensor& weight);

/// A module some of whose own parameters or buffers stay float32 through dtype casts (their values must be exact:
/// FP8 scaling state, QAT steps, a converted layer's scales): its Module::to(dtype) and mixprec::apply leave them
/// float32 (moved with the module only), as Python's layers keep them through `.to(dtype)` and Policy.apply.
class KeepsFp32 {
 public:
  virtual ~KeepsFp32() = default;
  /// Whether the module's own parameter or buffer `name` stays float32.
  virtual bool keeps_fp32(const std::string& name) const = 0;
  /// Called after mixprec::apply cast some of the module's parameters (as the layer's own to(dtype) does what it
  /// needs after a cast): a QAT layer's weight gradient takes the weight's new dtype.
  virtual void dtype_changed() {}

 protected:
  /// Module::to(dtype) for `self` except what keeps_fp32 names, and, as Python's `.to(dtype)`, only floating-point
  /// tensors (integer codes stay integers); children take their own to(dtype).
  void cast_keeping_fp32(torch::nn::Module& self, torch::Dtype dtype, bool non_blocking) const;
};

/// torch::nn::Cloneable<Derived> for the layers that keep some tensors float32: its to(dtype) casts the rest
/// (cast_keeping_fp32) and then calls dtype_changed(); device moves are Module::to's. One definition of to() for
/// every such layer.
template <class Derived>
class CloneableKeepingFp32 : public torch::nn::Cloneable<Derived>, public KeepsFp32 {
 public:
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override {
    torch::nn::Module::to(device, non_blocking);  // everything moves
    to(dtype, non_blocking);                      // then the dtype, as this layer casts
  }
  void to(torch::Dtype dtype, bool non_blocking = false) override {
    cast_keeping_fp32(*this, dtype, non_blocking);
    dtype_changed();
  }
};

/// Drop-in for torch::nn::LinearImpl (same options, parameter names, initialisation and state dict)
/// whose forward is mixprec::nn::linear.
class LinearImpl : public torch::nn::Cloneable<LinearImpl> {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  explicit LinearImpl(const torch::nn::LinearOptions& options);
  /// Takes over `other`'s parameters (the same tensors, not copies): converts an existing layer in
  /// place of a model, keeping optimizers that already hold the tensors valid.
  explicit LinearImpl(const torch::nn::LinearImpl& other);

  void reset() override;
  /// torch::nn::Linear's initialisation: kaiming-uniform weight, uniform(+-1/sqrt(in)) bias.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  /// Module::to, then the weight's gradient dtype as the layer keeps it, as Python's mixprec.nn.Linear: fp32 for
  /// a 16- or 32-bit weight, float64 for a float64 one (a gradient there converted).
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  torch::Tensor forward(const torch::Tensor& input);

  /// The fp32 weight gradient (the weight's gradient; undefined before the first backward).
  const torch::Tensor& main_grad() const { return weight.grad(); }

  torch::nn::LinearOptions options;
  torch::Tensor weight;
  torch::Tensor bias;
};

TORCH_MODULE(Linear);

/// A weight quantized for float8_linear: the forward operand and its transpose (the input-gradient operand),
/// each with its scale inverses, and for per-tensor recipes the amax it was scaled from.
struct Float8WeightCache {
  torch::Tensor data, scale_inv;
  torch::Tensor data_t, scale_inv_t;
  torch::Tensor amax;
  /// The dtype the weight was quantized in (autocast's, or its own): a call that computes in another is refused.
  at::ScalarType dtype = at::ScalarType::Undefined;
  bool empty() const { return !data.defined(); }
};

/// `input @ weight^T + bias` through FP8 GEMMs: the input and the weight are quantized to
/// recipe.forward_dtype, the output gradient to recipe.backward_dtype, each scaled as the recipe says, and
/// all three products (output, input gradient, weight gradient) are mixprec::fp8::gemm calls with fp32
/// accumulation. The weight keeps its storage dtype (the optimizer's fp32 masters stay the source of truth);
/// the weight gradient is fp32 and, as in mixprec::nn::linear, is added into an fp32 `weight.grad()` in
/// place (beta = 1) in a plain backward. `state` is updated in place (Delayed). Under autocast the output
/// and the input gradient take the autocast dtype. On CUDA every GEMM dimension (tokens, in and out
/// features) must be a multiple of 16. The same function is Python's mixprec.nn.float8_linear.
///
/// `cache` keeps the quantized weight across gradient-accumulation micro-batches (the weight does not change
/// between them): an empty cache is filled by the call, a filled one is used instead of the weight, which
/// is then not read at all (delayed scaling still records the cached amax, so the window evolves as without
/// the cache). Refilling it after each optimizer step is the caller's part; Float8Linear's forward does it
/// with `is_first_microbatch`.
///
/// `update_state` false (Float8Linear in evaluation mode) reads delayed scaling's state without updating the
/// scales or recording amaxes, as BatchNorm's eval mode reads its running statistics: the forward's, and the
/// backward's when gradients are taken through it (input gradients of a model in eval mode). A forward
/// that runs inside a backward (activation checkpointing's recomputation) reads it so too, whatever
/// `update_state` says: it quantizes as the original forward did and records nothing twice. With
/// `state.turn` (make_scaling_state's) the forward's scales move only at the first forward after a backward and
/// the backward's at the first backward after a forward, so a layer called twice before its backward
/// quantizes both calls alike (and so does their recomputation).
torch::Tensor float8_linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
                            const fp8::ScalingState& state, const fp8::Recipe& recipe = {},
                            Float8WeightCache* cache = nullptr, bool update_state = true);

/// A Linear whose forward is float8_linear: same options, parameters and initialisation as
/// torch::nn::Linear, plus the recipe's scaling state as buffers ("fp8_forward_amax_history", ...), so a
/// state dict holds it as plain tensors and resuming is exact.
class Float8LinearImpl : public CloneableKeepingFp32<Float8LinearImpl> {
 public:
  Float8LinearImpl(int64_t in_features, int64_t out_features, fp8::Recipe recipe = {})
      : Float8LinearImpl(torch::nn::LinearOptions(in_features, out_features), std::move(recipe)) {}
  explicit Float8LinearImpl(const torch::nn::LinearOptions& options, fp8::Recipe recipe = {});
  /// Takes over `other`'s parameters (the same tensors, not copies), as LinearImpl's converting constructor.
  explicit Float8LinearImpl(const torch::nn::LinearImpl& other, fp8::Recipe recipe = {});

  void reset() override;
  /// torch::nn::Linear's initialisation, and the scaling state back to its initial values (as BatchNorm's
  /// reset_parameters resets its running statistics).
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  /// `is_first_microbatch` (Transformer Engine's argument): unset, the weight is quantized on every call;
  /// true, it is quantized and kept in `weight_cache`; false, the kept one is used. Pass true on the first
  /// micro-batch after each optimizer step and false on the others of a gradient-accumulation cycle.
  /// The first evaluation forward of a delayed-scaling layer whose state never recorded an amax warns (one host
  /// read): it quantizes with the initial scale 1.
  torch::Tensor forward(const torch::Tensor& input, std::optional<bool> is_first_microbatch = std::nullopt);
  /// The scaling state ("fp8_*" buffers).
  bool keeps_fp32(const std::string& name) const override;
  /// After a cast (to(dtype), mixprec::apply): the kept quantized weight is stale. The scaling state stays fp32
  /// (its values exact) and follows device moves only.
  void dtype_changed() override;
  using CloneableKeepingFp32<Float8LinearImpl>::to;
  /// Module::to, and the kept quantized weight (made on the old device) goes.
  void to(torch::Device device, bool non_blocking = false) override;
  /// Module::load, except that an archive without the scaling state (a torch::nn::Linear's: pretrained
  /// weights) starts from the initial state (what the layer recorded belonged to its old weights, and after
  /// deferred initialisation it is uninitialised memory), as Python's load_state_dict does; one with part of it
  /// is refused.
  void load(torch::serialize::InputArchive& archive) override;

  torch::nn::LinearOptions options;
  fp8::Recipe recipe;
  torch::Tensor weight;
  torch::Tensor bias;
  fp8::ScalingState state;
  Float8WeightCache weight_cache;  // not state: a function of the weight; emptied by to()
  bool eval_checked = false;       // the first evaluation forward looked at the scaling state (see forward)
  /// With delayed scaling, training forwards with gradients enabled first MAX-reduce the amaxes the previous
  /// step recorded over this group (fp8::reduce_amax), so every data-parallel rank scales alike; unset, each
  /// rank scales by its own data. Every rank of the group must run those forwards. Not state: clone() shares
  /// it, and a state dict does not hold it.
  c10::intrusive_ptr<c10d::ProcessGroup> amax_group;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(std::optional<bool>())})

 private:
  void register_state();
  void reset_state();  // the initial scaling state, in the registered buffers
};

TORCH_MODULE(Float8Linear);

/// Which of an Int8Linear's three GEMMs run in INT8 (the others run in the input's dtype, the weight
/// gradient with fp32 products and sums as in mixprec::nn::linear). The default is SwitchBack's: INT8
/// forward and input gradient, the weight gradient in 16 bits (its sum over tokens is where INT8 hurts).
struct Int8Gemms {
  bool forward = true;
  bool input_grad = true;
  bool weight_grad = false;
};

/// A weight quantized for int8_linear, kept across gradient-accumulation micro-batches: the forward operand
/// (codes [out, in] per output channel, scale inverses [out, 1]) where the forward GEMM is INT8, and the
/// input-gradient operand (codes [out, in] per input channel, scale inverses [1, in]) where that GEMM is.
struct Int8WeightCache {
  torch::Tensor data, scale_inv;
  torch::Tensor data_t, scale_inv_t;
  bool filled = false;  // a layer with no INT8 weight operand fills it with nothing
  /// The dtype the weight was quantized in (autocast's, or its own): a call that computes in another is refused.
  at::ScalarType dtype = at::ScalarType::Undefined;
  bool empty() const { return !filled; }
};

/// `input @ weight^T + bias` with INT8 GEMMs (int32 sums, fp32 dequantization): each GEMM's operands are
/// quantized row-wise along the summed dimension (tokens and output channels for the output, tokens and input
/// channels for the input gradient, output and input channels for an INT8 weight gradient), per call, from
/// their own amax. The weight keeps its dtype and gets an fp32 gradient, added into an fp32 `weight.grad()`
/// in place in a plain backward, as mixprec::nn::linear does. Under autocast the operands take the autocast
/// dtype first. On CUDA the in and out features must be multiples of 8 (an INT8 weight gradient also needs a
/// token count that is one; other batches take the 16-bit GEMM for it). The same function is Python's
/// mixprec.nn.int8_linear.
///
/// `cache` keeps the quantized weight across gradient-accumulation micro-batches, as float8_linear's does: an
/// empty cache is filled by the call (both INT8 operands, quantized from the weight in the autocast dtype),
/// a filled one is used instead, and the weight is then read only by the GEMMs that are not INT8.
/// Refilling it after each optimizer step is the caller's part; Int8Linear's forward does it with
/// `is_first_microbatch`.
torch::Tensor int8_linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias = {},
                          const Int8Gemms& gemms = {}, Int8WeightCache* cache = nullptr);

/// A Linear whose forward is int8_linear: same options, parameters, initialisation and state dict as
/// torch::nn::Linear.
class Int8LinearImpl : public torch::nn::Cloneable<Int8LinearImpl> {
 public:
  Int8LinearImpl(int64_t in_features, int64_t out_features, Int8Gemms gemms = {})
      : Int8LinearImpl(torch::nn::LinearOptions(in_features, out_features), gemms) {}
  explicit Int8LinearImpl(const torch::nn::LinearOptions& options, Int8Gemms gemms = {});
  /// Takes over `other`'s parameters (the same tensors, not copies), as LinearImpl's converting constructor.
  explicit Int8LinearImpl(const torch::nn::LinearImpl& other, Int8Gemms gemms = {});

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  /// `is_first_microbatch` as in Float8Linear: unset, the weight is quantized on every call; true, it is
  /// quantized and kept in `weight_cache`; false, the kept one is used.
  torch::Tensor forward(const torch::Tensor& input, std::optional<bool> is_first_microbatch = std::nullopt);
  /// Module::to, and the weight cache is dropped (it was quantized from the weight before the move or cast).
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;
  /// Module::load, and the weight cache is dropped (quantized from the weight before the load).
  void load(torch::serialize::InputArchive& archive) override;

  torch::nn::LinearOptions options;
  Int8Gemms gemms;
  torch::Tensor weight;
  torch::Tensor bias;
  Int8WeightCache weight_cache;  // not state: a function of the weight

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(std::optional<bool>())})
};

TORCH_MODULE(Int8Linear);

}  // namespace mixprec::nn
