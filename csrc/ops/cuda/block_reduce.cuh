// Small device helpers shared by the quantization kernels (fp8.cu, int8.cu).
#pragma once

#include <cstdint>

#include "ops/philox.h"
#include "ops/rounding.h"

namespace mixprec::cuda {

using rounding::magnitude_bits;

/// The max of `v` over the thread block; every thread gets it. `shared` holds one word per warp.
__device__ inline uint32_t block_max(uint32_t v, uint32_t* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0u;
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

/// The 16-bit draw of element `index` (one Philox call; used where elements are not taken in octets).
__device__ __forceinline__ uint32_t draw_of(uint64_t index, uint64_t seed, uint64_t offset) {
  const philox::Draw4 r = philox::philox4x32_10(index / 8, offset, seed);
  return rounding::draw16(r.v, index);
}

}  // namespace mixprec::cuda
