// mixprec::nn::int8_linear: the one implementation of the INT8 linear layer behind both front doors:
// mixprec::nn::Int8Linear (C++) and mixprec.nn.Int8Linear (Python, through the op mixprec::int8_linear).
#include <ATen/autocast_mode.h>
#include <ATen/ops/_unsafe_view.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "mixprec/int8.h"
#include "mixprec/nn.h"
#include "mixprec/ops.h"
#include "nn/linear_detail.h"

namespace mixprec::nn {
namespace {

using namespace detail;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Row-wise along each GEMM's summed dimension: the scales factor out of every sum, so the int32 result
// dequantizes exactly with one factor per row of a and one per column of b.
int8::Quantized per_row(const torch::Tensor& m) { return int8::quantize(m, 1, -1); }
int8::Quantized per_column(const torch::Tensor& m) { return int8::quantize(m, -1, 1); }

// A filled cache must be this weight's: codes of its shape on its device, for each GEMM that is INT8.
void check_weight_cache(const Int8WeightCache& c, const torch::Tensor& weight, const Int8Gemms& gemms) {
  const auto fits = [&](const torch::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
    return t.defined() && t.sizes() == shape && t.scalar_type() == dtype && t.device() == weight.device();
  };
  const int64_t n = weight.dim() == 2 ? weight.size(0) : -1, k = weight.dim() == 2 ? weight.size(1) : -1;
  const bool ok = weight.dim() == 2 &&
                  (!gemms.forward || (fits(c.data, {n, k}, at::kChar) && fits(c.scale_inv, {n, 1}, at::kFloat))) &&
                  (!gemms.input_grad || (fits(c.data_t, {n, k}, at::kChar) && fits(c.scale_inv_t, {1, k}, at::kFloat)));
  TORCH_CHECK_VALUE(ok, "mixprec::int8_linear: the weight cache does not hold this weight's ", weight.sizes(),
                    " INT8 operands on ", weight.device(), " (forward ", c.data.defined() ? c.data.sizes() : at::IntArrayRef{},
                    ", input gradient ", c.data_t.defined() ? c.data_t.sizes() : at::IntArrayRef{},
                    "); fill it again (is_first_microbatch=true)");
}

struct Int8LinearFunction : public torch::autograd::Function<Int8LinearFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& maybe_bias, const torch::Tensor& probe,
                               bool int8_forward, bool int8_input_grad, bool int8_weight_grad,
                               Int8WeightCache* cache) {
    const torch::Tensor bias = maybe_bias.value_or(torch::Tensor());
    const std::optional<at::ScalarType> dtype = detail::autocast_dtype(input);
    const bool reuse = cache != nullptr && !cache->empty();
    // A reused weight is read only by a GEMM that is not INT8: the forward's here, the input gradient's in
    // backward (which casts it then).
    const bool cast_now = !reuse || !int8_forward;
    const torch::Tensor x = autocast_to(input, dtype), w = cast_now ? autocast_to(weight, dtype) : weight,
                        b = autocast_to(bias, dtype);
    const at::ScalarType w_dtype = cast_now ? w.scalar_type() : autocast_dtype_of(weight, dtype);
    check_8bit_operands("mixprec::int8_linear", "INT8", x, w, w_dtype);
    const torch::Tensor x2 = rows(x).contiguous();
    // The input-gradient operand: from the cache, or quantized now to fill it; else backward quantizes it.
    int8::Quantized qwt;
    if (reuse && int8_input_grad) {
      qwt = {cache->data_t, cache->scale_inv_t};
    } else if (cache != nullptr && int8_input_grad) {
      qwt = per_column(w);
    }
    torch::Tensor out;
    if (int8_forward) {
      int8::Quantized qw;
      if (reuse) {
        qw = {cache->data, cache->scale_inv};
      } else {
        qw = per_row(w);
      }
      std::optional<torch::Tensor> b_opt;
      if (b.defined()) b_opt = b;
      // x [m, k] @ w^T [k, n]: w's per-row scales are the columns' of the transposed view.
      const int8::Quantized qx = per_row(x2);
      out = int8::mm(qx.data, qw.data.t(), qx.scale_inv, qw.scale_inv.reshape_symint({1, w.sym_size(0)}),
                     x.scalar_type(), b_opt);
      if (cache != nullptr && !reuse) *cache = {qw.data, qw.scale_inv, qwt.data, qwt.scale_inv, true, w_dtype};
    } else {
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      out = at::linear(x2, w, b);
      if (cache != nullptr && !reuse) {
        *cache = {torch::Tensor(), torch::Tensor(), qwt.data, qwt.scale_inv, true, w_dtype};
      }
    }
    // A reused weight is saved as it is (not copied): backward casts it only if a 16-bit product needs it.
    // As torch's linear: the input only for a weight gradient, the weight only for an input gradient.
    // The input as the function got it (cast on the graph by int8_linear), so that a create_graph backward
    // reaches it; its rows are taken again in backward (a view, unless the input is not contiguous). The
    // weight's cast is made here, off the graph: a create_graph backward casts the weight itself again (a
    // parameter from saved_data["weight"], a computed weight saved as a variable), as Linear's does.
    const bool input_grad = input.requires_grad();
    const bool recast = input_grad && weight.requires_grad() && cast_now && !w.is_same(weight);
    ctx->save_for_backward({weight.requires_grad() ? x : torch::Tensor(), input_grad ? w : torch::Tensor(),
                            input_grad ? qwt.data : torch::Tensor(), input_grad ? qwt.scale_inv : torch::Tensor(),
                            recast && !weight.is_leaf() ? weight : torch::Tensor()});
    ctx->saved_data["recast_weight"] = recast;
    ctx->saved_data["dtype"] = x2.scalar_type();
    ctx->saved_data["cast_weight"] = !cast_now;
    if (dtype.has_value()) ctx->saved_data["autocast_dtype"] = *dtype;
    ctx->saved_data["weight"] = weight.is_leaf() ? weight : torch::Tensor();
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["probe_device"] = probe.device();
    ctx->saved_data["int8_input_grad"] = int8_input_grad;
    ctx->saved_data["int8_weight_grad"] = int8_weight_grad;
    // Not a view of the GEMM's result (as at::linear's own output): callers may write into it in place.
    return x.dim() == 2 ? out : at::_unsafe_view_symint(out, with_features(x, w.sym_size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();  // backward runs in grad mode only for create_graph
    const torch::Tensor x2 = saved[0].defined() ? rows(saved[0]).contiguous() : torch::Tensor();
    // The weight as the 16-bit products use it: a reused cache's weight was left uncast by forward, and under
    // create_graph the cast is made again from the weight, on the graph (with and without the cache alike), so
    // the second-order path reaches the weight.
    const auto weight_operand = [&]() -> torch::Tensor {
      std::optional<at::ScalarType> dtype;
      if (ctx->saved_data.count("autocast_dtype")) dtype = ctx->saved_data["autocast_dtype"].toScalarType();
      if (create_graph && ctx->saved_data["recast_weight"].toBool()) {
        const torch::Tensor source = saved[4].defined() ? saved[4] : ctx->saved_data["weight"].toTensor();
        if (source.defined()) return autocast_to(source, dtype);
      }
      if (!ctx->saved_data["cast_weight"].toBool()) return saved[1];
      return autocast_to(saved[1], dtype);
    };
    const at::ScalarType dtype = ctx->saved_data["dtype"].toScalarType();
    const torch::Tensor g2 = rows(grad_outputs[0].to(dtype)).contiguous();
    torch::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // Under create_graph the 16-bit product, which autograd can differentiate.
      if (ctx->saved_data["int8_input_grad"].toBool() && !at::GradMode::is_enabled()) {
        // g [m, n] @ w [n, k]: w quantized per column (its input channels), the summed n along each.
        const int8::Quantized qg = per_row(g2);
        const int8::Quantized qw = saved[2].defined() ? int8::Quantized{saved[2], saved[3]} : per_column(saved[1]);
        grad_input = int8::mm(qg.data, qw.data, qg.scale_inv, qw.scale_inv, dtype);
      } else {
        grad_input = g2.mm(weight_operand());
      }
      grad_input = grad_input.reshape_symint(with_features(grad_outputs[0], saved[1].sym_size(1)));
    }
    if (ctx->needs_input_grad(1)) {
      const torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      const c10::Device probe_device = ctx->saved_data["probe_device"].toDevice();
      const bool in_place = !at::GradMode::is_enabled() && weight.defined() && adds_in_place(weight, probe_device);
      // An INT8 weight gradient sums over tokens: on CUDA their count must be a multiple of 8 (cuBLASLt).
      const bool int8_wgrad = ctx->saved_data["int8_weight_grad"].toBool() && !at::GradMode::is_enabled() &&
                              (g2.device().is_cpu() || g2.sym_size(0) % 8 == 0);
      if (int8_wgrad) {
        // g^T [n, m] @ x [m, k], both quantized along the tokens m: g and x per column.
        const int8::Quantized qg = per_column(g2), qx = per_column(x2);
        const torch::Tensor dw =
            int8::mm(qg.data.t(), qx.data, qg.scale_inv.reshape_symint({g2.sym_size(1), 1}), qx.scale_inv, at::kFloat);
        if (in_place) {
          torch::Tensor& accumulator = weight.mutable_grad();
          if (accumulator.scalar_type() != at::kFloat) accumulator = accumulator.to(at::kFloat);
          accumulator.add_(dw);
          if (g2.device().type() != c10::kCPU) after_backward_wait_for(g2.device());
        } else {
          grad_weight = dw;
        }
      } else if (at::GradMode::is_enabled()) {  // double backward: differentiable, exact products, fp32 sums
        grad_weight = g2.t().to(at::kFloat).matmul(x2.to(at::kFloat));
      } else if (in_place) {
        torch::Tensor& accumulator = weight.mutable_grad();
        if (accumulator.scalar_type() != at::kFloat) accumulator = accumulator.to(at::kFloat);
        ops::linear_wgrad_accum_(accumulator, g2, x2);
        if (g2.device().type() != c10::kCPU) after_backward_wait_for(g2.device());
      } else {
        grad_weight = ops::linear_wgrad(g2, x2);
      }
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = g2.sum(0, false, at::kFloat);
    return {grad_input, grad_weight, grad_bias, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor int8_linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
                          const Int8Gemms& gemms, Int8WeightCache* cache) {
  if (cache != nullptr && !cache->empty()) {
    check_weight_cache(*cache, weight, gemms);
    detail::check_cache_dtype(cache->dtype, input, weight, "mixprec::int8_linear");
  }
  std::optional<torch::Tensor> maybe_bias;
  if (bias.defined()) maybe_bias = bias;
  return Int8LinearFunction::apply(detail::autocast_input(input), weight, maybe_bias, probe_input(weight),
                                   gemms.forward, gemms.input_grad, gemms.weight_grad, cache);
}

TORCH_LIBRARY_IMPL(mixprec, CompositeImplicitAutograd, m) {
  m.impl("int8_linear", [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool forward, bool input_grad, bool weight_grad) {
    return int8_linear(input, weight, bias.value_or(at::Tensor()), Int8Gemms{forward, input_grad, weight_grad});
  });
  m.impl("int8_linear_cached", [](const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, bool forward, bool input_grad,
                                  bool weight_grad, at::TensorList weight_cache) {
    TORCH_CHECK_VALUE(weight_cache.empty() || weight_cache.size() == 5,
                      "mixprec::int8_linear_cached: weight_cache must be empty (to fill) or the five tensors a fill "
                      "returned, got ", weight_cache.size());
    const bool fill = weight_cache.empty();
    Int8WeightCache cache;
    if (!fill) {
      // The fifth tensor is empty: its dtype is the one the weight was quantized in.
      cache = {weight_cache[0], weight_cache[1], weight_cache[2], weight_cache[3], true, weight_cache[4].scalar_type()};
    }
    at::Tensor out = int8_linear(input, weight, bias.value_or(at::Tensor()),
                                 Int8Gemms{forward, input_grad, weight_grad}, &cache);
    // A reused cache comes back empty (the op's outputs never alias its inputs). In a filled one, the operand
    // of a GEMM that is not INT8 travels as an empty tensor (a list cannot hold None).
    if (!fill) return std::make_tuple(out, std::vector<at::Tensor>{});
    std::vector<at::Tensor> filled{cache.data, cache.scale_inv, cache.data_t, cache.scale_inv_t};
    for (at::Tensor& t : filled) {
      if (!t.defined()) t = at::empty({0}, weight.options().dtype(at::kChar));
    }
    filled.push_back(at::empty({0}, weight.options().dtype(cache.dtype)));
    return std::make_tuple(out, std::move(filled));
  });
}

Int8LinearImpl::Int8LinearImpl(const torch::nn::LinearOptions& options_, Int8Gemms gemms_)
    : options(options_), gemms(gemms_) {
  reset();
}

Int8LinearImpl::Int8LinearImpl(const torch::nn::LinearImpl& other, Int8Gemms gemms_)
    : options(other.options), gemms(gemms_) {
  adopt_linear_parameters(*this, other, weight, bias);
  keep_fp32_grad(weight);
}

void Int8LinearImpl::reset() {
  weight_cache = {};
  register_linear_parameters(*this, options, weight, bias);
  keep_fp32_grad(weight);
}

void Int8LinearImpl::reset_parameters() {
  weight_cache = {};  // quantized from the old weight
  init_linear_parameters(weight, bias);
}

void Int8LinearImpl::load(torch::serialize::InputArchive& archive) {
  weight_cache = {};  // quantized from the weight the archive replaces
  torch::nn::Module::load(archive);
}

void Int8LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::nn::Int8Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias()
         << ", int8_forward=" << gemms.forward << ", int8_input_grad=" << gemms.input_grad
         << ", int8_weight_grad=" << gemms.weight_grad << ")";
}

void Int8LinearImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  weight_cache = {};
  torch::nn::Module::to(device, dtype, non_blocking);
}

void Int8LinearImpl::to(torch::Dtype dtype, bool non_blocking) {
  weight_cache = {};
  torch::nn::Module::to(dtype, non_blocking);
}

void Int8LinearImpl::to(torch::Device device, bool non_blocking) {
  weight_cache = {};
  torch::nn::Module::to(device, non_blocking);
}

torch::Tensor Int8LinearImpl::forward(const torch::Tensor& input, std::optional<bool> is_first_microbatch) {
  if (!is_first_microbatch.has_value()) return int8_linear(input, weight, bias, gemms);
  detail::prepare_weight_cache(weight_cache, *is_first_microbatch, "mixprec::nn::Int8Linear");
  return int8_linear(input, weight, bias, gemms, &weight_cache);
}

}  // namespace mixprec::nn
