"""Master-weight Adam and AdamW as ``torch.optim.Optimizer`` subclasses, on mixprec's fused step.

One call of :func:`mixprec.ops.adam_step_` per (device, master mode) bucket reads the gradients once,
updates fp32 master weights (or exact bf16 remainders) and moments, and writes the 16-bit model
parameters back, in one pass over memory. Everything the step needs lives in ``optimizer.state``
(``step``, ``exp_avg``, ``exp_avg_sq``, ``master`` or ``remainder``), so ``state_dict()`` /
``load_state_dict()`` resume bit for bit; a ``torch.optim.AdamW`` state dict loads too (masters are then
taken from the parameters).

With a ``torch.amp.GradScaler`` or a ``mixprec.GradScaler`` the optimizer consumes ``grad_scale`` and
``found_inf`` itself (``_step_supports_amp_scaling``): gradients are unscaled inside the fused step and an
overflowing step writes nothing, with no host synchronisation.

A parameter with a ``main_grad`` (the fp32 weight-gradient accumulator of :class:`mixprec.nn.Linear`) is
stepped from it instead of ``.grad``, and ``zero_grad`` zeroes it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from . import ops
from .nn import step_grad, zero_main_grad

__all__ = ["Adam", "AdamW"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MASTER_CHOICES = ("auto", "fp32", "remainder", "none")
_MASK64 = (1 << 64) - 1


def _local(t: Tensor) -> Tensor:
    """The shard a rank holds of a DTensor (FSDP2's fully_shard params and grads); other tensors as they are.

    The fused step works element-wise, so updating each rank's shard in place is the whole update."""
    if type(t).__name__ == "DTensor":
        return t.to_local()
    return t


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit value from a counter: distinct Philox keys for consecutive steps."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x - (1 << 64) if x >= (1 << 63) else x  # as a signed int64 for the op's `int? seed`


class _MixprecAdam(torch.optim.Optimizer):
    _decoupled: bool = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        master_weights: str = "auto",
        moment_dtype: torch.dtype = torch.float32,
        rounding: str = "nearest",
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr as a Tensor must have one element, got {lr.numel()}")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (lr must be >= 0)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (eps must be >= 0)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (must be in [0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by mixprec's fused Adam step")
        if master_weights not in _MASTER_CHOICES:
            raise ValueError(f"master_weights must be one of {_MASTER_CHOICES}, got {master_weights!r}")
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16, got {moment_dtype}")
        if rounding not in ops.ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ops.ROUNDING_MODES}, got {rounding!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=False,
            maximize=maximize,
            master_weights=master_weights,
            moment_dtype=moment_dtype,
            rounding=rounding,
            seed=seed,
            rng_calls=0,
        )
        super().__init__(params, defaults)
        # torch.amp.GradScaler (and ours) hand grad_scale / found_inf to this optimizer instead of
        # unscaling the gradients and checking them on the host.
        self._step_supports_amp_scaling = True

    # -- master modes and state ---------------------------------------------------------------------------

    @staticmethod
    def _master_mode(p: Tensor, group: dict[str, Any]) -> str:
        choice = group["master_weights"]
        if choice == "auto":
            return "fp32" if p.dtype in _LOW_PRECISION else "none"
        if choice == "remainder" and p.dtype != torch.bfloat16:
            raise ValueError(f"master_weights='remainder' needs bfloat16 parameters, got {p.dtype}")
        if choice == "fp32" and p.dtype == torch.float32:
            return "none"  # an fp32 parameter is its own master
        return choice

    def _init_state(self, p: Tensor, local: Tensor, group: dict[str, Any], mode: str) -> dict[str, Any]:
        """State of `p` (keyed by the parameter), shaped like `local`, the part of it this rank updates."""
        state = self.state[p]
        p = local
        moment_dtype = group["moment_dtype"]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)  # e.g. from torch's CPU steps
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            elif state[key].dtype != moment_dtype or state[key].device != p.device:
                state[key] = state[key].to(device=p.device, dtype=moment_dtype)
        if mode == "fp32" and "master" not in state:
            state["master"] = p.detach().to(torch.float32).clone(memory_format=torch.preserve_format)
        if mode == "remainder" and "remainder" not in state:
            if "master" in state:  # switching from fp32 masters keeps the exact value
                bf16, remainder = ops.split_bf16_remainder(state.pop("master"))
                p.detach().copy_(bf16)
                state["remainder"] = remainder
            else:  # the bf16 value is exact: its remainder is zero
                state["remainder"] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping mixprec's state tensors in their own dtypes.

        torch's loader casts every floating-point state tensor to its parameter's dtype, which would
        round fp32 masters and moments of a bf16 model to bf16; here they come back exactly as saved.
        A ``torch.optim.Adam``/``AdamW`` state dict loads as well: missing masters are taken from the
        parameters at the next step."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        originals = {pid: dict(state_dict["state"][pid]) for pid in saved_ids if pid in state_dict["state"]}
        groups = []
        for g in state_dict["param_groups"]:
            merged = {**{k: v for k, v in self.defaults.items()}, **g}  # torch dicts lack our keys
            groups.append(merged)
        super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in originals:
                continue
            for key, value in originals[pid].items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device).clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``, and zero the fp32 ``main_grad`` buffers in place.

        ``main_grad`` is zeroed rather than dropped even with ``set_to_none``: the buffer is reused by the
        next backward (no re-allocation, stable addresses for CUDA graphs)."""
        super().zero_grad(set_to_none=set_to_none)
        zero_main_grad(p for g in self.param_groups for p in g["params"])

    # -- the step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Perform one optimisation step (skipped on device when ``found_inf`` is set)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        # A scaler other than mixprec's (torch.amp.GradScaler) unscales and checks .grad only: the fp32
        # main_grad of mixprec.nn.Linear weights would go unchecked, or stay scaled after its unscale_.
        foreign_scaler = (grad_scale is not None or found_inf is not None) and not getattr(
            self, "_mixprec_scaled_step", False)

        for group in self.param_groups:
            buckets: dict[tuple[torch.device, str], dict[str, list[Tensor]]] = {}
            for p in group["params"]:
                grad = step_grad(p)
                if grad is None:
                    continue
                if foreign_scaler and grad is getattr(p, "main_grad", None):
                    raise RuntimeError(
                        "a mixprec.nn.Linear weight keeps its gradient in main_grad, which torch.amp.GradScaler "
                        "does not unscale or check; use mixprec.GradScaler (a drop-in) with mixprec.nn.Linear")
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                mode = self._master_mode(p, group)
                local = _local(p)
                state = self._init_state(p, local, group, mode)
                b = buckets.setdefault((p.device, mode), {k: [] for k in ("p", "g", "m", "v", "w", "s")})
                b["p"].append(local)
                b["g"].append(_local(grad))
                b["m"].append(state["exp_avg"])
                b["v"].append(state["exp_avg_sq"])
                b["s"].append(state["step"])
                if mode == "fp32":
                    b["w"].append(state["master"])
                elif mode == "remainder":
                    b["w"].append(state["remainder"])
            if not buckets:
                continue
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            seed = None
            if group["seed"] is not None:
                seed = _splitmix64((int(group["seed"]) << 20) ^ int(group["rng_calls"]))
                group["rng_calls"] = int(group["rng_calls"]) + 1
            for (device, mode), b in buckets.items():
                lr_tensor = None
                if isinstance(lr, Tensor):
                    lr_tensor = lr.detach().to(device=device, dtype=torch.float32).reshape(1)
                ops.adam_step_(
                    b["p"], b["g"], b["m"], b["v"], b["w"], b["s"],
                    lr=float(lr) if not isinstance(lr, Tensor) else 0.0,
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=self._decoupled, maximize=group["maximize"],
                    master_mode=mode, rounding=group["rounding"], seed=seed, lr_tensor=lr_tensor,
                    grad_scale=None if grad_scale is None else grad_scale.to(device).reshape(1),
                    found_inf=None if found_inf is None else found_inf.to(device).reshape(1),
                )
        return loss


class AdamW(_MixprecAdam):
    """AdamW (decoupled weight decay) with master weights, a drop-in for ``torch.optim.AdamW``.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (lr may be a Tensor).
        amsgrad: only ``False`` (the fused step keeps no max of second moments).
        master_weights: ``"auto"`` (fp32 masters for fp16/bf16 params, none for fp32 params),
            ``"fp32"``, ``"remainder"`` (bf16 params + int16 remainders: exact fp32 at 4 bytes per
            parameter) or ``"none"`` (16-bit params updated in place, rounded with ``rounding``).
        moment_dtype: ``torch.float32`` (default) or ``torch.bfloat16``; moments never take the
            parameter's dtype.
        rounding: how 16-bit params are written: ``"nearest"`` or ``"stochastic"`` (unbiased; with
            ``master_weights="none"`` it keeps updates smaller than half an ulp alive).
        seed: key for stochastic rounding; each step draws fresh numbers from (seed, step count), so
            a resumed run repeats them. ``None`` draws from torch's default generator.
    """

    _decoupled = True

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class Adam(_MixprecAdam):
    """Adam (L2 weight decay added to the gradient) with master weights, a drop-in for ``torch.optim.Adam``.

    Same options as :class:`AdamW`; ``weight_decay`` defaults to 0 as in torch.
    """

    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
