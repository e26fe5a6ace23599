"""End-to-end training step of a GPT-2-small-size model (forward, backward, optimizer), four ways in one run.

  fp32                 fp32 parameters and compute, torch.optim.AdamW(fused=True)
  torch.amp bf16       fp32 parameters, torch.autocast(bfloat16), torch.optim.AdamW(fused=True)
  mixprec bf16         bf16 parameters and compute (mixprec.Policy, norms in fp32), mixprec.nn.convert (fp32
                       weight gradients), mixprec.optim.AdamW with fp32 masters
  mixprec fp16         the same in fp16, with mixprec.GradScaler
  mixprec bf16 rem.    mixprec bf16 with master_weights="remainder" (bf16 parameter + int16 remainder: the
                       exact fp32 master in 4 bytes per parameter instead of 6)
  mixprec bf16 + FP8   mixprec bf16 with mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe()): the default
                       filter's Linears (all but the first and the tied head) as Float8Linear, delayed scaling,
                       E4M3 forward, E5M2 gradients (CUDA: sm_89 or newer)
  mixprec bf16 + INT8  the same with mixprec.nn.convert(model, int8=True): Int8Linear, SwitchBack's GEMMs

Every variant starts from the same weights and trains on the same batches (a few fixed batches, cycled, so
the loss falls within a short run). Reported per variant: tokens/s over the timed steps (after warm-up
steps), peak memory during training (CUDA: the allocator's peak; CPU: the process's peak resident size
above what was resident before the variant was built) and the resident training state (parameters, gradients,
optimizer state), and the loss at the last step, also relative to the first variant's; with mixprec bf16 in
the run, tokens/s relative to it too (the baseline of the 8-bit variants).

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--size gpt2-small|gpt2-medium|tiny] [--steps N]
                                   [--batch B] [--seq T] [--variants fp32,amp-bf16,...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from common import HostPeakMemory, print_device_header, print_table, sync
from torch import nn

import mixprec
from mixprec.demo import state_bytes

SIZES = {  # d_model, layers, heads, vocab, max context
    "gpt2-small": (768, 12, 12, 50257, 1024),
    "gpt2-medium": (1024, 24, 16, 50257, 1024),
    "tiny": (128, 2, 4, 1024, 256),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2's layout: token + position embeddings, pre-norm blocks, final norm, head tied to the embedding."""

    def __init__(self, d: int, layers: int, heads: int, vocab: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Variant:
    """One way of training: the model as it is set up, its optimizer, the forward's context, the scaler."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 forward_context: Callable[[], ContextManager[object]], scaler: Optional[mixprec.GradScaler] = None):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.forward_context, self.scaler = forward_context, scaler

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        self.optimizer.zero_grad(set_to_none=True)
        with self.forward_context():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()


KINDS = ("fp32", "amp-bf16", "mixprec-bf16", "mixprec-fp16", "mixprec-bf16-remainder", "mixprec-bf16-fp8",
         "mixprec-bf16-int8")


def make_variant(kind: str, size: str, device: torch.device) -> Variant:
    torch.manual_seed(0)
    model = GPT(*SIZES[size]).to(device)
    if kind == "fp32":
        return Variant("fp32", model, torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True),
                       contextlib.nullcontext)
    if kind == "amp-bf16":
        return Variant("torch.amp bf16 + fused AdamW", model,
                       torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True),
                       lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    dtype = "float16" if kind == "mixprec-fp16" else "bfloat16"
    policy = mixprec.Policy(f"params={dtype},compute={dtype},output=float32")
    eight_bit = {"fp8": {"fp8": mixprec.fp8.Recipe()}, "int8": {"int8": True}}.get(kind.rpartition("-")[2], {})
    mixprec.nn.convert(policy.apply(model), **eight_bit)
    groups: list[dict] = [{"params": list(model.parameters())}]
    if kind == "mixprec-bf16-remainder":  # norm layers stay fp32 under the policy: remainders for bf16 only
        groups = [{"params": [p for p in model.parameters() if p.dtype == torch.bfloat16],
                   "master_weights": "remainder"},
                  {"params": [p for p in model.parameters() if p.dtype != torch.bfloat16]}]
    optimizer = mixprec.optim.AdamW(groups, lr=3e-4)
    scaler = mixprec.GradScaler(device.type) if kind == "mixprec-fp16" else None
    label = {"mixprec-bf16": "mixprec bf16, fp32 masters", "mixprec-fp16": "mixprec fp16 + GradScaler, fp32 masters",
             "mixprec-bf16-remainder": "mixprec bf16, bf16 + int16 remainders",
             "mixprec-bf16-fp8": "mixprec bf16 + FP8 Linear (delayed)",
             "mixprec-bf16-int8": "mixprec bf16 + INT8 Linear"}[kind]
    return Variant(label, model, optimizer, lambda: mixprec.autocast(policy, device.type), scaler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="default: gpt2-small on CUDA; tiny on the CPU, where a 16-bit GPT-2-small step takes "
                             "minutes without native bf16/fp16 matrix units")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {','.join(KINDS)}; default: all (on CUDA, FP8 only on sm_89+)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.variants is None:
        fp8_ok = not cuda or torch.cuda.get_device_capability(device) >= (8, 9)
        args.variants = ",".join(k for k in KINDS if fp8_ok or not k.endswith("fp8"))
    unknown = set(args.variants.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {KINDS}")
    size = args.size or ("gpt2-small" if cuda else "tiny")
    steps = args.steps or (20 if cuda else 10)
    batch = args.batch or (8 if cuda else 4)
    seq = args.seq or (1024 if cuda else 128)
    vocab = SIZES[size][3]
    print_device_header(args.device)
    print(f"model {size}, batch {batch} x {seq} tokens, {args.warmup} warm-up + {steps} timed steps")

    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    results: list[tuple[str, str, float, float, float, float]] = []
    host_peak = HostPeakMemory()
    if not cuda:  # one-time costs (lazy initialisation, thread pools) would land on the first variant's peak
        make_variant(args.variants.split(",")[0], size, device).step(data[0])
    for kind in args.variants.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            host_peak.start()  # the model, its state and the steps' activations, above what was resident
        variant = make_variant(kind, size, device)
        for i in range(args.warmup):
            variant.step(data[i % len(data)])
        sync(args.device)
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + steps):
            loss = variant.step(data[i % len(data)])
        sync(args.device)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else host_peak.mib()
        state = state_bytes(variant.model, variant.optimizer) / 2**20
        results.append((kind, variant.name, steps * batch * seq / elapsed, peak, state, float(loss)))
        del variant

    base_tps, base_loss = results[0][2], results[0][5]
    bf16 = next((r for r in results if r[0] == "mixprec-bf16"), None)
    rows = [[name, f"{tps:,.0f}", f"{tps / base_tps:.2f}x"] + ([f"{tps / bf16[2]:.2f}x"] if bf16 else []) +
            ["-" if math.isnan(peak) else f"{peak:,.0f}", f"{state:,.0f}", f"{loss:.4f}",
             f"{(loss - base_loss) / base_loss:+.2%}"] + ([f"{(loss - bf16[5]) / bf16[5]:+.2%}"] if bf16 else [])
            for _, name, tps, peak, state, loss in results]
    base = results[0][1]
    print_table(["variant", "tokens/s", f"vs {base}"] + (["vs mixprec bf16"] if bf16 else []) +
                ["peak MiB", "state MiB", "loss", f"loss vs {base}"] + (["loss vs mixprec bf16"] if bf16 else []),
                rows)


if __name__ == "__main__":
    main()
