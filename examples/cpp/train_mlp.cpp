// A complete LibTorch mixed-precision training loop with mixprec: a precision policy (mixed bf16 on CPU,
// or fp16 with loss scaling where a GPU runs it), autocast through AutocastGuard, the policy-matched
// GradScaler and the master-weight AdamW, on generated regression data. Exits non-zero unless the loss
// falls to a tenth of where it started.
#include <mixprec/mixprec.h>
#include <torch/torch.h>

#include <cstdio>

int main(int argc, char** argv) {
  const std::string policy_name = argc > 1 ? argv[1] : "mixed_bfloat16";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 300;
  const mixprec::Policy policy = mixprec::Policy::from_string(policy_name);
  torch::manual_seed(0);

  // y = sin(x . w) plus noise, 2048 samples of 16 features
  auto x = torch::randn({2048, 16});
  auto y = torch::sin(x.matmul(0.25 * torch::randn({16, 1}))) + 0.01 * torch::randn({2048, 1});

  torch::nn::Sequential model(torch::nn::Linear(16, 64), torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})),
                              torch::nn::GELU(), torch::nn::Linear(64, 1));
  mixprec::apply(*model, policy);
  mixprec::optim::AdamW opt(model->parameters(), mixprec::optim::AdamWOptions(3e-3).weight_decay(0.0));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().enabled(policy.needs_loss_scaling()));

  double first = 0, last = 0;
  for (int step = 0; step < steps; ++step) {
    auto idx = torch::randint(0, 2048, {128}, torch::kLong);
    opt.zero_grad();
    torch::Tensor loss;
    {
      mixprec::AutocastGuard autocast(policy, c10::DeviceType::CPU);
      auto pred = model->forward(x.index_select(0, idx).to(policy.param_dtype));
      loss = torch::mse_loss(pred.to(torch::kFloat), y.index_select(0, idx));
    }
    scaler.scale(loss).backward();
    scaler.step(opt);
    scaler.update();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
    if (step % 50 == 0 || step == steps - 1) std::printf("step %4d  loss %.5f\n", step, last);
  }
  const bool ok = last < first / 10;
  std::printf("policy %s: loss %.5f -> %.5f: %s\n", policy.name.c_str(), first, last, ok ? "trained" : "did NOT train");
  return ok ? 0 : 1;
}
