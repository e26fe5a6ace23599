"""Typed Python wrappers over ``torch.ops.mixprec``; the same ops C++ reaches through ``mixprec::ops``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["unscale_and_check_", "unscale_and_check_sumsq_", "update_scale_"]


def unscale_and_check_(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """Multiply every gradient in place by ``inv_scale`` and raise ``found_inf`` on any inf/NaN.

    Args:
        grads: gradients, fp32/fp16/bf16/fp64 mixed freely, all on one device; any strides.
        found_inf: one-element float32 tensor on that device; set to 1.0 when any element of any
            gradient is non-finite, never cleared (one flag can collect several calls).
        inv_scale: one-element float32 tensor on that device, usually ``1 / scale``.

    Math is fp32 (fp64 for fp64 gradients); the whole list is one kernel launch on CUDA.
    """
    torch.ops.mixprec.unscale_and_check_.default(list(grads), found_inf, inv_scale)


def unscale_and_check_sumsq_(
    grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> torch.Tensor:
    """:func:`unscale_and_check_`, returning also the sum of squares of the unscaled gradients.

    The result is a 0-dim float32 tensor on the gradients' device (no host synchronisation); its
    square root is the global gradient norm used for clipping, computed in the same pass. Squares are
    taken of the fp32 products before they are rounded to each gradient's dtype.
    """
    return torch.ops.mixprec.unscale_and_check_sumsq_.default(list(grads), found_inf, inv_scale)


def update_scale_(
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
    """Advance the dynamic loss-scale state machine in place, on the tensors' device.

    ``scale`` is a one-element float32 tensor, ``growth_tracker`` and ``hysteresis_tracker`` one-element
    int32 tensors (start the latter at ``hysteresis``), ``found_inf`` the flag from
    :func:`unscale_and_check_`. On overflow: the growth counter resets, one unit of the hysteresis budget
    is spent, and once it is gone ``scale *= backoff_factor`` (not below ``min_scale``). After
    ``growth_interval`` clean steps: ``scale *= growth_factor`` (not above ``max_scale``, skipped if not
    finite) and the budget refills. ``consecutive_hysteresis=True`` refills it on every clean step.
    With the defaults this is bit-identical to ``torch._amp_update_scale_``.
    """
    torch.ops.mixprec.update_scale_.default(
        scale,
        growth_tracker,
        hysteresis_tracker,
        found_inf,
        float(growth_factor),
        float(backoff_factor),
        int(growth_interval),
        int(hysteresis),
        float(min_scale),
        None if max_scale is None else float(max_scale),
        bool(consecutive_hysteresis),
    )
