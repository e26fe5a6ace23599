"""Diagnostics a mixed-precision practitioner needs: how far a policy's outputs are from fp32, which
gradients an fp16 loss scale would flush or overflow (and which scale to use), and what each precision
costs in time and memory.

    python -m mixprec.bench [--device cpu|cuda]   # the tables for the demo's transformer
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, Union

import torch
from torch import nn

from . import ops
from .policy import Policy, _cast_floating, autocast

__all__ = ["OutputError", "UnderflowReport", "PrecisionTiming", "compare_outputs", "underflow_report",
           "benchmark_precision"]

FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


@dataclass
class OutputError:
    """Error of one output under a policy, against the fp32 run."""

    index: int
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    mean_rel: float


def compare_outputs(model_or_fn: Union[nn.Module, Callable[..., Any]], inputs: Sequence[Any],
                    policy: Union[Policy, str], device_type: str = "cpu", eps: float = 1e-12) -> list[OutputError]:
    """Run ``model_or_fn(*inputs)`` in fp32 and under ``policy`` and compare every output tensor.

    A module is copied twice: one copy stays fp32, the other goes through ``policy.apply``; a plain
    function runs once without and once within ``mixprec.autocast(policy)``. Floating-point input tensors,
    also inside lists, tuples and dicts, are given in fp32 to the first run and in the policy's parameter
    dtype to the second. Both runs start from the same random state (restored afterwards), so dropout
    draws the same masks in a module left in training mode. Relative errors divide by
    ``max(|fp32 value|, eps)``."""
    policy = policy if isinstance(policy, Policy) else Policy(policy)
    if isinstance(model_or_fn, nn.Module):
        ref_model = copy.deepcopy(model_or_fn).float()
        low_model = policy.apply(copy.deepcopy(model_or_fn).float())
        ref_fn, low_fn = ref_model, low_model
    else:
        ref_fn = low_fn = model_or_fn
    fp32_inputs = _cast_floating(list(inputs), torch.float32)
    low_inputs = _cast_floating(list(inputs), policy.param_dtype)
    if device_type == "cuda":
        torch.cuda.init()  # its generators exist before the first run, so both runs start from one state
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        cpu_state, cuda_states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        ref = _flatten(ref_fn(*fp32_inputs))
        torch.set_rng_state(cpu_state)
        for d, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, d)
        with autocast(policy, device_type):
            low = _flatten(low_fn(*low_inputs))
    errors = []
    for i, (r, l) in enumerate(zip(ref, low)):
        r64, l64 = r.double(), l.double()
        # Equal values (the same inf, as masked attention logits hold; NaN where both runs give NaN) differ by 0,
        # not by inf - inf.
        same = (l64 == r64) | (l64.isnan() & r64.isnan())
        diff = torch.where(same, torch.zeros_like(l64), (l64 - r64).abs())
        rel = diff / r64.abs().clamp(min=eps)
        errors.append(OutputError(i, tuple(r.shape), float(diff.max()) if diff.numel() else 0.0,
                                  float(rel.max()) if rel.numel() else 0.0, float(rel.mean()) if rel.numel() else 0.0))
    return errors


@dataclass
class UnderflowReport:
    """What an fp16 loss scale would do to a set of gradients."""

    scale: float
    total: int
    zero: int                 # exactly zero already
    flush_to_zero: int        # non-zero, but g * scale rounds to 0 in fp16 (|g * scale| <= 2^-25)
    subnormal: int            # g * scale rounds to an fp16 subnormal: precision lost
    overflow: int             # g * scale rounds to inf in fp16 (|g * scale| >= 65520), or g is inf/NaN: the step would be skipped
    exponent_histogram: dict[int, int] = field(default_factory=dict)  # floor(log2 |g|) -> count, non-zero g only
    recommended_scale: float = 1.0  # smallest power of two keeping `fraction` of non-zero g representable

    @property
    def nonzero(self) -> int:
        """The gradient elements that are not exactly zero."""
        return self.total - self.zero

    def __str__(self) -> str:
        nz = max(self.nonzero, 1)
        lines = [f"fp16 at loss scale {self.scale:g}: {self.total} gradient elements, {self.zero} already zero",
                 f"  flushed to zero: {self.flush_to_zero} ({100 * self.flush_to_zero / nz:.2f}% of non-zero)",
                 f"  subnormal:       {self.subnormal} ({100 * self.subnormal / nz:.2f}%)",
                 f"  overflow (inf):  {self.overflow} ({100 * self.overflow / nz:.2f}%)",
                 f"  recommended power-of-two scale: {self.recommended_scale:g}",
                 "  exponent histogram (floor(log2|g|): count):"]
        for e in sorted(self.exponent_histogram):
            lines.append(f"    2^{e:>4}: {self.exponent_histogram[e]}")
        return "\n".join(lines)


def _gradients(grads_or_model: Union[nn.Module, Iterable[torch.Tensor]]) -> list[torch.Tensor]:
    if isinstance(grads_or_model, nn.Module):
        grads = [p.grad for p in grads_or_model.parameters() if p.grad is not None]
    else:
        grads = [g for g in grads_or_model if g is not None]
    # A sparse gradient (nn.Embedding(sparse=True)) counts as its coalesced values, as the scaler checks it.
    return [g.coalesce().values() if g.is_sparse else g for g in grads]


def underflow_report(grads_or_model: Union[nn.Module, Iterable[torch.Tensor]], scale: float = 1.0,
                     fraction: float = 0.999) -> UnderflowReport:
    """Count the gradient elements that fp16 would flush to zero, make subnormal or overflow at loss
    scale ``scale``, histogram their exponents, and find the smallest power-of-two scale under which at
    least ``fraction`` of the non-zero elements are representable (>= 2^-24 after scaling) while none
    overflows (if no such scale exists, the one that keeps the largest element finite)."""
    scale = float(scale)  # a number or a one-element tensor (a scaler's get_scale() or _scale)
    fp32_scale = float(torch.tensor(scale, dtype=torch.float32))  # what the statistics use
    if not (math.isfinite(fp32_scale) and fp32_scale > 0):
        raise ValueError(f"underflow_report: scale must be a finite number > 0 in float32, got {scale!r}")
    if not (isinstance(fraction, numbers.Real) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"underflow_report: fraction must be in [0, 1], got {fraction!r}")
    # A complex gradient counts as its real and imaginary parts, as the scaler and the Monitor count it.
    grads = [torch.view_as_real(g.detach().resolve_conj()) if g.is_complex() else g.detach()
             for g in _gradients(grads_or_model)]
    # One grad_stats pass per device (mixprec's fused kernel: the Monitor's statistics too), with bins wide
    # enough for every fp64 exponent, so the histogram is exact.
    lo, bins = -1075, 2100
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    total = torch.zeros(8 + bins, dtype=torch.float64)
    amax = 0.0
    for device, group in by_device.items():
        rows = ops.grad_stats(group, torch.full((1,), float(scale), device=device, dtype=torch.float32), lo, bins).cpu()
        total += rows.sum(0)
        amax = max([amax, *rows[:, 7].tolist()])  # the largest finite |g|: a max over rows, not a sum
    counts = [int(v) for v in total[:6].tolist()]
    hist = {lo + k: int(c) for k, c in enumerate(total[8:].tolist()) if c}
    report = UnderflowReport(
        scale=scale,
        total=counts[0],
        zero=counts[1],
        flush_to_zero=counts[2],
        subnormal=counts[3],
        overflow=counts[4] + counts[5],
        exponent_histogram=hist,
    )
    nonzero = sum(hist.values())
    if nonzero:
        # Representable means >= 2^-24 after scaling: the scale must lift the (1 - fraction) quantile there.
        # For the k-th smallest magnitude m with floor(log2 m) = e, ceil(log2(2^-24 / m)) = -24 - e exactly,
        # so the histogram gives the same power of two as sorting the values would.
        k = max(0, min(nonzero - 1, int(math.floor((1.0 - fraction) * nonzero))))
        seen = 0
        for e in sorted(hist):
            seen += hist[e]
            if seen > k:
                break
        needed = -24 - e
        ceiling = math.floor(math.log2(FP16_MAX / amax))
        report.recommended_scale = 2.0 ** min(needed, ceiling)
    return report


@dataclass
class PrecisionTiming:
    """One dtype's row of :func:`benchmark_precision`: median forward+backward time, peak memory, speedup."""

    dtype: torch.dtype
    seconds: float          # median forward+backward time
    peak_mib: float         # CUDA: peak allocated; CPU: parameters + gradients + what the forward saved for backward
    speedup: float = 1.0    # fp32 time / this time


def benchmark_precision(model: nn.Module, inputs: Sequence[Any],
                        dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16),
                        device: Union[str, torch.device] = "cpu", warmup: int = 2, repeats: int = 5,
                        loss_fn: Callable[[Any], torch.Tensor] = lambda out: out.float().sum()) -> list[PrecisionTiming]:
    """Forward+backward time (median of ``repeats`` after ``warmup``, device synchronised) and peak memory
    of ``model(*inputs)`` under autocast at each dtype, with the speedup over fp32. On CUDA the memory is the
    allocator's peak; on the CPU, which keeps no such count, it is the parameters and gradients plus the
    tensors the forward saved for the backward (each storage once, parameters not twice), measured in one
    more step after the timed ones."""
    dtypes = tuple(dtypes)
    if not dtypes or any(d not in (torch.float32, torch.float16, torch.bfloat16) for d in dtypes):
        raise ValueError("benchmark_precision: dtypes must be a non-empty sequence of torch.float32, torch.float16 "
                         f"and torch.bfloat16 (autocast's), got {dtypes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"benchmark_precision: repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"benchmark_precision: warmup must be an int >= 0, got {warmup!r}")
    device = torch.device(device)
    results = []
    for dtype in dtypes:
        m = copy.deepcopy(model).to(device)
        xs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
        enabled = dtype != torch.float32

        params = {p.untyped_storage().data_ptr() for p in m.parameters()}

        def step(saved: dict[Any, int] | None = None) -> None:
            m.zero_grad(set_to_none=True)

            def pack(t: torch.Tensor) -> torch.Tensor:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:  # a parameter saved for backward is counted once, as a parameter
                    saved[ptr] = t.untyped_storage().nbytes()  # type: ignore[index]
                return t

            with contextlib.ExitStack() as stack:
                if saved is not None:
                    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
                with torch.autocast(device.type, dtype=dtype if enabled else None, enabled=enabled):
                    out = m(*xs)
            loss_fn(out).backward()

        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            saved: dict[Any, int] = {}
            step(saved)
            state = [t for p in m.parameters() for t in (p, p.grad) if t is not None]
            peak = (sum(t.numel() * t.element_size() for t in state) + sum(saved.values())) / 2**20
        results.append(PrecisionTiming(dtype, statistics.median(times), peak))
        del m
    base = next((r.seconds for r in results if r.dtype == torch.float32), results[0].seconds)
    for r in results:
        r.speedup = base / r.seconds
    return results
