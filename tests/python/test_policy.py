"""mixprec.Policy (the C++ parser underneath), mixprec.autocast, Policy.apply and its helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec
from mixprec import Policy


@pytest.mark.parametrize(
    "names, compute, params, scaling",
    [
        (["float32", "32-true", "32", "no"], torch.float32, torch.float32, False),
        (["mixed_float16", "16-mixed", "16", "fp16"], torch.float16, torch.float32, True),
        (["mixed_bfloat16", "bf16-mixed", "bf16"], torch.bfloat16, torch.float32, False),
        (["float16", "16-true"], torch.float16, torch.float16, True),
        (["bfloat16", "bf16-true"], torch.bfloat16, torch.bfloat16, False),
    ],
)
def test_every_known_name(names: list[str], compute: torch.dtype, params: torch.dtype, scaling: bool) -> None:
    for n in names:
        p = Policy(n)
        assert (p.compute_dtype, p.param_dtype, p.needs_loss_scaling) == (compute, params, scaling), n
        assert p == Policy(p.name)
    assert Policy(names[0]).master_dtype == (torch.float32 if params == torch.float32 else params)


def test_jmp_form_and_errors() -> None:
    p = Policy("params=float32,compute=bfloat16,output=float32")
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (torch.float32, torch.bfloat16, torch.float32)
    assert Policy("p=f32, c=f16").output_dtype == torch.float16
    with pytest.raises(RuntimeError, match="accepted"):
        Policy("mixed_float8")
    with pytest.raises(RuntimeError, match="unknown dtype"):
        Policy("params=float32,compute=int8")


def test_keep_fp32_is_extensible() -> None:
    p = Policy("mixed_bfloat16")
    assert p.keeps_fp32(nn.BatchNorm2d(3)) and p.keeps_fp32(nn.LayerNorm(3)) and p.keeps_fp32(nn.GroupNorm(1, 3))
    assert not p.keeps_fp32(nn.Linear(2, 2))
    q = Policy(p, keep_fp32=p.keep_fp32 + ["Embedding"])
    assert q.keeps_fp32(nn.Embedding(3, 3)) and not p.keeps_fp32(nn.Embedding(3, 3))


def test_autocast_sets_and_restores_state_like_torch() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert not torch.is_autocast_enabled("cpu")
    with mixprec.autocast("mixed_bfloat16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
        with mixprec.autocast("float32", "cpu"):  # a float32 policy disables autocast inside
            assert (a @ b).dtype == torch.float32
        with mixprec.autocast(Policy("mixed_float16"), "cpu"):
            assert (a @ b).dtype == torch.float16
        assert (a @ b).dtype == torch.bfloat16
        with pytest.raises(ValueError):
            with mixprec.autocast("mixed_float16", "cpu"):
                raise ValueError("boom")
        assert (a @ b).dtype == torch.bfloat16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32

    @mixprec.autocast("mixed_bfloat16", "cpu")
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y

    assert f(a, b).dtype == torch.bfloat16 and (a @ b).dtype == torch.float32


def test_autocast_on_an_unavailable_device_is_an_error() -> None:
    for device_type in ("no_such_device", "meta"):
        with pytest.raises(RuntimeError, match="not available"):
            mixprec.autocast("mixed_float16", device_type)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16),
                         nn.Linear(16, 1))


@pytest.mark.parametrize("name", ["bfloat16", "mixed_bfloat16", "mixed_float16"])
def test_apply_keeps_norms_fp32_and_forward_works(name: str) -> None:
    policy = Policy(name)
    model = policy.apply(make_model())
    linear_dtype = policy.param_dtype
    assert model[0].weight.dtype == linear_dtype and model[5].weight.dtype == linear_dtype
    for norm in (model[1], model[4]):
        assert all(p.dtype == torch.float32 for p in norm.parameters())
    assert model[1].running_mean.dtype == torch.float32
    x = torch.randn(6, 8).to(linear_dtype)
    with mixprec.autocast(policy, "cpu"):
        out = model(x)
    assert out.dtype == policy.compute_dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mixed_bfloat16", "bfloat16", "mixed_float16"])
def test_training_with_policy_scaler_and_optimizer(name: str) -> None:
    policy = Policy(name)
    model = policy.apply(make_model())
    scaler = policy.grad_scaler("cpu")
    assert scaler.is_enabled() == policy.needs_loss_scaling
    opt = policy.optimizer(model.parameters(), lr=1e-2, seed=0)
    torch.manual_seed(1)
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    losses = []
    for _ in range(150):
        opt.zero_grad()
        with mixprec.autocast(policy, "cpu"):
            loss = nn.functional.mse_loss(model(x.to(policy.param_dtype)).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    if policy.param_dtype == torch.bfloat16:  # pure bf16: no masters, stochastic rounding
        assert opt.param_groups[0]["master_weights"] == "none" and opt.param_groups[0]["rounding"] == "stochastic"


def test_apply_rejects_non_floating_parameters() -> None:
    model = nn.Linear(2, 2)
    model.ticks = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="ticks"):
        Policy("bfloat16").apply(model)
    assert model.weight.dtype == torch.float32
