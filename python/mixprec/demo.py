"""The main job: train a small character-level transformer on the text of Python's own standard library,
once in fp32 and once per mixed-precision policy, with mixprec's public API only, and show that mixed
precision trains as well as fp32, what it costs in time and memory, and what the loss scaler did.

Why this data: it is real text (about a megabyte of source code), it is on every machine that runs
Python, and a byte-level model on it learns fast enough that a CPU run of a minute or two shows clear
progress. Same seed, same initial weights, same batches in every run.

    python -m mixprec.demo [--steps 500] [--size small|tiny|gpt2ish] [--device cpu|cuda]
                           [--policies mixed_bfloat16 mixed_float16] [--out demo_out] [--log-every 50]

On CPU the default compares fp32 with mixed bf16 (bf16 params, fp32 masters, no loss scale): CPUs
without fp16 matrix units emulate fp16 products, which makes an fp16 run many times slower there. On
CUDA the default adds mixed fp16 with dynamic loss scaling, and on GPUs with FP8 tensor cores (sm_89+)
``mixed_bfloat16+fp8``: the same bf16 run with the transformer blocks' MLP layers as
mixprec.nn.Float8Linear (delayed scaling, E4M3 forward, E5M2 gradients). Any policy name + "+fp8" works,
on the CPU too (through the exact emulation). --size gpt2ish suits a GPU.
Writes ``demo_out/loss.png`` (loss curves, loss scale with skipped steps marked),
``demo_out/results.json``, and per policy a mixprec.Monitor log in ``demo_out/tensorboard/<policy>``
(TensorBoard events when tensorboard is installed, and ``metrics.jsonl``: loss, loss scale, skipped steps
and their sources, fp16 underflow/overflow fractions, gradient norm, tokens/s, peak memory every
``--log-every`` steps): ``tensorboard --logdir demo_out/tensorboard``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import mixprec

SIZES = {  # d_model, layers, heads, context, batch
    "tiny": (64, 1, 2, 32, 16),
    "small": (128, 2, 4, 64, 32),
    "gpt2ish": (384, 6, 6, 256, 32),
}
FP8_SUFFIX = "+fp8"
COLUMNS = ["policy", "final loss", "best loss", "val loss", "tokens/s", "state MiB", "peak MiB", "skipped",
           "final scale"]


def stdlib_text(max_bytes: int = 1 << 20) -> bytes:
    """About `max_bytes` of Python's standard-library sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A byte-level GPT: token and position embeddings, pre-norm blocks, tied-free output head."""

    def __init__(self, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", torch.triu(torch.full((context, context), float("-inf")), 1), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = self.mask[:t, :t].to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


@dataclass
class RunResult:
    policy: str
    losses: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    skipped_steps: list = field(default_factory=list)
    val_loss: float = math.nan
    tokens_per_s: float = 0.0
    state_mib: float = 0.0
    peak_mib: float = math.nan
    final_scale: float = 1.0

    def row(self) -> list[str]:
        return [self.policy, f"{self.losses[-1]:.4f}", f"{min(self.losses):.4f}", f"{self.val_loss:.4f}",
                f"{self.tokens_per_s:,.0f}", f"{self.state_mib:.2f}",
                "-" if math.isnan(self.peak_mib) else f"{self.peak_mib:.1f}", str(len(self.skipped_steps)),
                f"{self.final_scale:g}"]


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state (masters, moments, steps): what training keeps resident."""
    seen = 0
    for p in model.parameters():
        seen += p.numel() * p.element_size()
        if p.grad is not None:
            seen += p.grad.numel() * p.grad.element_size()
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                seen += v.numel() * v.element_size()
    return seen


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context - 1, (steps, batch), generator=gen)
    offsets = torch.arange(context + 1)
    return [data[s[:, None] + offsets] for s in starts]


def train(policy_name: str, data: torch.Tensor, val: torch.Tensor, args: argparse.Namespace,
          progress: bool = True) -> RunResult:
    d, layers, heads, context, batch = SIZES[args.size]
    device = torch.device(args.device)
    use_fp8 = policy_name.endswith(FP8_SUFFIX)
    policy = mixprec.Policy(policy_name[: -len(FP8_SUFFIX)] if use_fp8 else policy_name)
    torch.manual_seed(args.seed)
    model = CharTransformer(d, layers, heads, context)
    if use_fp8:  # the MLPs' GEMMs in FP8; attention, embeddings and the head stay as the policy says
        mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe(), filter=lambda name, layer: ".mlp." in name)
    # Mixed policies keep the parameters in 16 bits with fp32 masters in the optimizer; fp32 stays fp32.
    if policy.compute_dtype != torch.float32:
        policy = mixprec.Policy(f"params={_short(policy.compute_dtype)},compute={_short(policy.compute_dtype)},"
                                "output=float32")
    model = policy.apply(model).to(device)
    optimizer = mixprec.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                    master_weights="fp32" if policy.param_dtype != torch.float32 else "auto")
    scaler = mixprec.GradScaler(device.type, init_scale=2.0**16, growth_interval=args.growth_interval,
                                enabled=policy.needs_loss_scaling)
    label = policy_name if policy_name == "float32" else f"{policy_name} (16-bit params, fp32 masters)"
    result = RunResult(label)
    train_batches = batches(data, args.steps, batch, context, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # TensorBoard events and JSON lines per policy, next to the plot (TensorBoard when it is installed).
    sinks = ["jsonl"]
    try:
        import tensorboard  # noqa: F401

        sinks.append("tensorboard")
    except ImportError:
        pass
    monitor = mixprec.Monitor(model, scaler if scaler.is_enabled() else None, every=args.log_every,
                              log_dir=str(Path(args.out) / "tensorboard" / policy_name), sinks=sinks)
    iterator = range(args.steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"{policy_name:>15}", unit="step", leave=True)
    start = time.perf_counter()
    for step in iterator:
        xy = train_batches[step].to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        optimizer.zero_grad()
        with mixprec.autocast(policy, device.type):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        skipped = scaler.is_enabled() and bool(optimizer.state[model.head.weight]["step"].item() < step + 1
                                                - len(result.skipped_steps))
        if skipped:
            result.skipped_steps.append(step)
        scaler.update()
        monitor.step(loss, tokens=x.numel())
        result.losses.append(loss.item())
        result.scales.append(scaler.get_scale())
        if progress:
            iterator.set_postfix(loss=f"{result.losses[-1]:.3f}", scale=f"{result.scales[-1]:g}")
    monitor.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
        result.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    elapsed = time.perf_counter() - start
    result.tokens_per_s = args.steps * batch * context / elapsed
    result.state_mib = state_bytes(model, optimizer) / 2**20
    result.final_scale = scaler.get_scale()
    with torch.no_grad(), mixprec.autocast(policy, device.type):
        vb = batches(val, 8, batch, context, args.seed + 1)
        result.val_loss = sum(nn.functional.cross_entropy(model(b[:, :-1].to(device)).float().reshape(-1, 256),
                                                          b[:, 1:].reshape(-1).to(device)).item() for b in vb) / len(vb)
    return result


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]


def format_table(results: list[RunResult]) -> str:
    rows = [COLUMNS] + [r.row() for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_scale) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 2])
    for r in results:
        ax_loss.plot(r.losses, label=r.policy, linewidth=1)
    ax_loss.set_ylabel("training loss (cross-entropy, nats/byte)")
    ax_loss.set_title("mixprec demo: byte-level transformer on Python's standard library")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for r in results:
        if any(s != 1.0 for s in r.scales):
            line, = ax_scale.plot(r.scales, label=f"loss scale, {r.policy}", linewidth=1)
            if r.skipped_steps:
                ax_scale.scatter(r.skipped_steps, [r.scales[s] for s in r.skipped_steps], marker="x",
                                 color=line.get_color(), label="skipped step (overflow)")
    ax_scale.set_yscale("log", base=2)
    ax_scale.set_xlabel("step")
    ax_scale.set_ylabel("loss scale")
    ax_scale.grid(alpha=0.3)
    if ax_scale.get_legend_handles_labels()[0]:
        ax_scale.legend()
    else:
        ax_scale.text(0.5, 0.5, "no loss scaling in these runs", ha="center", transform=ax_scale.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--policies", nargs="+", default=None,
                        help="mixed policies to compare with float32, each optionally with '+fp8' (the MLPs in FP8) "
                             "(default: mixed_bfloat16 on CPU, whose fp16 matrix products are emulated and slow; "
                             "mixed_float16, mixed_bfloat16 and, on sm_89+, mixed_bfloat16+fp8 on CUDA)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--growth-interval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--log-every", type=int, default=50,
                        help="mixprec.Monitor's interval: TensorBoard events and metrics.jsonl in OUT/tensorboard")
    args = parser.parse_args(argv)
    if args.policies is None:
        args.policies = ["mixed_float16", "mixed_bfloat16"] if args.device.startswith("cuda") else ["mixed_bfloat16"]
        if args.device.startswith("cuda") and torch.cuda.get_device_capability(args.device) >= (8, 9):
            args.policies.append("mixed_bfloat16" + FP8_SUFFIX)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    text = torch.tensor(list(stdlib_text()), dtype=torch.long)
    split = int(0.95 * text.numel())
    data, val = text[:split], text[split:]
    d, layers, heads, context, batch = SIZES[args.size]
    print(f"mixprec {mixprec.__version__} | device {args.device} | {text.numel() / 1e6:.2f} MB of stdlib source | "
          f"model d={d} layers={layers} heads={heads} context={context} batch={batch} | {args.steps} steps")
    results = [train(p, data, val, args, progress=not args.no_progress) for p in ["float32", *args.policies]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "loss.png")
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print()
    print(format_table(results))
    base = results[0]
    for r in results[1:]:
        gap = (r.losses[-1] - base.losses[-1]) / base.losses[-1]
        print(f"{r.policy}: final loss {100 * gap:+.2f}% vs fp32, {r.tokens_per_s / base.tokens_per_s:.2f}x its "
              f"tokens/s, {r.state_mib / base.state_mib:.2f}x its parameter+gradient+optimizer memory")
    print(f"plot: {out / 'loss.png'}")
    print(f"monitor logs (TensorBoard, metrics.jsonl): {out / 'tensorboard'}")
    return results


if __name__ == "__main__":
    main()
