"""Cross-cutting reliability: injected faults, exact resume in a fresh process, torch.compile."""

from __future__ import annotations

import copy
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import mixprec


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1)).bfloat16()


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 1, generator=gen) * 0.3
    out = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        out.append((x.bfloat16(), torch.sin(x @ w)))
    return out


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        tensors += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return tensors


def _run(steps: int, inject: set[int], skip: set[int], rng_seed: int = 0):
    """Train with fp16-style loss scaling; inf/NaN planted into random gradient tensors at `inject` steps;
    `skip` steps are simply not taken (the reference for what injection should amount to)."""
    model = _model()
    opt = mixprec.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    scaler = mixprec.GradScaler("cpu", init_scale=2.0**12, growth_interval=20, hysteresis=2, min_scale=1.0,
                                max_scale=2.0**14)
    rng = random.Random(rng_seed)
    params = list(model.parameters())
    losses = []
    skipped_ok = True
    for step, (x, y) in enumerate(_data(steps)):
        if step in skip:
            continue
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step in inject:
            target = rng.choice(params).grad.view(-1)
            target[rng.randrange(target.numel())] = rng.choice([math.inf, -math.inf, math.nan])
            before = _snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        if step in inject:
            after = _snapshot(model, opt)
            skipped_ok &= all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                              for a, b in zip(before, after))
        assert 1.0 <= scaler.get_scale() <= 2.0**14
        losses.append(loss.item())
    with torch.no_grad():
        final = sum(nn.functional.mse_loss(model(x).float(), y).item() for x, y in _data(steps)[-20:]) / 20
    return skipped_ok, final, losses


def test_fault_injection_skips_leave_everything_untouched() -> None:
    steps = 1000
    rng = random.Random(42)
    inject = set(rng.sample(range(steps), steps // 20))  # 5% of the steps
    ok, final_injected, _ = _run(steps, inject, set())
    assert ok, "an overflowing step changed parameters, masters, moments or step counts"
    _, final_reference, _ = _run(steps, set(), inject)
    assert abs(final_injected - final_reference) <= 0.01 * final_reference, (final_injected, final_reference)


RESUME_MODES = ["fp32", "remainder", "stochastic", "fp8-delayed"]
RESUME_SCRIPT = textwrap.dedent(
    """
    import random, sys, torch, mixprec
    from torch import nn
    phase, folder = sys.argv[1], sys.argv[2]  # "straight": steps 0-19, checkpointing after k; "resume": k-19
    for mode in sys.argv[3:]:
        k = random.Random(mode).randrange(3, 17)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1)).bfloat16()
        if mode == "fp8-delayed":  # every Linear in FP8, with a short amax window that the checkpoint cuts
            mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe(scaling="delayed", amax_history_len=4),
                               filter=lambda name, layer: True)
        kw = dict(fp32=dict(master_weights="fp32"), remainder=dict(master_weights="remainder"),
                  stochastic=dict(master_weights="none", rounding="stochastic", seed=3, moment_dtype=torch.bfloat16))
        opt = mixprec.optim.AdamW(model.parameters(), lr=3e-3, **kw.get(mode, kw["fp32"]))
        scaler = mixprec.GradScaler("cpu", init_scale=2.0**10, growth_interval=3, hysteresis=2)
        start = 0
        if phase == "resume":
            state = torch.load(f"{folder}/{mode}.ckpt.pt")
            model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
            scaler.load_state_dict(state["scaler"])
            start = k
        gen = torch.Generator().manual_seed(7)
        batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(20)]
        def save(path):
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, path)

        for step in range(start, 20):
            if phase == "straight" and step == k:
                save(f"{folder}/{mode}.ckpt.pt")
            x, y = batches[step]
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x.bfloat16()).float(), y)).backward()
            if step % 5 == 4:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt); scaler.update()
        save(f"{folder}/{mode}.{phase}.pt")
    """
)


def test_resume_in_a_fresh_process_is_bitwise(tmp_path) -> None:
    """A run checkpointed after step k and finished in a fresh process ends with the bits of the straight
    run: parameters, FP8 scaling state, optimizer state and scaler, for each master mode and for delayed
    FP8 scaling. All modes share one pair of processes (each start costs seconds of imports)."""
    for phase in ("straight", "resume"):
        subprocess.run([sys.executable, "-c", RESUME_SCRIPT, phase, str(tmp_path), *RESUME_MODES], check=True)
    for mode in RESUME_MODES:
        a, b = torch.load(tmp_path / f"{mode}.straight.pt"), torch.load(tmp_path / f"{mode}.resume.pt")
        assert a["model"].keys() == b["model"].keys()
        for key, v in a["model"].items():
            assert torch.equal(v.reshape(-1).view(torch.uint8), b["model"][key].reshape(-1).view(torch.uint8)), (mode, key)
        if mode == "fp8-delayed":  # the scaling state is in the model's state dict, and it moved
            history = a["model"]["0.fp8_forward_amax_history"]
            assert history.shape[0] == 4 and history.abs().sum() > 0
        for pid, st in a["opt"]["state"].items():
            for key, v in st.items():
                assert torch.equal(v, b["opt"]["state"][pid][key]), (mode, pid, key)
        assert a["scaler"] == b["scaler"], mode


def test_compile_fullgraph_training_step_uses_mixprec_ops() -> None:
    """A whole step (forward, backward, fused unscale+check, fused Adam, scale update) traces with
    torch.compile(fullgraph=True) and matches eager."""
    from mixprec import ops

    def make():
        torch.manual_seed(0)
        lin = nn.Linear(8, 4)
        params = list(lin.parameters())
        state = dict(m=[torch.zeros_like(p) for p in params], v=[torch.zeros_like(p) for p in params],
                     s=[torch.zeros(()) for _ in params], scale=torch.full((1,), 1024.0),
                     growth=torch.zeros(1, dtype=torch.int32), hyst=torch.ones(1, dtype=torch.int32),
                     found=torch.zeros(1))
        return lin, params, state

    def step(lin, params, st, x):
        loss = lin(x).pow(2).mean() * st["scale"]
        grads = torch.autograd.grad(loss, params)
        grads = [g.clone() for g in grads]
        st["found"].zero_()
        ops.unscale_and_check_(grads, st["found"], st["scale"].reciprocal())
        with torch.no_grad():
            ops.adam_step_([p.data for p in params], grads, st["m"], st["v"], [], st["s"], lr=1e-2, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.0, found_inf=st["found"])
        ops.update_scale_(st["scale"], st["growth"], st["hyst"], st["found"], 2.0, 0.5, 2)
        return loss.detach()

    x = torch.randn(5, 8)
    eager_lin, eager_params, eager_state = make()
    comp_lin, comp_params, comp_state = make()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    # The backward inside the step: dynamo traces torch.autograd.grad when asked to.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(3):
            step(eager_lin, eager_params, eager_state, x)
            compiled(comp_lin, comp_params, comp_state, x)
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(eager_state["scale"], comp_state["scale"]) and comp_state["s"][0].item() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: CUDA-graph capture needs a GPU")
def test_cuda_graph_capture_of_a_whole_step_matches_eager() -> None:
    """Forward, backward, fused unscale+check, fused Adam and the scale update captured in one CUDA graph
    (no host sync anywhere in the step) and replayed give the same results as eager execution."""
    from mixprec import ops

    def make():
        torch.manual_seed(0)
        lin = nn.Linear(64, 64).cuda().half()
        params = list(lin.parameters())
        st = dict(w=[p.detach().float() for p in params], m=[torch.zeros_like(p, dtype=torch.float32) for p in params],
                  v=[torch.zeros_like(p, dtype=torch.float32) for p in params],
                  s=[torch.zeros((), device="cuda") for _ in params], scale=torch.full((1,), 1024.0, device="cuda"),
                  growth=torch.zeros(1, dtype=torch.int32, device="cuda"),
                  hyst=torch.ones(1, dtype=torch.int32, device="cuda"), found=torch.zeros(1, device="cuda"))
        return lin, params, st

    def step(lin, params, st, x):
        for p in params:
            p.grad = None
        (lin(x).float().pow(2).mean() * st["scale"]).backward()
        grads = [p.grad for p in params]
        st["found"].zero_()
        ops.unscale_and_check_(grads, st["found"], st["scale"].reciprocal())
        ops.adam_step_([p.data for p in params], grads, st["m"], st["v"], st["w"], st["s"], lr=1e-3, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=0.0, master_mode="fp32", found_inf=st["found"])
        ops.update_scale_(st["scale"], st["growth"], st["hyst"], st["found"], 2.0, 0.5, 3)

    x = torch.randn(32, 64, device="cuda").half()
    eager = make()
    graphed = make()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as torch's graph docs ask
            step(*graphed, x)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        step(*eager, x)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            step(*graphed, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(5):
        graph.replay()
        step(*eager, x)
    torch.cuda.synchronize()
    for a, b in zip(eager[1], graphed[1]):
        assert torch.equal(a, b)
    assert torch.equal(eager[2]["scale"], graphed[2]["scale"]) and eager[2]["s"][0].item() == graphed[2]["s"][0].item()


def test_a_float64_default_dtype_changes_none_of_mixprecs_own_tensors() -> None:
    """Scientific code sets torch.set_default_dtype(torch.float64). The tensors mixprec makes for itself keep
    their dtypes (as C++ makes them, and as torch's GradScaler keeps its scale fp32): a float32 model trains
    with the scaler and the Monitor, underflow_report runs, a QAT input step is float32."""
    from mixprec import diagnostics, qat

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).float()
        opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = mixprec.GradScaler("cpu")
        monitor = mixprec.Monitor(model, scaler=scaler, sinks=[], every=1)
        for _ in range(2):
            opt.zero_grad()
            loss = model(torch.randn(4, 8, dtype=torch.float32)).square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            record = monitor.step(loss.item(), tokens=4)  # a Python number, as logging code passes
        assert record is not None and record["loss"] == pytest.approx(loss.item())
        assert diagnostics.underflow_report(model, scale=scaler.get_scale()) is not None
        layer = qat.prepare(torch.nn.Linear(4, 4).float(), qat.QATConfig(learnable_activation_scales=True))
        assert layer.input_step.dtype == torch.float32
        assert layer(torch.randn(2, 4, dtype=torch.float32)).dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)
