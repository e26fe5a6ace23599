// What the CPU and CUDA kernels of cast / cast_ share: argument checks, the rounding-mode parser, and
// the plan that turns any pair of (dst, src) tensors into raw memory the kernels can walk in step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "ops/rounding.h"

namespace mixprec::detail {

/// "nearest" or "stochastic"; anything else is an error that lists what is accepted.
rounding::Mode parse_rounding(std::string_view rounding, const char* op);

/// dst and src: same length, every pair the same shape, all on one device, dtypes among fp32/fp16/bf16,
/// dst dense (not sparse).
void check_cast_args(const char* op, at::TensorList dst, at::TensorList src);

/// The tensors a cast kernel walks. Pair i is dst_work[i] <- src_work[i], both dense with identical
/// strides, so element k of one lines up with element k of the other in memory. Where dst itself is
/// not dense, dst_work is a fresh buffer that finish() copies into it. rng_base[i] is where pair i
/// starts in the list-wide element numbering that stochastic rounding draws by (multiples of 8, so
/// every tensor starts on a Philox group).
class CastPlan {
 public:
  CastPlan(at::TensorList dst, at::TensorList src);
  const std::vector<at::Tensor>& dst_work() const { return dst_work_; }
  const std::vector<at::Tensor>& src_work() const { return src_work_; }
  const std::vector<uint64_t>& rng_base() const { return rng_base_; }
  /// Elements in the numbering (the RNG offset a call consumes is derived from it).
  uint64_t rng_elements() const { return rng_elements_; }
  /// Copies results into the dst tensors that were not walked in place.
  void finish();

 private:
  at::TensorList dst_;
  std::vector<at::Tensor> dst_work_;
  std::vector<at::Tensor> src_work_;
  std::vector<size_t> copy_back_;
  std::vector<uint64_t> rng_base_;
  uint64_t rng_elements_ = 0;
};

/// The output of the functional cast: laid out like src (same strides when src is dense); `dtype` must be
/// float32, float16 or bfloat16 (checked here, for the kernels and the Meta kernel alike).
at::Tensor empty_cast_output(const at::Tensor& src, at::ScalarType dtype);

/// The functional cast on top of a backend's list cast `cast_lists(dst_list, src_list)`.
template <typename CastLists>
at::Tensor cast_functional(const at::Tensor& src, at::ScalarType dtype, CastLists&& cast_lists) {
  at::Tensor out = empty_cast_output(src, dtype);
  const at::Tensor srcs[] = {src};
  const at::Tensor dsts[] = {out};
  cast_lists(at::TensorList(dsts), at::TensorList(srcs));
  return out;
}

/// Checks for split_bf16_remainder / merge_bf16_remainder.
void check_split_args(const at::Tensor& src);
void check_merge_args(const at::Tensor& bf16, const at::Tensor& remainder);

}  // namespace mixprec::detail
