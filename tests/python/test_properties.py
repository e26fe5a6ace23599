"""Property-based tests (hypothesis) of every op against float64 references, on every device (inputs are
drawn on the CPU and copied with their layout, storage offset included, to the device under test).

A fast profile runs on every CI (MIXPREC_HYPOTHESIS_EXAMPLES, default 40 per op); the deep profile is
MIXPREC_HYPOTHESIS_EXAMPLES=10000."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import DEVICES
from conftest import on_device as on
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixprec import ops

EXAMPLES = int(os.environ.get("MIXPREC_HYPOTHESIS_EXAMPLES", "40"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw, min_numel: int = 0, max_numel: int = 5000, dtypes=DTYPES):
    """A tensor of random shape (sometimes > 2^16 elements), dtype and layout: contiguous, transposed,
    strided slice, or with a storage offset."""
    big = draw(st.booleans()) and draw(st.integers(0, 9)) == 0
    numel = draw(st.integers(65537, 70000)) if big else draw(st.integers(min_numel, max_numel))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 2.0 ** draw(st.integers(-20, 20))
    gen = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "offset"]))
    base = torch.randn(numel * 2 + 8, generator=gen, dtype=torch.float64) * scale
    if layout == "strided":
        t = base[: numel * 2 : 2]
    elif layout == "offset":
        t = base[3 : 3 + numel]
    elif layout == "transposed" and numel % 2 == 0 and numel > 0:
        t = base[:numel].reshape(2, numel // 2).t()
    else:
        t = base[:numel]
    return t.to(dtype) if layout != "strided" else base.to(dtype)[: numel * 2 : 2]


@pytest.mark.parametrize("device", DEVICES)
@PROFILE
@given(grads=st.lists(tensors(), min_size=0, max_size=5), exponent=st.integers(-130, 60),
       plant=st.sampled_from([None, math.inf, -math.inf, math.nan]), where=st.integers(0, 10**9))
def test_unscale_and_check(device: str, grads, exponent: int, plant, where: int) -> None:
    inv32 = float(torch.tensor(2.0**exponent, dtype=torch.float32))  # subnormal for exponent < -126
    nonempty = [g for g in grads if g.numel()]
    if plant is not None and nonempty:
        target = nonempty[where % len(nonempty)]
        target[np.unravel_index(where % target.numel(), tuple(target.shape))] = plant
    expected = [(g.double() * inv32).to(g.dtype) for g in grads]
    found_expected = any(not bool(torch.isfinite(g).all()) for g in grads)
    found = torch.zeros(1, device=device)
    on_device = [on(g, device) for g in grads]
    ops.unscale_and_check_(on_device, found, torch.full((1,), inv32, device=device))
    assert found.item() == float(found_expected)
    for a, b in zip((g.cpu() for g in on_device), expected):
        if a.dtype == torch.float32 or math.log2(inv32).is_integer():
            torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
        else:
            torch.testing.assert_close(a, b, equal_nan=True, rtol=2 * torch.finfo(a.dtype).eps, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@PROFILE
@given(src=tensors(dtypes=[torch.float32]), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       saturate=st.booleans())
def test_cast_nearest_equals_tensor_to(device: str, src: torch.Tensor, dtype: torch.dtype, saturate: bool) -> None:
    out = ops.cast(on(src, device), dtype, "nearest", saturate).cpu()
    ref = src.double()
    if saturate:
        fmax = torch.finfo(dtype).max
        ref = torch.where(torch.isfinite(ref), ref.clamp(-fmax, fmax), ref)
    expected = ref.float().to(dtype)
    assert out.shape == src.shape
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@PROFILE
@given(src=tensors(min_numel=1, dtypes=[torch.float32]), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**62))
def test_cast_stochastic_picks_a_neighbour(device: str, src: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    src = src.clamp(-60000, 60000)
    out = ops.cast(on(src, device), dtype, "stochastic", seed=seed).cpu().double()
    down = src.to(dtype).double()
    # The result is one of the two representable values around x (nearest is one of them).
    lo = torch.minimum(down, torch.nextafter(down.to(dtype), torch.full_like(down, -math.inf).to(dtype)).double())
    hi = torch.maximum(down, torch.nextafter(down.to(dtype), torch.full_like(down, math.inf).to(dtype)).double())
    x = src.double()
    low_n = torch.where(down <= x, down, lo)
    high_n = torch.where(down >= x, down, hi)
    assert torch.all((out == low_n) | (out == high_n))
    assert torch.equal(ops.cast(on(src, device), dtype, "stochastic", seed=seed).cpu().double(), out)
    if device != "cpu":  # the documented contract: the same draws, so the same bits, on every device
        assert torch.equal(ops.cast(src, dtype, "stochastic", seed=seed).double(), out)


@pytest.mark.parametrize("device", DEVICES)
@PROFILE
@given(src=tensors(dtypes=[torch.float32]))
def test_remainder_round_trip(device: str, src: torch.Tensor) -> None:
    hi, lo = ops.split_bf16_remainder(on(src, device))
    back = ops.merge_bf16_remainder(hi, lo).cpu()
    assert torch.equal(back.reshape(-1).view(torch.int32), src.contiguous().reshape(-1).view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@PROFILE
@given(n=st.integers(0, 3000), dtype=st.sampled_from(DTYPES), steps=st.integers(1, 4),
       lr=st.floats(1e-5, 1e-1), wd=st.sampled_from([0.0, 0.01, 0.1]), decoupled=st.booleans(),
       maximize=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_adam_step_matches_float64_reference(device, n, dtype, steps, lr, wd, decoupled, maximize, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    w64 = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).double()
    p = w64.to(dtype).to(device)
    master = [w64.float().to(device)] if dtype != torch.float32 else []
    mode = "fp32" if dtype != torch.float32 else "none"
    m, v, s = torch.zeros(n, device=device), torch.zeros(n, device=device), torch.zeros((), device=device)
    m64, v64 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(1, steps + 1):
        g = torch.randn(n, generator=gen)
        ops.adam_step_([p], [g.to(dtype).to(device)], [m], [v], master, [s], lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=wd, decoupled_weight_decay=decoupled, maximize=maximize, master_mode=mode)
        g64 = g.to(dtype).double() * (-1 if maximize else 1)
        if wd:
            if decoupled:
                w64 = w64 * (1 - lr * wd)
            else:
                # The L2 term is formed in fp32 (one fused multiply-add) before anything else; where it
                # nearly cancels the gradient, Adam's first steps amplify that rounding (m/sqrt(v) ~ sign),
                # so the reference forms it the same way: exact in double, rounded once to fp32.
                wd32 = float(torch.tensor(wd, dtype=torch.float32))
                g64 = (g64 + wd32 * w64).float().double()
        m64 = 0.9 * m64 + 0.1 * g64
        v64 = 0.999 * v64 + 0.001 * g64 * g64
        w64 = w64 - (lr / (1 - 0.9**t)) * m64 / ((v64 / (1 - 0.999**t)).sqrt() + 1e-8)
    w = master[0].cpu().double() if master else p.cpu().double()
    # fp32 arithmetic over a few steps: a few ulps of the larger of |w| and the step size.
    tol = 1e-5 * (w64.abs() + lr)
    assert torch.all((w - w64).abs() <= tol), float(((w - w64).abs() / (w64.abs() + lr)).max())
    assert s.item() == steps
    if dtype != torch.float32:
        assert torch.equal(p, master[0].to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@PROFILE
@given(pattern=st.lists(st.booleans(), min_size=1, max_size=60), interval=st.integers(1, 6),
       hysteresis=st.integers(1, 4), consecutive=st.booleans(), bounds=st.booleans())
def test_update_scale_state_machine(device, pattern, interval, hysteresis, consecutive, bounds) -> None:
    min_scale, max_scale = (2.0**4, 2.0**20) if bounds else (0.0, None)
    scale, growth, hyst = torch.full((1,), 2.0**16, device=device), torch.zeros(1, dtype=torch.int32, device=device), \
        torch.full((1,), hysteresis, dtype=torch.int32, device=device)
    ref_scale, ref_growth, ref_hyst = 2.0**16, 0, hysteresis
    for overflow in pattern:
        ops.update_scale_(scale, growth, hyst, torch.full((1,), float(overflow), device=device), 2.0, 0.5, interval,
                          hysteresis, min_scale, max_scale, consecutive)
        if overflow:
            ref_growth = 0
            ref_hyst = max(ref_hyst - 1, 0)
            if ref_hyst == 0:
                ref_scale = max(ref_scale * 0.5, min_scale)
        else:
            if consecutive:
                ref_hyst = hysteresis
            if ref_growth + 1 >= interval:
                ref_scale = min(ref_scale * 2.0, max_scale or math.inf)
                ref_growth, ref_hyst = 0, hysteresis
            else:
                ref_growth += 1
        assert (scale.item(), growth.item(), hyst.item()) == (ref_scale, ref_growth, ref_hyst)
