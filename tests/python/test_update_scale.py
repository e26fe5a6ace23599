"""update_scale_ against a Python model of the state machine and against torch._amp_update_scale_."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from conftest import DEVICES

from mixprec import ops


@dataclass
class Model:
    """The loss-scale rule written out in plain Python (float32 rounding via numpy)."""

    scale: float
    growth_factor: float
    backoff_factor: float
    growth_interval: int
    hysteresis: int = 1
    min_scale: float = 0.0
    max_scale: Optional[float] = None
    consecutive_hysteresis: bool = False
    growth_tracker: int = 0
    hysteresis_tracker: int = -1

    def __post_init__(self) -> None:
        if self.hysteresis_tracker < 0:
            self.hysteresis_tracker = self.hysteresis

    def step(self, overflow: bool) -> None:
        if overflow:
            self.growth_tracker = 0
            self.hysteresis_tracker = max(self.hysteresis_tracker - 1, 0)
            if self.hysteresis_tracker == 0:
                self.scale = float(np.float32(max(self.scale * self.backoff_factor, self.min_scale)))
            return
        if self.consecutive_hysteresis:
            self.hysteresis_tracker = self.hysteresis
        if self.growth_tracker + 1 >= self.growth_interval:
            grown = self.scale * self.growth_factor
            if self.max_scale is not None:
                grown = min(grown, self.max_scale)
            with np.errstate(over="ignore"):
                grown32 = float(np.float32(grown))
            if math.isfinite(grown32):
                self.scale = grown32
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
        else:
            self.growth_tracker += 1


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
@pytest.mark.parametrize(
    "settings",
    [
        dict(hysteresis=3),
        dict(hysteresis=2, consecutive_hysteresis=True),
        dict(min_scale=1.0, max_scale=2.0**20),
        dict(hysteresis=2, min_scale=64.0, max_scale=2.0**17, backoff_factor=0.1, growth_factor=3.0),
    ],
)
def test_hysteresis_and_bounds_follow_the_model(device: str, settings: dict) -> None:
    rng = random.Random(7)
    growth_factor = settings.pop("growth_factor", 2.0)
    backoff_factor = settings.pop("backoff_factor", 0.5)
    model = Model(scale=2.0**16, growth_factor=growth_factor, backoff_factor=backoff_factor, growth_interval=3, **settings)
    scale, growth, hyst = make_state(device, 2.0**16, model.hysteresis)
    for step in range(500):
        # Bursts of overflows drive the scale to its floor; long clean runs to its ceiling.
        overflow = rng.random() < (0.8 if (step // 50) % 2 else 0.05)
        model.step(overflow)
        ops.update_scale_(
            scale, growth, hyst, torch.full((1,), float(overflow), device=device),
            growth_factor, backoff_factor, 3, **settings,
        )
        assert scale.item() == model.scale, step
        assert growth.item() == model.growth_tracker and hyst.item() == model.hysteresis_tracker
        assert model.min_scale <= scale.item() <= (model.max_scale or math.inf)


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
