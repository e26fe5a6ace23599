// Stochastic rounding's draws on the CPU, element by element in index order: element i takes its 16 bits
// from Philox group i / 8 (rounding::draw16), as every CUDA kernel does, so seeded calls agree bit for bit.
#pragma once

#include <cstdint>

#include "ops/cpu/cpu_dispatch.h"
#include "ops/philox.h"
#include "ops/rounding.h"

namespace mixprec::cpu {

/// One Philox call per group of eight consecutive indices, reused while the index stays in the group.
class Draws {
 public:
  explicit Draws(RngKey key) : key_(key) {}
  uint32_t at(uint64_t index) {
    if (index / 8 != group_) {
      group_ = index / 8;
      const philox::Draw4 r = philox::philox4x32_10(group_, key_.offset, key_.seed);
      for (int k = 0; k < 4; ++k) words_[k] = r.v[k];
    }
    return rounding::draw16(words_, index);
  }

 private:
  RngKey key_;
  uint64_t group_ = ~uint64_t{0};
  uint32_t words_[4] = {};
};

}  // namespace mixprec::cpu
