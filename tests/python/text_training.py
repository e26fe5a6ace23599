"""The small training run the FP8 and INT8 layer tests compare against bf16: the demo's byte-level
transformer on the standard library's text, 50 steps under bf16 autocast with mixprec's AdamW."""

from __future__ import annotations

import functools
from typing import Callable, Hashable, Optional

import torch
from torch import nn

import mixprec
from mixprec.demo import CharTransformer, stdlib_text

STEPS = 50
_losses: dict[Hashable, float] = {}


@functools.cache
def text_batches() -> tuple[torch.Tensor, ...]:
    text = torch.tensor(list(stdlib_text(1 << 16)), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, text.numel() - 33, (STEPS, 16), generator=gen)
    return tuple(text[s[:, None] + torch.arange(33)] for s in starts)


def train_on_text(key: Hashable, convert: Optional[Callable[[nn.Module], None]] = None) -> float:
    """Mean loss of the last 10 steps, with `convert(model)` applied before training (None: the bf16
    baseline); cached under `key` for the whole test session."""
    if key in _losses:
        return _losses[key]
    torch.manual_seed(0)
    model = CharTransformer(64, 2, 2, 32)
    if convert is not None:
        convert(model)
    opt = mixprec.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for b in text_batches():
        opt.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(b[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 256), b[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _losses[key] = sum(losses[-10:]) / 10
    return _losses[key]
