"""Master-weight Adam and AdamW as ``torch.optim.Optimizer`` subclasses, on mixprec's fused step.

The logic is C++'s: ``mixprec::optim::AdamCore`` (reached as ``torch.classes.mixprec.AdamCore``) checks the
options, applies the master-mode rule, creates and converts state, derives stochastic-rounding seeds,
groups parameters by (device, master mode) and launches one fused ``adam_step_`` per bucket, which reads
the gradients once, updates fp32 master weights (or exact bf16 remainders) and moments, and writes the
16-bit model parameters back, in one pass over memory. The same core drives ``mixprec::optim::AdamW`` in
C++. It caches each param group's flattened lists across steps, so a step costs one call into C++ per
param group; this file keeps torch's contract around it (``param_groups`` that schedulers edit,
``optimizer.state`` holding the very tensors the core updates, ``add_param_group``, state dicts). Everything the step needs lives in ``optimizer.state``
(``step``, ``exp_avg``, ``exp_avg_sq``, with AMSGrad ``max_exp_avg_sq``, ``master`` or ``remainder``), so
``state_dict()`` /
``load_state_dict()`` resume bit for bit; a ``torch.optim.AdamW`` state dict loads too (masters are then
taken from the parameters).

Under a loss scaler the optimizer follows torch's protocol for fused optimizers: it reads ``grad_scale``
and ``found_inf`` on the device, divides the gradients inside the fused step (leaving them unscaled in
``.grad``, as torch's fused Adam does) and writes nothing on an overflowing step, with no host
synchronisation. Both scalers hand over both when the optimizer is built with ``fused=True`` (which sets
``_step_supports_amp_scaling``, as torch's fused optimizers do). Otherwise they unscale ``.grad`` first, as
torch unscales a plain optimizer; then ``mixprec.GradScaler`` still hands over ``found_inf`` (the skip stays
on the device) and ``torch.amp.GradScaler`` skips on the host.

Stochastic rounding without a ``seed`` draws from torch's default generator, except under an initialized
``torch.distributed`` process group of more than one rank: there a group with ``rounding="stochastic"`` and
no seed takes seed 0 (:data:`REPLICA_SEED`; when it is added, or at its next step if it was loaded or built
before ``init_process_group``), so that data-parallel replicas (DDP; FSDP2's replicas under HSDP) round alike
whatever torch seed each rank set (nanoGPT seeds ``1337 + rank``). Pass ``seed`` to vary the draws between
runs. Ranks that hold different parameters (ZeRO, pipeline stages) then draw the same numbers for their
different parameters, as they would with one torch seed.

Gradients may be fp32 for 16-bit parameters (:class:`mixprec.nn.Linear` keeps them so): the step reads any
mix of fp32/fp16/bf16 gradients.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C

__all__ = ["Adam", "AdamW", "REPLICA_SEED"]

#: The seed a stochastic-rounding param group without one takes when it is added under an initialized process
#: group of more than one rank: the same on every rank, with no collective (see the module docstring).
REPLICA_SEED = 0


def _check_group(core: Any, group: dict[str, Any], torch_keys: bool = True) -> None:
    """The options of a param group as a step checks them (mixprec::optim::AdamCore's rule, which the C++
    optimizer applies when a group is added or loaded too). ``torch_keys=False``: mixprec's own keys only, as
    groups are added and loaded (torch takes any betas there; a step refuses what it cannot run)."""
    seed, rng_calls = group["seed"], group["rng_calls"]
    for value, name in ((seed, "seed"), (rng_calls, "rng_calls")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    beta1 = _scalar(group["betas"][0], "betas[0]") if torch_keys else 0.0
    core.check_step_options(beta1, group["master_weights"], _dtype(group["moment_dtype"]), group["rounding"],
                            None if seed is None else int(seed), int(rng_calls))


def _ranks_replicate() -> bool:
    """Whether this process is one of several ranks of an initialized torch.distributed job (whose replicas must
    round alike)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

_CORE_KEYS = ("step", "exp_avg", "exp_avg_sq", "master", "remainder", "max_exp_avg_sq")
# The param-group keys mixprec adds to torch's Adam ones.
_OWN_KEYS = ("master_weights", "moment_dtype", "rounding", "seed", "rng_calls")


def _local(t: Tensor) -> Tensor:
    """The shard a rank holds of a DTensor (FSDP2's fully_shard params and grads); other tensors as they are.

    The fused step works element-wise, so updating each rank's shard in place is the whole update."""
    if type(t).__name__ == "DTensor":
        return t.to_local()
    return t


def _shard_dims(t: Tensor) -> tuple[int, ...]:
    """The mesh dimensions a DTensor is sharded over (placements that are not Replicate); () for other tensors.
    The optimizer's rounding keys and the scaler's overflow reduction both follow them."""
    if type(t).__name__ != "DTensor":
        return ()
    return tuple(dim for dim, placement in enumerate(t.placements) if not placement.is_replicate())


def _shard_index(params: Sequence[Tensor]) -> int:
    """Which shard this rank holds of the group's parameters: its coordinate over the mesh dimensions that shard
    them (not those that replicate, whose ranks must round alike), as one number. The step's stochastic-rounding
    draws depend on it, so the shards of a parameter do not round alike. One number serves the whole group's
    launches, so it is used only where it holds for every parameter: all DTensors on one mesh, sharded over the
    same dimensions (FSDP2's layout). Otherwise (a replicated parameter beside a sharded one, as in tensor
    parallelism, or a plain tensor FSDP2 ignores) 0 on every rank: replicas stay alike, shards draw alike."""
    mesh, sharded = None, None
    for p in params:
        if type(p).__name__ != "DTensor":
            return 0
        dims = _shard_dims(p)
        if mesh is None:
            mesh, sharded = p.device_mesh, dims
        elif p.device_mesh != mesh or dims != sharded:
            return 0
    if mesh is None:
        return 0
    coordinate = mesh.get_coordinate() or []
    index = 0
    for dim in sharded or ():
        index = index * mesh.size(dim) + coordinate[dim]
    return index


def _narrow_remainder(value: Tensor) -> Tensor:
    """A remainder state that ``state_dict()`` widened to int32 (a sharded one, so collectives can gather it),
    back to the int16 the step keeps; values outside int16 are no remainders (a wrong tensor), and refused."""
    local = value.to_local() if hasattr(value, "to_local") else value
    if local.numel() and (int(local.min()) < -32768 or int(local.max()) > 32767):
        raise ValueError("mixprec.optim: a remainder state widened to int32 holds values outside int16's range; it "
                         "is not a remainder of this optimizer's")
    return value.to(torch.int16)


def _sharded_like(param: Tensor, local: Tensor) -> Tensor:
    """``local`` (a state tensor of ``param``'s local shard) as a DTensor sharded as ``param`` is."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _scalar(value: Union[float, Tensor], name: str) -> float:
    """A hyper-parameter given as a number or a one-element tensor (torch accepts both for betas). Anything
    else is refused, as torch's comparisons refuse it: a string (``lr: 1e-3`` read by YAML) would otherwise be
    stored as given and fail much later in a scheduler's arithmetic."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return float(value.detach().cpu())
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element Tensor, got {type(value).__name__} {value!r}")
    return float(value)


def _beta(value: Union[float, Tensor]) -> Union[float, Tensor]:
    """One of ``betas`` as torch's Adam stores it: a number as given, a one-element tensor as a 0-dim one (the
    same memory, so an in-place change applies)."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


def _dtype(value: Union[torch.dtype, str]) -> torch.dtype:
    """``moment_dtype`` as a ``torch.dtype``. State dicts carry it as a string (``"torch.bfloat16"``):
    torch.distributed.checkpoint's state-dict utilities (full or CPU-offloaded optimizer state dicts, as
    FSDP2 saving uses them) accept tensors, numbers, strings and containers only."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16 (or their names), got {value!r}")
    return dtype


class _Tracker:
    """Set when anything in ``optimizer.state`` is edited from outside, so the next step hands the state to
    the C++ core again (the core keeps the same tensors; this is how it learns of replaced ones)."""

    __slots__ = ("dirty",)

    def __init__(self) -> None:
        self.dirty = True


class _Marking:
    """Removals that mark the tracker, shared by the two dict types below (which hold ``_tracker``)."""

    __slots__ = ()
    _tracker: _Tracker

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)  # type: ignore[misc]
        self._tracker.dirty = True

    def pop(self, *args: Any) -> Any:
        self._tracker.dirty = True
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        self._tracker.dirty = True
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        self._tracker.dirty = True
        super().clear()  # type: ignore[misc]


class _ParamState(_Marking, dict):
    """One parameter's state: a dict that marks the tracker on every edit. Pickles and copies as a dict."""

    __slots__ = ("_tracker",)

    def __init__(self, tracker: _Tracker, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tracker = tracker

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._tracker.dirty = True

    def __ior__(self, other: Any) -> "_ParamState":
        self.update(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._tracker.dirty = True
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._tracker.dirty = True
        return super().setdefault(key, default)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


class _StateMap(_Marking, defaultdict):
    """``optimizer.state``: torch's ``defaultdict(dict)`` keyed by parameter, whose edits mark the tracker.
    Pickles and copies as a plain ``defaultdict(dict)``."""

    __slots__ = ("_tracker",)

    def __init__(self, tracker: _Tracker, items: Any = ()) -> None:
        super().__init__(dict)
        self._tracker = tracker
        for key, value in dict(items).items():
            dict.__setitem__(self, key, _ParamState(tracker, value))

    def __missing__(self, key: Any) -> _ParamState:
        value = _ParamState(self._tracker)  # a new empty state changes nothing the core holds
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, _ParamState(self._tracker, value))
        self._tracker.dirty = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self) -> Any:
        return (defaultdict, (dict,), None, None, ((k, dict(v)) for k, v in self.items()))


def _as_tensor(value: Any) -> Optional[Tensor]:
    """A state entry as the core takes it: a tensor (a DTensor's local shard), a number as a tensor, or None."""
    if value is None or isinstance(value, Tensor):
        return None if value is None else _local(value)
    return torch.tensor(float(value), dtype=torch.float32)


class _MixprecAdam(torch.optim.Optimizer):
    """The Python front door of the C++ Adam core. The public classes also derive from torch's own class
    (``isinstance(opt, torch.optim.AdamW)`` holds, as code written for torch checks); nothing of torch's
    step is used: this class comes first in their MRO and replaces it."""

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
        moment_dtype: Union[torch.dtype, str] = torch.float32,
        rounding: str = "nearest",
        seed: Optional[int] = None,
        rng_calls: int = 0,
    ) -> None:
        moment_dtype = _dtype(moment_dtype)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        for value, name in ((lr, "lr"), (eps, "eps"), (weight_decay, "weight_decay")):
            _scalar(value, name)
        if isinstance(rng_calls, bool) or not isinstance(rng_calls, numbers.Integral):  # its range: the core's
            raise ValueError(f"rng_calls must be a non-negative int, got {rng_calls!r}")
        # Kept as given (tensors too, as torch keeps them: a later in-place change applies); read every step.
        beta_values = (_scalar(betas[0], "betas[0]"), _scalar(betas[1], "betas[1]"))
        if differentiable:
            raise ValueError("differentiable=True is not supported: mixprec's fused step runs outside autograd; use "
                             "torch.optim with differentiable=True to differentiate through the update")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        # The core must exist before torch's __init__ assigns self.state (see __setattr__).
        self.__dict__["_tracker"] = _Tracker()
        self._new_core()
        # torch checks the constructor's values only (a Tensor lr too, read on the host once, as torch reads it).
        self._core.check_options(float(lr), *beta_values, float(eps),
                                 float(weight_decay), master_weights, moment_dtype, rounding, seed, int(rng_calls))
        defaults = dict(
            lr=lr,
            betas=(_beta(betas[0]), _beta(betas[1])),  # a tuple of two, as torch stores it (not a list or config)
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=bool(amsgrad),
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
            rng_calls=int(rng_calls),
        )
        # Optimizer's own __init__, not the torch class's next in the MRO (which would validate and set its own
        # defaults).
        torch.optim.Optimizer.__init__(self, params, defaults)
        # As torch's fused optimizers: only with fused=True does the optimizer tell *any* scaler
        # (torch.amp.GradScaler included) that it takes grad_scale / found_inf itself. Frameworks key on this
        # flag (Lightning then refuses gradient clipping, Accelerate cannot see skipped steps), so it stays off
        # by default; mixprec.GradScaler still skips these on the device (_mixprec_skips_on_device).
        self._step_supports_amp_scaling = bool(fused)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state" and "_tracker" in self.__dict__:  # torch's __init__, or a user resetting the state
            value = _StateMap(self._tracker, value)
            self._forget_cache()  # the old state's tensors are freed now, not at the next step
        super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, deepcopy and torch's load_state_dict come through here: the core takes the state afresh."""
        try:
            super().__setstate__(state)  # torch's Adam.__setstate__ may refuse a state (a row without "step")
        finally:
            # Whatever happened, optimizer.state stays tracked and the core takes it afresh at the next step.
            if "_core" not in self.__dict__:  # a pickle carries no core
                self._new_core()
            tracker = self.__dict__.setdefault("_tracker", _Tracker())
            self.__dict__["state"] = _StateMap(tracker, self.__dict__.get("state", {}))
            self._forget_cache()
        # torch's Adam.__setstate__ (above) filled its keys missing from older pickles and state dicts with torch's
        # defaults, and AdamW's forced decoupled weight decay; mixprec's own keys, which a torch.optim state dict
        # lacks, take this optimizer's settings (after the user's load pre-hooks, whatever dict they produced).
        for group in self.param_groups:
            for key in _OWN_KEYS:
                if key not in group:
                    group[key] = self.defaults[key]
            group["moment_dtype"] = _dtype(group["moment_dtype"])  # state dicts carry its name
        # torch's __getstate__ keeps only defaults, state and param groups: restore the scaling flag too.
        self.__dict__.setdefault("_step_supports_amp_scaling", bool(self.defaults.get("fused")))

    def _new_core(self) -> None:
        """A C++ core (state held for no parameter yet), and its handle for the per-group step: bound with pybind,
        without TorchScript's method dispatch (about 2.5 us a call warm, 40 us after a forward and backward pass
        have evicted it from the caches) and its conversion of the parameter list into IValues."""
        core = torch.classes.mixprec.AdamCore()
        self.__dict__["_core"] = core
        self.__dict__["_core_fast"] = _C.AdamCoreHandle(core)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``. Under an initialized process group of more than one
        rank, a group with ``rounding="stochastic"`` and no seed takes :data:`REPLICA_SEED` (replicas would
        otherwise round with each rank's torch generator and drift apart)."""
        if isinstance(param_group, dict):  # torch's own checks come next; ours first, so nothing is added
            _check_group(self._core, {**self.defaults, **param_group}, torch_keys=False)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["rounding"] == "stochastic" and group["seed"] is None and _ranks_replicate():
            group["seed"] = REPLICA_SEED  # also applied at step, to groups loaded or built before init
        self._forget_cache()

    def _forget_cache(self) -> None:
        """Hand all state to the core again at the next step and drop its cached lists (and the state
        tensors they hold): after anything replaced state wholesale."""
        self._tracker.dirty = True
        self._core.invalidate()

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, with plain dicts for the per-parameter states."""

        def plain(_: Any, out: dict[str, Any]) -> None:
            # Prepended: the user's post-hooks see (and may replace) the state dict in its final form.
            out["state"] = {k: dict(v) if isinstance(v, _ParamState) else v for k, v in out["state"].items()}
            for st in out["state"].values():
                # A sharded (DTensor) int16 remainder goes out widened to int32: neither gloo nor NCCL moves
                # int16, and torch.distributed.checkpoint's full state dicts gather it (load narrows it back).
                value = st.get("remainder")
                if type(value).__name__ == "DTensor" and value.dtype == torch.int16:
                    st["remainder"] = value.to(torch.int32)
            for group in out["param_groups"]:  # torch's packed copies: the live groups keep their dtype
                if isinstance(group.get("moment_dtype"), torch.dtype):
                    group["moment_dtype"] = str(group["moment_dtype"])

        handle = self.register_state_dict_post_hook(plain, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping mixprec's state tensors in their own dtypes.

        torch's loader casts every floating-point state tensor to its parameter's dtype, which would
        round fp32 masters and moments of a bf16 model to bf16; here they come back exactly as saved.
        A ``torch.optim.Adam``/``AdamW`` state dict loads as well: missing masters are taken from the
        parameters at the next step."""
        saved: dict[str, Any] = {}

        def capture(_: Any, sd: dict[str, Any]) -> None:
            # Appended: runs after the user's pre-hooks, on the state dict they produced. Everything a step or
            # restore would refuse is refused here, before torch's loader replaces anything.
            for group in sd["param_groups"]:
                _check_group(self._core, {**self.defaults, **group}, torch_keys=False)
            saved["ids"] = [pid for g in sd["param_groups"] for pid in g["params"]]
            saved["state"] = {pid: dict(sd["state"][pid]) for pid in saved["ids"] if pid in sd["state"]}
            for st in saved["state"].values():  # narrowed (and checked) once, into this copy of the row
                value = st.get("remainder")
                if isinstance(value, Tensor) and value.dtype == torch.int32:
                    st["remainder"] = _narrow_remainder(value)

        def restore(_: Any) -> None:
            # Prepended: the user's post-hooks see the state as saved, not torch's casts of it.
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip(saved["ids"], params):
                for key, value in saved["state"].get(pid, {}).items():
                    if isinstance(value, Tensor):  # one copy, on the parameter's device
                        self.state[p][key] = value.to(device=p.device, copy=True)

        pre = self.register_load_state_dict_pre_hook(capture)
        post = self.register_load_state_dict_post_hook(restore, prepend=True)
        # torch's loader replaces param_groups and state before its __setstate__ can refuse a row (one without
        # "step"): what was there comes back then, as a refused load leaves the optimizer as it was.
        old_groups, old_state = self.param_groups, self.__dict__["state"]
        try:
            # As given, other top-level keys included (torch hands them to the pre-hooks); a torch dict's groups
            # lack mixprec's keys, which __setstate__ fills in.
            super().load_state_dict(state_dict)
        except BaseException:
            self.__dict__["param_groups"] = old_groups
            self.__dict__["state"] = old_state
            self._forget_cache()
            raise
        finally:
            pre.remove()
            post.remove()

    # -- the core and the state it shares -------------------------------------------------------------------

    def _push_state(self) -> None:
        """Hand every parameter's state in ``optimizer.state`` to the core (after it was edited from outside)."""
        params = [p for g in self.param_groups for p in g["params"]]
        rows = [dict.get(self.state, p) or {} for p in params]
        for st in rows:
            for key in _CORE_KEYS:
                value = st.get(key)
                if value is not None and not isinstance(value, Tensor):
                    # A number (a step count from an old checkpoint, or set by hand) becomes the very tensor the
                    # core advances, so optimizer.state and the next state_dict() follow the steps.
                    dict.__setitem__(st, key, _as_tensor(value))
        self._core.set_states(params, *([_as_tensor(st.get(key)) for st in rows] for key in _CORE_KEYS))
        self._tracker.dirty = False

    def _mirror(self, p: Tensor) -> None:
        """Copy into ``optimizer.state[p]`` the state tensors the core created or replaced for ``p``.

        The core steps a DTensor parameter's local shard, so its state is local shards too; here they are
        wrapped as DTensors sharded like ``p`` (views of the same memory; the step count stays a plain tensor,
        as torch keeps it), as torch.optim's state of an FSDP2 parameter is: torch.distributed.checkpoint then
        saves and gathers each rank's part instead of taking one rank's shard for the whole tensor."""
        st = self.state[p]
        new = self._core.state_of(p)
        sharded = type(p).__name__ == "DTensor"
        for key in _CORE_KEYS:
            value = new.get(key)
            if value is None:
                dict.pop(st, key, None)
            else:
                if sharded and key != "step":
                    value = _sharded_like(p, value)
                dict.__setitem__(st, key, value)

    def _sharding(self, index: int, params: list[Tensor]) -> Optional[int]:
        """None for a group without DTensors; for one with them (whose local shards the step must hand over),
        the shard index its rounding keys take (_shard_index). Cached per list: not a per-parameter walk at
        every step."""
        cache: dict[int, tuple[Any, int, Optional[int]]] = self.__dict__.setdefault("_sharded_cache", {})
        hit = cache.get(index)
        if hit is None or hit[0] is not params or hit[1] != len(params):
            sharded = any(type(p).__name__ == "DTensor" for p in params)
            hit = cache[index] = (params, len(params), _shard_index(params) if sharded else None)
        return hit[2]

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
        if found_inf is not None and not isinstance(found_inf, Tensor):
            # torch's scaler hands an optimizer without gradients this iteration the sum of no flags (the
            # number 0); a number is read on the host, as torch's fused optimizers take it.
            if found_inf:
                return loss
            found_inf = None
        if self._tracker.dirty:
            self._push_state()
        core, fast = self._core, self._core_fast
        groups = self.param_groups
        if len(groups) > 1:  # every group's options before any group steps: a refused step writes nothing
            for group in groups:
                _check_group(core, group)
        for index, group in enumerate(groups):
            params = group["params"]
            local_params = grads = None
            shard = self._sharding(index, params)
            if shard is not None:
                local_params = [_local(p) for p in params]
                grads = [None if p.grad is None else _local(p.grad) for p in params]
            lr, lr_tensor = group["lr"], None
            if isinstance(lr, Tensor):
                if lr.device.type == "cpu":
                    lr = float(lr)  # a host tensor: reading it costs no device synchronisation
                else:  # on a device: the kernel reads it there
                    lr, lr_tensor = 0.0, lr.detach()
            beta1, beta2 = group["betas"]
            seed = group["seed"]
            if seed is None and group["rounding"] == "stochastic" and _ranks_replicate():
                # A group that got here without add_param_group's rule: loaded from a checkpoint without a
                # seed (a torch AdamW's, a single process's), or built before init_process_group.
                seed = group["seed"] = REPLICA_SEED
            try:
                options = (float(lr), lr_tensor, _scalar(beta1, "betas[0]"), _scalar(beta2, "betas[1]"),
                           float(group["eps"]), float(group["weight_decay"]), bool(group["decoupled_weight_decay"]),
                           bool(group["amsgrad"]), bool(group["maximize"]), group["master_weights"],
                           _dtype(group["moment_dtype"]), group["rounding"], None if seed is None else int(seed),
                           int(group["rng_calls"]), grad_scale, found_inf)
                if shard is None:
                    rng_calls, changed = fast.step_group(index, params, *options)
                else:  # DTensor parameters: their local shards and gradients, handed over as lists
                    rng_calls, changed = core.step_group(index, params, local_params, grads, *options, shard)
            except Exception:
                # State the core may have created before the error never reached optimizer.state: the next
                # step starts again from what optimizer.state holds.
                self._forget_cache()
                raise
            if seed is not None:
                group["rng_calls"] = rng_calls
            for i in changed:
                self._mirror(params[i])
        return loss


class AdamW(_MixprecAdam, torch.optim.AdamW):
    """AdamW (decoupled weight decay) with master weights, a drop-in for ``torch.optim.AdamW``.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW``. ``lr`` may be a Tensor: on
            the parameters' device it is read there (no host sync); on the CPU its value is read on the host.
        amsgrad: as torch: the step divides by the running maximum of the second moment, kept in
            ``state["max_exp_avg_sq"]`` (the moments' dtype), updated inside the same fused pass.
        foreach, capturable: accepted and recorded as torch does; the step is always one fused kernel per
            (device, master mode) that never synchronises with the host, so they change nothing.
        fused: ``True`` also sets ``_step_supports_amp_scaling``, as torch's fused optimizers do:
            ``torch.amp.GradScaler`` then hands ``grad_scale`` / ``found_inf`` to the step instead of unscaling
            and checking on the host. ``mixprec.GradScaler`` skips the step on the device (no host sync)
            whatever ``fused`` says. Off by default, since frameworks key on the flag (Lightning refuses
            gradient clipping with it, Accelerate cannot see skipped steps).
        differentiable: only ``False``: the fused step runs outside autograd.
        decoupled_weight_decay: only ``True`` (``Adam(decoupled_weight_decay=True)`` is AdamW, as in torch);
            accepted so that ``AdamW(params, **opt.defaults)`` rebuilds an optimizer, whose defaults hold it.
        master_weights: ``"auto"`` (fp32 masters for fp16/bf16 params, none for fp32 params),
            ``"fp32"``, ``"remainder"`` (bf16 params + int16 remainders: exact fp32 at 4 bytes per
            parameter) or ``"none"`` (16-bit params updated in place, rounded with ``rounding``). float64 params
            are always their own masters and take torch's float64 step, with float64 moments, as in torch.
            complex64 / complex128 params are stepped as torch steps them, as pairs of independent reals, with
            complex moments (complex64 ones need ``moment_dtype=torch.float32``).
        moment_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (or their names; ``state_dict()`` holds
            the name, ``"torch.bfloat16"``, as torch.distributed.checkpoint needs); moments never take a 16-bit
            parameter's dtype (float64 params keep float64 moments).
        rounding: how 16-bit params are written: ``"nearest"`` or ``"stochastic"`` (unbiased; with
            ``master_weights="none"`` it keeps updates smaller than half an ulp alive).
        seed: key for stochastic rounding; each step draws fresh numbers from (seed, step count), so
            a resumed run repeats them. ``None`` draws from torch's default generator; under an initialized
            process group of more than one rank it means :data:`REPLICA_SEED`, so replicas round alike.
        rng_calls: steps already drawn with ``seed`` (kept in each group and its state dict; given here so
            that ``type(opt)(params, **opt.defaults)`` rebuilds an optimizer as it does for torch's).
    """

    _decoupled = True

    # Every keyword spelled out, as torch's signature spells them: code inspects it (nanoGPT passes fused=True only
    # when inspect.signature(AdamW).parameters has "fused").
    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = True, master_weights: str = "auto",
                 moment_dtype: Union[torch.dtype, str] = torch.float32, rounding: str = "nearest",
                 seed: Optional[int] = None, rng_calls: int = 0) -> None:
        if decoupled_weight_decay is not True:  # accepted for AdamW(**opt.defaults), whose defaults hold it
            raise TypeError("AdamW's weight decay is always decoupled (use Adam for L2 weight decay); "
                            "decoupled_weight_decay=False is not an AdamW option")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights, moment_dtype=moment_dtype,
                         rounding=rounding, seed=seed, rng_calls=rng_calls)


class Adam(_MixprecAdam, torch.optim.Adam):
    """Adam with master weights, a drop-in for ``torch.optim.Adam``: L2 weight decay added to the gradient,
    or decoupled (AdamW) with ``decoupled_weight_decay=True`` as in torch.

    Same options as :class:`AdamW`; ``weight_decay`` defaults to 0 as in torch.
    """

    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False, master_weights: str = "auto",
                 moment_dtype: Union[torch.dtype, str] = torch.float32, rounding: str = "nearest",
                 seed: Optional[int] = None, rng_calls: int = 0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
                         moment_dtype=moment_dtype, rounding=rounding, seed=seed, rng_calls=rng_calls)
