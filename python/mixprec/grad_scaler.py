"""mixprec.GradScaler: a drop-in for ``torch.amp.GradScaler`` whose logic is the C++ ``mixprec::GradScaler``.

The state machine (scale, growth and hysteresis counters, per-optimizer stages, overflow flags, state
dict) lives in C++ and is reached through the torch custom class ``torch.classes.mixprec.GradScaler``;
this file only does what needs Python: walking ``torch.optim`` param groups, calling ``optimizer.step``,
the ``_step_supports_amp_scaling`` protocol, and the optional all-reduce across ranks.

Differences from torch, all opt-in or strictly more permissive:
  * ``hysteresis``, ``consecutive_hysteresis``, ``min_scale``, ``max_scale``, ``dynamic=False`` (static scale);
  * fp16 and bf16 gradients are unscaled too (one launch per device for any dtype mix), so 16-bit
    parameters with master-weight optimizers work;
  * with an optimizer that sets ``_step_supports_amp_scaling`` (mixprec.optim, torch's fused Adam) the step
    decision stays on the device: no host synchronisation per step;
  * ``process_group``: the overflow flag is all-reduced (MAX) so every rank skips the same steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from .nn import step_grad
from .optim import _local

__all__ = ["GradScaler"]

_INT_KEYS = ("growth_interval", "_growth_tracker", "hysteresis", "_hysteresis_tracker")
_BOOL_KEYS = ("consecutive_hysteresis", "dynamic")


class GradScaler:
    """Dynamic loss scaling; same constructor (device first), methods and state dict as ``torch.amp.GradScaler``.

    Args:
        device, init_scale, growth_factor, backoff_factor, growth_interval, enabled: as torch.
        hysteresis: overflows tolerated before backing off (1 = torch's behaviour).
        consecutive_hysteresis: count only overflows in a row (the budget refills on every clean step).
        min_scale, max_scale: bounds for the scale (none by default).
        dynamic: ``False`` keeps ``init_scale`` fixed (a static loss scale); overflowing steps are still skipped.
        process_group: all-reduce the overflow flag over this group (e.g. ``torch.distributed.group.WORLD``).
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        hysteresis: int = 1,
        consecutive_hysteresis: bool = False,
        min_scale: float = 0.0,
        max_scale: Optional[float] = None,
        dynamic: bool = True,
        process_group: Optional[Any] = None,
    ) -> None:
        device = str(torch.device(device))
        if enabled and device.startswith("cuda") and not torch.cuda.is_available():
            warnings.warn("mixprec.GradScaler is enabled, but CUDA is not available. Disabling.")
            enabled = False
        if enabled:
            if not init_scale > 0:
                raise ValueError(f"init_scale must be > 0, got {init_scale}")
            if not growth_factor > 1.0:
                raise ValueError(f"The growth factor must be > 1.0, got {growth_factor}")
            if not 0.0 < backoff_factor < 1.0:
                raise ValueError(f"The backoff factor must be in (0, 1), got {backoff_factor}")
        self._device = device
        self._enabled = enabled
        self._process_group = process_group
        self._impl = torch.classes.mixprec.GradScaler(
            device, float(init_scale), float(growth_factor), float(backoff_factor), int(growth_interval), bool(enabled),
            int(hysteresis), bool(consecutive_hysteresis), float(min_scale),
            None if max_scale is None else float(max_scale), bool(dynamic),
        )

    # -- torch.amp.GradScaler's API ----------------------------------------------------------------------

    def scale(self, outputs: Union[Tensor, Iterable[Tensor]]) -> Any:
        """Multiply outputs (a tensor, or nested lists/tuples of tensors) by the scale; no host sync."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return self._impl.scale(outputs)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, Iterable):
            return map(self.scale, outputs)
        raise ValueError("outputs must be a Tensor or an iterable of Tensors")

    @staticmethod
    def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                grad = step_grad(p)  # the fp32 main_grad of mixprec.nn.Linear weights, else .grad
                if grad is not None:
                    grads.append(_local(grad))  # FSDP2: each rank unscales and checks its own shard
        return grads

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and record inf/NaN (one pass per device)."""
        if not self._enabled:
            return
        self._impl.unscale_grads_(id(optimizer), self._grads(optimizer))

    def _found_inf(self, optimizer: torch.optim.Optimizer) -> Tensor:
        key = id(optimizer)
        if not self._impl.is_unscaled(key):
            self._impl.unscale_grads_(key, self._grads(optimizer))
        found = self._impl.found_inf(key)
        if self._process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self._process_group)
            self._impl.set_found_inf(key, found)
        return found

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Step the optimizer unless its gradients overflowed (unscaling them first if needed)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._impl.check_not_stepped(id(optimizer))
        found = self._found_inf(optimizer)
        retval = None
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # The optimizer skips itself on the device; the gradients are already unscaled.
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = found  # type: ignore[attr-defined]
            optimizer._mixprec_scaled_step = True  # type: ignore[attr-defined]  (main_grads included)
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
                del optimizer._mixprec_scaled_step  # type: ignore[attr-defined]
        elif not found.item():  # a plain optimizer: the host decides, as in torch
            retval = optimizer.step(*args, **kwargs)
        self._impl.mark_stepped(id(optimizer))
        return retval

    def update(self, new_scale: Optional[Union[float, Tensor]] = None) -> None:
        """Move the scale from this iteration's overflow flags (on device), or set it to ``new_scale``."""
        if not self._enabled:
            return
        if new_scale is None:
            self._impl.update()
        elif isinstance(new_scale, Tensor):
            if new_scale.numel() != 1 or new_scale.dtype != torch.float32 or new_scale.requires_grad:
                raise ValueError("new_scale should be a float or a 1-element torch.FloatTensor without requires_grad")
            self._impl.scale_tensor().copy_(new_scale.reshape(()))
            self._impl.update_to(self._impl.get_scale())
        else:
            self._impl.update_to(float(new_scale))

    def get_scale(self) -> float:
        """The current scale (a host sync); ``init_scale`` before first use, 1.0 when disabled."""
        return float(self._impl.get_scale())

    def is_enabled(self) -> bool:
        return self._enabled

    def get_growth_factor(self) -> float:
        return float(self._impl.state_dict()["growth_factor"]) if self._enabled else 2.0

    def get_backoff_factor(self) -> float:
        return float(self._impl.state_dict()["backoff_factor"]) if self._enabled else 0.5

    def get_growth_interval(self) -> int:
        return int(self._impl.state_dict()["growth_interval"]) if self._enabled else 2000

    @property
    def _scale(self) -> Tensor:
        """The scale tensor on its device (torch.amp.GradScaler exposes it under this name)."""
        return self._impl.scale_tensor()

    @property
    def _growth_tracker(self) -> Tensor:
        return self._impl.growth_tracker_tensor()

    def state_dict(self) -> dict[str, Any]:
        """torch's keys (so torch.amp.GradScaler loads it) plus mixprec's; ``{}`` when disabled."""
        if not self._enabled:
            return {}
        raw = dict(self._impl.state_dict())
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _INT_KEYS:
                out[key] = int(value)
            elif key in _BOOL_KEYS:
                out[key] = bool(value)
            elif key == "max_scale":
                out[key] = None if math.isinf(value) else float(value)
            else:
                out[key] = float(value)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ours or of ``torch.amp.GradScaler`` (keys it lacks keep their values)."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled instance of GradScaler."
            )
        numeric = {}
        for key, value in state_dict.items():
            if key == "max_scale":
                numeric[key] = math.inf if value is None else float(value)
            elif isinstance(value, (bool, int, float)):
                numeric[key] = float(value)
        self._impl.load_state_dict(numeric)
