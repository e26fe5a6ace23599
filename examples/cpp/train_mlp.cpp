// A complete LibTorch mixed-precision training loop with mixprec: a precision policy (mixed bf16 on CPU,
// or fp16 with loss scaling where a GPU runs it), autocast through AutocastGuard, the policy-matched
// GradScaler and the master-weight AdamW, on generated regression data. A policy name ending in "+fp8"
// (e.g. mixed_bfloat16+fp8) adds a hidden layer that is a mixprec::nn::Float8Linear (delayed scaling,
// E4M3 forward, E5M2 gradients). Exits non-zero unless the loss falls to a tenth of where it started.
#include <mixprec/mixprec.h>
#include <torch/torch.h>

#include <cstdio>

int main(int argc, char** argv) {
  std::string policy_name = argc > 1 ? argv[1] : "mixed_bfloat16";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 300;
  const std::string fp8_suffix = "+fp8";
  const bool fp8 = policy_name.size() > fp8_suffix.size() &&
                   policy_name.compare(policy_name.size() - fp8_suffix.size(), fp8_suffix.size(), fp8_suffix) == 0;
  if (fp8) policy_name.resize(policy_name.size() - fp8_suffix.size());
  const mixprec::Policy policy = mixprec::Policy::from_string(policy_name);
  torch::manual_seed(0);

  // y = sin(x . w) plus noise, 2048 samples of 16 features
  auto x = torch::randn({2048, 16});
  auto y = torch::sin(x.matmul(0.25 * torch::randn({16, 1}))) + 0.01 * torch::randn({2048, 1});

  torch::nn::Sequential model(torch::nn::Linear(16, 64), torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})),
                              torch::nn::GELU());
  if (fp8) {  // the GEMMs of this layer in FP8; its scaling state is buffers, kept fp32 by apply()
    model->push_back(mixprec::nn::Float8Linear(64, 64));
    model->push_back(torch::nn::GELU());
  }
  model->push_back(torch::nn::Linear(64, 1));
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
  std::printf("policy %s%s: loss %.5f -> %.5f: %s\n", policy.name.c_str(), fp8 ? " + FP8 layer" : "", first, last,
              ok ? "trained" : "did NOT train");
  return ok ? 0 : 1;
}
