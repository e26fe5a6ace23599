// mixprec::Monitor (see mixprec/monitor.h) and its binding as the torch custom class
// torch.classes.mixprec.Monitor, which python/mixprec/monitor.py drives (adding TensorBoard).
#include "mixprec/monitor.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>

#include "grad_scaler_class.h"
#include "mixprec/ops.h"
#include "ops/grad_stats_rule.h"

#ifdef MIXPREC_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace mixprec {

namespace {

// Python's json module reads NaN and Infinity (and writes them), so non-finite values stay visible.
std::string json_number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  std::ostringstream out;
  out << std::setprecision(17) << v;
  return out.str();
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

double peak_memory(const c10::Device& device) {
#ifdef MIXPREC_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return static_cast<double>(
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak);
  }
#endif
  (void)device;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;  // Linux reports KiB
}

}  // namespace

std::string MonitorRecord::json() const {
  std::ostringstream o;
  o << "{\"step\": " << step << ", \"interval\": " << interval << ", \"loss\": " << json_number(loss)
    << ", \"loss_scale\": " << json_number(loss_scale) << ", \"skipped_steps\": " << skipped_steps
    << ", \"skipped_total\": " << skipped_total << ", \"overflow\": " << json_string(overflow)
    << ", \"grad_elements\": " << grad_elements << ", \"zero_fraction\": " << json_number(zero_fraction)
    << ", \"flush_fraction\": " << json_number(flush_fraction)
    << ", \"subnormal_fraction\": " << json_number(subnormal_fraction)
    << ", \"overflow_fraction\": " << json_number(overflow_fraction)
    << ", \"nonfinite_fraction\": " << json_number(nonfinite_fraction) << ", \"grad_norm\": " << json_number(grad_norm)
    << ", \"step_time\": " << json_number(step_time) << ", \"tokens_per_second\": " << json_number(tokens_per_second)
    << ", \"peak_memory\": " << json_number(peak_memory) << ", \"min_exponent\": " << min_exponent
    << ", \"exponent_histogram\": [";
  for (size_t i = 0; i < exponent_histogram.size(); ++i) o << (i ? ", " : "") << json_number(exponent_histogram[i]);
  o << "]}";
  return o.str();
}

std::string MonitorRecord::progress_line() const {
  std::ostringstream o;
  o << std::fixed << "step " << step << " | loss " << std::setprecision(4) << loss << " | scale "
    << std::defaultfloat << std::setprecision(12) << loss_scale << std::fixed << " | skipped " << skipped_steps << " | flush "
    << std::setprecision(2) << 100.0 * flush_fraction << "% | subnormal " << 100.0 * subnormal_fraction
    << "% | overflow " << 100.0 * (overflow_fraction + nonfinite_fraction) << "% | grad norm " << std::setprecision(3)
    << grad_norm << " | " << std::setprecision(1) << 1e3 * step_time << " ms/step";
  if (tokens_per_second > 0) o << " | " << std::setprecision(0) << tokens_per_second << " tok/s";
  o << " | peak " << std::setprecision(1) << peak_memory / (1024.0 * 1024.0) << " MiB";
  if (!overflow.empty()) o << "\n  overflow: " << overflow;
  return o.str();
}

Monitor::Monitor(torch::OrderedDict<std::string, at::Tensor> named_parameters, GradScaler* scaler,
                 MonitorOptions options)
    : params_(std::move(named_parameters)), scaler_(scaler), options_(std::move(options)) {
  TORCH_CHECK_VALUE(options_.every() > 0, "mixprec::Monitor: every must be > 0, got ", options_.every());
  TORCH_CHECK_VALUE(options_.min_exponent() >= -1100 && options_.min_exponent() <= 1100,
                    "mixprec::Monitor: min_exponent must be in [-1100, 1100], got ", options_.min_exponent());
  TORCH_CHECK_VALUE(options_.num_bins() >= 1 && options_.num_bins() <= 4096,
                    "mixprec::Monitor: num_bins must be in [1, 4096], got ", options_.num_bins());
  TORCH_CHECK_VALUE(options_.start_step() >= 0, "mixprec::Monitor: start_step must be >= 0, got ",
                    options_.start_step());
  steps_ = options_.start_step();
  if (!options_.jsonl().empty()) {
    // Appended: nothing a log directory holds is lost (a resume that did not say start_step, two monitors
    // sharing the directory); a new run's lines follow an old run's there.
    jsonl_.open(options_.jsonl(), std::ios::app);
    TORCH_CHECK(jsonl_.is_open(), "mixprec::Monitor: cannot open the jsonl file '", options_.jsonl(), "' for writing");
  }
  if (scaler_ != nullptr && scaler_->is_enabled()) {
    scaler_->set_track_overflows(true);
    // A scaler that tracked before counts earlier overflows too: the monitor's count starts from here.
    if (scaler_->overflow_count().defined()) {
      count_at_start_ = scaler_->overflow_count().clone();
      counter_ = scaler_->overflow_count();
    }
  }
  interval_start_ = std::chrono::steady_clock::now();
}

std::optional<MonitorRecord> Monitor::step(const at::Tensor& loss, int64_t tokens) { return step(loss, tokens, {}); }

void Monitor::shard(const std::string& name, GradScaler::ShardGroups groups) {
  if (index_of_.empty()) {  // built at the first declaration: a model declares every sharded parameter
    for (size_t k = 0; k < params_.size(); ++k) index_of_.emplace(params_[k].key(), k);
  }
  const auto found = index_of_.find(name);
  TORCH_CHECK_VALUE(found != index_of_.end(), "mixprec::Monitor::shard: no parameter named '", name, "'");
  const size_t i = found->second;
  for (const auto& group : groups) {
    TORCH_CHECK_VALUE(group, "mixprec::Monitor::shard: '", name, "': a process group is null");
  }
  if (shard_groups_.empty()) shard_groups_.resize(params_.size());
  shard_groups_[i] = std::move(groups);
}

std::optional<MonitorRecord> Monitor::step(const at::Tensor& loss, int64_t tokens,
                                           const std::vector<std::optional<at::Tensor>>& grads) {
  TORCH_CHECK_VALUE(grads.empty() || grads.size() == params_.size(), "mixprec::Monitor::step: grads must hold one "
                    "entry per parameter (", params_.size(), "), got ", grads.size());
  TORCH_CHECK(loss.defined() && loss.numel() == 1, "mixprec::Monitor::step: loss must be a one-element tensor, got ",
              loss.defined() ? loss.sizes() : at::IntArrayRef{});
  TORCH_CHECK(tokens >= 0, "mixprec::Monitor::step: tokens must be >= 0, got ", tokens);
  TORCH_CHECK(!closed_, "mixprec::Monitor::step: the monitor is closed");
  ++steps_;
  // A copy (one tiny asynchronous copy, no sync): the caller may reuse the tensor in place (an accumulation
  // buffer, a CUDA graph's static output) before the mean is taken at the next logged step.
  losses_.push_back(loss.detach().reshape({}).clone());
  tokens_ += tokens;
  if (steps_ % options_.every() != 0) return std::nullopt;
  MonitorRecord r;
  try {
    r = make_record(grads);
  } catch (...) {  // a refused call (a gradient grad_stats refuses) counts no step: the next logged one is as due
    --steps_;
    losses_.pop_back();
    tokens_ -= tokens;
    throw;
  }
  if (jsonl_.is_open()) write_jsonl(r);
  if (options_.progress()) std::cout << r.progress_line() << std::endl;
  return r;
}

void Monitor::reduce_shards(const std::vector<int64_t>& row_of) {
  // One reduction per set of groups, in the order of its first parameter, over every parameter declared with
  // it (a zero row where this rank has no gradient): the same collectives on every rank, whichever gradients
  // it holds. Counts and sums add up over the shards; max |g| is the largest.
  std::vector<std::pair<size_t, std::vector<int64_t>>> sets;  // (a parameter with the groups, its members)
  const auto same = [&](size_t a, size_t b) {
    const auto& x = shard_groups_[a];
    const auto& y = shard_groups_[b];
    return std::equal(x.begin(), x.end(), y.begin(), y.end(),
                      [](const auto& g, const auto& h) { return g.get() == h.get(); });
  };
  for (size_t i = 0; i < shard_groups_.size(); ++i) {
    if (shard_groups_[i].empty()) continue;
    auto it = std::find_if(sets.begin(), sets.end(), [&](const auto& set) { return same(set.first, i); });
    if (it == sets.end()) it = sets.insert(sets.end(), {i, {}});
    it->second.push_back(static_cast<int64_t>(i));
  }
  // On the sharded gradients' device (NCCL takes CUDA tensors only, whatever device the loss is on).
  const c10::Device on = shard_device_.value_or(last_stats_.device());
  const auto index = [&](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong).to(on); };
  const auto back = [&](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong).to(last_stats_.device()); };
  for (const auto& [first, members] : sets) {
    std::vector<int64_t> present, rows;  // positions among the members, and their rows of last_stats_
    for (size_t k = 0; k < members.size(); ++k) {
      const int64_t row = row_of[static_cast<size_t>(members[k])];
      if (row < 0) continue;
      present.push_back(static_cast<int64_t>(k));
      rows.push_back(row);
    }
    at::Tensor block =
        at::zeros({static_cast<int64_t>(members.size()), last_stats_.size(1)}, last_stats_.options().device(on));
    if (!rows.empty()) block.index_copy_(0, index(present), last_stats_.index_select(0, back(rows)).to(on));
    std::vector<at::Tensor> sums{block};
    std::vector<at::Tensor> maxima{block.select(1, detail::kStatsAmax).clone()};
    block.select(1, detail::kStatsAmax).zero_();
    c10d::AllreduceOptions sum;
    sum.reduceOp = c10d::ReduceOp::SUM;
    c10d::AllreduceOptions max;
    max.reduceOp = c10d::ReduceOp::MAX;
    for (const auto& group : shard_groups_[first]) {
      group->allreduce(sums, sum)->wait();
      group->allreduce(maxima, max)->wait();
    }
    block.select(1, detail::kStatsAmax).copy_(maxima[0]);
    if (!rows.empty()) {
      last_stats_.index_copy_(0, back(rows), block.index_select(0, index(present)).to(last_stats_.device()));
    }
  }
}

MonitorRecord Monitor::make_record(const std::vector<std::optional<at::Tensor>>& grads) {
  const c10::Device device = losses_.back().device();
  const auto f64 = at::TensorOptions().device(device).dtype(at::kDouble);
  const bool scaled = scaler_ != nullptr && scaler_->is_enabled();
  const at::Tensor scale = scaled ? scaler_->scale_tensor().to(device) : at::ones({}, f64.dtype(at::kFloat));
  // Gradients an optimizer left scaled (it took the scale itself and skipped an overflowing step before
  // unscaling) hold g * gs, gs that optimizer's factor. Judged at scale / gs, with the histogram's bins moved
  // up by log2(gs), they are counted as g would be (exactly for a power-of-two scale); their norm and max are
  // divided below. The scaler knows on the host whether any optimizer took the scale; only then are the
  // factors read (one more read on such a logged step).
  std::map<const c10::TensorImpl*, double> factor_of;
  if (scaled && !scaler_->scaled_gradients().empty()) {
    std::vector<at::Tensor> factors;
    for (const auto& entry : scaler_->scaled_gradients()) factors.push_back(entry.factor.reshape({1}).to(device));
    const at::Tensor host = at::cat(factors).to(at::kDouble).cpu();
    const double* f = host.const_data_ptr<double>();
    for (size_t k = 0; k < factors.size(); ++k) {
      if (!(std::isfinite(f[k]) && f[k] > 0) || f[k] == 1.0) continue;  // a scale that underflowed to 0: no correction
      for (const c10::TensorImpl* impl : scaler_->scaled_gradients()[k].params) factor_of[impl] = f[k];
    }
  }

  // The statistics, one grad_stats launch per (device, factor) the gradients have, each row describing the
  // true gradient; rows are then put back in the parameters' order and summed into the record's.
  struct Group {
    std::vector<at::Tensor> grads;
    std::vector<int64_t> rows;  // positions among the gradients measured
  };
  std::map<std::pair<std::string, double>, Group> groups;
  last_stats_names_.clear();
  std::vector<int64_t> row_of(params_.size(), -1);
  shard_device_.reset();
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& item = params_[i];
    const at::Tensor grad = grads.empty() ? item.value().grad() : grads[i].value_or(at::Tensor());
    if (!grad.defined()) continue;
    TORCH_CHECK_TYPE(!grad.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python),
                     "mixprec::Monitor: the gradient of '", item.key(), "' is a tensor subclass (e.g. a DTensor); "
                     "pass its local shard (step's grads) and declare it with shard()");
    row_of[i] = static_cast<int64_t>(last_stats_names_.size());
    if (!shard_groups_.empty() && !shard_groups_[i].empty() && !shard_device_.has_value()) {
      shard_device_ = grad.device();
    }
    // A sparse gradient (nn.Embedding(sparse=True)) counts as its coalesced values, as the scaler checks it.
    const at::Tensor g = grad.is_sparse() ? grad.coalesce().values() : grad;
    const auto found = factor_of.find(item.value().unsafeGetTensorImpl());
    Group& group = groups[{g.device().str(), found == factor_of.end() ? 1.0 : found->second}];
    // A complex gradient counts as its real and imaginary parts (so the norm is sqrt(sum |g|^2), as torch's
    // clip_grad_norm_ has it), as the scaler unscales it.
    group.grads.push_back(g.is_complex() ? at::view_as_real(g.detach().resolve_conj()) : g.detach());
    group.rows.push_back(static_cast<int64_t>(last_stats_names_.size()));
    last_stats_names_.push_back(item.key());
  }
  const int64_t width = 8 + options_.num_bins();
  std::vector<at::Tensor> rows;
  std::vector<int64_t> order;
  for (auto& [key, group] : groups) {
    const auto& [dev, gs] = key;
    const auto shift = static_cast<int64_t>(std::lround(std::log2(gs)));
    const int64_t min_exponent = std::clamp<int64_t>(options_.min_exponent() + shift, -1100, 1100);
    const c10::Device d(dev);
    const at::Tensor judged_at = scale.to(at::kDouble).div(gs).to(at::kFloat).reshape({1}).to(d);
    at::Tensor stats = ops::grad_stats(group.grads, judged_at, min_exponent, options_.num_bins()).to(device);
    if (gs != 1.0) {
      stats.select(1, 6).div_(gs * gs);  // sum of g^2
      stats.select(1, 7).div_(gs);       // max |g|
    }
    rows.push_back(std::move(stats));
    order.insert(order.end(), group.rows.begin(), group.rows.end());
  }
  if (rows.empty()) {
    last_stats_ = at::zeros({0, width}, f64);
  } else {
    // Row k of the concatenation belongs to gradient order[k]: scatter back into the parameters' order.
    const at::Tensor all = at::cat(rows);
    last_stats_ = at::empty_like(all).index_copy_(0, at::tensor(order, at::kLong).to(device), all);
  }
  if (!shard_groups_.empty()) reduce_shards(row_of);
  // Everything the record needs, gathered on the device and read back at once: one host read.
  at::Tensor count = at::zeros({1}, f64);
  if (scaled && scaler_->overflow_count().defined()) {
    if (!scaler_->overflow_count().is_same(counter_)) {  // a new counter: it started after we did
      counter_ = scaler_->overflow_count();
      count_at_start_ = at::Tensor();
      skipped_before_ = 0;
    }
    count = scaler_->overflow_count().to(device).to(at::kDouble).reshape({1});
    if (count_at_start_.defined()) count = count.sub(count_at_start_.to(device).to(at::kDouble));
  }
  const at::Tensor packed = at::cat({last_stats_.sum(0), at::stack(losses_).to(at::kDouble).mean().reshape({1}),
                                     scale.to(at::kDouble).reshape({1}), count})
                                .cpu();
  const double* v = packed.const_data_ptr<double>();
  const auto now = std::chrono::steady_clock::now();
  const double seconds = std::chrono::duration<double>(now - interval_start_).count();

  MonitorRecord r;
  r.step = steps_;
  r.interval = static_cast<int64_t>(losses_.size());
  r.loss = v[width];
  r.loss_scale = v[width + 1];
  r.skipped_total = static_cast<int64_t>(v[width + 2]);
  r.skipped_steps = std::max<int64_t>(0, r.skipped_total - skipped_before_);  // 0 after a tracking restart
  if (r.skipped_steps > 0) {
    if (auto report = scaler_->last_overflow(params_)) {
      // The report counts update() calls since the scaler was made (not saved with it); the monitor's steps,
      // one update() each, are the run's (start_step included): the same step in the record's numbering.
      report->step = steps_ - (scaler_->updates() - report->step) + 1;
      r.overflow = report->str();
    }
  }
  const double n = v[0];
  r.grad_elements = static_cast<int64_t>(n);
  const double denom = n > 0 ? n : 1.0;
  r.zero_fraction = v[1] / denom;
  r.flush_fraction = v[2] / denom;
  r.subnormal_fraction = v[3] / denom;
  r.overflow_fraction = v[4] / denom;
  r.nonfinite_fraction = v[5] / denom;
  r.grad_norm = std::sqrt(v[6]);
  r.min_exponent = options_.min_exponent();
  r.exponent_histogram.assign(v + 8, v + width);
  r.step_time = seconds / static_cast<double>(r.interval);
  r.tokens_per_second = seconds > 0 ? static_cast<double>(tokens_) / seconds : 0.0;
  r.peak_memory = peak_memory(device);

  skipped_before_ = r.skipped_total;
  losses_.clear();
  tokens_ = 0;
  interval_start_ = now;
  return r;
}

void Monitor::write_jsonl(const MonitorRecord& r) {
  std::error_code ec;
  const std::string& path = options_.jsonl();
  const auto size_before = std::filesystem::file_size(path, ec);
  const bool sized = !ec;
  // After a failed write that could not be cut back, a new line first: the failed one may have left part of its
  // line.
  jsonl_ << (jsonl_failed_ ? "\n" : "") << r.json() << '\n';
  jsonl_.flush();
  jsonl_failed_ = !jsonl_.good();
  if (!jsonl_failed_) return;
  // A full disk (or a vanished file system) must not stop training, nor silently end the log. The stream is
  // closed (which drops the bytes it still buffers: written later, they would duplicate part of this record),
  // the file cut back to its size before this record where it is a regular file, and opened again for the
  // next logged step.
  jsonl_.close();
  jsonl_.clear();
  if (sized && std::filesystem::is_regular_file(path, ec)) {
    std::filesystem::resize_file(path, size_before, ec);
    if (!ec) jsonl_failed_ = false;  // no partial line left
  }
  jsonl_.open(path, std::ios::app);
  TORCH_WARN("mixprec::Monitor: writing the record of step ", r.step, " to '", path,
             "' failed (a full disk?); it is missing from the file",
             jsonl_.is_open() ? ", and the next logged step writes again" : ", which cannot be opened again");
}

void Monitor::close() {
  if (jsonl_.is_open()) jsonl_.close();
  closed_ = true;
}

// ---- torch.classes.mixprec.Monitor ---------------------------------------------------------------------------

namespace {

struct MonitorClass : torch::CustomClassHolder {
  c10::intrusive_ptr<detail::GradScalerClass> scaler;  // keeps the scaler the monitor points to alive
  std::unique_ptr<Monitor> impl;
};

}  // namespace

namespace detail {

// Called from grad_scaler.cpp's registration, right after the GradScaler class: the Monitor's constructor
// takes one, so its schema can only be formed once that class is known (static initialisation order
// across files is not something to rely on).
void register_monitor_class(torch::Library& m) {
  m.class_<MonitorClass>("Monitor")
      .def(torch::init([](std::vector<std::string> names, std::vector<at::Tensor> params,
                          std::optional<c10::intrusive_ptr<detail::GradScalerClass>> scaler, int64_t every,
                          std::string jsonl, bool progress, int64_t min_exponent, int64_t num_bins,
                          int64_t start_step) {
        TORCH_CHECK(names.size() == params.size(), "mixprec.Monitor: ", names.size(), " names for ", params.size(),
                    " parameters");
        torch::OrderedDict<std::string, at::Tensor> named;
        for (size_t i = 0; i < names.size(); ++i) named.insert(names[i], params[i]);
        auto self = c10::make_intrusive<MonitorClass>();
        if (scaler.has_value()) self->scaler = *scaler;
        self->impl = std::make_unique<Monitor>(
            std::move(named), scaler.has_value() ? &(*scaler)->impl : nullptr,
            MonitorOptions().every(every).jsonl(jsonl).progress(progress).min_exponent(min_exponent).num_bins(
                num_bins).start_step(start_step));
        return self;
      }))
      // The record as its JSON line (Python parses it) and its progress line, or None between logged steps.
      .def("step",
           [](const c10::intrusive_ptr<MonitorClass>& s, const at::Tensor& loss, int64_t tokens) {
             std::optional<std::tuple<std::string, std::string>> out;
             if (auto r = s->impl->step(loss, tokens)) out = std::make_tuple(r->json(), r->progress_line());
             return out;
           })
      .def("step_with_grads",
           [](const c10::intrusive_ptr<MonitorClass>& s, const at::Tensor& loss, int64_t tokens,
              std::vector<std::optional<at::Tensor>> grads) {
             std::optional<std::tuple<std::string, std::string>> out;
             if (auto r = s->impl->step(loss, tokens, grads)) out = std::make_tuple(r->json(), r->progress_line());
             return out;
           })
      .def("logs_next", [](const c10::intrusive_ptr<MonitorClass>& s) { return s->impl->logs_next(); })
      // A parameter's gradient is a shard over the process groups named (c10d's registered names).
      .def("shard",
           [](const c10::intrusive_ptr<MonitorClass>& s, const std::string& name, std::vector<std::string> groups) {
             GradScaler::ShardGroups resolved;
             for (const auto& group : groups) resolved.push_back(c10d::resolve_process_group(group));
             s->impl->shard(name, std::move(resolved));
           })
      .def("close", [](const c10::intrusive_ptr<MonitorClass>& s) { s->impl->close(); })
      .def("last_stats", [](const c10::intrusive_ptr<MonitorClass>& s) { return s->impl->last_stats(); })
      .def("last_stats_names",
           [](const c10::intrusive_ptr<MonitorClass>& s) { return s->impl->last_stats_names(); });
}

}  // namespace detail
}  // namespace mixprec
