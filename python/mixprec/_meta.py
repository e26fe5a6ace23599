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


@torch.library.register_fake("mixprec::cast")
def _cast_fake(
    src: torch.Tensor, dtype: torch.dtype, rounding: str = "nearest", saturate: bool = False, seed: Optional[int] = None
) -> torch.Tensor:
    return torch.empty_like(src, dtype=dtype, memory_format=torch.preserve_format)


@torch.library.register_fake("mixprec::cast_")
def _cast__fake(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    rounding: str = "nearest",
    saturate: bool = False,
    seed: Optional[int] = None,
) -> None:
    return None


@torch.library.register_fake("mixprec::split_bf16_remainder")
def _split_bf16_remainder_fake(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        src.new_empty(src.shape, dtype=torch.bfloat16),
        src.new_empty(src.shape, dtype=torch.int16),
    )


@torch.library.register_fake("mixprec::merge_bf16_remainder")
def _merge_bf16_remainder_fake(bf16: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    return bf16.new_empty(bf16.shape, dtype=torch.float32)


@torch.library.register_fake("mixprec::adam_step_")
def _adam_step_fake(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    maximize: bool = False,
    master_mode: str = "none",
    rounding: str = "nearest",
    seed: Optional[int] = None,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip_coef: Optional[torch.Tensor] = None,
) -> None:
    return None


@torch.library.register_fake("mixprec::linear_wgrad_accum_")
def _linear_wgrad_accum_fake(main_grad: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    return None


@torch.library.register_fake("mixprec::linear_wgrad")
def _linear_wgrad_fake(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    return grad_output.new_empty((grad_output.shape[-1], input.shape[-1]), dtype=torch.float32)
