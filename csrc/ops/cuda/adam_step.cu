// adam_step_ on CUDA: one multi-tensor launch per list of rows (param, grad, exp_avg, exp_avg_sq, master,
// step, and AMSGrad's max_exp_avg_sq, read only with AMSGrad), whatever the dtypes. Each block reads found_inf first and writes nothing on an overflow; each
// thread updates octets of eight elements with 4-element vector loads and stores where every array is
// aligned, one Philox call per octet for stochastic rounding. The element rule is adam_rule.h and the
// roundings are rounding.h, shared with the CPU. Step counts advance in a second small launch, so no
// block reads a count another block has already advanced; bias corrections come from the count on the
// device, so the whole step needs no host synchronisation (and can be captured in a CUDA graph). With a
// grad_scale, the gradients are stored back divided by it, as torch's fused optimizers leave them.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "ops/adam_plan.h"
#include "ops/adam_rule.h"
#include "ops/cast_plan.h"
#include "ops/cuda/multi_tensor_apply.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/rng.cuh"
#include "ops/philox.h"
#include "ops/rounding.h"

namespace mixprec::cuda {
namespace {

using detail::MasterMode;
using rounding::Mode;

constexpr int kThreads = 512;
constexpr int kLists = 7;             // param, grad, exp_avg, exp_avg_sq, master, step, max_exp_avg_sq
constexpr int kMaxTensors = 320;      // seven pointer lists: ~28 KB of kernel arguments
constexpr int kMaxTensorsSmall = 44;  // drivers limited to 4 KB of kernel arguments

struct LaunchArgs {
  double lr, beta1, beta2, eps, weight_decay;
  const float* lr_tensor;
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;
  bool decoupled, maximize, amsgrad;
  MasterMode mode;
  Mode rounding;
  at::PhiloxCudaState rng;
};

template <typename P>
__device__ __forceinline__ P write_param(float w, Mode mode, uint32_t draw) {
  if constexpr (std::is_same_v<P, float>) {
    return w;
  } else if constexpr (std::is_same_v<P, c10::Half>) {
    return mode == Mode::Stochastic ? rounding::to_half_stochastic(w, draw) : rounding::to_half_nearest(w);
  } else {
    return mode == Mode::Stochastic ? rounding::to_bfloat16_stochastic(w, draw) : rounding::to_bfloat16_nearest(w);
  }
}

template <typename P, typename G, typename M>
__device__ void adam_chunk(P* p, G* g, M* m1, M* m2, M* m3, void* master, int64_t n, const LaunchArgs& a,
                           const detail::AdamScalars& s, float scale, float clip, uint64_t seed, uint64_t offset,
                           uint64_t index0) {
  const bool vec = aligned4<P>(p) && aligned4<G>(g) && aligned4<M>(m1) && aligned4<M>(m2) &&
                   (!a.amsgrad || aligned4<M>(m3)) &&
                   (a.mode == MasterMode::None ||
                    (a.mode == MasterMode::Fp32 ? aligned4<float>(master) : aligned4<int16_t>(master)));
  const int64_t octets = (n + 7) / 8;
  for (int64_t o = threadIdx.x; o < octets; o += kThreads) {
    const int64_t i = o * 8;
    const bool full = vec && i + 8 <= n;
    float w[8], gv[8], mv[8], vv[8], xv[8];
    if (a.mode == MasterMode::Fp32) {
      load8(static_cast<const float*>(master), i, n, full, w);
    } else if (a.mode == MasterMode::Remainder) {
      if constexpr (std::is_same_v<P, c10::BFloat16>) {
        float rem[8];
        load8(static_cast<const int16_t*>(master), i, n, full, rem);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const uint16_t hi = i + k < n ? p[i + k].x : 0;
          w[k] = rounding::merge_bf16_remainder(hi, static_cast<int16_t>(rem[k]));
        }
      }
    } else {
      load8(p, i, n, full, w);
    }
    load8(g, i, n, full, gv);
    load8(m1, i, n, full, mv);
    load8(m2, i, n, full, vv);
    if (a.amsgrad) load8(m3, i, n, full, xv);
#pragma unroll
    for (int k = 0; k < 8; ++k) gv[k] = gv[k] / scale;  // divided as torch's fused Adam divides
    if (a.grad_scale != nullptr) {  // torch's fused optimizers leave the gradients unscaled
      G go[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) go[k] = static_cast<G>(gv[k]);
      store8(g, i, n, full, go);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) detail::adam_update(w[k], mv[k], vv[k], gv[k] * clip, s, a.amsgrad ? &xv[k] : nullptr);
    M mo[8], vo[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      mo[k] = static_cast<M>(mv[k]);
      vo[k] = static_cast<M>(vv[k]);
    }
    store8(m1, i, n, full, mo);
    store8(m2, i, n, full, vo);
    if (a.amsgrad) {
      M xo[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) xo[k] = static_cast<M>(xv[k]);
      store8(m3, i, n, full, xo);
    }
    if (a.mode == MasterMode::Remainder) {
      if constexpr (std::is_same_v<P, c10::BFloat16>) {
        P po[8];
        int16_t ro[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const rounding::SplitBFloat16 sp = rounding::split_bf16_remainder(w[k]);
          po[k] = c10::BFloat16(sp.bf16, c10::BFloat16::from_bits());
          ro[k] = sp.remainder;
        }
        store8(p, i, n, full, po);
        store8(static_cast<int16_t*>(master), i, n, full, ro);
      }
    } else {
      if (a.mode == MasterMode::Fp32) store8(static_cast<float*>(master), i, n, full, w);
      const uint64_t index = index0 + static_cast<uint64_t>(i);
      philox::Draw4 r{{0, 0, 0, 0}};
      if (a.rounding == Mode::Stochastic) r = philox::philox4x32_10(index / 8, offset, seed);
      P po[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) po[k] = write_param<P>(w[k], a.rounding, rounding::draw16(r.v, index + k));
      store8(p, i, n, full, po);
    }
  }
}

template <typename P, typename G>
__device__ void adam_moment(DType mt, void* p, void* g, void* m1, void* m2, void* m3, void* master, int64_t n,
                            const LaunchArgs& a, const detail::AdamScalars& s, float scale, float clip, uint64_t seed,
                            uint64_t offset, uint64_t index0) {
  if (mt == DType::BFloat16) {
    adam_chunk(static_cast<P*>(p), static_cast<G*>(g), static_cast<c10::BFloat16*>(m1),
               static_cast<c10::BFloat16*>(m2), static_cast<c10::BFloat16*>(m3), master, n, a, s, scale, clip, seed,
               offset, index0);
  } else {
    adam_chunk(static_cast<P*>(p), static_cast<G*>(g), static_cast<float*>(m1), static_cast<float*>(m2),
               static_cast<float*>(m3), master, n, a, s, scale, clip, seed, offset, index0);
  }
}

template <typename P>
__device__ void adam_grad(DType gt, DType mt, void* p, void* g, void* m1, void* m2, void* m3, void* master, int64_t n,
                          const LaunchArgs& a, const detail::AdamScalars& s, float scale, float clip, uint64_t seed,
                          uint64_t offset, uint64_t index0) {
  switch (gt) {
    case DType::Half:
      return adam_moment<P, c10::Half>(mt, p, g, m1, m2, m3, master, n, a, s, scale, clip, seed, offset, index0);
    case DType::BFloat16:
      return adam_moment<P, c10::BFloat16>(mt, p, g, m1, m2, m3, master, n, a, s, scale, clip, seed, offset, index0);
    default:
      return adam_moment<P, float>(mt, p, g, m1, m2, m3, master, n, a, s, scale, clip, seed, offset, index0);
  }
}

template <int M>
__global__ void __launch_bounds__(kThreads) adam_kernel(const TensorListMeta<kLists, M, true> meta, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return;  // overflow: write nothing
  const int64_t chunk = blockIdx.x;
  const int t = tensor_of_chunk(meta, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[t] - begin);
  const double step = static_cast<double>(*static_cast<const float*>(meta.ptr[5][t])) + 1.0;
  const double lr = a.lr_tensor != nullptr ? static_cast<double>(*a.lr_tensor) : a.lr;
  const detail::AdamScalars s =
      detail::adam_scalars(lr, a.beta1, a.beta2, a.eps, a.weight_decay, step, a.decoupled, a.maximize);
  const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.f;
  const float clip = a.clip_coef != nullptr ? *a.clip_coef : 1.f;
  const auto [seed, offset] = at::cuda::philox::unpack(a.rng);
  const uint64_t index0 = static_cast<uint64_t>(meta.aux[t] + begin);
  auto at_begin = [&](int d) { return static_cast<char*>(meta.ptr[d][t]) + begin * dtype_size(meta.dtype[d][t]); };
  void* master = a.mode == MasterMode::None ? nullptr
                                            : static_cast<char*>(meta.ptr[4][t]) +
                                                  begin * (a.mode == MasterMode::Fp32 ? 4 : 2);
  const DType gt = meta.dtype[1][t], mt = meta.dtype[2][t];
  switch (meta.dtype[0][t]) {
    case DType::Half:
      return adam_grad<c10::Half>(gt, mt, at_begin(0), at_begin(1), at_begin(2), at_begin(3), at_begin(6), master, n, a, s, scale,
                                  clip, seed, offset, index0);
    case DType::BFloat16:
      return adam_grad<c10::BFloat16>(gt, mt, at_begin(0), at_begin(1), at_begin(2), at_begin(3), at_begin(6), master, n, a, s, scale,
                                      clip, seed, offset, index0);
    default:
      return adam_grad<float>(gt, mt, at_begin(0), at_begin(1), at_begin(2), at_begin(3), at_begin(6), master, n, a, s, scale, clip,
                              seed, offset, index0);
  }
}

template <int M>
__global__ void advance_steps_kernel(const TensorListMeta<kLists, M, true> meta, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  for (int t = threadIdx.x; t < meta.num_tensors; t += blockDim.x) *static_cast<float*>(meta.ptr[5][t]) += 1.f;
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<float>() : nullptr;
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList masters, at::TensorList steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled_weight_decay, bool maximize, c10::string_view master_mode,
                    c10::string_view rounding, std::optional<int64_t> seed,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                    std::optional<at::TensorList> max_exp_avg_sqs) {
  const detail::AdamArgs args =
      detail::make_adam_args(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, beta1, beta2, eps,
                             weight_decay, decoupled_weight_decay, maximize, master_mode, rounding, seed, lr_tensor,
                             grad_scale, found_inf, clip_coef, max_exp_avg_sqs);
  if (!detail::launch_prechecked(params, grads)) detail::check_adam_args(args);  // else checked by the caller
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  LaunchArgs a{lr, beta1, beta2, eps, weight_decay, optional_ptr(lr_tensor), optional_ptr(grad_scale),
               optional_ptr(found_inf), optional_ptr(clip_coef), decoupled_weight_decay, maximize,
               max_exp_avg_sqs.has_value(), args.master_mode,
               args.rounding, at::PhiloxCudaState(0, 0)};
  if (args.rounding == Mode::Stochastic) {
    a.rng = stochastic_state(seed, params[0].device());
  }
  detail::AdamPlan plan(args);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static_assert(fits_small_kernel_args<TensorListMeta<kLists, kMaxTensorsSmall, true>, LaunchArgs>());
  with_max_tensors<kMaxTensors, kMaxTensorsSmall>([&](auto capacity) {
    constexpr int M = decltype(capacity)::value;
    // Each launch's counts advance after its update (same stream), and every row has its own count
    // (check_adam_args refuses shared ones): no block reads a count another block is changing.
    multi_tensor_apply<kLists, M, true>(
        {plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.masters, steps, plan.max_exp_avg_sqs},
        [&](const TensorListMeta<kLists, M, true>& meta, int64_t chunks, int64_t) {
          adam_kernel<M><<<chunks, kThreads, 0, stream>>>(meta, a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          advance_steps_kernel<M><<<1, 256, 0, stream>>>(meta, a.found_inf);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        &plan.rng_base);
  });
  plan.finish();
  // Empty params have no chunks; their counts advance here, still without reading found_inf on the host.
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() != 0) continue;
    at::Tensor s = steps[i];
    if (a.found_inf != nullptr) {
      s.add_(found_inf->eq(0).to(at::kFloat).reshape(s.sizes()));
    } else {
      s.add_(1);
    }
  }
}

}  // namespace mixprec::cuda
