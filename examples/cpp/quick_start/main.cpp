#include <mixprec/mixprec.h>
#include <torch/torch.h>

int main() {
  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  torch::nn::Sequential model(torch::nn::Linear(64, 256), torch::nn::GELU(), torch::nn::Linear(256, 64));
  model->to(device);
  std::vector<std::pair<torch::Tensor, torch::Tensor>> data;
  for (int i = 0; i < 50; ++i) data.emplace_back(torch::randn({32, 64}, device), torch::randn({32, 64}, device));

  auto policy = mixprec::Policy::from_string("mixed_bfloat16");
  mixprec::apply(*model, policy);
  mixprec::optim::AdamW opt(model->parameters(), mixprec::optim::AdamWOptions(3e-4).weight_decay(0.1));
  mixprec::GradScaler scaler(device, mixprec::GradScalerOptions().enabled(policy.needs_loss_scaling()));
  // Every 10 steps: loss, scale, skipped steps and their sources, fp16 underflow, grad norm, speed, memory.
  mixprec::Monitor monitor(model->named_parameters(), &scaler, mixprec::MonitorOptions().every(10).jsonl("metrics.jsonl"));
  for (auto& [x, y] : data) {
    opt.zero_grad();
    torch::Tensor loss;
    {
      mixprec::AutocastGuard autocast(policy, device.type());   // restored exactly on scope exit
      loss = torch::mse_loss(model->forward(x).to(torch::kFloat), y);
    }
    scaler.scale(loss).backward();
    scaler.step(opt);      // mixprec optimizers skip on device; torch::optim ones through a host check
    scaler.update();
    monitor.step(loss, x.size(0));   // reads nothing back from the device between logged steps
  }
  torch::save(opt, "opt.pt");   // masters and moments included
}
