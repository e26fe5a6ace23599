"""Master-weight Adam and AdamW as ``torch.optim.Optimizer`` subclasses, on mixprec's fused step.

One call of :func:`mixprec.ops.adam_step_` per (device, master mode) bucket reads the gradients once,
updates fp32 master weights (or exact bf16 remainders) and moments, and writes the 16-bit model
parameters back, in one pass over memory. Everything the step needs lives in ``optimizer.state``
(``step``, ``exp_avg``, ``exp_avg_sq``, ``master`` or ``remainder``), so ``state_dict()`` /
``load_state_dict()`` resume bit for bit; a ``torch.optim.AdamW`` state dict loads too (masters are then
taken from the parameters).

Under a loss scaler the optimizer follows torch's protocol for fused optimizers: it reads ``grad_scale``
and ``found_inf`` on the device, divides the gradients inside the fused step (leaving them unscaled in
``.grad``, as torch's fused Adam does) and writes nothing on an overflowing step, with no host
synchronisation. ``mixprec.GradScaler`` always hands them over; ``torch.amp.GradScaler`` does so when the
optimizer is built with ``fused=True`` (which sets ``_step_supports_amp_scaling``, as torch's fused
optimizers do), and otherwise unscales first and skips on the host.

Gradients may be fp32 for 16-bit parameters (:class:`mixprec.nn.Linear` keeps them so): the step reads any
mix of fp32/fp16/bf16 gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from . import ops

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


def _scalar(value: Union[float, Tensor], name: str) -> float:
    """A hyper-parameter given as a number or a one-element tensor (torch accepts both for betas)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return float(value.detach().cpu())
    return float(value)


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit value from a counter: distinct Philox keys for consecutive steps."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x - (1 << 64) if x >= (1 << 63) else x  # as a signed int64 for the op's `int? seed`


class _MixprecAdam(torch.optim.Optimizer):
    _decoupled: bool = True
    # mixprec.GradScaler hands found_inf to these optimizers (no host check) whatever `fused` says.
    _mixprec_skips_on_device = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: Optional[bool] = None,
        master_weights: str = "auto",
        moment_dtype: torch.dtype = torch.float32,
        rounding: str = "nearest",
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (lr must be >= 0)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (eps must be >= 0)")
        betas = (_scalar(betas[0], "betas[0]"), _scalar(betas[1], "betas[1]"))
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (must be in [0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by mixprec's fused Adam step (it keeps no maximum of "
                             "the second moments); use torch.optim.Adam(amsgrad=True)")
        if differentiable:
            raise ValueError("differentiable=True is not supported: mixprec's fused step runs outside autograd; use "
                             "torch.optim with differentiable=True to differentiate through the update")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
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
            # torch's keys, kept so state dicts and frameworks see what they expect. The step is always one
            # fused kernel that never synchronises, so foreach and capturable change nothing.
            foreach=foreach,
            capturable=capturable,
            differentiable=False,
            fused=fused,
            decoupled_weight_decay=self._decoupled if decoupled_weight_decay is None else bool(decoupled_weight_decay),
            master_weights=master_weights,
            moment_dtype=moment_dtype,
            rounding=rounding,
            seed=seed,
            rng_calls=0,
        )
        super().__init__(params, defaults)
        # As torch's fused optimizers: only with fused=True does the optimizer tell *any* scaler
        # (torch.amp.GradScaler included) that it takes grad_scale / found_inf itself. Frameworks key on this
        # flag (Lightning then refuses gradient clipping, Accelerate cannot see skipped steps), so it stays off
        # by default; mixprec.GradScaler still skips these on the device (_mixprec_skips_on_device).
        self._step_supports_amp_scaling = bool(fused)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # pickles from before a key existed
            for key in ("foreach", "fused"):
                group.setdefault(key, None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", self._decoupled)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``."""
        super().add_param_group(param_group)
        self.__dict__.pop("_resolved", None)

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
        self.__dict__.pop("_resolved", None)  # release the replaced state tensors now
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in originals:
                continue
            for key, value in originals[pid].items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device).clone()

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

        # What each parameter's last step resolved (bucket, state tensors), reused while nothing it depends on
        # changed: the same state dict holding the same tensors, the same dtype, the same group options. The
        # checks are identity tests, so replacing a state tensor, loading a state dict or editing a group's
        # master_weights / moment_dtype takes the full path again.
        resolved: dict[int, tuple[Any, ...]] = self.__dict__.setdefault("_resolved", {})
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, str], dict[str, list[Tensor]]] = {}
            options = (group["master_weights"], group["moment_dtype"])
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                grad = _local(grad)
                state = self.state[p]
                r = resolved.get(id(p))
                if (r is not None and r[0] is p and r[1] is state and r[2] == options and r[3] is p.dtype
                        and r[4][0] == p.device and state.get("exp_avg") is r[6] and state.get("exp_avg_sq") is r[7]
                        and state.get("step") is r[8] and (r[10] is None or state.get(r[10]) is r[9])):
                    key, local, m, v, step, w = r[4], r[5], r[6], r[7], r[8], r[9]
                else:
                    mode = self._master_mode(p, group)
                    local = _local(p)
                    state = self._init_state(p, local, group, mode)
                    key = (p.device, mode)
                    m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                    w_key = {"fp32": "master", "remainder": "remainder"}.get(mode)
                    w = None if w_key is None else state[w_key]
                    if local is p:  # a DTensor's local shard is a new object per call: resolved afresh
                        resolved[id(p)] = (p, state, options, p.dtype, key, local, m, v, step, w, w_key)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = {k: [] for k in ("p", "g", "m", "v", "w", "s")}
                b["p"].append(local)
                b["g"].append(grad)
                b["m"].append(m)
                b["v"].append(v)
                b["s"].append(step)
                if w is not None:
                    b["w"].append(w)
            if not buckets:
                continue
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            seed = None
            if group["seed"] is not None:
                seed = _splitmix64((int(group["seed"]) << 20) ^ int(group["rng_calls"]))
                group["rng_calls"] = int(group["rng_calls"]) + 1
            beta1, beta2 = _scalar(beta1, "betas[0]"), _scalar(beta2, "betas[1]")
            lr_value = lr
            if isinstance(lr, Tensor) and lr.device.type == "cpu":
                lr_value = float(lr)  # a host tensor: reading it costs no device synchronisation
            for (device, mode), b in buckets.items():
                lr_tensor = None
                if isinstance(lr_value, Tensor):  # on a device: the kernel reads it there
                    lr_tensor = lr_value.detach().to(device=device, dtype=torch.float32, non_blocking=True)
                ops.adam_step_(
                    b["p"], b["g"], b["m"], b["v"], b["w"], b["s"],
                    lr=0.0 if lr_tensor is not None else float(lr_value),
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"],
                    master_mode=mode, rounding=group["rounding"], seed=seed, lr_tensor=lr_tensor,
                    grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                    found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
                )
        return loss


class AdamW(_MixprecAdam):
    """AdamW (decoupled weight decay) with master weights, a drop-in for ``torch.optim.AdamW``.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW``. ``lr`` may be a Tensor: on
            the parameters' device it is read there (no host sync); on the CPU its value is read on the host.
        amsgrad: only ``False`` (the fused step keeps no maximum of the second moments): ``True`` is refused.
        foreach, capturable: accepted and recorded as torch does; the step is always one fused kernel per
            (device, master mode) that never synchronises with the host, so they change nothing.
        fused: ``True`` also sets ``_step_supports_amp_scaling``, as torch's fused optimizers do:
            ``torch.amp.GradScaler`` then hands ``grad_scale`` / ``found_inf`` to the step instead of unscaling
            and checking on the host. ``mixprec.GradScaler`` skips the step on the device (no host sync)
            whatever ``fused`` says. Off by default, since frameworks key on the flag (Lightning refuses
            gradient clipping with it, Accelerate cannot see skipped steps).
        differentiable: only ``False``: the fused step runs outside autograd.
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

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class Adam(_MixprecAdam):
    """Adam with master weights, a drop-in for ``torch.optim.Adam``: L2 weight decay added to the gradient,
    or decoupled (AdamW) with ``decoupled_weight_decay=True`` as in torch.

    Same options as :class:`AdamW`; ``weight_decay`` defaults to 0 as in torch.
    """

    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
