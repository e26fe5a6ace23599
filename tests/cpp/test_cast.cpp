// The cast ops and rounding helpers from C++ (CPU): nearest vs Tensor::to, stochastic reproducibility
// and mean, saturation, exact remainders, and our Philox against torch's own engine.
#include <ATen/core/PhiloxRNGEngine.h>
#include <catch2/catch.hpp>
#include <mixprec/ops.h>
#include <torch/torch.h>

#include <cmath>

#include "ops/philox.h"

namespace {
torch::Tensor random_bits(int64_t n, int64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto b = torch::randint(-(int64_t{1} << 31), int64_t{1} << 31, {n}, gen, torch::kLong).to(torch::kInt);
  auto x = b.view(torch::kFloat);
  return x.masked_fill(torch::isnan(x), 0.f);
}
}  // namespace

TEST_CASE("Philox4x32-10 matches torch's engine for the same key and counter", "[cast][philox]") {
  for (uint64_t seed : {uint64_t{0}, uint64_t{42}, uint64_t{0xdeadbeefcafef00dULL}}) {
    for (uint64_t group : {uint64_t{0}, uint64_t{1}, uint64_t{123456789012ULL}}) {
      for (uint64_t offset : {uint64_t{0}, uint64_t{4}}) {
        // torch's counter is (offset_lo, offset_hi, subsequence_lo, subsequence_hi): our group sits in the
        // first half and our offset in the second, i.e. torch's subsequence.
        at::Philox4_32 theirs(seed, /*subsequence=*/offset, /*offset=*/group);
        const auto ours = mixprec::philox::philox4x32_10(group, offset, seed);
        for (int k = 0; k < 4; ++k) REQUIRE(ours.v[k] == theirs());
      }
    }
  }
}

TEST_CASE("nearest casts equal Tensor::to bit for bit", "[cast]") {
  auto x = random_bits(1 << 18, 3);
  for (auto dtype : {torch::kHalf, torch::kBFloat16}) {
    auto ours = mixprec::ops::cast(x, dtype);
    REQUIRE(torch::equal(ours.view(torch::kShort), x.to(dtype).view(torch::kShort)));
    REQUIRE(torch::equal(mixprec::ops::cast(ours, torch::kFloat), ours.to(torch::kFloat)));
  }
}

TEST_CASE("stochastic casts are reproducible and unbiased", "[cast]") {
  const float x = 1.0f + 0.25f * std::ldexp(1.0f, -7);  // a quarter of a bf16 ulp above 1
  auto src = torch::full({100000}, x);
  auto a = mixprec::ops::cast(src, torch::kBFloat16, "stochastic", false, 17);
  auto b = mixprec::ops::cast(src, torch::kBFloat16, "stochastic", false, 17);
  REQUIRE(torch::equal(a, b));
  const double mean = a.to(torch::kDouble).mean().item<double>();
  const double sigma = std::ldexp(1.0, -7) * std::sqrt(0.25 * 0.75 / 100000);
  REQUIRE(std::abs(mean - x) < 5 * sigma);
}

TEST_CASE("cast_ with saturation clamps finite overflow and keeps inf", "[cast]") {
  auto src = torch::tensor({70000.f, -1e10f, std::numeric_limits<float>::infinity(), 1.5f});
  auto dst = torch::empty({4}, torch::kHalf);
  mixprec::ops::cast_({dst}, {src}, "nearest", /*saturate=*/true);
  auto f = dst.to(torch::kFloat);
  REQUIRE(f[0].item<float>() == 65504.f);
  REQUIRE(f[1].item<float>() == -65504.f);
  REQUIRE(std::isinf(f[2].item<float>()));
  REQUIRE(f[3].item<float>() == 1.5f);
}

TEST_CASE("bf16 remainders merge back to the exact fp32 bits", "[cast][remainder]") {
  auto x = random_bits(1 << 18, 9);
  auto [hi, lo] = mixprec::ops::split_bf16_remainder(x);
  REQUIRE(hi.scalar_type() == torch::kBFloat16);
  REQUIRE(lo.scalar_type() == torch::kShort);
  REQUIRE(torch::equal(mixprec::ops::merge_bf16_remainder(hi, lo).view(torch::kInt), x.view(torch::kInt)));
}

TEST_CASE("cast rejects unknown rounding modes and dtypes by name", "[cast][errors]") {
  auto x = torch::ones({3});
  REQUIRE_THROWS_WITH(mixprec::ops::cast(x, torch::kHalf, "truncate"), Catch::Contains("rounding"));
  REQUIRE_THROWS_WITH(mixprec::ops::cast(x, torch::kDouble),
                      Catch::Contains("mixprec::cast: dtype must be float32, float16 or bfloat16, got Double"));
  REQUIRE_THROWS_WITH(mixprec::ops::merge_bf16_remainder(x.to(torch::kBFloat16), x),
                      Catch::Contains("remainder must be int16"));
}
