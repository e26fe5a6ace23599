// The loss-scaling core of a mixed-precision step from LibTorch: unscale a mixed-dtype gradient list,
// detect an overflow, and move the loss scale, all through mixprec's installed package.
#include <mixprec/mixprec.h>
#include <torch/torch.h>

#include <cstdio>

int main() {
  std::printf("mixprec %s (CUDA kernels: %s)\n", mixprec::version(), mixprec::built_with_cuda() ? "yes" : "no");
  torch::manual_seed(0);
  const float scale_value = 1024.f;
  auto scale = torch::full({1}, scale_value);
  auto growth_tracker = torch::zeros({1}, torch::kInt32);
  auto hysteresis_tracker = torch::ones({1}, torch::kInt32);
  auto found_inf = torch::zeros({1});

  // Gradients as a scaled backward pass leaves them: fp32, bf16 and fp16 side by side.
  std::vector<torch::Tensor> expected = {torch::randn({300}), torch::randn({17, 5}), torch::randn({4099})};
  std::vector<torch::Tensor> grads = {(expected[0] * scale_value).contiguous(),
                                      (expected[1] * scale_value).to(torch::kBFloat16),
                                      (expected[2] * scale_value).to(torch::kHalf)};

  auto sumsq = mixprec::ops::unscale_and_check_sumsq_(grads, found_inf, (1.0 / scale).to(torch::kFloat));
  mixprec::ops::update_scale_(scale, growth_tracker, hysteresis_tracker, found_inf, 2.0, 0.5, 2000);
  bool ok = found_inf.item<float>() == 0.f && scale.item<float>() == scale_value;
  ok = ok && torch::allclose(grads[0], expected[0], 1e-6, 1e-6);
  ok = ok && torch::allclose(grads[1].to(torch::kFloat), expected[1], 1e-2, 1e-2);
  ok = ok && torch::allclose(grads[2].to(torch::kFloat), expected[2], 1e-3, 1e-3);
  std::printf("clean step: found_inf=%g scale=%g grad norm=%g\n", found_inf.item<float>(), scale.item<float>(),
              std::sqrt(sumsq.item<float>()));

  // An overflow: the flag is raised and the scale backs off.
  grads[2][7] = std::numeric_limits<float>::infinity();
  mixprec::ops::unscale_and_check_(grads, found_inf, (1.0 / scale).to(torch::kFloat));
  mixprec::ops::update_scale_(scale, growth_tracker, hysteresis_tracker, found_inf, 2.0, 0.5, 2000);
  ok = ok && found_inf.item<float>() == 1.f && scale.item<float>() == scale_value / 2;
  std::printf("overflow step: found_inf=%g scale=%g\n", found_inf.item<float>(), scale.item<float>());
  std::printf("%s\n", ok ? "example OK" : "example FAILED");
  return ok ? 0 : 1;
}
