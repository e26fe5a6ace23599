"""Fake (meta) kernels for mixprec's ops, so FakeTensor, torch.compile and opcheck can trace them.

Every op in ``csrc/ops/registration.cpp`` has its fake kernel here: it checks nothing the real
kernels check (they run on real data later) and only describes outputs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.library.register_fake("mixprec::unscale_and_check_")
def _unscale_and_check_fake(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    return None


@torch.library.register_fake("mixprec::unscale_and_check_sumsq_")
def _unscale_and_check_sumsq_fake(
    grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> torch.Tensor:
    return found_inf.new_empty((), dtype=torch.float32)


@torch.library.register_fake("mixprec::update_scale_")
def _update_scale_fake(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    hysteresis_tracker: torch.Tensor,
    found_inf: torch.Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    min_scale: float = 0.0,
    max_scale: Optional[float] = None,
    consecutive_hysteresis: bool = False,
) -> None:
    return None
