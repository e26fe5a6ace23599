"""mixprec casts vs PyTorch's, same inputs, same run.

Single tensors: mixprec.ops.cast_ (nearest, stochastic) vs Tensor.copy_, both into a preallocated
output: Tensor.to(dtype) is that copy plus an allocation whose first-touch cost swamps the comparison.
Lists (GPT-2 small's parameter shapes, fp32 masters -> 16-bit params): mixprec.ops.cast_ vs
torch._foreach_copy_. Bytes moved = every source read once and every destination written once.

    python benchmarks/bench_cast.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from common import Timing, gpt2_small_shapes, measure, print_device_header, print_table

import mixprec  # noqa: F401
from mixprec import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    device = args.device
    print_device_header(device)

    n = 1 << (22 if args.quick else 26)
    rows = []

    def row(name: str, nbytes: int, base: Timing, near: Timing, sto: Timing) -> None:
        baseline, nearest, stochastic = base.device, near.device, sto.device
        rows.append([name, f"{nbytes / 2**20:.0f}", f"{baseline * 1e3:.3f}", f"{nearest * 1e3:.3f}",
                     f"{stochastic * 1e3:.3f}" if stochastic == stochastic else "-",
                     f"{nbytes / nearest / 1e9:.1f}", f"{baseline / nearest:.2f}x",
                     f"{stochastic / nearest:.2f}x" if stochastic == stochastic else "-",
                     f"{base.wall * 1e3:.3f}", f"{near.wall * 1e3:.3f}", f"{base.wall / near.wall:.2f}x"])

    for dst_dtype in (torch.bfloat16, torch.float16):
        src = torch.randn(n, device=device)
        dst = torch.empty(n, device=device, dtype=dst_dtype)
        base = measure(lambda: dst.copy_(src), device)
        near = measure(lambda: ops.cast_([dst], [src]), device)
        sto = measure(lambda: ops.cast_([dst], [src], "stochastic", seed=1), device)
        row(f"fp32->{str(dst_dtype)[6:]} {n >> 20}M", n * 6, base, near, sto)
        del src, dst
    for src_dtype in (torch.bfloat16, torch.float16):
        src = torch.randn(n, device=device).to(src_dtype)
        dst = torch.empty(n, device=device)
        base = measure(lambda: dst.copy_(src), device)
        near = measure(lambda: ops.cast_([dst], [src]), device)
        row(f"{str(src_dtype)[6:]}->fp32 {n >> 20}M", n * 6, base, near, Timing(float("nan"), float("nan")))
        del src, dst

    shapes = gpt2_small_shapes()[2:14] if args.quick else gpt2_small_shapes()
    masters = [torch.randn(s, device=device) for s in shapes]
    for dst_dtype in (torch.bfloat16, torch.float16):
        params = [torch.empty(s, device=device, dtype=dst_dtype) for s in shapes]
        nbytes = sum(m.numel() for m in masters) * 6
        base = measure(lambda: torch._foreach_copy_(params, masters), device)
        near = measure(lambda: ops.cast_(params, masters), device)
        sto = measure(lambda: ops.cast_(params, masters, "stochastic", seed=2), device)
        row(f"gpt2-small list fp32->{str(dst_dtype)[6:]}", nbytes, base, near, sto)
    # device: the kernels alone; wall: a synchronised call as a user makes it (see common.Timing)
    print_table(["case", "MiB moved", "torch ms", "nearest ms", "stochastic ms", "nearest GB/s", "speedup",
                 "stochastic/nearest", "torch wall ms", "nearest wall ms", "wall speedup"], rows)


if __name__ == "__main__":
    main()
