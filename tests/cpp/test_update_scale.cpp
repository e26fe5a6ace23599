// update_scale_ from C++: parity with torch::_amp_update_scale_ and the opt-in hysteresis and bounds.
#include <catch2/catch.hpp>
#include <mixprec/ops.h>
#include <torch/torch.h>

namespace {
struct State {
  torch::Tensor scale = torch::full({1}, 65536.f);
  torch::Tensor growth = torch::zeros({1}, torch::kInt32);
  torch::Tensor hysteresis = torch::ones({1}, torch::kInt32);
};
}  // namespace

TEST_CASE("defaults reproduce torch::_amp_update_scale_ bit for bit", "[update_scale]") {
  State ours;
  auto theirs_scale = ours.scale.clone();
  auto theirs_growth = ours.growth.clone();
  // A pattern of clean and overflowing steps, with growth every 3 clean steps.
  const int pattern[] = {0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0};
  for (int overflow : pattern) {
    auto found_inf = torch::full({1}, static_cast<float>(overflow));
    mixprec::ops::update_scale_(ours.scale, ours.growth, ours.hysteresis, found_inf, 2.0, 0.5, 3);
    torch::_amp_update_scale_(theirs_scale, theirs_growth, found_inf, 2.0, 0.5, 3);
    REQUIRE(torch::equal(ours.scale, theirs_scale));
    REQUIRE(torch::equal(ours.growth, theirs_growth));
  }
}

TEST_CASE("hysteresis tolerates overflows before backing off, and bounds clamp", "[update_scale]") {
  State s;
  s.hysteresis.fill_(2);
  auto overflow = torch::ones({1});
  auto clean = torch::zeros({1});
  mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, overflow, 2.0, 0.5, 2, /*hysteresis=*/2);
  REQUIRE(s.scale.item<float>() == 65536.f);  // first overflow spends the budget
  mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, overflow, 2.0, 0.5, 2, 2);
  REQUIRE(s.scale.item<float>() == 32768.f);  // second backs off
  mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, overflow, 2.0, 0.5, 2, 2, /*min_scale=*/20000.0);
  REQUIRE(s.scale.item<float>() == 20000.f);  // clamped at min_scale
  for (int i = 0; i < 2; ++i) {
    mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, clean, 2.0, 0.5, 2, 2, 0.0, /*max_scale=*/30000.0);
  }
  REQUIRE(s.scale.item<float>() == 30000.f);  // grown, clamped at max_scale
  REQUIRE(s.hysteresis.item<int>() == 2);     // budget refilled on growth
}

TEST_CASE("update_scale_ rejects bad settings before writing", "[update_scale][errors]") {
  State s;
  auto found_inf = torch::ones({1});
  auto check = [&](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      FAIL("expected an error mentioning " << needle);
    } catch (const c10::Error& e) {
      REQUIRE_THAT(e.what(), Catch::Contains(needle));
    }
    REQUIRE(s.scale.item<float>() == 65536.f);
  };
  check([&] { mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, found_inf, 0.0, 0.5, 10); }, "growth_factor");
  check([&] { mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, found_inf, 2.0, -1.0, 10); }, "backoff_factor");
  check([&] { mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, found_inf, 2.0, 0.5, 0); }, "growth_interval");
  check([&] { mixprec::ops::update_scale_(s.scale, s.growth, s.hysteresis, found_inf, 2.0, 0.5, 10, 1, 8.0, 4.0); },
        "min_scale");
  check([&] { mixprec::ops::update_scale_(s.scale, s.growth.to(torch::kLong), s.hysteresis, found_inf, 2.0, 0.5, 10); },
        "growth_tracker");
}
