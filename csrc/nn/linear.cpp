// mixprec::nn::linear: the one implementation of the fp32-weight-gradient linear layer, behind both front
// doors: mixprec::nn::Linear (C++) and mixprec.nn.Linear (Python, through the op mixprec::linear).
// mixprec::nn::float8_linear, its FP8 sibling, shares the weight-gradient accumulation: mixprec::nn::
// Float8Linear (C++) and mixprec.nn.Float8Linear (Python, through the op mixprec::float8_linear).
#include "mixprec/nn.h"

#include <ATen/autocast_mode.h>
#ifdef MIXPREC_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <ATen/ops/_unsafe_view.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>
#include <torch/nn/init.h>
#include <torch/serialize/input-archive.h>

#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/fp8.h"
#include "mixprec/ops.h"
#include "nn/linear_detail.h"

namespace mixprec::nn {
namespace detail {

torch::Tensor autocast_to(const torch::Tensor& t, std::optional<at::ScalarType> dtype) {
  if (!t.defined() || !dtype || !t.is_floating_point() || t.scalar_type() == *dtype ||
      t.scalar_type() == at::kDouble) {
    return t;
  }
  return t.to(*dtype);
}

std::optional<at::ScalarType> autocast_dtype(const torch::Tensor& t) {
  const c10::DeviceType type = t.device().type();
  if (!at::autocast::is_autocast_available(type) || !at::autocast::is_autocast_enabled(type)) return std::nullopt;
  return at::autocast::get_autocast_dtype(type);
}

torch::Tensor autocast_input(const torch::Tensor& input) { return autocast_to(input, autocast_dtype(input)); }

at::ScalarType autocast_dtype_of(const torch::Tensor& t, std::optional<at::ScalarType> dtype) {
  const at::ScalarType s = t.scalar_type();
  return dtype.has_value() && at::isFloatingType(s) && s != at::kDouble ? *dtype : s;
}

void check_cache_dtype(at::ScalarType cached, const torch::Tensor& input, const torch::Tensor& weight,
                       const char* op) {
  const at::ScalarType now = autocast_dtype_of(weight, autocast_dtype(input));
  TORCH_CHECK_VALUE(cached == now, op, ": the weight cache holds the weight quantized in ", cached,
                    ", and this call computes in ", now, " (autocast changed since the cache was filled); fill it "
                    "again (is_first_microbatch=true) in the same autocast state as the calls that reuse it");
}

void check_8bit_operands(const char* op, const char* format, const torch::Tensor& x, const torch::Tensor& w,
                         at::ScalarType w_dtype) {
  TORCH_CHECK(x.scalar_type() != at::kDouble && w_dtype != at::kDouble, op, ": float64 input or weight has no ",
              format, " path; use a float32/16-bit layer");
  TORCH_CHECK(x.is_floating_point() && at::isFloatingType(w_dtype), op,
              ": input and weight must be floating point, got ", x.scalar_type(), " and ", w_dtype);
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2 && x.sym_size(-1) == w.sym_size(1), op, ": input [..., ",
              w.dim() == 2 ? w.sym_size(1) : c10::SymInt(-1), "] and weight [out, in] do not match, got ",
              x.sym_sizes(), " and ", w.sym_sizes());
  TORCH_CHECK(x.scalar_type() == w_dtype, op, ": input and weight must share a dtype, got ", x.scalar_type(),
              " and ", w_dtype, " (run under autocast to cast both)");
}

bool is_subclass(const torch::Tensor& t) {
  return t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python);
}

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
    it->second.plain = torch::empty({0}, torch::TensorOptions().device(device));
  }
  return it->second;
}

const torch::Tensor& probe_input(const torch::Tensor& weight) {
  const Probe& probe = probe_for(weight.device());
  return weight.requires_grad() ? probe.leaf : probe.plain;
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

// Hooks on the weight's AccumulateGrad node (registered through grad_fn.next_functions, as apex-, Megatron- and
// DDP-style code does) must see each backward's gradient, and pre-hooks may replace it.
bool accumulator_has_hooks(const torch::Tensor& weight) {
  const auto node = torch::autograd::impl::try_get_grad_accumulator(weight);
  return node != nullptr &&
         (!node->pre_hooks().empty() || !node->tensor_pre_hooks().empty() || !node->post_hooks().empty());
}

bool adds_in_place(const torch::Tensor& weight, const c10::Device& device) {
  const torch::Tensor& grad = weight.grad();
  // Into an fp32 .grad, or a 16-bit one of a weight whose grad_dtype is fp32 (left there by another use,
  // converted to fp32 first). A 16-bit grad_dtype (a weight never converted, or one under DDP) keeps its
  // dtype, as autograd keeps it: the GEMM's result goes to autograd, which rounds it once.
  return grad.defined() && grad.is_floating_point() &&
         (grad.scalar_type() == at::kFloat || weight.grad_dtype() == at::kFloat) && grad.layout() == at::kStrided &&
         grad.is_contiguous() &&
         grad.sizes() == weight.sizes() && grad.device() == weight.device() && !is_subclass(grad) &&
         torch::autograd::impl::hooks(weight).empty() && !torch::autograd::impl::post_acc_grad_hooks(weight) &&
         !accumulator_has_hooks(weight) && in_plain_backward(device);
}

bool can_read(const torch::Tensor& t) {
  if (t.is_meta()) return false;
#ifdef MIXPREC_WITH_CUDA
  if (t.is_cuda()) {  // (the runtime call itself: torch 2.11's c10 has no per-stream helper)
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.get_device()), &status));
    return status == cudaStreamCaptureStatusNone;
  }
#endif
  return true;
}

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

// Symbolic sizes (sym_size, reshape_symint) throughout the layers' autograd functions: under torch.compile
// with dynamic shapes a plain size() materializes every size of the tensor, specializing the graph on the
// token count.
torch::Tensor rows(const torch::Tensor& t) {
  // -1 cannot be inferred when the last dimension is 0 (a layer with out_features=0): the leading ones are
  // multiplied out instead.
  if (t.sym_size(-1) == 0) return t.dim() >= 2 ? t.flatten(0, -2) : t.reshape({1, 0});
  return t.reshape_symint({-1, t.sym_size(-1)});
}

c10::SymDimVector with_features(const torch::Tensor& like, const c10::SymInt& features) {
  c10::SymDimVector shape(like.sym_sizes().begin(), like.sym_sizes().end());
  shape.back() = features;
  return shape;
}

}  // namespace detail

namespace {

using namespace detail;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  // The bias is optional<Tensor>: autograd::Function tracks an undefined plain Tensor as a variable and fails.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& maybe_bias, const torch::Tensor& probe) {
    const torch::Tensor bias = maybe_bias.value_or(torch::Tensor());
    // Autocast would cast inside at::linear and hide the 16-bit operands from backward: cast the weight here
    // with its rule (its gradient is then computed from the 16-bit operands, in fp32), and run at::linear with
    // autocast excluded. The input arrives cast already (linear() casts it on the graph, as autocast would).
    const std::optional<at::ScalarType> dtype = autocast_dtype(input);
    const torch::Tensor x = autocast_to(input, dtype), w = autocast_to(weight, dtype), b = autocast_to(bias, dtype);
    torch::Tensor output;
    {
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      output = at::linear(x, w, b);
    }
    // As torch's linear: the input only for a weight gradient, the weight only for an input gradient (a
    // frozen layer keeps no activations alive, and an in-place change to its input after forward is fine).
    // The weight's cast is made here, off the graph: a create_graph backward casts the weight itself again, so
    // the input gradient's second-order path reaches the weight. A parameter is kept as saved_data["weight"]
    // below (unchecked, as torch's autocast linear, which saves only the cast, would not notice an in-place
    // change to it either); a computed weight is saved as a variable.
    const bool input_grad = input.requires_grad();
    const bool recast = input_grad && weight.requires_grad() && !w.is_same(weight);
    ctx->save_for_backward({weight.requires_grad() ? x : torch::Tensor(), input_grad ? w : torch::Tensor(),
                            recast && !weight.is_leaf() ? weight : torch::Tensor()});
    ctx->saved_data["recast_weight"] = recast;
    ctx->saved_data["dtype"] = x.scalar_type();
    // The parameter itself, to reach its .grad (a leaf: no reference cycle through the graph).
    ctx->saved_data["weight"] = weight.is_leaf() ? weight : torch::Tensor();
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["probe_device"] = probe.device();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();  // backward runs in grad mode only for create_graph
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];  // undefined unless a weight gradient can be asked for
    const torch::Tensor& w = saved[1];  // undefined unless an input gradient can be asked for
    const at::ScalarType dtype = ctx->saved_data["dtype"].toScalarType();
    torch::Tensor go = grad_outputs[0];
    if (go.scalar_type() != dtype) go = go.to(dtype);
    torch::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // Under create_graph through the weight's own cast, which autograd differentiates.
      torch::Tensor w_op = w;
      if (create_graph && ctx->saved_data["recast_weight"].toBool()) {
        const torch::Tensor source = saved[2].defined() ? saved[2] : ctx->saved_data["weight"].toTensor();
        if (source.defined()) w_op = source.to(dtype);
      }
      grad_input = go.matmul(w_op);
    }
    if (ctx->needs_input_grad(1)) {
      const torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      const c10::Device probe_device = ctx->saved_data["probe_device"].toDevice();
      if (dtype == at::kDouble) {  // the GEMM op is for fp32 and narrower; fp64 stays fp64
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

// ---- FP8 -------------------------------------------------------------------------------------------------------

// One GEMM operand in FP8 with its dequantization factor.
struct Fp8Operand {
  torch::Tensor data;
  torch::Tensor scale_inv;
};

// Per-tensor FP8 of a [rows, cols] matrix and of its transpose (the same codes), from `scale`.
struct Fp8PerTensor {
  Fp8Operand rows, cols;  // rows: the matrix; cols: its transpose
  torch::Tensor amax;
};

Fp8PerTensor fp8_per_tensor(const torch::Tensor& m, const torch::Tensor& scale, const torch::Tensor& scale_inv,
                            at::ScalarType dtype) {
  const fp8::Quantized q = fp8::quantize(m, scale, dtype, {.transpose = true});
  // The cast saturates (delayed scales lag the data, so finite overflows must), which would turn an inf into
  // the largest code and hide an fp16 overflow from the loss scaler. The products must see it, as torch's
  // would: a non-finite amax makes the dequantization factor NaN (scale_inv + 0 * inf, one kernel: add's alpha
  // multiplies, it does not skip), and leaves it as it is otherwise (x + 0 is x).
  const torch::Tensor factor = at::add(scale_inv, q.amax, /*alpha=*/0);
  return {{q.data, factor}, {q.data_t, factor}, q.amax};
}

// Current scaling: the scale of `m`'s own amax, by the same rule (a one-row history) as delayed scaling.
Fp8PerTensor quantize_current(const torch::Tensor& m, at::ScalarType dtype, const fp8::Recipe& recipe) {
  const at::TensorOptions f = m.options().dtype(at::kFloat);
  // An empty tensor's amax is 0 (linalg_vector_norm has no identity for its inf norm).
  const torch::Tensor history = m.sym_numel() == 0 ? torch::zeros({1, 1}, f)
                                                   : at::linalg_vector_norm(m, INFINITY, {}, false, at::kFloat)
                                                         .reshape({1, 1});
  const torch::Tensor scale = torch::ones({1}, f), scale_inv = torch::empty({1}, f);
  fp8::update_scales_(history, scale, scale_inv, dtype, "max", recipe.margin, recipe.pow2_scales);
  return fp8_per_tensor(m, scale, scale_inv, dtype);
}

// Records `amax` into row 0 of column `j` of a delayed-scaling history: the max with what this turn recorded
// before (update_scales_ zeroes row 0, so the first call of a turn writes its own amax; NaN propagates). A
// recomputation that records again changes nothing.
void record_amax(const torch::Tensor& history, int64_t j, const torch::Tensor& amax) {
  torch::Tensor row = history.select(0, 0).narrow(0, j, 1);
  at::maximum_out(row, row, amax.reshape({1}));
}

// Delayed scaling of column `j` of a state whose scales the caller has just updated from the history (row
// 0: the previous turn's amax): quantize with scale[j], record this amax in row 0. `scale_inv` is the
// caller's snapshot of the state's scale_inv, taken once for all its columns after the update: the next
// update rewrites the state before a late backward runs.
Fp8PerTensor quantize_delayed(const torch::Tensor& m, const torch::Tensor& history, const torch::Tensor& scale,
                              const torch::Tensor& scale_inv, int64_t j, at::ScalarType dtype, bool record = true) {
  const Fp8PerTensor q = fp8_per_tensor(m, scale.narrow(0, j, 1), scale_inv.narrow(0, j, 1), dtype);
  if (record) record_amax(history, j, q.amax);
  return q;
}

// The state's turn, if it has one (a ScalingState built without it updates on every pass).
std::optional<torch::Tensor> turn_of(const torch::Tensor& turn) {
  return turn.defined() ? std::optional<torch::Tensor>(turn) : std::nullopt;
}

// The scaling blocks of a row-wise or block recipe ({rows, cols}; -1: the whole extent): rows for
// row-wise scaling; 1x128 for activations and gradients, 128x128 for weights in block scaling.
std::pair<int64_t, int64_t> scale_blocks(const fp8::Recipe& recipe, bool weight) {
  const bool rowwise = recipe.scaling == fp8::Scaling::Rowwise;
  return {rowwise || !weight ? 1 : 128, rowwise ? -1 : 128};
}

Fp8Operand quantize_blocks(const torch::Tensor& m, at::ScalarType dtype, bool weight, const fp8::Recipe& recipe) {
  const auto [block_rows, block_cols] = scale_blocks(recipe, weight);
  // Each block's scale comes from its own amax, so no finite value overflows: without saturation an inf stays
  // inf (E5M2) or becomes NaN (E4M3) and reaches the products, as in torch's, and a loss scaler sees it.
  const fp8::BlockQuantized q = fp8::quantize_blockwise(
      m, dtype, block_rows, block_cols,
      {.margin = recipe.margin, .pow2_scales = recipe.pow2_scales, .saturate = false});
  return {q.data, q.scale_inv};
}

bool per_tensor(const fp8::Recipe& recipe) {
  return recipe.scaling == fp8::Scaling::Delayed || recipe.scaling == fp8::Scaling::Current;
}

// The weight's two FP8 operands: `rows` for the forward product, `cols` (its transpose) for the input
// gradient. Per-tensor recipes get both from one pass; row and block scales run along k, so the transpose
// is quantized on its own.
struct Fp8Weight {
  Fp8Operand rows, cols;
  torch::Tensor amax;  // per-tensor recipes: what the pass measured (delayed scaling records it)
};

// `scale_inv`: delayed scaling's snapshot of the forward scale_inv (see quantize_delayed).
Fp8Weight quantize_weight(const torch::Tensor& w2, const fp8::ScalingState& state, const torch::Tensor& scale_inv,
                          const fp8::Recipe& recipe, bool want_cols, bool record) {
  if (recipe.scaling == fp8::Scaling::Delayed) {
    const auto h = quantize_delayed(w2, state.forward_amax_history, state.forward_scale, scale_inv, 1,
                                    recipe.forward_dtype, record);
    return {h.rows, h.cols, h.amax};
  }
  if (recipe.scaling == fp8::Scaling::Current) {
    const auto h = quantize_current(w2, recipe.forward_dtype, recipe);
    return {h.rows, h.cols, h.amax};
  }
  Fp8Weight q{quantize_blocks(w2, recipe.forward_dtype, true, recipe), {}, torch::Tensor()};
  if (want_cols) q.cols = quantize_blocks(w2.t().contiguous(), recipe.forward_dtype, true, recipe);
  return q;
}

// The scale-inverse shape quantize_weight gives a [rows, cols] operand: [1] per tensor, else one per block.
std::vector<int64_t> weight_scale_shape(int64_t rows, int64_t cols, const fp8::Recipe& recipe) {
  if (per_tensor(recipe)) return {1};
  const auto [br, bc] = scale_blocks(recipe, /*weight=*/true);
  const auto blocks = [](int64_t n, int64_t b) { return b < 0 ? 1 : (n + b - 1) / b; };
  return {blocks(rows, br), blocks(cols, bc)};
}

// A filled cache must be the weight's: both operands' shapes, format and device, the recipe's scale
// layout, and (delayed scaling) the amax it records.
void check_weight_cache(const nn::Float8WeightCache& c, const torch::Tensor& weight, const fp8::Recipe& recipe) {
  constexpr const char* op = "mixprec::float8_linear";
  const auto fits = [&](const torch::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
    return t.defined() && t.sizes() == shape && t.scalar_type() == dtype && t.device() == weight.device();
  };
  const int64_t n = weight.size(0), k = weight.size(1);
  const bool ok = weight.dim() == 2 && fits(c.data, {n, k}, recipe.forward_dtype) &&
                  fits(c.data_t, {k, n}, recipe.forward_dtype) &&
                  fits(c.scale_inv, weight_scale_shape(n, k, recipe), at::kFloat) &&
                  fits(c.scale_inv_t, weight_scale_shape(k, n, recipe), at::kFloat) &&
                  (recipe.scaling != fp8::Scaling::Delayed || (c.amax.defined() && c.amax.numel() == 1));
  TORCH_CHECK_VALUE(ok, op, ": the weight cache does not hold this weight's ", weight.sizes(), " ",
                    recipe.forward_dtype, " quantization on ", weight.device(), " for scaling \"",
                    fp8::scaling_name(recipe.scaling), "\" (got ", c.data.defined() ? c.data.sizes() : at::IntArrayRef{},
                    "); fill it again (is_first_microbatch=true)");
}

struct Float8LinearFunction : public torch::autograd::Function<Float8LinearFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& maybe_bias, const torch::Tensor& probe,
                               const fp8::ScalingState& state, const fp8::Recipe& recipe,
                               nn::Float8WeightCache* cache, bool input_grad, bool record, bool record_backward,
                               bool take_turn) {
    const torch::Tensor bias = maybe_bias.value_or(torch::Tensor());
    const std::optional<at::ScalarType> dtype = autocast_dtype(input);
    const bool reuse = cache != nullptr && !cache->empty();
    // A reused weight is not read at all: neither cast nor quantized again.
    const torch::Tensor x = autocast_to(input, dtype), w = reuse ? weight : autocast_to(weight, dtype),
                        b = autocast_to(bias, dtype);
    detail::check_8bit_operands("mixprec::float8_linear", "FP8", x, w,
                                reuse ? detail::autocast_dtype_of(weight, dtype) : w.scalar_type());
    const torch::Tensor x2 = rows(x).contiguous();
    Fp8Operand qx;
    torch::Tensor scale_inv;  // delayed scaling: this call's snapshot of the forward scale_inv
    if (recipe.scaling == fp8::Scaling::Delayed) {
      // Without `record` the forward state is read as it stands: neither updated nor recorded into.
      // With a turn, only the first forward after a backward moves the scales: a second call before the
      // backward (shared weights, summed micro-batch losses) quantizes as the first did, so a recomputation of
      // either, which reads the state as it stands, does too. A call that builds no backward (`take_turn`
      // false: frozen layers, no_grad) updates whenever due and leaves both sides due.
      if (record) {
        fp8::update_scales_(state.forward_amax_history, state.forward_scale, state.forward_scale_inv,
                            recipe.forward_dtype, recipe.amax_compute_algo, recipe.margin, recipe.pow2_scales,
                            turn_of(state.turn), /*side=*/0, take_turn);
      }
      // Dequantized with the reciprocal of the scale it quantized with: the same bits as the state's scale_inv
      // (update_scales_ computes 1.0f / scale), and a consistent pair even when the buffers were averaged or
      // edited from outside (an EMA model's) and read without an update (evaluation).
      scale_inv = at::reciprocal(state.forward_scale);
    }
    // The input first, then the weight: delayed scaling records their amaxes in this order.
    Fp8PerTensor hx;
    if (recipe.scaling == fp8::Scaling::Delayed) {
      hx = quantize_delayed(x2, state.forward_amax_history, state.forward_scale, scale_inv, 0,
                            recipe.forward_dtype, record);
      qx = hx.rows;
    } else if (recipe.scaling == fp8::Scaling::Current) {
      hx = quantize_current(x2, recipe.forward_dtype, recipe);
      qx = hx.rows;
    } else {
      qx = quantize_blocks(x2, recipe.forward_dtype, false, recipe);
    }
    Fp8Weight qw;
    if (reuse) {
      qw = {{cache->data, cache->scale_inv}, {cache->data_t, cache->scale_inv_t}, cache->amax};
      // The history sees the weight's amax every call, as without the cache, so the window and the
      // scales evolve the same either way.
      if (recipe.scaling == fp8::Scaling::Delayed && record) record_amax(state.forward_amax_history, 1, cache->amax);
    } else {
      // The transpose serves the input gradient (and the cache). For row and block scales it costs a pass
      // and, held until backward, an FP8 copy of the weight: skipped without an input gradient.
      qw = quantize_weight(w.contiguous(), state, scale_inv, recipe, cache != nullptr || input_grad, record);
      if (cache != nullptr) {
        *cache = {qw.rows.data, qw.rows.scale_inv, qw.cols.data, qw.cols.scale_inv, qw.amax, w.scalar_type()};
      }
    }
    // What each product needs, as torch's linear saves it: the input's side only for a weight gradient, the
    // weight's only for an input gradient.
    const bool weight_grad = weight.requires_grad();
    const auto keep = [](bool needed, const torch::Tensor& t) { return needed ? t : torch::Tensor(); };
    if (per_tensor(recipe)) {
      ctx->save_for_backward({keep(weight_grad, hx.cols.data), keep(weight_grad, hx.cols.scale_inv),
                              keep(input_grad, qw.cols.data), keep(input_grad, qw.cols.scale_inv)});
    } else {
      // Row and block scales run along k: the input-gradient product pairs the output gradient with the
      // weight's transpose (quantized with the weight), the weight gradient needs the input scaled along
      // the other axis, so backward quantizes the saved input again.
      ctx->save_for_backward({keep(weight_grad, x2), keep(input_grad, qw.cols.data), keep(input_grad, qw.cols.scale_inv)});
    }
    std::optional<torch::Tensor> b_opt;
    if (b.defined()) b_opt = b;
    torch::Tensor out = fp8::gemm(qx.data, qw.rows.data, qx.scale_inv, qw.rows.scale_inv, x.scalar_type(), b_opt,
                                  recipe.fast_accum);
    ctx->saved_data["weight"] = weight.is_leaf() ? weight : torch::Tensor();
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["probe_device"] = probe.device();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["backward_amax_history"] = state.backward_amax_history;
    ctx->saved_data["backward_scale"] = state.backward_scale;
    ctx->saved_data["backward_scale_inv"] = state.backward_scale_inv;
    ctx->saved_data["turn"] = state.turn;
    ctx->saved_data["record_backward"] = record_backward;
    ctx->saved_data["scaling"] = static_cast<int64_t>(recipe.scaling);
    ctx->saved_data["forward_dtype"] = recipe.forward_dtype;
    ctx->saved_data["backward_dtype"] = recipe.backward_dtype;
    ctx->saved_data["algo"] = recipe.amax_compute_algo;
    ctx->saved_data["margin"] = recipe.margin;
    ctx->saved_data["pow2_scales"] = recipe.pow2_scales;
    // Not a view of the GEMM's result (as at::linear's own output): callers may write into it in place.
    return x.dim() == 2 ? out : at::_unsafe_view_symint(out, with_features(x, w.sym_size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Backward runs in grad mode only for create_graph: the FP8 products below are not differentiable, so a
    // second-order gradient through them would silently be zero.
    TORCH_CHECK(!at::GradMode::is_enabled(), "mixprec::float8_linear: a double backward (create_graph=True, e.g. a ",
                "gradient penalty) cannot pass through an FP8 layer, whose backward GEMMs are not differentiable; "
                "keep this layer out of FP8 (convert's filter=) or compute the penalty without create_graph");
    fp8::Recipe recipe;
    recipe.scaling = static_cast<fp8::Scaling>(ctx->saved_data["scaling"].toInt());
    recipe.forward_dtype = ctx->saved_data["forward_dtype"].toScalarType();
    recipe.backward_dtype = ctx->saved_data["backward_dtype"].toScalarType();
    recipe.amax_compute_algo = ctx->saved_data["algo"].toStringRef();
    recipe.margin = ctx->saved_data["margin"].toInt();
    recipe.pow2_scales = ctx->saved_data["pow2_scales"].toBool();
    const at::ScalarType x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor go = grad_outputs[0].to(x_dtype);
    const torch::Tensor g2 = rows(go).contiguous();
    // The three quantized views of the output gradient and what the two products pair them with.
    Fp8Operand g, gt, wt, xt;
    if (per_tensor(recipe)) {
      Fp8PerTensor hg;
      if (recipe.scaling == fp8::Scaling::Delayed) {
        const torch::Tensor history = ctx->saved_data["backward_amax_history"].toTensor();
        const torch::Tensor scale = ctx->saved_data["backward_scale"].toTensor();
        const torch::Tensor scale_inv = ctx->saved_data["backward_scale_inv"].toTensor();
        // Without record_backward (a backward through an evaluation forward) the state is read as it stands.
        const bool record_backward = ctx->saved_data["record_backward"].toBool();
        // With a turn, only the first backward after a forward moves the scales (a retained graph
        // backpropagated twice quantizes both output gradients alike).
        if (record_backward) {
          fp8::update_scales_(history, scale, scale_inv, recipe.backward_dtype, recipe.amax_compute_algo,
                              recipe.margin, recipe.pow2_scales, turn_of(ctx->saved_data["turn"].toTensor()),
                              /*side=*/1);
        }
        hg = quantize_delayed(g2, history, scale, scale_inv.clone(), 0, recipe.backward_dtype, record_backward);
      } else {
        hg = quantize_current(g2, recipe.backward_dtype, recipe);
      }
      g = hg.rows;
      gt = hg.cols;
      xt = {saved[0], saved[1]};
      wt = {saved[2], saved[3]};
    } else {
      const torch::Tensor& x2 = saved[0];
      g = quantize_blocks(g2, recipe.backward_dtype, false, recipe);
      wt = {saved[1], saved[2]};
      if (ctx->needs_input_grad(1)) {
        gt = quantize_blocks(g2.t().contiguous(), recipe.backward_dtype, false, recipe);
        xt = quantize_blocks(x2.t().contiguous(), recipe.forward_dtype, false, recipe);
      }
    }
    torch::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // dL/dx [m, k] = g [m, n] @ w [n, k] = gemm(g, w^T as [k, n]).
      // Back in the input's shape: the output gradient's leading dimensions, the weight's k features.
      grad_input = fp8::gemm(g.data, wt.data, g.scale_inv, wt.scale_inv, x_dtype)
                       .reshape_symint(with_features(go, wt.data.sym_size(0)));
    }
    if (ctx->needs_input_grad(1)) {
      // dL/dw [n, k] = g^T [n, m] @ x [m, k] = gemm(g^T, x^T as [k, m]), fp32.
      const torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      const c10::Device probe_device = ctx->saved_data["probe_device"].toDevice();
      if (!at::GradMode::is_enabled() && weight.defined() && adds_in_place(weight, probe_device)) {
        torch::Tensor& accumulator = weight.mutable_grad();
        if (accumulator.scalar_type() != at::kFloat) accumulator = accumulator.to(at::kFloat);
        fp8::gemm_accum_(accumulator, gt.data, xt.data, gt.scale_inv, xt.scale_inv);  // beta = 1
        if (go.device().type() != c10::kCPU) after_backward_wait_for(go.device());
      } else {
        grad_weight = fp8::gemm(gt.data, xt.data, gt.scale_inv, xt.scale_inv, at::kFloat);
      }
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = g2.sum(0, /*keepdim=*/false, at::kFloat);
    }
    // One per forward argument: input, weight, bias, probe, state, recipe, cache, input_grad, record,
    // record_backward, take_turn.
    return {grad_input,      grad_weight,     grad_bias,       torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

namespace detail {

void init_linear_parameters(const torch::Tensor& weight, const torch::Tensor& bias) {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const auto fans = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    const double bound = std::get<0>(fans) > 0 ? 1.0 / std::sqrt(static_cast<double>(std::get<0>(fans))) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

void register_linear_parameters(torch::nn::Module& m, const torch::nn::LinearOptions& options, torch::Tensor& weight,
                                torch::Tensor& bias) {
  weight = m.register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
  bias = options.bias() ? m.register_parameter("bias", torch::empty(options.out_features()))
                        : m.register_parameter("bias", {}, /*requires_grad=*/false);
  init_linear_parameters(weight, bias);
}

void adopt_linear_parameters(torch::nn::Module& m, const torch::nn::LinearImpl& other, torch::Tensor& weight,
                             torch::Tensor& bias) {
  weight = m.register_parameter("weight", other.weight);
  bias = m.register_parameter("bias", other.bias, /*requires_grad=*/other.bias.defined() && other.bias.requires_grad());
}

}  // namespace detail

using namespace detail;

void keep_fp32_grad(const torch::Tensor& weight) {
  // Frozen weights too: a layer frozen when converted and unfrozen later (fine-tuning schedules) still gets fp32
  // gradients, since the grad_dtype set now stays through requires_grad_(true).
  if (!weight.is_leaf() || weight.is_inference() || !weight.is_floating_point() || is_subclass(weight) ||
      weight.scalar_type() == at::kDouble) {
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

void own_dtype_grad(const torch::Tensor& weight) {
  if (!weight.is_leaf()) return;
  auto& w = const_cast<torch::Tensor&>(weight);
  const torch::Tensor grad = weight.grad().defined() ? weight.grad().to(weight.scalar_type()) : torch::Tensor();
  if (grad.defined()) w.mutable_grad() = torch::Tensor();  // no gradient of the other dtype while grad_dtype changes
  weight.set_grad_dtype(weight.scalar_type());             // (none would allow any dtype)
  if (grad.defined()) w.mutable_grad() = grad;
}

torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias) {
  // What the fp32 weight-gradient GEMM does not cover computes as torch's linear: complex layers (the GEMM is
  // real; a complex input gradient needs the conjugate weight), the meta device (shape inference; autocast has
  // no state there) and nested inputs.
  if (weight.is_complex() || input.is_complex() || weight.is_meta() || input.is_meta() || input.is_nested()) {
    return at::linear(input, weight, bias);
  }
  if (weight.is_leaf() && weight.requires_grad() && weight.scalar_type() == at::kDouble &&
      weight.grad_dtype() == at::kFloat) {
    own_dtype_grad(weight);  // converted in fp32, cast to fp64 since: gradients in fp64 again
  }
  std::optional<torch::Tensor> maybe_bias;
  if (bias.defined()) maybe_bias = bias;
  return LinearFunction::apply(autocast_input(input), weight, maybe_bias, probe_input(weight));
}

torch::Tensor float8_linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
                            const fp8::ScalingState& state, const fp8::Recipe& recipe, Float8WeightCache* cache,
                            bool update_state) {
  constexpr const char* op = "mixprec::float8_linear";
  fp8::check_recipe(recipe);
  if (recipe.scaling == fp8::Scaling::Delayed) {
    const std::pair<const torch::Tensor*, const char*> parts[] = {
        {&state.forward_amax_history, "forward_amax_history"}, {&state.forward_scale, "forward_scale"},
        {&state.forward_scale_inv, "forward_scale_inv"},       {&state.backward_amax_history, "backward_amax_history"},
        {&state.backward_scale, "backward_scale"},             {&state.backward_scale_inv, "backward_scale_inv"}};
    for (const auto& [t, name] : parts) {
      // sym_numel: under torch.compile with dynamic shapes the state's sizes may be symbolic.
      TORCH_CHECK(t->defined() && t->sym_numel() != 0, op, ": delayed scaling needs its state; ", name,
                  " is empty (make it with mixprec::fp8::make_scaling_state)");
      TORCH_CHECK(t->device() == input.device(), op, ": ", name, " is on ", t->device(), " but input is on ",
                  input.device(), " (move the layer with its buffers)");
    }
    TORCH_CHECK(!state.turn.defined() || state.turn.device() == input.device(), op, ": turn is on ",
                state.turn.device(), " but input is on ", input.device(), " (move the layer with its buffers)");
    TORCH_CHECK(state.forward_amax_history.dim() == 2 && state.forward_amax_history.size(1) == 2 &&
                    state.backward_amax_history.dim() == 2 && state.backward_amax_history.size(1) == 1,
                op, ": the amax histories must be [history, 2] (forward) and [history, 1] (backward), got ",
                state.forward_amax_history.sizes(), " and ", state.backward_amax_history.sizes());
  }
  if (cache != nullptr && !cache->empty()) {
    check_weight_cache(*cache, weight, recipe);
    check_cache_dtype(cache->dtype, input, weight, "mixprec::float8_linear");
  }
  std::optional<torch::Tensor> maybe_bias;
  if (bias.defined()) maybe_bias = bias;
  // Grad mode is off inside the autograd function's forward: whether backward will want an input gradient
  // is decided here.
  const bool input_grad = at::GradMode::is_enabled() && input.requires_grad();
  // A forward that runs inside a backward is activation checkpointing's recomputation (torch.utils.checkpoint,
  // reentrant or not): it must quantize as the original forward did, with the scales that forward set, and
  // must not record its amaxes a second time. So it reads the forward state without updating it, as an
  // evaluation forward (update_state false) does; the backward that follows still updates its own state.
  // A backward through an evaluation forward (input gradients of a model in eval mode) updates nothing.
  const bool record = update_state && torch::autograd::get_current_graph_task_id() == -1;
  // Only a call that builds a backward takes the forward's turn (a frozen layer, or one under no_grad, would
  // otherwise hold it, and the forward scales would never move again). The original forward of reentrant
  // checkpointing runs under no_grad too: it updates as every such pass does, and marks the backward due.
  const bool take_turn = at::GradMode::is_enabled() &&
                         (input.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  return Float8LinearFunction::apply(input, weight, maybe_bias, probe_input(weight), state, recipe,
                                     cache, input_grad, record, update_state, take_turn);
}

namespace {

// The recipe of the ops' arguments (Python's mixprec.fp8.Recipe, flattened).
fp8::Recipe op_recipe(const fp8::ScalingState& state, c10::string_view scaling, at::ScalarType forward_dtype,
                      at::ScalarType backward_dtype, c10::string_view amax_compute_algo, int64_t margin,
                      bool pow2_scales, bool fast_accum) {
  fp8::Recipe recipe;
  recipe.scaling = fp8::parse_scaling(std::string_view(scaling.data(), scaling.size()));
  recipe.forward_dtype = forward_dtype;
  recipe.backward_dtype = backward_dtype;
  // Only delayed scaling's state carries a window; the other recipes keep the default (they do not use it).
  if (state.forward_amax_history.dim() == 2) recipe.amax_history_len = state.forward_amax_history.size(0);
  recipe.amax_compute_algo = std::string(amax_compute_algo.data(), amax_compute_algo.size());
  recipe.margin = margin;
  recipe.pow2_scales = pow2_scales;
  recipe.fast_accum = fast_accum;
  return recipe;
}

}  // namespace

// Above autograd (CompositeImplicitAutograd): the autograd function records its own node, and Python's
// mixprec.nn.linear / keep_fp32_grad are these very functions.
TORCH_LIBRARY_IMPL(mixprec, CompositeImplicitAutograd, m) {
  m.impl("linear", [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    return linear(input, weight, bias.value_or(at::Tensor()));
  });
  m.impl("keep_fp32_grad_", [](const at::Tensor& weight) { keep_fp32_grad(weight); });
  m.impl("own_dtype_grad_", [](const at::Tensor& weight) { own_dtype_grad(weight); });
  m.impl("fp8_scaling_state", [](c10::string_view scaling, int64_t amax_history_len, const at::Tensor& like) {
    fp8::Recipe recipe;
    recipe.scaling = fp8::parse_scaling(std::string_view(scaling.data(), scaling.size()));
    recipe.amax_history_len = amax_history_len;
    const fp8::ScalingState s = fp8::make_scaling_state(recipe, like.options());
    return std::vector<at::Tensor>{s.forward_amax_history,  s.forward_scale,  s.forward_scale_inv,
                                   s.backward_amax_history, s.backward_scale, s.backward_scale_inv, s.turn};
  });
  m.impl("float8_linear",
         [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const at::Tensor& forward_amax_history, const at::Tensor& forward_scale,
            const at::Tensor& forward_scale_inv, const at::Tensor& backward_amax_history,
            const at::Tensor& backward_scale, const at::Tensor& backward_scale_inv, c10::string_view scaling,
            at::ScalarType forward_dtype, at::ScalarType backward_dtype, c10::string_view amax_compute_algo,
            int64_t margin, bool pow2_scales, bool fast_accum, bool update_state,
            const std::optional<at::Tensor>& turn) {
           const fp8::ScalingState state{forward_amax_history,  forward_scale,  forward_scale_inv,
                                         backward_amax_history, backward_scale, backward_scale_inv,
                                         turn.value_or(at::Tensor())};
           return float8_linear(input, weight, bias.value_or(at::Tensor()), state,
                                op_recipe(state, scaling, forward_dtype, backward_dtype, amax_compute_algo, margin,
                                          pow2_scales, fast_accum),
                                nullptr, update_state);
         });
  m.impl("float8_linear_cached",
         [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const at::Tensor& forward_amax_history, const at::Tensor& forward_scale,
            const at::Tensor& forward_scale_inv, const at::Tensor& backward_amax_history,
            const at::Tensor& backward_scale, const at::Tensor& backward_scale_inv, c10::string_view scaling,
            at::ScalarType forward_dtype, at::ScalarType backward_dtype, c10::string_view amax_compute_algo,
            int64_t margin, bool pow2_scales, bool fast_accum, at::TensorList weight_cache, bool update_state,
            const std::optional<at::Tensor>& turn) {
           const fp8::ScalingState state{forward_amax_history,  forward_scale,  forward_scale_inv,
                                         backward_amax_history, backward_scale, backward_scale_inv,
                                         turn.value_or(at::Tensor())};
           TORCH_CHECK_VALUE(weight_cache.empty() || weight_cache.size() == 6,
                             "mixprec::float8_linear_cached: weight_cache must be empty (to fill) or the six "
                             "tensors a fill returned, got ", weight_cache.size());
           const bool fill = weight_cache.empty();
           Float8WeightCache cache;
           if (!fill) {
             // An undefined amax travels as an empty tensor (a list cannot hold None).
             cache = {weight_cache[0], weight_cache[1], weight_cache[2], weight_cache[3],
                      weight_cache[4].sym_numel() == 0 ? at::Tensor() : weight_cache[4],
                      weight_cache[5].scalar_type()};  // empty: its dtype is the one the weight was quantized in
           }
           at::Tensor out = float8_linear(input, weight, bias.value_or(at::Tensor()), state,
                                          op_recipe(state, scaling, forward_dtype, backward_dtype, amax_compute_algo,
                                                    margin, pow2_scales, fast_accum),
                                          &cache, update_state);
           // A reused cache comes back empty: the op's outputs never alias its inputs. A filled one's
           // per-tensor scale inverses are one tensor in C++; the list gets two.
           if (!fill) return std::make_tuple(out, std::vector<at::Tensor>{});
           const at::Tensor amax = cache.amax.defined() ? cache.amax : at::empty({0}, input.options().dtype(at::kFloat));
           const at::Tensor scale_inv_t =
               cache.scale_inv_t.is_same(cache.scale_inv) ? cache.scale_inv_t.clone() : cache.scale_inv_t;
           return std::make_tuple(out, std::vector<at::Tensor>{cache.data, cache.scale_inv, cache.data_t,
                                                               scale_inv_t, amax,
                                                               at::empty({0}, weight.options().dtype(cache.dtype))});
         });
}

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

LinearImpl::LinearImpl(const torch::nn::LinearImpl& other) : options(other.options) {
  adopt_linear_parameters(*this, other, weight, bias);
  keep_fp32_grad(weight);
}

void LinearImpl::reset() {
  register_linear_parameters(*this, options, weight, bias);
  keep_fp32_grad(weight);  // also for clone(), which calls reset() and copies the values in
}

void LinearImpl::reset_parameters() { init_linear_parameters(weight, bias); }

namespace {
// After a dtype cast: a float64 weight's gradient in float64 (torch's), any other weight's in fp32.
void layer_grad_dtype(const torch::Tensor& weight) {
  if (weight.scalar_type() == at::kDouble) {
    if (weight.is_leaf() && weight.grad_dtype() != at::kDouble) own_dtype_grad(weight);
  } else {
    keep_fp32_grad(weight);
  }
}
}  // namespace

void LinearImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  layer_grad_dtype(weight);
}

void LinearImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  layer_grad_dtype(weight);
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::nn::Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias() << ")";
}

torch::Tensor LinearImpl::forward(const torch::Tensor& input) { return linear(input, weight, bias); }

Float8LinearImpl::Float8LinearImpl(const torch::nn::LinearOptions& options_, fp8::Recipe recipe_)
    : options(options_), recipe(std::move(recipe_)) {
  fp8::check_recipe(recipe);
  reset();
}

Float8LinearImpl::Float8LinearImpl(const torch::nn::LinearImpl& other, fp8::Recipe recipe_)
    : options(other.options), recipe(std::move(recipe_)) {
  fp8::check_recipe(recipe);
  adopt_linear_parameters(*this, other, weight, bias);
  keep_fp32_grad(weight);
  register_state();
}

void Float8LinearImpl::register_state() {
  state = fp8::make_scaling_state(recipe, weight.options());
  state.forward_amax_history = register_buffer("fp8_forward_amax_history", state.forward_amax_history);
  state.forward_scale = register_buffer("fp8_forward_scale", state.forward_scale);
  state.forward_scale_inv = register_buffer("fp8_forward_scale_inv", state.forward_scale_inv);
  state.backward_amax_history = register_buffer("fp8_backward_amax_history", state.backward_amax_history);
  state.backward_scale = register_buffer("fp8_backward_scale", state.backward_scale);
  state.backward_scale_inv = register_buffer("fp8_backward_scale_inv", state.backward_scale_inv);
  state.turn = register_buffer("fp8_turn", state.turn);
}

void Float8LinearImpl::reset() {
  weight_cache = {};
  register_linear_parameters(*this, options, weight, bias);
  keep_fp32_grad(weight);
  register_state();
}

void Float8LinearImpl::reset_parameters() {
  init_linear_parameters(weight, bias);
  weight_cache = {};  // quantized from the old weight
  // The scaling state back to its initial values too, as BatchNorm's reset_parameters resets its running
  // statistics.
  reset_state();
}

void Float8LinearImpl::reset_state() {
  // In the registered buffers (`state` holds the same tensors), on their device.
  const fp8::ScalingState fresh = fp8::make_scaling_state(recipe, state.forward_scale.options());
  torch::NoGradGuard no_grad;
  state.forward_amax_history.copy_(fresh.forward_amax_history);
  state.forward_scale.copy_(fresh.forward_scale);
  state.forward_scale_inv.copy_(fresh.forward_scale_inv);
  state.backward_amax_history.copy_(fresh.backward_amax_history);
  state.backward_scale.copy_(fresh.backward_scale);
  state.backward_scale_inv.copy_(fresh.backward_scale_inv);
  state.turn.copy_(fresh.turn);
  eval_checked = false;  // an evaluation of the fresh state warns again
}

void Float8LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::nn::Float8Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias()
         << ", scaling=" << fp8::scaling_name(recipe.scaling) << ")";
}

void KeepsFp32::cast_keeping_fp32(torch::nn::Module& self, torch::Dtype dtype, bool non_blocking) const {
  torch::NoGradGuard no_grad;
  for (const auto& child : self.children()) child->to(dtype, non_blocking);
  const auto cast = [&](const torch::OrderedDict<std::string, torch::Tensor>& tensors) {
    for (const auto& item : tensors) {
      torch::Tensor t = item.value();
      if (t.defined() && at::isFloatingType(t.scalar_type()) && !keeps_fp32(item.key())) {
        t.set_data(t.to(dtype, non_blocking));
      }
    }
  };
  cast(self.named_parameters(/*recurse=*/false));
  cast(self.named_buffers(/*recurse=*/false));
}

bool Float8LinearImpl::keeps_fp32(const std::string& name) const { return name.rfind("fp8_", 0) == 0; }

void Float8LinearImpl::dtype_changed() { weight_cache = {}; }  // quantized from the weight before the cast

void Float8LinearImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  weight_cache = {};  // quantized on the old device
}

void Float8LinearImpl::load(torch::serialize::InputArchive& archive) {
  // Decided before anything is read into the layer (try_read into a fresh tensor only looks), by the rule
  // Python's Float8Linear follows.
  std::vector<int64_t> numels;
  std::vector<std::string> names;
  for (const auto& item : named_buffers(/*recurse=*/false)) {
    torch::Tensor probe;
    names.push_back(item.key());
    numels.push_back(archive.try_read(item.key(), probe, /*is_buffer=*/true) ? probe.numel() : -1);
  }
  const fp8::StateLoad plan = fp8::plan_state_load(recipe.scaling, numels, /*has_weight=*/true);
  if (plan == fp8::StateLoad::Partial) {
    std::string missing;
    for (size_t i = 0; i + 1 < numels.size(); ++i) {
      if (numels[i] < 0) missing += (missing.empty() ? "" : ", ") + names[i];
    }
    TORCH_CHECK(false, "mixprec::nn::Float8Linear::load: the archive holds part of the FP8 scaling state; missing: ",
                missing);
  }
  weight_cache = {};  // quantized from the weight the archive replaces
  for (auto& item : named_parameters(/*recurse=*/false)) archive.read(item.key(), item.value());
  // read() replaces a buffer's data in place (set_ / set_data), so `state` sees what was loaded.
  if (plan == fp8::StateLoad::Restart) reset_state();
  if (plan == fp8::StateLoad::Load || plan == fp8::StateLoad::InitialTurn) {
    for (auto& item : named_buffers(/*recurse=*/false)) {
      if (item.key() == "fp8_turn" && plan == fp8::StateLoad::InitialTurn) {
        torch::NoGradGuard no_grad;
        item.value().copy_(fp8::make_scaling_state(recipe, item.value().options()).turn);
      } else {
        archive.read(item.key(), item.value(), /*is_buffer=*/true);
      }
    }
  }
}

// Module::to() moves buffers with set_data, so `state` holds the registered buffers wherever they live.
torch::Tensor Float8LinearImpl::forward(const torch::Tensor& input, std::optional<bool> is_first_microbatch) {
  // Not in a recomputation inside backward (activation checkpointing): it reads the state without updating it,
  // and its collective would pair with whatever another rank reduces next.
  if (amax_group && recipe.scaling == fp8::Scaling::Delayed && is_training() && at::GradMode::is_enabled() &&
      torch::autograd::get_current_graph_task_id() == -1) {
    fp8::reduce_amax(state, *amax_group);
  }
  // In evaluation mode the scaling state is read, not updated (as BatchNorm's running statistics): a state that
  // never recorded an amax (a fresh layer, or one loaded from a checkpoint without it) scales by 1.
  if (!is_training() && recipe.scaling == fp8::Scaling::Delayed && !eval_checked &&
      detail::can_read(state.forward_amax_history)) {
    eval_checked = true;
    if (!state.forward_amax_history.any().item<bool>()) {
      TORCH_WARN("mixprec::nn::Float8Linear: evaluated with delayed scaling that has never recorded an amax (a "
                 "fresh layer, or one loaded from a checkpoint without its scaling state): it quantizes with scale "
                 "1, so values beyond the format's largest saturate. Train a step first, load the scaling state, "
                 "or evaluate with current scaling");
    }
  }
  if (!is_first_microbatch.has_value()) {
    return float8_linear(input, weight, bias, state, recipe, nullptr, is_training());
  }
  detail::prepare_weight_cache(weight_cache, *is_first_microbatch, "mixprec::nn::Float8Linear");
  return float8_linear(input, weight, bias, state, recipe, &weight_cache, is_training());
}

}  // namespace mixprec::nn
