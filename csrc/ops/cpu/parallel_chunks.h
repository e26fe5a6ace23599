// How the CPU multi-tensor ops spread their chunks over threads.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace mixprec::cpu {

/// ATen's grain for elementwise loops (at::internal::GRAIN_SIZE, declared with TensorIterator).
constexpr int64_t kSerialElements = 32768;

/// Runs fn(begin, end) over chunks [0, count) that hold `elements` elements in all: on the thread pool, one
/// chunk per task, unless the whole list is smaller than ATen's grain (32K elements). Then it runs inline:
/// opening a parallel region costs more than such a list takes (a list of 148 one-element tensors spent a
/// quarter of its cast_ time waking OpenMP threads). Every chunk is computed the same way either way, so
/// the results do not depend on the choice.
template <typename Fn>
void parallel_chunks(int64_t count, int64_t elements, const Fn& fn) {
  if (count <= 0) return;
  if (elements < kSerialElements) {
    fn(int64_t{0}, count);
    return;
  }
  at::parallel_for(0, count, 1, fn);
}

}  // namespace mixprec::cpu
