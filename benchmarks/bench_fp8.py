"""FP8 quantization: mixprec's fused ops vs the eager torch code that does the same job, same inputs,
same run.

Cases, on an activation-sized bf16 matrix (8192 tokens x 4096 features; --quick: 1024 x 1024):
  delayed    a given scale, amax recorded:  torch  amax = x.abs().amax(); (x * scale).clamp(+-max).to(fp8)
  delayed+T  the same and the transposed copy Hopper's FP8 GEMM needs:  torch  ... + data.t().contiguous()
  current    per-tensor current scaling (amax, scale, cast):  torch  amax, max / amax, then the cast
  1x128      DeepSeek-V3 activation blocks:  torch  per-block amax through a reshape, then the cast
  128x128    weight blocks, likewise
Bytes moved = the input read once + every FP8 output written once (the minimum any implementation
needs), so "GB/s" and "% of copy" say how close each op is to the memory bound.

    python benchmarks/bench_fp8.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, measure, print_device_header, print_table

import mixprec  # noqa: F401
from mixprec import fp8

E4M3 = torch.float8_e4m3fn
MAX = 448.0


def torch_blockwise(x: torch.Tensor, br: int, bc: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    blocks = x.float().reshape(rows // br, br, cols // bc, bc)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, MAX / amax, torch.ones_like(amax))
    data = (blocks * scale).clamp(-MAX, MAX).to(E4M3).reshape(rows, cols)
    return data, (1.0 / scale).reshape(rows // br, cols // bc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    device = args.device
    print_device_header(device)
    rows, cols = (1024, 1024) if args.quick else (8192, 4096)
    x = (torch.randn(rows, cols, device=device) * 3).bfloat16()
    scale = torch.tensor([100.0], device=device)
    n = x.numel()
    ceiling = copy_bandwidth(device) if device.startswith("cuda") else float("nan")

    def torch_delayed(transpose: bool):
        amax = x.abs().amax().float()
        data = (x.float() * scale).clamp(-MAX, MAX).to(E4M3)
        return data, data.t().contiguous() if transpose else None, amax

    def torch_current():
        amax = x.abs().amax().float()
        s = torch.where(amax > 0, MAX / amax, torch.ones_like(amax))
        return (x.float() * s).clamp(-MAX, MAX).to(E4M3), 1.0 / s

    cases = [
        ("delayed", n * 3, lambda: torch_delayed(False), lambda: fp8.quantize(x, scale, E4M3)),
        ("delayed+T", n * 4, lambda: torch_delayed(True), lambda: fp8.quantize(x, scale, E4M3, transpose=True)),
        ("current", n * 3, torch_current, lambda: fp8.quantize_blockwise(x, E4M3, (-1, -1))),
        ("1x128", n * 3, lambda: torch_blockwise(x, 1, 128), lambda: fp8.quantize_blockwise(x, E4M3, (1, 128))),
        ("128x128", n * 3, lambda: torch_blockwise(x, 128, 128),
         lambda: fp8.quantize_blockwise(x, E4M3, (128, 128))),
        ("delayed stochastic (torch: nearest)", n * 3, lambda: torch_delayed(False),
         lambda: fp8.quantize(x, scale, E4M3, rounding="stochastic", seed=1)),
    ]
    table = []
    for name, nbytes, base_fn, ours_fn in cases:
        base = measure(base_fn, device)
        ours = measure(ours_fn, device)
        gbs = nbytes / ours.device / 1e9
        table.append([name, f"{nbytes / 2**20:.0f}", f"{base.device * 1e3:.3f}", f"{ours.device * 1e3:.3f}",
                      f"{gbs:.1f}", f"{100 * gbs / ceiling:.0f}%" if ceiling == ceiling else "-",
                      f"{base.device / ours.device:.2f}x", f"{base.wall * 1e3:.3f}", f"{ours.wall * 1e3:.3f}",
                      f"{base.wall / ours.wall:.2f}x"])
    print(f"bf16 input [{rows}, {cols}] -> float8_e4m3fn")
    # device: the kernels alone; wall: a synchronised call as a user makes it (see common.Timing)
    print_table(["case", "MiB moved", "torch ms", "mixprec ms", "GB/s", "% of copy", "speedup", "torch wall ms",
                 "mixprec wall ms", "wall speedup"], table)


if __name__ == "__main__":
    main()
