"""mixprec.GradScaler against torch.amp.GradScaler step for step, plus what torch's lacks."""

from __future__ import annotations

import math
import os
import socket
import sys
import textwrap
import subprocess
from typing import Callable
from unittest import mock

import pytest
import torch
from conftest import DEVICES, EXIT_NOW, SHARDED_MLP

import mixprec
from mixprec import ops


def make_model(seed: int, device: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)


def run(scaler_cls: type, device: str, body: Callable, steps: int = 40, **scaler_kwargs) -> tuple:
    """Train a small model with `body(i, model, opt, scaler, x)` per step; return the scales seen, the
    final parameters and the scaler's state dict."""
    model = make_model(0, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = scaler_cls(device, init_scale=2.0**10, growth_interval=3, **scaler_kwargs)
    gen = torch.Generator().manual_seed(1)
    scales = []
    for i in range(steps):
        x = torch.randn(6, 8, generator=gen).to(device)
        body(i, model, opt, scaler, x)
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()], scaler.state_dict()


def assert_same_runs(body: Callable, device: str = "cpu", **kw) -> None:
    a = run(torch.amp.GradScaler, device, body, **kw)
    b = run(mixprec.GradScaler, device, body, **kw)
    assert a[0] == b[0], "scale histories differ"
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)
    assert {k: b[2][k] for k in a[2]} == a[2]


def plant_inf(i: int, model: torch.nn.Module) -> None:
    if i in (4, 5, 13, 21):
        model[0].weight.grad.view(-1)[i] = math.inf if i % 2 else math.nan


@pytest.mark.parametrize("device", DEVICES)
def test_unscale_then_clip(device: str) -> None:
    def body(i, model, opt, scaler, x):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        plant_inf(i, model)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()

    assert_same_runs(body, device)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation(device: str) -> None:
    def body(i, model, opt, scaler, x):
        opt.zero_grad()
        for chunk in x.chunk(3):
            scaler.scale(model(chunk).pow(2).mean() / 3).backward()
        plant_inf(i, model)
        scaler.step(opt)
        scaler.update()

    assert_same_runs(body, device)


def test_multiple_optimizers_and_losses() -> None:
    def body(i, model, opt, scaler, x):
        # a second optimizer over the last layer only, created once per model
        if not hasattr(model, "opt2"):
            model.opt2 = torch.optim.Adam(model[2].parameters(), lr=1e-3)
        opt2 = model.opt2
        opt.zero_grad()
        opt2.zero_grad()
        out = model(x)
        loss1, loss2 = out.pow(2).mean(), out.abs().mean()
        scaler.scale(loss1).backward(retain_graph=True)
        scaler.scale(loss2).backward()
        plant_inf(i, model)
        scaler.step(opt)
        scaler.step(opt2)
        scaler.update()

    assert_same_runs(body)


def test_gradient_penalty_through_scaled_outputs() -> None:
    def body(i, model, opt, scaler, x):
        opt.zero_grad()
        x = x.requires_grad_()
        out = model(x)
        scaled_grads = torch.autograd.grad(scaler.scale(out.sum()), [x], create_graph=True)
        inv = 1.0 / scaler.get_scale()
        penalty = sum((g * inv).pow(2).sum() for g in scaled_grads)
        scaler.scale(out.pow(2).mean() + penalty).backward()
        scaler.step(opt)
        scaler.update()

    assert_same_runs(body, steps=10)


def test_disabled_is_a_pass_through() -> None:
    def body(i, model, opt, scaler, x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        assert scaler.scale(loss) is loss
        loss.backward()
        scaler.step(opt)
        scaler.update()

    a = run(torch.amp.GradScaler, "cpu", body, enabled=False)
    b = run(mixprec.GradScaler, "cpu", body, enabled=False)
    assert a[0] == b[0] == [1.0] * 40 and a[2] == b[2] == {}
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_state_dict_round_trips_both_ways_and_update_new_scale() -> None:
    ours = mixprec.GradScaler("cpu", init_scale=300.0, growth_interval=7, hysteresis=2, max_scale=1e6)
    ours.update(512.0)
    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(ours.state_dict())  # torch ignores our extra keys
    assert theirs.get_scale() == 512.0 and theirs.get_growth_interval() == 7
    back = mixprec.GradScaler("cpu", hysteresis=3)
    back.load_state_dict(theirs.state_dict())  # keys torch lacks keep their values
    assert back.get_scale() == 512.0 and back.state_dict()["hysteresis"] == 3
    back.load_state_dict(ours.state_dict())
    assert back.state_dict() == ours.state_dict()
    ours.update(torch.full((1,), 64.0))
    assert ours.get_scale() == 64.0
    with pytest.raises(RuntimeError, match="empty"):
        mixprec.GradScaler("cpu").load_state_dict({})


def test_a_loaded_max_scale_of_none_lifts_the_cap() -> None:
    """state_dict() saves "no cap" as ``max_scale: None``; loading it into a capped scaler removes the cap (the
    scale then grows past the old one), and loading a number puts a cap back."""
    def grow(scaler: mixprec.GradScaler, steps: int) -> list[float]:
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.0)
        seen = []
        for _ in range(steps):
            opt.zero_grad()
            scaler.scale(p.sum()).backward()
            scaler.step(opt)
            scaler.update()
            seen.append(scaler.get_scale())
        return seen

    uncapped = mixprec.GradScaler("cpu", init_scale=512.0, growth_interval=1)
    assert uncapped.state_dict()["max_scale"] is None
    capped = mixprec.GradScaler("cpu", init_scale=512.0, growth_interval=1, max_scale=1024.0)
    assert grow(capped, 3) == [1024.0, 1024.0, 1024.0]
    capped.load_state_dict(uncapped.state_dict())
    assert capped.state_dict()["max_scale"] is None
    assert grow(capped, 3) == [1024.0, 2048.0, 4096.0]
    capped.load_state_dict({**uncapped.state_dict(), "scale": 4096.0, "max_scale": 8192.0})
    assert grow(capped, 3) == [8192.0, 8192.0, 8192.0]


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
@pytest.mark.parametrize("turned", [True, False])
def test_overflow_tracking_switched_after_construction_survives_copies(copier: str, turned: bool) -> None:
    """set_track_overflows() after construction travels with the scaler's pickles and deep copies: the copy
    attributes its own overflows (or, switched off, records none)."""
    import copy
    import pickle

    scaler = mixprec.GradScaler("cpu", init_scale=8.0, track_overflows=not turned)
    scaler.set_track_overflows(turned)
    twin = pickle.loads(pickle.dumps(scaler)) if copier == "pickle" else copy.deepcopy(scaler)
    model = make_model(0, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin.scale(model(torch.ones(2, 8)).sum()).backward()
    model[0].bias.grad[3] = math.inf
    twin.step(opt)
    twin.update()
    report = twin.last_overflow(model)
    if turned:
        assert report is not None and [name for name, _ in report.sources] == ["0.bias"]
    else:
        assert report is None


def test_growth_and_backoff_follow_torch_exactly_over_many_steps() -> None:
    def body(i, model, opt, scaler, x):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if i % 7 == 3:
            model[2].bias.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()

    assert_same_runs(body, steps=120)


def test_hysteresis_bounds_and_static_mode() -> None:
    def overflow_every_step(i, model, opt, scaler, x):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        model[0].bias.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()

    scales, params, _ = run(mixprec.GradScaler, "cpu", overflow_every_step, steps=8, hysteresis=3, min_scale=64.0)
    # two overflows tolerated, then back off every step, floor at 64
    assert scales == [1024.0, 1024.0, 512.0, 256.0, 128.0, 64.0, 64.0, 64.0]
    assert all(torch.equal(a, b) for a, b in zip(params, [p.detach() for p in make_model(0, "cpu").parameters()]))
    static, _, _ = run(mixprec.GradScaler, "cpu", overflow_every_step, steps=5, dynamic=False)
    assert static == [1024.0] * 5


def test_call_order_errors() -> None:
    model = make_model(0, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 8)).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    scaler.update()
    fresh = mixprec.GradScaler("cpu")
    with pytest.raises(AssertionError, match="Attempted update but _scale is None"):  # torch's (see the parity test)
        fresh.update()
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: 0)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(init_scale=0.0), "init_scale"), (dict(growth_factor=1.0), "growth_factor"),
    (dict(backoff_factor=1.5), "backoff"), (dict(growth_interval=0), "growth_interval"),
    (dict(hysteresis=0), "hysteresis"), (dict(min_scale=10.0, max_scale=1.0), "min_scale"),
    (dict(init_scale=8.0, max_scale=4.0), r"init_scale \(8\) must lie within \[min_scale, max_scale\]"),
    (dict(init_scale=2.0, min_scale=4.0), r"init_scale \(2\) must lie within"),
])
def test_bad_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):  # the C++ scaler's checks, one for both front doors
        mixprec.GradScaler("cpu", **kwargs)


def test_a_cuda_scaler_without_cuda_disables_itself_with_a_warning_as_torch_does() -> None:
    """torch's rule, kept by the C++ scaler (so LibTorch gets it too): the same script runs unscaled on a machine
    without CUDA, and its settings are not checked (the scaler never uses them)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        with pytest.warns(UserWarning, match="CUDA is not available"):
            scaler = cls("cuda", growth_factor=0.5)
        assert not scaler.is_enabled() and scaler.state_dict() == {}
        loss = torch.tensor(3.0)
        assert scaler.scale(loss) is loss
    state = mixprec.GradScaler("cpu", init_scale=8.0).__getstate__()  # as a GPU machine pickles a CUDA scaler
    state["device"] = "cuda"
    restored = mixprec.GradScaler.__new__(mixprec.GradScaler)
    with pytest.warns(UserWarning, match="CUDA is not available"):  # unpickled where there is no GPU
        restored.__setstate__(state)
    assert not restored.is_enabled() and restored.get_scale() == 1.0


def test_init_scale_bounds_hold_for_later_settings_and_only_for_a_dynamic_scale() -> None:
    scaler = mixprec.GradScaler("cpu", init_scale=4.0, max_scale=8.0)
    with pytest.raises(ValueError, match="must lie within"):
        scaler._init_scale = 16.0  # torch's attribute, as code resetting a scaler writes it
    assert scaler._init_scale == 4.0
    static = mixprec.GradScaler("cpu", init_scale=16.0, max_scale=8.0, dynamic=False)  # never meets the bounds
    assert static.get_scale() == 16.0


def test_no_host_sync_with_mixprec_optimizers() -> None:
    """With a mixprec optimizer, scale/step/update never read a tensor back to the host: every path that
    could (Tensor.item, Tensor.__bool__, Tensor.tolist) is made to fail."""
    model = make_model(0, "cpu").bfloat16()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = mixprec.GradScaler("cpu", growth_interval=2)
    x = torch.randn(4, 8).bfloat16()
    w0 = model[0].weight.detach().clone()

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    with mock.patch.object(torch.Tensor, "item", boom), mock.patch.object(torch.Tensor, "__bool__", boom), \
            mock.patch.object(torch.Tensor, "tolist", boom):
        for i in range(4):
            opt.zero_grad()
            scaler.scale(model(x).float().pow(2).mean()).backward()
            if i == 1:
                model[0].weight.grad[0, 0].fill_(math.inf)  # a kernel; assigning a Python float would copy from the host
            scaler.step(opt)
            scaler.update()
    assert not torch.equal(model[0].weight.detach(), w0)
    assert opt.state[model[0].weight]["step"].item() == 3.0  # the overflowing step did not count
    assert scaler.get_scale() == 2.0**16  # backed off at step 1, grew back after steps 2 and 3


@pytest.mark.parametrize("init_scale", [256.0, 1000.0])
def test_fp32_bf16_and_fp16_grads_are_unscaled_in_one_call(init_scale: float) -> None:
    """One optimizer over fp32, fp16 and bf16 parameters: unscale_ divides each gradient in its own dtype as
    torch's own unscale kernel does (multiplying by the fp32 reciprocal of the scale, formed in double),
    bit for bit; a power-of-two scale is exact, 1000 exercises the rounding."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(37, 5).to(dtype)) for dtype in (torch.float32, torch.float16, torch.bfloat16)]
    for p in params:
        # magnitudes from tiny (fp16 subnormals after unscaling) to large
        p.grad = (torch.randn(p.shape) * torch.logspace(-6, 3, p.numel()).reshape(p.shape)).to(p.dtype)
    raw = [p.grad.clone() for p in params]
    opt = mixprec.optim.AdamW(params, lr=1e-3)
    scaler = mixprec.GradScaler("cpu", init_scale=init_scale)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as a scaled backward would
    scaler.unscale_(opt)
    inv = torch.full((), init_scale, dtype=torch.float64).reciprocal().float()
    for p, g in zip(params, raw):
        expected = g.clone()
        torch._amp_foreach_non_finite_check_and_unscale_([expected], torch.zeros(()), inv)
        assert torch.equal(p.grad, expected), p.dtype
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("device", DEVICES)
def test_complex_gradients_are_unscaled_and_checked_as_pairs_of_reals(device: str) -> None:
    """torch's scaler refuses complex gradients; mixprec's unscales them as their real and imaginary parts:
    a complex parameter trains as torch's scaler trains its (real, imag) pair, an inf in an imaginary part
    skips the step, and the overflow report names the parameter. A conjugate-view gradient is unscaled in
    place (through its memory), not in a copy."""
    torch.manual_seed(4)
    init = torch.randn(6, 3, dtype=torch.complex64)
    target = torch.randn(6, 3, dtype=torch.complex64)
    c = torch.nn.Parameter(init.clone().to(device))
    pair = [torch.nn.Parameter(init.real.clone().to(device)), torch.nn.Parameter(init.imag.clone().to(device))]
    with pytest.raises(NotImplementedError):  # what torch's scaler does with a complex gradient
        s = torch.amp.GradScaler(device)
        s.scale((c.abs() ** 2).sum()).backward()
        s.unscale_(torch.optim.SGD([c], lr=0.1))
    c.grad = None
    ours, ref = mixprec.GradScaler(device, init_scale=2.0**12), torch.amp.GradScaler(device, init_scale=2.0**12)
    ours.set_track_overflows(True)
    opt, opt_ref = torch.optim.SGD([c], lr=0.05), torch.optim.SGD(pair, lr=0.05)
    t = target.to(device)
    for i in range(6):
        # SGD's complex axpy rounds differently from two real ones (by an ulp): the pair restarts from the
        # complex parameter each step, so that the gradients compare bit for bit.
        with torch.no_grad():
            pair[0].copy_(c.real)
            pair[1].copy_(c.imag)
        before = c.detach().clone()
        opt.zero_grad()
        opt_ref.zero_grad()
        ours.scale(torch.view_as_real(c - t).pow(2).sum()).backward()
        ref.scale((pair[0] - t.real).pow(2).sum() + (pair[1] - t.imag).pow(2).sum()).backward()
        if i == 2:
            torch.view_as_real(c.grad)[1, 1, 1] = math.inf  # the imaginary part only
            pair[1].grad[1, 1] = math.inf
        for scaler, o in ((ours, opt), (ref, opt_ref)):
            scaler.unscale_(o)
        # The unscaled gradients, bit for bit (the inf included).
        assert torch.equal(torch.view_as_real(c.grad), torch.stack([p.grad for p in pair], -1))
        for scaler, o in ((ours, opt), (ref, opt_ref)):
            scaler.step(o)
            scaler.update()
        assert ours.get_scale() == ref.get_scale()
        assert torch.equal(c.detach(), before) == (i == 2)  # only the overflowing step is skipped
        torch.testing.assert_close(torch.view_as_real(c.detach()), torch.stack([p.detach() for p in pair], -1),
                                   rtol=1e-6, atol=1e-6)
    report = ours.last_overflow(torch.nn.ParameterDict({"c": c}))
    assert str(report) == "step 2 (loss scale 4096): c: inf (1 of 1 tensors)"
    # A gradient that is a conjugate view: unscaled in its own memory.
    g = torch.tensor([2.0 + 4.0j, -8.0j], device=device).conj()
    assert g.is_conj()
    c2 = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64, device=device))
    c2.grad = g
    scaler = mixprec.GradScaler(device, init_scale=2.0)
    scaler.scale(torch.ones((), device=device))
    scaler.unscale_(torch.optim.SGD([c2], lr=0.1))
    assert c2.grad is g and torch.equal(g.resolve_conj().cpu(), torch.tensor([1.0 - 2.0j, 4.0j]))


DDP_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import math, os, sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = mixprec.GradScaler("cpu", init_scale=1024.0, growth_interval=100, process_group=dist.group.WORLD)
    torch.manual_seed(100 + rank)
    steps = []
    for i in range(6):
        opt.zero_grad()
        scaler.scale(model(torch.randn(5, 8)).pow(2).mean()).backward()
        if i == 2 and rank == 1:  # an overflow on one rank only, after DDP's all-reduce of gradients
            model.module.weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        steps.append(opt.state[model.module.weight]["step"].item())
    torch.save({"params": [p.detach() for p in model.parameters()], "steps": steps, "scale": scaler.get_scale()},
               f"{out}.{rank}")
    dist.destroy_process_group()
    exit_now()
    """
)


def test_distributed_overflow_on_one_rank_skips_on_all(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), "2", str(port), out]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["steps"] == r1["steps"] == [1.0, 2.0, 2.0, 3.0, 4.0, 5.0]  # step 3 skipped on both ranks
    assert r0["scale"] == r1["scale"] == 512.0
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


WAIT_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, threading, time, torch, torch.distributed as dist
    import mixprec
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.ones(4))
    opt = mixprec.optim.AdamW([p], lr=1e-2)
    scaler = mixprec.GradScaler("cpu", process_group=dist.group.WORLD)
    ticks, stop = [0], threading.Event()

    def count() -> None:  # another Python thread of this process: it needs the GIL to count
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    dist.barrier()
    thread = threading.Thread(target=count)
    thread.start()
    scaler.scale(p.sum()).backward()
    if rank == 1:
        time.sleep(1.0)  # rank 0 waits in the scaler's all-reduce meanwhile
    before = ticks[0]
    t0 = time.perf_counter()
    scaler.unscale_(opt)
    waited, counted = time.perf_counter() - t0, ticks[0] - before
    scaler.step(opt)
    scaler.update()
    stop.set()
    thread.join()
    torch.save({"waited": waited, "counted": counted}, f"{out}.{rank}")
    dist.destroy_process_group()
    exit_now()
    """
)


def test_a_rank_waiting_in_the_scalers_all_reduce_lets_other_python_threads_run(tmp_path) -> None:
    """The overflow flag's all-reduce waits for the slowest rank. It waits without the GIL, as torch.distributed's
    own calls do: a data-loading or checkpoint-writing thread of that process keeps running meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    procs = [subprocess.Popen([sys.executable, "-c", WAIT_SCRIPT, str(r), str(port), out]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0 = torch.load(f"{out}.0")
    assert r0["waited"] > 0.5  # rank 0 did wait for rank 1
    assert r0["counted"] > 0.25 * r0["waited"] * 1000 / 2, r0  # the other thread ran through most of the wait


DDP_NO_GROUP_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import math, sys, torch, torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.join import Join
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = mixprec.GradScaler("cpu", init_scale=1024.0, growth_interval=100)  # no process_group
    torch.manual_seed(100 + rank)
    batches = [torch.randn(5, 8) for _ in range(6 if rank == 0 else 4)]  # uneven inputs: Join shadows rank 1
    batches[2][0, 0] = math.inf if rank == 1 else batches[2][0, 0]  # one rank's data, before DDP's reduction
    steps, scales = [], []
    with Join([model]):
        for x in batches:
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
            steps.append(opt.state[model.module.weight]["step"].item())
            scales.append(scaler.get_scale())
    torch.save({"steps": steps, "scales": scales, "params": [p.detach() for p in model.parameters()]}, f"{out}.{rank}")
    dist.destroy_process_group()
    exit_now()
    """
)


def test_ddp_needs_no_process_group_and_runs_under_join(tmp_path) -> None:
    """Without process_group (torch's scaler has none): an inf in one rank's batch reaches every rank through DDP's
    reduction (here fp16_compress_hook's), so every rank skips that step and backs off alike; and Join with
    uneven inputs runs (with process_group, gloo aborted on the extra all-reduce that Join cannot shadow)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    procs = [subprocess.Popen([sys.executable, "-c", DDP_NO_GROUP_SCRIPT, str(r), "2", str(port), out])
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r1["steps"] == r0["steps"][:4] == [1.0, 2.0, 2.0, 3.0]  # the third step skipped on both ranks
    assert r1["scales"] == r0["scales"][:4] == [1024.0, 1024.0, 512.0, 512.0]
    assert r0["steps"][4:] == [4.0, 5.0]  # rank 0's own batches after rank 1 joined
    for a, b in zip(r0["params"], r1["params"]):  # Join's closing broadcast
        assert torch.equal(a, b)


FSDP_SCRIPT = EXIT_NOW + SHARDED_MLP + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = sharded_mlp(8, 16, 4)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = mixprec.GradScaler("cpu", init_scale=256.0, process_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2 * world, 8, generator=gen) for _ in range(4)]
    for i, x in enumerate(batches):
        opt.zero_grad()
        scaler.scale(model(x.chunk(world)[rank]).pow(2).mean()).backward()
        if i == 1 and rank == 0:
            next(model.parameters()).grad.to_local()[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    full = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save({"params": full, "scale": scaler.get_scale()}, out)
    dist.destroy_process_group()
    exit_now()
    """
)


def test_fsdp2_fully_shard_with_mixprec_optimizer(tmp_path) -> None:
    """FSDP2 (fully_shard) on 2 gloo ranks: the fused step updates each rank's shard; the result equals one
    process training on the whole batch, and an overflow on one rank skips the step everywhere."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "fsdp.pt")
    procs = [subprocess.Popen([sys.executable, "-c", FSDP_SCRIPT, str(r), "2", str(port), out]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=180) == 0
    result = torch.load(out)
    # The same training without sharding, on the full batches (FSDP averages the two halves' gradients).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 8, generator=gen) for _ in range(4)]
    for i, x in enumerate(batches):
        if i == 1:
            continue  # skipped on both ranks
        opt.zero_grad()
        sum(model(half).pow(2).mean() for half in x.chunk(2)).div(2).backward()
        opt.step()
    for a, b in zip(result["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert result["scale"] == 128.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the sync check needs a GPU")
@pytest.mark.parametrize("track", [False, True])
def test_no_host_sync_on_cuda_with_mixprec_optimizer(track: bool) -> None:
    """torch.cuda.set_sync_debug_mode('error') turns every host synchronisation into an error."""
    model = make_model(0, "cuda").half()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = mixprec.GradScaler("cuda", growth_interval=2, track_overflows=track)
    x = torch.randn(4, 8, device="cuda").half()
    for _ in range(2):  # warm-up: lazy state creation may allocate from the host
        opt.zero_grad()
        scaler.scale(model(x).float().pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4):
            opt.zero_grad()
            scaler.scale(model(x).float().pow(2).mean()).backward()
            if i == 1:
                model[0].weight.grad[0, 0].fill_(math.inf)  # a kernel; assigning a Python float would copy from the host
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.state[model[0].weight]["step"].item() == 5.0
    if track:
        assert str(scaler.last_overflow(model)).startswith("step 3 (loss scale 65536): 0.weight: inf (1 of 4")


def test_a_step_patched_per_instance_does_not_keep_the_optimizer_alive() -> None:
    """Accelerate wraps ``optimizer.step`` in a new closure at every step; the scaler's check of the step's
    signature (for fused optimizers, as torch's) must not keep those closures, and the model, alive."""
    import gc
    import weakref

    def run() -> "weakref.ref[torch.Tensor]":
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # _step_supports_amp_scaling
        scaler = mixprec.GradScaler("cpu")
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.ones(2, 8)).sum()).backward()
            original = opt.step
            opt.step = lambda *a, _step=original, **k: _step(*a, **k)
            scaler.step(opt)
            scaler.update()
            opt.step = original
        return weakref.ref(model.weight)

    weight = run()
    gc.collect()
    assert weight() is None
