// mixprec::Policy, AutocastGuard and apply() from C++.
#include <ATen/autocast_mode.h>
#include <catch2/catch.hpp>
#include <mixprec/mixprec.h>
#include <torch/torch.h>

TEST_CASE("every known policy name parses to the right dtypes", "[policy]") {
  using mixprec::Policy;
  for (const char* n : {"float32", "32-true", "32", "no"}) REQUIRE(Policy::from_string(n).name == "float32");
  for (const char* n : {"mixed_float16", "16-mixed", "16", "fp16"}) {
    const Policy p = Policy::from_string(n);
    REQUIRE(p.name == "mixed_float16");
    REQUIRE(p.compute_dtype == torch::kHalf);
    REQUIRE(p.param_dtype == torch::kFloat);
    REQUIRE(p.needs_loss_scaling());
  }
  for (const char* n : {"mixed_bfloat16", "bf16-mixed", "bf16", "  Mixed_BFloat16 "}) {
    const Policy p = Policy::from_string(n);
    REQUIRE(p.compute_dtype == torch::kBFloat16);
    REQUIRE_FALSE(p.needs_loss_scaling());
  }
  const Policy pure = Policy::from_string("bf16-true");
  REQUIRE(pure.param_dtype == torch::kBFloat16);
  REQUIRE(pure.master_dtype == torch::kBFloat16);
  const Policy jmp = Policy::from_string("params=float32,compute=bfloat16,output=float32");
  REQUIRE(jmp.compute_dtype == torch::kBFloat16);
  REQUIRE(jmp.param_dtype == torch::kFloat);
  REQUIRE(jmp.output_dtype == torch::kFloat);
  REQUIRE(Policy::from_string("p=f32,c=f16").output_dtype == torch::kHalf);
  // As jmp reads them: params default to float32, compute follows params, output follows compute.
  const Policy params_only = Policy::from_string("p=bf16");
  REQUIRE((params_only.param_dtype == torch::kBFloat16 && params_only.compute_dtype == torch::kBFloat16 &&
           params_only.output_dtype == torch::kBFloat16));
  const Policy with_output = Policy::from_string("params=float16,output=float32");
  REQUIRE((with_output.compute_dtype == torch::kHalf && with_output.output_dtype == torch::kFloat));
  REQUIRE_THROWS_WITH(Policy::from_string("mixed_float8"), Catch::Contains("accepted"));
  REQUIRE_THROWS_WITH(Policy::from_string("params=float32,compute=int8"), Catch::Contains("unknown dtype"));
  REQUIRE(Policy::mixed_bfloat16().keeps_fp32("torch::nn::BatchNorm1dImpl"));
  REQUIRE_FALSE(Policy::mixed_bfloat16().keeps_fp32("torch::nn::LinearImpl"));
}

TEST_CASE("AutocastGuard sets, nests and restores autocast exactly, also on exceptions", "[policy][autocast]") {
  const auto cpu = c10::DeviceType::CPU;
  const bool was_enabled = at::autocast::is_autocast_enabled(cpu);
  const auto was_dtype = at::autocast::get_autocast_dtype(cpu);
  auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  {
    mixprec::AutocastGuard outer(mixprec::Policy::mixed_bfloat16(), cpu);
    REQUIRE(torch::mm(a, b).scalar_type() == torch::kBFloat16);
    {
      mixprec::AutocastGuard inner(mixprec::Policy::float32(), cpu);  // float32 disables autocast inside
      REQUIRE(torch::mm(a, b).scalar_type() == torch::kFloat);
    }
    REQUIRE(torch::mm(a, b).scalar_type() == torch::kBFloat16);
    try {
      mixprec::AutocastGuard inner(mixprec::Policy::mixed_float16(), cpu);
      REQUIRE(torch::mm(a, b).scalar_type() == torch::kHalf);
      throw std::runtime_error("boom");
    } catch (const std::runtime_error&) {
    }
    REQUIRE(torch::mm(a, b).scalar_type() == torch::kBFloat16);
  }
  REQUIRE(at::autocast::is_autocast_enabled(cpu) == was_enabled);
  REQUIRE(at::autocast::get_autocast_dtype(cpu) == was_dtype);
  REQUIRE(torch::mm(a, b).scalar_type() == torch::kFloat);
}

TEST_CASE("the cast cache survives an inner guard's exit and is cleared at the outermost", "[policy][autocast]") {
  const auto cpu = c10::DeviceType::CPU;
  auto w = torch::randn({4, 4}, torch::requires_grad());  // a leaf that requires grad: autocast caches its casts
  torch::Tensor first;
  {
    mixprec::AutocastGuard outer(mixprec::Policy::mixed_bfloat16(), cpu);
    first = at::autocast::cached_cast(torch::kBFloat16, w, cpu);
    { mixprec::AutocastGuard inner(mixprec::Policy::mixed_bfloat16(), cpu); }
    REQUIRE(at::autocast::cached_cast(torch::kBFloat16, w, cpu).is_same(first));
  }
  mixprec::AutocastGuard again(mixprec::Policy::mixed_bfloat16(), cpu);
  REQUIRE_FALSE(at::autocast::cached_cast(torch::kBFloat16, w, cpu).is_same(first));
}

TEST_CASE("apply() stores params in the policy's dtype and keeps norm layers in fp32", "[policy]") {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(8, 16), torch::nn::BatchNorm1d(16), torch::nn::LayerNorm(
                                  torch::nn::LayerNormOptions({16})), torch::nn::Linear(16, 2));
  mixprec::apply(*model, mixprec::Policy::bfloat16());
  REQUIRE(model[0]->as<torch::nn::Linear>()->weight.scalar_type() == torch::kBFloat16);
  REQUIRE(model[1]->as<torch::nn::BatchNorm1d>()->weight.scalar_type() == torch::kFloat);
  REQUIRE(model[1]->as<torch::nn::BatchNorm1d>()->running_mean.scalar_type() == torch::kFloat);
  REQUIRE(model[2]->as<torch::nn::LayerNorm>()->weight.scalar_type() == torch::kFloat);
  // ATen's norm kernels take the bf16 activations with fp32 weights.
  auto out = model->forward(torch::randn({4, 8}).to(torch::kBFloat16));
  REQUIRE(out.scalar_type() == torch::kBFloat16);
  REQUIRE(torch::isfinite(out).all().item<bool>());
}

TEST_CASE("apply(): a parameter tied across a kept and a cast module takes the policy's dtype in any order, as in "
          "Python", "[policy]") {
  // A norm layer of the user's own (kept: its type name says LayerNorm) whose weight is a Linear's bias.
  struct TiedLayerNormImpl : torch::nn::Module {
    explicit TiedLayerNormImpl(const torch::Tensor& shared)
        : weight(register_parameter("weight", shared)), bias(register_parameter("bias", torch::zeros({16}))) {}
    torch::Tensor weight, bias;
  };
  for (const bool kept_first : {true, false}) {
    torch::nn::Linear lin(16, 16);
    auto norm = std::make_shared<TiedLayerNormImpl>(lin->bias);
    REQUIRE(mixprec::Policy::bfloat16().keeps_fp32(norm->name()));
    torch::nn::Module model;  // the order of registration is the order apply() visits
    if (kept_first) {
      model.register_module("norm", norm);
      model.register_module("lin", lin);
    } else {
      model.register_module("lin", lin);
      model.register_module("norm", norm);
    }
    mixprec::apply(model, mixprec::Policy::bfloat16());
    REQUIRE(lin->bias.scalar_type() == torch::kBFloat16);
    REQUIRE(norm->weight.is_same(lin->bias));
    REQUIRE(norm->bias.scalar_type() == torch::kFloat);  // its own parameters stay fp32
  }
}

TEST_CASE("adam_options: fp32 masters for mixed policies, seeded stochastic rounding for pure 16-bit ones, as "
          "Python's Policy.optimizer", "[policy]") {
  torch::manual_seed(1234);
  const auto pure = mixprec::Policy::bfloat16().adam_options(0.1);
  REQUIRE((pure.lr() == 0.1 && pure.master_weights() == "none" && pure.rounding() == "stochastic"));
  REQUIRE(pure.seed() == 1234);
  const auto mixed = mixprec::Policy::mixed_bfloat16().adam_options();
  REQUIRE((mixed.master_weights() == "auto" && mixed.rounding() == "nearest" && mixed.seed() == -1));
  REQUIRE(mixed.weight_decay() == mixprec::optim::AdamWOptions().weight_decay());
  // They build the optimizer: a bf16 parameter steps without a master copy.
  auto p = torch::ones({4}, torch::kBFloat16).requires_grad_();
  mixprec::optim::AdamW opt({p}, pure);
  p.mutable_grad() = torch::full({4}, 1e-3, torch::kBFloat16);
  opt.step();
  REQUIRE(!static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).master().defined());
}

TEST_CASE("apply() rejects modules with non-floating parameters and changes nothing", "[policy][errors]") {
  torch::nn::Linear lin(2, 2);
  lin->register_parameter("ticks", torch::zeros({2}, torch::kLong), /*requires_grad=*/false);
  REQUIRE_THROWS_WITH(mixprec::apply(*lin, mixprec::Policy::bfloat16()), Catch::Contains("ticks"));
  REQUIRE(lin->weight.scalar_type() == torch::kFloat);
}

TEST_CASE("jmp's casts: floating tensors to the compute, param and output dtypes, others unchanged", "[policy]") {
  const auto policy = mixprec::Policy::from_string("params=float32,compute=bfloat16,output=float32");
  const auto x = torch::randn({3, 4}).requires_grad_();
  const auto c = policy.cast_to_compute(x);
  REQUIRE(c.scalar_type() == torch::kBFloat16);
  REQUIRE(torch::equal(c, x.to(torch::kBFloat16)));
  const auto out = policy.cast_to_output(c * 2);
  REQUIRE(out.scalar_type() == torch::kFloat);
  out.sum().backward();  // differentiable, as Tensor::to
  REQUIRE(torch::equal(x.grad(), torch::full({3, 4}, 2.f)));
  REQUIRE(policy.cast_to_param(x).is_same(x));  // already fp32: the same tensor
  const auto index = torch::arange(3);
  REQUIRE(policy.cast_to_compute(index).is_same(index));  // integers pass unchanged
  REQUIRE_FALSE(policy.cast_to_output(torch::Tensor()).defined());
  REQUIRE(mixprec::Policy::bfloat16().cast_to_param(x).scalar_type() == torch::kBFloat16);
  REQUIRE(mixprec::Policy::mixed_float16().cast_to_output(x).scalar_type() == torch::kHalf);  // output = compute
}
