"""mixprec.qat: quantization-aware training under autocast with GradScaler and the master-weight optimizer.

A small CNN (conv + BatchNorm + ReLU + linear) on scikit-learn's digits (real data, shipped with the
package) trained with QAT under fp16 and bf16 autocast: its INT8-converted accuracy within 1 point of the
fp32 model. Converted layers hold integer codes and scales and reproduce what training simulated; INT4
groups, learnable steps, and bad configurations."""

from __future__ import annotations

import functools

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mixprec
from mixprec import qat


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


def test_activation_codes_are_int8_quantize_codes() -> None:
    """QAT's per-token activation quantization and mixprec.int8.quantize (the converted model's) agree."""
    torch.manual_seed(6)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.randn(64, 96, device=device) * torch.logspace(-3, 3, 96, device=device)
        q = mixprec.int8.quantize(x, (1, -1))
        assert torch.equal(qat._fake_quantize_input(x, True), q.data.float() * q.scale_inv)


def test_bad_config_changes_nothing() -> None:
    with pytest.raises(ValueError, match="weight_bits must be 8 or 4"):
        qat.QATConfig(weight_bits=2)
    with pytest.raises(ValueError, match="group_size 5 must divide in_features 16"):
        qat.prepare(nn.Linear(16, 4), qat.QATConfig(group_size=5))
    with pytest.raises(ValueError, match="group_size applies to Linear layers only"):
        qat.prepare(nn.Conv2d(3, 4, 3), qat.QATConfig(group_size=3))
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 4), nn.Conv2d(1, 1, 3, padding="same"))
    with pytest.raises(ValueError, match="Conv2d needs zero padding given as sizes"):
        qat.prepare(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, nn.Conv2d]  # nothing was swapped


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
    ]
    conv_codes, conv_scale = ops.qat_quantize_weight(torch.randn(4, 2, 3, 3), None, 8, None)
    cases.append((ops.qat_quantized_conv2d.default, (torch.randn(1, 2, 6, 6), conv_codes, conv_scale, [4, 2, 3, 3],
                                                     None, [1, 1], [1, 1], [1, 1], 1, True)))
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=no_schema)
