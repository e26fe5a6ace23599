// The Philox state a stochastic rounding on CUDA draws from, shared by every op that rounds stochastically.
#pragma once

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/core/Device.h>

#include <cstdint>
#include <mutex>
#include <optional>

namespace mixprec::cuda {

/// `seed` itself (offset 0), or with no seed torch's default generator for `device`, so torch.manual_seed
/// governs the draws. Each unseeded call takes a fresh stream: the offset becomes the upper half of every
/// Philox counter. The state is read inside the kernel (at::cuda::philox::unpack), which keeps this safe
/// under CUDA-graph capture.
inline at::PhiloxCudaState stochastic_state(std::optional<int64_t> seed, c10::Device device) {
  if (seed.has_value()) return at::PhiloxCudaState(static_cast<uint64_t>(*seed), 0);
  auto gen = at::cuda::detail::getDefaultCUDAGenerator(device.index());
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CUDAGeneratorImpl>()->philox_cuda_state(4);  // torch wants multiples of 4
}

}  // namespace mixprec::cuda
