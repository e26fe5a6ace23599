// unscale_and_check_ and unscale_and_check_sumsq_ called from C++ through mixprec::ops (CPU).
#include <catch2/catch.hpp>
#include <mixprec/ops.h>
#include <torch/torch.h>

#include <limits>

namespace {

torch::Tensor one(float v) { return torch::full({1}, v); }

// The float64 reference: g * inv_scale rounded once to g's dtype.
torch::Tensor reference(const torch::Tensor& g, double inv) { return (g.to(torch::kDouble) * inv).to(g.scalar_type()); }

bool throws_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

}  // namespace

TEST_CASE("unscale_and_check_ matches a float64 reference for every dtype and odd sizes", "[unscale]") {
  torch::manual_seed(1);
  for (auto dtype : {torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kDouble}) {
    for (int64_t n : {0, 1, 7, 15, 16, 17, 1000, 65537, 200003}) {
      auto g = (torch::randn({n}) * 100).to(dtype);
      auto expected = reference(g, 1.0 / 512);
      auto found_inf = one(0.f);
      mixprec::ops::unscale_and_check_({g}, found_inf, one(1.f / 512));
      INFO("dtype " << dtype << " n " << n);
      REQUIRE(torch::equal(g, expected));
      REQUIRE(found_inf.item<float>() == 0.f);
    }
  }
}

TEST_CASE("unscale_and_check_sumsq_ returns the sum of squares of the unscaled gradients", "[unscale]") {
  torch::manual_seed(2);
  std::vector<torch::Tensor> grads = {torch::randn({1000}), torch::randn({33, 17}).to(torch::kHalf),
                                      torch::randn({70000}).to(torch::kBFloat16)};
  double expected = 0;
  for (const auto& g : grads) expected += (g.to(torch::kDouble) * 0.25).pow(2).sum().item<double>();
  auto found_inf = one(0.f);
  auto sumsq = mixprec::ops::unscale_and_check_sumsq_(grads, found_inf, one(0.25f));
  REQUIRE(sumsq.dim() == 0);
  REQUIRE(sumsq.scalar_type() == torch::kFloat);
  REQUIRE(sumsq.item<double>() == Approx(expected).epsilon(1e-5));
}

TEST_CASE("non-finite values anywhere raise found_inf, which is never cleared", "[unscale]") {
  const float specials[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  for (auto dtype : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
    for (float bad : specials) {
      for (int64_t where : {int64_t{0}, int64_t{40000}, int64_t{99999}}) {
        std::vector<torch::Tensor> grads = {torch::ones({10}), torch::ones({100000}).to(dtype), torch::ones({5})};
        grads[1][where] = bad;
        auto found_inf = one(0.f);
        mixprec::ops::unscale_and_check_(grads, found_inf, one(0.5f));
        INFO("dtype " << dtype << " value " << bad << " at " << where);
        REQUIRE(found_inf.item<float>() == 1.f);
        // A later clean call leaves the flag raised.
        mixprec::ops::unscale_and_check_({torch::ones({3})}, found_inf, one(1.f));
        REQUIRE(found_inf.item<float>() == 1.f);
      }
    }
  }
}

TEST_CASE("non-contiguous views are unscaled in place, untouched elements stay", "[unscale]") {
  auto base = torch::arange(0, 200, torch::kFloat).reshape({20, 10});
  auto view = base.index({torch::indexing::Slice(), torch::indexing::Slice(0, 10, 3)});  // gaps between rows
  auto transposed = torch::arange(0, 30, torch::kFloat).reshape({5, 6}).t();          // dense, permuted
  auto expected_base = base.clone();
  expected_base.index({torch::indexing::Slice(), torch::indexing::Slice(0, 10, 3)}).mul_(0.5);
  auto expected_t = transposed * 0.5;
  auto found_inf = one(0.f);
  mixprec::ops::unscale_and_check_({view, transposed}, found_inf, one(0.5f));
  REQUIRE(torch::equal(base, expected_base));
  REQUIRE(torch::equal(transposed, expected_t));
}

TEST_CASE("bad input is rejected with the argument's name and nothing is written", "[unscale][errors]") {
  auto g = torch::ones({4});
  auto untouched = [&] { return torch::equal(g, torch::ones({4})); };
  auto found_inf = one(0.f);
  REQUIRE(throws_with([&] { mixprec::ops::unscale_and_check_({g}, found_inf, torch::ones({2})); }, "inv_scale"));
  REQUIRE(throws_with([&] { mixprec::ops::unscale_and_check_({g}, torch::zeros({1}, torch::kDouble), one(1.f)); },
                      "found_inf"));
  REQUIRE(throws_with([&] { mixprec::ops::unscale_and_check_({g, torch::ones({3}, torch::kInt)}, found_inf, one(2.f)); },
                      "grads[1]"));
  REQUIRE(throws_with(
      [&] { mixprec::ops::unscale_and_check_({g, torch::ones({3}).to_sparse()}, found_inf, one(2.f)); }, "sparse"));
  REQUIRE(untouched());
  REQUIRE(found_inf.item<float>() == 0.f);
}
