// Exact resume across processes, from C++: `mixprec_resume straight OUT` trains 20 steps;
// `mixprec_resume first CKPT K` trains K steps and saves model, optimizer and scaler;
// `mixprec_resume second CKPT K OUT` starts a fresh process from that checkpoint and trains the rest;
// `mixprec_resume compare A B` exits non-zero unless the two results are bitwise identical (parameters, the
// FP8 layer's delayed-scaling state, optimizer state, scaler).
// ctest runs the four in order (tests/cpp/CMakeLists.txt).
#include <mixprec/mixprec.h>
#include <torch/torch.h>

#include <cstdio>
#include <limits>
#include <string>

namespace {

constexpr int kSteps = 20;

torch::nn::Sequential make_model() {
  torch::manual_seed(0);
  // The middle layer in FP8 with delayed scaling and a window shorter than the run, so the checkpoint
  // cuts through the amax history.
  mixprec::fp8::Recipe recipe;
  recipe.amax_history_len = 4;
  torch::nn::Sequential model(torch::nn::Linear(16, 32), torch::nn::GELU(), mixprec::nn::Float8Linear(32, 32, recipe),
                              torch::nn::GELU(), torch::nn::Linear(32, 1));
  model->to(torch::kBFloat16);
  return model;
}

mixprec::optim::AdamW make_optimizer(torch::nn::Sequential& model) {
  return mixprec::optim::AdamW(model->parameters(),
                               mixprec::optim::AdamOptions(3e-3).master_weights("remainder").weight_decay(0.01));
}

mixprec::GradScaler make_scaler() {
  return mixprec::GradScaler(torch::kCPU, mixprec::GradScalerOptions().init_scale(1024).growth_interval(3).hysteresis(2));
}

void train(torch::nn::Sequential& model, mixprec::optim::AdamW& opt, mixprec::GradScaler& scaler, int from, int to) {
  for (int step = from; step < to; ++step) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + step);
    auto x = torch::randn({8, 16}, gen), y = torch::randn({8, 1}, gen);
    opt.zero_grad();
    scaler.scale(torch::mse_loss(model->forward(x.to(torch::kBFloat16)).to(torch::kFloat), y)).backward();
    if (step % 5 == 4) {
      model[0]->as<torch::nn::Linear>()->weight.mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
    }
    scaler.step(opt);
    scaler.update();
  }
}

void save_all(const std::string& path, torch::nn::Sequential& model, mixprec::optim::AdamW& opt,
              mixprec::GradScaler& scaler) {
  torch::serialize::OutputArchive archive, model_archive, opt_archive, scaler_archive;
  model->save(model_archive);
  opt.save(opt_archive);
  scaler.save(scaler_archive);
  archive.write("model", model_archive);
  archive.write("optimizer", opt_archive);
  archive.write("scaler", scaler_archive);
  archive.save_to(path);
}

void load_all(const std::string& path, torch::nn::Sequential& model, mixprec::optim::AdamW& opt,
              mixprec::GradScaler& scaler) {
  torch::serialize::InputArchive archive, model_archive, opt_archive, scaler_archive;
  archive.load_from(path);
  archive.read("model", model_archive);
  archive.read("optimizer", opt_archive);
  archive.read("scaler", scaler_archive);
  model->load(model_archive);
  opt.load(opt_archive);
  scaler.load(scaler_archive);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  auto model = make_model();
  auto opt = make_optimizer(model);
  auto scaler = make_scaler();
  if (mode == "straight" && argc == 3) {
    train(model, opt, scaler, 0, kSteps);
    save_all(argv[2], model, opt, scaler);
  } else if (mode == "first" && argc == 4) {
    train(model, opt, scaler, 0, std::stoi(argv[3]));
    save_all(argv[2], model, opt, scaler);
  } else if (mode == "second" && argc == 5) {
    load_all(argv[2], model, opt, scaler);
    train(model, opt, scaler, std::stoi(argv[3]), kSteps);
    save_all(argv[4], model, opt, scaler);
  } else if (mode == "compare" && argc == 4) {
    auto other = make_model();
    auto other_opt = make_optimizer(other);
    auto other_scaler = make_scaler();
    load_all(argv[2], model, opt, scaler);
    load_all(argv[3], other, other_opt, other_scaler);
    bool same = true;
    const auto sa = scaler.state_dict(), sb = other_scaler.state_dict();
    for (const auto& item : sa) same = same && sb.contains(item.key()) && sb.at(item.key()) == item.value();
    auto a = model->parameters(), b = other->parameters();
    for (size_t i = 0; i < a.size(); ++i) same = same && torch::equal(a[i].view(torch::kShort), b[i].view(torch::kShort));
    // The FP8 scaling state: histories, scales and their inverses, and the turn.
    const auto buffers_a = model->named_buffers(), buffers_b = other->named_buffers();
    same = same && buffers_a.size() == 7 && buffers_b.size() == 7;
    for (const auto& item : buffers_a) same = same && torch::equal(item.value(), buffers_b[item.key()]);
    for (size_t i = 0; i < a.size(); ++i) {
      auto& sa = static_cast<mixprec::optim::AdamParamState&>(*opt.state().at(a[i].unsafeGetTensorImpl()));
      auto& sb = static_cast<mixprec::optim::AdamParamState&>(*other_opt.state().at(b[i].unsafeGetTensorImpl()));
      same = same && torch::equal(sa.remainder(), sb.remainder()) && torch::equal(sa.exp_avg(), sb.exp_avg()) &&
             torch::equal(sa.exp_avg_sq(), sb.exp_avg_sq()) && torch::equal(sa.step(), sb.step());
    }
    std::printf("resumed run %s the uninterrupted one\n", same ? "is bitwise identical to" : "DIFFERS from");
    return same ? 0 : 1;
  } else {
    std::fprintf(stderr, "usage: mixprec_resume straight OUT | first CKPT K | second CKPT K OUT | compare A B\n");
    return 2;
  }
  return 0;
}
