"""mixprec.ops.unscale_and_check_ vs torch._amp_foreach_non_finite_check_and_unscale_, same inputs, same run.

Cases: (a) the gradients of GPT-2 small (~124M elements) in fp32 and in bf16, (b) 1000 tensors of
4K elements, (c) one 64M-element tensor. Bytes moved = every gradient read once and written once.
On CUDA the measured device-to-device copy bandwidth is printed as the ceiling. "ours+amax" also takes
each gradient's max |g| (GradScaler's overflow attribution) in the same pass.

    python benchmarks/bench_unscale.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import math

import torch
from common import Timing, gpt2_small_shapes, measure, print_device_header, print_table

import mixprec  # noqa: F401
from mixprec import ops


def cases(quick: bool) -> list[tuple[str, list[tuple[int, ...]], torch.dtype]]:
    gpt2 = gpt2_small_shapes()
    big = (1 << 22,) if quick else (1 << 26,)
    many = [(4096,)] * (100 if quick else 1000)
    if quick:
        gpt2 = gpt2[2:14]  # one transformer block
    return [
        ("gpt2-small fp32", gpt2, torch.float32),
        ("gpt2-small bf16", gpt2, torch.bfloat16),
        (f"{len(many)} x 4K fp32", many, torch.float32),
        (f"{len(many)} x 4K bf16", many, torch.bfloat16),
        (f"1 x {big[0] >> 20}M fp32", [big], torch.float32),
        (f"1 x {big[0] >> 20}M bf16", [big], torch.bfloat16),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    device = args.device
    print_device_header(device)

    rows = []
    for name, shapes, dtype in cases(args.quick):
        grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
        nbytes = 2 * sum(g.numel() * g.element_size() for g in grads)
        found = torch.zeros(1, device=device)
        # Not 1.0: an inverse scale of one only checks (nothing is stored). 1 - 2^-10 keeps the values in range
        # over every repeat while both kernels read and write everything.
        inv = torch.full((1,), 1 - 2**-10, device=device)

        ours = measure(lambda: ops.unscale_and_check_(grads, found, inv), device)
        ours_sq = measure(lambda: ops.unscale_and_check_sumsq_(grads, found, inv), device)
        amax = torch.zeros(len(grads), device=device)  # per-tensor max |g| on the side (overflow attribution)
        ours_amax = measure(lambda: ops.unscale_and_check_(grads, found, inv, amax), device)
        try:
            theirs = measure(lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv), device)
        except RuntimeError as e:  # e.g. a dtype torch's kernel does not take
            print(f"  torch rejects {name}: {str(e).splitlines()[0]}")
            theirs = Timing(math.nan, math.nan)
        rows.append([
            name,
            f"{nbytes / 2**20:.0f}",
            f"{theirs.device * 1e3:.3f}",
            f"{ours.device * 1e3:.3f}",
            f"{ours_sq.device * 1e3:.3f}",
            f"{ours_amax.device * 1e3:.3f}",
            f"{nbytes / theirs.device / 1e9:.1f}",
            f"{nbytes / ours.device / 1e9:.1f}",
            f"{theirs.device / ours.device:.2f}x",
            f"{theirs.wall * 1e3:.3f}",
            f"{ours.wall * 1e3:.3f}",
            f"{theirs.wall / ours.wall:.2f}x",
        ])
        del grads
    # device: the kernels alone; wall: a synchronised call as a user makes it (see common.Timing)
    print_table(["case", "MiB moved", "torch ms", "ours ms", "ours+sumsq ms", "ours+amax ms", "torch GB/s", "ours GB/s", "speedup",
                 "torch wall ms", "ours wall ms", "wall speedup"], rows)


if __name__ == "__main__":
    main()
