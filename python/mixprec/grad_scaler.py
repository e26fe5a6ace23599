"""mixprec.GradScaler: a drop-in for ``torch.amp.GradScaler`` whose logic is the C++ ``mixprec::GradScaler``.

The state machine (scale, growth and hysteresis counters, per-optimizer stages, overflow flags, state
dict) lives in C++ and is reached through the torch custom class ``torch.classes.mixprec.GradScaler``;
this file only does what needs Python: walking ``torch.optim`` param groups, calling ``optimizer.step``,
the ``_step_supports_amp_scaling`` protocol, and the optional all-reduce across ranks.

torch's protocols hold exactly: an optimizer with ``_step_supports_amp_scaling`` (torch's fused ones) gets
``grad_scale`` and a 0-dim ``found_inf`` after a read-only inf check, any other optimizer is unscaled
first, and ``.grad`` holds afterwards what it holds under ``torch.amp.GradScaler``. The scaler pickles and
deep-copies between iterations, and its getters never touch the device.

Differences from torch, all opt-in or more permissive but one (the setters refuse factors and intervals
that break the state machine, where torch takes them: growth factor < 1, backoff outside (0, 1], an
interval < 1):
  * ``hysteresis``, ``consecutive_hysteresis``, ``min_scale``, ``max_scale``, ``dynamic=False`` (static scale);
  * fp16 and bf16 gradients are unscaled too (one launch per device for any dtype mix), so 16-bit
    parameters with master-weight optimizers work;
  * mixprec's optimizers skip an overflowing step on the device even without ``fused=True``: no host
    synchronisation per step. The price: ``optimizer.step()`` is called on every step, so a framework that
    learns of skipped steps from a missing call (Accelerate's ``optimizer_step_was_skipped``, and the LR
    schedulers it drives) sees none; ``host_skip=True`` reads the flag on the host instead (one sync per
    step) and skips the call as torch does;
  * ``process_group``: the overflow flag is all-reduced (MAX) so every rank skips the same steps (for
    gradients ranks do not share; under DDP the reduced gradients already agree, and torch's ``Join`` cannot
    shadow this extra collective);
  * ``track_overflows``: :meth:`GradScaler.last_overflow` names the parameters whose gradients overflowed;
  * the scale grows once ``growth_interval`` clean steps have passed, also when a smaller interval is set (or
    loaded) while the count is already past it: torch's kernel grows only when the count equals the interval,
    so there the scale never grows again until an overflow restarts the count.

torch's setters take factors of exactly 1 (``set_growth_factor(1)`` caps the scale, ``set_backoff_factor(1)``
floors it) and ``_scale`` / ``_growth_tracker`` can be assigned, as code written for torch does. A subclass that
overrides ``unscale_``, ``_unscale_grads_``, ``_maybe_opt_step`` or ``_check_inf_per_device`` is called through
them as torch's ``step`` calls them.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Iterator, MutableMapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar, Union, overload

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import _C, ops
from .optim import _shard_dims

__all__ = ["GradScaler", "OverflowReport"]

_INT_KEYS = ("growth_interval", "_growth_tracker", "hysteresis", "_hysteresis_tracker")
# torch.amp.GradScaler's methods that its step() routes through, which subclasses override (a sharded scaler's
# unscale_ all-reduces the flags; loggers wrap _maybe_opt_step). A subclass that overrides one gets torch's
# route through them; GradScaler itself calls the C++ scaler directly.
_TORCH_HOOKS = ("unscale_", "_unscale_grads_", "_maybe_opt_step", "_check_inf_per_device")
_BOOL_KEYS = ("consecutive_hysteresis", "dynamic")


@dataclass
class OverflowReport:
    """The last step whose gradients overflowed (:meth:`GradScaler.last_overflow`).

    ``sources`` lists ``(name, max |g|)`` for each parameter whose gradient held inf (``max |g|`` is inf) or
    NaN (NaN); ``str(report)`` reads e.g. ``step 12 (loss scale 65536): blocks.3.mlp.fc1.weight: inf (1 of
    149 tensors)``."""

    step: int          # how many update() calls came before it (0 = the first iteration)
    scale: float       # the loss scale of that step
    num_tensors: int   # gradients checked in that step
    sources: list[tuple[str, float]]
    text: str

    def __str__(self) -> str:
        return self.text


_F = TypeVar("_F", bound=Callable[..., Any])

# Where torch's scaler asserts its call order it raises AssertionError, and training loops catch that type
# (e.g. to skip a batch that produced no gradients); the C++ checks with the same messages raise RuntimeError.
_TORCH_ASSERTIONS = ("No inf checks were recorded", "but the scale is not set")


def _torch_assertion_types(method: _F) -> _F:
    """Re-raise the C++ call-order errors that torch's scaler raises as AssertionError with that type."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except RuntimeError as e:
            if any(needle in str(e) for needle in _TORCH_ASSERTIONS):
                raise AssertionError(str(e)) from e
            raise

    return wrapped  # type: ignore[return-value]


def _function_takes_grad_scaler(step: Callable[..., Any]) -> bool:
    try:
        return "grad_scaler" in inspect.signature(step).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


# Weak keys: a step function patched onto one instance (Accelerate wraps optimizer.step in a new closure at every
# step) holds its optimizer, which must not outlive the training run in this cache.
_TAKES_GRAD_SCALER: "weakref.WeakKeyDictionary[Callable[..., Any], bool]" = weakref.WeakKeyDictionary()


def _takes_grad_scaler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` has a ``grad_scaler`` parameter (torch's older protocol), as torch asks; the
    answer is cached per step function while it lives (inspect.signature costs about 10 us, on every
    scaler.step)."""
    step = optimizer.step
    function = getattr(step, "__func__", step)  # one entry per class (or per patched instance), not per call
    try:
        return _TAKES_GRAD_SCALER[function]
    except KeyError:
        answer = _TAKES_GRAD_SCALER[function] = _function_takes_grad_scaler(function)
        return answer
    except TypeError:  # not weakly referable or unhashable (a builtin, a callable object without __weakref__)
        return _function_takes_grad_scaler(function)


def _by_device_name(flags: Any) -> dict[str, Tensor]:
    """A {device: flag} mapping keyed as the C++ records key it (device strings)."""
    return {str(torch.device(d)): t for d, t in dict(flags).items()}


class _FoundInfView(MutableMapping):
    """One optimizer's overflow flags this iteration, keyed by device: the flags the C++ scaler holds (an
    in-place all-reduce of a value reaches ``step`` and ``update``); adding or removing one edits its record."""

    def __init__(self, impl: Any, key: int) -> None:
        self._impl, self._key = impl, key

    def _flags(self) -> dict[str, Tensor]:
        return dict(self._impl.found_inf_per_device(self._key))

    def _store(self, flags: dict[str, Tensor]) -> None:
        self._impl.set_optimizer_state(self._key, self._impl.stage(self._key), flags)

    def __getitem__(self, device: Any) -> Tensor:
        return self._flags()[str(torch.device(device))]

    def __setitem__(self, device: Any, flag: Tensor) -> None:
        self._store({**self._flags(), str(torch.device(device)): flag})

    def __delitem__(self, device: Any) -> None:
        flags = self._flags()
        del flags[str(torch.device(device))]
        self._store(flags)

    def __iter__(self) -> Iterator[torch.device]:
        return iter([torch.device(d) for d in self._flags()])

    def __len__(self) -> int:
        return len(self._flags())

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __copy__(self) -> dict[torch.device, Tensor]:
        return dict(self.items())

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[torch.device, Tensor]:
        return {d: t.clone() for d, t in self.items()}


class _OptimizerStateView(MutableMapping):
    """torch's per-optimizer record ``{"stage": OptState, "found_inf_per_device": {device: flag}}``, read from
    and written to the C++ scaler (e.g. set back to READY with no flags to run an iteration again)."""

    _KEYS = ("stage", "found_inf_per_device")

    def __init__(self, impl: Any, key: int) -> None:
        self._impl, self._key = impl, key

    def __getitem__(self, name: str) -> Any:
        if name == "stage":
            return OptState(self._impl.stage(self._key))
        if name == "found_inf_per_device":
            return _FoundInfView(self._impl, self._key)
        raise KeyError(name)

    def __setitem__(self, name: str, value: Any) -> None:
        stage, flags = self._impl.stage(self._key), dict(self._impl.found_inf_per_device(self._key))
        if name == "stage":
            stage = OptState(value).value
        elif name == "found_inf_per_device":
            flags = _by_device_name(value)
        else:
            raise KeyError(f"a GradScaler's per-optimizer state holds only {self._KEYS}, not {name!r}")
        self._impl.set_optimizer_state(self._key, stage, flags)

    def __delitem__(self, name: str) -> None:
        raise TypeError("a GradScaler's per-optimizer state always holds 'stage' and 'found_inf_per_device'")

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __repr__(self) -> str:
        return repr(self.__copy__())

    def __copy__(self) -> dict[str, Any]:
        return {"stage": self["stage"], "found_inf_per_device": dict(self["found_inf_per_device"])}

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {"stage": self["stage"], "found_inf_per_device": self["found_inf_per_device"].__deepcopy__(memo)}


class _PerOptimizerStates(MutableMapping):
    """torch's ``GradScaler._per_optimizer_states`` (a defaultdict keyed by ``id(optimizer)``) over the C++
    records: reading any key gives its live record and, as the defaultdict does, creates a READY one without
    flags for an optimizer not seen this iteration; ``get`` creates none; ``pop``, ``del`` and ``clear`` drop
    records, as resetting torch's dict does."""

    def __init__(self, impl: Any) -> None:
        self._impl = impl

    def __getitem__(self, key: int) -> _OptimizerStateView:
        self._impl.ensure_optimizer_state(int(key))
        return _OptimizerStateView(self._impl, int(key))

    def __setitem__(self, key: int, value: Any) -> None:
        value = dict(value)
        stage = OptState(value.get("stage", OptState.READY)).value
        self._impl.set_optimizer_state(int(key), stage, _by_device_name(value.get("found_inf_per_device", {})))

    def __delitem__(self, key: int) -> None:
        if int(key) not in self._impl.optimizer_keys():
            raise KeyError(key)
        self._impl.forget_optimizer(int(key))

    def pop(self, key: int, *default: Any) -> Any:
        if int(key) not in self._impl.optimizer_keys():
            if default:
                return default[0]
            raise KeyError(key)
        record = self[key].__copy__()
        self._impl.forget_optimizer(int(key))
        return record

    def clear(self) -> None:
        self._impl.forget_optimizer(None)

    def get(self, key: int, default: Any = None) -> Any:
        """The record of an optimizer seen this iteration, else ``default`` (torch's dict has no entry yet)."""
        return self[key] if key in self else default

    def __copy__(self) -> dict[int, dict[str, Any]]:
        return {k: self[k].__copy__() for k in self}

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[int, dict[str, Any]]:
        return {k: self[k].__deepcopy__(memo) for k in self}

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and key in self._impl.optimizer_keys()

    def __iter__(self) -> Iterator[int]:
        return iter(self._impl.optimizer_keys())

    def __len__(self) -> int:
        return len(self._impl.optimizer_keys())

    def __repr__(self) -> str:
        return repr({k: self[k] for k in self})


# The keys of state_dict() (torch's five, then mixprec's own).
_STATE_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker", "hysteresis",
                         "_hysteresis_tracker", "consecutive_hysteresis", "min_scale", "max_scale", "dynamic"})


class GradScaler(torch.amp.GradScaler):
    """Dynamic loss scaling; same constructor (device first), methods and state dict as ``torch.amp.GradScaler``.

    Args:
        device, init_scale, growth_factor, backoff_factor, growth_interval, enabled: as torch.
        hysteresis: overflows tolerated before backing off (1 = torch's behaviour).
        consecutive_hysteresis: count only overflows in a row (the budget refills on every clean step).
        min_scale, max_scale: bounds for the scale (none by default).
        dynamic: ``False`` keeps ``init_scale`` fixed (a static loss scale); overflowing steps are still skipped.
        process_group: all-reduce the overflow flag over this group (e.g. ``torch.distributed.group.WORLD``),
            for gradients the ranks do not share (model or pipeline parallelism). DDP needs none: its reduced
            gradients overflow alike on every rank (and ``Join`` cannot shadow this extra collective).
        host_skip: decide every step on the host, as torch does for plain optimizers: one device sync per
            step, and ``optimizer.step()`` is not called on an overflow, so frameworks see skipped steps.
        track_overflows: record which parameters' gradients overflowed, for :meth:`last_overflow` (the
            unscale pass takes each gradient's max |g| on the side; a few tiny device ops per step).

    An instance of ``torch.amp.GradScaler`` (isinstance checks written for torch hold), but none of torch's code
    runs: every method is mixprec's, and the state is the C++ scaler's. torch's private accessors that
    frameworks use are served from it too: ``_per_optimizer_states``, ``_maybe_opt_step``,
    ``_unscale_grads_``, ``_check_scale_growth_tracker``, ``_get_scale_async``, ``_found_inf_per_device``.
    """

    _overridden: frozenset[str] = frozenset()  # which of _TORCH_HOOKS this class overrides

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._overridden = frozenset(name for name in _TORCH_HOOKS if getattr(cls, name) is not getattr(GradScaler, name))

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
        host_skip: bool = False,
        track_overflows: bool = False,
    ) -> None:
        device = str(torch.device(device))
        # The C++ scaler checks the settings (ValueError).
        options = dict(init_scale=float(init_scale), growth_factor=float(growth_factor),
                       backoff_factor=float(backoff_factor), growth_interval=int(growth_interval),
                       hysteresis=int(hysteresis), consecutive_hysteresis=bool(consecutive_hysteresis),
                       min_scale=float(min_scale), max_scale=None if max_scale is None else float(max_scale),
                       dynamic=bool(dynamic), host_skip=bool(host_skip), track_overflows=bool(track_overflows))
        self._construct(device, bool(enabled), process_group, options)

    # What _construct sets (from the settings, or the C++ object itself): pickles and copies make these again, and
    # take any other attribute (a subclass's) as it is.
    _CONSTRUCTED = frozenset({"_device", "_enabled", "_process_group", "_options", "_host_skip", "_impl", "_fast"})

    def _construct(self, device: str, enabled: bool, process_group: Optional[Any], options: dict[str, Any]) -> None:
        self._device = device
        # torch's rule, as the C++ scaler's (whose warning would reach stderr only): a CUDA scaler where CUDA is
        # not available disables itself, with a warning.
        self._enabled = bool(enabled)
        if self._enabled and device.startswith("cuda") and not torch.cuda.is_available():
            warnings.warn("mixprec.GradScaler is enabled, but CUDA is not available. Disabling.")
            self._enabled = False
        self._process_group = process_group
        self._options = options  # the constructor's settings; the live ones are in the C++ object
        self._host_skip = options["host_skip"]
        o = options
        self._impl = torch.classes.mixprec.GradScaler(
            device, o["init_scale"], o["growth_factor"], o["backoff_factor"], o["growth_interval"], self._enabled,
            o["hysteresis"], o["consecutive_hysteresis"], o["min_scale"], o["max_scale"], o["dynamic"],
        )
        # The same C++ scaler, for the calls every iteration makes: bound with pybind, without TorchScript's
        # method dispatch (a tenth of its host time, warm or after a forward and backward pass).
        self._fast = _C.GradScalerHandle(self._impl)
        self._impl.set_track_overflows(bool(o.get("track_overflows", False)))  # absent from older pickles
        if process_group is not None:  # C++ all-reduces the overflow flags over the same c10d group
            import torch.distributed as dist

            # A rank outside the group has no one to agree with (dist.all_reduce does nothing there either).
            if process_group is not dist.GroupMember.NON_GROUP_MEMBER:
                self._impl.set_process_group(process_group.group_name)

    # -- torch.amp.GradScaler's API ----------------------------------------------------------------------

    @overload
    def scale(self, outputs: Tensor) -> Tensor: ...

    @overload
    def scale(self, outputs: list[Tensor]) -> list[Tensor]: ...

    @overload
    def scale(self, outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]: ...

    @overload
    def scale(self, outputs: Iterable[Tensor]) -> Iterable[Tensor]: ...

    def scale(self, outputs: Union[Tensor, Iterable[Tensor]]) -> Union[Tensor, Iterable[Tensor]]:
        """Multiply outputs (a tensor, or nested lists/tuples of tensors) by the scale; no host sync."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return self._fast.scale(outputs)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, Iterable):
            return map(self.scale, outputs)
        raise ValueError("outputs must be a Tensor or an iterable of Tensors")

    @staticmethod
    def _grads(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor], list[Any]]:
        """The gradients to check as C++ cannot take them (sparse ones' values, DTensors' local shards), their
        parameters, and the process groups the DTensor ones are sharded over (the mesh dimensions not Replicate):
        each rank checks its own shard, and the flag is MAX-reduced over those groups, as torch's scaler reduces it
        for DTensor gradients (DTensor's found_inf handler), so every rank skips alike."""
        grads: list[Tensor] = []
        params: list[Tensor] = []
        groups: list[Any] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                # The groups from the parameters (FSDP2's), not from the gradients present: every rank then makes
                # the same collectives, a rank without gradients this time included.
                for dim in _shard_dims(p):
                    shard_group = p.device_mesh.get_group(dim)
                    if all(shard_group is not g for g in groups):
                        groups.append(shard_group)
                grad = p.grad
                if grad is None:
                    continue
                params.append(p)
                if grad.is_sparse:  # torch's rule, as the C++ path: an fp16 one coalesced first, then its values
                    if grad.dtype == torch.float16:
                        p.grad = grad = grad.coalesce()
                    grads.append(grad._values())
                elif type(grad).__name__ == "DTensor":  # FSDP2: each rank checks its own shard
                    grads.append(grad.to_local())
                else:
                    grads.append(grad)
        return grads, params, groups

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _unscale(self, key: int, optimizer: torch.optim.Optimizer) -> None:
        # C++ reads the gradients off the parameters; DTensor gradients need their local shards from Python.
        all_params = self._params(optimizer)
        if not self._fast.unscale_params_(key, all_params):
            grads, params, groups = self._grads(optimizer)
            self._impl.unscale_grads_(key, grads, params, all_params, [g.group_name for g in groups])

    def _prepare_scaled_step(self, key: int, optimizer: torch.optim.Optimizer,
                             all_params: list[Tensor]) -> tuple[Optional[Tensor], Tensor]:
        """The scaled step's check of gradients C++ cannot read off the parameters (DTensors' local shards)."""
        grads, params, groups = self._grads(optimizer)
        return self._impl.prepare_scaled_step(key, grads, params, all_params, [g.group_name for g in groups])

    @_torch_assertion_types
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and record inf/NaN (one pass per device)."""
        if not self._enabled:
            return
        if not self._fast.has_scale():
            self._check_scale_growth_tracker("unscale_")  # torch's AssertionError, naming unscale_
        if "_unscale_grads_" in self._overridden:
            self._unscale_through_hook(optimizer)
        else:
            self._unscale(id(optimizer), optimizer)

    def _unscale_through_hook(self, optimizer: torch.optim.Optimizer) -> None:
        """torch's ``unscale_``, for a subclass that overrides ``_unscale_grads_``: the flags it returns become
        the optimizer's record. (mixprec unscales 16-bit gradients too, so it passes ``allow_fp16=True``.)"""
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        scale, _ = self._check_scale_growth_tracker("unscale_")
        self._checks_through_hook(optimizer, scale.double().reciprocal().float(), OptState.UNSCALED.value)

    def _checks_through_hook(self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, stage: int) -> None:
        """The subclass's ``_unscale_grads_`` multiplies by ``inv_scale`` (1: a check that writes nothing); its flags
        become the optimizer's record at ``stage``, all-reduced over the process group as the scaler's own are."""
        found_inf = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
        flags = self._unscale_grads_(optimizer, inv_scale, found_inf, True)
        self._impl.record_checks(id(optimizer), stage, _by_device_name(flags))

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> MutableMapping[torch.device, Tensor]:
        """torch's accessor of an optimizer's overflow flags this iteration (empty before its ``unscale_``),
        which distributed training loops all-reduce in place after ``unscale_``: the live mapping of the flags
        themselves, so what is changed in place or assigned is what ``step`` and ``update`` read."""
        if not self._enabled:
            return {}
        # torch returns its record's own dict (creating the record, as its defaultdict does): a flag assigned
        # into it (`flags[device] = reduced`) is what step and update read, as well as one changed in place.
        self._impl.ensure_optimizer_state(id(optimizer))
        return _FoundInfView(self._impl, id(optimizer))  # type: ignore[return-value]

    def _get_scale_async(self) -> Optional[Tensor]:
        """torch's accessor of the scale tensor (no host sync); ``None`` when disabled or before the first
        ``scale()``, as in torch."""
        return self._scale if self._enabled and self._fast.has_scale() else None

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, Tensor]:
        """torch's read-only check of an optimizer's gradients (not unscaled): records and returns its flags."""
        if not self._enabled:
            return {}
        if "_unscale_grads_" in self._overridden:  # torch's route: a check is an unscale by 1 that writes nothing
            scale, _ = self._check_scale_growth_tracker("step")
            ones = torch.ones((), dtype=torch.float32, device=scale.device)
            self._checks_through_hook(optimizer, ones, self._impl.stage(id(optimizer)))
            return self._found_inf_per_device(optimizer)
        # Through the parameters where C++ can read the gradients off them: the check then records which ones
        # overflowed (track_overflows), as the step's own check does.
        all_params = self._params(optimizer)
        handled, _, _ = self._fast.prepare_scaled_step_params(id(optimizer), all_params)
        if not handled:
            self._prepare_scaled_step(id(optimizer), optimizer, all_params)
        return self._found_inf_per_device(optimizer)

    @property
    def _per_optimizer_states(self) -> _PerOptimizerStates:
        """torch's per-optimizer records (stage and flags), live over the C++ scaler's."""
        return _PerOptimizerStates(self._impl)

    @_per_optimizer_states.setter
    def _per_optimizer_states(self, records: Any) -> None:
        # Assigning a fresh defaultdict resets every record, as in torch (frameworks do this to drop an
        # interrupted iteration); records in the assigned mapping are taken over.
        records = dict(records)
        live = _PerOptimizerStates(self._impl)
        live.clear()
        for key, record in records.items():
            live[key] = record

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: Any, *args: Any,
                        **kwargs: Any) -> Any:
        """torch's helper: step unless one of the record's flags is set (a host read, as in torch)."""
        if not sum(v.item() for v in optimizer_state["found_inf_per_device"].values()):
            return optimizer.step(*args, **kwargs)
        return None

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, found_inf: Tensor,
                        allow_fp16: bool) -> dict[torch.device, Tensor]:
        """torch's helper: multiply the optimizer's gradients by ``inv_scale`` and record inf/NaN, one fused
        pass per device. Returns each device's flag (copies of ``found_inf``, as torch's); records nothing
        in the scaler."""
        if not allow_fp16 and any(p.grad is not None and p.grad.dtype == torch.float16
                                  for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("Attempting to unscale FP16 gradients.")  # before anything is touched, as torch
        by_device: dict[torch.device, list[Tensor]] = {}
        local, _, shard_groups = self._grads(optimizer)
        for grad in local:  # complex ones as pairs of reals, as unscale_ takes them
            if grad.is_complex():
                # A conjugate view: its memory (conj() clears the bit, a view); a real factor commutes with it.
                grad = torch.view_as_real(grad.conj() if grad.is_conj() else grad)
            by_device.setdefault(grad.device, []).append(grad)
        flags: dict[torch.device, Tensor] = {}
        for device, grads in by_device.items():
            flag = found_inf.to(device, copy=True).reshape(1)
            ops.unscale_and_check_(grads, flag, inv_scale.to(device).reshape(1))
            flags[device] = flag.reshape(found_inf.shape)
        if shard_groups:  # as torch's DTensor handler: every rank of the shards' groups takes the MAX
            import torch.distributed as dist

            # One reduction of the sum of this rank's flags (0 without gradients: the same collectives on every
            # rank), which every device's flag then takes.
            total = sum((f.to(found_inf.device).reshape(1) for f in flags.values()),
                        torch.zeros(1, dtype=found_inf.dtype, device=found_inf.device))
            for group in shard_groups:
                dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
            for device in flags:
                flags[device] = total.to(device).reshape(found_inf.shape)
        return flags

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[Tensor, Tensor]:
        """torch's helper: the scale and growth tracker tensors, or torch's AssertionError before ``scale()``."""
        if not self._enabled or not self._fast.has_scale():
            raise AssertionError(f"Attempted {funcname} but _scale is None.  This may indicate your script did not "
                                 "use scaler.scale(loss or outputs) earlier in the iteration.")
        return self._scale, self._growth_tracker

    def _found_inf(self, optimizer: torch.optim.Optimizer) -> Tensor:
        key = id(optimizer)
        if not self._fast.is_unscaled(key):
            if self._overridden:  # torch's step() calls unscale_ (a subclass's, which may all-reduce the flags)
                self.unscale_(optimizer)
            else:
                self._unscale(key, optimizer)
        return self._fast.found_inf(key)

    @_torch_assertion_types
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Optional[float]:
        """Step the optimizer unless its gradients overflowed, as ``torch.amp.GradScaler.step`` does.

        * An optimizer with ``_step_supports_amp_scaling`` (torch's fused optimizers; mixprec's with
          ``fused=True``) gets torch's protocol: unless :meth:`unscale_` came first its gradients are only
          checked for inf/NaN (read, not written), then it receives ``optimizer.grad_scale`` (the scale) and
          ``optimizer.found_inf`` (0-dim float32), divides and skips on the device.
        * A mixprec optimizer without that flag is unscaled first, as torch unscales a plain optimizer, and
          then receives ``found_inf`` and skips itself on the device: the same ``.grad`` afterwards as with
          torch's scaler, but no host synchronisation.
        * Any other optimizer is unscaled first and skipped by a host check of the flag."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        if not self._fast.has_scale():
            self._check_scale_growth_tracker("step")  # torch's AssertionError, naming step
        key = id(optimizer)
        self._fast.check_not_stepped(key)
        retval = None
        if getattr(optimizer, "_step_supports_amp_scaling", False) and _takes_grad_scaler(optimizer):
            # torch's older protocol (apex, timm): the optimizer gets the scaler and unscales and checks itself
            # through _get_scale_async / _check_inf_per_device.
            warnings.warn(
                "GradScaler is going to stop passing itself as a keyword argument to the passed optimizer. In the "
                "near future GradScaler registers `grad_scale: Tensor` and `found_inf: Tensor` to the passed "
                "optimizer and let the optimizer use them directly.", FutureWarning, stacklevel=3)  # step's wrapper
            retval = optimizer.step(*args, **{**kwargs, "grad_scaler": self})
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            unscaled = self._fast.is_unscaled(key)
            if not unscaled and self._overridden & {"_check_inf_per_device", "_unscale_grads_"}:
                # torch's route: the subclass's check records the flags (and may all-reduce them), summed here.
                flags = self._check_inf_per_device(optimizer)
                grad_scale = self._scale
                found = sum(f.to(grad_scale.device, non_blocking=True) for f in flags.values()) if flags else \
                    torch.zeros((), dtype=torch.float32, device=grad_scale.device)
            else:
                all_params = [] if unscaled else self._params(optimizer)
                handled, grad_scale, found = self._fast.prepare_scaled_step_params(key, all_params)
                if not handled:
                    grad_scale, found = self._prepare_scaled_step(key, optimizer, all_params)
            if self._host_skip and found.item():
                self._fast.mark_stepped(key)
                return None
            previous = getattr(optimizer, "grad_scale", None)
            if grad_scale is None:  # unscale_() came first: only a scale the user set stays
                grad_scale = previous
            elif previous is not None:  # torch multiplies a user-set grad_scale in
                grad_scale = grad_scale * previous
            retval = self._step_with(optimizer, grad_scale, found, args, kwargs)
        elif "_maybe_opt_step" in self._overridden:  # torch's route, through the subclass's decision
            self._found_inf(optimizer)  # unscaled first, as torch's step does
            retval = self._maybe_opt_step(optimizer, self._per_optimizer_states[key], *args, **kwargs)
        elif getattr(optimizer, "_mixprec_skips_on_device", False) and not self._host_skip:
            retval = self._step_with(optimizer, None, self._found_inf(optimizer), args, kwargs)
        elif not self._found_inf(optimizer).item():  # a plain optimizer: the host decides, as in torch
            retval = optimizer.step(*args, **kwargs)
        self._fast.mark_stepped(key)
        return retval

    @staticmethod
    def _step_with(optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor], found_inf: Tensor,
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """optimizer.step() with torch's ``grad_scale`` / ``found_inf`` attributes set for its duration."""
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            return optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale  # type: ignore[attr-defined]
            del optimizer.found_inf  # type: ignore[attr-defined]

    @_torch_assertion_types
    def update(self, new_scale: Optional[Union[float, Tensor]] = None) -> None:
        """Move the scale from this iteration's overflow flags (on device), or set it to ``new_scale``."""
        if not self._enabled:
            return
        if new_scale is None:
            if not self._fast.has_scale():
                self._check_scale_growth_tracker("update")  # torch's AssertionError, naming update
            self._fast.update()
        elif isinstance(new_scale, Tensor):
            # torch's checks and their exception type (it copies any dtype into the fp32 scale).
            reason = ("new_scale should be a float or a 1-element torch.cuda.FloatTensor or torch.FloatTensor "
                      "with requires_grad=False.")
            if (new_scale.device.type != torch.device(self._device).type or new_scale.numel() != 1
                    or new_scale.requires_grad):
                raise AssertionError(reason)
            # One read of the value (as before); update_to records this step's overflow at the old scale first.
            self._impl.update_to(float(new_scale.reshape(()).item()))
        else:
            self._impl.update_to(float(new_scale))

    def get_scale(self) -> float:
        """The current scale (a host sync); ``init_scale`` before first use, 1.0 when disabled."""
        return float(self._impl.get_scale())

    def is_enabled(self) -> bool:
        """Whether this scaler scales at all (``enabled`` and, for CUDA, a GPU present)."""
        return self._enabled

    # Getters read the C++ options (no device access); setters take effect at the next update().
    def get_growth_factor(self) -> float:
        """The scale growth factor."""
        return float(self._impl.get_growth_factor())

    def set_growth_factor(self, new_factor: float) -> None:
        """Set the scale growth factor (>= 1; 1 holds the scale where it is, a cap)."""
        self._impl.set_growth_factor(float(new_factor))

    def get_backoff_factor(self) -> float:
        """The scale backoff factor."""
        return float(self._impl.get_backoff_factor())

    def set_backoff_factor(self, new_factor: float) -> None:
        """Set the scale backoff factor (in (0, 1]; 1 holds the scale where it is, a floor)."""
        self._impl.set_backoff_factor(float(new_factor))

    def get_growth_interval(self) -> int:
        """The number of clean steps between scale growths."""
        return int(self._impl.get_growth_interval())

    def set_growth_interval(self, new_interval: int) -> None:
        """Set the number of clean steps between scale growths (> 0)."""
        self._impl.set_growth_interval(int(new_interval))

    # -- overflow attribution (mixprec) -------------------------------------------------------------------

    def set_track_overflows(self, enabled: bool) -> None:
        """Turn overflow tracking on or off (from the next unscale or step); off drops what was recorded."""
        self._options["track_overflows"] = bool(enabled)
        self._impl.set_track_overflows(bool(enabled))

    def last_overflow(self, model: Optional[torch.nn.Module] = None) -> Optional[OverflowReport]:
        """The last overflowing step since tracking began, naming the offending parameters from
        ``model.named_parameters()`` (else ``param[i]``: i counts the parameters of that parameter's optimizer
        in the order the scaler first saw them with a gradient, so with several optimizers positions repeat:
        pass the model); ``None`` when no tracked step overflowed or tracking is off. Reads a small record
        back from the device: a host sync, only when called."""
        if not self._enabled:
            return None
        names: list[str] = []
        params: list[Tensor] = []
        if model is not None:
            for name, p in model.named_parameters():
                names.append(name)
                params.append(p)
        found = self._impl.last_overflow(names, params)
        if found is None:
            return None
        step, scale, num_tensors, source_names, max_abs, text = found
        return OverflowReport(int(step), float(scale), int(num_tensors), list(zip(source_names, max_abs)), text)

    def _get_growth_tracker(self) -> int:
        return int(self._impl.state_dict()["_growth_tracker"]) if self._enabled else 0

    def _lazy_init_scale_growth_tracker(self, dev: Any = None) -> None:
        """torch's private hook (Accelerate calls it after loading a state): create the scale tensors now, on
        ``dev`` (default: the constructor's device). As torch's, it refuses when they exist."""
        if self._enabled:
            assert not self._fast.has_scale(), "_growth_tracker initialized before _scale"
            self._impl.init_scale_on(str(torch.device(self._device if dev is None else dev)))

    def _torch_attribute(self, name: str) -> None:
        if not self._enabled:  # torch sets none of its scaling attributes on a disabled scaler
            raise AttributeError(f"'GradScaler' object has no attribute '{name}'")

    @property
    def _scale(self) -> Optional[Tensor]:
        """The scale tensor on its device, or None before the first ``scale()`` (torch's attribute)."""
        self._torch_attribute("_scale")
        return self._impl.scale_tensor() if self._fast.has_scale() else None

    @_scale.setter
    def _scale(self, value: Optional[Tensor]) -> None:
        # Code written for torch assigns it (a floor under the scale, a reset to None): the scaler takes that
        # one-element float32 tensor's memory as its scale; None starts again from _init_scale at the next scale().
        self._torch_attribute("_scale")
        self._impl.set_scale_tensor(value)

    @property
    def _growth_tracker(self) -> Optional[Tensor]:
        """The growth tracker tensor, or None before the first ``scale()`` (torch's attribute)."""
        self._torch_attribute("_growth_tracker")
        return self._impl.growth_tracker_tensor() if self._fast.has_scale() else None

    @_growth_tracker.setter
    def _growth_tracker(self, value: Optional[Tensor]) -> None:
        self._torch_attribute("_growth_tracker")
        self._impl.set_growth_tracker_tensor(value)

    # torch's plain attributes for the settings, read and written through the C++ options.
    def _setting(name: str, get: Callable[[Any], Any], put: Callable[[Any, Any], None]) -> Any:  # noqa: N805
        def fget(self: "GradScaler") -> Any:
            self._torch_attribute(name)
            return get(self)

        def fset(self: "GradScaler", value: Any) -> None:
            self._torch_attribute(name)
            put(self, value)

        return property(fget, fset, doc=f"torch's attribute {name}, over the C++ options.")

    # As torch: _init_scale takes effect when the scale is created (the first scale()), not on an existing one.
    _init_scale = _setting("_init_scale", lambda self: float(self._impl.get_init_scale()),
                           lambda self, value: self._impl.set_init_scale(float(value)))
    _growth_factor = _setting("_growth_factor", get_growth_factor, set_growth_factor)
    _backoff_factor = _setting("_backoff_factor", get_backoff_factor, set_backoff_factor)
    _growth_interval = _setting("_growth_interval", get_growth_interval, set_growth_interval)
    del _setting

    @property
    def _init_growth_tracker(self) -> int:
        """torch's attribute: the count the growth tracker starts from (0, or the one a state dict loaded)."""
        self._torch_attribute("_init_growth_tracker")
        return int(self._impl.get_init_growth_tracker())

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
        for key in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"):
            if key not in state_dict:
                raise KeyError(key)  # torch's loader reads these five by key
        numeric = {}
        for key, value in state_dict.items():
            if key == "max_scale" and value is None:
                numeric[key] = math.inf
            elif isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1):
                numeric[key] = float(value)  # numbers of any kind (NumPy's too) and one-element tensors
            elif key in _STATE_KEYS:  # named, rather than reported missing by the C++ loader
                raise ValueError(f"mixprec.GradScaler.load_state_dict: {key!r} must be a number (or a one-element "
                                 f"tensor), got {value!r}")
        self._impl.load_state_dict(numeric)

    # -- pickling and copying (torch.amp.GradScaler pickles between iterations) ------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self._enabled and self._impl.in_iteration():
            raise AssertionError(
                "A GradScaler instance may only be pickled at the beginning of an iteration, or at the end after "
                "scaler.update().")
        group = self._process_group
        if group is not None:
            import torch.distributed as dist

            if group is not dist.group.WORLD:
                raise TypeError("a mixprec.GradScaler with a process_group other than torch.distributed.group.WORLD "
                                "cannot be pickled (process groups are not picklable); pass the group again after "
                                "loading")
            group = "WORLD"
        # A subclass's own attributes travel too, as they do with torch's scaler (whose __getstate__ is the
        # instance's __dict__).
        extra = {k: v for k, v in self.__dict__.items() if k not in self._CONSTRUCTED}
        return {"device": self._device, "enabled": self._enabled, "process_group": group,
                "options": self._options, "state": self.state_dict(), "extra": extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        group = state["process_group"]
        if group == "WORLD":
            import torch.distributed as dist

            group = dist.group.WORLD
        self._construct(state["device"], state["enabled"], group, state["options"])  # where there is no GPU: disabled
        # A subclass's attributes before its state: its load_state_dict override may read them.
        self.__dict__.update(state.get("extra", {}))  # absent from older pickles
        if self._enabled and state["state"]:
            self.load_state_dict(state["state"])

    def __deepcopy__(self, memo: dict[int, Any]) -> "GradScaler":
        """An independent scaler in the same state (sharing the process group, which is not copied)."""
        if self._enabled and self._impl.in_iteration():
            raise AssertionError(
                "A GradScaler instance may only be pickled at the beginning of an iteration, or at the end after "
                "scaler.update().")
        copy = type(self).__new__(type(self))  # a subclass stays one, with its overrides
        memo[id(self)] = copy
        copy._construct(self._device, self._enabled, self._process_group, dict(self._options))
        for key, value in self.__dict__.items():  # a subclass's own attributes (before its state, as in pickles)
            if key not in self._CONSTRUCTED:
                copy.__dict__[key] = deepcopy(value, memo)
        if self._enabled:
            copy.load_state_dict(self.state_dict())
        return copy
