#include "ops/cpu/cpu_dispatch.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Version.h>

#include <mutex>

#include <string>

namespace mixprec::cpu {

Capability runtime_capability() {
  // at::get_cpu_capability() is what torch.backends.cpu.get_cpu_capability() reports: the best of
  // DEFAULT / AVX2 / AVX512 that the CPU has, lowered by ATEN_CPU_CAPABILITY when that is set.
  static const Capability cap = [] {
    const std::string name = at::get_cpu_capability();
    return (name == "AVX2" || name == "AVX512") ? Capability::Avx2 : Capability::Default;
  }();
  return cap;
}

RngKey stochastic_key(std::optional<int64_t> seed) {
  if (seed.has_value()) return {static_cast<uint64_t>(*seed), 0};
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return {gen.get<at::CPUGeneratorImpl>()->random64(), 0};
}

KernelTable<UnscaleChunkFn> unscale_chunk_kernels;
KernelTable<CastChunkFn> cast_chunk_kernels;
KernelTable<AdamChunkFn> adam_chunk_kernels;
KernelTable<Int8AmaxFn> int8_amax_kernels;
KernelTable<Int8CodesFn> int8_codes_kernels;
KernelTable<Fp8NearestFn> fp8_nearest_kernels;
KernelTable<Fp8StochasticFn> fp8_stochastic_kernels;
KernelTable<Fp8DequantizeFn> fp8_dequantize_kernels;
KernelTable<MagnitudeMaxFn> magnitude_max_kernels;
KernelTable<FakeQuantForwardFn> fake_quantize_forward_kernels;
KernelTable<FakeQuantBackwardFn> fake_quantize_backward_kernels;

}  // namespace mixprec::cpu
