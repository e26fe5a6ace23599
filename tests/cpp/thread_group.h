// A c10d process group whose ranks are threads of one process, for tests of what mixprec all-reduces (the torch
// wheel ships no Gloo headers, so C++ tests cannot build a Gloo group). Its all-reduce waits for every rank and
// MAX- or SUM-reduces, as Gloo and NCCL do, and counts the collectives.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/torch.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

namespace mixprec_test {
struct ThreadRendezvous {
  std::mutex mutex;
  std::condition_variable arrived;
  std::vector<torch::Tensor> inputs;
  torch::Tensor result;
  int64_t generation = 0;
  int64_t calls = 0;
};

// The reduction is done when allreduce returns.
class DoneWork : public c10d::Work {
 public:
  bool isCompleted() override { return true; }
  bool wait(std::chrono::milliseconds /*timeout*/) override { return true; }
};

class ThreadMaxBackend : public c10d::Backend {
 public:
  ThreadMaxBackend(int rank, int size, std::shared_ptr<ThreadRendezvous> shared)
      : Backend(rank, size), shared_(std::move(shared)) {}
  const std::string getBackendName() const override { return "thread_max"; }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<torch::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
    TORCH_CHECK(tensors.size() == 1 && (opts.reduceOp == c10d::ReduceOp::MAX || opts.reduceOp == c10d::ReduceOp::SUM),
                "test backend: one tensor, MAX or SUM");
    std::unique_lock<std::mutex> lock(shared_->mutex);
    const int64_t generation = shared_->generation;
    shared_->inputs.push_back(tensors[0].clone());
    if (static_cast<int>(shared_->inputs.size()) == getSize()) {
      const torch::Tensor all = torch::stack(shared_->inputs);
      shared_->result = opts.reduceOp == c10d::ReduceOp::MAX ? all.amax(0) : all.sum(0);
      shared_->inputs.clear();
      ++shared_->generation;
      ++shared_->calls;
      shared_->arrived.notify_all();
    } else {
      shared_->arrived.wait(lock, [&] { return shared_->generation != generation; });
    }
    tensors[0].copy_(shared_->result);
    return c10::make_intrusive<DoneWork>();
  }

 private:
  std::shared_ptr<ThreadRendezvous> shared_;
};

inline c10::intrusive_ptr<c10d::ProcessGroup> thread_group(int rank, int size,
                                                           std::shared_ptr<ThreadRendezvous> shared) {
  auto group = c10::make_intrusive<c10d::ProcessGroup>(rank, size);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM,
                    c10::make_intrusive<ThreadMaxBackend>(rank, size, std::move(shared)));
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  return group;
}
}  // namespace mixprec_test
