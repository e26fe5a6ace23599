// The inner loops of adam_step_ on the CPU, compiled once per CPU capability (see cpu_dispatch.h).
// Rows with fp32 masters or no master run on ATen's vector types, 16 elements at a time (AMSGrad's running
// maximum alongside the moments when the chunk has one), with the
// operations in adam_rule.h's order (so both capability builds agree bit for bit); stochastic rounding of
// the 16-bit parameters is vectorised too on AVX2 (stochastic_avx2.h, the cast's code). The int16-remainder
// rows, the tails and the DEFAULT capability's stochastic rows run the scalar rule with rounding.h.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "ops/adam_rule.h"
#include "ops/cpu/cpu_dispatch.h"
#include "ops/cpu/stochastic_avx2.h"
#include "ops/philox.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;
using detail::MasterMode;
constexpr int kW = 2 * FVec::size();  // elements per vector step: one Vectorized<Half/BFloat16>

// Loads and stores of kW elements as two float vectors; narrowing stores round to nearest even.
template <typename T>
struct Io {
  static void load(const T* p, FVec& a, FVec& b) {
    auto [x, y] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    a = x;
    b = y;
  }
  static void store(T* p, const FVec& a, const FVec& b) { at::vec::convert_from_float<T>(a, b).store(p); }
};
template <>
struct Io<float> {
  static void load(const float* p, FVec& a, FVec& b) {
    a = FVec::loadu(p);
    b = FVec::loadu(p + FVec::size());
  }
  static void store(float* p, const FVec& a, const FVec& b) {
    a.store(p);
    b.store(p + FVec::size());
  }
};

// a * b + c rounded once, like the scalar rule's fmaf: the AVX2 instruction, or fmaf lane by lane.
inline FVec fma_vec(const FVec& a, const FVec& b, const FVec& c) {
#if defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmadd(a, b, c);
#else
  alignas(64) float x[FVec::size()], y[FVec::size()], z[FVec::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int i = 0; i < FVec::size(); ++i) x[i] = std::fmaf(x[i], y[i], z[i]);
  return FVec::loadu(x);
#endif
}

// adam_rule.h's adam_update on vectors; `vmax`, when given, is AMSGrad's running maximum (updated first).
inline void adam_update_vec(FVec& w, FVec& m, FVec& v, FVec g, const detail::AdamScalars& s, FVec* vmax) {
  if (s.maximize) g = g.neg();
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) {
      w = w * FVec(s.decay);
    } else {
      g = fma_vec(FVec(s.weight_decay), w, g);
    }
  }
  // detail::adam_lerp: the form follows the per-tensor weight alone.
  const float w1 = s.one_minus_beta1;
  m = std::fabs(w1) < 0.5f ? fma_vec(FVec(w1), g - m, m) : fma_vec(FVec(w1 - 1.0f), g - m, g);
  v = v * FVec(s.beta2);
  v = fma_vec(FVec(s.one_minus_beta2) * g, g, v);
  FVec second = v;
  if (vmax != nullptr) {
    *vmax = FVec::blendv(*vmax, v, (v != v) | (v > *vmax));  // detail::amsgrad_max: a NaN wins
    second = *vmax;
  }
  const FVec denom = second.sqrt() / FVec(s.bias_correction2_sqrt) + FVec(s.eps);
  w = w + (FVec(-s.step_size) * m) / denom;
}

template <typename P>
inline P write_param(float w, rounding::Mode mode, uint32_t draw) {
  if constexpr (std::is_same_v<P, float>) {
    return w;
  } else if constexpr (std::is_same_v<P, c10::Half>) {
    return mode == rounding::Mode::Stochastic ? rounding::to_half_stochastic(w, draw) : rounding::to_half_nearest(w);
  } else {
    return mode == rounding::Mode::Stochastic ? rounding::to_bfloat16_stochastic(w, draw)
                                              : rounding::to_bfloat16_nearest(w);
  }
}

// Elements [from, to) by the scalar rule: tails, int16 remainders, and stochastic rounding where there is
// no vector rounding (the DEFAULT capability).
template <typename P, typename G, typename M>
void adam_scalar(const AdamChunk& c, const AdamCommon& k, int64_t from, int64_t to) {
  P* p = static_cast<P*>(c.param);
  G* g = static_cast<G*>(c.grad);
  M* m1 = static_cast<M*>(c.exp_avg);
  M* m2 = static_cast<M*>(c.exp_avg_sq);
  M* m3 = static_cast<M*>(c.max_exp_avg_sq);
  float* master = static_cast<float*>(c.master);
  const detail::AdamScalars& s = c.scalars;
  philox::Draw4 draws{{0, 0, 0, 0}};
  for (int64_t i = from; i < to; ++i) {
    const uint64_t index = c.rng_index + static_cast<uint64_t>(i);
    if (k.rounding == rounding::Mode::Stochastic && (i == from || index % 8 == 0)) {
      draws = philox::philox4x32_10(index / 8, k.key.offset, k.key.seed);
    }
    float w;
    if (k.mode == MasterMode::Fp32) {
      w = master[i];
    } else if (k.mode == MasterMode::Remainder) {
      if constexpr (std::is_same_v<P, c10::BFloat16>) {
        w = rounding::merge_bf16_remainder(p[i].x, static_cast<int16_t*>(c.master)[i]);
      } else {
        TORCH_INTERNAL_ASSERT(false, "remainder mode needs bfloat16 params");
      }
    } else {
      w = static_cast<float>(p[i]);
    }
    float mv = static_cast<float>(m1[i]);
    float vv = static_cast<float>(m2[i]);
    const float unscaled = static_cast<float>(g[i]) / k.grad_scale;
    if (k.write_grad) g[i] = static_cast<G>(unscaled);
    float vmax = m3 != nullptr ? static_cast<float>(m3[i]) : 0.0f;
    detail::adam_update(w, mv, vv, unscaled * k.clip_coef, s, m3 != nullptr ? &vmax : nullptr);
    m1[i] = static_cast<M>(mv);
    m2[i] = static_cast<M>(vv);
    if (m3 != nullptr) m3[i] = static_cast<M>(vmax);
    if (k.mode == MasterMode::Remainder) {
      if constexpr (std::is_same_v<P, c10::BFloat16>) {
        const rounding::SplitBFloat16 sp = rounding::split_bf16_remainder(w);
        p[i].x = sp.bf16;
        static_cast<int16_t*>(c.master)[i] = sp.remainder;
      }
    } else {
      if (k.mode == MasterMode::Fp32) master[i] = w;
      p[i] = write_param<P>(w, k.rounding, rounding::draw16(draws.v, index));
    }
  }
}

// kW elements from i by the vector rule; the new weights come back in w0, w1 for the caller to store.
template <typename P, typename G, typename M>
inline void adam_vec_step(const AdamChunk& c, const AdamCommon& k, int64_t i, FVec& w0, FVec& w1) {
  P* p = static_cast<P*>(c.param);
  G* g = static_cast<G*>(c.grad);
  M* m1 = static_cast<M*>(c.exp_avg);
  M* m2 = static_cast<M*>(c.exp_avg_sq);
  M* m3 = static_cast<M*>(c.max_exp_avg_sq);
  float* master = static_cast<float*>(c.master);
  FVec m0, m1v, v0, v1, g0, g1, x0, x1;
  if (k.mode == MasterMode::Fp32) {
    Io<float>::load(master + i, w0, w1);
  } else {
    Io<P>::load(p + i, w0, w1);
  }
  Io<G>::load(g + i, g0, g1);
  Io<M>::load(m1 + i, m0, m1v);
  Io<M>::load(m2 + i, v0, v1);
  if (m3 != nullptr) Io<M>::load(m3 + i, x0, x1);
  const FVec scale(k.grad_scale), clip(k.clip_coef);
  g0 = g0 / scale;
  g1 = g1 / scale;
  if (k.write_grad) Io<G>::store(g + i, g0, g1);
  adam_update_vec(w0, m0, v0, g0 * clip, c.scalars, m3 != nullptr ? &x0 : nullptr);
  adam_update_vec(w1, m1v, v1, g1 * clip, c.scalars, m3 != nullptr ? &x1 : nullptr);
  Io<M>::store(m1 + i, m0, m1v);
  Io<M>::store(m2 + i, v0, v1);
  if (m3 != nullptr) Io<M>::store(m3 + i, x0, x1);
  if (k.mode == MasterMode::Fp32) Io<float>::store(master + i, w0, w1);
}

template <typename P, typename G, typename M>
void adam_typed(const AdamChunk& c, const AdamCommon& k) {
  P* p = static_cast<P*>(c.param);
  int64_t i = 0;
  if (k.mode != MasterMode::Remainder) {
    if (k.rounding == rounding::Mode::Nearest || std::is_same_v<P, float>) {
      for (; i + kW <= c.n; i += kW) {
        FVec w0, w1;
        adam_vec_step<P, G, M>(c, k, i, w0, w1);
        Io<P>::store(p + i, w0, w1);
      }
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (!std::is_same_v<P, float>) {
        // Stochastic rounding, 64 elements (8 Philox groups) per step after a scalar head that brings the
        // draw index to a group boundary: the same draws, the same rounding, the same bits as the scalar
        // rule, at vector speed.
        static_assert(kW == 16, "the AVX2 stochastic write-back rounds 16 elements at a time");
        i = avx2::elements_to_group(c.rng_index, c.n);
        adam_scalar<P, G, M>(c, k, 0, i);
        i = avx2::draw_blocks64(i, c.n, c.rng_index, k.key.offset, k.key.seed, [&](int64_t e, const __m256i draws[2]) {
          FVec w[2];
          adam_vec_step<P, G, M>(c, k, e, w[0], w[1]);
          const __m256 x[2] = {w[0], w[1]};
          avx2::store_stochastic16(p + e, x, draws);
        });
      }
#endif
    }
  }
  adam_scalar<P, G, M>(c, k, i, c.n);
}

template <typename P, typename G>
void adam_moment(const AdamChunk& c, const AdamCommon& k) {
  if (c.moment_dtype == at::kBFloat16) return adam_typed<P, G, c10::BFloat16>(c, k);
  return adam_typed<P, G, float>(c, k);
}

template <typename P>
void adam_grad(const AdamChunk& c, const AdamCommon& k) {
  switch (c.grad_dtype) {
    case at::kHalf:
      return adam_moment<P, c10::Half>(c, k);
    case at::kBFloat16:
      return adam_moment<P, c10::BFloat16>(c, k);
    default:
      return adam_moment<P, float>(c, k);
  }
}

void adam_chunk(const AdamChunk& c, const AdamCommon& k) {
  switch (c.param_dtype) {
    case at::kHalf:
      return adam_grad<c10::Half>(c, k);
    case at::kBFloat16:
      return adam_grad<c10::BFloat16>(c, k);
    default:
      return adam_grad<float>(c, k);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(adam_chunk_kernels, CPU_CAPABILITY::adam_chunk);

}  // namespace mixprec::cpu
