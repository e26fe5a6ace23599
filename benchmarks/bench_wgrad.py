"""Weight-gradient accumulation into an fp32 main_grad: the fused GEMM vs torch's composition.

For each linear layer of GPT-2 small (d=768) and of a 1B-parameter model (d=2048), with T tokens of bf16
activations x [T, in] and output gradients go [T, out]:
  ours         mixprec.ops.linear_wgrad_accum_(main_grad, go, x): one GEMM, 16-bit operands, fp32
               products and sums written straight into main_grad (beta = 1; cuBLASLt on CUDA)
  torch comp.  g = go.t() @ x in bf16 (the gradient autograd makes), then main_grad.add_(g.float())
  bf16 matmul  go.t() @ x alone: the rate of the GPU's bf16 GEMM on this shape, the ceiling we are held to
Columns: times, achieved TFLOP/s (2*T*in*out per call), ours as a fraction of the bf16 matmul rate and
the speedup over the composition. T defaults to 8192 on CUDA (8 x 1024-token sequences) and 1024 on CPU.

    python benchmarks/bench_wgrad.py [--device cpu|cuda] [--tokens T] [--dtype bf16|fp16] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from common import measure, print_device_header, print_table, time_it

import mixprec


def layer_shapes(d: int) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of one transformer block's linear layers."""
    return [("qkv", 3 * d, d), ("proj", d, d), ("fc1", 4 * d, d), ("fc2", d, 4 * d)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--quick", action="store_true", help="GPT-2 small only, fewer tokens: a smoke run")
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    tokens = args.tokens or (8192 if device.startswith("cuda") else 1024)
    if args.quick:
        tokens = min(tokens, 256)
    print_device_header(device)
    print(f"tokens per GEMM: {tokens}, operands {args.dtype}, accumulator fp32")
    models = [("gpt2-small", 768)] + ([] if args.quick else [("1B", 2048)])

    rows = []
    for model, d in models:
        for name, out_f, in_f in layer_shapes(d):
            torch.manual_seed(0)
            x = torch.randn(tokens, in_f, device=device).to(dtype)
            go = torch.randn(tokens, out_f, device=device).to(dtype)
            main_grad = torch.zeros(out_f, in_f, device=device)

            ours = measure(lambda: mixprec.ops.linear_wgrad_accum_(main_grad, go, x), device)
            t_ours = ours.device
            t_comp = time_it(lambda: main_grad.add_((go.t() @ x).float()), device)
            t_mm = time_it(lambda: go.t() @ x, device)
            flop = 2.0 * tokens * in_f * out_f
            rows.append([
                f"{model} {name}", f"{out_f}x{in_f}",
                f"{t_ours * 1e3:.3f}", f"{t_comp * 1e3:.3f}", f"{t_mm * 1e3:.3f}",
                f"{flop / t_ours / 1e12:.1f}", f"{flop / t_mm / 1e12:.1f}",
                f"{t_mm / t_ours:.0%}", f"{t_comp / t_ours:.2f}x", f"{ours.wall * 1e3:.3f}",
            ])
            del x, go, main_grad
    print_table(["layer", "out x in", "ours ms", "torch comp. ms", "bf16 mm ms", "ours TFLOP/s", "mm TFLOP/s",
                 "ours/mm rate", "speedup", "ours wall ms"], rows)


if __name__ == "__main__":
    main()
