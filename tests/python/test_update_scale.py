"""update_scale_ against torch._amp_update_scale_ (defaults, bit for bit) and against independent traces of
DeepSpeed's and Megatron-LM's dynamic loss scalers (hysteresis, consecutive hysteresis, minimum scale)."""

from __future__ import annotations

import math
import random
import pytest
import torch
from conftest import DEVICES

from mixprec import ops


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale (deepspeed/runtime/fp16/loss_scaler.py), traced in plain
    Python as DeepSpeed writes it: its own iteration counters and hysteresis budget, division by
    scale_factor, no upper bound. An oracle that shares no code or structure with update_scale_."""

    def __init__(self, init_scale: float, scale_factor: float, scale_window: int, min_scale: float,
                 delayed_shift: int, consecutive_hysteresis: bool) -> None:
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_factor, self.scale_window, self.min_scale = scale_factor, scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


class MegatronScaler:
    """Megatron-LM's DynamicGradScaler.update (megatron/core/optimizer/grad_scaler.py), traced in plain
    Python: a hysteresis tracker that may go below zero, growth exactly at growth_interval clean steps."""

    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float, backoff_factor: float,
                 growth_interval: int, hysteresis: int) -> None:
        self.scale, self.min_scale = initial_scale, min_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor


def overflow_pattern(seed: int, steps: int = 600) -> list[bool]:
    """Bursts of overflows (which drive the scale to its floor) between long clean runs (which grow it)."""
    rng = random.Random(seed)
    return [rng.random() < (0.7 if (step // 40) % 3 == 1 else 0.04) for step in range(steps)]


def make_state(device: str, scale: float, hysteresis: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.full((1,), scale, dtype=torch.float32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
        torch.full((1,), hysteresis, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(5))
def test_defaults_match_torch_bit_for_bit(device: str, seed: int) -> None:
    rng = random.Random(seed)
    growth_factor, backoff_factor = rng.choice([(2.0, 0.5), (1.7, 0.3), (4.0, 0.25)])
    interval = rng.randint(1, 5)
    scale, growth, hyst = make_state(device, 2.0**16)
    t_scale, t_growth = scale.clone(), growth.clone()
    for _ in range(300):
        found = torch.full((1,), float(rng.random() < 0.3), device=device)
        ops.update_scale_(scale, growth, hyst, found, growth_factor, backoff_factor, interval)
        torch._amp_update_scale_(t_scale, t_growth, found, growth_factor, backoff_factor, interval)
        assert torch.equal(scale, t_scale) and torch.equal(growth, t_growth)


@pytest.mark.parametrize("device", DEVICES)
def test_growth_to_overflow_is_skipped_like_torch(device: str) -> None:
    scale, growth, hyst = make_state(device, 2.0**127)
    t_scale, t_growth = scale.clone(), growth.clone()
    clean = torch.zeros(1, device=device)
    for _ in range(3):
        ops.update_scale_(scale, growth, hyst, clean, 2.0, 0.5, 1)
        torch._amp_update_scale_(t_scale, t_growth, clean, 2.0, 0.5, 1)
    assert scale.item() == 2.0**127 and torch.equal(scale, t_scale) and torch.equal(growth, t_growth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [-65536.0, -math.inf, -1e-45, -0.0, 0.0, 1e-45, math.inf, math.nan])
def test_unusual_scales_back_off_like_torch(device: str, start: float) -> None:
    """With the defaults (min_scale 0: no floor) a negative, signed-zero, subnormal, infinite or NaN scale
    backs off and grows to torch's bits (a floor of 0 used to turn -65536 into +0)."""
    scale, growth, hyst = make_state(device, start)
    t_scale, t_growth = scale.clone(), growth.clone()
    for found in (1.0, 1.0, 0.0, 0.0, 1.0):
        flag = torch.full((1,), found, device=device)
        ops.update_scale_(scale, growth, hyst, flag, 2.0, 0.5, 2)
        torch._amp_update_scale_(t_scale, t_growth, flag, 2.0, 0.5, 2)
        assert torch.equal(scale.view(torch.int32), t_scale.view(torch.int32)), (start, found)
        assert torch.equal(growth, t_growth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hysteresis, consecutive, min_scale", [(1, False, 1.0), (3, False, 1.0), (2, True, 1.0),
                                                                (4, True, 256.0), (2, False, 2.0**10)])
def test_follows_deepspeeds_dynamic_loss_scaler(device: str, hysteresis: int, consecutive: bool,
                                                min_scale: float) -> None:
    """hysteresis = DeepSpeed's delayed_shift, consecutive_hysteresis the same flag, growth_interval its
    scale_window: the same scale after every one of 600 steps (factor 2: every value exact in fp32)."""
    oracle = DeepSpeedScaler(2.0**16, 2.0, 5, min_scale, hysteresis, consecutive)
    scale, growth, hyst = make_state(device, 2.0**16, hysteresis)
    for step, overflow in enumerate(overflow_pattern(hysteresis + 7 * consecutive)):
        oracle.update_scale(overflow)
        ops.update_scale_(scale, growth, hyst, torch.full((1,), float(overflow), device=device), 2.0, 0.5, 5,
                          hysteresis=hysteresis, min_scale=min_scale, consecutive_hysteresis=consecutive)
        assert scale.item() == oracle.cur_scale, step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hysteresis, interval, min_scale", [(1, 3, 1.0), (2, 4, 1.0), (5, 2, 2.0**8)])
def test_follows_megatrons_dynamic_grad_scaler(device: str, hysteresis: int, interval: int, min_scale: float) -> None:
    oracle = MegatronScaler(2.0**16, min_scale, 2.0, 0.5, interval, hysteresis)
    scale, growth, hyst = make_state(device, 2.0**16, hysteresis)
    for step, overflow in enumerate(overflow_pattern(100 + hysteresis)):
        oracle.update(overflow)
        ops.update_scale_(scale, growth, hyst, torch.full((1,), float(overflow), device=device), 2.0, 0.5, interval,
                          hysteresis=hysteresis, min_scale=min_scale)
        assert scale.item() == oracle.scale, step
        assert growth.item() == oracle.growth_tracker


@pytest.mark.parametrize("device", DEVICES)
def test_max_scale_caps_growth_and_min_scale_floors_backoff(device: str) -> None:
    """mixprec's own bounds (DeepSpeed and Megatron have no cap): with factors 3 and 0.1 the products are not
    powers of two, so the cap and the floor are reached exactly rather than by landing on them."""
    lo, hi = 7.0, 5000.0
    scale, growth, hyst = make_state(device, 100.0)
    seen = []
    for overflow in [False] * 12 + [True] * 8 + [False] * 3:
        ops.update_scale_(scale, growth, hyst, torch.full((1,), float(overflow), device=device), 3.0, 0.1, 2,
                          min_scale=lo, max_scale=hi)
        seen.append(scale.item())
    assert max(seen) == hi and seen[11] == hi  # 100 -> 300 -> 900 -> 2700 -> capped at 5000
    assert min(seen) == lo and seen[19] == lo  # 5000 -> 500 -> 50 -> 7 (floor), and stays
    assert seen[-1] == 21.0  # grows again from the floor: 7 * 3 after two clean steps
    assert all(lo <= s <= hi for s in seen)


def test_hysteresis_example() -> None:
    """Two overflows are tolerated with hysteresis 3; the third backs off; growth refills the budget."""
    scale, growth, hyst = make_state("cpu", 1024.0, hysteresis=3)
    overflow, clean = torch.ones(1), torch.zeros(1)
    seen = []
    for found in [overflow, overflow, overflow, overflow, clean, clean]:
        ops.update_scale_(scale, growth, hyst, found, 2.0, 0.5, 2, hysteresis=3)
        seen.append((scale.item(), hyst.item()))
    assert seen == [(1024.0, 2), (1024.0, 1), (512.0, 0), (256.0, 0), (256.0, 0), (512.0, 3)]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    scale, growth, hyst = make_state(device, 4.0, 2)
    found = torch.ones(1, device=device)
    torch.library.opcheck(
        torch.ops.mixprec.update_scale_.default, (scale, growth, hyst, found, 2.0, 0.5, 10, 2, 1.0, 1024.0, False)
    )
    torch.library.opcheck(torch.ops.mixprec.update_scale_.default, (scale, growth, hyst, found, 2.0, 0.5, 10))
