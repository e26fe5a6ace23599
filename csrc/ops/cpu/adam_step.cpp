// adam_step_ on the CPU: checks, the overflow skip, per-tensor bias corrections, then 64K-element chunks
// of every row in parallel through the capability-specific kernel, and finally the step counts.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/adam_plan.h"
#include "ops/cast_plan.h"
#include "ops/cpu/cpu_dispatch.h"
#include "ops/cpu/parallel_chunks.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kAdamChunk = 1 << 16;

float read_scalar(const std::optional<at::Tensor>& t, float fallback) {
  return t.has_value() && t->defined() ? t->item<float>() : fallback;  // CPU tensors: a memory read
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList masters, at::TensorList steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled_weight_decay, bool maximize, c10::string_view master_mode,
                   c10::string_view rounding, std::optional<int64_t> seed, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& clip_coef, std::optional<at::TensorList> max_exp_avg_sqs) {
  const detail::AdamArgs args =
      detail::make_adam_args(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, beta1, beta2, eps,
                             weight_decay, decoupled_weight_decay, maximize, master_mode, rounding, seed, lr_tensor,
                             grad_scale, found_inf, clip_coef, max_exp_avg_sqs);
  if (!detail::launch_prechecked(params, grads)) detail::check_adam_args(args);  // else checked by the caller
  if (params.empty()) return;
  // An overflow in this step's gradients: nothing at all is written.
  if (read_scalar(found_inf, 0.0f) != 0.0f) return;

  const double lr_value = lr_tensor.has_value() && lr_tensor->defined() ? lr_tensor->item<double>() : lr;
  AdamCommon common{args.master_mode, args.rounding, {0, 0},
                    read_scalar(grad_scale, 1.0f),
                    read_scalar(clip_coef, 1.0f), grad_scale.has_value() && grad_scale->defined()};
  if (args.rounding == Rounding::Stochastic && args.master_mode != detail::MasterMode::Remainder) {
    common.key = stochastic_key(seed);
  }

  detail::AdamPlan plan(args);
  const bool amsgrad = max_exp_avg_sqs.has_value();
  std::vector<AdamChunk> chunks;
  int64_t elements = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    // A checked one-element float32 CPU tensor: read it in memory (item() would go through the dispatcher).
    const double step = static_cast<double>(*steps[i].const_data_ptr<float>()) + 1.0;
    const detail::AdamScalars scalars =
        detail::adam_scalars(lr_value, beta1, beta2, eps, weight_decay, step, decoupled_weight_decay, maximize);
    const at::Tensor& p = plan.params[i];
    const int64_t numel = p.numel();
    elements += numel;
    for (int64_t begin = 0; begin < numel; begin += kAdamChunk) {
      auto at_offset = [begin](const at::Tensor& t) {
        return static_cast<void*>(static_cast<char*>(t.data_ptr()) + begin * t.element_size());
      };
      chunks.push_back({at_offset(p), at_offset(plan.grads[i]), at_offset(plan.exp_avgs[i]),
                        at_offset(plan.exp_avg_sqs[i]), at_offset(plan.masters[i]),
                        amsgrad ? at_offset(plan.max_exp_avg_sqs[i]) : nullptr, std::min(kAdamChunk, numel - begin),
                        p.scalar_type(), plan.grads[i].scalar_type(), plan.exp_avgs[i].scalar_type(), scalars,
                        plan.rng_base[i] + static_cast<uint64_t>(begin)});
    }
  }
  const AdamChunkFn kernel = adam_chunk_kernels.get("adam_step_");
  parallel_chunks(static_cast<int64_t>(chunks.size()), elements, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) kernel(chunks[c], common);
  });
  plan.finish();
  // Only applied steps count. Written in memory, as add_(1) would write them (a float32 + 1), at a fraction
  // of its cost per tensor; the op's ADInplaceOrView kernel advances the version counters.
  for (const at::Tensor& s : steps) *const_cast<at::Tensor&>(s).mutable_data_ptr<float>() += 1.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

// A sparse gradient routes the call here; the checks then name it (see unscale_and_check).
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace mixprec::cpu
