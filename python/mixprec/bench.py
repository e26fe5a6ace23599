"""``python -m mixprec.bench``: precision tables for the demo's byte-level transformer.

Prints forward+backward time and memory per precision (with speedups over fp32), the fp32-vs-policy
output errors, and an fp16 underflow report of the model's gradients at the default loss scale.
"""

from __future__ import annotations

import argparse

import torch

from . import diagnostics
from .demo import SIZES, CharTransformer, stdlib_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    args = parser.parse_args(argv)
    d, layers, heads, context, batch = SIZES[args.size]
    torch.manual_seed(0)
    model = CharTransformer(d, layers, heads, context)
    text = torch.tensor(list(stdlib_text(1 << 16)), dtype=torch.long)
    x = torch.stack([text[i * context:(i + 1) * context] for i in range(batch)])

    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if args.device.startswith("cuda") else [])
    print(f"forward+backward, {args.size} model, batch {batch} x {context} tokens on {args.device}")
    print(f"{'dtype':>15} {'median ms':>10} {'memory MiB':>11} {'speedup':>8}")
    for r in diagnostics.benchmark_precision(model, [x], dtypes=dtypes, device=args.device):
        print(f"{str(r.dtype):>15} {r.seconds * 1e3:>10.2f} {r.peak_mib:>11.2f} {r.speedup:>7.2f}x")

    print("\noutput error against fp32")
    for policy in ("mixed_bfloat16", "bfloat16"):
        for e in diagnostics.compare_outputs(model, [x], policy, device_type=torch.device(args.device).type):
            print(f"  {policy:>15}: max abs {e.max_abs:.3g}, max rel {e.max_rel:.3g}, mean rel {e.mean_rel:.3g}")

    logits = model(x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x.reshape(-1)).backward()
    print("\n" + str(diagnostics.underflow_report(model, scale=2.0**16)))


if __name__ == "__main__":
    main()
