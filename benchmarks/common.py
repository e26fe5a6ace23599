"""Timing and table helpers shared by the benchmark scripts (median of repeats after warm-up; on CUDA the
device's time and the wall time a user sees, measured separately)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds per call, medians of the repeats.

    device: the device's work alone. On CUDA, events recorded around the launches while the GPU is still
        busy with a spin kernel queued first (``torch.cuda._sleep``), so the host's launch cost is hidden and
        the figure is what the kernels take. On the CPU it is the wall time.
    wall: what a user waits per call: host work, launches and device work, synchronised before and after."""

    device: float
    wall: float


_SPIN_CYCLES_PER_SECOND: list[float] = []


def _spin_cycles_per_second() -> float:
    if not _SPIN_CYCLES_PER_SECOND:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SPIN_CYCLES_PER_SECOND.append(cycles / (start.elapsed_time(end) / 1e3))
    return _SPIN_CYCLES_PER_SECOND[0]


def measure(fn: Callable[[], object], device: str, warmup: int = 2, repeats: int = 7) -> Timing:
    """Device time and wall time of fn() (see Timing); on the CPU both are the same wall-clock median."""
    for _ in range(warmup):
        fn()
    sync(device)
    walls = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    if not device.startswith("cuda"):
        return Timing(wall, wall)
    # Keep the GPU busy for longer than the host needs to queue fn's launches (the wall time bounds that).
    spin = int(_spin_cycles_per_second() * (2 * wall + 1e-4))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(spin)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Timing(statistics.median(times), wall)


def time_it(fn: Callable[[], object], device: str, warmup: int = 2, repeats: int = 7) -> float:
    """Device time of fn() in seconds (see Timing)."""
    return measure(fn, device, warmup, repeats).device


class HostPeakMemory:
    """Peak resident memory of this process above a starting point, for CPU runs (Linux): ``start()`` returns
    freed heap memory to the system, then resets the kernel's high-water mark to the current resident size
    (``/proc/self/clear_refs``); ``mib()`` is the high-water mark since, minus the resident size then. NaN
    where the kernel offers neither file."""

    def __init__(self) -> None:
        self._base = math.nan

    @staticmethod
    def _status_kib(field: str) -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return float(line.split()[1])
        except OSError:
            pass
        return math.nan

    def start(self) -> None:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to VmRSS
        except OSError:
            self._base = math.nan
            return
        self._base = self._status_kib("VmRSS")

    def mib(self) -> float:
        return (self._status_kib("VmHWM") - self._base) / 1024


def print_device_header(device: str) -> None:
    """Where the figures come from: the device, torch's version, threads, and on CUDA the copy ceiling."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if device.startswith("cuda"):
        print(f"device-to-device copy bandwidth: {copy_bandwidth(device):.0f} GB/s")


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for
    memory-bound kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds / 1e9


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M parameters)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


LAYER_SHAPES = [  # (model, in_features, out_features)
    ("gpt2 qkv", 768, 2304),
    ("gpt2 mlp up", 768, 3072),
    ("gpt2 mlp down", 3072, 768),
    ("1b mlp up", 2048, 8192),
    ("1b mlp down", 8192, 2048),
    ("8b qkv", 4096, 6144),
    ("8b mlp up", 4096, 14336),
    ("8b mlp down", 14336, 4096),
]


@dataclass
class LayerCase:
    """One layer shape of the Linear benchmarks: a bf16 nn.Linear, its input and output gradient."""

    label: str
    tokens: int
    k: int
    n: int
    base: torch.nn.Linear
    x: torch.Tensor
    g: torch.Tensor

    def step(self, layer: torch.nn.Module) -> Callable[[], None]:
        """A forward + backward of `layer` on this case's input, gradients cleared first."""
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            self.x.grad = None
            layer(self.x).backward(self.g)
        return run

    def cached_step(self, layer: torch.nn.Module) -> Callable[[], None]:
        """A later micro-batch of a gradient-accumulation cycle: forward + backward with
        ``is_first_microbatch=False``, the weight quantized by a first call (made here) reused."""
        layer(self.x, is_first_microbatch=True)

        def run() -> None:
            layer.zero_grad(set_to_none=True)
            self.x.grad = None
            layer(self.x, is_first_microbatch=False).backward(self.g)
        return run


def layer_cases(device: str, quick: bool) -> list[LayerCase]:
    """LAYER_SHAPES at 8192 tokens on CUDA; on the CPU (or --quick) divided by 8 with fewer tokens."""
    cuda = device.startswith("cuda")
    tokens = 8192 if cuda and not quick else (1024 if cuda else 512)
    divisor = 1 if cuda and not quick else 8
    shapes = LAYER_SHAPES if cuda or not quick else LAYER_SHAPES[:3]
    cases = []
    for name, k, n in shapes:
        k, n = k // divisor, n // divisor
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        cases.append(LayerCase(f"{name} [{tokens}x{k}]x[{k}x{n}]", tokens, k, n, base, x, g))
    return cases


def print_bandwidth_table(cases: Sequence[tuple[str, int, Callable[[], object], Callable[[], object]]],
                          device: str) -> None:
    """Times each (name, bytes moved, torch's fn, mixprec's fn) and prints device and wall times, mixprec's
    GB/s and its share of the copy bandwidth (CUDA), and the speedups."""
    ceiling = copy_bandwidth(device) if device.startswith("cuda") else float("nan")
    table = []
    for name, nbytes, base_fn, ours_fn in cases:
        base = measure(base_fn, device)
        ours = measure(ours_fn, device)
        gbs = nbytes / ours.device / 1e9
        table.append([name, f"{nbytes / 2**20:.0f}", f"{base.device * 1e3:.3f}", f"{ours.device * 1e3:.3f}",
                      f"{gbs:.1f}", f"{100 * gbs / ceiling:.0f}%" if ceiling == ceiling else "-",
                      f"{base.device / ours.device:.2f}x", f"{base.wall * 1e3:.3f}", f"{ours.wall * 1e3:.3f}",
                      f"{base.wall / ours.wall:.2f}x"])
    # device: the kernels alone; wall: a synchronised call as a user makes it (see Timing)
    print_table(["case", "MiB moved", "torch ms", "mixprec ms", "GB/s", "% of copy", "speedup", "torch wall ms",
                 "mixprec wall ms", "wall speedup"], table)

