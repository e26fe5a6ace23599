// mixprec::fp8 from C++ (CPU): casts against Tensor::to over every code and random fp32 bit patterns,
// the numerics header's decoder, block scaling against a reference computed with plain tensor ops, and
// the delayed-scaling window, and the amax all-reduce over a process group of two threads.
#include <catch2/catch.hpp>
#include <mixprec/fp8.h>
#include <mixprec/int8.h>
#include <mixprec/nn.h>
#include <mixprec/ops.h>
#include <mixprec/policy.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ops/fp8.h"
#include "thread_group.h"

using mixprec_test::thread_group;
using mixprec_test::ThreadRendezvous;

namespace {
torch::Tensor one(float v) { return torch::full({1}, v); }

bool same_codes(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::equal(a.view(torch::kByte), b.view(torch::kByte));
}
}  // namespace

TEST_CASE("fp8 nearest quantize equals Tensor::to on every code and on random bit patterns", "[fp8]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  auto random = torch::randint(-(int64_t{1} << 31), int64_t{1} << 31, {1 << 18}, gen, torch::kLong)
                    .to(torch::kInt)
                    .view(torch::kFloat);
  for (auto dtype : {torch::kFloat8_e4m3fn, torch::kFloat8_e5m2}) {
    auto codes = torch::arange(256, torch::kInt).to(torch::kByte).view(dtype).to(torch::kFloat);
    auto x = torch::cat({codes, random, random * 1e-30, random * 1e-38});
    const double max = mixprec::fp8::max_finite(dtype);
    // Saturation: what torch gives for the clamped input (clamp keeps NaN, makes inf +-max).
    auto q = mixprec::fp8::quantize(x, one(1.f), dtype);
    REQUIRE(same_codes(q.data, x.clamp(-max, max).to(dtype)));
    REQUIRE_FALSE(q.data_t.defined());
    // Without: E5M2 is Tensor::to everywhere; E4M3 where every torch release agrees (it rounds to a
    // finite code), and NaN beyond.
    auto raw = mixprec::fp8::quantize(x, one(1.f), dtype, {.saturate = false}).data;
    if (dtype == torch::kFloat8_e5m2) {
      REQUIRE(same_codes(raw, x.to(dtype)));
    } else {
      auto finite = x.abs() <= 464;
      REQUIRE(same_codes(raw.index({finite}), x.index({finite}).to(dtype)));
      REQUIRE(raw.index({~finite}).to(torch::kFloat).isnan().all().item<bool>());
    }
  }
}

TEST_CASE("the numerics header decodes every code as torch does", "[fp8]") {
  for (auto [dtype, format] : {std::pair{torch::kFloat8_e4m3fn, mixprec::fp8::Format::E4M3},
                               std::pair{torch::kFloat8_e5m2, mixprec::fp8::Format::E5M2}}) {
    auto ref = torch::arange(256, torch::kInt).to(torch::kByte).view(dtype).to(torch::kFloat);
    for (int c = 0; c < 256; ++c) {
      const float ours = mixprec::fp8::from_fp8(static_cast<uint8_t>(c), format);
      const float theirs = ref[c].item<float>();
      if (std::isnan(theirs)) {
        REQUIRE(std::isnan(ours));
      } else {
        REQUIRE(ours == theirs);
        REQUIRE(std::signbit(ours) == std::signbit(theirs));
      }
    }
  }
  REQUIRE(mixprec::fp8::max_finite(torch::kFloat8_e4m3fn) == 448.0);
  REQUIRE(mixprec::fp8::max_finite(torch::kFloat8_e5m2) == 57344.0);
  REQUIRE_THROWS_WITH(mixprec::fp8::max_finite(torch::kHalf),
                      Catch::Contains("dtype must be torch.float8_e4m3fn or torch.float8_e5m2"));
}

TEST_CASE("fp8 quantize: amax and the transposed copy come from the same pass", "[fp8]") {
  auto x = torch::randn({45, 70}) * 20;
  x.index_put_({3, 4}, -300.f);
  auto q = mixprec::fp8::quantize(x, one(0.5f), torch::kFloat8_e5m2, {.transpose = true});
  REQUIRE(q.amax.item<float>() == 300.f);
  REQUIRE(same_codes(q.data, (x * 0.5f).to(torch::kFloat8_e5m2)));
  REQUIRE(q.data_t.sizes() == torch::IntArrayRef{70, 45});
  REQUIRE(torch::equal(q.data_t.view(torch::kByte), q.data.view(torch::kByte).t()));
}

TEST_CASE("fp8 block scaling: each block's amax maps to the format's largest value", "[fp8]") {
  auto x = torch::randn({130, 260}) * torch::logspace(-2, 2, 260);
  auto q = mixprec::fp8::quantize_blockwise(x, torch::kFloat8_e4m3fn, 128, 128, {.pow2_scales = true});
  REQUIRE(q.scale_inv.sizes() == torch::IntArrayRef{2, 3});
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      using torch::indexing::Slice;
      auto blk = x.index({Slice(i * 128, (i + 1) * 128), Slice(j * 128, (j + 1) * 128)});
      const double amax = blk.abs().max().item<double>();
      const double scale = std::exp2(std::floor(std::log2(448.0 / amax)));  // pow2: exact in float
      REQUIRE(q.scale_inv[i][j].item<float>() == static_cast<float>(1.0 / scale));
      auto codes = q.data.index({Slice(i * 128, (i + 1) * 128), Slice(j * 128, (j + 1) * 128)});
      REQUIRE(same_codes(codes.contiguous(), (blk * static_cast<float>(scale)).to(torch::kFloat8_e4m3fn)));
    }
  }
}

TEST_CASE("fp8 delayed scaling keeps a spike for the history's length", "[fp8]") {
  const int64_t history = 3;
  auto h = torch::zeros({history, 1});
  auto scale = torch::ones({1});
  auto scale_inv = torch::ones({1});
  const float amaxes[] = {4.f, 448.f, 4.f, 4.f, 4.f, 0.f, std::numeric_limits<float>::infinity()};
  const float expected[] = {112.f, 1.f, 1.f, 1.f, 112.f, 112.f, 112.f};
  for (int k = 0; k < 7; ++k) {
    h.index_put_({0, 0}, amaxes[k]);
    mixprec::fp8::update_scales_(h, scale, scale_inv, torch::kFloat8_e4m3fn);
    INFO("step " << k);
    REQUIRE(scale.item<float>() == expected[k]);
    REQUIRE(scale_inv.item<float>() == 1.f / expected[k]);
    REQUIRE(h[0][0].item<float>() == 0.f);
  }
  REQUIRE_THROWS_WITH(mixprec::fp8::update_scales_(h, scale, scale_inv, torch::kFloat8_e4m3fn, "mean"),
                      Catch::Contains("algo must be \"max\" or \"most_recent\""));
}

TEST_CASE("fp8 gemm and gemm_accum_ against a float64 product of the dequantized operands", "[fp8]") {
  auto x = torch::randn({32, 160});
  auto w = torch::randn({48, 160});
  auto qx = mixprec::fp8::quantize_blockwise(x, torch::kFloat8_e4m3fn, 1, 128);    // 1x128 blocks
  auto qw = mixprec::fp8::quantize_blockwise(w, torch::kFloat8_e4m3fn, 128, 128);  // one partial 128-row block
  REQUIRE(qx.scale_inv.sizes() == torch::IntArrayRef{32, 2});
  REQUIRE(qw.scale_inv.sizes() == torch::IntArrayRef{1, 2});
  auto cols = torch::arange(160, torch::kLong).div(128, "floor");
  auto xd = qx.data.to(torch::kDouble) * qx.scale_inv.to(torch::kDouble).index_select(1, cols);
  auto wd = qw.data.to(torch::kDouble) * qw.scale_inv.to(torch::kDouble).index_select(1, cols);
  auto exact = torch::mm(xd, wd.t());
  auto bound = torch::mm(xd.abs(), wd.abs().t()) * (162 * std::ldexp(1.0, -24) * 1.01);
  auto out = mixprec::fp8::gemm(qx.data, qw.data, qx.scale_inv, qw.scale_inv, torch::kFloat);
  REQUIRE(((out.to(torch::kDouble) - exact).abs() <= bound).all().item<bool>());
  auto acc = torch::ones({32, 48});
  mixprec::fp8::gemm_accum_(acc, qx.data, qw.data, qx.scale_inv, qw.scale_inv);
  REQUIRE(((acc.to(torch::kDouble) - exact - 1).abs() <= bound + 1e-6).all().item<bool>());
  REQUIRE_THROWS_WITH(mixprec::fp8::gemm(qx.data, qw.data.t(), qx.scale_inv, qw.scale_inv),
                      Catch::Contains("must share k"));
  // The operands the emulation multiplies: each code's exact value times its block's scale, one rounding.
  REQUIRE(torch::equal(mixprec::fp8::dequantize(qx.data, qx.scale_inv), xd.to(torch::kFloat)));
  REQUIRE(torch::equal(mixprec::fp8::dequantize(qw.data, qw.scale_inv), wd.to(torch::kFloat)));
  REQUIRE_THROWS_WITH(mixprec::fp8::dequantize(qx.data, torch::ones({3, 1})),
                      Catch::Contains("scale_inv must have shape"));
}

TEST_CASE("nn::Float8Linear: converts a torch Linear, trains, keeps its delayed-scaling state in buffers", "[fp8][nn]") {
  torch::manual_seed(0);
  torch::nn::Linear base(torch::nn::LinearOptions(64, 32));
  mixprec::nn::Float8Linear layer(*base);  // the same parameters
  REQUIRE(layer->weight.is_same(base->weight));
  auto buffers = layer->named_buffers();
  REQUIRE(buffers.contains("fp8_forward_amax_history"));
  REQUIRE(buffers["fp8_forward_amax_history"].sizes() == torch::IntArrayRef{16, 2});
  REQUIRE(buffers["fp8_backward_scale"].sizes() == torch::IntArrayRef{1});

  auto x = torch::randn({8, 64}) * 2;
  auto g = torch::randn({8, 32}) * 1e-2;
  for (int step = 0; step < 3; ++step) {
    layer->zero_grad();
    auto xi = x.clone().requires_grad_();
    layer->forward(xi).backward(g);
    if (step == 2) {
      // Against the fp32 layer: FP8's relative error (E4M3 forward, E5M2 gradients).
      auto xr = x.clone().requires_grad_();
      base->zero_grad();
      auto ref = base->forward(xr);
      ref.backward(g);
      auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
        return ((a - b).norm() / b.norm()).item<double>();
      };
      REQUIRE(rel(layer->forward(x), ref) < 0.05);
      REQUIRE(rel(xi.grad(), xr.grad()) < 0.08);
      REQUIRE(layer->weight.grad().scalar_type() == torch::kFloat);
    }
  }
  // After three forwards: the scales come from the recorded amaxes.
  const float amax_x = x.abs().max().item<float>();
  REQUIRE(layer->state.forward_scale[0].item<float>() == 448.f / amax_x);
  REQUIRE(layer->state.forward_amax_history[1][0].item<float>() == amax_x);
  REQUIRE(layer->state.backward_scale[0].item<float>() == 57344.f / g.abs().max().item<float>());

  // clone() carries the state: the copy computes the same output.
  auto copy = std::dynamic_pointer_cast<mixprec::nn::Float8LinearImpl>(layer->clone());
  REQUIRE(torch::equal(copy->state.forward_scale, layer->state.forward_scale));
  REQUIRE(torch::equal(copy->forward(x), layer->forward(x)));

  for (auto scaling : {mixprec::fp8::Scaling::Current, mixprec::fp8::Scaling::Rowwise,
                       mixprec::fp8::Scaling::Blockwise}) {
    mixprec::fp8::Recipe recipe;
    recipe.scaling = scaling;
    mixprec::nn::Float8Linear other(torch::nn::LinearOptions(64, 32), recipe);
    auto xi = x.clone().requires_grad_();
    other->forward(xi).sum().backward();
    REQUIRE(xi.grad().sizes() == x.sizes());
    REQUIRE(other->named_buffers()["fp8_forward_scale"].numel() == 0);
    // Its archive (empty state) loads into a delayed-scaling layer as a torch::nn::Linear's does: the layer
    // starts from the initial state (what it recorded belonged to its old weights); and a delayed layer's
    // archive loads into it, which has no state to take.
    std::stringstream stateless, delayed;
    torch::save(other, stateless);
    REQUIRE(layer->state.forward_amax_history.abs().sum().item<float>() > 0);
    torch::load(layer, stateless);
    const auto initial = mixprec::fp8::make_scaling_state(layer->recipe, x.options());
    REQUIRE(torch::equal(layer->state.forward_amax_history, initial.forward_amax_history));
    REQUIRE(torch::equal(layer->state.forward_scale, initial.forward_scale));
    REQUIRE(torch::equal(layer->state.backward_scale_inv, initial.backward_scale_inv));
    REQUIRE(torch::equal(layer->state.turn, initial.turn));
    REQUIRE(torch::equal(layer->weight, other->weight));
    torch::save(layer, delayed);
    torch::load(other, delayed);
    REQUIRE(other->named_buffers()["fp8_forward_scale"].numel() == 0);
    layer->forward(x);  // still a working delayed-scaling layer
  }
  REQUIRE_THROWS_WITH(mixprec::fp8::parse_scaling("tensor"), Catch::Contains("scaling must be \"delayed\""));
  // A recipe no layer can run is refused when the layer is built, by field.
  mixprec::fp8::Recipe bad;
  bad.margin = 33;
  REQUIRE_THROWS_WITH(mixprec::nn::Float8Linear(torch::nn::LinearOptions(64, 32), bad),
                      Catch::Contains("margin must be in [0, 32]"));
  bad = {};
  bad.amax_compute_algo = "mean";
  torch::nn::Linear plain(64, 32);
  REQUIRE_THROWS_WITH(mixprec::nn::Float8Linear(*plain, bad), Catch::Contains("amax_compute_algo must be"));
  bad = {};
  bad.backward_dtype = torch::kHalf;
  REQUIRE_THROWS_WITH(mixprec::fp8::check_recipe(bad),
                      Catch::Contains("Recipe.backward_dtype (the output gradient) must be Float8_e4m3fn or "
                                      "Float8_e5m2, got Half"));
  bad = {};
  bad.forward_dtype = torch::kBFloat16;
  REQUIRE_THROWS_WITH(mixprec::fp8::check_recipe(bad),
                      Catch::Contains("Recipe.forward_dtype (input and weight) must be Float8_e4m3fn, got BFloat16"));
  // E5M2 inputs and weights: Python's Recipe has no such format, and no FP8 GEMM takes two E5M2 operands.
  bad.forward_dtype = torch::kFloat8_e5m2;
  REQUIRE_THROWS_WITH(mixprec::nn::Float8Linear(torch::nn::LinearOptions(64, 32), bad),
                      Catch::Contains("Recipe.forward_dtype (input and weight) must be Float8_e4m3fn"));
}

TEST_CASE("nn::Float8Linear: loads a torch::nn::Linear archive, starting its scaling state afresh",
          "[fp8][nn][checkpoint]") {
  torch::manual_seed(5);
  torch::nn::Linear pretrained(torch::nn::LinearOptions(64, 32));
  std::stringstream plain;
  torch::save(pretrained, plain);

  torch::manual_seed(6);
  mixprec::nn::Float8Linear layer(torch::nn::LinearOptions(64, 32));
  layer->forward(torch::randn({8, 64})).sum().backward();  // the scaling state moves off its initial values
  layer->forward(torch::randn({8, 64})).sum().backward();
  std::map<std::string, torch::Tensor> state;
  for (const auto& item : layer->named_buffers()) state[item.key()] = item.value().clone();
  REQUIRE(layer->state.forward_scale[0].item<float>() != 1.f);
  const auto history = layer->state.forward_amax_history.clone();
  const auto trained_weight = layer->weight.detach().clone();
  std::stringstream full;
  torch::save(layer, full);

  // A pretrained torch::nn::Linear: its weights, and the initial state (what the layer recorded belonged to its
  // old weights), in the very tensors `state` holds.
  torch::load(layer, plain);
  REQUIRE(torch::equal(layer->weight, pretrained->weight));
  REQUIRE(torch::equal(layer->bias, pretrained->bias));
  REQUIRE(layer->state.forward_amax_history.is_same(layer->named_buffers()["fp8_forward_amax_history"]));
  mixprec::nn::Float8Linear initial(torch::nn::LinearOptions(64, 32));
  for (const auto& item : layer->named_buffers()) {
    REQUIRE(torch::equal(item.value(), initial->named_buffers()[item.key()]));
  }

  // A Float8Linear archive restores the state, in the very tensors `state` holds.
  torch::manual_seed(7);
  mixprec::nn::Float8Linear other(torch::nn::LinearOptions(64, 32));
  torch::load(other, full);
  for (const auto& item : other->named_buffers()) REQUIRE(torch::equal(item.value(), state[item.key()]));
  REQUIRE(torch::equal(other->state.forward_amax_history, history));
  REQUIRE(torch::equal(other->weight, trained_weight));

  // reset_parameters puts the initial scaling state back, in the buffers `state` holds.
  mixprec::nn::Float8Linear fresh(torch::nn::LinearOptions(64, 32));
  other->reset_parameters();
  REQUIRE(other->state.forward_amax_history.is_same(other->named_buffers()["fp8_forward_amax_history"]));
  for (const auto& item : other->named_buffers()) {
    REQUIRE(torch::equal(item.value(), fresh->named_buffers()[item.key()]));
  }
  REQUIRE_FALSE(torch::equal(other->state.forward_amax_history, history));
  torch::load(other, full);

  // Part of the state: refused by name, and nothing is read into the layer.
  torch::serialize::OutputArchive partial;
  partial.write("weight", torch::zeros({32, 64}));
  partial.write("bias", torch::zeros({32}));
  partial.write("fp8_forward_scale", torch::ones({1}), /*is_buffer=*/true);
  std::stringstream partial_stream;
  partial.save_to(partial_stream);
  torch::serialize::InputArchive in;
  in.load_from(partial_stream);
  REQUIRE_THROWS_WITH(other->load(in), Catch::Contains("holds part of the FP8 scaling state; missing: "
                                                       "fp8_forward_amax_history, fp8_forward_scale_inv"));
  REQUIRE(torch::equal(other->weight, trained_weight));
}

TEST_CASE("nn::Float8Linear: each side's scales move once per forward-backward cycle", "[fp8][nn]") {
  torch::manual_seed(9);
  mixprec::fp8::Recipe recipe;
  recipe.amax_history_len = 4;
  mixprec::nn::Float8Linear layer(torch::nn::LinearOptions(32, 16), recipe);
  REQUIRE(layer->named_buffers()["fp8_turn"].is_same(layer->state.turn));
  REQUIRE(layer->state.turn.item<float>() == 1.f);  // the first forward updates
  for (int step = 0; step < 2; ++step) layer->forward(torch::randn({8, 32}) * 3).sum().backward();
  REQUIRE(layer->state.turn.item<float>() == 1.f);

  // Called twice before its backward: both calls quantize with the scales the first set, the window moves
  // once, and row 0 holds the larger input amax.
  const auto x1 = torch::randn({8, 32}) * 5, x2 = torch::randn({8, 32}) * 2;
  const auto y1 = layer->forward(x1);
  REQUIRE(layer->state.turn.item<float>() == 0.f);
  const auto scale = layer->state.forward_scale.clone();
  const auto window = layer->state.forward_amax_history.slice(0, 1).clone();
  layer->forward(x2);
  REQUIRE(torch::equal(layer->forward(x1), y1));
  REQUIRE(torch::equal(layer->state.forward_scale, scale));
  REQUIRE(torch::equal(layer->state.forward_amax_history.slice(0, 1), window));
  const double amax = std::max(x1.to(torch::kDouble).abs().max().item<double>(),
                               x2.to(torch::kDouble).abs().max().item<double>());
  REQUIRE(layer->state.forward_amax_history[0][0].item<double>() == amax);

  // A retained graph backpropagated twice: the second output gradient is quantized as the first, so the input
  // gradient is exactly twice one backward's (as with torch::nn::Linear).
  auto twin = std::dynamic_pointer_cast<mixprec::nn::Float8LinearImpl>(layer->clone());
  const auto xa = torch::randn({8, 32}).requires_grad_();
  const auto xb = xa.detach().clone().requires_grad_();
  const auto g = torch::randn({8, 16});
  const auto out = layer->forward(xa);
  out.backward(g, /*retain_graph=*/true);
  out.backward(g);
  twin->forward(xb).backward(g);
  REQUIRE(torch::equal(xa.grad(), 2 * xb.grad()));
  REQUIRE(torch::equal(layer->state.backward_scale, twin->state.backward_scale));
  REQUIRE(layer->state.turn.item<float>() == 1.f);

  // An archive from before the turn existed (the six other buffers) loads, with the initial turn.
  torch::serialize::OutputArchive older;
  for (const auto& item : layer->named_parameters(/*recurse=*/false)) older.write(item.key(), item.value());
  for (const auto& item : layer->named_buffers(/*recurse=*/false)) {
    if (item.key() != "fp8_turn") older.write(item.key(), item.value(), /*is_buffer=*/true);
  }
  std::stringstream stream;
  older.save_to(stream);
  torch::serialize::InputArchive in;
  in.load_from(stream);
  mixprec::nn::Float8Linear other(torch::nn::LinearOptions(32, 16), recipe);
  other->forward(x1);  // the forward's turn now
  other->load(in);
  REQUIRE(other->state.turn.item<float>() == 1.f);
  REQUIRE(torch::equal(other->state.forward_amax_history, layer->state.forward_amax_history));
  REQUIRE(torch::equal(other->weight, layer->weight));
}

TEST_CASE("nn::Float8Linear: evaluation mode leaves the scaling state", "[fp8][nn]") {
  torch::manual_seed(8);
  mixprec::nn::Float8Linear layer(torch::nn::LinearOptions(64, 32));
  layer->forward(torch::randn({8, 64})).sum().backward();
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : layer->named_buffers()) before[item.key()] = item.value().clone();
  layer->eval();
  const auto x = torch::randn({8, 64}) * 100;  // an amax that must not be recorded
  REQUIRE(layer->forward(x).sizes() == torch::IntArrayRef{8, 32});
  // A backward through an evaluation forward (input gradients of a model in eval mode) records nothing either.
  const auto xg = x.clone().requires_grad_();
  (layer->forward(xg).pow(2).sum() * 1e4).backward();
  REQUIRE(xg.grad().defined());
  for (const auto& item : layer->named_buffers()) REQUIRE(torch::equal(item.value(), before[item.key()]));
  layer->train();  // training forwards record again
  layer->forward(x);
  REQUIRE_FALSE(torch::equal(layer->state.forward_amax_history, before["fp8_forward_amax_history"]));
}

TEST_CASE("nn::Float8Linear: dtype casts and policies leave the scaling state in fp32", "[fp8][nn]") {
  mixprec::nn::Float8Linear layer(32, 16);
  layer->state.forward_scale.fill_(1.0 / 3.0);
  const auto third = layer->state.forward_scale.clone();
  layer->to(torch::kBFloat16);
  REQUIRE(layer->weight.scalar_type() == torch::kBFloat16);
  REQUIRE(layer->state.forward_scale.scalar_type() == torch::kFloat);
  REQUIRE(torch::equal(layer->state.forward_scale, third));
  torch::nn::Sequential model(torch::nn::Linear(32, 32), mixprec::nn::Float8Linear(32, 32));
  model->to(torch::kHalf);
  mixprec::apply(*model, mixprec::Policy::from_string("bf16-true"));
  auto inner = model[1]->as<mixprec::nn::Float8LinearImpl>();
  REQUIRE(inner->weight.scalar_type() == torch::kBFloat16);
  REQUIRE(inner->state.backward_scale.scalar_type() == torch::kFloat);
  REQUIRE(inner->named_buffers()["fp8_forward_amax_history"].scalar_type() == torch::kFloat);
}

TEST_CASE("nn::Float8Linear: the weight cache spans a gradient-accumulation cycle", "[fp8][nn]") {
  torch::manual_seed(5);
  mixprec::fp8::Recipe recipe;
  recipe.scaling = mixprec::fp8::Scaling::Blockwise;
  mixprec::nn::Float8Linear plain(torch::nn::LinearOptions(64, 32), recipe);
  auto cached = std::dynamic_pointer_cast<mixprec::nn::Float8LinearImpl>(plain->clone());
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
  {
    torch::NoGradGuard no_grad;
    cached->weight.mul_(2);  // not read while the cache is reused
  }
  REQUIRE(torch::equal(cached->forward(x, false), plain->forward(x)));
  // Sequential passes the default (no cache) through AnyModule.
  torch::nn::Sequential model(mixprec::nn::Float8Linear(64, 32, recipe));
  REQUIRE(model->forward(x).sizes() == torch::IntArrayRef{16, 32});
  cached->to(torch::kBFloat16);
  REQUIRE(cached->weight_cache.empty());
  // mixprec::apply casting the weight empties the cache too (it was kept, and the next reuse was refused as
  // if autocast had changed).
  cached->forward(x.to(torch::kBFloat16), true);
  REQUIRE_FALSE(cached->weight_cache.empty());
  mixprec::apply(*cached, mixprec::Policy::from_string("16-true"));
  REQUIRE(cached->weight_cache.empty());
}

namespace {
// A recomputation as activation checkpointing runs it: the layer's forward called again inside a backward.
struct RecomputeInBackward : public torch::autograd::Function<RecomputeInBackward> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               mixprec::nn::Float8LinearImpl* layer) {
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->save_for_backward({x});
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* layer = reinterpret_cast<mixprec::nn::Float8LinearImpl*>(ctx->saved_data["layer"].toInt());
    const torch::Tensor x = ctx->get_saved_variables()[0];
    layer->forward(x, true);  // the first micro-batch's call, recomputed
    return {grads[0], torch::Tensor()};
  }
};
}  // namespace

TEST_CASE("nn::Float8Linear: a recomputation of the first micro-batch reuses the filled weight cache",
          "[fp8][nn]") {
  mixprec::fp8::Recipe recipe;
  recipe.scaling = mixprec::fp8::Scaling::Current;
  mixprec::nn::Float8Linear layer(torch::nn::LinearOptions(32, 16), recipe);
  const auto x = torch::randn({8, 32});
  layer->forward(x, true);
  const torch::Tensor filled = layer->weight_cache.data;  // held: a refill cannot reuse its memory
  const auto probe = torch::randn({8, 32}, torch::requires_grad());
  RecomputeInBackward::apply(probe, layer.get()).sum().backward();
  REQUIRE(layer->weight_cache.data.is_same(filled));  // the same tensors: not refilled, not emptied
  layer->forward(x, true);  // outside a backward a first micro-batch fills a new cache
  REQUIRE_FALSE(layer->weight_cache.data.is_same(filled));
}


TEST_CASE("nn::Float8Linear: amax_group MAX-reduces delayed scaling's amaxes over the ranks", "[fp8][nn]") {
  // Two ranks with the same weights and different data (rank 1's four times larger), three training steps,
  // then one forward that reduces what the third recorded. With the group both ranks end with the same state,
  // the window holding the larger rank's amaxes; without it each keeps its own.
  torch::manual_seed(3);
  const auto xs = torch::randn({3, 2, 8, 16}) * torch::tensor({1.0f, 4.0f}).view({1, 2, 1, 1});
  mixprec::fp8::Recipe recipe;
  recipe.amax_history_len = 4;
  torch::nn::Linear base(16, 8);
  const auto run = [&](bool reduce) {
    auto shared = std::make_shared<ThreadRendezvous>();
    std::vector<mixprec::nn::Float8Linear> layers;
    for (int rank = 0; rank < 2; ++rank) {
      torch::nn::Linear copy(16, 8);
      {
        torch::NoGradGuard no_grad;
        copy->weight.copy_(base->weight);
        copy->bias.copy_(base->bias);
      }
      layers.emplace_back(*copy, recipe);
      if (reduce) layers.back()->amax_group = thread_group(rank, 2, shared);
    }
    std::vector<std::thread> threads;
    for (int rank = 0; rank < 2; ++rank) {
      threads.emplace_back([&, rank] {
        for (int step = 0; step < 3; ++step) layers[rank]->forward(xs[step][rank]).pow(2).mean().backward();
        layers[rank]->forward(xs[0][rank]);
      });
    }
    for (auto& t : threads) t.join();
    if (reduce) REQUIRE(shared->calls == 4);  // one per training forward: three steps and the fourth forward
    return layers;
  };
  const auto x_amax = xs[2].abs().amax({1, 2});  // the third step's input amax, per rank
  const auto reduced = run(true);
  const auto own = run(false);
  for (int rank = 0; rank < 2; ++rank) {
    REQUIRE(reduced[rank]->state.forward_amax_history[1][0].item<float>() == x_amax.max().item<float>());
    REQUIRE(own[rank]->state.forward_amax_history[1][0].item<float>() == x_amax[rank].item<float>());
  }
  const auto state = [](const mixprec::nn::Float8Linear& layer) {
    const auto& s = layer->state;
    return torch::cat({s.forward_amax_history.slice(0, 1).reshape(-1), s.forward_scale, s.forward_scale_inv,
                       s.backward_amax_history.slice(0, 1).reshape(-1), s.backward_scale, s.backward_scale_inv});
  };
  REQUIRE(torch::equal(state(reduced[0]), state(reduced[1])));
  REQUIRE_FALSE(torch::equal(state(own[0]), state(own[1])));

  // Only training forwards with gradients enabled reduce: the others may run on one rank alone.
  auto single = std::make_shared<ThreadRendezvous>();
  mixprec::nn::Float8Linear layer = reduced[0];
  layer->amax_group = thread_group(0, 1, single);
  {
    torch::NoGradGuard no_grad;
    layer->forward(xs[0][0]);
  }
  layer->eval();
  layer->forward(xs[0][0]);
  REQUIRE(single->calls == 0);
  layer->train();
  layer->forward(xs[0][0]);
  REQUIRE(single->calls == 1);

  // Histories that are not delayed scaling's are refused before any collective.
  mixprec::fp8::ScalingState wrong = mixprec::fp8::make_scaling_state(recipe, torch::kFloat);
  wrong.backward_amax_history = torch::zeros({4, 2});
  auto shared = std::make_shared<ThreadRendezvous>();
  REQUIRE_THROWS_WITH(mixprec::fp8::reduce_amax(wrong, *thread_group(0, 1, shared)),
                      Catch::Contains("backward_amax_history must be delayed scaling's float32 [history, 1]"));
  REQUIRE(shared->calls == 0);
}

namespace {
// Collects TORCH_WARN messages while it lives.
struct CollectWarnings : c10::WarningHandler {
  std::vector<std::string> messages;
  c10::WarningHandler* previous = c10::WarningUtils::get_warning_handler();
  CollectWarnings() { c10::WarningUtils::set_warning_handler(this); }
  ~CollectWarnings() override { c10::WarningUtils::set_warning_handler(previous); }
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
};
}  // namespace

TEST_CASE("nn::Float8Linear: evaluating delayed scaling that never recorded an amax warns once", "[fp8][nn]") {
  const auto x = torch::randn({8, 64}) * 1000;
  mixprec::nn::Float8Linear fresh(torch::nn::LinearOptions(64, 32));
  mixprec::nn::Float8Linear trained(torch::nn::LinearOptions(64, 32));
  trained->forward(x).sum().backward();
  fresh->eval();
  trained->eval();
  CollectWarnings warnings;
  fresh->forward(x);
  fresh->forward(x);
  trained->forward(x);
  REQUIRE(warnings.messages.size() == 1);
  REQUIRE_THAT(warnings.messages[0], Catch::Contains("never recorded an amax"));
}

TEST_CASE("the ops and the 8-bit layers run on meta tensors (shape inference from C++)", "[fp8][meta]") {
  const auto meta = torch::TensorOptions().device(torch::kMeta);
  const auto x = torch::empty({3, 5, 200}, meta);
  const auto one = torch::ones({1}, meta);
  mixprec::fp8::QuantizeOptions options;
  options.transpose = true;
  const auto q = mixprec::fp8::quantize(x, one, torch::kFloat8_e4m3fn, options);
  REQUIRE(q.data.is_meta());
  REQUIRE(q.data.sizes() == x.sizes());
  REQUIRE(q.data.scalar_type() == torch::kFloat8_e4m3fn);
  REQUIRE(q.data_t.sizes() == torch::IntArrayRef{200, 15});
  REQUIRE(q.amax.dim() == 0);
  const auto blocks = mixprec::fp8::quantize_blockwise(x, torch::kFloat8_e5m2, 1, 128);
  REQUIRE(blocks.scale_inv.sizes() == torch::IntArrayRef{15, 2});
  const auto a = torch::empty({15, 256}, meta.dtype(torch::kFloat8_e4m3fn));
  const auto b = torch::empty({7, 256}, meta.dtype(torch::kFloat8_e4m3fn));
  const auto out = mixprec::fp8::gemm(a, b, one, one, torch::kBFloat16);
  REQUIRE((out.is_meta() && out.sizes() == torch::IntArrayRef{15, 7} && out.scalar_type() == torch::kBFloat16));
  REQUIRE(mixprec::fp8::dequantize(a, one).scalar_type() == torch::kFloat);
  const auto i8 = mixprec::int8::quantize(x, 4, -1);
  REQUIRE((i8.data.scalar_type() == torch::kChar && i8.scale_inv.sizes() == torch::IntArrayRef{4, 1}));
  REQUIRE(mixprec::ops::cast(x, torch::kHalf).scalar_type() == torch::kHalf);
  // A meta scale with operands that hold data is refused: its output would be memory nothing computed.
  REQUIRE_THROWS_WITH(mixprec::fp8::quantize(torch::randn({4, 8}), one, torch::kFloat8_e4m3fn),
                      Catch::Contains("every tensor must be on one device, got meta tensors with cpu ones"));

  // The layers' functions: forward and backward on meta tensors give the shapes of real ones (autocast has no
  // state for the meta device; asking torch about it threw).
  for (const bool int8 : {false, true}) {
    const auto input = torch::empty({6, 200}, meta.requires_grad(true));
    const auto weight = torch::empty({16, 200}, meta.requires_grad(true));
    const auto bias = torch::empty({16}, meta.requires_grad(true));
    mixprec::fp8::Recipe recipe;
    const auto state = mixprec::fp8::make_scaling_state(recipe, meta);
    const auto y = int8 ? mixprec::nn::int8_linear(input, weight, bias)
                        : mixprec::nn::float8_linear(input, weight, bias, state, recipe);
    REQUIRE((y.is_meta() && y.sizes() == torch::IntArrayRef{6, 16}));
    y.sum().backward();
    REQUIRE(input.grad().sizes() == input.sizes());
    REQUIRE(weight.grad().sizes() == weight.sizes());
  }
}
