// grad_stats on the CPU: every gradient cut into 64K-element chunks, the chunks counted in parallel into
// rows of their own, and the rows added per gradient in chunk order, so the result does not depend on
// the number of threads. What an element counts as is grad_stats_rule.h, shared with the CUDA kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/checks.h"
#include "ops/grad_stats_rule.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kStatsChunk = 1 << 16;

struct StatsChunk {
  const void* data;
  int64_t n;
  at::ScalarType dtype;
  int64_t tensor;
};

template <typename T, typename Op>
void count_chunk(const T* p, int64_t n, Op scale, int min_exponent, int num_bins, double* row) {
  int64_t counts[detail::kStatsCounts] = {};
  std::vector<int64_t> hist(num_bins, 0);
  double sumsq = 0.0;
  Op amax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Op g = static_cast<Op>(p[i]);
    int column = 0, bin = 0;
    detail::classify_grad<Op>(g, scale, min_exponent, num_bins, column, bin);
    ++counts[column];
    if (bin >= 0) {
      ++hist[bin];
      const Op a = std::fabs(g);
      if (a > amax) amax = a;
    }
    sumsq += static_cast<double>(g) * static_cast<double>(g);
  }
  row[detail::kStatsNumel] = static_cast<double>(n);  // counts[kStatsNumel] held the normal ones: not a column
  for (int c = detail::kStatsZero; c < detail::kStatsCounts; ++c) row[c] = static_cast<double>(counts[c]);
  row[detail::kStatsSumsq] = sumsq;
  row[detail::kStatsAmax] = static_cast<double>(amax);
  for (int b = 0; b < num_bins; ++b) row[detail::kStatsHistogram + b] = static_cast<double>(hist[b]);
}

at::Tensor grad_stats_cpu(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins) {
  detail::check_grad_stats_args(grads, scale, min_exponent, num_bins);
  const int width = detail::kStatsHistogram + static_cast<int>(num_bins);
  at::Tensor out = at::zeros({static_cast<int64_t>(grads.size()), width}, scale.options().dtype(at::kDouble));
  const detail::DenseViews dense(grads);  // read only: nothing is written back
  std::vector<StatsChunk> chunks;
  for (size_t t = 0; t < dense.views().size(); ++t) {
    const at::Tensor& g = dense.views()[t];
    const char* base = static_cast<const char*>(g.const_data_ptr());
    for (int64_t begin = 0; begin < g.numel(); begin += kStatsChunk) {
      chunks.push_back({base + begin * g.element_size(), std::min(kStatsChunk, g.numel() - begin), g.scalar_type(),
                        static_cast<int64_t>(t)});
    }
  }
  const float s = scale.item<float>();  // a CPU tensor: reading it is not a device sync
  const int lo = static_cast<int>(min_exponent), bins = static_cast<int>(num_bins);
  // Chunks go in batches, so scratch rows stay small (a wide histogram over a large model would otherwise
  // need a row per 64K elements at once); batches and the rows within one are added in order.
  constexpr int64_t kBatch = 256;
  std::vector<double> rows(static_cast<size_t>(std::min<int64_t>(kBatch, static_cast<int64_t>(chunks.size()))) * width);
  double* o = out.data_ptr<double>();
  for (int64_t first = 0; first < static_cast<int64_t>(chunks.size()); first += kBatch) {
    const int64_t count = std::min<int64_t>(kBatch, static_cast<int64_t>(chunks.size()) - first);
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const StatsChunk& ch = chunks[first + c];
        double* row = rows.data() + c * width;
        switch (ch.dtype) {
          case at::kFloat:
            count_chunk<float, float>(static_cast<const float*>(ch.data), ch.n, s, lo, bins, row);
            break;
          case at::kHalf:
            count_chunk<c10::Half, float>(static_cast<const c10::Half*>(ch.data), ch.n, s, lo, bins, row);
            break;
          case at::kBFloat16:
            count_chunk<c10::BFloat16, float>(static_cast<const c10::BFloat16*>(ch.data), ch.n, s, lo, bins, row);
            break;
          default:
            count_chunk<double, double>(static_cast<const double*>(ch.data), ch.n, s, lo, bins, row);
            break;
        }
      }
    });
    for (int64_t c = 0; c < count; ++c) {
      double* dst = o + chunks[first + c].tensor * width;
      const double* src = rows.data() + c * width;
      for (int k = 0; k < width; ++k) {
        dst[k] = k == detail::kStatsAmax ? std::max(dst[k], src[k]) : dst[k] + src[k];
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("grad_stats", &grad_stats_cpu); }
// A sparse gradient routes the call here; the checks then name it (see unscale_and_check).
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) { m.impl("grad_stats", &grad_stats_cpu); }

}  // namespace mixprec::cpu
