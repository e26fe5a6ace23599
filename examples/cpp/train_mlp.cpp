// A complete LibTorch mixed-precision training loop with mixprec: a precision policy (mixed bf16 on CPU,
// or fp16 with loss scaling where a GPU runs it), autocast through AutocastGuard, the policy-matched
// GradScaler and the master-weight AdamW, on generated regression data. A policy name may end in a suffix
// that changes the hidden layer: "+fp8" (e.g. mixed_bfloat16+fp8) makes it a mixprec::nn::Float8Linear
// (delayed scaling, E4M3 forward, E5M2 gradients), "+int8" a mixprec::nn::Int8Linear (INT8 forward and input
// gradient), and "+qat" trains the whole model with quantization-aware training (mixprec::qat::prepare), then
// converts it to INT8 weights and checks the converted model's loss too. Exits non-zero unless the loss falls
// to a tenth of where it started.
#include <mixprec/mixprec.h>
#include <torch/torch.h>

#include <cstdio>

int main(int argc, char** argv) {
  std::string policy_name = argc > 1 ? argv[1] : "mixed_bfloat16";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 300;
  std::string variant;
  if (const auto plus = policy_name.find('+'); plus != std::string::npos) {
    variant = policy_name.substr(plus + 1);
    policy_name.resize(plus);
  }
  if (!variant.empty() && variant != "fp8" && variant != "int8" && variant != "qat") {
    std::fprintf(stderr, "unknown suffix +%s (expected +fp8, +int8 or +qat)\n", variant.c_str());
    return 2;
  }
  const mixprec::Policy policy = mixprec::Policy::from_string(policy_name);
  torch::manual_seed(0);

  // y = sin(x . w) plus noise, 2048 samples of 16 features
  auto x = torch::randn({2048, 16});
  auto y = torch::sin(x.matmul(0.25 * torch::randn({16, 1}))) + 0.01 * torch::randn({2048, 1});

  torch::nn::Sequential model(torch::nn::Linear(16, 64), torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})),
                              torch::nn::GELU());
  if (variant == "fp8") {  // the GEMMs of this layer in FP8; its scaling state is buffers, kept fp32 by apply()
    model->push_back(mixprec::nn::Float8Linear(64, 64));
    model->push_back(torch::nn::GELU());
  } else if (variant == "int8") {  // INT8 forward and input-gradient GEMMs; the weight gradient in 16 bits
    model->push_back(mixprec::nn::Int8Linear(64, 64));
    model->push_back(torch::nn::GELU());
  }
  model->push_back(torch::nn::Linear(64, 1));
  if (variant == "qat") model = mixprec::qat::prepare(model);  // INT8 weights and activations, simulated
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
  bool ok = last < first / 10;
  std::printf("policy %s%s%s: loss %.5f -> %.5f: %s\n", policy.name.c_str(), variant.empty() ? "" : " +",
              variant.c_str(), first, last, ok ? "trained" : "did NOT train");
  if (variant == "qat") {  // the converted model: INT8 weight codes, INT8 GEMMs
    torch::NoGradGuard no_grad;
    auto converted = mixprec::qat::convert(model);
    const double loss = torch::mse_loss(converted->forward(x.to(policy.param_dtype)).to(torch::kFloat), y).item<double>();
    std::printf("converted to INT8: loss %.5f\n", loss);
    ok = ok && loss < first / 10;
  }
  return ok ? 0 : 1;
}
