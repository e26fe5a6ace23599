// One Adam/AdamW element update, written once for the CPU kernels (scalar and vectorised share its order
// of operations) and the CUDA kernel. The order of floating-point operations follows torch.optim.AdamW's
// single-tensor path (lerp, mul+addcmul, sqrt/div+eps, addcdiv), so fp32 results track torch to the last
// bits.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace mixprec::detail {

/// How a parameter's fp32 value is kept between steps.
enum class MasterMode : int {
  None = 0,       // the parameter itself (fp32 params; or 16-bit params rounded every step)
  Fp32 = 1,       // an fp32 master copy; the 16-bit param is its rounding
  Remainder = 2,  // bf16 param + int16 remainder that together hold the fp32 value exactly
};

/// Per-tensor scalars of one step (bias corrections depend on the tensor's own step count).
/// torch hands these to its kernels as Python floats (doubles) rounded once to float; so do we.
struct AdamScalars {
  float beta2;
  float eps;
  float weight_decay;
  float one_minus_beta1;
  float one_minus_beta2;
  float decay;                  // 1 - lr * weight_decay (AdamW)
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  bool decoupled;               // AdamW (decay the weight) vs Adam (L2 term in the gradient)
  bool maximize;
};

/// AMSGrad's running maximum of the second moment: torch.maximum's rule (a NaN on either side wins).
C10_HOST_DEVICE inline float amsgrad_max(float vmax, float v) { return (v != v || v > vmax) ? v : vmax; }

// Where torch's vectorised CPU kernels compute a*b + c as one fused multiply-add (grad.add(param, alpha),
// lerp, addcmul), this rule calls fmaf explicitly; everything else is plain. The project compiles with
// -ffp-contract=off (and nvcc --fmad=false), so no other contraction happens: fmaf is correctly rounded
// on every CPU build and on the GPU, and all of them agree bit for bit. With `vmax` (AMSGrad), the
// denominator takes the running maximum of the second moment, which the step updates first, as torch's
// single-tensor AMSGrad does.
// torch's lerp(self, end, weight): self + weight * (end - self) for |weight| < 0.5, else
// end + (weight - 1) * (end - self), each one fused multiply-add (ATen's lerp_vec); the second form keeps
// exp_avg exactly the gradient when beta1 = 0.
C10_HOST_DEVICE inline float adam_lerp(float self, float end, float weight) {
  return ::fabsf(weight) < 0.5f ? ::fmaf(weight, end - self, self) : ::fmaf(weight - 1.0f, end - self, end);
}

C10_HOST_DEVICE inline void adam_update(float& w, float& m, float& v, float g, const AdamScalars& s,
                                        float* vmax = nullptr) {
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) {
      w = w * s.decay;                        // param.mul_(1 - lr * weight_decay)
    } else {
      g = ::fmaf(s.weight_decay, w, g);       // grad.add(param, alpha=weight_decay)
    }
  }
  m = adam_lerp(m, g, s.one_minus_beta1);     // exp_avg.lerp_(grad, 1 - beta1)
  v = v * s.beta2;                            // exp_avg_sq.mul_(beta2)
  v = ::fmaf(s.one_minus_beta2 * g, g, v);    //   .addcmul_(grad, grad, 1 - beta2)
  float second = v;
  if (vmax != nullptr) {
    *vmax = amsgrad_max(*vmax, v);            // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    second = *vmax;
  }
  const float denom = ::sqrtf(second) / s.bias_correction2_sqrt + s.eps;
  w = w + (-s.step_size * m) / denom;             // param.addcdiv_(exp_avg, denom, -step_size)
}

/// beta^step for a whole-number step by binary exponentiation. Only IEEE multiplications, which every
/// build rounds alike, so the CPU and the GPU agree bit for bit; glibc's pow and CUDA's may differ in the
/// last bit of a double, and that can decide the rounding to float. Within a few double ulps of pow.
C10_HOST_DEVICE inline double pow_steps(double base, double step) {
  auto n = static_cast<uint64_t>(step);
  double result = 1.0;
  while (n != 0) {
    if (n & 1u) result *= base;
    base *= base;
    n >>= 1;
  }
  return result;
}

/// Bias-corrected scalars for a tensor whose step count (after this step) is `step`; formed in double
/// like torch's Python floats, then rounded once.
C10_HOST_DEVICE inline AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                                double step, bool decoupled, bool maximize) {
  const double bc1 = 1.0 - pow_steps(beta1, step);
  const double bc2 = 1.0 - pow_steps(beta2, step);
  return {static_cast<float>(beta2),
          static_cast<float>(eps),
          static_cast<float>(weight_decay),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(lr / bc1),
          static_cast<float>(::sqrt(bc2)),
          decoupled,
          maximize};
}

}  // namespace mixprec::detail
