// What the CPU and CUDA kernels of adam_step_ share: argument checks (same messages on both backends,
// all before anything is written) and the per-row layout plan.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string_view>
#include <vector>

#include "ops/adam_rule.h"
#include "ops/rounding.h"

namespace mixprec::detail {

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, masters, steps;
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
  MasterMode master_mode;
  rounding::Mode rounding;
  std::optional<int64_t> seed;
  std::optional<at::Tensor> lr_tensor, grad_scale, found_inf, clip_coef;
  std::optional<at::TensorList> max_exp_avg_sqs;  // AMSGrad's running maxima of exp_avg_sqs, when given
};

/// "none", "fp32" or "remainder"; anything else is an error listing what is accepted.
MasterMode parse_master_mode(std::string_view mode);

/// The op's arguments as one struct, modes parsed (both backends' entry points start here).
AdamArgs make_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                        bool maximize, c10::string_view master_mode, c10::string_view rounding,
                        std::optional<int64_t> seed, const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& clip_coef,
                        std::optional<at::TensorList> max_exp_avg_sqs);

/// Every precondition of adam_step_, with the argument named in the message.
void check_adam_args(const AdamArgs& a);

/// AdamCore::step_group checks every launch of a group of several buckets (Policy.apply's bf16 weights beside
/// fp32 norms) before the first one runs, so that a refusal writes nothing. While this guard lives, the
/// adam_step_ kernels on this thread skip check_adam_args for the launches added to it, which would otherwise
/// be checked twice. A launch is known by the addresses of its params and grads lists: any other call (a
/// dispatch mode or a boxed kernel re-issuing the op with lists of its own) is still checked.
class PrecheckedLaunches {
 public:
  PrecheckedLaunches();
  ~PrecheckedLaunches();
  PrecheckedLaunches(const PrecheckedLaunches&) = delete;
  PrecheckedLaunches& operator=(const PrecheckedLaunches&) = delete;
  /// `params` and `grads` (the very lists the launch will pass) passed check_adam_args.
  void add(at::TensorList params, at::TensorList grads);

 private:
  friend bool launch_prechecked(at::TensorList params, at::TensorList grads);
  struct Lists {
    const at::Tensor* params;
    size_t params_size;
    const at::Tensor* grads;
    size_t grads_size;
    bool operator==(const Lists&) const = default;
  };
  std::vector<Lists> lists_;
  PrecheckedLaunches* previous_;
};

/// Whether a live PrecheckedLaunches on this thread holds this launch's lists (the kernels then skip the check).
bool launch_prechecked(at::TensorList params, at::TensorList grads);

/// The tensors the kernels walk, row by row (param, grad, exp_avg, exp_avg_sq, master, and with AMSGrad
/// max_exp_avg_sq; without a master that list repeats params, without AMSGrad the last repeats exp_avg_sqs,
/// unread). A row whose tensors are all dense with identical strides is walked in place; any other row
/// through contiguous copies that finish() writes back (grads too when a grad_scale is given: the step
/// stores them unscaled). When every row is walked in place (the usual case) the lists are the op's own,
/// not copied. rng_base numbers elements across the list for stochastic rounding.
class AdamPlan {
 public:
  explicit AdamPlan(const AdamArgs& a);
  AdamPlan(const AdamPlan&) = delete;  // the lists may point into own_
  AdamPlan& operator=(const AdamPlan&) = delete;
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs;
  std::vector<uint64_t> rng_base;
  void finish();

 private:
  const AdamArgs& args_;
  std::vector<size_t> copied_;
  // Where some row needs copies: every list, the copies in those rows.
  std::vector<at::Tensor> own_[6];
};

}  // namespace mixprec::detail
