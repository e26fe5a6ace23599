"""mixprec.Monitor: what precision is doing during training, logged every N steps.

The C++ ``mixprec::Monitor`` (through ``torch.classes.mixprec.Monitor``) keeps the step's loss on the
device, and on a logged step runs one ``grad_stats`` pass over the gradients and reads everything back
at once: loss, loss scale, skipped steps and the parameters that overflowed (``GradScaler.last_overflow``),
the fractions of gradient elements fp16 would flush to zero, make subnormal or overflow at the current
scale, an exponent histogram, the gradient norm, step time, tokens/s and peak memory. Between logged steps
it reads nothing back. This file adds what needs Python: TensorBoard event files (scalars, histograms, and the overflow's
sources as text under ``mixprec/overflow``) and the progress line.

    monitor = mixprec.Monitor(model, scaler, every=100, log_dir="runs/exp1")
    for batch in data:
        ...
        scaler.step(optimizer)
        scaler.update()
        monitor.step(loss, tokens=batch.numel())
    monitor.close()
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
import weakref
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .grad_scaler import GradScaler
from .optim import _shard_dims

__all__ = ["Monitor", "SINKS"]

#: The sinks a Monitor writes to: TensorBoard event files (needs the ``tensorboard`` package), a
#: ``metrics.jsonl`` file, and a progress line printed per logged step.
SINKS = ("tensorboard", "jsonl", "progress")

_SCALARS = ("loss", "loss_scale", "skipped_steps", "flush_fraction", "subnormal_fraction", "overflow_fraction",
            "nonfinite_fraction", "zero_fraction", "grad_norm", "step_time", "tokens_per_second", "peak_memory")


class Monitor:
    """Log precision statistics every ``every`` steps; call :meth:`step` once per optimizer step, after
    ``scaler.update()``.

    Args:
        model: the module whose parameters' gradients are measured and whose names overflows are reported by.
            Under FSDP2 (DTensor parameters) each rank measures its local shards and the figures are summed
            over the shards' mesh on logged steps (a collective: every rank calls :meth:`step`), so every rank
            logs those of the whole gradients.
        scaler: a :class:`mixprec.GradScaler` (its overflow tracking is turned on), or ``None``.
        every: log every this many steps (> 0).
        log_dir: where the TensorBoard events and ``metrics.jsonl`` go (needed by those sinks).
        sinks: any of :data:`SINKS`; by default all of them when ``log_dir`` is given, else the progress line.
        min_exponent, num_bins: the exponent histogram's bins, ``floor(log2 |g|)`` from ``min_exponent`` up.
        per_tensor: also write each parameter's exponent histogram to TensorBoard
            (``mixprec/grad_log2_magnitude/<name>``; one more device read per logged step).
        keep: how many of the latest records the list :attr:`records` holds (about 2 KB each with 64 bins;
            the jsonl and TensorBoard sinks have them all), or ``None`` for every one.
        start_step: the steps a resumed run has already taken (>= 0): the step count continues from there, so
            records, TensorBoard curves and the ``every`` grid follow the run's own step numbers; TensorBoard
            hides what an earlier writer logged in ``log_dir`` after this step (SummaryWriter's
            ``purge_step``), and ``metrics.jsonl`` is appended to.
    """

    sinks: tuple[str, ...]
    log_dir: Optional[str]
    per_tensor: bool
    records: list[dict[str, Any]]

    def __init__(self, model: nn.Module, scaler: Optional[GradScaler] = None, *, every: int = 100,
                 log_dir: Optional[str] = None, sinks: Optional[Sequence[str]] = None, min_exponent: int = -40,
                 num_bins: int = 64, per_tensor: bool = False, keep: Optional[int] = 1000,
                 start_step: int = 0) -> None:
        if sinks is None:
            sinks = SINKS if log_dir is not None else ("progress",)
        sinks = (sinks,) if isinstance(sinks, str) else tuple(sinks)  # one sink, not its characters
        unknown = [s for s in sinks if s not in SINKS]
        if unknown:
            raise ValueError(f"mixprec.Monitor: unknown sink(s) {unknown}; accepted: {list(SINKS)}")
        # Integers of any kind (NumPy's from a config too), not bools.
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every <= 0:
            raise ValueError(f"mixprec.Monitor: every must be a positive int, got {every!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 0):
            raise ValueError(f"mixprec.Monitor: keep must be a non-negative int or None, got {keep!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or start_step < 0:
            raise ValueError(f"mixprec.Monitor: start_step must be a non-negative int, got {start_step!r}")
        for value, name in ((min_exponent, "min_exponent"), (num_bins, "num_bins")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"mixprec.Monitor: {name} must be an int, got {value!r}")
        if isinstance(per_tensor, str):  # "no" would be true
            raise ValueError(f"mixprec.Monitor: per_tensor must be a bool, got {per_tensor!r}")
        every, keep, start_step = int(every), None if keep is None else int(keep), int(start_step)
        if scaler is not None and not isinstance(scaler, GradScaler):
            raise TypeError(f"mixprec.Monitor: scaler must be a mixprec.GradScaler or None, got {type(scaler).__name__}")
        if ("tensorboard" in sinks or "jsonl" in sinks) and log_dir is None:
            raise ValueError("mixprec.Monitor: the tensorboard and jsonl sinks need a log_dir")
        self.sinks = sinks
        self.log_dir = log_dir
        self.per_tensor = bool(per_tensor)
        self._writer: Any = None
        writer_cls: Any = None
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter as writer_cls
            except ImportError as e:  # tensorboard is an optional dependency
                raise ImportError("mixprec.Monitor: the tensorboard sink needs the tensorboard package "
                                  "(pip install tensorboard), or leave it out of sinks") from e
        jsonl = ""
        if "jsonl" in sinks:
            os.makedirs(log_dir, exist_ok=True)  # type: ignore[arg-type]
            jsonl = os.path.join(log_dir, "metrics.jsonl")  # type: ignore[arg-type]
        names, params = [], []
        for name, p in model.named_parameters():
            names.append(name)
            params.append(p)
        enabled_scaler = scaler if scaler is not None and scaler.is_enabled() else None
        # The event writer first (a log_dir it cannot use is refused here); the C++ constructor checks its
        # arguments before it turns the scaler's overflow tracking on, so a refused monitor changes nothing.
        if writer_cls is not None:
            # A resumed run's steps replace whatever an earlier writer logged after start_step (steps a crashed
            # run got past its checkpoint); step start_step itself was logged before the checkpoint.
            self._writer = writer_cls(log_dir=log_dir, purge_step=start_step + 1 if start_step else None)
        try:
            self._impl = torch.classes.mixprec.Monitor(
                names, params, None if enabled_scaler is None else enabled_scaler._impl, int(every), jsonl, False,
                int(min_exponent), int(num_bins), start_step)
        except Exception:
            if self._writer is not None:
                self._writer.close()
            raise
        # FSDP2's DTensor parameters: the statistics read each rank's local shard of their gradients (handed over
        # on logged steps only) and sum them over the mesh dimensions that shard them.
        self._params = params if any(type(p).__name__ == "DTensor" for p in params) else None
        # fully_shard (or resizing an embedding) replaces a model's parameters: a monitor built before it would
        # measure the old ones and log nothing. A logged step checks the first one (no loop) and warns once.
        self._model = weakref.ref(model)
        self._watched = params
        self._first_param = params[0] if params else None
        self._replaced_warned = False
        for name, p in zip(names, params):
            dims = _shard_dims(p)
            if dims:
                self._impl.shard(name, [p.device_mesh.get_group(d).group_name for d in dims])
        if enabled_scaler is not None:
            enabled_scaler.set_track_overflows(True)  # already on in C++; this keeps it in the scaler's pickle
        # The latest logged records, as dicts (a long run logs without bound; the jsonl and TensorBoard sinks
        # keep the whole history).
        self.records = []
        self._keep = keep

    def step(self, loss: torch.Tensor, tokens: int = 0) -> Optional[dict[str, Any]]:
        """Count one step. On a logged step, returns the record (a dict, as in ``metrics.jsonl``) after
        writing it to the sinks; otherwise ``None``, having read nothing back from the device."""
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float32)
        if isinstance(tokens, bool) or (isinstance(tokens, numbers.Real) and not isinstance(tokens, numbers.Integral)
                                        and not float(tokens).is_integer()):
            raise ValueError(f"mixprec.Monitor.step: tokens must be a whole number, got {tokens!r}")  # not truncated
        logs = self._impl.logs_next()
        if logs and not self._replaced_warned:
            model = self._model()
            # (FSDP2 with reshard_after_backward=False also registers other tensors between steps, but the
            # watched parameters then hold gradients.)
            if (model is not None and next(model.parameters(), None) is not self._first_param
                    and not self._watched_have_grads()):
                self._replaced_warned = True
                warnings.warn("mixprec.Monitor: the model's parameters were replaced after the monitor was built "
                              "(fully_shard does this), so it measures the old ones; build it after sharding",
                              stacklevel=2)
        if self._params is not None and logs:
            grads = [None if p.grad is None else p.grad.to_local() if type(p.grad).__name__ == "DTensor" else p.grad
                     for p in self._params]
            out = self._impl.step_with_grads(loss, int(tokens), grads)
        else:
            out = self._impl.step(loss, int(tokens))
        if out is None:
            return None
        text, line = out
        record = json.loads(text)
        self.records.append(record)
        if self._keep is not None and len(self.records) > self._keep:
            del self.records[: len(self.records) - self._keep]
        if "progress" in self.sinks:
            print(line, flush=True)
        if self._writer is not None:
            step = record["step"]
            for key in _SCALARS:
                self._writer.add_scalar(f"mixprec/{key}", record[key], step)
            if record["overflow"]:  # the overflow's sources, by parameter name (TensorBoard's Text tab)
                self._writer.add_text("mixprec/overflow", record["overflow"], step)
            lo = record["min_exponent"]
            self._add_histogram("mixprec/grad_log2_magnitude", record["exponent_histogram"], lo, step)
            if self.per_tensor:  # one more read: the per-gradient rows
                for name, row in self.last_stats().items():
                    self._add_histogram(f"mixprec/grad_log2_magnitude/{name}", row[8:].tolist(), lo, step)
            self._writer.flush()
        return record

    def _watched_have_grads(self) -> bool:
        """Whether any parameter the monitor measures holds a gradient (a loop, on a suspicious logged step only)."""
        return any(p.grad is not None for p in self._watched)

    def _add_histogram(self, tag: str, counts: list[float], lo: int, step: int) -> None:
        """Bin k holds floor(log2 |g|) = lo + k: written as TensorBoard's raw histogram over that axis."""
        used = [k for k, c in enumerate(counts) if c]
        if not used:
            return
        self._writer.add_histogram_raw(
            tag, min=float(lo + used[0]), max=float(lo + used[-1] + 1), num=int(sum(counts)),
            sum=sum((lo + k + 0.5) * c for k, c in enumerate(counts)),
            sum_squares=sum((lo + k + 0.5) ** 2 * c for k, c in enumerate(counts)),
            bucket_limits=[float(lo + k + 1) for k in range(len(counts))], bucket_counts=[int(c) for c in counts],
            global_step=step)

    def last_stats(self) -> dict[str, torch.Tensor]:
        """The per-gradient ``grad_stats`` rows of the last logged step, by parameter name (empty before the
        first logged step)."""
        names = self._impl.last_stats_names()
        return dict(zip(names, self._impl.last_stats())) if names else {}

    def close(self) -> None:
        """Close the jsonl file and flush and close the TensorBoard writer; a ``step`` after it is an error.
        Closing again does nothing."""
        self._impl.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
