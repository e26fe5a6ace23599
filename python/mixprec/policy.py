"""Precision policies and autocast for Python, on the C++ ``mixprec::Policy``.

``Policy`` is the C++ parser and record (``torch.classes.mixprec.Policy``) with Python conveniences:
``policy.apply(model)`` (storage dtypes, norm layers kept in fp32 through forward hooks), and helpers
that build the matching loss scaler and optimizer. ``autocast(policy, device_type)`` is a context
manager and decorator with ``torch.autocast``'s semantics (it wraps it); C++ code uses
``mixprec::AutocastGuard``, which restores the same state.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, TypeVar, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from .grad_scaler import GradScaler
    from .optim import AdamW

_M = TypeVar("_M", bound=nn.Module)

__all__ = ["Policy", "autocast"]

# c10::ScalarType codes of the dtypes a policy can name.
_FROM_CODE = {5: torch.float16, 6: torch.float32, 15: torch.bfloat16}
_F = TypeVar("_F", bound=Callable[..., Any])


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors in ``dtype``, containers rebuilt as their own type: a namedtuple
    (PackedSequence) from its fields, a dict subclass (an OrderedDict, HF's ModelOutput) as a copy whose
    items are replaced."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        items = [_cast_floating(v, dtype) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items)
    if type(value) is dict:  # a comprehension, which torch.compile traces (copy.copy it does not)
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, dict):
        try:
            out = copy.copy(value)
            for k, v in value.items():
                out[k] = _cast_floating(v, dtype)
            return out
        except Exception:  # a mapping that cannot be copied or assigned to: a plain dict holds the same items
            return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value


def _fp32_inputs(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """Forward pre-hook of an fp32-kept module: its floating inputs in fp32. A module-level function (and
    ``functools.partial`` below), not a lambda, so that ``torch.save(model)`` can pickle the hooks."""
    return _cast_floating(args, torch.float32), _cast_floating(kwargs, torch.float32)


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for v in items:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _outputs_in(dtype: torch.dtype, module: nn.Module, args: Any, output: Any,
                under_autocast_only: bool = False) -> Any:
    """Forward hook of an fp32-kept module: its floating outputs back in the compute dtype. For a mixed policy
    (fp32 parameters) only while autocast runs on the outputs' device: outside it the fp32 model must run as
    it is (evaluation, export), where a 16-bit output would meet fp32 weights."""
    if under_autocast_only:
        t = _first_tensor(output)
        # (A device autocast does not know, as meta, has it off: torch's question would raise there.)
        kind = t.device.type if t is not None else ""
        if t is None or not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
            return None
    return _cast_floating(output, dtype)


def _is_policy_hook(hook: Any) -> bool:
    return hook is _fp32_inputs or (isinstance(hook, functools.partial) and hook.func is _outputs_in)


@torch.compiler.assume_constant_result
def _parse(name: str, keep_fp32: Optional[tuple[str, ...]]) -> tuple[Any, ...]:
    """The C++ parser's reading of a policy, as plain values: (name, compute, param, master and output dtype
    codes, needs loss scaling, kept module type names). Under torch.compile this runs once, at trace time, and
    its result is a constant of the graph: a policy built or read inside a compiled function (the
    ``mixprec.autocast`` around a model's forward) costs nothing there and breaks no graph."""
    impl = torch.classes.mixprec.Policy(name)
    if keep_fp32 is not None:
        impl.set_keep_fp32(list(keep_fp32))
    return (str(impl.name()), int(impl.compute_dtype()), int(impl.param_dtype()), int(impl.master_dtype()),
            int(impl.output_dtype()), bool(impl.needs_loss_scaling()), tuple(impl.keep_fp32()))


@torch.compiler.assume_constant_result
def _keeps_fp32(name: str, keep_fp32: tuple[str, ...], type_name: str) -> bool:
    """Policy.keeps_fp32 under torch.compile: the C++ rule, run once at trace time."""
    impl = torch.classes.mixprec.Policy(name)
    impl.set_keep_fp32(list(keep_fp32))
    return bool(impl.keeps_fp32(type_name))


class Policy:
    """A precision policy: compute dtype, parameter (storage) dtype, master dtype, output dtype, the
    module types kept in fp32, and whether loss scaling is needed.

    Accepts every name users already know: ``float32``, ``mixed_float16``, ``mixed_bfloat16``,
    ``float16``, ``bfloat16`` (mixprec/Keras), Lightning's ``32-true``, ``16-mixed``, ``bf16-mixed``,
    ``16-true``, ``bf16-true``, Accelerate's ``no``, ``fp16``, ``bf16`` and jmp's explicit
    ``"params=float32,compute=bfloat16,output=float32"``. Unknown names raise an error listing these.

    Args:
        name: the policy name, or another Policy to copy.
        keep_fp32: module type names to keep in fp32 (default: BatchNorm, LayerNorm, GroupNorm); a
            module is kept when the name of its class, or of a base class (a subclass of LayerNorm, a
            parametrized LayerNorm), contains one of them. One name may be given as a string, and module
            classes stand for their names.

    Two policies are equal when they compute, store and output alike and keep the same module types, whatever
    their names say (``"compute=bfloat16"`` is ``"mixed_bfloat16"``).
    """

    def __init__(self, name: Union[str, "Policy"], keep_fp32: Optional[Iterable[Union[str, type]]] = None) -> None:
        base = name.name if isinstance(name, Policy) else str(name)
        if isinstance(name, Policy) and keep_fp32 is None:
            keep_fp32 = name.keep_fp32
        if isinstance(keep_fp32, (str, type)):  # one name, not its characters
            keep_fp32 = (keep_fp32,)
        if keep_fp32 is not None:  # classes, as FSDP-style code passes them, by their names
            keep_fp32 = tuple(k.__name__ if isinstance(k, type) else k for k in keep_fp32)
        # What the C++ parser read, kept as plain values (see _parse); the C++ object itself (self._impl) is
        # made when a method needs it.
        self._fields = _parse(base, None if keep_fp32 is None else tuple(str(k) for k in keep_fp32))

    @property
    def _impl(self) -> Any:
        """The C++ ``mixprec::Policy`` (``torch.classes.mixprec.Policy``) this policy was read from."""
        impl = self.__dict__.get("_cpp")
        if impl is None:
            impl = self.__dict__["_cpp"] = torch.classes.mixprec.Policy(self.name)
            impl.set_keep_fp32(self.keep_fp32)
        return impl

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.keep_fp32))

    @property
    def name(self) -> str:
        """The policy's name as given (``"mixed_bfloat16"``, ``"bf16-mixed"``, ``"params=bfloat16,compute=..."``)."""
        return self._fields[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype operations compute in (autocast's)."""
        return _FROM_CODE[self._fields[1]]

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype :meth:`apply` stores parameters in."""
        return _FROM_CODE[self._fields[2]]

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype of the optimizer's master weights (:meth:`optimizer`)."""
        return _FROM_CODE[self._fields[3]]

    @property
    def output_dtype(self) -> torch.dtype:
        """The dtype :meth:`cast_to_output` casts to (the compute dtype unless the name says ``output=``)."""
        return _FROM_CODE[self._fields[4]]

    @property
    def needs_loss_scaling(self) -> bool:
        """Whether training needs dynamic loss scaling (fp16 compute): :meth:`grad_scaler` is enabled then."""
        return self._fields[5]

    @property
    def keep_fp32(self) -> list[str]:
        """The module type names :meth:`apply` keeps in float32 (norms by default)."""
        return list(self._fields[6])

    def keeps_fp32(self, module: Union[nn.Module, type, str]) -> bool:
        """Whether this module (or module type, or type name) stays in fp32: the C++ rule on the type's name or
        a base class's (C++ modules have no bases to look at)."""
        if isinstance(module, nn.Module):
            module = type(module)
        names = ([c.__name__ for c in module.__mro__ if issubclass(c, nn.Module) and c is not nn.Module]
                 if isinstance(module, type) else [module])
        if torch.compiler.is_compiling():  # the C++ object breaks a graph; the answer is a constant of it
            return any(_keeps_fp32(self.name, tuple(self.keep_fp32), n) for n in names)
        return any(bool(self._impl.keeps_fp32(n)) for n in names)

    def __repr__(self) -> str:
        return (f"Policy({self.name!r}, compute={self.compute_dtype}, params={self.param_dtype}, "
                f"master={self.master_dtype}, keep_fp32={self.keep_fp32})")

    def _key(self) -> tuple[Any, ...]:
        return (*self._fields[1:6], frozenset(self._fields[6]))  # dtypes, loss scaling, kept types (any order)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:  # equal policies (aliases of one name included) hash alike: dict keys, caches
        return hash(self._key())

    def cast_to_compute(self, value: Any) -> Any:
        """jmp's cast: the floating tensors in ``value`` (nested lists, tuples, namedtuples and dicts too) in
        the compute dtype, differentiably (``Tensor.to``); other values unchanged. C++: ``Policy::cast_to_compute``."""
        return _cast_floating(value, self.compute_dtype)

    def cast_to_param(self, value: Any) -> Any:
        """As :meth:`cast_to_compute`, to the parameter (storage) dtype."""
        return _cast_floating(value, self.param_dtype)

    def cast_to_output(self, value: Any) -> Any:
        """As :meth:`cast_to_compute`, to the output dtype (the compute dtype unless the name says ``output=``):
        ``policy.cast_to_output(model(policy.cast_to_compute(x)))``, as with jmp."""
        return _cast_floating(value, self.output_dtype)

    def apply(self, model: _M) -> _M:
        """Cast ``model``'s parameters and floating buffers to the storage dtype, except those of
        fp32-kept modules, which become fp32 and get their floating inputs upcast to fp32 and their
        outputs cast back to the compute dtype (forward hooks; for a mixed policy, whose parameters stay
        fp32, only while autocast runs, so the model also runs without it). Returns ``model``."""
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                raise TypeError(f"Policy.apply: parameter {name!r} has dtype {p.dtype}; only floating-point "
                                "parameters can follow a precision policy")
        compute = self.compute_dtype
        # The modules stored in fp32: the kept ones and their parametrizations (torch.nn.utils.parametrize keeps
        # a parametrized weight's original in a child ParametrizationList). A parameter one of them shares with
        # a module stored in the policy's dtype (tied weights) takes that dtype: the kept module's hooks adapt
        # its inputs, the other module has none.
        hooked = {id(m) for m in model.modules() if self.keeps_fp32(m)}
        stored_fp32 = set(hooked)
        for module in model.modules():
            parametrizations = getattr(module, "parametrizations", None) if id(module) in hooked else None
            if isinstance(parametrizations, nn.ModuleDict):
                stored_fp32.update(id(m) for m in parametrizations.modules())
        cast_params = {id(p) for m in model.modules() if id(m) not in stored_fp32 for p in m.parameters(recurse=False)}
        for module in model.modules():
            kept = id(module) in hooked
            target = torch.float32 if id(module) in stored_fp32 else self.param_dtype
            # fp32 by definition, whatever the policy: QAT steps and scales, FP8 scaling state (fp8_ buffers).
            fp32_names = set(getattr(module, "_FP32_NAMES", ()))
            cast = False
            for key, p in module.named_parameters(recurse=False):
                want = self.param_dtype if id(p) in cast_params else target
                if p.dtype != want and key not in fp32_names:
                    p.data = p.data.to(want)
                    if p.grad is not None and p.grad.dtype != p.grad_dtype:
                        # As Module.to casts .grad with its parameter; an fp32 gradient a converted layer keeps
                        # (grad_dtype float32) stays.
                        p.grad = p.grad.to(p.grad_dtype)
                    cast = True
            # What a layer does after its own casts (the 8-bit layers drop their kept quantized weight, QAT layers
            # take the weight's new dtype for its gradient), as C++'s KeepsFp32::dtype_changed.
            if cast and hasattr(module, "_dtype_changed"):
                module._dtype_changed()
            for key, b in module.named_buffers(recurse=False):
                if key.startswith("fp8_") or key in fp32_names:
                    continue
                if b.is_floating_point() and b.dtype != target:
                    setattr(module, key, b.to(target))
            # A second apply (another policy) replaces the hooks of the first, instead of stacking on them.
            for hooks, with_kwargs in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                                       (module._forward_hooks, module._forward_hooks_with_kwargs)):
                for key in [k for k, h in hooks.items() if _is_policy_hook(h)]:
                    del hooks[key]
                    with_kwargs.pop(key, None)
            if kept:
                module.register_forward_pre_hook(_fp32_inputs, with_kwargs=True)
                if compute != torch.float32:
                    mixed = self.param_dtype == torch.float32
                    module.register_forward_hook(functools.partial(_outputs_in, compute, under_autocast_only=mixed))
        return model

    def grad_scaler(self, device: str = "cuda", **kwargs: Any) -> "GradScaler":
        """A ``mixprec.GradScaler`` for this policy: dynamic for fp16 compute, disabled otherwise."""
        from .grad_scaler import GradScaler

        kwargs.setdefault("enabled", self.needs_loss_scaling)
        return GradScaler(device, **kwargs)

    def optimizer(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> "AdamW":
        """A ``mixprec.optim.AdamW`` for this policy: fp32 masters for mixed policies; for pure 16-bit
        policies no master copy and stochastic rounding of the updates, seeded (unless ``seed`` is given)
        from ``torch.initial_seed()``: the draws then come from the optimizer's own counter, which its state
        dict saves (a resume continues them bit for bit), not from torch's global generator, and runs with
        different torch seeds draw differently. Under an initialized process group of more than one rank the
        seed is :data:`mixprec.optim.REPLICA_SEED` instead, the same on every rank, so that data-parallel
        replicas stay identical whatever torch seed each rank set."""
        from .optim import AdamW, _ranks_replicate

        # mixprec::Policy::adam_options's settings: one rule for both front doors.
        master_weights, rounding, seed = self._impl.adam_settings()
        kwargs.setdefault("master_weights", master_weights)
        kwargs.setdefault("rounding", rounding)
        # Each rank's torch seed may differ (nanoGPT seeds 1337 + rank): under a process group of several ranks
        # the optimizer's own rule (mixprec.optim.REPLICA_SEED) keeps data-parallel replicas rounding alike.
        kwargs.setdefault("seed", None if seed < 0 or _ranks_replicate() else seed)
        return AdamW(params, lr=lr, **kwargs)

    def autocast(self, device_type: str = "cuda") -> "autocast":
        """``mixprec.autocast(self, device_type)``: torch.autocast in this policy's compute dtype."""
        return autocast(self, device_type)


class autocast(torch.amp.autocast):  # noqa: N801 (named like torch.autocast)
    """``torch.autocast`` driven by a policy: context manager and decorator, and a ``torch.autocast`` itself.

    Inside, autocast computes in the policy's compute dtype; a float32 policy, or ``enabled=False`` (torch's
    argument), disables autocast inside.
    On exit the previous state (enabled flag, dtype, cache setting) comes back and the cast cache is
    cleared when the outermost autocast exits, exactly as with ``torch.autocast``. torch.compile traces it as
    it traces ``torch.autocast`` (``fullgraph=True`` included, inside an outer ``torch.autocast`` too; one
    made inside a compiled function is a ``torch.autocast`` itself): the policy is read at trace time. Building
    one inside a compiled function needs torch 2.14's Dynamo (torch 2.11's cannot trace it, a graph break that
    ``fullgraph=True`` refuses); a prebuilt object and the decorator trace on both. As a decorator each call
    enters a fresh instance, so a decorated function may call itself.
    """

    def __new__(cls, policy: Union[Policy, str, None] = None, device_type: str = "cuda", enabled: bool = True,
                cache_enabled: Optional[bool] = None) -> "autocast":
        if policy is not None and torch.compiler.is_compiling():  # (None: copy and pickle make the object bare)
            # Made inside a compiled function: a torch.autocast itself, which Dynamo traces as its own context
            # (an instance of this subclass it would step into, which fails inside an outer torch.autocast).
            compute = (policy if isinstance(policy, Policy) else Policy(policy)).compute_dtype
            enabled = bool(enabled) and compute != torch.float32
            return torch.amp.autocast(device_type, dtype=compute if enabled else None, enabled=enabled,  # type: ignore[return-value]
                                      cache_enabled=cache_enabled)
        return super().__new__(cls)

    def __init__(self, policy: Union[Policy, str], device_type: str = "cuda", enabled: bool = True,
                 cache_enabled: Optional[bool] = None) -> None:
        policy = policy if isinstance(policy, Policy) else Policy(policy)
        try:
            available = torch.amp.is_autocast_available(device_type)
        except RuntimeError:  # not even a device type torch knows
            available = False
        if not available:
            raise RuntimeError(f"mixprec.autocast: autocast is not available for device type {device_type!r}")
        compute = policy.compute_dtype
        enabled = bool(enabled) and compute != torch.float32  # enabled=False: autocast off inside, as torch's
        if enabled and device_type == "cuda" and compute == torch.bfloat16 and not _cuda_bf16_ok():
            raise RuntimeError(f"mixprec.autocast: policy {policy.name!r} computes in bfloat16, which this GPU cannot")
        super().__init__(device_type, dtype=compute if enabled else None, enabled=enabled, cache_enabled=cache_enabled)
        # After torch's __init__: torch.compile treats this object as a torch.autocast from its first attribute on.
        self.policy = policy
        self.device_type = device_type

    def __enter__(self) -> "autocast":  # type: ignore[override]
        super().__enter__()
        return self

    def __call__(self, func: _F) -> _F:
        # Each call enters its own torch.autocast with this one's settings (the policy was read here already, and
        # the cache setting too, as torch.autocast reads it when built).
        device_type, dtype, enabled, cache = self.device_type, self.fast_dtype, self._enabled, self._cache_enabled

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


# help() and inspect.signature show __init__'s signature (policy required; __new__ also takes none, for copies).
autocast.__signature__ = inspect.signature(autocast.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(autocast.__init__).parameters.values())[1:],
    return_annotation=inspect.Signature.empty)


@torch.compiler.assume_constant_result
def _cuda_bf16_ok() -> bool:
    """Whether bfloat16 autocast can run on CUDA here (true without a GPU: torch.autocast then disables itself
    with its own warning). A constant under torch.compile."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
