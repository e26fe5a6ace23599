"""FP8 in four tables, each against the torch code that does the same job, same inputs, same run.

1. The eager overhead (first, in a fresh process): one forward + backward of a tiny layer (16 tokens,
   256 x 256), where the time is the host's (launching or running the small ops of quantization, scaling
   state and GEMMs): mixprec.nn.Float8Linear against bf16 torch.nn.Linear and torchao's float8 layer in
   eager mode (no torch.compile), when torchao is installed.
2. Quantization, on an activation-sized bf16 matrix (8192 tokens x 4096 features; --quick: 1024 x 1024):
     delayed    a given scale, amax recorded:  torch  amax = x.abs().amax(); (x * scale).clamp(+-max).to(fp8)
     delayed+T  the same and the transposed copy Hopper's FP8 GEMM needs:  torch  ... + data.t().contiguous()
     current    per-tensor current scaling (amax, scale, cast):  torch  amax, max / amax, then the cast
     1x128      DeepSeek-V3 activation blocks:  torch  per-block amax through a reshape, then the cast
     128x128    weight blocks, likewise
   Bytes moved = the input read once + every FP8 output written once (the minimum any implementation
   needs), so "GB/s" and "% of copy" say how close each op is to the memory bound.
3. The scaled GEMM alone (per-tensor E4M3, bf16 output) against the eager composition
   (a.float() * sa) @ (b.float() * sb).T: on the CPU mixprec's is the same emulation (the same bits) with the
   dequantization in one vectorised pass; on CUDA it is cuBLASLt's FP8 GEMM.
4. A Linear layer's forward + backward (bf16 weights and activations) on the GPT-2, 1B and 8B layer shapes
   at 8192 tokens: torch.nn.Linear in bf16 against Float8Linear (delayed scaling; delayed with the weight
   kept from the first micro-batch, as later micro-batches of gradient accumulation run; current scaling),
   and torchao's float8 training (tensorwise) when installed (on the CPU too, through torch's CPU
   _scaled_mm). On the CPU the shapes are divided by 8 and the FP8 GEMMs are the exact emulation: the
   figures there say what checking costs, not what FP8 gains.

    python benchmarks/bench_fp8.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from common import layer_cases, measure, print_bandwidth_table, print_device_header, print_table

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
    # First, in a fresh process: after the large tables the thread pool and allocator make every small op
    # slower on the CPU (about 2x for all three layers alike), which is not the layers' own cost.
    overhead_table(device)
    print()
    rows, cols = (1024, 1024) if args.quick else (8192, 4096)
    x = (torch.randn(rows, cols, device=device) * 3).bfloat16()
    scale = torch.tensor([100.0], device=device)
    n = x.numel()

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
    print(f"bf16 input [{rows}, {cols}] -> float8_e4m3fn")
    print_bandwidth_table(cases, device)
    print()
    gemm_table(device, args.quick)
    print()
    linear_table(device, args.quick)


def torchao_layer(base: torch.nn.Linear) -> torch.nn.Module | None:
    """torchao's float8 training layer (tensorwise scaling) around a copy of `base`, or None without torchao."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        return None
    import copy

    return convert_to_float8_training(torch.nn.Sequential(copy.deepcopy(base)))


def linear_table(device: str, quick: bool) -> None:
    cuda = device.startswith("cuda")
    table = []
    for case in layer_cases(device, quick):
        base, k, n, tokens = case.base, case.k, case.n, case.tokens
        step = case.step
        layers = {"bf16": base}
        for scaling in ("delayed", "current"):
            f8 = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            f8.load_state_dict(base.state_dict())
            layers[scaling] = mixprec.nn.Float8Linear.from_linear(f8, mixprec.fp8.Recipe(scaling=scaling))
        ao = torchao_layer(base)
        if ao is not None:
            layers["torchao"] = ao
        times = {key: measure(step(layer), device) for key, layer in layers.items()}
        times["cached"] = measure(case.cached_step(layers["delayed"]), device)
        flops = 3 * 2 * tokens * k * n  # forward, input gradient, weight gradient
        ref = times["bf16"]
        row = [case.label, f"{ref.device * 1e3:.3f}"]
        for key in ("delayed", "cached", "current"):
            row += [f"{times[key].device * 1e3:.3f}", f"{ref.device / times[key].device:.2f}x"]
        row += [f"{times['torchao'].device * 1e3:.3f}" if "torchao" in times else "-",
                f"{times['torchao'].device / times['delayed'].device:.2f}x" if "torchao" in times else "-",
                f"{flops / times['delayed'].device / 1e12:.1f}",
                f"{ref.wall * 1e3:.3f}", f"{times['delayed'].wall * 1e3:.3f}"]
        table.append(row)
    print("Linear forward + backward, bf16 weights and activations (ms; speedups vs bf16; vs torchao: its time / ours)")
    print_table(["layer", "bf16 ms", "fp8 delayed ms", "speedup", "delayed, cached weight ms", "speedup",
                 "fp8 current ms", "speedup", "torchao ms",
                 "ours vs torchao", "delayed TFLOP/s", "bf16 wall ms", "delayed wall ms"], table)


def gemm_table(device: str, quick: bool) -> None:
    cuda = device.startswith("cuda")
    shapes = [(16, 256, 256), (512, 384, 96), (512, 1792, 512), (2048, 1024, 1024)]
    if cuda and not quick:
        shapes += [(8192, 4096, 4096), (8192, 4096, 14336)]
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(E4M3)
        b = torch.randn(n, k, device=device).to(E4M3)
        sa, sb = torch.tensor([0.5], device=device), torch.tensor([0.25], device=device)
        base = measure(lambda: ((a.float() * sa) @ (b.float() * sb).t()).bfloat16(), device)
        ours = measure(lambda: fp8.gemm(a, b, sa, sb, torch.bfloat16), device)
        rows.append([f"[{m}x{k}]x[{k}x{n}]", f"{base.device * 1e3:.3f}", f"{ours.device * 1e3:.3f}",
                     f"{base.device / ours.device:.2f}x", f"{base.wall * 1e3:.3f}", f"{ours.wall * 1e3:.3f}"])
    print("fp8.gemm (per-tensor E4M3, bf16 out) vs torch's eager dequantize + fp32 matmul (ms)")
    print_table(["shape", "torch ms", "mixprec ms", "speedup", "torch wall ms", "mixprec wall ms"], rows)


def overhead_table(device: str, tokens: int = 16, features: int = 256, repeats: int = 200) -> None:
    """Wall time of a tiny layer's forward + backward, median of `repeats` synchronised calls."""
    torch.manual_seed(0)
    base = torch.nn.Linear(features, features, bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, features, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, features, device=device, dtype=torch.bfloat16)
    layers: dict[str, torch.nn.Module] = {"torch.nn.Linear bf16": base}
    for scaling in ("delayed", "current"):
        f8 = torch.nn.Linear(features, features, bias=False, device=device, dtype=torch.bfloat16)
        f8.load_state_dict(base.state_dict())
        layers[f"mixprec Float8Linear, {scaling}"] = mixprec.nn.Float8Linear.from_linear(
            f8, mixprec.fp8.Recipe(scaling=scaling))
    ao = torchao_layer(base)
    if ao is not None:
        layers["torchao float8 (tensorwise), eager"] = ao

    def step(layer: torch.nn.Module):
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(g)
        return run

    walls = {name: measure(step(layer), device, warmup=10, repeats=repeats).wall for name, layer in layers.items()}
    mine = walls["mixprec Float8Linear, delayed"]
    rows = [[name, f"{t * 1e6:.0f}", f"{t / mine:.2f}x"] for name, t in walls.items()]
    print(f"Eager overhead: forward + backward of a [{tokens}x{features}]x[{features}x{features}] layer "
          f"(wall us, median of {repeats}; the last column: its time / mixprec delayed's)")
    print_table(["layer", "wall us", "vs mixprec delayed"], rows)


if __name__ == "__main__":
    main()
