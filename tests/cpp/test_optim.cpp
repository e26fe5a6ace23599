// mixprec::optim::Adam/AdamW from C++: torch::optim parity, master weights, overflow skip, and
// checkpoint/resume through torch::save / torch::load.
#include <catch2/catch.hpp>
#include <mixprec/mixprec.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <sstream>
#include <type_traits>

namespace {
// torch::optim merges a param group's options with the optimizer's defaults (a field left at its constructor
// default takes the optimizer's) from torch 2.14 on, as mixprec does on every version; torch 2.11 keeps the
// group's options as given. The comparisons with torch's own optimizers below hold where it merges.
constexpr bool kTorchMergesGroupOptions =
    TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14);
}  // namespace

namespace {

std::vector<torch::Tensor> grads_for(int step, const std::vector<torch::Tensor>& like) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  std::vector<torch::Tensor> out;
  for (const auto& p : like) out.push_back(torch::randn(p.sizes(), gen).to(p.scalar_type()));
  return out;
}

std::vector<torch::Tensor> make_params(torch::ScalarType dtype) {
  torch::manual_seed(0);
  return {torch::randn({33, 17}).to(dtype).requires_grad_(), torch::randn({1000}).to(dtype).requires_grad_(),
          torch::randn({5}).to(dtype).requires_grad_()};
}

void set_grads(std::vector<torch::Tensor>& params, int step) {
  auto gs = grads_for(step, params);
  for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = gs[i];
}

}  // namespace

TEST_CASE("AdamW on fp32 params tracks torch::optim::AdamW, with an LR scheduler", "[optim]") {
  auto ours = make_params(torch::kFloat);
  auto theirs = make_params(torch::kFloat);
  mixprec::optim::AdamW opt(ours, mixprec::optim::AdamOptions(1e-2).weight_decay(0.05));
  torch::optim::AdamW ref(theirs, torch::optim::AdamWOptions(1e-2).weight_decay(0.05));
  torch::optim::StepLR sched_ours(opt, 20, 0.5), sched_ref(ref, 20, 0.5);
  for (int step = 0; step < 60; ++step) {
    set_grads(ours, step);
    set_grads(theirs, step);
    opt.step();
    ref.step();
    sched_ours.step();
    sched_ref.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    const double diff = (ours[i] - theirs[i]).abs().max().item<double>();
    REQUIRE(diff < 1e-6);
  }
}

TEST_CASE("bf16 params keep fp32 masters; each param is its master rounded", "[optim]") {
  auto params = make_params(torch::kBFloat16);
  mixprec::optim::AdamW opt(params, mixprec::optim::AdamOptions(1e-3));
  for (int step = 0; step < 10; ++step) {
    set_grads(params, step);
    opt.step();
  }
  for (const auto& p : params) {
    auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
    REQUIRE(st.master().scalar_type() == torch::kFloat);
    REQUIRE(torch::equal(p.detach(), st.master().to(torch::kBFloat16)));
    REQUIRE(st.step().item<float>() == 10.f);
  }
}

TEST_CASE("a bf16 param written between steps is where its master continues from, element by element",
          "[optim]") {
  // The parameter is the truth, as with torch::optim: a model loaded into a training model, clipping in place.
  auto params = make_params(torch::kBFloat16);
  mixprec::optim::AdamW opt(params, mixprec::optim::AdamOptions(1e-2));
  auto master = [&](size_t i) -> torch::Tensor {
    return static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl())).master();
  };
  for (int step = 0; step < 3; ++step) {
    set_grads(params, step);
    opt.step();
  }
  const torch::Tensor kept = master(1).slice(0, 500).clone();
  {
    torch::NoGradGuard no_grad;
    params[1].slice(0, 0, 500).fill_(3.0);  // half of it
    params[0].copy_(params[0].detach().clone());  // the same values again: the masters stay exact
  }
  // What a step from given fp32 values gives, with param i's moments and step count: the same step on fp32 params.
  const auto step_from = [&](size_t i, const torch::Tensor& values) {
    auto p = values.clone().requires_grad_();
    mixprec::optim::AdamW o(std::vector<torch::Tensor>{p}, mixprec::optim::AdamOptions(1e-2));
    auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl()));
    auto copy = std::make_unique<mixprec::optim::AdamParamState>();
    copy->step(st.step().clone());
    copy->exp_avg(st.exp_avg().clone());
    copy->exp_avg_sq(st.exp_avg_sq().clone());
    o.state()[p.unsafeGetTensorImpl()] = std::move(copy);
    p.mutable_grad() = params[i].grad().to(torch::kFloat);
    o.step();
    return p.detach();
  };
  set_grads(params, 3);
  auto edited = params[1].detach().to(torch::kFloat);  // the param where written, the exact master elsewhere
  edited.slice(0, 500).copy_(kept);
  const torch::Tensor expected1 = step_from(1, edited), expected0 = step_from(0, master(0));
  opt.step();
  REQUIRE(torch::equal(master(1), expected1));
  REQUIRE(torch::equal(master(0), expected0));
  REQUIRE(torch::equal(params[1].detach(), master(1).to(torch::kBFloat16)));
}

TEST_CASE("step_scaled with found_inf writes nothing; with a scale it unscales", "[optim]") {
  auto params = make_params(torch::kBFloat16);
  auto twin = make_params(torch::kBFloat16);  // the same start, stepped with unscaled gradients
  mixprec::optim::AdamW opt(params, mixprec::optim::AdamOptions(1e-3));
  mixprec::optim::AdamW ref(twin, mixprec::optim::AdamOptions(1e-3));
  set_grads(params, 0);
  set_grads(twin, 0);
  opt.step();
  ref.step();
  std::vector<torch::Tensor> before;
  for (const auto& p : params) before.push_back(p.detach().clone());

  // An overflow: parameters, gradients and step counts stay exactly as they were.
  set_grads(params, 1);
  std::vector<torch::Tensor> scaled;
  for (auto& p : params) {
    p.mutable_grad() = p.grad() * 1024;
    scaled.push_back(p.grad().clone());
  }
  opt.step_scaled(torch::full({}, 1024.f), torch::ones({}));
  for (size_t i = 0; i < params.size(); ++i) {
    REQUIRE(torch::equal(params[i].detach(), before[i]));
    REQUIRE(torch::equal(params[i].grad(), scaled[i]));
  }
  auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  REQUIRE(st.step().item<float>() == 1.f);

  // A clean step with the scale: the same update as the twin's with the unscaled gradients (1024 is a power
  // of two, so dividing is exact), and the gradients are left unscaled, as torch's fused Adam leaves them.
  opt.step_scaled(torch::full({}, 1024.f), torch::zeros({}));
  set_grads(twin, 1);
  ref.step();
  REQUIRE(st.step().item<float>() == 2.f);
  for (size_t i = 0; i < params.size(); ++i) {
    REQUIRE(torch::equal(params[i].detach(), twin[i].detach()));
    REQUIRE(torch::equal(params[i].grad(), twin[i].grad()));
  }
}

TEST_CASE("AdamWOptions has torch::optim::AdamWOptions' defaults; AdamW takes them by default", "[optim]") {
  const torch::optim::AdamWOptions theirs;
  const mixprec::optim::AdamWOptions ours;
  REQUIRE(ours.lr() == theirs.lr());
  REQUIRE(ours.weight_decay() == theirs.weight_decay());
  REQUIRE(ours.eps() == theirs.eps());
  REQUIRE(ours.betas() == theirs.betas());
  REQUIRE(ours.amsgrad() == theirs.amsgrad());
  REQUIRE(mixprec::optim::AdamOptions().weight_decay() == torch::optim::AdamOptions().weight_decay());
  auto params = make_params(torch::kFloat);
  mixprec::optim::AdamW opt(params);
  REQUIRE(static_cast<mixprec::optim::AdamOptions&>(opt.defaults()).weight_decay() == 1e-2);
  // Chained setters as with torch's options.
  mixprec::optim::AdamW tuned(params, mixprec::optim::AdamWOptions(3e-4).weight_decay(0.1));
  REQUIRE(static_cast<mixprec::optim::AdamOptions&>(tuned.defaults()).lr() == 3e-4);
  // A bare learning rate, as torch::optim::AdamW(params, 1e-3) takes it, means AdamWOptions (weight decay 1e-2);
  // options given in full keep what they set.
  const auto decay = [](mixprec::optim::AdamW& o) {
    return static_cast<mixprec::optim::AdamOptions&>(o.defaults()).weight_decay();
  };
  mixprec::optim::AdamW bare(params, 1e-3), braced(params, {1e-3}), empty(params, {});
  torch::optim::AdamW torch_bare(params, 1e-3);
  REQUIRE(decay(bare) == static_cast<torch::optim::AdamWOptions&>(torch_bare.defaults()).weight_decay());
  REQUIRE((decay(braced) == 1e-2 && decay(empty) == 1e-2 && bare.defaults().get_lr() == 1e-3));
  mixprec::optim::AdamW plain(params, mixprec::optim::AdamOptions(1e-3));
  mixprec::optim::AdamW from_torch(params, torch::optim::AdamWOptions(1e-3).weight_decay(0.3));
  REQUIRE((decay(plain) == 0.0 && decay(from_torch) == 0.3));
  // A param group's options: the fields left at the constructor defaults of the type the group was given take
  // the optimizer's (torch's merge rule). mixprec's AdamWOptions stay AdamWOptions when the group copies them.
  const auto group_decay = [](torch::optim::Optimizer& o, size_t i) {
    return static_cast<mixprec::optim::AdamOptions&>(o.param_groups()[i].options()).weight_decay();
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0]},
                      std::make_unique<mixprec::optim::AdamOptions>(mixprec::optim::AdamOptions(5e-3)));
  groups.emplace_back(std::vector<torch::Tensor>{params[1]},
                      std::make_unique<mixprec::optim::AdamWOptions>(mixprec::optim::AdamWOptions(5e-3)));
  mixprec::optim::AdamW grouped(groups, mixprec::optim::AdamWOptions(1e-2).weight_decay(0.1));
  REQUIRE((group_decay(grouped, 0) == 0.1 && group_decay(grouped, 1) == 0.1));
  mixprec::optim::Adam adam_grouped(groups, mixprec::optim::AdamOptions(1e-2).weight_decay(0.05));
  REQUIRE((group_decay(adam_grouped, 0) == 0.05 && group_decay(adam_grouped, 1) == 0.05));
  // torch::optim::Adam does the same with its own options types.
  std::vector<torch::optim::OptimizerParamGroup> torch_groups;
  torch_groups.emplace_back(std::vector<torch::Tensor>{params[0]},
                            std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(5e-3)));
  torch::optim::Adam torch_adam(torch_groups, torch::optim::AdamOptions(1e-2).weight_decay(0.05));
  if (kTorchMergesGroupOptions) {
    REQUIRE(static_cast<torch::optim::AdamOptions&>(torch_adam.param_groups()[0].options()).weight_decay() == 0.05);
  }
}

TEST_CASE("AdamWOptions' setters chain as AdamWOptions, and AdamW's options are AdamWOptions, as torch's",
          "[optim][dropin]") {
  // A chain keeps the type (torch's setters return AdamWOptions& too), so `auto` and decltype see AdamW's.
  auto chained = mixprec::optim::AdamWOptions(0.05).amsgrad(true);
  static_assert(std::is_same_v<decltype(chained), mixprec::optim::AdamWOptions>);
  static_assert(std::is_same_v<decltype(torch::optim::AdamWOptions(0.05).amsgrad(true)), torch::optim::AdamWOptions&>);
  auto params = make_params(torch::kFloat);
  // As a group's options, the fields left at AdamWOptions' defaults (weight_decay) take the optimizer's: what
  // torch::optim::AdamW does with its own chained options.
  std::vector<torch::optim::OptimizerParamGroup> groups, torch_groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0]}, std::make_unique<decltype(chained)>(chained));
  auto theirs = torch::optim::AdamWOptions(0.05).amsgrad(true);
  torch_groups.emplace_back(std::vector<torch::Tensor>{params[0]}, std::make_unique<decltype(theirs)>(theirs));
  mixprec::optim::AdamW ours(groups, mixprec::optim::AdamWOptions(0.01).weight_decay(0.3));
  torch::optim::AdamW torch_opt(torch_groups, torch::optim::AdamWOptions(0.01).weight_decay(0.3));
  const auto& mine = static_cast<mixprec::optim::AdamOptions&>(ours.param_groups()[0].options());
  const auto& torchs = static_cast<torch::optim::AdamWOptions&>(torch_opt.param_groups()[0].options());
  REQUIRE(mine.weight_decay() == 0.3);
  if (kTorchMergesGroupOptions) REQUIRE(torchs.weight_decay() == 0.3);
  REQUIRE((mine.lr() == 0.05 && mine.amsgrad()));
  // At run time the options are AdamWOptions (defaults and groups), also after a save and load; Adam's are not.
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(&ours.defaults()) != nullptr);
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(&ours.param_groups()[0].options()) != nullptr);
  mixprec::optim::AdamW plain(params);
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(&plain.param_groups()[0].options()) != nullptr);
  std::stringstream stream;
  torch::save(plain, stream);
  torch::load(plain, stream);
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(&plain.param_groups()[0].options()) != nullptr);
  REQUIRE(static_cast<mixprec::optim::AdamOptions&>(plain.param_groups()[0].options()).weight_decay() == 1e-2);
  mixprec::optim::Adam adam(params);
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(&adam.defaults()) == nullptr);
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(&adam.param_groups()[0].options()) == nullptr);
}

TEST_CASE("amsgrad(true) tracks torch::optim::Adam/AdamW with amsgrad, state included, and survives a checkpoint",
          "[optim][amsgrad]") {
  // Gradients 10x larger for the first steps, then 10x smaller: the second moment falls, its running maximum
  // does not, so AMSGrad's steps differ from Adam's (checked below, so the option cannot be ignored).
  const auto scaled_grads = [](std::vector<torch::Tensor>& params, int step) {
    set_grads(params, step);
    for (auto& p : params) p.mutable_grad() = p.grad() * (step < 10 ? 10.0 : 0.1);
  };
  for (const bool decoupled : {true, false}) {
    auto ours = make_params(torch::kFloat);
    auto theirs = make_params(torch::kFloat);
    auto plain = make_params(torch::kFloat);
    std::unique_ptr<torch::optim::Optimizer> opt, ref, no_ams;
    const std::tuple<double, double> betas{0.9, 0.95};  // a second moment that falls within the run
    if (decoupled) {
      opt = std::make_unique<mixprec::optim::AdamW>(ours, mixprec::optim::AdamWOptions(1e-2).betas(betas).amsgrad(true));
      ref = std::make_unique<torch::optim::AdamW>(theirs, torch::optim::AdamWOptions(1e-2).betas(betas).amsgrad(true));
      no_ams = std::make_unique<mixprec::optim::AdamW>(plain, mixprec::optim::AdamWOptions(1e-2).betas(betas));
    } else {
      const auto ours_options = mixprec::optim::AdamOptions(1e-2).betas(betas).weight_decay(0.05);
      opt = std::make_unique<mixprec::optim::Adam>(ours, mixprec::optim::AdamOptions(ours_options).amsgrad(true));
      ref = std::make_unique<torch::optim::Adam>(
          theirs, torch::optim::AdamOptions(1e-2).betas(betas).weight_decay(0.05).amsgrad(true));
      no_ams = std::make_unique<mixprec::optim::Adam>(plain, ours_options);
    }
    for (int step = 0; step < 40; ++step) {
      scaled_grads(ours, step);
      scaled_grads(theirs, step);
      scaled_grads(plain, step);
      opt->step();
      ref->step();
      no_ams->step();
    }
    for (size_t i = 0; i < ours.size(); ++i) {
      REQUIRE((ours[i] - theirs[i]).abs().max().item<double>() < 1e-6);
      REQUIRE((ours[i] - plain[i]).abs().max().item<double>() > 1e-3);
      auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt->state().at(ours[i].unsafeGetTensorImpl()));
      auto& rs = static_cast<torch::optim::AdamParamState&>(*ref->state().at(theirs[i].unsafeGetTensorImpl()));
      REQUIRE(st.max_exp_avg_sq().defined());
      REQUIRE(torch::allclose(st.max_exp_avg_sq(), rs.max_exp_avg_sq(), 1e-6, 0.0));
      // The maximum stays above the decayed second moment.
      REQUIRE((st.max_exp_avg_sq() >= st.exp_avg_sq()).all().item<bool>());
      REQUIRE((st.max_exp_avg_sq() > st.exp_avg_sq()).any().item<bool>());
    }
  }
  // bf16 params with fp32 masters: the masters follow torch's fp32 AMSGrad, and a checkpoint taken half way
  // resumes bit for bit (the running maxima are saved with the state).
  auto straight = make_params(torch::kBFloat16);
  std::vector<torch::Tensor> reference;  // fp32 copies of the bf16 start
  for (const auto& p : straight) reference.push_back(p.detach().to(torch::kFloat).requires_grad_());
  const auto options = mixprec::optim::AdamWOptions(1e-3).amsgrad(true);
  mixprec::optim::AdamW a(straight, options);
  torch::optim::AdamW ref(reference, torch::optim::AdamWOptions(1e-3).amsgrad(true));
  std::stringstream saved;
  std::vector<torch::Tensor> resumed_params;
  for (int step = 0; step < 20; ++step) {
    if (step == 10) {
      torch::save(a, saved);
      for (const auto& p : straight) resumed_params.push_back(p.detach().clone().requires_grad_());
    }
    scaled_grads(straight, step);
    for (size_t i = 0; i < straight.size(); ++i) reference[i].mutable_grad() = straight[i].grad().to(torch::kFloat);
    a.step();
    ref.step();
  }
  mixprec::optim::AdamW b(resumed_params, options);
  torch::load(b, saved);
  for (int step = 10; step < 20; ++step) {
    scaled_grads(resumed_params, step);
    b.step();
  }
  for (size_t i = 0; i < straight.size(); ++i) {
    auto& st = static_cast<mixprec::optim::AdamParamState&>(*a.state().at(straight[i].unsafeGetTensorImpl()));
    REQUIRE((st.master() - reference[i].detach()).abs().max().item<double>() < 1e-6);
    REQUIRE(torch::equal(straight[i].detach(), resumed_params[i].detach()));
  }
}

TEST_CASE("a load refused half way leaves the optimizer as it was, as the Python optimizer's", "[optim][checkpoint]") {
  // An archive whose options a step refuses (checked after torch's reader replaced everything), and one whose
  // second group has another size (refused by torch's reader after the first group was replaced).
  auto params = make_params(torch::kBFloat16);
  mixprec::optim::AdamW opt({torch::optim::OptimizerParamGroup({params[0]}),
                             torch::optim::OptimizerParamGroup({params[1], params[2]})},
                            mixprec::optim::AdamOptions(1e-2).seed(3));
  for (int step = 0; step < 2; ++step) {
    set_grads(params, step);
    opt.step();
  }
  std::stringstream mine;
  torch::save(opt, mine);
  const std::string saved = mine.str();
  const auto* options0 = &opt.param_groups()[0].options();
  const auto check_unchanged = [&] {
    std::stringstream now;
    torch::save(opt, now);
    REQUIRE(now.str() == saved);
    REQUIRE(&opt.param_groups()[0].options() == options0);  // in place: references to it stay live
  };
  {
    auto others = make_params(torch::kBFloat16);
    mixprec::optim::AdamW other({torch::optim::OptimizerParamGroup({others[0]}),
                                 torch::optim::OptimizerParamGroup({others[1], others[2]})},
                                mixprec::optim::AdamOptions(5e-2));
    set_grads(others, 0);
    other.step();
    static_cast<mixprec::optim::AdamOptions&>(other.param_groups()[0].options()).master_weights("fp64");
    std::stringstream archive;
    torch::save(other, archive);
    REQUIRE_THROWS_WITH(torch::load(opt, archive), Catch::Contains("master_weights must be one of"));
    check_unchanged();
  }
  {
    auto others = make_params(torch::kBFloat16);
    mixprec::optim::AdamW other({torch::optim::OptimizerParamGroup({others[0]}),
                                 torch::optim::OptimizerParamGroup({others[1]})},
                                mixprec::optim::AdamOptions(5e-2).rounding("stochastic"));
    set_grads(others, 0);
    other.step();
    std::stringstream archive;
    torch::save(other, archive);
    REQUIRE_THROWS(torch::load(opt, archive));
    check_unchanged();
  }
  set_grads(params, 2);
  opt.step();  // and steps on
}

TEST_CASE("save and load through torch::save/torch::load resume bit for bit", "[optim][checkpoint]") {
  for (const std::string mode : {"fp32", "remainder", "none"}) {
    auto options = mixprec::optim::AdamOptions(1e-3).weight_decay(0.01).master_weights(mode).seed(5);
    if (mode == "none") options.rounding("stochastic").moment_dtype(torch::kBFloat16);
    auto straight = make_params(torch::kBFloat16);
    mixprec::optim::AdamW a(straight, options);
    for (int step = 0; step < 12; ++step) {
      set_grads(straight, step);
      a.step();
    }

    auto resumed = make_params(torch::kBFloat16);
    std::stringstream opt_stream, param_stream;
    {
      mixprec::optim::AdamW b(resumed, options);
      for (int step = 0; step < 5; ++step) {
        set_grads(resumed, step);
        b.step();
      }
      torch::save(b, opt_stream);
      torch::save(resumed, param_stream);
    }
    auto fresh = make_params(torch::kBFloat16);
    std::vector<torch::Tensor> loaded;
    torch::load(loaded, param_stream);
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < fresh.size(); ++i) fresh[i].copy_(loaded[i]);
    }
    mixprec::optim::AdamW c(fresh, options);
    torch::load(c, opt_stream);
    for (int step = 5; step < 12; ++step) {
      set_grads(fresh, step);
      c.step();
    }
    INFO("master mode " << mode);
    for (size_t i = 0; i < fresh.size(); ++i) {
      REQUIRE(torch::equal(fresh[i].detach().view(torch::kShort), straight[i].detach().view(torch::kShort)));
    }
  }
}

TEST_CASE("bad optimizer settings are rejected by name", "[optim][errors]") {
  auto params = make_params(torch::kFloat);
  REQUIRE_THROWS_WITH(mixprec::optim::AdamW(params, mixprec::optim::AdamOptions(-1.0)),
                      Catch::Contains("learning rate"));
  REQUIRE_THROWS_WITH(mixprec::optim::AdamW(params, mixprec::optim::AdamOptions(1e-3).master_weights("fp64")),
                      Catch::Contains("master_weights"));
  REQUIRE_THROWS_WITH(mixprec::optim::AdamW(params, mixprec::optim::AdamOptions(1e-3).betas({0.9, 1.0})),
                      Catch::Contains("beta"));
  // As Python refuses them (one check in the core): a negative seed other than -1 (none) is not "no seed".
  REQUIRE_THROWS_WITH(mixprec::optim::AdamW(params, mixprec::optim::AdamOptions(1e-3).seed(-5)),
                      Catch::Contains("seed must be a non-negative integer"));
  REQUIRE_THROWS_WITH(mixprec::optim::AdamW(params, mixprec::optim::AdamOptions(1e-3).seed(3).rng_calls(-1)),
                      Catch::Contains("rng_calls must be a non-negative integer"));
  REQUIRE_NOTHROW(mixprec::optim::AdamW(params, mixprec::optim::AdamOptions(1e-3).seed(-1)));
}

TEST_CASE("a step takes what torch::optim::AdamW's step takes (a scheduler's negative lr, group edits); only "
          "betas[0] = 1 is refused, before any group is written",
          "[optim][dropin]") {
  auto ours = make_params(torch::kFloat);
  auto theirs = make_params(torch::kFloat);
  const auto groups = [](std::vector<torch::Tensor>& p) {
    return std::vector<torch::optim::OptimizerParamGroup>{
        torch::optim::OptimizerParamGroup({p[0], p[1]}),
        torch::optim::OptimizerParamGroup({p[2]}, std::make_unique<torch::optim::AdamWOptions>(1e-2))};
  };
  mixprec::optim::AdamW opt(groups(ours), mixprec::optim::AdamWOptions(1e-2));
  torch::optim::AdamW ref(groups(theirs), torch::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 8; ++step) {
    // What torch's constructor refuses but its step computes with: lr falling below 0 (an unclamped linear
    // decay), negative weight decay, beta1 above 1.
    const double lr = 1e-2 * (1.0 - step / 4.0);
    static_cast<mixprec::optim::AdamWOptions&>(opt.param_groups()[0].options()).lr(lr).weight_decay(-0.05);
    static_cast<torch::optim::AdamWOptions&>(ref.param_groups()[0].options()).lr(lr).weight_decay(-0.05);
    static_cast<mixprec::optim::AdamWOptions&>(opt.param_groups()[1].options()).betas({1.05, 0.999});
    static_cast<torch::optim::AdamWOptions&>(ref.param_groups()[1].options()).betas({1.05, 0.999});
    set_grads(ours, step);
    set_grads(theirs, step);
    opt.step();
    ref.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    REQUIRE(ours[i].isfinite().all().item<bool>());
    REQUIRE((ours[i] - theirs[i]).abs().max().item<double>() <= 1e-6 * (1 + theirs[i].abs().max().item<double>()));
  }
  // betas[0] = 1 in the second group: the first group is not stepped either.
  const std::vector<torch::Tensor> before = {ours[0].detach().clone(), ours[2].detach().clone()};
  const torch::Tensor m0 = static_cast<mixprec::optim::AdamParamState&>(
                               *opt.state().at(ours[0].unsafeGetTensorImpl())).exp_avg().clone();
  static_cast<mixprec::optim::AdamWOptions&>(opt.param_groups()[1].options()).betas({1.0, 0.999});
  set_grads(ours, 9);
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("betas[0] must not be 1"));
  REQUIRE(torch::equal(ours[0], before[0]));
  REQUIRE(torch::equal(ours[2], before[1]));
  REQUIRE(torch::equal(static_cast<mixprec::optim::AdamParamState&>(
                           *opt.state().at(ours[0].unsafeGetTensorImpl())).exp_avg(), m0));
}

TEST_CASE("switching from fp32 masters to remainder mode keeps the exact master", "[optim]") {
  // As the Python optimizer does: the param takes the master's bf16 half, the remainder the rest, so
  // merging the two gives the master's fp32 bits (zero remainders would drop them).
  auto params = make_params(torch::kBFloat16);
  mixprec::optim::AdamW opt(params, mixprec::optim::AdamWOptions(1e-2).master_weights("fp32"));
  for (int step = 0; step < 3; ++step) {
    set_grads(params, step);
    opt.step();
  }
  auto state_of = [&](const torch::Tensor& p) -> mixprec::optim::AdamParamState& {
    return static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
  };
  std::vector<torch::Tensor> masters;
  for (const auto& p : params) masters.push_back(state_of(p).master().clone());
  REQUIRE(!torch::equal(masters[1], params[1].detach().to(torch::kFloat)));  // the master holds more than bf16
  // lr 0: the step leaves every weight as it is (w - 0 * update, decay factor 1), so only the switch acts.
  static_cast<mixprec::optim::AdamOptions&>(opt.param_groups()[0].options()).master_weights("remainder").lr(0.0);
  set_grads(params, 3);
  opt.step();
  for (size_t i = 0; i < params.size(); ++i) {
    auto& st = state_of(params[i]);
    REQUIRE(!st.master().defined());
    REQUIRE(st.remainder().scalar_type() == torch::kShort);
    REQUIRE(torch::equal(mixprec::ops::merge_bf16_remainder(params[i].detach(), st.remainder()), masters[i]));
  }
}

TEST_CASE("the core's cached lists follow state replaced between steps and params without gradients", "[optim]") {
  auto params = make_params(torch::kBFloat16);
  mixprec::optim::AdamW opt(params, mixprec::optim::AdamWOptions(1e-2));
  auto state_of = [&](const torch::Tensor& p) -> mixprec::optim::AdamParamState& {
    return static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
  };
  for (int step = 0; step < 2; ++step) {
    set_grads(params, step);
    opt.step();
  }
  // Replaced through the state's setter: the next step must update the new tensor, not the cached one.
  auto old = state_of(params[0]).exp_avg();
  const auto old_values = old.clone();
  state_of(params[0]).exp_avg(torch::zeros_like(old));
  // And a param without a gradient this step is skipped (its count stays).
  params[2].mutable_grad() = torch::Tensor();
  auto gs = grads_for(2, params);
  params[0].mutable_grad() = gs[0];
  params[1].mutable_grad() = gs[1];
  opt.step();
  REQUIRE(torch::equal(old, old_values));
  REQUIRE(torch::allclose(state_of(params[0]).exp_avg(), 0.1 * gs[0].to(torch::kFloat)));
  REQUIRE(state_of(params[2]).step().item<float>() == 2.0f);
  REQUIRE(state_of(params[1]).step().item<float>() == 3.0f);
}

TEST_CASE("float64 params take a float64 step with float64 moments, as torch::optim::AdamW's", "[optim][float64]") {
  auto ours = make_params(torch::kDouble);
  auto theirs = make_params(torch::kDouble);
  auto opts = mixprec::optim::AdamOptions(1e-2).weight_decay(0.05).amsgrad(true);
  mixprec::optim::AdamW opt(ours, opts);
  torch::optim::AdamW ref(theirs, torch::optim::AdamWOptions(1e-2).weight_decay(0.05).amsgrad(true));
  for (int step = 0; step < 20; ++step) {
    set_grads(ours, step);
    set_grads(theirs, step);
    opt.step();
    ref.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    REQUIRE(ours[i].scalar_type() == torch::kDouble);
    // fp32 arithmetic would be ~1e-7 off; the two float64 computations differ only in rounding order.
    REQUIRE(torch::allclose(ours[i], theirs[i], /*rtol=*/1e-12, /*atol=*/1e-14));
    auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(ours[i].unsafeGetTensorImpl()));
    REQUIRE(st.exp_avg().scalar_type() == torch::kDouble);
    REQUIRE(st.max_exp_avg_sq().scalar_type() == torch::kDouble);
    REQUIRE(st.step().item<double>() == 20);
  }
}

TEST_CASE("complex params are stepped as pairs of reals (torch.optim's rule), with complex state", "[optim][complex]") {
  // torch::optim::AdamW in C++ squares a complex gradient as a complex number; torch.optim in Python, and
  // mixprec, step the real and imaginary parts as independent reals: the reference is that pair, in torch.
  for (const auto dtype : {torch::kComplexFloat, torch::kComplexDouble}) {
    torch::manual_seed(3);
    const auto init = torch::randn({9, 4}, torch::TensorOptions().dtype(dtype));
    auto c = init.clone().requires_grad_();
    auto re = torch::real(init).clone().requires_grad_();
    auto im = torch::imag(init).clone().requires_grad_();
    const auto opts = mixprec::optim::AdamOptions(0.05).weight_decay(0.1).amsgrad(true);
    mixprec::optim::AdamW opt(std::vector<torch::Tensor>{c}, opts);
    torch::optim::AdamW ref(std::vector<torch::Tensor>{re, im},
                            torch::optim::AdamWOptions(0.05).weight_decay(0.1).amsgrad(true));
    for (int step = 0; step < 10; ++step) {
      const auto g = torch::randn({9, 4}, torch::TensorOptions().dtype(dtype)) * (step < 3 ? 4.0 : 0.5);
      c.mutable_grad() = g;
      re.mutable_grad() = torch::real(g).clone();
      im.mutable_grad() = torch::imag(g).clone();
      opt.step();
      ref.step();
    }
    const bool fp64 = dtype == torch::kComplexDouble;
    const double tol = fp64 ? 1e-12 : 1e-6;  // float64 arithmetic for complex128, fp32 for complex64
    REQUIRE(c.scalar_type() == dtype);
    REQUIRE(torch::allclose(torch::view_as_real(c.detach()), torch::stack({re, im}, -1), tol, tol));
    auto& st = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(c.unsafeGetTensorImpl()));
    REQUIRE(st.exp_avg().scalar_type() == dtype);
    REQUIRE(st.max_exp_avg_sq().scalar_type() == dtype);
    REQUIRE(st.step().item<double>() == 10);
  }
}

TEST_CASE("A parameter listed twice in a group is named, and no state is created", "[optim]") {
  auto p = torch::ones({3}).requires_grad_();
  auto q = torch::ones({3}).requires_grad_();
  mixprec::optim::AdamW opt(std::vector<torch::Tensor>{q, p, p}, mixprec::optim::AdamOptions(0.1));
  p.mutable_grad() = torch::ones({3});
  q.mutable_grad() = torch::ones({3});
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("parameter 2 of the param group appears in it more than once"));
  REQUIRE(opt.state().empty());
  REQUIRE(torch::equal(q, torch::ones({3})));
}

TEST_CASE("torch::optim options and checkpoints work unchanged with mixprec::optim::AdamW", "[optim][dropin]") {
  // Code written for torch::optim::AdamW: its options type, a param group with its own torch options.
  auto ours = make_params(torch::kFloat);
  auto theirs = make_params(torch::kFloat);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{ours[0], ours[1]});
  groups.emplace_back(std::vector<torch::Tensor>{ours[2]},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(5e-3).weight_decay(0.2)));
  mixprec::optim::AdamW opt(groups, torch::optim::AdamWOptions(1e-2).weight_decay(0.05).amsgrad(true));
  std::vector<torch::optim::OptimizerParamGroup> ref_groups;
  ref_groups.emplace_back(std::vector<torch::Tensor>{theirs[0], theirs[1]});
  ref_groups.emplace_back(std::vector<torch::Tensor>{theirs[2]}, std::make_unique<torch::optim::AdamWOptions>(
                                                                     torch::optim::AdamWOptions(5e-3).weight_decay(0.2)));
  torch::optim::AdamW ref(ref_groups, torch::optim::AdamWOptions(1e-2).weight_decay(0.05).amsgrad(true));
  // add_param_group with torch's options (torch::optim::Optimizer's own method, not virtual) works as well.
  auto extra = torch::randn({7}).requires_grad_();
  auto extra_ref = extra.detach().clone().requires_grad_();
  opt.add_param_group(torch::optim::OptimizerParamGroup({extra}, std::make_unique<torch::optim::AdamOptions>(
                                                                      torch::optim::AdamOptions(2e-2).weight_decay(0.3))));
  ref.add_param_group(torch::optim::OptimizerParamGroup({extra_ref}, std::make_unique<torch::optim::AdamWOptions>(
                                                                          torch::optim::AdamWOptions(2e-2).weight_decay(0.3))));
  const auto run = [&](int from, int to) {
    for (int step = from; step < to; ++step) {
      set_grads(ours, step);
      set_grads(theirs, step);
      extra.mutable_grad() = torch::full({7}, 0.01 * step);
      extra_ref.mutable_grad() = torch::full({7}, 0.01 * step);
      opt.step();
      ref.step();
    }
  };
  run(0, 10);
  REQUIRE(static_cast<mixprec::optim::AdamOptions&>(opt.param_groups()[1].options()).weight_decay() == 0.2);
  REQUIRE(static_cast<mixprec::optim::AdamOptions&>(opt.param_groups()[2].options()).lr() == 2e-2);
  // A torch::optim::AdamW checkpoint (int64 step counts, torch's options only) loads into mixprec's AdamW.
  std::stringstream buffer;
  torch::save(ref, buffer);
  // mixprec's own settings (absent from torch's checkpoint) stay as configured; torch's options are loaded.
  mixprec::optim::AdamW resumed(groups, mixprec::optim::AdamWOptions(1.0).master_weights("fp32").seed(7));
  resumed.add_param_group(torch::optim::OptimizerParamGroup({extra}));
  // A reference to a group's options taken before the load stays the group's (a schedule sets lr through it, as
  // with torch::optim::AdamW, whose loader assigns into the same object): the load keeps every object.
  torch::optim::OptimizerOptions* held = &resumed.param_groups()[0].options();
  torch::load(resumed, buffer);
  REQUIRE(held == &resumed.param_groups()[0].options());
  REQUIRE(dynamic_cast<mixprec::optim::AdamWOptions*>(held) != nullptr);  // still AdamW's type
  const auto& loaded = static_cast<mixprec::optim::AdamOptions&>(resumed.param_groups()[0].options());
  REQUIRE((loaded.lr() == 1e-2 && loaded.amsgrad() && loaded.master_weights() == "fp32" && loaded.seed() == 7));
  for (int step = 10; step < 20; ++step) {
    set_grads(ours, step);
    set_grads(theirs, step);
    extra.mutable_grad() = torch::full({7}, 0.01 * step);
    extra_ref.mutable_grad() = torch::full({7}, 0.01 * step);
    resumed.step();
    ref.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) REQUIRE((ours[i] - theirs[i]).abs().max().item<double>() < 1e-6);
  REQUIRE((extra - extra_ref).abs().max().item<double>() < 1e-6);
  auto& st = static_cast<mixprec::optim::AdamParamState&>(*resumed.state().at(ours[0].unsafeGetTensorImpl()));
  REQUIRE(st.step().item<double>() == 20);
  REQUIRE(st.max_exp_avg_sq().defined());
  // mixprec's own per-group options are kept too (torch's base constructor alone would drop them), merged with
  // the defaults by torch's rule: fields left at their constructor default take the optimizer's.
  auto q = torch::ones({2}).requires_grad_();
  std::vector<torch::optim::OptimizerParamGroup> own;
  own.emplace_back(std::vector<torch::Tensor>{q}, std::make_unique<mixprec::optim::AdamOptions>(
                                                      mixprec::optim::AdamOptions(0.07).master_weights("fp32")));
  mixprec::optim::Adam own_opt(own, mixprec::optim::AdamOptions(1e-3).amsgrad(true).eps(1e-6));
  const auto& got = static_cast<mixprec::optim::AdamOptions&>(own_opt.param_groups()[0].options());
  REQUIRE((got.lr() == 0.07 && got.master_weights() == "fp32" && got.amsgrad() && got.eps() == 1e-6));
  // Options of another optimizer are named.
  std::vector<torch::optim::OptimizerParamGroup> sgd_group;
  sgd_group.emplace_back(std::vector<torch::Tensor>{torch::ones({2}).requires_grad_()},
                         std::make_unique<torch::optim::SGDOptions>(0.1));
  REQUIRE_THROWS_WITH(mixprec::optim::AdamW(sgd_group), Catch::Contains("a param group has options of another optimizer"));
}

TEST_CASE("a mixprec::optim::AdamW checkpoint loads into torch::optim::AdamW and resumes there", "[optim][dropin]") {
  // The other direction of the drop-in: a run started with mixprec goes on with torch's optimizer.
  auto ours = make_params(torch::kFloat);
  auto theirs = make_params(torch::kFloat);
  const auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.05).amsgrad(true);
  mixprec::optim::AdamW opt(ours, options);
  torch::optim::AdamW ref(theirs, options);
  const auto run = [&](torch::optim::Optimizer& a, torch::optim::Optimizer& b, int from, int to) {
    for (int step = from; step < to; ++step) {
      set_grads(ours, step);
      set_grads(theirs, step);
      a.step();
      b.step();
    }
  };
  run(opt, ref, 0, 7);
  std::stringstream buffer;
  torch::save(opt, buffer);
  torch::optim::AdamW resumed(ours, torch::optim::AdamWOptions(1.0));
  torch::load(resumed, buffer);
  const auto& loaded = static_cast<torch::optim::AdamWOptions&>(resumed.param_groups()[0].options());
  REQUIRE((loaded.lr() == 1e-2 && loaded.weight_decay() == 0.05 && loaded.amsgrad()));
  for (size_t i = 0; i < ours.size(); ++i) {
    const auto& mine = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(ours[i].unsafeGetTensorImpl()));
    const auto& got = static_cast<torch::optim::AdamWParamState&>(*resumed.state().at(ours[i].unsafeGetTensorImpl()));
    REQUIRE(got.step() == 7);
    REQUIRE(torch::equal(got.exp_avg(), mine.exp_avg()));
    REQUIRE(torch::equal(got.exp_avg_sq(), mine.exp_avg_sq()));
    REQUIRE(torch::equal(got.max_exp_avg_sq(), mine.max_exp_avg_sq()));
  }
  run(resumed, ref, 7, 15);
  for (size_t i = 0; i < ours.size(); ++i) REQUIRE((ours[i] - theirs[i]).abs().max().item<double>() < 1e-6);
  // And back: torch's checkpoint of the continued run resumes in mixprec's optimizer.
  std::stringstream again;
  torch::save(resumed, again);
  mixprec::optim::AdamW back(ours, options);
  torch::load(back, again);
  run(back, ref, 15, 20);
  for (size_t i = 0; i < ours.size(); ++i) REQUIRE((ours[i] - theirs[i]).abs().max().item<double>() < 1e-6);
}
