// Argument validation and tensor-list preparation shared by the CPU and CUDA kernels of every op, so
// both backends reject the same inputs with the same messages, before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "ops/update_scale_rule.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace mixprec::detail {

/// `t` must be a one-element tensor of `dtype` on `device`; the message names `op` and `name`.
void check_one_element(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                       c10::Device device);

/// Every entry of `list` must be a dense (strided, not sparse) floating-point tensor (fp32, fp16,
/// bf16 or fp64) on `device`; the message names `op`, `name` and the index.
void check_float_list(at::TensorList list, const char* op, const char* name, c10::Device device);

/// A tensor of a written list: the bytes of its storage its elements can reach, [begin, end).
struct WrittenExtent {
  uintptr_t storage;
  int64_t begin, end;  // end: 0 for a storage's only written tensor (computed where needed)
  int64_t reach;       // the largest end of this storage's tensors up to this one (0 where end is)
  size_t index;        // in the list
};

/// `list` is written in place by a kernel whose chunks run in parallel: no tensor may have elements that
/// share memory (an expanded view) and no two may overlap (the same tensor twice, overlapping views of one
/// buffer), or the result would depend on the schedule. Refused with a message naming `op`, `name` and the
/// indices, before anything is written. Views of one buffer that do not overlap (a flat parameter or
/// gradient buffer) pass, as do strided views torch's overlap test cannot decide and separate storages over
/// one memory (two from_numpy of an array), which it cannot see. Host cost: one sort (a few microseconds
/// per thousand tensors). Returns the extents of the tensors with elements, sorted by (storage, begin),
/// for check_read_list.
std::vector<WrittenExtent> check_written_list(at::TensorList list, const char* op, const char* name);

/// `read` is read by the same parallel kernel that writes `written` (`extents`: check_written_list's result),
/// pair by pair: read[j] may not overlap any written tensor but its own pair's, and that one only in full
/// (the same elements: each is read before it is written), as torch's copy_ refuses a partial overlap.
/// Otherwise the result would depend on the schedule. Two binary searches per read tensor, then only the
/// written tensors its extent meets are compared.
void check_read_list(at::TensorList read, at::TensorList written, const std::vector<WrittenExtent>& extents,
                     const char* op, const char* read_name, const char* written_name);

/// `list[index]`, written in place, must not have elements that share memory (an expanded view).
void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name, size_t index);

/// `t` (written in place) must not share memory with `other` (read); the message names both.
void check_no_overlap(const at::Tensor& t, const char* t_name, const at::Tensor& other, const char* other_name,
                      const char* op);

/// Checks shared by unscale_and_check_ and unscale_and_check_sumsq_ (`amax`, when given: a contiguous
/// float32 vector with one entry per gradient, on the gradients' device).
void check_unscale_args(const char* op, at::TensorList grads, const at::Tensor& found_inf,
                        const at::Tensor& inv_scale, const std::optional<at::Tensor>& amax);

/// Checks for grad_stats: `grads` as unscale_and_check_'s, `scale` a one-element float32 tensor on their
/// device, min_exponent in [-1100, 1100] and num_bins in [1, 4096].
void check_grad_stats_args(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins);
/// Its scalar part (min_exponent, num_bins), which the Meta kernel runs too: num_bins sizes the output.
void check_grad_stats_ranges(int64_t min_exponent, int64_t num_bins);

/// Checks for record_overflow_: `record` a contiguous float64 vector of 3 + amax.numel() entries, `amax` a
/// contiguous float32 vector, found_inf and scale one-element float32, count one-element int64 when
/// given, all on one device; step and checked >= 0.
void check_record_overflow_args(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                                const at::Tensor& scale, int64_t step, int64_t checked,
                                const std::optional<at::Tensor>& count);

/// Checks for update_scale_ (tensor kinds, devices and hyper-parameter ranges); returns the checked
/// hyper-parameters as the rule takes them (an unbounded max_scale as +inf).
UpdateScaleParams check_update_scale_args(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                          const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf,
                                          double growth_factor, double backoff_factor, int64_t growth_interval,
                                          int64_t hysteresis, double min_scale, std::optional<double> max_scale,
                                          bool consecutive_hysteresis);

/// Checks for linear_wgrad: grad_output [..., out] and input [..., in], dense, of one dtype (fp32, fp16 or
/// bf16) with equal leading shapes, on one device; the message names `op`.
void check_wgrad_operands(const char* op, const at::Tensor& grad_output, const at::Tensor& input);

/// linear_wgrad's checks and output, shared by both backends: a fresh fp32 [out, in] tensor on the operands'
/// device. An empty batch (or layer) makes it zeros and `has_work` false: there is no GEMM to run.
at::Tensor prepare_wgrad_output(const at::Tensor& grad_output, const at::Tensor& input, bool& has_work);

/// Checks for linear_wgrad_accum_: main_grad a contiguous fp32 [out, in] matrix on the operands' device,
/// and the operands as check_wgrad_operands.
void check_wgrad_args(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input);

/// `t` ([..., width], at least 1-D) as a 2-D [rows, width] matrix whose rows are contiguous and evenly
/// spaced with stride(0) >= width (a view when the layout allows, else a contiguous copy), as a GEMM
/// reads it with stride(0) as its leading dimension.
at::Tensor as_row_matrix(const at::Tensor& t);

/// Element-wise kernels walk raw memory. A tensor whose elements fill one block of memory (any
/// permutation of strides: contiguous, transposed, channels-last) can be walked as it is; any other
/// view (a slice with gaps) is walked through a contiguous copy that is written back afterwards.
class DenseViews {
 public:
  explicit DenseViews(at::TensorList tensors);
  /// The tensors to hand to a kernel, one per input, each dense (non-overlapping and dense).
  const std::vector<at::Tensor>& views() const { return views_; }
  /// Writes the results of the copies back into the original views.
  void write_back();

 private:
  at::TensorList originals_;
  std::vector<at::Tensor> views_;
  std::vector<size_t> copied_;
};

}  // namespace mixprec::detail
