// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator. Each call maps (counter, key) to four independent 32-bit draws with no state, so element i
// of a tensor can draw its own numbers from (seed, i) on any thread, on CPU or GPU, and get the same
// bits everywhere. mixprec's stochastic rounding keys it with the seed and counts in groups of eight
// elements, 16 bits each: counter = (element_index / 8, offset), see rounding::draw16.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mixprec::philox {

struct Draw4 {
  uint32_t v[4];
};

C10_HOST_DEVICE inline uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

/// Four 32-bit draws for `group` (a 64-bit counter) under `seed`, with `offset` as the counter's upper
/// half (a second stream index, e.g. a generator's offset).
C10_HOST_DEVICE inline Draw4 philox4x32_10(uint64_t group, uint64_t offset, uint64_t seed) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

}  // namespace mixprec::philox
