#include "ops/checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace mixprec::detail {

namespace {
bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}
}  // namespace

void check_one_element(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                       c10::Device device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", t.layout());
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a one-element ", dtype, " tensor, got ", t.numel(),
              " elements");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be a one-element ", dtype, " tensor, got dtype ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of the other tensors), got ",
              t.device());
}

void check_float_list(at::TensorList list, const char* op, const char* name, c10::Device device) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is an undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] must be a dense (strided) tensor; sparse gradients are not supported, got layout ", t.layout());
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, "[", i,
                "] must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                " but the other tensors are on ", device, "; every tensor must be on the same device");
  }
}

void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name, size_t index) {
  TORCH_CHECK(t.numel() == 0 || t.is_non_overlapping_and_dense() || at::has_internal_overlap(t) != at::MemOverlap::Yes,
              op, ": ", name, "[", index, "] has elements that share memory (an expanded tensor?); it is written "
              "in place, so give it its own memory (.contiguous())");
}

namespace {

/// The byte past the last element `t` can reach in its storage.
int64_t extent_end(const at::Tensor& t) {
  int64_t reach = 0;
  for (int64_t d = 0; d < t.dim(); ++d) reach += (t.size(d) - 1) * t.stride(d);
  const auto item = static_cast<int64_t>(t.element_size());
  return (t.storage_offset() + reach + 1) * item;
}

/// `t`'s extent; its end only when `with_end` (the sort needs the start alone, and most storages hold one
/// written tensor, whose end nothing reads).
WrittenExtent written_extent_of(const at::Tensor& t, size_t index, bool with_end) {
  const int64_t begin = t.storage_offset() * static_cast<int64_t>(t.element_size());
  const int64_t end = with_end ? extent_end(t) : 0;
  return {reinterpret_cast<uintptr_t>(t.storage().unsafeGetStorageImpl()), begin, end, end, index};
}

bool extent_before(const WrittenExtent& x, const WrittenExtent& y) {
  return x.storage != y.storage ? x.storage < y.storage : x.begin < y.begin;
}

}  // namespace

std::vector<WrittenExtent> check_written_list(at::TensorList list, const char* op, const char* name) {
  // Usually every tensor has its own storage: one sort by (storage, start) shows that, and only tensors sharing
  // a storage (views of one buffer, or the same tensor twice) whose extents meet are compared element-wise.
  std::vector<WrittenExtent> extents;
  extents.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    if (!t.defined() || !t.has_storage() || t.numel() == 0) continue;
    check_no_internal_overlap(t, op, name, i);
    extents.push_back(written_extent_of(t, i, false));
  }
  std::sort(extents.begin(), extents.end(), extent_before);
  for (size_t k = 0; k < extents.size();) {
    size_t run = k + 1;
    while (run < extents.size() && extents[run].storage == extents[k].storage) ++run;
    if (run - k > 1) {
      for (size_t e = k; e < run; ++e) {
        extents[e].end = extent_end(list[extents[e].index]);
        extents[e].reach = e == k ? extents[e].end : std::max(extents[e - 1].reach, extents[e].end);
      }
    }
    // A sweep by start: only pairs whose extents meet are compared element-wise (torch's overlap test; views
    // interleaved by strides that it cannot decide are let through).
    size_t widest = k;
    for (size_t e = k + 1; e < run; ++e) {
      const WrittenExtent& cur = extents[e];
      const WrittenExtent& prev = extents[widest];
      if (cur.begin < prev.end) {
        const at::MemOverlapStatus status = at::get_overlap_status(list[prev.index], list[cur.index]);
        TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ",
                    name, "[", std::min(prev.index, cur.index), "] and ", name, "[", std::max(prev.index, cur.index),
                    "] share memory (the same tensor twice, or overlapping views); each is written in place");
      }
      if (cur.end > prev.end) widest = e;
    }
    k = run;
  }
  return extents;
}

void check_read_list(at::TensorList read, at::TensorList written, const std::vector<WrittenExtent>& extents,
                     const char* op, const char* read_name, const char* written_name) {
  if (extents.empty()) return;
  for (size_t j = 0; j < read.size(); ++j) {
    const at::Tensor& r = read[j];
    if (!r.defined() || !r.has_storage() || r.numel() == 0) continue;
    const auto storage = reinterpret_cast<uintptr_t>(r.storage().unsafeGetStorageImpl());
    const auto first = std::lower_bound(extents.begin(), extents.end(), storage,
                                        [](const WrittenExtent& e, uintptr_t key) { return e.storage < key; });
    if (first == extents.end() || first->storage != storage) continue;  // the usual case: nothing written there
    // The written tensors of r's storage that start before r ends, walked back from the last of them.
    const WrittenExtent mine = written_extent_of(r, j, true);
    const WrittenExtent past{mine.storage, mine.end, mine.end, mine.end, 0};
    auto it = std::lower_bound(first, extents.end(), past, extent_before);
    while (it != first) {
      --it;
      // A storage's only written tensor has no end yet. Strided views torch's test cannot decide may overlap
      // others: the walk stops where no tensor from the storage's first to this one reaches r.
      const int64_t end = it->end != 0 ? it->end : extent_end(written[it->index]);
      if ((it->reach != 0 ? it->reach : end) <= mine.begin) break;
      if (end <= mine.begin) continue;
      const size_t i = it->index;
      const at::MemOverlapStatus status = at::get_overlap_status(written[i], r);
      if (status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::TooHard) continue;
      TORCH_CHECK(i != j || status == at::MemOverlapStatus::Full, op, ": ", read_name, "[", j, "] partly overlaps ",
                  written_name, "[", i, "] (torch's copy_ refuses that too); give ", read_name, "[", j,
                  "] its own memory");
      TORCH_CHECK(i == j, op, ": ", read_name, "[", j, "] shares memory with ", written_name, "[", i,
                  "], which is written while it is read (the pairs run in parallel); give ", read_name, "[", j,
                  "] its own memory");
    }
  }
}

void check_no_overlap(const at::Tensor& t, const char* t_name, const at::Tensor& other, const char* other_name,
                      const char* op) {
  if (!t.defined() || !other.defined() || t.numel() == 0 || other.numel() == 0) return;
  const at::MemOverlapStatus status = at::get_overlap_status(t, other);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", t_name,
              " shares memory with ", other_name, "; ", t_name, " is written in place, so give it its own memory");
}

void check_unscale_args(const char* op, at::TensorList grads, const at::Tensor& found_inf,
                        const at::Tensor& inv_scale, const std::optional<at::Tensor>& amax) {
  TORCH_CHECK(found_inf.defined(), op, ": found_inf must be a tensor, got an undefined tensor");
  const c10::Device device = found_inf.device();
  check_one_element(found_inf, op, "found_inf", at::kFloat, device);
  check_one_element(inv_scale, op, "inv_scale", at::kFloat, device);
  check_float_list(grads, op, "grads", device);
  check_written_list(grads, op, "grads");
  if (amax.has_value() && amax->defined()) {
    const at::Tensor& a = *amax;
    const auto n = static_cast<int64_t>(grads.size());
    TORCH_CHECK(a.layout() == at::kStrided && a.dim() == 1 && a.numel() == n && a.scalar_type() == at::kFloat &&
                    a.is_contiguous(),
                op, ": amax must be a contiguous float32 vector with one entry per gradient (", n,
                "), got a ", a.scalar_type(), " tensor of shape ", a.sizes());
    TORCH_CHECK(a.device() == device, op, ": amax must be on ", device, " (the device of the other tensors), got ",
                a.device());
  }
}

void check_grad_stats_args(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins) {
  constexpr const char* op = "mixprec::grad_stats";
  TORCH_CHECK(scale.defined(), op, ": scale must be a tensor, got an undefined tensor");
  check_one_element(scale, op, "scale", at::kFloat, scale.device());
  check_float_list(grads, op, "grads", scale.device());
  check_grad_stats_ranges(min_exponent, num_bins);
}

void check_grad_stats_ranges(int64_t min_exponent, int64_t num_bins) {
  constexpr const char* op = "mixprec::grad_stats";
  TORCH_CHECK(min_exponent >= -1100 && min_exponent <= 1100, op, ": min_exponent must be in [-1100, 1100], got ",
              min_exponent);
  TORCH_CHECK(num_bins >= 1 && num_bins <= 4096, op, ": num_bins must be in [1, 4096], got ", num_bins);
}

void check_record_overflow_args(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                                const at::Tensor& scale, int64_t step, int64_t checked,
                                const std::optional<at::Tensor>& count) {
  constexpr const char* op = "mixprec::record_overflow_";
  TORCH_CHECK(amax.defined() && amax.layout() == at::kStrided && amax.dim() == 1 && amax.scalar_type() == at::kFloat &&
                  amax.is_contiguous(),
              op, ": amax must be a contiguous float32 vector");
  const c10::Device device = amax.device();
  TORCH_CHECK(record.defined() && record.layout() == at::kStrided && record.dim() == 1 &&
                  record.scalar_type() == at::kDouble && record.is_contiguous() && record.numel() == 3 + amax.numel(),
              op, ": record must be a contiguous float64 vector of 3 + len(amax) = ", 3 + amax.numel(), " entries, got ",
              record.defined() ? record.scalar_type() : at::ScalarType::Undefined, " of shape ",
              record.defined() ? record.sizes() : at::IntArrayRef{});
  TORCH_CHECK(record.device() == device, op, ": record must be on ", device, " (the device of amax), got ",
              record.device());
  check_one_element(found_inf, op, "found_inf", at::kFloat, device);
  check_one_element(scale, op, "scale", at::kFloat, device);
  if (count.has_value() && count->defined()) check_one_element(*count, op, "count", at::kLong, device);
  TORCH_CHECK(step >= 0, op, ": step must be >= 0, got ", step);
  TORCH_CHECK(checked >= 0, op, ": checked must be >= 0, got ", checked);
}

UpdateScaleParams check_update_scale_args(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                          const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf,
                                          double growth_factor, double backoff_factor, int64_t growth_interval,
                                          int64_t hysteresis, double min_scale, std::optional<double> max_scale,
                                          bool consecutive_hysteresis) {
  constexpr const char* op = "mixprec::update_scale_";
  TORCH_CHECK(scale.defined(), op, ": scale must be a tensor, got an undefined tensor");
  const c10::Device device = scale.device();
  check_one_element(scale, op, "scale", at::kFloat, device);
  check_one_element(growth_tracker, op, "growth_tracker", at::kInt, device);
  check_one_element(hysteresis_tracker, op, "hysteresis_tracker", at::kInt, device);
  check_one_element(found_inf, op, "found_inf", at::kFloat, device);
  check_no_overlap(scale, "scale", found_inf, "found_inf", op);
  check_no_overlap(growth_tracker, "growth_tracker", found_inf, "found_inf", op);
  check_no_overlap(hysteresis_tracker, "hysteresis_tracker", found_inf, "found_inf", op);
  check_no_overlap(growth_tracker, "growth_tracker", scale, "scale", op);
  check_no_overlap(hysteresis_tracker, "hysteresis_tracker", scale, "scale", op);
  check_no_overlap(hysteresis_tracker, "hysteresis_tracker", growth_tracker, "growth_tracker", op);
  TORCH_CHECK(std::isfinite(growth_factor) && growth_factor > 0, op,
              ": growth_factor must be a finite number > 0, got ", growth_factor);
  TORCH_CHECK(std::isfinite(backoff_factor) && backoff_factor > 0, op,
              ": backoff_factor must be a finite number > 0, got ", backoff_factor);
  TORCH_CHECK(growth_interval > 0, op, ": growth_interval must be > 0, got ", growth_interval);
  TORCH_CHECK(hysteresis >= 1 && hysteresis <= INT32_MAX, op, ": hysteresis must be >= 1, got ", hysteresis);
  TORCH_CHECK(std::isfinite(min_scale) && min_scale >= 0, op, ": min_scale must be a finite number >= 0, got ",
              min_scale);
  if (max_scale.has_value()) {
    TORCH_CHECK(!std::isnan(*max_scale) && *max_scale > 0, op, ": max_scale must be > 0, got ", *max_scale);
    TORCH_CHECK(min_scale <= *max_scale, op, ": min_scale (", min_scale, ") must not exceed max_scale (",
                *max_scale, ")");
  }
  return {growth_factor,
          backoff_factor,
          growth_interval,
          static_cast<int32_t>(hysteresis),
          min_scale,
          max_scale.value_or(std::numeric_limits<double>::infinity()),
          consecutive_hysteresis};
}

void check_wgrad_operands(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.defined() && input.defined(), op,
              ": grad_output and input must be tensors, got an undefined tensor");
  const std::pair<const at::Tensor*, const char*> all[] = {{&grad_output, "grad_output"}, {&input, "input"}};
  for (const auto& [t, name] : all) {
    TORCH_CHECK(t->layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
                t->layout());
  }
  TORCH_CHECK(input.device() == grad_output.device(), op, ": input is on ", input.device(),
              " but grad_output is on ", grad_output.device(), "; every tensor must be on the same device");
  const at::ScalarType dtype = grad_output.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": grad_output must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(input.scalar_type() == dtype, op, ": input must have grad_output's dtype (", dtype, "), got ",
              input.scalar_type());
  // Symbolic sizes: the Meta kernel (ops/meta.cpp) runs these checks under torch.compile's dynamic shapes too.
  const c10::SymIntArrayRef out = grad_output.sym_sizes(), in = input.sym_sizes();
  TORCH_CHECK(grad_output.dim() >= 1 && input.dim() == grad_output.dim(), op,
              ": grad_output [..., out_features] and input [..., in_features] must have the same number (>= 1) "
              "of dimensions, got shapes ", out, " and ", in);
  // expect_true per dimension (TORCH_SYM_CHECK): a data-dependent size (a batch from nonzero()) becomes a runtime
  // assertion instead of a guard the trace cannot make.
  for (size_t d = 0; d + 1 < out.size(); ++d) {
    TORCH_SYM_CHECK(out[d].sym_eq(in[d]), op, ": grad_output and input must have the same leading (batch) shape, got ",
                    out, " and ", in);
  }
}

at::Tensor prepare_wgrad_output(const at::Tensor& grad_output, const at::Tensor& input, bool& has_work) {
  check_wgrad_operands("mixprec::linear_wgrad", grad_output, input);
  const auto options = grad_output.options().dtype(at::kFloat);
  const std::array<int64_t, 2> shape = {grad_output.size(-1), input.size(-1)};
  has_work = grad_output.numel() != 0 && input.numel() != 0;
  return has_work ? at::empty(shape, options) : at::zeros(shape, options);  // an empty batch: a zero gradient
}

void check_wgrad_args(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input) {
  constexpr const char* op = "mixprec::linear_wgrad_accum_";
  TORCH_CHECK(main_grad.defined() && grad_output.defined() && input.defined(), op,
              ": main_grad, grad_output and input must be tensors, got an undefined tensor");
  TORCH_CHECK(main_grad.layout() == at::kStrided, op, ": main_grad must be a dense (strided) tensor, got layout ",
              main_grad.layout());
  for (const auto& [t, name] : {std::pair{&grad_output, "grad_output"}, std::pair{&input, "input"}}) {
    TORCH_CHECK(t->device() == main_grad.device(), op, ": ", name, " is on ", t->device(), " but main_grad is on ",
                main_grad.device(), "; every tensor must be on the same device");
  }
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat, op, ": main_grad must be float32 (the fp32 accumulator), got ",
              main_grad.scalar_type());
  TORCH_CHECK(main_grad.dim() == 2, op, ": main_grad must be 2-D [out_features, in_features], got shape ",
              main_grad.sizes());
  TORCH_CHECK(main_grad.is_contiguous(), op,
              ": main_grad must be contiguous (it is accumulated in place), got strides ", main_grad.strides());
  check_wgrad_operands(op, grad_output, input);
  check_no_overlap(main_grad, "main_grad", grad_output, "grad_output", op);
  check_no_overlap(main_grad, "main_grad", input, "input", op);
  TORCH_CHECK(grad_output.size(-1) == main_grad.size(0) && input.size(-1) == main_grad.size(1), op,
              ": main_grad must have shape [grad_output.size(-1), input.size(-1)] = [", grad_output.size(-1), ", ",
              input.size(-1), "], got ", main_grad.sizes());
}

at::Tensor as_row_matrix(const at::Tensor& t) {
  at::Tensor m = t.dim() == 1 ? t.unsqueeze(0) : t.reshape({-1, t.size(-1)});
  const bool rows_ok = m.size(1) <= 1 || m.stride(1) == 1;
  if (!rows_ok || m.stride(0) < std::max<int64_t>(m.size(1), 1)) {
    m = m.contiguous();
  }
  if (m.size(0) == 1) {
    // One row may report any row stride (0 when broadcast, 1 when transposed), and .contiguous() keeps
    // it; give it the canonical one so a GEMM's leading dimension (>= width) can be read off stride(0).
    m = m.as_strided({1, m.size(1)}, {std::max<int64_t>(m.size(1), 1), 1});
  }
  return m;
}

DenseViews::DenseViews(at::TensorList tensors) : originals_(tensors) {
  views_.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.is_non_overlapping_and_dense()) {
      views_.push_back(t);
    } else {
      views_.push_back(t.contiguous());
      copied_.push_back(i);
    }
  }
}

void DenseViews::write_back() {
  for (size_t i : copied_) {
    // const_cast: the op's schema marks these tensors as mutated (Tensor(a!)[]).
    const_cast<at::Tensor&>(originals_[i]).copy_(views_[i]);
  }
}

}  // namespace mixprec::detail
