"""What mixprec.Monitor and the GradScaler's overflow tracking cost per training step, on the demo's model.

Three variants train the same model on the same batches (mixprec.optim.AdamW, mixprec.GradScaler), in
interleaved rounds so that drift in the machine's speed hits all of them alike:

  baseline        no monitor, no overflow tracking
  not logging     a Monitor whose interval is never reached: overflow tracking and the per-step bookkeeping
  every N         a Monitor logging every N steps (grad_stats pass, one host read, JSON lines; no TensorBoard)

Reported: median step time per variant (device-synchronised at the end of each round) and the overhead
relative to the baseline. On a noisy machine (a shared 2-core CPU) that difference is below the noise,
so a second table times the added pieces themselves, many times over, on the same model: the scaler's
step + update with and without overflow tracking, Monitor.step between logs, and a logged Monitor.step;
their sum per step (the logged one divided by N) over the baseline step time is the overhead.
Goals: < 0.5% not logging, < 2% logging every 100 steps.

    python benchmarks/bench_monitor.py [--device cpu|cuda] [--size tiny|small|gpt2ish] [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import print_device_header, print_table, sync
from torch import nn

import mixprec
from mixprec.demo import SIZES, CharTransformer


def run_round(variant: str, args: argparse.Namespace, data: torch.Tensor, log_dir: str) -> float:
    d, layers, heads, context, batch = SIZES[args.size]
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # CPUs emulate 16-bit GEMMs slowly
    model = CharTransformer(d, layers, heads, context).to(device=device, dtype=dtype)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = mixprec.GradScaler(device.type, growth_interval=1000)
    monitor = None
    if variant != "baseline":
        every = args.steps * 10 if variant == "not logging" else args.every
        monitor = mixprec.Monitor(model, scaler, every=every, log_dir=log_dir, sinks=("jsonl",))
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, data.numel() - context - 1, (args.warmup + args.steps, batch), generator=gen)
    xs = [torch.stack([data[s:s + context + 1] for s in row]).to(device) for row in starts]
    t0 = 0.0
    for i, xy in enumerate(xs):
        if i == args.warmup:
            sync(args.device)
            t0 = time.perf_counter()
        x, y = xy[:, :-1], xy[:, 1:]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float().reshape(-1, 256), y.reshape(-1))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if monitor is not None:
            monitor.step(loss, tokens=x.numel())
    sync(args.device)
    return (time.perf_counter() - t0) / args.steps


def per_call(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def added_costs(args: argparse.Namespace, log_dir: str, repeats: int = 300) -> dict[str, float]:
    """Seconds per call of each added piece, on the model's real gradients (held fixed)."""
    d, layers, heads, context, batch = SIZES[args.size]
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = CharTransformer(d, layers, heads, context).to(device=device, dtype=dtype)
    xy = torch.randint(0, 256, (batch, context + 1), device=device)
    loss = nn.functional.cross_entropy(model(xy[:, :-1]).float().reshape(-1, 256), xy[:, 1:].reshape(-1))
    out = {}
    # The gradients once, before any step changes the weights the graph saved (a backward through it after a
    # step would be refused, as with torch's optimizers); both variants' scalers start at the same scale.
    mixprec.GradScaler(device.type).scale(loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for track in (False, True):
        opt = mixprec.optim.AdamW(model.parameters(), lr=1e-12)  # a tiny lr: the weights barely move
        scaler = mixprec.GradScaler(device.type, growth_interval=10**9, track_overflows=track)
        scaler.scale(loss)  # creates the scale (the gradients are already scaled by the same init_scale)

        def step() -> None:
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)  # the same scaled gradients every time (both variants pay this copy)
            scaler.step(opt)
            scaler.update()

        out[f"step+update, track={track}"] = per_call(step, args.device, repeats)
    quiet = mixprec.Monitor(model, scaler, every=10**9, log_dir=log_dir, sinks=("jsonl",))
    out["Monitor.step, not logging"] = per_call(lambda: quiet.step(loss, tokens=batch * context), args.device, repeats)
    logging = mixprec.Monitor(model, scaler, every=1, log_dir=log_dir, sinks=("jsonl",))
    out["Monitor.step, logging"] = per_call(lambda: logging.step(loss, tokens=batch * context), args.device,
                                            max(20, repeats // 10))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    print_device_header(args.device)
    data = torch.randint(0, 256, (1 << 16,))
    variants = ["baseline", "not logging", f"every {args.every}"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(run_round(v, args, data, log_dir))
    base = statistics.median(times["baseline"])
    rows = []
    for v in variants:
        t = statistics.median(times[v])
        spread = (max(times[v]) - min(times[v])) / t
        rows.append([v, f"{t * 1e3:.3f}", f"{100 * spread:.1f}%", f"{100 * (t / base - 1):+.2f}%"])
    print(f"model {args.size} {SIZES[args.size]}, {args.steps} timed steps x {args.rounds} rounds")
    print_table(["variant", "median ms/step", "spread (max-min)", "overhead vs baseline"], rows)
    with tempfile.TemporaryDirectory() as log_dir:
        costs = added_costs(args, log_dir)
    tracking = costs["step+update, track=True"] - costs["step+update, track=False"]
    quiet = tracking + costs["Monitor.step, not logging"]
    logged = quiet + costs["Monitor.step, logging"] / args.every
    print()
    print("the added pieces, timed alone (host time, device-synchronised at the end of each loop)")
    print_table(["piece", "us per call"], [[k, f"{v * 1e6:.1f}"] for k, v in costs.items()])
    print_table(["per step", "added us", "% of a baseline step"],
                [["not logging (tracking + Monitor.step)", f"{quiet * 1e6:.1f}", f"{100 * quiet / base:.2f}%"],
                 [f"logging every {args.every}", f"{logged * 1e6:.1f}", f"{100 * logged / base:.2f}%"]])


if __name__ == "__main__":
    main()
