// mixprec::int8, mixprec::nn::Int8Linear and mixprec::qat from C++ (CPU): quantization against plain tensor
// arithmetic in float64, the GEMM against an int64 product, fake quantization against torch's own, the layer
// against torch::nn::Linear, and QAT prepare / convert on a Sequential with a convolution.
#include <catch2/catch.hpp>
#include <mixprec/int8.h>
#include <mixprec/nn.h>
#include <mixprec/optim.h>
#include <mixprec/policy.h>
#include <mixprec/qat.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace {
double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a.to(torch::kDouble) - b.to(torch::kDouble)).norm() / b.to(torch::kDouble).norm()).item<double>();
}
}  // namespace

TEST_CASE("int8 quantize per row equals the rule computed in float64", "[int8]") {
  torch::manual_seed(0);
  auto x = torch::randn({33, 70}) * torch::logspace(-3, 3, 70);
  const auto q = mixprec::int8::quantize(x, 1, -1);
  auto xd = x.to(torch::kDouble);
  auto amax = xd.abs().amax({1}, true);
  // step = amax / 127 and scale = 1 / step, each correctly rounded to fp32 (an fp64 quotient of fp32 values
  // rounded once), then the fp32 product, then round half to even.
  auto step = (amax / 127.0).to(torch::kFloat).to(torch::kDouble);
  auto scale = (1.0 / step).to(torch::kFloat).to(torch::kDouble);
  auto codes = (xd * scale).to(torch::kFloat).to(torch::kDouble).clamp(-127, 127).round().to(torch::kChar);
  REQUIRE(torch::equal(q.data, codes));
  REQUIRE(torch::equal(q.scale_inv, step.to(torch::kFloat)));
  // Per group of 16 and per column keep the same bounds: dequantized within half a step.
  for (auto [br, bc] : {std::pair<int64_t, int64_t>{1, 16}, {-1, 1}, {-1, -1}}) {
    const auto g = mixprec::int8::quantize(x, br, bc);
    auto step = g.scale_inv;
    if (br == 1) step = step.repeat_interleave(16, 1).narrow(1, 0, 70);
    REQUIRE(((g.data.to(torch::kFloat) * step - x).abs() <= step * 0.5000001).all().item<bool>());
  }
  const auto bad = torch::tensor({1.0f, std::numeric_limits<float>::infinity(), -2.0f});
  REQUIRE(std::isnan(mixprec::int8::quantize(bad, -1, -1).scale_inv.item<float>()));
  REQUIRE_THROWS_WITH(mixprec::int8::quantize(x.to(torch::kDouble), 1, -1),
                      Catch::Contains("input must be float32, float16 or bfloat16"));
}

TEST_CASE("int8 mm is exact in int32 and dequantizes in fp32", "[int8]") {
  torch::manual_seed(1);
  auto a = torch::randint(-127, 128, {20, 3000}, torch::kChar);
  auto b = torch::randint(-127, 128, {3000, 12}, torch::kChar);
  auto acc = a.to(torch::kLong).matmul(b.to(torch::kLong));
  auto one = torch::ones({1});
  REQUIRE(torch::equal(mixprec::int8::mm(a, b, one, one), acc.to(torch::kFloat)));
  auto sa = torch::rand({20, 1}) + 0.5, sb = torch::rand({1, 12}) + 0.5;
  auto out = mixprec::int8::mm(a, b, sa, sb, torch::kBFloat16, torch::ones({12}));
  // The bias joins the fp32 product before the one rounding (float64 holds product + 1 exactly here).
  REQUIRE(torch::equal(out, (acc.to(torch::kFloat) * sa * sb).to(torch::kDouble).add(1).to(torch::kBFloat16)));
  REQUIRE_THROWS_WITH(mixprec::int8::mm(a, a, one, one), Catch::Contains("must share k"));
}

TEST_CASE("fake_quantize matches torch's fake quantization and its gradients", "[int8]") {
  torch::manual_seed(2);
  auto x = (torch::randn({8, 32}) * 2).requires_grad_();
  auto s = torch::full({1}, 0.02f);
  auto y = mixprec::int8::fake_quantize(x, s, -127, 127);
  auto xr = x.detach().clone().requires_grad_();
  auto ref = torch::fake_quantize_per_tensor_affine(xr, 0.02, 0, -127, 127);
  REQUIRE(torch::equal(y, ref));
  auto g = torch::randn({8, 32});
  y.backward(g);
  ref.backward(g);
  REQUIRE(torch::equal(x.grad(), xr.grad()));
  auto half = mixprec::int8::fake_quantize(x.detach().to(torch::kHalf), s, -8, 7);
  REQUIRE(half.scalar_type() == torch::kHalf);
  REQUIRE(torch::equal(half, mixprec::int8::fake_quantize(x.detach(), s, -8, 7).to(torch::kHalf)));
}

TEST_CASE("Int8Linear tracks torch::nn::Linear and accumulates an fp32 weight gradient", "[int8]") {
  torch::manual_seed(3);
  torch::nn::Linear ref(64, 32);
  mixprec::nn::Int8Linear layer(*ref);  // shares the parameters
  auto x = torch::randn({16, 64});
  REQUIRE(rel(layer(x), ref(x)) < 0.02);
  layer(x).sum().backward();
  REQUIRE(layer->weight.grad().scalar_type() == torch::kFloat);
  const auto first = layer->weight.grad().clone();
  layer(x).sum().backward();
  REQUIRE(torch::allclose(layer->weight.grad(), first * 2));
  mixprec::nn::Int8Linear all(torch::nn::LinearOptions(64, 32), mixprec::nn::Int8Gemms{.weight_grad = true});
  all(x).sum().backward();
  REQUIRE(all->weight.grad().defined());
}

TEST_CASE("Int8Linear: the weight cache spans a gradient-accumulation cycle", "[int8]") {
  torch::manual_seed(5);
  mixprec::nn::Int8Linear plain(64, 32);
  auto cached = std::dynamic_pointer_cast<mixprec::nn::Int8LinearImpl>(plain->clone());
  const auto x = torch::randn({16, 64}), g = torch::randn({16, 32});
  REQUIRE_THROWS_WITH(cached->forward(x, false), Catch::Contains("there was none"));
  for (int i = 0; i < 3; ++i) {  // the same outputs and gradients as quantizing the weight every time
    const auto xa = x.clone().requires_grad_(), xb = x.clone().requires_grad_();
    const auto a = plain->forward(xa), b = cached->forward(xb, i == 0);
    a.backward(g);
    b.backward(g);
    REQUIRE(torch::equal(a, b));
    REQUIRE(torch::equal(xa.grad(), xb.grad()));
    REQUIRE(torch::equal(plain->weight.grad(), cached->weight.grad()));
  }
  REQUIRE(cached->weight_cache.data.sizes() == torch::IntArrayRef{32, 64});
  REQUIRE(cached->weight_cache.scale_inv_t.sizes() == torch::IntArrayRef{1, 64});
  {
    torch::NoGradGuard no_grad;
    cached->weight.mul_(2);  // not read while the cache is reused
  }
  REQUIRE(torch::equal(cached->forward(x, false), plain->forward(x)));
  // Sequential passes the default (no cache) through AnyModule.
  torch::nn::Sequential model(mixprec::nn::Int8Linear(64, 32));
  REQUIRE(model->forward(x).sizes() == torch::IntArrayRef{16, 32});
  // A cache that is not this weight's is refused, naming what it holds.
  mixprec::nn::Int8WeightCache other;
  mixprec::nn::int8_linear(torch::randn({4, 48}), torch::randn({32, 48}), {}, {}, &other);
  REQUIRE_THROWS_WITH(mixprec::nn::int8_linear(x, cached->weight, {}, {}, &other),
                      Catch::Contains("weight cache does not hold"));
  // One filled under bf16 autocast holds the bf16 weight's codes: reusing it outside autocast is refused.
  mixprec::nn::Int8WeightCache under_autocast;
  {
    const mixprec::AutocastGuard guard(mixprec::Policy::mixed_bfloat16(), torch::kCPU);
    mixprec::nn::int8_linear(x, cached->weight, {}, {}, &under_autocast);
  }
  REQUIRE(under_autocast.dtype == torch::kBFloat16);
  REQUIRE_THROWS_WITH(mixprec::nn::int8_linear(x, cached->weight, {}, {}, &under_autocast),
                      Catch::Contains("quantized in BFloat16, and this call computes in Float"));
  cached->to(torch::kBFloat16);
  REQUIRE(cached->weight_cache.empty());
  cached->forward(x.to(torch::kBFloat16), true);
  REQUIRE_FALSE(cached->weight_cache.empty());
  mixprec::apply(*cached, mixprec::Policy::from_string("16-true"));  // a cast by the policy empties it too
  REQUIRE(cached->weight_cache.empty());
  // New weight values (re-initialised, or read from an archive) make a kept quantization stale too.
  const auto x16 = x.to(cached->weight.scalar_type());
  cached->forward(x16, true);
  cached->reset_parameters();
  REQUIRE(cached->weight_cache.empty());
  std::stringstream archive;
  torch::save(std::dynamic_pointer_cast<mixprec::nn::Int8LinearImpl>(cached->clone()), archive);
  auto loaded = std::dynamic_pointer_cast<mixprec::nn::Int8LinearImpl>(cached->clone());
  loaded->forward(x16, true);
  REQUIRE_FALSE(loaded->weight_cache.empty());
  torch::load(loaded, archive);
  REQUIRE(loaded->weight_cache.empty());
}

TEST_CASE("Float8Linear: an archive read into the layer drops its weight cache", "[int8][fp8]") {
  torch::manual_seed(6);
  mixprec::nn::Float8Linear layer(64, 32);
  const auto x = torch::randn({16, 64});
  std::stringstream archive;
  torch::save(layer, archive);
  layer->forward(x, true);
  REQUIRE_FALSE(layer->weight_cache.empty());
  torch::load(layer, archive);
  REQUIRE(layer->weight_cache.empty());
  REQUIRE_THROWS_WITH(layer->forward(x, false), Catch::Contains("there was none"));
}

TEST_CASE("qat prepare trains a Sequential with a convolution and convert stores integer weights", "[int8][qat]") {
  torch::manual_seed(4);
  torch::nn::Sequential model(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)), torch::nn::ReLU(),
                              torch::nn::Flatten(), torch::nn::Linear(4 * 6 * 6, 8), torch::nn::ReLU(),
                              torch::nn::Linear(8, 2));
  auto prepared = mixprec::qat::prepare(model, {.learnable_scales = true});
  REQUIRE(prepared->ptr(0)->as<mixprec::qat::QATConv2d>() != nullptr);
  REQUIRE(prepared->ptr(3)->as<mixprec::qat::QATLinear>() != nullptr);
  auto x = torch::randn({32, 1, 6, 6});
  auto y = (x.mean({1, 2, 3}) > 0).to(torch::kLong);
  mixprec::optim::AdamW opt(prepared->parameters(), mixprec::optim::AdamWOptions(1e-2));
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    auto loss = torch::cross_entropy_loss(prepared->forward(x), y);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  REQUIRE(last < first / 2);
  // The codes convert() stores are what training simulated.
  auto* qat_linear = prepared->ptr(3)->as<mixprec::qat::QATLinear>();
  const auto simulated = mixprec::qat::fake_quantize_weight(qat_linear->weight, qat_linear->config,
                                                            qat_linear->weight_step).detach();
  auto converted = mixprec::qat::convert(prepared);
  auto* q = converted->ptr(3)->as<mixprec::qat::QuantizedLinear>();
  REQUIRE(q != nullptr);
  REQUIRE(q->weight_codes.scalar_type() == torch::kChar);
  REQUIRE(torch::equal(mixprec::qat::dequantize_weight(q->weight_codes, q->weight_scale), simulated));
  torch::NoGradGuard no_grad;
  REQUIRE(rel(converted->forward(x), prepared->forward(x)) < 0.02);
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(converted->clone());
  REQUIRE(torch::equal(copy->forward(x), converted->forward(x)));
  auto state = converted->named_buffers();
  REQUIRE(state.contains("3.weight_codes"));
  REQUIRE(state.contains("0.weight_scale"));
  REQUIRE_THROWS_WITH(mixprec::qat::prepare(model, {.weight_bits = 2}), Catch::Contains("weight_bits must be 8 or 4"));
}

TEST_CASE("qat learnable activation steps: set by the first batch, trained, kept by loads, static after convert",
          "[int8][qat]") {
  torch::manual_seed(9);
  const mixprec::qat::QATConfig config{.learnable_activation_scales = true};
  const auto make = [&] {
    torch::manual_seed(9);
    return mixprec::qat::prepare(
        torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4)), config);
  };
  auto model = make();
  auto* first = model->ptr(0)->as<mixprec::qat::QATLinear>();
  REQUIRE(first->input_step.sizes() == torch::IntArrayRef{1});
  REQUIRE(first->input_step.item<float>() == 0.0f);  // not set yet
  const auto x = torch::randn({32, 8}) * 3;
  const auto y = torch::randn({32, 4});
  model->forward(x);
  REQUIRE(first->input_step.item<float>() == (x.abs().max() / 127).item<float>());
  const auto start = first->input_step.detach().clone();
  mixprec::optim::AdamW opt(model->parameters(), mixprec::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    torch::mse_loss(model->forward(x * 2), y).backward();
    opt.step();
  }
  REQUIRE(first->input_step.grad().defined());
  const auto learned = first->input_step.detach().clone();
  REQUIRE_FALSE(torch::equal(learned, start));

  // A fresh model that loads the trained parameters keeps the loaded steps at its first forward.
  std::stringstream archive;
  torch::save(model, archive);
  auto fresh = make();
  torch::load(fresh, archive);
  fresh->forward(x * 100);
  auto* fresh_first = fresh->ptr(0)->as<mixprec::qat::QATLinear>();
  REQUIRE(torch::equal(fresh_first->input_step.detach(), learned));
  REQUIRE(fresh_first->input_step_checked);
  archive.seekg(0);
  torch::load(fresh, archive);  // a load into a layer that has run: its step is read again at the next forward
  REQUIRE_FALSE(fresh_first->input_step_checked);

  // convert: the learned step is the static input scale; the converted model computes what training simulated.
  model->eval();
  torch::Tensor simulated;
  {
    torch::NoGradGuard no_grad;
    simulated = model->forward(x);
  }
  auto converted = mixprec::qat::convert(model);
  auto* q = converted->ptr(0)->as<mixprec::qat::QuantizedLinear>();
  REQUIRE(torch::equal(q->input_scale, learned.abs()));
  REQUIRE(converted->named_buffers().contains("2.input_scale"));
  torch::NoGradGuard no_grad;
  REQUIRE(torch::allclose(converted->forward(x), simulated, 1e-5, 1e-5));

  // Never run: the step converts to 0, which the first forward refuses, until a converted archive is loaded (a
  // model rebuilt as prepare -> convert, as torch.ao's convert rebuilds without calibration).
  auto rebuilt = mixprec::qat::convert(make());
  REQUIRE_THROWS_WITH(rebuilt->forward(x), Catch::Contains("QuantizedLinear: input_scale is 0: the QAT layer's "
                                                           "input_step was never set before convert"));
  std::stringstream converted_archive;
  torch::save(converted, converted_archive);
  torch::load(rebuilt, converted_archive);
  REQUIRE(torch::equal(rebuilt->forward(x), converted->forward(x)));
  // A config without activations refuses the learnable step.
  const mixprec::qat::QATConfig no_activations{.activations = false, .learnable_activation_scales = true};
  REQUIRE_THROWS_WITH(mixprec::qat::QATLinear(*torch::nn::Linear(4, 4), no_activations),
                      Catch::Contains("learnable_activation_scales needs activations"));
  REQUIRE_THROWS_WITH(mixprec::qat::QATLinear(*torch::nn::Linear(4, 4), mixprec::qat::QATConfig{.group_size = 0}),
                      Catch::Contains("group_size must be a positive number of input features"));
}

TEST_CASE("qat: a first batch the layer refuses leaves the learnable input step unset, as in Python", "[int8][qat]") {
  const mixprec::qat::QATConfig config{.learnable_activation_scales = true};
  const auto make = [&] {
    torch::manual_seed(3);
    return mixprec::qat::prepare(torch::nn::Sequential(torch::nn::Linear(32, 12)), config);
  };
  auto model = make(), twin = make();
  auto* layer = model->ptr(0)->as<mixprec::qat::QATLinear>();
  REQUIRE_THROWS(model->forward(torch::randn({8, 31}) * 3));  // the wrong feature count: linear refuses it
  REQUIRE(layer->input_step.item<float>() == 0.0f);          // still unset (it was set from the refused batch)
  const auto good = torch::randn({8, 32}) * 3;
  REQUIRE(torch::equal(model->forward(good), twin->forward(good)));
  REQUIRE(layer->input_step.item<float>() > 0.0f);
  REQUIRE(torch::equal(layer->input_step, twin->ptr(0)->as<mixprec::qat::QATLinear>()->input_step));
}

TEST_CASE("qat: a plain model's archive loaded after prepare restarts the learnable steps from its weights",
          "[int8][qat]") {
  const mixprec::qat::QATConfig config{.learnable_scales = true, .learnable_activation_scales = true};
  const auto plain = [](uint64_t seed) {
    torch::manual_seed(seed);
    return torch::nn::Sequential(torch::nn::Linear(16, 8), torch::nn::ReLU(), torch::nn::Linear(8, 4));
  };
  std::stringstream pretrained;
  torch::save(plain(1), pretrained);
  auto expected = mixprec::qat::prepare(plain(1), config);
  auto model = mixprec::qat::prepare(plain(2), config);
  auto* first = model->ptr(0)->as<mixprec::qat::QATLinear>();
  const torch::Tensor weight_step = first->weight_step;  // the tensors an optimizer would hold
  const auto x = torch::randn({4, 16});
  model->forward(x);  // sets the input steps
  REQUIRE(first->input_step.item<float>() != 0.0f);
  torch::load(model, pretrained);
  auto* want = expected->ptr(0)->as<mixprec::qat::QATLinear>();
  REQUIRE(first->weight_step.is_same(weight_step));
  REQUIRE(torch::equal(first->weight_step, want->weight_step));
  REQUIRE(torch::equal(first->weight, want->weight));
  REQUIRE(first->input_step.item<float>() == 0.0f);  // set afresh by the next batch
  const auto y = x * 3;
  REQUIRE(torch::equal(model->forward(y), expected->forward(y)));
  REQUIRE(torch::equal(first->input_step, want->input_step));

  // An archive with part of the steps is refused before anything is read.
  std::stringstream partial;
  torch::save(mixprec::qat::prepare(plain(3), {.learnable_scales = true}), partial);
  const auto before = first->weight.clone();
  REQUIRE_THROWS_WITH(torch::load(model, partial), Catch::Contains("holds part of the QAT steps; missing: input_step"));
  REQUIRE(torch::equal(first->weight, before));
}

TEST_CASE("qat fold_batchnorm: the conv quantizes its folded weight, convert leaves no BatchNorm", "[int8][qat]") {
  torch::manual_seed(12);
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(1, 4, 3).padding(1));
  torch::nn::BatchNorm2d bn(4);
  {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(0.5, 2.0);
    bn->running_var.uniform_(0.5, 3.0);
  }
  torch::nn::Sequential model(conv, bn, torch::nn::ReLU(), torch::nn::Flatten(), torch::nn::Linear(4 * 6 * 6, 2));
  auto prepared = mixprec::qat::prepare(model, {.fold_batchnorm = true});
  auto* layer = prepared->ptr(0)->as<mixprec::qat::QATConv2d>();
  REQUIRE(layer != nullptr);
  REQUIRE(layer->bn.ptr() == bn.ptr());  // the same BatchNorm, now the conv's child
  REQUIRE(prepared->ptr(1)->as<torch::nn::Identity>() != nullptr);
  REQUIRE(prepared->named_parameters().contains("0.bn.weight"));
  REQUIRE(prepared->parameters().size() == model->parameters().size());

  // Training: the output before the BatchNorm is conv(x, fq(W * f)) / f + b, computed here from plain ops.
  const auto x = torch::randn({16, 1, 6, 6});
  const auto xq = mixprec::qat::fake_quantize_input(x, false);
  {
    torch::NoGradGuard no_grad;
    const auto f = bn->weight / (bn->running_var + bn->options.eps()).sqrt();
    const auto w = conv->weight * f.reshape({-1, 1, 1, 1});
    const auto step = (w.abs().amax({1, 2, 3}, true) / 127).clamp_min(std::numeric_limits<float>::min());
    const auto wq = (w * step.reciprocal()).round().clamp(-127, 127) * step;
    const auto want = torch::conv2d(xq, wq, {}, 1, 1) / f.reshape({1, -1, 1, 1}) + conv->bias.reshape({1, -1, 1, 1});
    const auto got = mixprec::qat::folded_conv2d(xq, conv->weight, conv->bias, {}, layer->config, bn->weight,
                                                 bn->running_var, bn->options.eps(), {1, 1}, {1, 1}, {1, 1}, 1);
    REQUIRE(torch::allclose(got, want, 1e-5, 1e-5));
  }
  const auto y = (x.mean({1, 2, 3}) > 0).to(torch::kLong);
  mixprec::optim::AdamW opt(prepared->parameters(), mixprec::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    torch::cross_entropy_loss(prepared->forward(x), y).backward();
    opt.step();
  }
  REQUIRE(bn->weight.grad().defined());
  // A clone takes its own copy of the folded BatchNorm.
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(prepared->clone());
  REQUIRE(copy->ptr(0)->as<mixprec::qat::QATConv2d>()->bn.ptr() != bn.ptr());
  prepared->eval();
  copy->eval();
  torch::NoGradGuard no_grad;
  const auto simulated = prepared->forward(x);
  REQUIRE(torch::equal(copy->forward(x), simulated));
  // convert: the folded weight's codes and bias; no BatchNorm left, the same outputs.
  auto converted = mixprec::qat::convert(prepared);
  REQUIRE(converted->ptr(0)->as<mixprec::qat::QuantizedConv2d>() != nullptr);
  for (const auto& item : converted->named_buffers()) REQUIRE(item.key().find("bn.") == std::string::npos);
  REQUIRE(torch::allclose(converted->forward(x), simulated, 1e-4, 1e-5));
  REQUIRE_THROWS_WITH(mixprec::qat::QATConv2d(*conv, mixprec::qat::QATConfig{}, torch::nn::BatchNorm2d(3)),
                      Catch::Contains("folding needs a BatchNorm2d with running statistics"));
}

TEST_CASE("qat keeps a named Sequential's entry names, and converted layers keep integer codes through to(dtype)",
          "[int8][qat]") {
  torch::manual_seed(23);
  torch::nn::Sequential model({{"fc1", torch::nn::Linear(16, 16)}, {"act", torch::nn::ReLU()},
                               {"fc2", torch::nn::Linear(16, 4)}});
  std::stringstream archive;
  torch::save(model, archive);
  auto prepared = mixprec::qat::prepare(model);
  const auto names = [](const torch::nn::Sequential& m) {
    std::vector<std::string> out;
    for (const auto& item : m->named_parameters()) out.push_back(item.key());
    return out;
  };
  REQUIRE(names(prepared) == names(model));  // "fc1.weight", ...: checkpoints of the plain model still fit
  torch::load(prepared, archive);
  auto converted = mixprec::qat::convert(prepared);
  REQUIRE(converted->named_children().keys() == std::vector<std::string>{"fc1", "act", "fc2"});
  const auto x = torch::randn({4, 16});
  const auto expected = converted->forward(x.to(torch::kBFloat16));
  converted->to(torch::kBFloat16);
  const auto& fc1 = *converted->named_children()["fc1"]->as<mixprec::qat::QuantizedLinear>();
  REQUIRE(fc1.weight_codes.scalar_type() == torch::kChar);
  REQUIRE(fc1.weight_scale.scalar_type() == torch::kFloat);
  REQUIRE(fc1.bias.scalar_type() == torch::kBFloat16);
  const auto got = converted->forward(x.to(torch::kBFloat16));
  REQUIRE(got.scalar_type() == torch::kBFloat16);
  REQUIRE(torch::allclose(got.to(torch::kFloat), expected.to(torch::kFloat), 2e-2, 2e-2));
}

TEST_CASE("QAT steps and converted scales stay float32 through to(dtype) and mixprec::apply, as in Python",
          "[int8][qat][policy]") {
  mixprec::qat::QATConfig cfg;
  cfg.learnable_scales = true;
  cfg.learnable_activation_scales = true;
  const auto make = [&cfg] {
    torch::manual_seed(31);
    torch::nn::Linear fc(8, 4);
    torch::nn::Conv2d conv(torch::nn::Conv2dOptions(2, 3, 3));
    torch::nn::Sequential model(mixprec::qat::QATLinear(*fc, cfg), mixprec::qat::QATConv2d(*conv, cfg));
    auto& lin = *model->ptr(0)->as<mixprec::qat::QATLinear>();
    auto& cnv = *model->ptr(1)->as<mixprec::qat::QATConv2d>();
    lin.forward(torch::randn({2, 8}));  // the input steps start from the first batch
    cnv.forward(torch::randn({1, 2, 5, 5}));
    return model;
  };
  const auto reference = make();
  const auto steps = [](const torch::nn::Sequential& m) {
    std::vector<torch::Tensor> out;
    for (const auto& item : m->named_parameters()) {
      if (item.key().find("_step") != std::string::npos) out.push_back(item.value());
    }
    return out;
  };
  for (int how = 0; how < 2; ++how) {
    auto model = make();
    if (how == 0) {
      model->to(torch::kBFloat16);
    } else {
      mixprec::apply(*model, mixprec::Policy::bfloat16());
    }
    const auto& lin = *model->ptr(0)->as<mixprec::qat::QATLinear>();
    REQUIRE(lin.weight.scalar_type() == torch::kBFloat16);
    REQUIRE(model->ptr(1)->as<mixprec::qat::QATConv2d>()->weight.scalar_type() == torch::kBFloat16);
    const auto ours = steps(model), exact = steps(reference);
    REQUIRE(ours.size() == 4);
    for (size_t i = 0; i < ours.size(); ++i) {
      REQUIRE(ours[i].scalar_type() == torch::kFloat);
      REQUIRE(torch::equal(ours[i], exact[i]));
    }
    // Converted: the codes come from the fp32 steps, and the scales stay float32 through apply.
    mixprec::qat::QuantizedLinear converted(lin);
    mixprec::qat::QuantizedLinear from_fp32(*reference->ptr(0)->as<mixprec::qat::QATLinear>());
    REQUIRE(torch::equal(converted->weight_scale, from_fp32->weight_scale));
    REQUIRE(torch::equal(converted->input_scale, from_fp32->input_scale));
    torch::nn::Sequential holder(converted);
    mixprec::apply(*holder, mixprec::Policy::bfloat16());
    REQUIRE(converted->weight_scale.scalar_type() == torch::kFloat);
    REQUIRE(converted->input_scale.scalar_type() == torch::kFloat);
    REQUIRE(converted->weight_codes.scalar_type() == torch::kChar);
    REQUIRE(converted->bias.scalar_type() == torch::kBFloat16);
    std::ostringstream printed;
    printed << *converted;
    REQUIRE(printed.str() == "mixprec::qat::QuantizedLinear(in_features=8, out_features=4, weight_bits=8)");
  }
  mixprec::qat::QATConfig int4;
  int4.weight_bits = 4;
  torch::nn::Linear fc(8, 4);
  std::ostringstream printed;  // INT4 codes are packed two to a byte: the features are still the layer's
  printed << *mixprec::qat::QuantizedLinear(*mixprec::qat::QATLinear(*fc, int4));
  REQUIRE(printed.str() == "mixprec::qat::QuantizedLinear(in_features=8, out_features=4, weight_bits=4)");
}

TEST_CASE("qat prepare takes mixprec::nn::Linear entries and refuses 8-bit ones by name", "[int8][qat]") {
  torch::manual_seed(24);
  torch::nn::Linear base(16, 16);
  torch::nn::Sequential model(mixprec::nn::Linear(*base), torch::nn::ReLU(), torch::nn::Linear(16, 4));
  auto prepared = mixprec::qat::prepare(model);
  REQUIRE(prepared->ptr(0)->as<mixprec::qat::QATLinear>() != nullptr);
  REQUIRE(prepared->ptr(0)->as<mixprec::qat::QATLinear>()->weight.is_same(base->weight));  // the same tensors
  prepared->forward(torch::randn({4, 16})).sum().backward();
  REQUIRE(base->weight.grad().defined());
  // A bf16 mixprec::nn::Linear kept an fp32 gradient; its QAT layer has torch's (the weight's dtype), as in Python,
  // and a gradient it held is converted.
  torch::nn::Linear half_base(16, 16);
  half_base->to(torch::kBFloat16);
  mixprec::nn::Linear converted(*half_base);
  REQUIRE(half_base->weight.grad_dtype() == torch::kFloat);
  converted->forward(torch::randn({2, 16}, torch::kBFloat16)).sum().backward();
  REQUIRE(half_base->weight.grad().scalar_type() == torch::kFloat);
  const torch::Tensor fp32_grad = half_base->weight.grad().clone();
  auto half_prepared = mixprec::qat::prepare(torch::nn::Sequential(converted));
  REQUIRE(half_base->weight.grad_dtype() == torch::kBFloat16);
  REQUIRE(torch::equal(half_base->weight.grad(), fp32_grad.to(torch::kBFloat16)));
  half_prepared->forward(torch::randn({2, 16}, torch::kBFloat16)).sum().backward();
  REQUIRE(half_base->weight.grad().scalar_type() == torch::kBFloat16);
  half_prepared->to(torch::kFloat);  // and through casts (it stayed bf16, pinned)
  half_prepared->zero_grad();
  half_prepared->forward(torch::randn({2, 16})).sum().backward();
  REQUIRE(half_base->weight.grad().scalar_type() == torch::kFloat);
  mixprec::apply(*half_prepared, mixprec::Policy::bfloat16());  // a policy's casts too
  half_prepared->zero_grad();
  half_prepared->forward(torch::randn({2, 16}, torch::kBFloat16)).sum().backward();
  REQUIRE(half_base->weight.grad().scalar_type() == torch::kBFloat16);
  torch::nn::Sequential eight_bit(torch::nn::Linear(16, 16), mixprec::nn::Int8Linear(torch::nn::LinearOptions(16, 4)));
  REQUIRE_THROWS_WITH(mixprec::qat::prepare(eight_bit), Catch::Contains("entry '1'") &&
                                                         Catch::Contains("already runs its GEMMs in 8 bits"));
  auto partly = mixprec::qat::prepare(eight_bit, {}, [](const std::string& name, const torch::nn::Module&) {
    return name != "1";
  });
  REQUIRE(partly->ptr(0)->as<mixprec::qat::QATLinear>() != nullptr);
  REQUIRE(partly->ptr(1).get() == eight_bit->ptr(1).get());
}

TEST_CASE("qat prepare takes a filter: the layers it refuses stay float, shared", "[int8][qat]") {
  torch::manual_seed(21);
  torch::nn::BatchNorm2d bn(4);
  torch::nn::Sequential model(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)), bn, torch::nn::ReLU(),
                              torch::nn::Flatten(), torch::nn::Linear(4 * 6 * 6, 8), torch::nn::ReLU(),
                              torch::nn::Linear(8, 2));
  std::vector<std::string> asked;
  const auto keep_last_out = [&](const std::string& name, const torch::nn::Module&) {
    asked.push_back(name);
    return name != "6";  // the output layer stays in float, as usually advised
  };
  auto prepared = mixprec::qat::prepare(model, {.fold_batchnorm = true}, keep_last_out);
  REQUIRE(asked == std::vector<std::string>{"0", "4", "6"});  // the layers only, by their names in the model
  REQUIRE(prepared->ptr(0)->as<mixprec::qat::QATConv2d>()->bn.ptr() == bn.ptr());
  REQUIRE(prepared->ptr(1)->as<torch::nn::Identity>() != nullptr);
  REQUIRE(prepared->ptr(4)->as<mixprec::qat::QATLinear>() != nullptr);
  REQUIRE(prepared->ptr(6).get() == model->ptr(6).get());  // left as it was, shared
  auto names = prepared->named_parameters();
  REQUIRE(names.size() == model->parameters().size());
  for (const char* key : {"0.weight", "0.bn.weight", "4.weight", "4.bias", "6.weight"}) REQUIRE(names.contains(key));

  const auto x = torch::randn({16, 1, 6, 6});
  const auto y = (x.mean({1, 2, 3}) > 0).to(torch::kLong);
  mixprec::optim::AdamW opt(prepared->parameters(), mixprec::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    torch::cross_entropy_loss(prepared->forward(x), y).backward();
    opt.step();
  }
  prepared->eval();
  torch::NoGradGuard no_grad;
  auto converted = mixprec::qat::convert(prepared);
  REQUIRE(converted->ptr(0)->as<mixprec::qat::QuantizedConv2d>() != nullptr);
  REQUIRE(converted->ptr(4)->as<mixprec::qat::QuantizedLinear>() != nullptr);
  REQUIRE(converted->ptr(6)->as<torch::nn::Linear>() != nullptr);
  // The float layer computes in float: the last layer's output is exactly torch's on the converted features.
  const auto features = converted->ptr(5)->as<torch::nn::ReLU>()->forward(
      converted->ptr(4)->as<mixprec::qat::QuantizedLinear>()->forward(converted->ptr(3)->as<torch::nn::Flatten>()->forward(
          converted->ptr(2)->as<torch::nn::ReLU>()->forward(converted->ptr(0)->as<mixprec::qat::QuantizedConv2d>()->forward(x)))));
  REQUIRE(torch::equal(converted->forward(x), model->ptr(6)->as<torch::nn::Linear>()->forward(features)));
  REQUIRE(torch::allclose(converted->forward(x), prepared->forward(x), 1e-4, 1e-5));
}

TEST_CASE("qat reset_parameters: torch's initialisation, and the learnable steps restart from the new weight",
          "[int8][qat]") {
  const mixprec::qat::QATConfig config{.learnable_scales = true, .learnable_activation_scales = true};
  torch::manual_seed(11);
  torch::nn::Linear plain(16, 8);
  mixprec::qat::QATLinear layer(*plain, config);
  layer->forward(torch::randn({4, 16}));  // sets the input step
  {
    torch::NoGradGuard no_grad;
    layer->weight_step.mul_(3);
  }
  const torch::Tensor weight_step = layer->weight_step;
  torch::manual_seed(12);
  layer->reset_parameters();
  torch::manual_seed(12);
  torch::nn::Linear reference(16, 8);  // torch's initialisation, from the same generator state
  REQUIRE(torch::equal(layer->weight, reference->weight));
  REQUIRE(torch::equal(layer->bias, reference->bias));
  mixprec::qat::QATLinear fresh(*reference, config);  // prepare's steps for those weights
  REQUIRE(torch::equal(layer->weight_step, fresh->weight_step));
  REQUIRE(layer->weight_step.is_same(weight_step));  // in place: an optimizer keeps its tensor
  REQUIRE(torch::equal(layer->input_step, torch::zeros({1})));
  REQUIRE_FALSE(layer->input_step_checked);

  // A folded convolution: torch::nn::Conv2d's initialisation, its BatchNorm reset too, the steps of the fold.
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 8, 3).padding(1));
  torch::nn::BatchNorm2d bn(8);
  {
    torch::NoGradGuard no_grad;
    bn->running_var.fill_(4.0);
    bn->weight.fill_(0.5);
  }
  mixprec::qat::QATConv2d folded(*conv, config, bn);
  torch::manual_seed(13);
  folded->reset_parameters();
  torch::manual_seed(13);
  torch::nn::Conv2d conv_reference(torch::nn::Conv2dOptions(3, 8, 3).padding(1));
  REQUIRE(torch::equal(folded->weight, conv_reference->weight));
  REQUIRE(torch::equal(folded->bias, conv_reference->bias));
  REQUIRE(torch::equal(folded->bn->running_var, torch::ones({8})));
  mixprec::qat::QATConv2d fresh_folded(*conv_reference, config, torch::nn::BatchNorm2d(8));
  REQUIRE(torch::equal(folded->weight_step, fresh_folded->weight_step));
}
