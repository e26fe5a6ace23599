"""mixprec.qat: quantization-aware training under autocast with GradScaler and the master-weight optimizer.

A small CNN (conv + BatchNorm + ReLU + linear) on scikit-learn's digits (real data, shipped with the
package) trained with QAT under fp16 and bf16 autocast: its INT8-converted accuracy within 1 point of the
fp32 model. Converted layers hold integer codes and scales and reproduce what training simulated; INT4
groups, learnable steps, and bad configurations."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mixprec
from mixprec import qat
from conftest import rename_legacy_keys


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1257], perm[1257:]
    return x[train], y[train], x[test], y[test]


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, dtype: torch.dtype | None, epochs: int = 6) -> None:
    x, y, _, _ = digits()
    opt = mixprec.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scaler = mixprec.GradScaler("cpu", enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(x[batch]).float(), y[batch])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def accuracy(model: nn.Module) -> float:
    _, _, x, y = digits()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@functools.cache
def fp32_accuracy() -> float:
    torch.manual_seed(0)
    model = make_cnn()
    train(model, None)
    return accuracy(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qat_cnn_on_digits_within_one_point_of_fp32(dtype: torch.dtype) -> None:
    baseline = fp32_accuracy()
    assert baseline > 0.95
    torch.manual_seed(0)
    model = qat.prepare(make_cnn())
    assert isinstance(model[0], qat.QATConv2d) and isinstance(model[8], qat.QATLinear)
    train(model, dtype)
    qat.convert(model)
    assert isinstance(model[0], qat.QuantizedConv2d) and isinstance(model[10], qat.QuantizedLinear)
    state = model.state_dict()
    assert state["8.weight_codes"].dtype == torch.int8 and state["8.weight_scale"].dtype == torch.float32
    assert "8.weight" not in state and "0.weight" not in state
    acc = accuracy(model)
    assert acc >= baseline - 0.01, (acc, baseline)


def test_qat_cnn_with_batchnorm_folded_on_digits() -> None:
    """fold_batchnorm: the digits CNN trains with each conv quantizing its folded weight; convert leaves no
    BatchNorm, and the integer model is within 1 point of fp32."""
    baseline = fp32_accuracy()
    torch.manual_seed(0)
    model = qat.prepare(make_cnn(), qat.QATConfig(fold_batchnorm=True))
    assert isinstance(model[0].bn, nn.BatchNorm2d) and isinstance(model[1], nn.Identity)
    train(model, torch.bfloat16)
    qat.convert(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert "0.bn.weight" not in model.state_dict() and model.state_dict()["3.weight_codes"].dtype == torch.int8
    acc = accuracy(model)
    assert acc >= baseline - 0.01, (acc, baseline)


def test_batchnorm_folding_arithmetic() -> None:
    """The folded QAT conv against an independent computation: W * gamma / sqrt(running_var + eps) quantized per
    output channel, the convolution divided back by that factor, then the BatchNorm with batch statistics; in
    eval the converted layer holds exactly those codes and the folded bias, and computes what the pair did."""
    torch.manual_seed(11)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 3.0)
    params = {id(p) for p in list(conv.parameters()) + list(bn.parameters())}
    model = qat.prepare(nn.Sequential(conv, bn, nn.ReLU()), qat.QATConfig(fold_batchnorm=True))
    layer = model[0]
    assert layer.bn is bn and isinstance(model[1], nn.Identity)
    assert {id(p) for p in model.parameters()} == params  # the same tensors, so an optimizer built before stays valid
    assert [k for k in model.state_dict() if k.startswith("0.bn.")][:2] == ["0.bn.weight", "0.bn.bias"]
    x = torch.randn(4, 3, 6, 6)

    def folded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
        w = conv.weight.detach() * f.reshape(-1, 1, 1, 1)
        step = (w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127).clamp_min(torch.finfo().tiny)
        return (w * step.reciprocal()).round().clamp(-127, 127) * step, f, step

    wq, f, _ = folded()
    xq = qat._fake_quantize_input(x, False)
    pre = nn.functional.conv2d(xq, wq, padding=1) / f.reshape(1, -1, 1, 1) + conv.bias.detach().reshape(1, -1, 1, 1)
    mean, var = pre.mean(dim=(0, 2, 3)), pre.var(dim=(0, 2, 3), unbiased=False)
    want = (pre - mean.reshape(1, -1, 1, 1)) / (var.reshape(1, -1, 1, 1) + bn.eps).sqrt()
    want = want * bn.weight.detach().reshape(1, -1, 1, 1) + bn.bias.detach().reshape(1, -1, 1, 1)
    running_mean = bn.running_mean.clone()
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(bn.running_mean, running_mean)  # training updated the running statistics
    got.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    # Eval: the converted layer holds the codes of the folded weight and computes what the pair does.
    model.eval()
    wq, f, step = folded()
    with torch.no_grad():
        simulated = model(x)
        trained = layer._fake_weight_of(qat._fold(layer, bn)[0])
    qat.convert(model)
    q = model[0]
    assert isinstance(q, qat.QuantizedConv2d) and isinstance(model[1], nn.Identity)
    assert torch.equal(q.dequantized_weight(torch.float32), trained)  # the codes training simulated, exactly
    torch.testing.assert_close(q.dequantized_weight(torch.float32), wq, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.weight_scale, step.reshape(5, 1), rtol=1e-6, atol=0)
    bias = (conv.bias.detach() - bn.running_mean) * f + bn.bias.detach()
    torch.testing.assert_close(q.bias, bias, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), simulated, rtol=1e-4, atol=1e-5)


def test_a_quantized_layers_bias_is_its_own_copy() -> None:
    """The quantized model is a snapshot: training the QAT layer's bias on (an optimizer still holding it, a
    second fine-tuning run) changes neither the quantized layer's bias nor its output."""
    torch.manual_seed(3)
    model = qat.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), qat.QATConfig())
    x = torch.randn(5, 8)
    model(x)
    old = [m for m in model if isinstance(m, qat.QATLinear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    qat.convert(model)
    quantized = [m for m in model if isinstance(m, qat.QuantizedLinear)]
    assert len(quantized) == len(old) == 2
    for q, o in zip(quantized, old):
        assert torch.equal(q.bias, o.bias) and q.bias.data_ptr() != o.bias.data_ptr()
    before = model(x)
    for o in old:
        o.bias.grad = torch.ones_like(o.bias)
    opt.step()
    assert torch.equal(model(x), before)


def test_convert_keeps_the_layers_forward_hooks() -> None:
    """Forward hooks and pre-hooks on a QAT layer (kwargs ones too) carry over to its quantized layer, as
    torch.ao's convert keeps them: a feature extractor registered during training still sees the outputs."""
    torch.manual_seed(2)
    model = qat.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), qat.QATConfig())
    seen: list[str] = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(f"pre {type(m).__name__}"))
    model[0].register_forward_hook(lambda m, args, kwargs, out: seen.append(f"post {tuple(out.shape)}"),
                                   with_kwargs=True)
    model(torch.randn(2, 8))
    qat.convert(model)
    assert type(model[0]).__name__ == "QuantizedLinear"
    seen.clear()
    model(torch.randn(2, 8))
    assert seen == ["pre QuantizedLinear", "post (2, 8)"]


def test_convert_drops_the_hooks_that_compute_the_weight_and_prepare_names_parametrized_layers() -> None:
    """spectral_norm and pruning compute the weight in a forward pre-hook: QAT trains on what they compute and
    the codes hold it, so convert leaves those hooks behind (copied, they failed on tensors the quantized
    layer does not have) and keeps the user's. A parametrized layer (weight_norm's parametrization) is not
    prepared, and prepare says so instead of leaving it in float silently."""
    torch.manual_seed(4)
    model = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 4))
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
    qat.prepare(model, qat.QATConfig())
    seen: list[str] = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    x = torch.randn(3, 8)
    model(x)
    qat.convert(model)
    seen.clear()
    out = model(x)
    assert out.isfinite().all() and seen == ["QuantizedLinear"]
    assert len(model[0]._forward_pre_hooks) == len(model[2]._forward_pre_hooks) == 0

    parametrized = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="layer '0' is parametrized .* and stays in float"):
        qat.prepare(parametrized, qat.QATConfig())
    assert type(parametrized[1]).__name__ == "QATLinear"


def test_a_loaded_input_step_runs_under_fullgraph_compile_at_once() -> None:
    """A learnable input step loaded set (a resume) needs no eager check first: the model compiles with
    fullgraph=True at once (the check's host read was a graph break Dynamo refused)."""
    config = qat.QATConfig(learnable_activation_scales=True)
    torch.manual_seed(5)
    trained = qat.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), config)
    x = torch.randn(4, 8)
    trained(x)
    resumed = qat.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), config)
    resumed.load_state_dict(trained.state_dict())
    compiled = torch.compile(resumed, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), trained(x))
    fresh = qat.prepare(nn.Sequential(nn.Linear(8, 8)), config)
    fresh.load_state_dict(qat.prepare(nn.Sequential(nn.Linear(8, 8)), config).state_dict())  # steps still 0
    assert fresh[0]._input_step_checked is False  # set by its first forward, as before


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_cold_input_step_trains_under_fullgraph_compile_as_eager(backend: str) -> None:
    """A fresh model with learnable activation scales compiles with fullgraph=True at once: inside the graph
    the step starts without a host read (qat_seed_input_step_), at the value the eager start gives, leaves an
    all-zero batch unset as eager does, and training matches the eager twin bit for bit."""
    config = qat.QATConfig(learnable_activation_scales=True)
    torch.manual_seed(5)
    eager = qat.prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), config)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, model)]
    batches = [torch.zeros(4, 8)] + [torch.randn(4, 8) * (k + 1) for k in range(3)]
    for k, x in enumerate(batches):
        outs = []
        for run, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            out = run(x)
            out.pow(2).mean().backward()
            opt.step()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])
        if k == 0:  # an all-zero batch says nothing about the range: both steps stay unset
            assert eager[0].input_step.item() == model[0].input_step.item() == 0.0
        for a, b in zip(eager.parameters(), model.parameters()):
            assert torch.equal(a, b)
    assert model[0].input_step.item() != 0.0


def test_seed_input_step_sets_only_an_unset_step() -> None:
    x = torch.randn(6, 8) * 3
    eager = torch.zeros(1)
    assert torch.ops.mixprec.qat_init_input_step_(eager, x)
    seeded = torch.zeros(1)
    torch.ops.mixprec.qat_seed_input_step_(seeded, x)
    assert torch.equal(seeded, eager) and seeded.item() > 0
    torch.ops.mixprec.qat_seed_input_step_(seeded, x * 100)  # set already: kept
    assert torch.equal(seeded, eager)
    for unset in (torch.zeros(3, 3), torch.full((2,), float("nan")), torch.empty(0, 4)):
        step = torch.zeros(1)
        torch.ops.mixprec.qat_seed_input_step_(step, unset)
        assert step.item() == 0.0
    torch.library.opcheck(torch.ops.mixprec.qat_seed_input_step_.default, (torch.zeros(1), x))
    with pytest.raises(ValueError, match="step must be a floating tensor of one value"):
        torch.ops.mixprec.qat_seed_input_step_(torch.zeros(2), x)


def test_converted_weights_are_what_training_simulated() -> None:
    torch.manual_seed(2)
    for config in (qat.QATConfig(), qat.QATConfig(weight_bits=4, group_size=8),
                   qat.QATConfig(weight_bits=4, learnable_scales=True)):
        layer = qat.prepare(nn.Linear(32, 12), config)
        lo, hi = config.qrange
        g = config.group_size or 32
        if config.learnable_scales:
            step = layer.weight_step.detach()
        else:
            step = (layer.weight.detach().abs().reshape(12, -1, g).amax(-1) / hi).clamp_min(torch.finfo().tiny)
        step = step.repeat_interleave(32 // step.shape[1], dim=1)
        # The rule, independently: codes = clamp(round(w * (1 / step))), dequantized as codes * step.
        codes = (layer.weight.detach() * step.reciprocal()).round().clamp(lo, hi)
        simulated = layer._fake_weight().detach()
        assert torch.equal(simulated, codes * step)
        q = qat.convert(layer)
        assert isinstance(q, qat.QuantizedLinear)
        assert torch.equal(q.dequantized_weight(torch.float32), simulated)
        if config.weight_bits == 8:
            assert torch.equal(q.weight_codes, codes.to(torch.int8))
        else:
            assert q.weight_codes.dtype == torch.uint8 and q.weight_codes.shape == (12, 16)  # two codes a byte
        # The converted layer quantizes activations with the same codes; only the GEMM's sums differ (exact
        # int32 there, fp32 here).
        x = torch.randn(6, 32)
        expected = nn.functional.linear(qat._fake_quantize_input(x, True), simulated, q.bias)
        assert torch.allclose(q(x), expected, rtol=1e-5, atol=1e-5)


def test_int4_packing_layout() -> None:
    layer = qat.prepare(nn.Linear(2, 1, bias=False), qat.QATConfig(weight_bits=4, learnable_scales=True))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-8.0, 7.0]]))
        layer.weight_step.fill_(1.0)
    q = qat.convert(layer)
    assert q.weight_codes.tolist() == [[0x78]]  # element 0 (-8 = 0x8) in the low nibble, element 1 in the high
    assert q.dequantized_weight(torch.float32).tolist() == [[-8.0, 7.0]]


def test_learnable_steps_train_and_qat_composes_with_policy() -> None:
    torch.manual_seed(3)
    layer = qat.prepare(nn.Linear(16, 8), qat.QATConfig(learnable_scales=True))
    assert layer.weight_step.shape == (8, 1)
    before = layer.weight_step.detach().clone()
    opt = mixprec.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    assert layer.weight_step.grad is not None and not torch.equal(layer.weight_step.detach(), before)
    model = qat.prepare(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    mixprec.Policy("bf16-true").apply(model)
    out = model(torch.randn(3, 16).bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv", "folded"])
def test_a_plain_checkpoint_loaded_after_prepare_restarts_the_learnable_steps(kind: str) -> None:
    """Pretrained weights loaded after prepare (a checkpoint of the plain model): the learnable steps are what
    preparing the loaded model gives (weight steps from its weights, the input step unset until the next
    forward), in the same tensors, so an optimizer built before the load trains them; strict loading accepts
    the checkpoint, as a plain model's does. A checkpoint with part of the steps still reports the rest."""
    config = qat.QATConfig(learnable_scales=True, learnable_activation_scales=True, fold_batchnorm=kind == "folded")

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        model[1].running_var.uniform_(0.5, 2.0)  # a folded weight differs from the raw one
        return model

    pretrained = build(1).state_dict()
    expected = qat.prepare(build(1), config)
    if kind == "folded":  # its BatchNorm moved under the conv: the plain checkpoint names it there
        pretrained = {k.replace("1.", "0.bn.", 1) if k.startswith("1.") else k: v for k, v in pretrained.items()}
    model = qat.prepare(build(2), config)
    steps = [(name, p) for name, p in model.named_parameters() if name.endswith("_step")]
    x = torch.randn(4, 16) if kind == "linear" else torch.randn(2, 3, 5, 5)
    model(x)  # the input steps are set by this batch
    assert all(p.detach().abs().sum() > 0 for _, p in steps)
    result = model.load_state_dict(pretrained)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    want = dict(expected.named_parameters())
    for name, p in steps:
        assert p is dict(model.named_parameters())[name]  # the same tensors
        assert torch.equal(p.detach(), want[name].detach()), name
    assert all(p.item() == 0.0 for name, p in steps if name.endswith("input_step"))
    y = x * 3
    assert torch.equal(model(y), expected(y))  # the input steps are set afresh by the next batch, as expected's
    # A checkpoint that holds one of a layer's steps is a QAT checkpoint: the other is reported missing.
    partial = {k: v for k, v in expected.state_dict().items() if not k.endswith("input_step")}
    with pytest.raises(RuntimeError, match="Missing key.*input_step"):
        model.load_state_dict(partial)


def _fake_reference(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """INT8 fake quantization with one step, computed independently in float64."""
    s = step.double()
    return ((x.double() * (1 / s)).round().clamp(-127, 127) * s).to(x.dtype)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_the_forward_that_sets_the_input_step_runs_under_activation_checkpointing(use_reentrant: bool) -> None:
    """The first forward of a learnable input step sets it; it saved two more tensors for the backward than
    the recomputation (the step check's arithmetic was recorded), and torch's non-reentrant checkpoint
    refused the first backward. Checkpointed or not, the gradients are the same bits."""
    from torch.utils.checkpoint import checkpoint

    results = []
    for checkpointed in (False, True):
        torch.manual_seed(8)
        layer = qat.prepare(nn.Linear(32, 16), qat.QATConfig(learnable_activation_scales=True))
        x = (torch.randn(8, 32) * 3).requires_grad_()
        out = checkpoint(layer, x, use_reentrant=use_reentrant) if checkpointed else layer(x)
        out.pow(2).sum().backward()
        results.append([x.grad, layer.weight.grad, layer.input_step.grad, layer.input_step.detach()])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_learnable_activation_steps(kind: str) -> None:
    """learnable_activation_scales: the input step starts unset (0), the first forward sets it to the batch's
    amax / 127, training moves it with LSQ's gradient (checked against a float64 computation), a loaded
    state is not set again, and convert keeps it as the static input_scale the converted layer quantizes
    with."""
    torch.manual_seed(7)
    config = qat.QATConfig(learnable_activation_scales=True)
    base = nn.Linear(32, 12) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1)
    state0 = {k: v.clone() for k, v in base.state_dict().items()}
    layer = qat.prepare(base, config)
    assert layer.input_step.shape == (1,) and layer.input_step.item() == 0.0
    x = torch.randn(8, 32) * 3 if kind == "linear" else torch.randn(4, 3, 5, 5) * 3
    out = layer(x)
    step = layer.input_step.detach().clone()
    assert step.item() == (x.abs().max() / 127).item()
    w = layer._fake_weight().detach()
    fx = _fake_reference(x, step)
    ref = nn.functional.linear(fx, w, layer.bias) if kind == "linear" else layer._conv_forward(fx, w, layer.bias)
    assert torch.equal(out, ref)
    # LSQ: d fq / d s = round(x / s) - x / s where round(x / s) is in the range, the bound outside; scaled by
    # 1 / sqrt(N * 127). x's gradient passes where the code is in the range. Checked on the batch that set the
    # step (every element inside) and on one five times larger (many outside).
    for xs in (x, x * 5):
        layer.zero_grad()
        g = torch.randn_like(out)
        x_in = xs.clone().requires_grad_()
        (layer(x_in) * g).sum().backward()
        fx_d = _fake_reference(xs, step).double().requires_grad_()
        ref_d = (nn.functional.linear(fx_d, w.double(), layer.bias.double()) if kind == "linear" else
                 nn.functional.conv2d(fx_d, w.double(), layer.bias.double(), padding=1))
        (dfx,) = torch.autograd.grad((ref_d * g.double()).sum(), fx_d)
        v = xs.double() / step.double()
        inside = v.round().abs() <= 127
        term = torch.where(inside, v.round() - v, v.sign() * 127)
        want = (dfx * term).sum() / (xs.numel() * 127) ** 0.5
        torch.testing.assert_close(layer.input_step.grad.double(), want.reshape(1), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(x_in.grad, (dfx * inside).float(), rtol=1e-5, atol=1e-6)
    assert not inside.all()  # the larger batch crossed the range
    # Training moves it; a later batch does not set it again.
    opt = mixprec.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(x * 5).pow(2).mean().backward()
        opt.step()
    learned = layer.input_step.detach().clone()
    assert learned.item() != step.item() and learned.item() != (x * 5).abs().max().item() / 127
    # A fresh layer that loads the state keeps the loaded step at its first forward.
    fresh = nn.Linear(32, 12) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1)
    fresh.load_state_dict(state0)
    fresh = qat.prepare(fresh, config)
    fresh.load_state_dict(layer.state_dict())
    fresh(x * 100)
    assert torch.equal(fresh.input_step.detach(), learned)
    # convert: the static scale, and the same codes as training simulated.
    layer.eval()
    with torch.no_grad():
        simulated = layer(x)
    q = qat.convert(layer)
    assert torch.equal(q.input_scale, learned.abs()) and "input_scale" in q.state_dict()
    x_in = x.clone().requires_grad_()
    converted = q(x_in)
    torch.testing.assert_close(converted, simulated, rtol=1e-5, atol=1e-5)
    if kind == "conv":  # the dequantized path passes the input's gradient straight through, as training did
        converted.sum().backward()
        assert x_in.grad is not None
    # Casting the converted layer keeps its scales float32 (their values exact).
    q.half()
    assert q.input_scale.dtype == q.weight_scale.dtype == torch.float32 and torch.equal(q.input_scale, learned.abs())
    # An empty or all-zero first batch leaves the step unset; the next batch sets it. A state loaded into a
    # layer that has run is read again: a loaded 0 is set by the next batch.
    late = qat.prepare(nn.Linear(4, 3), config)
    late(torch.empty(0, 4))
    late(torch.zeros(2, 4))
    assert late.input_step.item() == 0.0
    late(torch.full((2, 4), 127.0))
    assert late.input_step.item() == 1.0
    late.load_state_dict({**late.state_dict(), "input_step": torch.zeros(1)})
    late(torch.full((2, 4), 254.0))
    assert late.input_step.item() == 2.0
    # A bf16 model (its step kept float32) still sets and uses its step.
    half = qat.prepare(nn.Linear(4, 3), config).bfloat16()
    half(torch.full((2, 4), 127.0, dtype=torch.bfloat16))
    assert half.input_step.dtype == torch.float32 and half.input_step.item() == 1.0
    # Never run: the step converts to 0 (as torch.ao's convert works without calibration), and the converted
    # layer refuses to run with it until a converted checkpoint is loaded: the rebuild prepare -> convert -> load.
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), config)
    model(torch.randn(2, 4))
    model[2].input_step.data.zero_()  # as if the second layer had never run
    unset = qat.convert(copy.deepcopy(model))
    with pytest.raises(ValueError, match="QuantizedLinear: input_scale is 0: the QAT layer's input_step was never "
                                         "set before convert"):
        unset(torch.randn(2, 4))
    # Compiled or exported too: the layer knows it from when the scale was made (a compiled graph computed the
    # bias alone: codes times a 0 step).
    with pytest.raises(ValueError, match="input_scale is 0"):
        torch.compile(qat.convert(copy.deepcopy(model)), backend="eager")(torch.randn(2, 4))
    with pytest.raises(ValueError, match="input_scale is 0"):
        torch.export.export(qat.convert(copy.deepcopy(model)), (torch.randn(2, 4),))
    trained = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), config)
    trained(torch.randn(2, 4))  # sets both steps
    trained = qat.convert(trained)
    x = torch.randn(3, 4)
    for device in ("cpu", "meta"):  # rebuilt eagerly, or on the meta device and loaded with assign=True
        with torch.device(device):
            rebuilt = qat.convert(qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), config))
        rebuilt.load_state_dict(trained.state_dict(), assign=device == "meta")
        assert torch.equal(rebuilt(x), trained(x))
        assert torch.equal(torch.compile(rebuilt, backend="eager")(x), trained(x))
    # A checkpoint with a 0 scale loaded into a compiled model that ran: refused at its next (recompiled) call.
    compiled = torch.compile(rebuilt, backend="eager")
    compiled(x)
    rebuilt.load_state_dict(unset.state_dict())
    with pytest.raises(ValueError, match="input_scale is 0"):
        compiled(x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_refused_first_batch_leaves_the_input_step_unset(kind: str) -> None:
    """The first forward sets the learnable input step from its batch before the GEMM or convolution can refuse
    that batch; a refused batch (token ids, the wrong feature count, NHWC for a Conv2d) leaves the step as it
    was, so the next good batch sets it as in a twin that never saw the bad one."""
    config = qat.QATConfig(learnable_activation_scales=True)

    def make() -> nn.Module:
        torch.manual_seed(3)
        return qat.prepare(nn.Linear(32, 12) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1), config)

    layer, twin = make(), make()
    good = torch.randn(8, 32) * 3 if kind == "linear" else torch.randn(4, 3, 5, 5) * 3
    bad = [torch.randint(0, 1000, good.shape), torch.randn(8, 31) if kind == "linear" else good.permute(0, 2, 3, 1)]
    for x in bad:
        with pytest.raises((RuntimeError, TypeError)):
            layer(x)
        assert layer.input_step.item() == 0.0 and not layer._input_step_checked
    assert torch.equal(layer(good), twin(good))
    assert torch.equal(layer.input_step, twin.input_step) and layer.input_step.item() > 0


def test_torch_compile_with_dynamic_batch_sizes() -> None:
    torch.manual_seed(5)
    layer = qat.prepare(nn.Linear(32, 16), qat.QATConfig(weight_bits=4, group_size=8, learnable_scales=True))
    compiled = torch.compile(layer, dynamic=True)
    for tokens in (6, 10):
        x = torch.randn(tokens, 32, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        assert torch.equal(y, layer(x))
    assert layer.weight_step.grad is not None


def test_torch_compile_with_learnable_activation_steps() -> None:
    """The step's start reads values back, so it runs eagerly inside a compiled model (its first forwards);
    after that the compiled layer matches eager."""
    torch.manual_seed(6)
    layer = qat.prepare(nn.Linear(16, 8), qat.QATConfig(learnable_activation_scales=True))
    compiled = torch.compile(layer)
    for scale in (2.0, 3.0):
        x = torch.randn(5, 16) * scale
        y = compiled(x)
        assert torch.equal(y, layer(x))
    assert layer.input_step.item() > 0


def test_activation_codes_are_int8_quantize_codes() -> None:
    """QAT's per-token activation quantization and mixprec.int8.quantize (the converted model's) agree."""
    torch.manual_seed(6)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.randn(64, 96, device=device) * torch.logspace(-3, 3, 96, device=device)
        q = mixprec.int8.quantize(x, (1, -1))
        assert torch.equal(qat._fake_quantize_input(x, True), q.data.float() * q.scale_inv)


@pytest.mark.parametrize("learnable_activation_scales", [False, True])
def test_a_converted_int8_layer_passes_the_input_gradient_straight_through(learnable_activation_scales: bool) -> None:
    """Layers trained around a converted INT8 Linear (an adapter, a head, the layers below it) need its input
    gradient. The INT8 GEMM has no backward: before, x.grad stayed None (per-token scales) or backward failed
    (a learned input scale). Now the input gradient is the prepared model's straight-through one, exactly."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    config = qat.QATConfig(learnable_activation_scales=learnable_activation_scales)
    prepared = qat.prepare(model, config, filter=lambda name, m: name == "2")
    prepared(torch.randn(8, 16) * 2)  # sets a learned input step from its first batch
    prepared.eval()
    converted = qat.convert(copy.deepcopy(prepared))
    x = torch.randn(8, 16)
    grads = []
    for m in (prepared, converted):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        grads.append(m[0].weight.grad)
    assert grads[1] is not None and torch.equal(grads[1], grads[0])
    with torch.no_grad():  # inference still runs the INT8 GEMM, with the same codes
        torch.testing.assert_close(converted(x), prepared(x), rtol=1e-5, atol=1e-5)


def test_a_policy_applied_after_prepare_or_convert_keeps_steps_and_scales_fp32() -> None:
    """Policy.apply sets parameters' data directly (not through Module._apply): it cast the learnable steps
    and the converted scales to 16 bits (0.4% off per channel: the output no longer what the codes encode)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    prepared = qat.prepare(model, qat.QATConfig(learnable_scales=True, learnable_activation_scales=True),
                           filter=lambda name, m: True)
    prepared(torch.randn(4, 16))
    mixprec.Policy("bf16-true").apply(prepared)
    assert prepared[0].weight.dtype == torch.bfloat16
    assert prepared[0].weight_step.dtype == torch.float32 and prepared[0].input_step.dtype == torch.float32
    converted = qat.convert(prepared)
    mixprec.Policy("bf16-true").apply(converted)
    assert converted[0].weight_scale.dtype == torch.float32 and converted[0].input_scale.dtype == torch.float32


def test_preparing_again_with_another_config_is_refused_and_converting_nothing_warns() -> None:
    """prepare() on a prepared model with another config kept the old one silently (4 bits asked, 8 kept);
    convert() of a model with nothing prepared returned it unchanged without a word."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qat.prepare(model)
    qat.prepare(model)  # the same config again: nothing changes
    with pytest.raises(ValueError, match="layer '0' is prepared already with"):
        qat.prepare(model, qat.QATConfig(weight_bits=4))
    assert model[0].qat_config == qat.QATConfig()
    with pytest.warns(UserWarning, match="no QAT layer to convert"):
        qat.convert(nn.Sequential(nn.Linear(4, 4)))


def test_a_layer_used_twice_converts_to_one_quantized_layer() -> None:
    """A module in two places (a shared block, an nn.Sequential that lists it twice) is one QAT layer and becomes
    one quantized layer in every place, computing what the QAT layer did."""
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = qat.prepare(nn.Sequential(shared, nn.ReLU(), shared))
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
    qat.convert(model)
    assert type(model[0]).__name__ == "QuantizedLinear" and model[0] is model[2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_layers_convert_made_take_qat_and_8_bit_ones_are_refused_by_name() -> None:
    """Layers mixprec.nn.convert made mixprec.nn.Linear are torch.nn.Linear's and take QAT; FP8 and INT8 layers
    quantize their GEMMs already: prepare names them and changes nothing."""
    torch.manual_seed(0)
    model = mixprec.nn.convert(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    qat.prepare(model)
    assert [type(m).__name__ for m in model] == ["QATLinear", "ReLU", "QATLinear"]
    model(torch.randn(4, 16)).sum().backward()
    assert model[0].weight.grad is not None
    eight_bit = mixprec.nn.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), int8=True,
                                   filter=lambda name, m: name == "1")
    with pytest.raises(ValueError, match=r"'1' \(Int8Linear\) already runs"):
        qat.prepare(eight_bit)
    assert [type(m).__name__ for m in eight_bit] == ["Linear", "Int8Linear"]
    qat.prepare(eight_bit, filter=lambda name, m: name != "1")
    assert [type(m).__name__ for m in eight_bit] == ["QATLinear", "Int8Linear"]


def test_learnable_steps_stay_float32_through_dtype_casts() -> None:
    """.bfloat16() / .half() / .to(dtype) cast the weights, not the learnable steps (nor, after convert, the
    scales): the same float32 tensors' values, on the new device."""
    torch.manual_seed(0)
    config = qat.QATConfig(learnable_scales=True, learnable_activation_scales=True)
    model = qat.prepare(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv2d(1, 4, 3)), config)
    model[0](torch.randn(4, 16))  # the input step starts from the first batch
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_step")}
    assert set(before) == {"0.weight_step", "0.input_step", "2.weight_step", "2.input_step"}
    model.bfloat16()
    for name, p in model.named_parameters():
        if name in before:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), before[name]), name
        else:
            assert p.dtype == torch.bfloat16, name
    assert model[0](torch.randn(4, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # Gradients the steps already have keep their dtype too.
    model[0](torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    model.float().half()
    assert model[0].weight_step.grad.dtype == torch.float32 and model[0].weight.grad.dtype == torch.float16


def test_a_layer_convert_made_takes_torchs_gradient_dtype_under_qat() -> None:
    """mixprec.nn.convert gave the 16-bit weight an fp32 gradient; its QAT layer forms the fake-quantized weight's
    gradient in the weight's dtype, as torch.nn.Linear's (DDP buckets need it), also after a state-dict load."""
    model = mixprec.nn.convert(nn.Sequential(nn.Linear(16, 16))).bfloat16()
    model(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    qat.prepare(model)
    assert model[0].weight.grad.dtype == torch.bfloat16  # converted, not dropped
    model.load_state_dict(model.state_dict())
    model.zero_grad()
    model(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert model[0].weight.grad.dtype == torch.bfloat16
    # Through casts too, as torch.nn.Linear's (the C++ layers' rule): the weight's dtype, not the one pinned at
    # prepare; a layer convert made in fp32 and cast to 16 bits after prepare as well.
    model.float()
    model.zero_grad()
    model(torch.randn(4, 16)).sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    fp32_first = qat.prepare(mixprec.nn.convert(nn.Sequential(nn.Linear(16, 16)))).half()
    fp32_first(torch.randn(4, 16, dtype=torch.float16)).float().sum().backward()
    assert fp32_first[0].weight.grad.dtype == torch.float16
    # And through a policy's casts (Policy.apply sets the data, which keeps a pinned gradient dtype).
    for policy, dtype in (("mixed_bfloat16", torch.float32), ("bf16-true", torch.bfloat16)):
        model = qat.prepare(mixprec.nn.convert(nn.Sequential(nn.Linear(8, 8))).bfloat16())
        mixprec.Policy(policy).apply(model)
        assert model[0].weight.dtype == dtype
        model(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
        assert model[0].weight.grad.dtype == dtype, policy


def test_bad_config_changes_nothing() -> None:
    with pytest.raises(ValueError, match="weight_bits must be 8 or 4"):
        qat.QATConfig(weight_bits=2)
    with pytest.raises(ValueError, match="learnable_activation_scales needs activations"):
        qat.QATConfig(activations=False, learnable_activation_scales=True)
    with pytest.raises(ValueError, match="group_size must be a positive number of input features or none, got 0"):
        qat.QATConfig(group_size=0)
    with pytest.raises(ValueError, match="weight_bits must be an int, got None"):
        qat.QATConfig(weight_bits=None)
    with pytest.raises(ValueError, match="weight_bits must be an int"):
        qat.QATConfig(weight_bits=8.5)
    with pytest.raises(ValueError, match="group_size 5 must divide in_features 16"):
        qat.prepare(nn.Linear(16, 4), qat.QATConfig(group_size=5))
    with pytest.raises(ValueError, match="group_size applies to Linear layers only"):
        qat.prepare(nn.Conv2d(3, 4, 3), qat.QATConfig(group_size=3))
    with pytest.raises(ValueError, match="folding needs a BatchNorm2d with running statistics"):
        qat.prepare(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)),
                    qat.QATConfig(fold_batchnorm=True))
    zero_gamma = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    nn.init.zeros_(zero_gamma[1].weight)
    with pytest.raises(ValueError, match="folding divides by the BatchNorm's weight"):
        qat.prepare(zero_gamma, qat.QATConfig(fold_batchnorm=True))
    assert type(zero_gamma[0]) is nn.Conv2d and isinstance(zero_gamma[1], nn.BatchNorm2d)
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 4), nn.Conv2d(1, 1, 3, padding="same"))
    with pytest.raises(ValueError, match="Conv2d needs zero padding given as sizes"):
        qat.prepare(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, nn.Conv2d]  # nothing was swapped
    with pytest.raises(ValueError, match="Conv2d needs zero padding given as sizes"):
        qat.prepare(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    # The checks are C++'s (mixprec::qat::check_conv2d, the QATConv2d constructor's), reached through one op;
    # the gamma check reads values (prepare runs eagerly), so opcheck's traced variants run without gamma.
    torch.library.opcheck(torch.ops.mixprec.qat_check_conv2d.default, (4, True, True, None, 4, True, None))
    with pytest.raises(ValueError, match="over the convolution's 4 output channels, got 3 features"):
        torch.ops.mixprec.qat_check_conv2d(4, True, True, None, 3, True, None)


def test_opcheck() -> None:
    """The qat_* ops (C++'s mixprec::qat functions, above autograd) under opcheck; as for the other ops above
    autograd, the schema, fake-tensor and AOT checks of a kernel do not apply."""
    torch.manual_seed(4)
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    w = torch.randn(12, 32, requires_grad=True)
    step = torch.full((12, 4), 0.02, requires_grad=True)
    x = torch.randn(5, 32, requires_grad=True)
    ops = torch.ops.mixprec
    cases = [
        (ops.qat_fake_quantize_input.default, (x, True)),
        (ops.qat_fake_quantize_weight.default, (w, None, 8, None)),
        (ops.qat_fake_quantize_weight.default, (w, step, 4, 8)),
        (ops.qat_weight_steps.default, (w, 4, 8)),
        (ops.qat_quantize_weight.default, (w, None, 4, None)),
    ]
    codes, scale = ops.qat_quantize_weight(w, None, 8, None)
    cases += [
        (ops.qat_dequantize_weight.default, (codes, scale)),
        (ops.qat_quantized_linear.default, (x.detach(), codes, scale, torch.randn(12), 8, None, True)),
        (ops.qat_quantized_linear.default, (x.detach(), codes, scale, None, 8, None, True, torch.tensor([0.01]))),
        (ops.qat_fake_quantize_input.default, (x, False, torch.tensor([0.01], requires_grad=True))),
    ]
    conv_codes, conv_scale = ops.qat_quantize_weight(torch.randn(4, 2, 3, 3), None, 8, None)
    cases.append((ops.qat_quantized_conv2d.default, (torch.randn(1, 2, 6, 6), conv_codes, conv_scale, [4, 2, 3, 3],
                                                     None, [1, 1], [1, 1], [1, 1], 1, True)))
    cases.append((ops.qat_quantized_conv2d.default, (torch.randn(1, 2, 6, 6), conv_codes, conv_scale, [4, 2, 3, 3],
                                                     None, [1, 1], [1, 1], [1, 1], 1, True, torch.tensor([0.02]))))
    cw, rv = torch.randn(4, 2, 3, 3, requires_grad=True), torch.rand(4) + 0.5
    gamma, beta = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    cases.append((ops.qat_fold_batchnorm.default, (cw, torch.randn(4), gamma, beta, torch.randn(4), rv, 1e-5)))
    cases.append((ops.qat_folded_conv2d.default, (torch.randn(1, 2, 6, 6), cw, None, None, 8, gamma, rv, 1e-5,
                                                  [1, 1], [1, 1], [1, 1], 1)))
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=no_schema)
    # The learnable input step's start reads the step back (a host read, once per layer): eager only, and its
    # schema declares the write.
    torch.library.opcheck(ops.qat_init_input_step_.default, (torch.zeros(1), x.detach()),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_prepare_warns_that_conv1d_projections_stay_in_float() -> None:
    """Hugging Face's GPT-2 projections are Conv1D, not nn.Linear: prepare leaves them in float and says so (as
    mixprec.nn.convert does); a filter that leaves them out silences it."""
    class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D's shape: a transposed Linear
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)

    model = nn.Sequential(Conv1D(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"1 Conv1D layer\(s\) \(e.g. '0'.*stay in float"):
        qat.prepare(model)
    assert type(model[0]) is Conv1D and type(model[2]).__name__ == "QATLinear"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qat.prepare(nn.Sequential(Conv1D(8, 8), nn.Linear(8, 4)), filter=lambda n, m: not isinstance(m, Conv1D))


@pytest.mark.parametrize("channels", [1, 4, "1x1"])
@pytest.mark.parametrize("config", [qat.QATConfig(), qat.QATConfig(learnable_activation_scales=True)],
                         ids=["dynamic", "learned-input-step"])
def test_channels_last_activations_stay_channels_last(config: qat.QATConfig, channels: int) -> None:
    """A channels_last model keeps its layout through QAT and convert, as torch's Conv2d: the per-tensor input
    quantization walks the activation in memory order (it came back contiguous, and the convolution after it ran
    in NCHW). The values are those of the contiguous run, bit for bit. One input channel (a grayscale first layer)
    is contiguous in both layouts: it stays channels_last too."""
    torch.manual_seed(0)
    size = 1 if channels == "1x1" else 6  # 1x1 spatial (global pooling, squeeze-excitation): contiguous stays so
    channels = 4 if channels == "1x1" else channels
    plain = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, channels, size, size)
    for stage in ("qat", "converted"):
        model = qat.prepare(copy.deepcopy(plain), config)
        model(x)  # sets a learned input step
        if stage == "converted":
            model = qat.convert(model)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xl = x.to(memory_format=torch.channels_last)
        out, ref = last(xl), model(x)
        assert out.is_contiguous(memory_format=torch.channels_last), stage
        torch_conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        assert last[0](xl).stride() == torch_conv.to(memory_format=torch.channels_last)(xl).stride(), stage
        assert model[0](x).stride() == torch_conv.to(memory_format=torch.contiguous_format)(x).stride(), stage
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert torch.equal(qat._fake_quantize_input(xl, False), qat._fake_quantize_input(x, False))
        if stage == "qat":
            out.sum().backward()
            assert all(p.grad is not None for p in last.parameters())


def test_quantized_conv2d_prints_its_geometry() -> None:
    conv = qat.convert(qat.prepare(nn.Sequential(nn.Conv2d(4, 8, (3, 5), stride=2, padding=1, groups=2)),
                                   qat.QATConfig(weight_bits=4)))[0]
    assert repr(conv) == ("QuantizedConv2d(4, 8, kernel_size=(3, 5), stride=(2, 2), padding=(1, 1), dilation=(1, 1), "
                          "groups=2, weight_bits=4, activations=True)")


def test_a_load_pre_hook_renaming_legacy_keys_runs_before_the_learnable_steps_decision() -> None:
    """As for Float8Linear: a pre-hook that renames a legacy checkpoint's keys runs before the layer decides
    whether the checkpoint holds its learnable steps, so a plain checkpoint with legacy names loads strictly."""
    torch.manual_seed(3)
    plain = nn.Linear(16, 8)
    legacy = {"w_" + k: v * 2 for k, v in plain.state_dict().items()}
    config = qat.QATConfig(learnable_scales=True)
    layer = qat.prepare(nn.Sequential(nn.Linear(16, 8)), config)[0]
    layer._register_load_state_dict_pre_hook(rename_legacy_keys)
    assert str(layer.load_state_dict(legacy)) == "<All keys matched successfully>"
    expected = qat.prepare(nn.Sequential(nn.Linear(16, 8)), config)[0]
    expected.load_state_dict({k[2:]: v for k, v in legacy.items()})
    assert torch.equal(layer.weight, plain.weight * 2)
    assert torch.equal(layer.weight_step, expected.weight_step)
