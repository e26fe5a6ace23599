"""What mixprec.Monitor and the GradScaler's overflow tracking cost per training step, on the demo's model.

Three variants train the same model on the same batches (mixprec.optim.AdamW, mixprec.GradScaler), taking
turns step by step (each step of each variant device-synchronised and timed alone, the order rotating), so
that drift in the machine's speed hits all of them alike:

  baseline        no monitor, no overflow tracking
  not logging     a Monitor whose interval is never reached: overflow tracking and the per-step bookkeeping
  every N         a Monitor logging every N steps (grad_stats pass, one host read, JSON lines; no TensorBoard)

Reported per round: each variant's mean step time and its overhead relative to the baseline of the same
round; the table gives the median over rounds and the range. A second table times the added pieces
themselves, many times over, on the same model: the scaler's step + update with and without overflow
tracking, Monitor.step between logs, and a logged Monitor.step; their sum per step (the logged one divided
by N) over the baseline step time is the overhead.
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


class Setup:
    """One variant's model, optimizer, scaler and monitor, built alike for every variant."""

    def __init__(self, variant: str, args: argparse.Namespace, log_dir: str) -> None:
        d, layers, heads, context, batch = SIZES[args.size]
        torch.manual_seed(0)
        device = torch.device(args.device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32  # CPUs emulate 16-bit GEMMs slowly
        self.model = CharTransformer(d, layers, heads, context).to(device=device, dtype=dtype)
        self.opt = mixprec.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scaler = mixprec.GradScaler(device.type, growth_interval=1000)
        self.monitor = None
        if variant != "baseline":
            every = 10**9 if variant == "not logging" else args.every
            self.monitor = mixprec.Monitor(self.model, self.scaler, every=every, log_dir=log_dir, sinks=("jsonl",))

    def step(self, xy: torch.Tensor) -> None:
        x, y = xy[:, :-1], xy[:, 1:]
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x).float().reshape(-1, 256), y.reshape(-1))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.monitor is not None:
            self.monitor.step(loss, tokens=x.numel())


def interleaved(variants: list[str], args: argparse.Namespace, data: torch.Tensor, log_dir: str) -> dict[str, float]:
    """Mean seconds per step of each variant, the variants taking turns step by step (the order rotating),
    so that a change in the machine's speed lands on all of them within milliseconds."""
    setups = {v: Setup(v, args, log_dir) for v in variants}
    context, batch = SIZES[args.size][3], SIZES[args.size][4]
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, data.numel() - context - 1, (args.warmup + args.steps, batch), generator=gen)
    xs = [torch.stack([data[s:s + context + 1] for s in row]).to(args.device) for row in starts]
    total = dict.fromkeys(variants, 0.0)
    for i, xy in enumerate(xs):
        for j in range(len(variants)):
            v = variants[(i + j) % len(variants)]
            sync(args.device)
            t0 = time.perf_counter()
            setups[v].step(xy)
            sync(args.device)
            if i >= args.warmup:
                total[v] += time.perf_counter() - t0
    return {v: t / args.steps for v, t in total.items()}


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
            for v, t in interleaved(variants, args, data, log_dir).items():
                times[v].append(t)
    rows = []
    for v in variants:
        overheads = [t / b - 1 for t, b in zip(times[v], times["baseline"])]
        rows.append([v, f"{statistics.median(times[v]) * 1e3:.3f}", f"{100 * statistics.median(overheads):+.2f}%",
                     f"{100 * min(overheads):+.2f}% .. {100 * max(overheads):+.2f}%"])
    base = statistics.median(times["baseline"])
    print(f"model {args.size} {SIZES[args.size]}, {args.steps} timed steps per variant x {args.rounds} rounds, "
          "the variants taking turns step by step")
    print_table(["variant", "median ms/step", "overhead vs baseline (median)", "range over rounds"], rows)
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
