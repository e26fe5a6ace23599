// mixprec::GradScaler from C++: with torch::optim::SGD/AdamW (host-checked skip) and with
// mixprec::optim::AdamW (skip on device), growth/backoff, call-order errors, save/load, overflow
// attribution, the overflow flag all-reduced over a process group, and the mixprec::Monitor built on it.
#include <catch2/catch.hpp>
#include <mixprec/mixprec.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <thread>
#include <vector>

#include "thread_group.h"

namespace {

struct Net : torch::nn::Module {
  Net() { fc = register_module("fc", torch::nn::Linear(8, 4)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc->forward(x); }
  torch::nn::Linear fc{nullptr};
};

// Runs `steps` iterations planting an inf at the given steps; returns the scales seen.
template <typename Optimizer>
std::vector<double> train(Net& net, Optimizer& opt, mixprec::GradScaler& scaler, int steps, std::vector<int> plant) {
  std::vector<double> scales;
  torch::manual_seed(3);
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    auto x = torch::randn({5, 8});
    scaler.scale(net.forward(x).pow(2).mean()).backward();
    if (std::find(plant.begin(), plant.end(), i) != plant.end()) {
      net.fc->weight.mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
    }
    scaler.step(opt);
    scaler.update();
    scales.push_back(scaler.get_scale());
  }
  return scales;
}

}  // namespace

TEST_CASE("GradScaler with torch::optim::SGD: skips overflowing steps, grows and backs off", "[scaler]") {
  torch::manual_seed(0);
  Net net;
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024).growth_interval(2));
  auto scales = train(net, opt, scaler, 6, {2});
  REQUIRE(scales == std::vector<double>{1024, 2048, 1024, 1024, 2048, 2048});
}

TEST_CASE("GradScaler with mixprec::optim::AdamW skips on the device and leaves state untouched", "[scaler]") {
  torch::manual_seed(0);
  Net net;
  net.to(torch::kBFloat16);
  mixprec::optim::AdamW opt(net.parameters(), mixprec::optim::AdamOptions(1e-3));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(256).growth_interval(100));
  auto step_once = [&](bool overflow) {
    opt.zero_grad();
    scaler.scale(net.forward(torch::randn({5, 8}).to(torch::kBFloat16)).to(torch::kFloat).pow(2).mean()).backward();
    if (overflow) net.fc->weight.mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
    scaler.step(opt);
    scaler.update();
  };
  step_once(false);
  auto w = net.fc->weight.detach().clone();
  auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(net.fc->weight.unsafeGetTensorImpl()));
  auto master = st.master().clone();
  step_once(true);
  REQUIRE(torch::equal(net.fc->weight.detach(), w));
  REQUIRE(torch::equal(st.master(), master));
  REQUIRE(st.step().item<float>() == 1.f);
  REQUIRE(scaler.get_scale() == 128.0);
  step_once(false);
  REQUIRE(st.step().item<float>() == 2.f);
}

TEST_CASE("GradScaler unscales and checks complex gradients as their real and imaginary parts", "[scaler][complex]") {
  auto c = torch::zeros({4}, torch::kComplexFloat).requires_grad_();
  torch::optim::SGD opt(std::vector<torch::Tensor>{c}, torch::optim::SGDOptions(0.5));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(8).growth_interval(100));
  const auto values = torch::tensor({1.0, -2.0, 0.5, 4.0, -8.0, 0.25, 3.0, -1.0}).view({4, 2});
  for (const bool overflow : {false, true}) {
    opt.zero_grad();
    scaler.scale(torch::ones({}));  // the gradient below stands for a backward of the scaled loss
    auto g = torch::view_as_complex((values * 8).to(torch::kFloat).contiguous()).clone();
    if (overflow) torch::view_as_real(g)[2][1] = std::numeric_limits<float>::infinity();  // one imaginary part
    c.mutable_grad() = g;
    scaler.unscale_(opt);
    if (!overflow) REQUIRE(torch::equal(torch::view_as_real(c.grad()), values.to(torch::kFloat)));
    scaler.step(opt);
    scaler.update();
  }
  // The first step moved c by -0.5 * grad; the second was skipped, and the scale backed off.
  REQUIRE(torch::equal(torch::view_as_real(c.detach()), (values * -0.5).to(torch::kFloat)));
  REQUIRE(scaler.get_scale() == 4.0);
}

TEST_CASE("GradScaler with torch::optim::AdamW and hysteresis, bounds, static mode", "[scaler]") {
  torch::manual_seed(0);
  Net net;
  torch::optim::AdamW opt(net.parameters(), torch::optim::AdamWOptions(1e-3));
  mixprec::GradScaler hyst(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024).hysteresis(2).min_scale(256));
  REQUIRE(train(net, opt, hyst, 5, {0, 1, 2, 3, 4}) == std::vector<double>{1024, 512, 256, 256, 256});
  mixprec::GradScaler fixed(torch::kCPU, mixprec::GradScalerOptions().init_scale(128).dynamic(false));
  REQUIRE(train(net, opt, fixed, 3, {1}) == std::vector<double>{128, 128, 128});
}

TEST_CASE("GradScaler call-order errors and disabled pass-through", "[scaler][errors]") {
  torch::manual_seed(0);
  Net net;
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
  mixprec::GradScaler scaler;
  scaler.scale(net.forward(torch::randn({2, 8})).sum()).backward();
  scaler.unscale_(opt);
  REQUIRE_THROWS_WITH(scaler.unscale_(opt), Catch::Contains("already been called"));
  scaler.step(opt);
  REQUIRE_THROWS_WITH(scaler.step(opt), Catch::Contains("step() has already been called"));
  scaler.update();
  REQUIRE_THROWS_WITH(scaler.update(), Catch::Contains("No inf checks"));
  REQUIRE_THROWS_WITH(mixprec::GradScaler(torch::kCPU, mixprec::GradScalerOptions().growth_factor(0.5)),
                      Catch::Contains("growth_factor"));
  mixprec::GradScaler off(torch::kCPU, mixprec::GradScalerOptions().enabled(false));
  auto loss = net.forward(torch::randn({2, 8})).sum();
  REQUIRE(off.scale(loss).equal(loss));
  REQUIRE(off.get_scale() == 1.0);
  if (!torch::cuda::is_available()) {
    // torch's rule, as Python's scaler (the same object): a CUDA scaler without CUDA disables itself with a
    // warning, settings unchecked (they are never used).
    mixprec::GradScaler cuda_less(torch::kCUDA, mixprec::GradScalerOptions().growth_factor(0.5));
    REQUIRE_FALSE(cuda_less.is_enabled());
    REQUIRE(cuda_less.scale(loss).equal(loss));
  }
}

TEST_CASE("GradScaler creates its scale on the first output's device, as torch's", "[scaler]") {
  // A scaler built for one device scales outputs on another (e.g. built as kCUDA before the rank's device
  // was set): the scale goes where the outputs are. The meta device shows it without a GPU.
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(8.0));
  REQUIRE_FALSE(scaler.has_scale());
  const auto scaled = scaler.scale(torch::ones({3}, torch::kMeta));
  REQUIRE(scaled.device().is_meta());
  REQUIRE(scaler.scale_tensor().device().is_meta());
  REQUIRE(scaler.growth_tracker_tensor().device().is_meta());
  mixprec::GradScaler early(torch::kCPU);
  early.init_scale_on(torch::kMeta);
  early.init_scale_on(torch::kCPU);  // exists already: kept where it is
  REQUIRE(early.scale_tensor().device().is_meta());
}

TEST_CASE("GradScaler drives mixprec's AdamW as Python's does: unscaled first unless the optimizer is fused",
          "[scaler]") {
  // A scale that is not a power of two: dividing inside the step and unscaling first round differently.
  const auto run = [](bool fused, bool unscale_first) {
    torch::manual_seed(0);
    auto p = torch::randn({33}).requires_grad_();
    const torch::Tensor w = torch::randn({33});
    mixprec::optim::AdamW opt(std::vector<torch::Tensor>{p}, mixprec::optim::AdamWOptions(0.1).fused(fused));
    mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(3072));
    std::vector<torch::Tensor> seen;
    for (int i = 0; i < 4; ++i) {
      opt.zero_grad();
      scaler.scale((p * w * (i + 1)).sum()).backward();
      if (i == 1) p.mutable_grad()[1] = std::numeric_limits<float>::infinity();
      if (unscale_first) scaler.unscale_(opt);
      scaler.step(opt);
      scaler.update();
      seen.push_back(p.grad().clone());
      seen.push_back(p.detach().clone());
    }
    return seen;
  };
  const auto plain = run(false, false);
  const auto explicit_unscale = run(false, true);
  const auto fused = run(true, false);
  for (size_t k = 0; k < plain.size(); ++k) {
    CAPTURE(k);
    REQUIRE(torch::allclose(plain[k], explicit_unscale[k], 0, 0, /*equal_nan=*/true));  // the same route
  }
  // After the skipped step (iteration 1) the default leaves the gradient unscaled, the fused route scaled.
  REQUIRE(plain[2][0].item<float>() == Approx(fused[2][0].item<float>() / 3072).epsilon(1e-6));
  REQUIRE(torch::equal(plain[3], plain[1]));  // both skipped: the parameters are those of iteration 0
  REQUIRE(torch::equal(fused[3], fused[1]));
  // torch's call-order errors: a step without gradients, an update before any scale().
  auto q = torch::zeros({2}).requires_grad_();
  mixprec::optim::AdamW opt(std::vector<torch::Tensor>{q}, mixprec::optim::AdamWOptions(0.1));
  mixprec::GradScaler scaler(torch::kCPU);
  REQUIRE_THROWS_WITH(scaler.update(), Catch::Contains("Attempted update but the scale is not set"));
  REQUIRE_THROWS_WITH(scaler.step(opt), Catch::Contains("Attempted step but the scale is not set"));
  scaler.scale(torch::ones({}));
  REQUIRE_THROWS_WITH(scaler.step(opt), Catch::Contains("No inf checks were recorded for this optimizer."));
}

TEST_CASE("Each optimizer that took the scale gets its own factor; a record only read gets none", "[scaler][overflow]") {
  // mixprec's AdamW takes the scale and skips an overflowing step itself, leaving its gradients scaled. With two
  // of them and an overflow in only one, only that one's gradients hold g * scale. Another optimizer's record
  // that was only read (torch's defaultdict creates one) has no flags and gets no entry.
  torch::manual_seed(0);
  Net net;
  const auto params = net.parameters();
  const std::vector<torch::Tensor> first{params[0]}, second{params[1]};  // the weight, the bias
  mixprec::optim::AdamW a(first, mixprec::optim::AdamOptions(1e-3).fused(true));
  mixprec::optim::AdamW b(second, mixprec::optim::AdamOptions(1e-3).fused(true));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024).track_overflows(true));
  for (int i = 0; i < 3; ++i) {
    a.zero_grad();
    b.zero_grad();
    scaler.scale(net.forward(torch::randn({2, 8})).sum()).backward();
    if (i == 1) second[0].mutable_grad().view({-1})[0] = std::numeric_limits<float>::infinity();
    scaler.ensure_optimizer_state(42);
    scaler.step(a);
    scaler.step(b);
    scaler.update();
    const auto& entries = scaler.scaled_gradients();
    REQUIRE(entries.size() == 2);
    for (const auto& entry : entries) {  // in no particular order
      const bool is_b = std::count(entry.params.begin(), entry.params.end(), second[0].unsafeGetTensorImpl()) == 1;
      const auto& mine = is_b ? second : first;
      REQUIRE(entry.params.size() == mine.size());
      for (const auto& p : mine) {
        REQUIRE(std::count(entry.params.begin(), entry.params.end(), p.unsafeGetTensorImpl()) == 1);
      }
      // The factor is the scale of the step taken (1024 before the backoff), for the optimizer that skipped.
      REQUIRE(entry.factor.item<float>() == (i == 1 && is_b ? 1024.0f : 1.0f));
    }
  }
  scaler.set_track_overflows(false);
  REQUIRE(scaler.scaled_gradients().empty());
}

TEST_CASE("GradScaler state survives torch::serialize archives", "[scaler][checkpoint]") {
  mixprec::GradScaler a(torch::kCPU, mixprec::GradScalerOptions().init_scale(4096).growth_interval(7).hysteresis(3));
  a.update(300.0);
  // Saved alone, or beside another entry in one archive (load reads only the scaler's keys).
  const auto round_trip = [&](bool beside_a_tensor) {
    std::stringstream stream;
    {
      torch::serialize::OutputArchive archive;
      if (beside_a_tensor) archive.write("weight", torch::ones({2}));
      a.save(archive);
      archive.save_to(stream);
    }
    mixprec::GradScaler b;
    torch::serialize::InputArchive archive;
    archive.load_from(stream);
    b.load(archive);
    return b.state_dict();
  };
  for (bool shared : {false, true}) {
    const auto loaded = round_trip(shared);
    REQUIRE(loaded == a.state_dict());
    REQUIRE((loaded.at("scale") == 300.0 && loaded.at("growth_interval") == 7 && loaded.at("hysteresis") == 3 &&
             loaded.at("_hysteresis_tracker") == 3.0));
  }
  // torch::save / torch::load, as for modules and optimizers.
  std::stringstream whole;
  torch::save(a, whole);
  mixprec::GradScaler c;
  torch::load(c, whole);
  REQUIRE(c.state_dict() == a.state_dict());
  // A module with a parameter named like a scaler key ("scale") in the same archive: a clear error naming the
  // way out, and a sub-archive works.
  torch::serialize::OutputArchive clash;
  clash.write("scale", torch::ones({4}));
  REQUIRE_THROWS_WITH(a.save(clash), Catch::Contains("mixprec::GradScaler::save: the archive already holds an "
                                                     "entry 'scale' of another kind") &&
                                         Catch::Contains("sub-archive"));
  torch::serialize::OutputArchive outer, sub;
  outer.write("scale", torch::ones({4}));
  a.save(sub);
  outer.write("scaler", sub);
  std::stringstream nested;
  outer.save_to(nested);
  torch::serialize::InputArchive in, in_sub;
  in.load_from(nested);
  REQUIRE(in.try_read("scaler", in_sub));
  mixprec::GradScaler d;
  d.load(in_sub);
  REQUIRE(d.state_dict() == a.state_dict());
}

TEST_CASE("GradScaler with mixprec::optim: the step divides by the scale and leaves the gradients unscaled",
          "[scaler]") {
  torch::manual_seed(0);
  Net net, twin;
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < net.parameters().size(); ++i) twin.parameters()[i].copy_(net.parameters()[i]);
  }
  mixprec::optim::AdamW opt(net.parameters(), mixprec::optim::AdamWOptions(1e-2));
  mixprec::optim::AdamW ref(twin.parameters(), mixprec::optim::AdamWOptions(1e-2));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(512));
  const auto x = torch::randn({5, 8});
  scaler.scale(net.forward(x).pow(2).mean()).backward();
  twin.forward(x).pow(2).mean().backward();
  scaler.step(opt);
  ref.step();
  scaler.update();
  for (size_t i = 0; i < net.parameters().size(); ++i) {
    REQUIRE(torch::equal(net.parameters()[i].grad(), twin.parameters()[i].grad()));  // 512: exact in fp32
    REQUIRE(torch::equal(net.parameters()[i].detach(), twin.parameters()[i].detach()));
  }
}

TEST_CASE("GradScaler setters are checked and take effect at the next update", "[scaler]") {
  torch::manual_seed(0);
  Net net;
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(64).growth_interval(100));
  scaler.set_growth_factor(4.0);
  scaler.set_backoff_factor(0.25);
  scaler.set_growth_interval(1);
  REQUIRE(scaler.options().growth_factor() == 4.0);
  REQUIRE(train(net, opt, scaler, 3, {1}) == std::vector<double>{256, 64, 256});
  // Exactly 1 holds the scale, as with torch's setters: a floor (no backoff), then a cap (no growth).
  scaler.set_backoff_factor(1.0);
  REQUIRE(train(net, opt, scaler, 3, {1}) == std::vector<double>{1024, 1024, 4096});
  scaler.set_growth_factor(1.0);
  REQUIRE(train(net, opt, scaler, 2, {}) == std::vector<double>{4096, 4096});
  REQUIRE_THROWS_WITH(scaler.set_growth_factor(0.5), Catch::Contains("growth_factor"));
  REQUIRE_THROWS_WITH(scaler.set_backoff_factor(0.0), Catch::Contains("backoff_factor"));
  REQUIRE_THROWS_WITH(scaler.set_backoff_factor(2.0), Catch::Contains("backoff_factor"));
  REQUIRE_THROWS_WITH(scaler.set_growth_interval(0), Catch::Contains("growth_interval"));
  // torch's _scale assigned: the scaler takes that tensor's memory, and updates show in it.
  const torch::Tensor mine = torch::full({1}, 8.0);
  scaler.set_growth_factor(2.0);
  scaler.set_scale_tensor(mine);
  REQUIRE(scaler.get_scale() == 8.0);
  REQUIRE(train(net, opt, scaler, 1, {}) == std::vector<double>{16});
  REQUIRE(mine.item<double>() == 16.0);
  REQUIRE_THROWS_WITH(scaler.set_scale_tensor(torch::ones({2})), Catch::Contains("one-element float32"));
  scaler.set_scale_tensor(std::nullopt);  // starts again from init_scale at the next scale()
  REQUIRE(!scaler.has_scale());
  REQUIRE(scaler.get_scale() == 64.0);
}

TEST_CASE("GradScaler names the parameters whose gradients overflowed", "[scaler][overflow]") {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4));
  const auto named = model->named_parameters();
  const auto n = static_cast<int64_t>(named.size());
  auto run = [&](torch::optim::Optimizer& opt, mixprec::GradScaler& scaler) {
    std::vector<std::optional<mixprec::OverflowReport>> reports;
    for (int i = 0; i < 4; ++i) {
      opt.zero_grad();
      scaler.scale(model->forward(torch::randn({5, 8})).pow(2).mean()).backward();
      if (i == 1) named["2.weight"].mutable_grad()[3][7] = std::numeric_limits<float>::infinity();
      if (i == 2) named["0.bias"].mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
      scaler.step(opt);
      scaler.update();
      reports.push_back(scaler.last_overflow(named));
    }
    return reports;
  };
  for (bool fused : {false, true}) {
    SECTION(fused ? "mixprec::optim::AdamW (read-only check, skip on device)" : "torch::optim::SGD (unscale_)") {
      std::unique_ptr<torch::optim::Optimizer> opt;
      if (fused) {
        opt = std::make_unique<mixprec::optim::AdamW>(model->parameters(),
                                                      mixprec::optim::AdamOptions(1e-3).fused(true));
      } else {
        opt = std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
      }
      mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024).track_overflows(true));
      const auto reports = run(*opt, scaler);
      REQUIRE_FALSE(reports[0].has_value());
      REQUIRE(reports[1]->str() == "step 1 (loss scale 1024): 2.weight: inf (1 of " + std::to_string(n) + " tensors)");
      REQUIRE(reports[2]->step == 2);
      REQUIRE(reports[2]->scale == 512.0);
      REQUIRE(reports[2]->sources.size() == 1);
      REQUIRE(reports[2]->sources[0].name == "0.bias");
      REQUIRE(reports[2]->sources[0].param.is_same(named["0.bias"]));
      REQUIRE(std::isnan(reports[2]->sources[0].max_abs));
      REQUIRE(reports[3]->step == 2);  // a clean step keeps the last overflow
      // Without names: the position among the optimizer's parameters with gradients.
      REQUIRE(scaler.last_overflow()->sources[0].name == "param[1]");
    }
  }
  SECTION("off by default: nothing is recorded") {
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
    mixprec::GradScaler scaler(torch::kCPU);
    for (const auto& r : run(opt, scaler)) REQUIRE_FALSE(r.has_value());
  }
}

TEST_CASE("Monitor logs every N steps to JSON lines and names the overflow source", "[monitor]") {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4));
  mixprec::optim::AdamW opt(model->parameters(), mixprec::optim::AdamOptions(1e-3));
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024));
  const std::string path = "mixprec_monitor_test.jsonl";
  std::remove(path.c_str());
  std::vector<mixprec::MonitorRecord> records;
  double losses = 0;
  {
    mixprec::Monitor monitor(model->named_parameters(), &scaler,
                             mixprec::MonitorOptions().every(2).jsonl(path).progress(false).min_exponent(-30).num_bins(40));
    REQUIRE(scaler.options().track_overflows());
    for (int i = 0; i < 4; ++i) {
      opt.zero_grad();
      auto loss = model->forward(torch::randn({5, 8})).pow(2).mean();
      if (i >= 2) losses += loss.item<double>();
      scaler.scale(loss).backward();
      if (i == 3) model->named_parameters()["2.bias"].mutable_grad()[1] = std::numeric_limits<float>::infinity();
      scaler.step(opt);
      scaler.update();
      auto r = monitor.step(loss, 40);
      REQUIRE(r.has_value() == (i % 2 == 1));
      if (r) records.push_back(*r);
    }
    // The per-gradient statistics of the last logged step, against a float64 count of the same gradients.
    const at::Tensor stats = monitor.last_stats();
    REQUIRE(monitor.last_stats_names() == model->named_parameters().keys());
    int64_t zeros = 0, numel = 0;
    for (const auto& p : model->parameters()) {
      numel += p.grad().numel();
      zeros += (p.grad() == 0).sum().item<int64_t>();
    }
    REQUIRE(stats.select(1, 0).sum().item<double>() == static_cast<double>(numel));
    REQUIRE(stats.select(1, 1).sum().item<double>() == static_cast<double>(zeros));
  }
  REQUIRE(records.size() == 2);
  REQUIRE(records[0].skipped_steps == 0);
  REQUIRE(records[1].step == 4);
  REQUIRE(records[1].skipped_steps == 1);
  REQUIRE(records[1].loss == Approx(losses / 2).epsilon(1e-12));
  REQUIRE(records[1].loss_scale == 512.0);
  // In the monitor's numbering: the overflow of its 4th step (the scaler's report counts 3 updates before it).
  REQUIRE(records[1].overflow == "step 4 (loss scale 1024): 2.bias: inf (1 of 4 tensors)");
  REQUIRE(records[1].tokens_per_second > 0);
  std::ifstream in(path);
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) lines.push_back(line);
  REQUIRE(lines == std::vector<std::string>{records[0].json(), records[1].json()});
  REQUIRE(lines[1].find("\"overflow\": \"step 4 (loss scale 1024): 2.bias: inf (1 of 4 tensors)\"") != std::string::npos);
  std::remove(path.c_str());
  REQUIRE_THROWS_WITH(mixprec::Monitor(model->named_parameters(), &scaler, mixprec::MonitorOptions().every(0)),
                      Catch::Contains("every must be > 0"));
  // A resumed run: the count continues from start_step, on the run's own every-grid.
  mixprec::Monitor resumed(model->named_parameters(), &scaler,
                           mixprec::MonitorOptions().every(4).progress(false).start_step(10));
  REQUIRE_FALSE(resumed.step(torch::ones({})).has_value());
  const auto r = resumed.step(torch::ones({}));
  REQUIRE(r.has_value());
  REQUIRE(r->step == 12);
  REQUIRE(r->interval == 2);
  REQUIRE_THROWS_WITH(mixprec::Monitor(model->named_parameters(), &scaler, mixprec::MonitorOptions().start_step(-1)),
                      Catch::Contains("start_step must be >= 0"));
}

TEST_CASE("Sharded gradients: every rank's Monitor and last_overflow describe the whole gradient",
          "[monitor][distributed]") {
  // Two ranks (threads over mixprec_test's in-process group) each hold half the rows of "w" (sharded: declared
  // with shard(), and its sources reduced by the scaler through set_shard_parameters and the shard group) and all
  // of "b" (replicated). Rank 1's half of w holds a NaN.
  torch::manual_seed(0);
  const torch::Tensor w_grad = torch::randn({6, 4}) * 1024;  // the whole, scaled gradient
  w_grad[4][1] = std::numeric_limits<float>::quiet_NaN();
  const torch::Tensor b_grad = torch::randn({3}) * 1024;
  auto shared = std::make_shared<mixprec_test::ThreadRendezvous>();
  std::vector<mixprec::MonitorRecord> records(2);
  std::vector<std::string> reports(2);
  std::vector<torch::Tensor> stats(2);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      const auto group = mixprec_test::thread_group(rank, 2, shared);
      torch::OrderedDict<std::string, torch::Tensor> named;
      named.insert("w", torch::zeros({3, 4}).requires_grad_());
      named.insert("b", torch::zeros({3}).requires_grad_());
      named["w"].mutable_grad() = w_grad.narrow(0, 3 * rank, 3).clone();
      named["b"].mutable_grad() = b_grad.clone();
      mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024));
      mixprec::Monitor monitor(named, &scaler, mixprec::MonitorOptions().every(1).progress(false));
      monitor.shard("w", {group});
      REQUIRE_THROWS_WITH(monitor.shard("nope", {group}), Catch::Contains("no parameter named 'nope'"));
      scaler.scale(torch::ones({}));
      const std::vector<torch::Tensor> params = named.values();
      scaler.set_shard_parameters(7, params);
      scaler.unscale_grads_(7, {named["w"].grad(), named["b"].grad()}, params, {group});
      scaler.update();
      records[rank] = monitor.step(torch::ones({})).value();
      stats[rank] = monitor.last_stats().clone();
      reports[rank] = scaler.last_overflow(named)->str();
    });
  }
  for (auto& t : threads) t.join();
  for (int rank = 0; rank < 2; ++rank) {
    CAPTURE(rank);
    // Rank 0's own half is finite: it names w from the reduced maxima.
    REQUIRE(reports[rank] == "step 0 (loss scale 1024): w: nan (1 of 2 tensors)");
    REQUIRE(records[rank].overflow == "step 1 (loss scale 1024): w: nan (1 of 2 tensors)");  // the monitor's count
    REQUIRE(records[rank].exponent_histogram == records[0].exponent_histogram);
    REQUIRE(records[rank].grad_elements == 6 * 4 + 3);
    REQUIRE(records[rank].nonfinite_fraction == Approx(1.0 / 27).epsilon(1e-15));
    // max |g| of w over its finite elements, of both halves, in float64 from the test's own whole gradient.
    const torch::Tensor w = w_grad.to(torch::kDouble) / 1024;
    const torch::Tensor finite = w.masked_select(w.isfinite());
    REQUIRE(stats[rank][0][7].item<double>() == finite.abs().max().item<double>());
    REQUIRE(stats[rank][0][0].item<double>() == 24.0);
    REQUIRE(stats[rank][1][0].item<double>() == 3.0);  // replicated: counted once
    REQUIRE(stats[rank][1][6].item<double>() == Approx((b_grad.to(torch::kDouble) / 1024).pow(2).sum().item<double>())
                                                     .epsilon(1e-14));
    REQUIRE(torch::allclose(stats[rank], stats[0], /*rtol=*/0, /*atol=*/0, /*equal_nan=*/true));  // w's sum of g^2: NaN
  }
}

TEST_CASE("Monitor::step reads the gradients it is given, one per parameter", "[monitor]") {
  torch::OrderedDict<std::string, torch::Tensor> named;
  named.insert("a", torch::zeros({2}).requires_grad_());
  named.insert("b", torch::zeros({3}).requires_grad_());
  mixprec::Monitor monitor(named, nullptr, mixprec::MonitorOptions().every(1).progress(false));
  REQUIRE(monitor.logs_next());
  REQUIRE_THROWS_WITH(monitor.step(torch::ones({}), 0, {torch::ones({2})}),
                      Catch::Contains("grads must hold one entry per parameter (2), got 1"));
  // No .grad anywhere: only what is handed over counts (b has none).
  const auto r = monitor.step(torch::ones({}), 0, {torch::tensor({3.0f, 4.0f}), std::nullopt});
  REQUIRE(r->grad_elements == 2);
  REQUIRE(r->grad_norm == 5.0);
  REQUIRE(monitor.last_stats_names() == std::vector<std::string>{"a"});
  // A logged step refused (a gradient grad_stats refuses) counts no step and keeps no loss: the next call logs
  // step 2 with its own loss, as if the refused one had never been made.
  REQUIRE_THROWS(monitor.step(torch::full({}, 100.0), 0, {torch::ones({2}, torch::kLong), std::nullopt}));
  const auto next = monitor.step(torch::full({}, 2.0), 0, {torch::tensor({3.0f, 4.0f}), std::nullopt});
  REQUIRE(next->step == 2);
  REQUIRE(next->loss == 2.0);
}

TEST_CASE("GradScaler with a process group: an overflow on one rank skips the step on every rank",
          "[scaler][distributed]") {
  // Two ranks (threads over mixprec_test's in-process group), the same initial weights, their own data; rank 1
  // plants an inf at iteration 2. With the group both ranks skip it and back off; without, rank 0 steps on.
  struct Run {
    std::vector<std::vector<double>> scales{2};
    std::vector<std::vector<torch::Tensor>> weights{2};  // the weight after each iteration
    int64_t collectives = 0;
  };
  const auto run = [](bool fused, bool grouped, bool unscale_first) {
    auto shared = std::make_shared<mixprec_test::ThreadRendezvous>();
    torch::manual_seed(0);
    std::vector<std::shared_ptr<Net>> nets{std::make_shared<Net>(), std::make_shared<Net>()};
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < nets[0]->parameters().size(); ++i) {
        nets[1]->parameters()[i].copy_(nets[0]->parameters()[i]);
      }
    }
    const torch::Tensor xs = torch::randn({2, 4, 5, 8});  // made here: the threads draw nothing
    Run out;
    std::vector<std::thread> threads;
    for (int rank = 0; rank < 2; ++rank) {
      threads.emplace_back([&, rank] {
        Net& net = *nets[rank];
        auto options = mixprec::GradScalerOptions().init_scale(1024).growth_interval(100);
        if (grouped) options.process_group(mixprec_test::thread_group(rank, 2, shared));
        mixprec::GradScaler scaler(torch::kCPU, options);
        std::unique_ptr<torch::optim::Optimizer> opt;
        if (fused) {
          opt = std::make_unique<mixprec::optim::AdamW>(net.parameters(), mixprec::optim::AdamOptions(1e-2).fused(true));
        } else {
          opt = std::make_unique<torch::optim::SGD>(net.parameters(), torch::optim::SGDOptions(0.1));
        }
        for (int i = 0; i < 4; ++i) {
          opt->zero_grad();
          scaler.scale(net.forward(xs[rank][i]).pow(2).mean()).backward();
          if (rank == 1 && i == 2) net.fc->weight.mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
          if (unscale_first) scaler.unscale_(*opt);  // as before clipping; step() then reduces nothing again
          scaler.step(*opt);
          scaler.update();
          out.scales[rank].push_back(scaler.get_scale());
          out.weights[rank].push_back(net.fc->weight.detach().clone());
        }
      });
    }
    for (auto& t : threads) t.join();
    out.collectives = shared->calls;
    return out;
  };
  for (const auto& [fused, unscale_first] : {std::pair{false, false}, {true, false}, {false, true}, {true, true}}) {
    CAPTURE(fused, unscale_first);
    const Run grouped = run(fused, true, unscale_first);
    REQUIRE(grouped.collectives == 4);  // one per iteration: where the optimizer's gradients are checked
    for (int rank = 0; rank < 2; ++rank) {
      REQUIRE(grouped.scales[rank] == std::vector<double>{1024, 1024, 512, 512});
      REQUIRE(torch::equal(grouped.weights[rank][2], grouped.weights[rank][1]));  // skipped
      REQUIRE_FALSE(torch::equal(grouped.weights[rank][3], grouped.weights[rank][2]));
    }
    const Run alone = run(fused, false, unscale_first);
    REQUIRE(alone.collectives == 0);
    REQUIRE(alone.scales[0] == std::vector<double>{1024, 1024, 1024, 1024});
    REQUIRE_FALSE(torch::equal(alone.weights[0][2], alone.weights[0][1]));  // rank 0 saw no overflow
    REQUIRE(alone.scales[1] == std::vector<double>{1024, 1024, 512, 512});
  }
}

TEST_CASE("Per-optimizer records can be read, reset and dropped, as torch's _per_optimizer_states", "[scaler]") {
  mixprec::GradScaler scaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(4));
  auto g = torch::tensor({4.0f, 8.0f});
  scaler.scale(torch::ones({}));
  REQUIRE(scaler.stage(7) == 0);
  REQUIRE(scaler.optimizer_keys().empty());
  scaler.unscale_grads_(7, {g});
  REQUIRE(scaler.stage(7) == 1);
  REQUIRE(scaler.optimizer_keys() == std::vector<int64_t>{7});
  REQUIRE(torch::equal(g, torch::tensor({1.0f, 2.0f})));
  // Back to ready with no flags (an iteration run again): a fresh record, still an entry as in torch's dict,
  // so the next unscale divides again.
  scaler.set_optimizer_state(7, 0, {});
  REQUIRE(scaler.optimizer_keys() == std::vector<int64_t>{7});
  REQUIRE(scaler.stage(7) == 0);
  REQUIRE(scaler.found_inf_per_device(7).empty());
  scaler.unscale_grads_(7, {g});
  REQUIRE(torch::equal(g, torch::tensor({0.25f, 0.5f})));
  // A flag planted by hand (another rank's overflow) decides the update.
  scaler.set_optimizer_state(7, 1, {{"cpu", torch::ones({1})}});
  REQUIRE(scaler.found_inf(7).item<float>() == 1.0f);
  REQUIRE_THROWS_WITH(scaler.set_optimizer_state(7, 3, {}), Catch::Contains("stage must be 0"));
  REQUIRE_THROWS_WITH(scaler.set_optimizer_state(7, 1, {{"cpu", torch::ones({2})}}),
                      Catch::Contains("found_inf_per_device[cpu] must be a one-element float32 tensor"));
  REQUIRE(scaler.stage(7) == 1);  // a refused edit changes nothing
  scaler.update();
  REQUIRE(scaler.get_scale() == 2.0);
  scaler.unscale_grads_(3, {g});
  scaler.forget_optimizer();
  REQUIRE_FALSE(scaler.in_iteration());
  // Reading torch's defaultdict creates a ready record: ensure_optimizer_state does the same.
  scaler.ensure_optimizer_state(5);
  REQUIRE(scaler.in_iteration());
  REQUIRE(scaler.stage(5) == 0);
}
