"""INT8: mixprec's fused quantization and Int8Linear vs the eager torch code / bf16 layer, same inputs, same run.

Quantization, on an activation-sized bf16 matrix (8192 tokens x 4096 features; --quick: 1024 x 1024):
  per row     amax, step, rounded and saturated codes:  torch  x.abs().amax(1), amax / 127, * (1 / step), round,
              clamp, to(int8)
  per column  the same along columns (a weight for the input-gradient product)
  per group   groups of 128 along rows (INT4-style weights use such groups)
  stochastic  per row with stochastic rounding (torch's line: nearest rounding, no cheaper eager equivalent)
  fake quant  QAT's quantize -> dequantize with per-row steps, bf16 in and out: torch
              fake_quantize_per_channel_affine (fp32 only, so a cast first)
Bytes moved = the input read once + the codes written once, so "GB/s" and "% of copy" say how close each op
is to the memory bound.

Then a Linear layer's forward + backward (bf16 weights and activations) on the GPT-2, 1B and 8B layer shapes
at 8192 tokens: torch.nn.Linear in bf16 against mixprec.nn.Int8Linear with SwitchBack's GEMMs (INT8 output and
input gradient, bf16 weight gradient), the same on a later micro-batch of a gradient-accumulation cycle
(is_first_microbatch=False: the weight's INT8 operands are reused, not quantized again), with all three GEMMs
in INT8, and torchao's INT8 mixed-precision
training when torchao is installed. On the CPU the shapes are divided by 8 and the INT8 GEMM is the exact
float64 reference: the figures there say what checking costs, not what INT8 gains.

    python benchmarks/bench_int8.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import layer_cases, measure, print_bandwidth_table, print_device_header, print_table

import mixprec
from mixprec import int8


def torch_quantize(x: torch.Tensor, dim: int | None, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager version: amax, scale, round, clamp, cast (three or more passes over x)."""
    m = x.float()
    if group is not None:
        m = m.reshape(x.shape[0], -1, group)
        dim = -1
    amax = m.abs().amax(dim=dim, keepdim=True)
    step = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    data = (m * (1.0 / step)).round().clamp(-127, 127).to(torch.int8)
    return data.reshape(x.shape), step


def torchao_layer(base: torch.nn.Linear) -> torch.nn.Module | None:
    """torchao's INT8 mixed-precision training layer around a copy of `base`, or None without torchao."""
    try:
        from torchao import quantize_
        from torchao.prototype.quantized_training import int8_mixed_precision_training
    except ImportError:
        return None
    model = torch.nn.Sequential(copy.deepcopy(base))
    quantize_(model, int8_mixed_precision_training())
    return model


def quantize_table(device: str, quick: bool) -> None:
    rows, cols = (1024, 1024) if quick else (8192, 4096)
    x = (torch.randn(rows, cols, device=device) * 3).bfloat16()
    nbytes = 3 * x.numel()  # bf16 read + int8 written
    steps = (x.float().abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    zero_points = torch.zeros(rows, dtype=torch.int32, device=device)
    cases = [
        ("per row", nbytes, lambda: torch_quantize(x, 1), lambda: int8.quantize(x, (1, -1))),
        ("per column", nbytes, lambda: torch_quantize(x, 0), lambda: int8.quantize(x, (-1, 1))),
        ("per group of 128", nbytes, lambda: torch_quantize(x, None, 128), lambda: int8.quantize(x, (1, 128))),
        ("per row, stochastic (torch: nearest)", nbytes, lambda: torch_quantize(x, 1),
         lambda: int8.quantize(x, (1, -1), rounding="stochastic", seed=1)),
        # QAT's fake quantization with per-row steps; torch's fused op takes fp32 only (a cast first).
        ("fake quantize per row (bf16 -> bf16)", 4 * x.numel(),
         lambda: torch.fake_quantize_per_channel_affine(x.float(), steps.reshape(-1), zero_points, 0, -127, 127),
         lambda: int8.fake_quantize(x, steps, -127, 127, (1, -1))),
    ]
    print(f"bf16 input [{rows}, {cols}] -> int8")
    print_bandwidth_table(cases, device)


def linear_table(device: str, quick: bool) -> None:
    cuda = device.startswith("cuda")
    table = []
    for case in layer_cases(device, quick):
        base, step = case.base, case.step
        layers = {"bf16": base}
        for key, gemms in (("switchback", mixprec.nn.Int8Gemms()), ("all", mixprec.nn.Int8Gemms(weight_grad=True))):
            layers[key] = mixprec.nn.Int8Linear.from_linear(copy.deepcopy(base), gemms)
        ao = torchao_layer(base) if cuda else None
        if ao is not None:
            layers["torchao"] = ao
        times = {key: measure(step(layer), device) for key, layer in layers.items()}
        times["cached"] = measure(case.cached_step(layers["switchback"]), device)
        ref = times["bf16"]
        row = [case.label, f"{ref.device * 1e3:.3f}"]
        for key in ("switchback", "cached", "all"):
            row += [f"{times[key].device * 1e3:.3f}", f"{ref.device / times[key].device:.2f}x"]
        row += [f"{times['torchao'].device * 1e3:.3f}" if "torchao" in times else "-",
                f"{times['torchao'].device / times['switchback'].device:.2f}x" if "torchao" in times else "-",
                f"{ref.wall * 1e3:.3f}", f"{times['switchback'].wall * 1e3:.3f}"]
        table.append(row)
    print("Linear forward + backward, bf16 weights and activations (ms; speedups vs bf16; vs torchao: its time / ours)")
    print_table(["layer", "bf16 ms", "int8 switchback ms", "speedup", "switchback, cached weight ms", "speedup",
                 "int8 all GEMMs ms", "speedup", "torchao ms",
                 "ours vs torchao", "bf16 wall ms", "switchback wall ms"], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    print_device_header(args.device)
    quantize_table(args.device, args.quick)
    print()
    linear_table(args.device, args.quick)


if __name__ == "__main__":
    main()
