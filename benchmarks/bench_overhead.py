"""Host cost of the calls a training step makes, mixprec vs torch, with the kernels taken out of the picture.

Every tensor holds one element, so what a call costs is its host side: Python, argument checks, the
dispatcher, the bookkeeping of lists and state. Two structures: GPT-2 small's (149 parameter tensors) and
1000 tensors. One row per path a user calls, each against torch's counterpart in the same run:

  unscale_        mixprec.GradScaler.unscale_(opt)           vs torch.amp.GradScaler.unscale_(opt)
  step            GradScaler.step(opt), unscale inside       vs the same with torch's scaler and optimizer
  opt.step        mixprec AdamW (bf16 + fp32 masters)        vs torch.optim.AdamW(fused=True), fp32
                  and a group of two dtypes, as Policy.apply leaves one (bf16 matrices, fp32 vectors)
  whole step      scale -> unscale_ -> step -> update        vs the same with torch's classes
  cast_           mixprec.ops.cast_(bf16 <- fp32 list)       vs torch._foreach_copy_

The optimizer rows use mixprec.optim.AdamW with mixprec.GradScaler against torch.optim.AdamW(fused=True)
with torch.amp.GradScaler. "ours / torch" below 0.5 is the goal of issue 17.

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--repeats N] [--cold]

--cold writes 64 MiB before every timed call, so the host-side data (tensor metadata, lists, Python objects)
is no longer in the CPU caches, as after a forward and backward pass; warm figures understate a real step's
host cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch
from common import gpt2_small_shapes, print_device_header, print_table, sync

import mixprec


# With --cold: written (untimed) before every timed call, as a step's forward and backward pass through far
# more memory than the caches hold, so the calls find their host-side data evicted.
EVICT: Optional[torch.Tensor] = None


def per_call(timed: Callable[[], object], between: Optional[Callable[[], object]], device: str, repeats: int) -> float:
    """Median seconds of timed() alone; between() runs untimed after each call (e.g. scaler.update())."""
    samples = []
    for i in range(repeats + 5):
        if EVICT is not None:
            EVICT.add_(1)
        sync(device)
        t0 = time.perf_counter()
        timed()
        sync(device)
        if i >= 5:  # warm-up: state creation, first-call caches
            samples.append(time.perf_counter() - t0)
        if between is not None:
            between()
    return statistics.median(samples)


def make(count: int, device: str, dtype: torch.dtype, vector_dtype: Optional[torch.dtype] = None,
         shapes: Optional[list[tuple[int, ...]]] = None) -> list[torch.nn.Parameter]:
    """`count` one-element parameters with gradients; with `vector_dtype`, those standing for 1-D tensors of
    `shapes` (norms, biases; every other one without shapes) take that dtype, as Policy.apply leaves them."""
    def dtype_of(i: int) -> torch.dtype:
        is_vector = len(shapes[i]) == 1 if shapes is not None else i % 2 == 1
        return vector_dtype if vector_dtype is not None and is_vector else dtype
    params = [torch.nn.Parameter(torch.randn(1, device=device).to(dtype_of(i))) for i in range(count)]
    for p in params:
        p.grad = torch.randn(1, device=device).to(p.dtype)
    return params


def rows_for(name: str, count: int, device: str, repeats: int,
             shapes: Optional[list[tuple[int, ...]]] = None) -> list[list[str]]:
    ours_params = make(count, device, torch.bfloat16)
    torch_params = make(count, device, torch.float32)
    ours_opt = mixprec.optim.AdamW(ours_params, lr=1e-4)
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-4, fused=True)
    # A real model's group after Policy.apply, which keeps norms in fp32: two dtypes, one launch each (the
    # 1-D tensors, biases too, in fp32 here).
    mixed_opt = mixprec.optim.AdamW(make(count, device, torch.bfloat16, torch.float32, shapes), lr=1e-4)
    ours_scaler = mixprec.GradScaler(device, init_scale=1.0)
    torch_scaler = torch.amp.GradScaler(device, init_scale=1.0)
    loss = torch.ones((), device=device)

    def sequence(scaler, opt):  # noqa: ANN001, ANN202 - both classes
        def run() -> None:
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            scaler.scale(loss)
        return run

    def next_iteration(scaler):  # noqa: ANN001, ANN202 - untimed: end the iteration, start the next one
        return lambda: (scaler.update(), scaler.scale(loss))

    for scaler in (ours_scaler, torch_scaler):
        scaler.scale(loss)  # a scaler's iteration starts with scale()
    cases = [
        ("unscale_", lambda s, o: (lambda: s.unscale_(o), next_iteration(s))),
        ("step", lambda s, o: (lambda: s.step(o), next_iteration(s))),
        ("opt.step", lambda s, o: (o.step, None)),
        ("whole step", lambda s, o: (sequence(s, o), None)),
    ]
    rows = []
    for label, build in cases:
        t_ours = per_call(*build(ours_scaler, ours_opt), device, repeats)
        t_torch = per_call(*build(torch_scaler, torch_opt), device, repeats)
        rows.append([name, str(count), label, f"{t_ours * 1e6:.0f}", f"{t_torch * 1e6:.0f}", f"{t_ours / t_torch:.2f}"])
        if label == "opt.step":
            t_mixed = per_call(mixed_opt.step, None, device, repeats)
            rows.append([name, str(count), "opt.step, bf16 + fp32 group", f"{t_mixed * 1e6:.0f}",
                         f"{t_torch * 1e6:.0f}", f"{t_mixed / t_torch:.2f}"])

    src = [torch.randn(1, device=device) for _ in range(count)]
    dst = [torch.empty(1, device=device, dtype=torch.bfloat16) for _ in range(count)]
    t_ours = per_call(lambda: mixprec.ops.cast_(dst, src), None, device, repeats)
    t_torch = per_call(lambda: torch._foreach_copy_(dst, src), None, device, repeats)
    rows.append([name, str(count), "cast_", f"{t_ours * 1e6:.0f}", f"{t_torch * 1e6:.0f}", f"{t_ours / t_torch:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--cold", action="store_true",
                        help="write a 64 MiB buffer before every timed call (caches cold, as in a training step)")
    args = parser.parse_args()
    print_device_header(args.device)
    if args.cold:
        global EVICT
        EVICT = torch.zeros(16 << 20)  # 64 MiB of host memory, beyond any CPU cache
        print("caches cold: 64 MiB written before every timed call")
    rows = []
    rows += rows_for("gpt2-small", len(gpt2_small_shapes()), args.device, args.repeats, gpt2_small_shapes())
    rows += rows_for("1000 tensors", 1000, args.device, args.repeats)
    print_table(["structure", "tensors", "call", "ours us", "torch us", "ours / torch"], rows)


if __name__ == "__main__":
    main()
