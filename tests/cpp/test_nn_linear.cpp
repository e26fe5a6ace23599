// mixprec::nn::Linear from C++: same forward as torch::nn::Linear, fp32 weight gradients accumulated by
// the wgrad GEMM (checked against float64), input/bias gradients as torch's, and use with the optimizers.
#include <catch2/catch.hpp>
#include <mixprec/mixprec.h>
#include <torch/torch.h>

namespace {

// dL/dW of sum(out * upstream) over several micro-batches, in float64 from the operands as the layer saw them.
torch::Tensor reference_wgrad(const std::vector<torch::Tensor>& inputs, const std::vector<torch::Tensor>& upstreams,
                              torch::ScalarType compute) {
  torch::Tensor total;
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto x = inputs[i].to(compute).to(torch::kDouble).reshape({-1, inputs[i].size(-1)});
    auto g = upstreams[i].to(compute).to(torch::kDouble).reshape({-1, upstreams[i].size(-1)});
    auto w = g.t().mm(x);
    total = total.defined() ? total + w : w;
  }
  return total;
}

}  // namespace

TEST_CASE("nn::Linear forward equals torch::nn::Linear, and gradients match", "[nn]") {
  torch::manual_seed(0);
  torch::nn::Linear theirs(torch::nn::LinearOptions(13, 7));
  mixprec::nn::Linear ours(*theirs);  // takes over the same parameters
  REQUIRE(ours->weight.is_same(theirs->weight));
  auto x = torch::randn({3, 5, 13}, torch::requires_grad());
  auto x2 = x.detach().clone().requires_grad_();
  auto upstream = torch::randn({3, 5, 7});
  auto y_ours = ours(x);
  auto y_theirs = theirs(x2);
  REQUIRE(torch::equal(y_ours, y_theirs));

  auto bias_before = theirs->bias.grad();
  (y_theirs * upstream).sum().backward();
  auto ref_weight_grad = theirs->weight.grad().clone();
  auto ref_bias_grad = theirs->bias.grad().clone();
  theirs->zero_grad(/*set_to_none=*/true);
  (y_ours * upstream).sum().backward();
  REQUIRE(ours->main_grad().defined());
  REQUIRE(ours->main_grad().scalar_type() == torch::kFloat);
  REQUIRE(torch::allclose(ours->main_grad(), ref_weight_grad, 1e-5, 1e-5));
  REQUIRE(torch::allclose(ours->bias.grad(), ref_bias_grad, 1e-5, 1e-6));
  REQUIRE(torch::allclose(x.grad(), x2.grad(), 1e-5, 1e-6));
  auto exact = reference_wgrad({x.detach()}, {upstream}, torch::kFloat);
  REQUIRE((ours->main_grad().to(torch::kDouble) - exact).abs().max().item<double>() < 1e-5);
}

TEST_CASE("nn::Linear with bf16 weights accumulates micro-batches into an fp32 gradient", "[nn]") {
  torch::manual_seed(1);
  mixprec::nn::Linear layer(32, 24);
  layer->to(torch::kBFloat16);
  std::vector<torch::Tensor> inputs, upstreams;
  for (int i = 0; i < 16; ++i) {
    inputs.push_back(torch::randn({8, 32}).to(torch::kBFloat16));
    upstreams.push_back(torch::randn({8, 24}).to(torch::kBFloat16));
    (layer(inputs.back()).to(torch::kFloat) * upstreams.back().to(torch::kFloat)).sum().backward();
  }
  REQUIRE(layer->weight.grad().scalar_type() == torch::kFloat);
  REQUIRE(layer->weight.scalar_type() == torch::kBFloat16);
  auto exact = reference_wgrad(inputs, upstreams, torch::kBFloat16);
  const double error = (layer->main_grad().to(torch::kDouble) - exact).abs().max().item<double>();
  const double scale = exact.abs().max().item<double>();
  REQUIRE(error <= 1e-5 * scale);  // fp32 rounding; bf16 accumulation would be off by ~1e-3 of the scale
  REQUIRE(layer->bias.grad().scalar_type() == torch::kBFloat16);
}

TEST_CASE("nn::Linear trains with mixprec::optim::AdamW; zero_grad clears the accumulator", "[nn]") {
  torch::manual_seed(2);
  mixprec::nn::Linear layer(6, 3);
  torch::nn::Linear reference(torch::nn::LinearOptions(6, 3));
  {
    torch::NoGradGuard no_grad;
    reference->weight.copy_(layer->weight);
    reference->bias.copy_(layer->bias);
  }
  mixprec::optim::AdamW opt(layer->parameters(), mixprec::optim::AdamOptions(1e-2));
  mixprec::optim::AdamW opt_ref(reference->parameters(), mixprec::optim::AdamOptions(1e-2));
  auto target = torch::randn({16, 3});
  auto x = torch::randn({16, 6});
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    opt_ref.zero_grad();
    torch::mse_loss(layer(x), target).backward();
    torch::mse_loss(reference(x), target).backward();
    opt.step();
    opt_ref.step();
  }
  REQUIRE(torch::allclose(layer->weight, reference->weight, 1e-5, 1e-6));
  REQUIRE(torch::allclose(layer->bias, reference->bias, 1e-5, 1e-6));
  opt.zero_grad(/*set_to_none=*/false);
  REQUIRE(layer->main_grad().abs().sum().item<float>() == 0.0f);
}

TEST_CASE("nn::Linear clones as itself and prints its shape", "[nn]") {
  mixprec::nn::Linear layer(torch::nn::LinearOptions(4, 2).bias(false));
  auto copy = std::dynamic_pointer_cast<mixprec::nn::LinearImpl>(layer->clone());
  REQUIRE(copy != nullptr);
  REQUIRE(torch::equal(copy->weight, layer->weight));
  REQUIRE(!copy->weight.is_same(layer->weight));
  REQUIRE(!copy->bias.defined());
  std::ostringstream out;
  out << *layer;
  REQUIRE(out.str() == "mixprec::nn::Linear(in_features=4, out_features=2, bias=false)");
}

TEST_CASE("nn::Linear after a float64 round trip: fp32 gradients again, and the optimizer steps", "[nn]") {
  // As Python's mixprec.nn.Linear: to(kDouble) gives float64 gradients (torch's), a cast back fp32 ones (a
  // float64 gradient pinned by the float64 pass made mixprec's AdamW refuse the step).
  torch::manual_seed(3);
  for (const auto back : {torch::kFloat, torch::kBFloat16}) {
    mixprec::nn::Linear layer(8, 4);
    layer->to(torch::kDouble);
    layer->forward(torch::randn({2, 8}, torch::kDouble)).sum().backward();
    REQUIRE(layer->weight.grad().scalar_type() == torch::kDouble);
    layer->to(back);
    REQUIRE(layer->weight.grad_dtype() == torch::kFloat);
    REQUIRE(layer->weight.grad().scalar_type() == torch::kFloat);  // the one there converted
    mixprec::optim::AdamW opt(layer->parameters(), mixprec::optim::AdamWOptions(1e-2));
    opt.zero_grad();
    layer->forward(torch::randn({2, 8}).to(back)).sum().backward();
    REQUIRE(layer->weight.grad().scalar_type() == torch::kFloat);
    REQUIRE_NOTHROW(opt.step());
  }
}

TEST_CASE("nn::Linear adds into a 16-bit gradient from another use as fp32", "[nn]") {
  torch::manual_seed(3);
  mixprec::nn::Linear layer(5, 4);
  layer->to(torch::kBFloat16);
  auto earlier = torch::randn({4, 5}).to(torch::kBFloat16);
  layer->weight.mutable_grad() = earlier.clone();  // e.g. the tied embedding's backward ran first
  auto x = torch::randn({3, 5}).to(torch::kBFloat16);
  auto upstream = torch::randn({3, 4}).to(torch::kBFloat16);
  layer(x).backward(upstream);
  REQUIRE(layer->main_grad().scalar_type() == torch::kFloat);
  auto exact = earlier.to(torch::kDouble) + reference_wgrad({x}, {upstream}, torch::kBFloat16);
  REQUIRE((layer->main_grad().to(torch::kDouble) - exact).abs().max().item<double>() < 1e-5);
}

TEST_CASE("nn::Linear adds in place only in a plain backward; autograd::grad leaves weight.grad alone", "[nn]") {
  torch::manual_seed(4);
  mixprec::nn::Linear layer(torch::nn::LinearOptions(6, 4).bias(false));
  layer->to(torch::kBFloat16);
  auto x = torch::randn({3, 6}).to(torch::kBFloat16).requires_grad_();
  auto expected = mixprec::ops::linear_wgrad(torch::ones({3, 4}).to(torch::kBFloat16), x.detach());
  layer(x).to(torch::kFloat).sum().backward();
  REQUIRE(layer->weight.grad().scalar_type() == torch::kFloat);  // grad_dtype fp32: autograd kept it so
  REQUIRE(torch::equal(layer->weight.grad(), expected));
  const void* address = layer->weight.grad().data_ptr();
  const auto accumulated = layer->weight.grad().clone();

  auto gx = torch::autograd::grad({layer(x).to(torch::kFloat).sum()}, {x});
  REQUIRE(gx[0].defined());
  REQUIRE(torch::equal(layer->weight.grad(), accumulated));  // torch's promise: grad() does not touch .grad
  auto gw = torch::autograd::grad({layer(x).to(torch::kFloat).sum()}, {layer->weight});
  REQUIRE(gw[0].scalar_type() == torch::kFloat);
  REQUIRE(torch::equal(gw[0], expected));
  REQUIRE(torch::equal(layer->weight.grad(), accumulated));

  layer(x).to(torch::kFloat).sum().backward();  // a plain backward: the GEMM adds into .grad itself
  REQUIRE(layer->weight.grad().data_ptr() == address);
  REQUIRE(torch::equal(layer->weight.grad(), 2 * expected));
}

TEST_CASE("nn::Linear: a tensor hook on the weight sees each micro-batch's own gradient", "[nn]") {
  torch::manual_seed(5);
  mixprec::nn::Linear layer(torch::nn::LinearOptions(5, 3));
  std::vector<torch::Tensor> seen;
  layer->weight.register_hook([&seen](const torch::Tensor& g) { seen.push_back(g.clone()); });
  std::vector<torch::Tensor> xs = {torch::randn({2, 5}), torch::randn({4, 5})};
  for (const auto& x : xs) layer(x).sum().backward();
  REQUIRE(seen.size() == 2);
  for (size_t i = 0; i < xs.size(); ++i) {
    REQUIRE(torch::equal(seen[i], mixprec::ops::linear_wgrad(torch::ones({xs[i].size(0), 3}), xs[i])));
  }
  REQUIRE(torch::equal(layer->weight.grad(), seen[0] + seen[1]));
}
