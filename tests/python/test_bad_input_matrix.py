"""One table of wrong inputs for every public op, class and function: each must fail with an error that
names the offending argument, and no tensor may be modified."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

import mixprec
from mixprec import ops


class World:
    """Fresh, known tensors for one case; `unchanged()` checks that none of them was written."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.g = [torch.randn(4), torch.randn(3).half()]
        self.found = torch.zeros(1)
        self.inv = torch.full((1,), 0.5)
        self.scale, self.growth, self.hyst = torch.full((1,), 8.0), torch.zeros(1, dtype=torch.int32), torch.ones(
            1, dtype=torch.int32)
        self.p = [torch.randn(4).bfloat16()]
        self.pg = [torch.randn(4)]
        self.m, self.v = [torch.zeros(4)], [torch.zeros(4)]
        self.w = [self.p[0].float()]
        self.s = [torch.zeros(())]
        self.dst = [torch.zeros(4, dtype=torch.float16)]
        self._all = [*self.g, self.found, self.inv, self.scale, self.growth, self.hyst, *self.p, *self.pg, *self.m,
                     *self.v, *self.w, *self.s, *self.dst]
        self._copies = [t.clone() for t in self._all]

    def unchanged(self) -> bool:
        return all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                   for a, b in zip(self._all, self._copies))


def adam(w: World, **over) -> None:
    args = dict(params=w.p, grads=w.pg, exp_avgs=w.m, exp_avg_sqs=w.v, masters=w.w, steps=w.s, lr=1e-2, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, master_mode="fp32")
    args.update(over)
    lists = [args.pop(k) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "masters", "steps")]
    ops.adam_step_(*lists, **args)


def _scaled_backward() -> tuple[torch.optim.Optimizer, mixprec.GradScaler]:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = mixprec.GradScaler("cpu")
    s.scale(model(torch.ones(1, 2)).sum()).backward()
    return opt, s


def scaler_update_before_step(w) -> None:  # noqa: ANN001
    scaler = mixprec.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    scaler.update()


def scaler_twice(w: World) -> None:
    opt, s = _scaled_backward()
    s.unscale_(opt)
    s.unscale_(opt)


def scaler_step_twice(w: World) -> None:
    opt, s = _scaled_backward()
    s.step(opt)
    s.step(opt)


CASES: list[tuple[str, Callable[[World], object], type, str]] = [
    # unscale_and_check_ / unscale_and_check_sumsq_
    ("unscale: integer grad", lambda w: ops.unscale_and_check_(w.g + [torch.ones(2, dtype=torch.int64)], w.found, w.inv), RuntimeError, r"grads\[2\]"),
    ("unscale: sparse grad", lambda w: ops.unscale_and_check_(w.g + [torch.ones(2).to_sparse()], w.found, w.inv), RuntimeError, r"grads\[2\].*sparse"),
    ("unscale: found_inf shape", lambda w: ops.unscale_and_check_(w.g, torch.zeros(2), w.inv), RuntimeError, "found_inf"),
    ("unscale: found_inf dtype", lambda w: ops.unscale_and_check_(w.g, torch.zeros(1, dtype=torch.int32), w.inv), RuntimeError, "found_inf"),
    ("unscale: inv_scale dtype", lambda w: ops.unscale_and_check_sumsq_(w.g, w.found, w.inv.double()), RuntimeError, "inv_scale"),
    ("unscale: amax length", lambda w: ops.unscale_and_check_(w.g, w.found, w.inv, torch.zeros(3)), RuntimeError,
     r"amax.*one entry per gradient \(2\)"),
    ("unscale: amax dtype", lambda w: ops.unscale_and_check_sumsq_(w.g, w.found, w.inv, torch.zeros(2).half()),
     RuntimeError, "amax must be a contiguous float32"),
    ("unscale: amax strided", lambda w: ops.unscale_and_check_(w.g, w.found, w.inv, torch.zeros(4)[::2]), RuntimeError,
     "amax must be a contiguous"),
    # update_scale_
    ("update: growth_factor", lambda w: ops.update_scale_(w.scale, w.growth, w.hyst, w.found, -2.0, 0.5, 10), RuntimeError, "growth_factor"),
    ("update: backoff_factor", lambda w: ops.update_scale_(w.scale, w.growth, w.hyst, w.found, 2.0, 0.0, 10), RuntimeError, "backoff_factor"),
    ("update: growth_interval", lambda w: ops.update_scale_(w.scale, w.growth, w.hyst, w.found, 2.0, 0.5, -1), RuntimeError, "growth_interval"),
    ("update: hysteresis", lambda w: ops.update_scale_(w.scale, w.growth, w.hyst, w.found, 2.0, 0.5, 10, 0), RuntimeError, "hysteresis"),
    ("update: bounds", lambda w: ops.update_scale_(w.scale, w.growth, w.hyst, w.found, 2.0, 0.5, 10, 1, 4.0, 2.0), RuntimeError, "min_scale"),
    ("update: tracker dtype", lambda w: ops.update_scale_(w.scale, w.growth.long(), w.hyst, w.found, 2.0, 0.5, 10), RuntimeError, "growth_tracker"),
    ("update: scale shape", lambda w: ops.update_scale_(torch.ones(2), w.growth, w.hyst, w.found, 2.0, 0.5, 10), RuntimeError, "scale"),
    # casts
    ("cast: unknown rounding", lambda w: ops.cast(w.pg[0], torch.float16, "down"), RuntimeError, "rounding"),
    ("cast: integer src", lambda w: ops.cast(torch.ones(2, dtype=torch.int32), torch.float16), RuntimeError, r"src\[0\]"),
    ("cast: float64 dst", lambda w: ops.cast(w.pg[0], torch.float64), RuntimeError,
     "mixprec::cast: dtype must be float32, float16 or bfloat16"),
    ("cast_: list lengths", lambda w: ops.cast_(w.dst, []), RuntimeError, "same length"),
    ("cast_: shapes", lambda w: ops.cast_(w.dst, [torch.ones(5)]), RuntimeError, "shape"),
    ("cast_: sparse src", lambda w: ops.cast_(w.dst, [torch.ones(4).to_sparse()]), RuntimeError, r"src\[0\]"),
    ("split: dtype", lambda w: ops.split_bf16_remainder(w.p[0]), RuntimeError, "float32"),
    ("merge: remainder dtype", lambda w: ops.merge_bf16_remainder(w.p[0], torch.zeros(4)), RuntimeError, "int16"),
    # adam_step_
    ("adam: beta1", lambda w: adam(w, beta1=1.0), RuntimeError, "beta1"),
    ("adam: master mode", lambda w: adam(w, master_mode="fp64"), RuntimeError, "master_mode"),
    ("adam: list length", lambda w: adam(w, exp_avgs=[]), RuntimeError, "exp_avgs"),
    ("adam: grad shape", lambda w: adam(w, grads=[torch.ones(5)]), RuntimeError, r"grads\[0\]"),
    ("adam: sparse grad", lambda w: adam(w, grads=[torch.ones(4).to_sparse()]), RuntimeError, "sparse"),
    ("adam: master dtype", lambda w: adam(w, masters=[torch.zeros(4).half()]), RuntimeError, r"masters\[0\]"),
    ("adam: step dtype", lambda w: adam(w, steps=[torch.zeros((), dtype=torch.int64)]), RuntimeError, r"steps\[0\]"),
    ("adam: found_inf shape", lambda w: adam(w, found_inf=torch.zeros(3)), RuntimeError, "found_inf"),
    # linear_wgrad_accum_
    ("wgrad: main_grad dtype", lambda w: ops.linear_wgrad_accum_(w.dst[0].reshape(2, 2), torch.ones(3, 2), torch.ones(3, 2)),
     RuntimeError, "main_grad must be float32"),
    ("wgrad: batch mismatch", lambda w: ops.linear_wgrad_accum_(w.m[0].reshape(2, 2), torch.ones(3, 2), torch.ones(4, 2)),
     RuntimeError, "leading"),
    # fp8 (amax_history, scale and scale_inv are the world's tensors: nothing of them may change)
    ("fp8 quantize: dtype", lambda w: mixprec.fp8.quantize(w.g[0], w.inv, torch.float16), ValueError, "dtype must be"),
    ("fp8 quantize: scale", lambda w: mixprec.fp8.quantize(w.g[0], w.growth), RuntimeError, "scale must be"),
    ("fp8 quantize: integer input", lambda w: mixprec.fp8.quantize(w.growth, w.inv), RuntimeError, "input must be"),
    ("fp8 blockwise: block", lambda w: mixprec.fp8.quantize_blockwise(w.g[0], block=(1, 0)), ValueError, "block_cols"),
    ("fp8 update: scale shape", lambda w: mixprec.fp8.update_scales_(w.m[0].reshape(2, 2), w.v[0], w.inv),
     RuntimeError, r"scale must have shape \[2\]"),
    ("fp8 update: algo", lambda w: mixprec.fp8.update_scales_(w.m[0].reshape(4, 1), w.inv, w.found, algo="avg"),
     ValueError, "algo"),
    # classes and functions
    ("AdamW: negative lr", lambda w: mixprec.optim.AdamW(w.pg, lr=-1.0), ValueError, "learning rate"),
    ("AdamW: betas", lambda w: mixprec.optim.AdamW(w.pg, betas=(1.0, 0.9)), ValueError, "beta"),
    ("AdamW: master_weights", lambda w: mixprec.optim.AdamW(w.pg, master_weights="fp8"), ValueError, "master_weights"),
    ("GradScaler: growth", lambda w: mixprec.GradScaler("cpu", growth_factor=0.9), ValueError, "growth"),
    ("GradScaler: backoff", lambda w: mixprec.GradScaler("cpu", backoff_factor=2.0), ValueError, "backoff"),
    ("GradScaler: init_scale", lambda w: mixprec.GradScaler("cpu", init_scale=-1.0), ValueError, "init_scale"),
    ("GradScaler: hysteresis", lambda w: mixprec.GradScaler("cpu", hysteresis=0), ValueError, "hysteresis"),
    ("GradScaler: unscale_ twice", scaler_twice, RuntimeError, "already been called"),
    ("GradScaler: step twice", scaler_step_twice, RuntimeError, "already been called"),
    ("GradScaler: update before any scale()", lambda w: mixprec.GradScaler("cpu").update(), AssertionError,
     "Attempted update but _scale is None"),
    ("GradScaler: update before any step", scaler_update_before_step, AssertionError, "No inf checks"),
    ("GradScaler: load empty state", lambda w: mixprec.GradScaler("cpu").load_state_dict({}), RuntimeError, "empty"),
    ("Policy: unknown name", lambda w: mixprec.Policy("fp8-mixed"), RuntimeError, "accepted"),
    ("Policy: unknown dtype", lambda w: mixprec.Policy("params=float32,compute=fp8"), RuntimeError, "dtype"),
    ("autocast: unavailable device", lambda w: mixprec.autocast("mixed_float16", "meta"), RuntimeError, "not available"),
    ("Policy.apply: integer parameter", lambda w: mixprec.Policy("bfloat16").apply(_with_int_param()), TypeError,
     "ticks"),
]


def _with_int_param() -> nn.Module:
    m = nn.Linear(2, 2)
    m.ticks = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
    return m


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case) -> None:
    _, call, error, needle = case
    world = World()
    with pytest.raises(error, match=needle):
        call(world)
    assert world.unchanged(), "a tensor was modified before the error"
