"""adam_step_ and mixprec.optim.Adam/AdamW: parity with torch, master weights, remainders, stochastic
rounding, overflow skipping, checkpoints, opcheck, bad input."""

from __future__ import annotations

import collections
import copy
import io
import math

import pytest
import torch
from conftest import DEVICES, requires_cuda, run_with_cpu_capability

import mixprec
from mixprec import ops


def grads_for(step: int, shapes: list[tuple[int, ...]], device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(device) for s in shapes]


SHAPES = [(33, 17), (1000,), (5,), (64, 64)]


def assert_close_to_torch(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # The step's arithmetic follows torch's op for op; what remains is last-bit rounding (|diff| of a few
    # ulps of the parameter scale), so the bound is relative to max(|p|, 1).
    diff = (ours.double() - theirs.double()).abs()
    bound = 1e-6 * theirs.double().abs().clamp(min=1.0)
    assert torch.all(diff <= bound), f"max |diff| {diff.max().item():.3g}"


# ---- fp32 parameters: the same as torch.optim.Adam / AdamW -------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.05, False), (0.05, True)])
def test_fp32_matches_torch(device: str, cls_name: str, weight_decay: float, maximize: bool) -> None:
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    ours_p = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    ref_p = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}]  # noqa: E731
    ours = getattr(mixprec.optim, cls_name)(groups(ours_p), lr=1e-2, weight_decay=weight_decay, maximize=maximize)
    ref = getattr(torch.optim, cls_name)(groups(ref_p), lr=1e-2, weight_decay=weight_decay, maximize=maximize)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=30, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=30, gamma=0.5)
    for step in range(100):
        for ps in (ours_p, ref_p):
            for p, g in zip(ps, grads_for(step, SHAPES, device)):
                p.grad = g
        ours.step()
        ref.step()
        sched_ours.step()
        sched_ref.step()
    for a, b in zip(ours_p, ref_p):
        assert_close_to_torch(a.detach(), b.detach())
    for a, b in zip(ours_p, ref_p):
        assert ours.state[a]["step"].item() == 100
        assert_close_to_torch(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"])


def amsgrad_grads(step: int, shapes: list[tuple[int, ...]], device: str) -> list[torch.Tensor]:
    """Gradients 10x larger for the first steps, then 10x smaller: the second moment falls while its running
    maximum does not, so AMSGrad's steps differ from Adam's."""
    return [g * (10.0 if step < 10 else 0.1) for g in grads_for(step, shapes, device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls_name, weight_decay", [("AdamW", 0.01), ("Adam", 0.05)])
@pytest.mark.parametrize("maximize", [False, True])
def test_amsgrad_matches_torch(device: str, cls_name: str, weight_decay: float, maximize: bool) -> None:
    """amsgrad=True: the same parameters and state as torch's (max_exp_avg_sq included), and not Adam's."""
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    params = {k: [torch.nn.Parameter(t.clone().to(device)) for t in init] for k in ("ours", "ref", "plain")}
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay, maximize=maximize)
    ours = getattr(mixprec.optim, cls_name)(params["ours"], amsgrad=True, **kwargs)
    ref = getattr(torch.optim, cls_name)(params["ref"], amsgrad=True, foreach=False, **kwargs)
    plain = getattr(mixprec.optim, cls_name)(params["plain"], **kwargs)
    for step in range(40):
        for ps in params.values():
            for p, g in zip(ps, amsgrad_grads(step, SHAPES, device)):
                p.grad = g
        for opt in (ours, ref, plain):
            opt.step()
    for a, b, c in zip(params["ours"], params["ref"], params["plain"]):
        assert_close_to_torch(a.detach(), b.detach())
        assert (a.detach() - c.detach()).abs().max() > 1e-3  # AMSGrad changed the steps
        st, rs = ours.state[a], ref.state[b]
        assert st["max_exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(st["max_exp_avg_sq"], rs["max_exp_avg_sq"], rtol=1e-6, atol=0)
        # The running maximum: at least every second moment seen, above the current (decayed) one.
        assert torch.all(st["max_exp_avg_sq"] >= st["exp_avg_sq"]) and torch.any(st["max_exp_avg_sq"] > st["exp_avg_sq"])
    assert "max_exp_avg_sq" not in plain.state[params["plain"][0]]


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_amsgrad_state_dicts_cross_with_torch_and_masters_follow_it(moment_dtype: torch.dtype) -> None:
    """A torch AdamW(amsgrad=True) state dict loads into ours (and ours into torch's) and the runs go on alike;
    with bf16 params the fp32 masters follow torch's fp32 AMSGrad; bf16 moments keep a bf16 maximum."""
    torch.manual_seed(1)
    init = [torch.randn(s) for s in SHAPES]
    ref_p = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch.optim.AdamW(ref_p, lr=1e-2, amsgrad=True, foreach=False)
    for step in range(15):
        for p, g in zip(ref_p, amsgrad_grads(step, SHAPES, "cpu")):
            p.grad = g
        ref.step()
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    ours = mixprec.optim.AdamW(ours_p, lr=1e-2, amsgrad=True, moment_dtype=moment_dtype)
    ours.load_state_dict(ref.state_dict())
    back_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    for step in range(15, 25):
        for ps in (ref_p, ours_p):
            for p, g in zip(ps, amsgrad_grads(step, SHAPES, "cpu")):
                p.grad = g
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        if moment_dtype == torch.float32:
            assert_close_to_torch(a.detach(), b.detach())
        else:  # bf16 moments: an update within a few bf16 roundings of the moments
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=5e-3)
        assert ours.state[a]["max_exp_avg_sq"].dtype == moment_dtype
    # Ours into torch's: torch continues from our state as from its own.
    theirs = torch.optim.AdamW(back_p, lr=1e-2, amsgrad=True, foreach=False)
    if moment_dtype == torch.float32:
        theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # state dicts hold the live tensors
        for a, b in zip(back_p, ours_p):
            a.data.copy_(b.detach())
        for ps in (back_p, ours_p):
            for p, g in zip(ps, amsgrad_grads(30, SHAPES, "cpu")):
                p.grad = g
        theirs.step()
        ours.step()
        for a, b in zip(back_p, ours_p):
            assert_close_to_torch(b.detach(), a.detach())
    # bf16 params, fp32 masters: the masters follow torch's fp32 AMSGrad run from the same start.
    low = [torch.nn.Parameter(t.bfloat16()) for t in init]
    full = [torch.nn.Parameter(t.bfloat16().float()) for t in init]
    opt_low = mixprec.optim.AdamW(low, lr=1e-2, amsgrad=True, moment_dtype=moment_dtype)
    opt_full = torch.optim.AdamW(full, lr=1e-2, amsgrad=True, foreach=False)
    for step in range(25):
        grads = amsgrad_grads(step, SHAPES, "cpu")
        for p, q, g in zip(low, full, grads):
            p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
        opt_low.step()
        opt_full.step()
    for p, q in zip(low, full):
        master = opt_low.state[p]["master"]
        if moment_dtype == torch.float32:
            assert_close_to_torch(master, q.detach())
        assert torch.equal(p.detach(), master.bfloat16())


# ---- 16-bit parameters with fp32 masters ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masters_track_fp32_reference(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    init = [torch.randn(s) for s in SHAPES]
    low = [torch.nn.Parameter(t.to(dtype).to(device)) for t in init]
    ref_p = [torch.nn.Parameter(t.to(dtype).float().to(device)) for t in init]  # same starting values
    ours = mixprec.optim.AdamW(low, lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(ref_p, lr=1e-3, weight_decay=0.01)
    for step in range(50):
        gs = grads_for(step, SHAPES, device)
        for p, r, g in zip(low, ref_p, gs):
            p.grad = g.to(dtype)
            r.grad = g.to(dtype).float()  # the reference sees the same 16-bit gradients
        ours.step()
        ref.step()
    for p, r in zip(low, ref_p):
        master = ours.state[p]["master"]
        assert master.dtype == torch.float32
        assert_close_to_torch(master, r.detach())
        assert torch.equal(p.detach(), master.to(dtype)), "a 16-bit param is not the rounding of its master"


EDITS = {
    # What training code does to parameters between steps (torch.optim keeps every one of them).
    "load_state_dict": lambda model, p: model.load_state_dict({"weight": torch.full_like(p, 5.0)}),
    "clamp_": lambda model, p: p.clamp_(-0.05, 0.05),  # weight clipping (WGAN), under no_grad
    "copy_ half": lambda model, p: p[: p.shape[0] // 2].copy_(torch.linspace(-1, 1, p[0].numel()).view_as(p[0])),
    # New memory, no version counter moved (torch.nn.utils.vector_to_parameters assigns .data so).
    ".data =": lambda model, p: setattr(p, "data", torch.full_like(p, -2.0)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("edit", list(EDITS))
def test_edits_to_16bit_params_between_steps_reach_the_masters(device: str, dtype: torch.dtype, edit: str) -> None:
    """The parameter is the truth, as with torch.optim: a value written into a 16-bit parameter from outside
    (a model checkpoint loaded into a training model, clipping, a projection) is where its master continues
    from, element by element; elements left alone keep their exact masters. Reference: torch's AdamW on fp32
    parameters given the same edits."""
    torch.manual_seed(2)
    init = torch.randn(16, 8)
    model = torch.nn.Linear(8, 16, bias=False).to(device, dtype)
    ref = torch.nn.Linear(8, 16, bias=False).to(device)
    with torch.no_grad():
        model.weight.copy_(init.to(dtype))
        ref.weight.copy_(init.to(dtype).float())
    ours = mixprec.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)

    def step(k: int) -> None:
        g = grads_for(k, [(16, 8)], device)[0]
        model.weight.grad = g.to(dtype)
        ref.weight.grad = g.to(dtype).float()
        ours.step()
        theirs.step()

    for k in range(3):
        step(k)
    master_before = ours.state[model.weight]["master"].clone()
    assert_close_to_torch(master_before, ref.weight.detach())
    with torch.no_grad():
        EDITS[edit](model, model.weight)
        edited = model.weight.detach() != master_before.to(dtype)
        # The reference continues from the values the edit left in the 16-bit parameter, where it changed one.
        ref.weight.copy_(torch.where(edited, model.weight.detach().float(), ref.weight.detach()))
    assert edited.any() and (edit in ("load_state_dict", ".data =") or not edited.all())
    step(3)
    master = ours.state[model.weight]["master"]
    assert_close_to_torch(master, ref.weight.detach())  # without the edit taken, these are 1e-1 apart
    assert torch.equal(model.weight.detach(), master.to(dtype))
    for k in range(4, 6):
        step(k)
    assert_close_to_torch(ours.state[model.weight]["master"], ref.weight.detach())


def _merged(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    return ops.merge_bf16_remainder(p.detach(), opt.state[p]["remainder"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edit", list(EDITS) + ["zeros_", "sam"])
def test_edits_to_params_with_remainders(device: str, edit: str) -> None:
    """master_weights="remainder" and a bf16 parameter written from outside: nothing tells a changed element
    from a kept one, so a write that puts the optimizer's bits back (SAM's perturbation undone) keeps the exact
    values, a changed element continues within half a bf16 ulp of what was written, and a pair no split
    gives drops its remainder: a parameter set to 0 (nn.init.zeros_, a pruned weight, a loaded zero bias)
    merged to NaN with an old negative remainder."""
    torch.manual_seed(12)
    p = torch.nn.Parameter(torch.randn(16, 8, device=device).bfloat16())
    model = torch.nn.Module()
    model.weight = p
    opt = mixprec.optim.AdamW([p], lr=1e-2, master_weights="remainder")
    for k in range(3):
        p.grad = grads_for(k, [(16, 8)], device)[0].bfloat16()
        opt.step()
    exact = _merged(opt, p).clone()
    assert (opt.state[p]["remainder"] < 0).any()
    with torch.no_grad():
        if edit == "zeros_":
            torch.nn.init.zeros_(p)
        elif edit == "sam":  # perturb, then restore the optimizer's bits
            saved = p.detach().clone()
            p.add_(0.01)
            p.copy_(saved)
        else:
            EDITS[edit](model, p)
    written = p.detach().float().clone()
    opt.param_groups[0]["lr"] = 0.0  # a step that moves nothing: the value it starts from shows
    p.grad = torch.zeros_like(p)
    opt.step()
    merged = _merged(opt, p)
    assert not merged.isnan().any() and torch.equal(p.detach().float(), written)
    if edit == "sam":
        assert torch.equal(merged, exact)
    else:
        half_ulp = written.abs().clamp(min=2.0**-126) * 2.0**-8
        assert torch.all((merged - written).abs() <= half_ulp)


@pytest.mark.parametrize("device", DEVICES)
def test_a_rollback_to_a_model_checkpoint_is_exact_with_nearest_rounding(device: str) -> None:
    """Loading an earlier model checkpoint into a training model (keeping the optimizer) and stepping with
    lr 0 leaves exactly the checkpoint's weights, as torch's AdamW does: with nearest rounding a master one
    ulp from the loaded value is not mistaken for one the step could have rounded so."""
    torch.manual_seed(13)
    model = torch.nn.Linear(64, 64).to(device, torch.bfloat16)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoint = None
    for k in range(6):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        if k == 1:
            checkpoint = {n: t.clone() for n, t in model.state_dict().items()}
    model.load_state_dict(checkpoint)
    for group in opt.param_groups:
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for name, t in model.state_dict().items():
        assert torch.equal(t, checkpoint[name]), name


def test_masters_from_a_stochastic_run_resume_exactly_under_nearest_rounding() -> None:
    """A checkpoint of a run with stochastic rounding, resumed with rounding="nearest": a loaded master is
    judged as either rounding may have written its param, so none is replaced by its param."""
    torch.manual_seed(15)
    model = torch.nn.Linear(64, 64).bfloat16()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3, rounding="stochastic", seed=1)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    masters = [opt.state[p]["master"].clone() for p in model.parameters()]
    assert any(not torch.equal(p.detach(), m.bfloat16()) for p, m in zip(model.parameters(), masters))
    resumed = torch.nn.Linear(64, 64).bfloat16()
    resumed.load_state_dict(model.state_dict())
    again = mixprec.optim.AdamW(resumed.parameters(), lr=1e-3, rounding="nearest")
    again.load_state_dict(opt.state_dict())
    again.param_groups[0]["rounding"] = "nearest"
    again.param_groups[0]["lr"] = 0.0
    for p in resumed.parameters():
        p.grad = torch.zeros_like(p)
    again.step()
    for p, m in zip(resumed.parameters(), masters):
        assert torch.equal(again.state[p]["master"], m)


def test_a_master_kind_a_row_stops_using_is_dropped_and_remainders_become_the_master() -> None:
    """bf16 -> fp32 -> bf16: the fp32 phase steps the parameter itself, so the old master is dropped from the
    state (it was taken up again, stale, after the cast back); switching a remainder group to fp32 masters
    keeps the exact value (param + remainder), as the other way round does."""
    torch.manual_seed(14)
    p = torch.nn.Parameter(torch.randn(200).bfloat16())
    opt = mixprec.optim.AdamW([p], lr=1e-2)
    for phase, dtype in enumerate((torch.bfloat16, torch.float32, torch.bfloat16)):
        p.data = p.data.to(dtype)
        if phase == 2:  # a step that moves nothing: the master is what the step started from
            opt.param_groups[0]["lr"] = 0.0
        p.grad = torch.randn(200).to(dtype)
        opt.step()
        assert ("master" in opt.state[p]) == (dtype == torch.bfloat16)
    assert torch.equal(opt.state[p]["master"], p.detach().float())  # the param's value, not phase 0's master
    q = torch.nn.Parameter(torch.randn(200).bfloat16())
    opt = mixprec.optim.AdamW([q], lr=1e-2, master_weights="remainder")
    q.grad = torch.randn(200).bfloat16()
    opt.step()
    exact = _merged(opt, q).clone()
    opt.param_groups[0]["master_weights"] = "fp32"
    q.grad = torch.zeros(200).bfloat16()
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert "remainder" not in opt.state[q] and torch.equal(opt.state[q]["master"], exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_write_that_keeps_the_values_keeps_the_masters(device: str, rounding: str) -> None:
    """A write that leaves a parameter as the optimizer left it (EMA weights swapped in and back, a broadcast
    from the rank that stepped) moves its version counter but not its values: the exact masters stay, bit for
    bit, also where stochastic rounding wrote the master's other neighbour."""
    runs = []
    for touch in (False, True):
        torch.manual_seed(3)
        p = torch.nn.Parameter(torch.randn(300, device=device).to(torch.bfloat16))
        opt = mixprec.optim.AdamW([p], lr=1e-3, rounding=rounding, seed=7)
        for k in range(6):
            p.grad = grads_for(k, [(300,)], device)[0].to(torch.bfloat16)
            opt.step()
            if touch:
                with torch.no_grad():
                    saved = p.detach().clone()
                    p.mul_(0.5)
                    p.copy_(saved)
        runs.append((p.detach().clone(), opt.state[p]["master"].clone()))
    assert rounding == "nearest" or not torch.equal(runs[0][0], runs[0][1].to(torch.bfloat16)), \
        "stochastic rounding should have taken the far neighbour somewhere"
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("mode", ["fp32", "remainder"])
def test_a_state_dict_that_went_through_torch_continues_from_the_params(mode: str) -> None:
    """ours -> torch.optim.AdamW (which keeps the unknown state, cast to the params' dtype) -> torch trains ->
    ours: the masters it carries are 20 steps old and bf16 (a remainder, cast to bf16, is meaningless). The
    step continues from the parameters, not from the stale masters, and the state is ours again."""
    torch.manual_seed(4)
    init = torch.randn(64).to(torch.bfloat16)
    p = torch.nn.Parameter(init.clone())
    ours = mixprec.optim.AdamW([p], lr=1e-2, master_weights=mode)
    for k in range(3):
        p.grad = grads_for(k, [(64,)], "cpu")[0].to(torch.bfloat16)
        ours.step()
    theirs = torch.optim.AdamW([p], lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    for k in range(3, 23):
        p.grad = grads_for(k, [(64,)], "cpu")[0].to(torch.bfloat16)
        theirs.step()
    before = p.detach().float().clone()
    again = mixprec.optim.AdamW([p], lr=1e-2, master_weights=mode)
    again.load_state_dict(theirs.state_dict())
    p.grad = grads_for(23, [(64,)], "cpu")[0].to(torch.bfloat16)
    again.step()
    st = again.state[p]
    assert st["exp_avg"].dtype == torch.float32
    if mode == "fp32":
        assert st["master"].dtype == torch.float32 and torch.equal(p.detach(), st["master"].to(torch.bfloat16))
    else:
        assert st["remainder"].dtype == torch.int16
    # One Adam step moves each value by about lr; going back to the old masters would move it by up to 20 lr.
    assert (p.detach().float() - before).abs().max() <= 1.5e-2


@pytest.mark.parametrize("device", DEVICES)
def test_remainder_mode_is_bit_identical_to_fp32_masters(device: str) -> None:
    torch.manual_seed(2)
    init = [torch.randn(s).bfloat16() for s in SHAPES]
    a = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    b = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    opt_a = mixprec.optim.AdamW(a, lr=1e-3, master_weights="fp32")
    opt_b = mixprec.optim.AdamW(b, lr=1e-3, master_weights="remainder")
    for step in range(30):
        for pa, pb, g in zip(a, b, grads_for(step, SHAPES, device)):
            pa.grad = g.bfloat16()
            pb.grad = g.bfloat16()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        state_b = opt_b.state[pb]
        assert "master" not in state_b and state_b["remainder"].dtype == torch.int16
        merged = ops.merge_bf16_remainder(pb.detach(), state_b["remainder"])
        assert torch.equal(merged.view(torch.int32), opt_a.state[pa]["master"].view(torch.int32))


# ---- pure bf16 with stochastic rounding ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_of_updates_is_unbiased(device: str) -> None:
    """With plain SGD-like tiny steps, E[bf16 param after the step] equals the fp32 result."""
    n = 200_000
    p = torch.full((n,), 1.0, dtype=torch.bfloat16, device=device)
    g = torch.ones(n, device=device)
    m = torch.zeros(n, device=device)
    v = torch.zeros(n, device=device)
    s = torch.zeros(n, device=device)[:1].reshape(())
    lr = 1e-3  # the update (lr, after bias correction) is an eighth of bf16's ulp at 1.0 (2^-7)
    ops.adam_step_([p], [g], [m], [v], [], [s], lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   master_mode="none", rounding="stochastic", seed=4)
    exact = 1.0 - lr * 1.0 / (1.0 + 1e-8)  # step 1: m_hat / sqrt(v_hat) = 1
    out = p.double()
    ulp = 2.0**-8  # bf16 spacing just below 1.0
    prob = (1.0 - exact) / ulp
    sigma = ulp * math.sqrt(prob * (1 - prob) / n)
    assert abs(out.mean().item() - exact) < 5 * sigma
    nearest = torch.full((n,), 1.0, dtype=torch.bfloat16, device=device)
    ops.adam_step_([nearest], [g], [m.zero_()], [v.zero_()], [], [s.zero_()], lr=lr, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.0, master_mode="none", rounding="nearest")
    assert torch.all(nearest == 1.0), "the update should round away under nearest rounding"


def _train_tiny_regression(mode: str, rounding: str) -> float:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    w_true = torch.randn(8, 1)
    y = x @ w_true + 5.0
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        model.bias.fill_(16.0)  # bf16's spacing is 1/8 in [16, 32) and 1/16 in [8, 16): lr-sized steps round away
    model = model.bfloat16()
    opt = mixprec.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.0, master_weights=mode, rounding=rounding,
                              seed=11)
    for _ in range(800):
        loss = torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return abs(model.bias.float().item() - 5.0)


def test_stochastic_rounding_and_masters_train_where_plain_bf16_stalls() -> None:
    plain = _train_tiny_regression("none", "nearest")
    stochastic = _train_tiny_regression("none", "stochastic")
    masters = _train_tiny_regression("fp32", "nearest")
    assert plain > 10, f"plain bf16 moved the bias to within {plain} of the target: it did not stall"
    assert stochastic < 1 and masters < 1, (stochastic, masters)


# ---- overflow, checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["none", "fp32", "remainder"])
def test_overflow_step_changes_nothing(device: str, mode: str) -> None:
    torch.manual_seed(3)
    dtype = torch.float32 if mode == "none" else torch.bfloat16
    params = [torch.nn.Parameter(torch.randn(s).to(dtype).to(device)) for s in SHAPES]
    opt = mixprec.optim.AdamW(params, lr=1e-2, master_weights=mode if mode != "none" else "auto")
    for step in range(3):
        for p, g in zip(params, grads_for(step, SHAPES, device)):
            p.grad = g.to(dtype)
        opt.step()
    before = copy.deepcopy(opt.state_dict()["state"])
    values = [p.detach().clone() for p in params]
    params[1].grad[7] = math.inf
    opt.found_inf = torch.ones(1, device=device)  # as a GradScaler hands it over
    opt.grad_scale = torch.full((1,), 1024.0, device=device)
    opt.step()
    del opt.found_inf, opt.grad_scale
    for p, v in zip(params, values):
        assert torch.equal(p.detach().view(torch.int16 if dtype != torch.float32 else torch.int32),
                           v.view(torch.int16 if dtype != torch.float32 else torch.int32))
    after = opt.state_dict()["state"]
    for pid, st in before.items():
        for key, value in st.items():
            assert torch.equal(after[pid][key], value), f"state {key} of param {pid} changed"


@pytest.mark.parametrize("flag", [1.0, 1, True, 0.0, 0, False])
def test_found_inf_given_as_a_number_is_read_on_the_host(flag: float) -> None:
    """torch's scaler hands an optimizer without gradients this iteration the sum of no flags, a number: a
    truthy one skips the step (nothing written, the step count held), a zero one steps as without a flag."""
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(6).bfloat16()) for _ in range(2)]
    opt = mixprec.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.found_inf = flag
    opt.step()
    del opt.found_inf
    after = opt.state_dict()["state"]
    unchanged = all(torch.equal(p, v) for p, v in zip(params, values)) and all(
        torch.equal(after[i][k], v) for i in state for k, v in state[i].items())
    assert unchanged == bool(flag)
    assert float(after[0]["step"]) == (1.0 if flag else 2.0)


@pytest.mark.parametrize("mode", ["none", "fp32", "remainder"])
def test_a_float64_lr_tensor_on_the_cpu_steps_exactly_as_the_float(mode: str) -> None:
    """A double-precision CPU lr tensor (a scheduler's arithmetic in float64) is the Python float it holds: the
    step is bit-identical to one given that float, not to the float rounded to fp32 first."""
    torch.manual_seed(6)
    lr = 1.0 / 3.0  # not representable in fp32
    grads = [torch.randn(33) for _ in range(3)]

    def run(lr_value: object) -> list[torch.Tensor]:
        dtype = torch.float32 if mode == "none" else torch.bfloat16
        p = torch.nn.Parameter(torch.linspace(-1, 1, 33).to(dtype))
        opt = mixprec.optim.AdamW([p], lr=lr_value, master_weights="auto" if mode == "none" else mode)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return [p.detach().clone()] + [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]

    exact = run(lr)
    assert all(torch.equal(a, b) for a, b in zip(run(torch.tensor(lr, dtype=torch.float64)), exact))
    rounded = run(float(torch.tensor(lr, dtype=torch.float32)))
    assert not all(torch.equal(a, b) for a, b in zip(rounded, exact))  # the test can tell the two apart


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode, rounding", [("fp32", "nearest"), ("remainder", "nearest"), ("none", "stochastic")])
def test_checkpoint_resume_is_bitwise(device: str, mode: str, rounding: str) -> None:
    def make() -> tuple[list[torch.nn.Parameter], mixprec.optim.AdamW]:
        torch.manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(s).bfloat16().to(device)) for s in SHAPES]
        return ps, mixprec.optim.AdamW(ps, lr=1e-3, master_weights=mode, rounding=rounding, seed=7,
                                       moment_dtype=torch.bfloat16 if mode == "none" else torch.float32)

    def run(ps, opt, steps) -> None:
        for step in steps:
            for p, g in zip(ps, grads_for(step, SHAPES, device)):
                p.grad = g.bfloat16()
            opt.step()

    ps, opt = make()
    run(ps, opt, range(20))
    straight = [p.detach().clone() for p in ps]

    ps, opt = make()
    run(ps, opt, range(8))
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    ps2, opt2 = make()
    with torch.no_grad():
        for p, v in zip(ps2, saved["params"]):
            p.copy_(v)
    opt2.load_state_dict(saved["opt"])
    run(ps2, opt2, range(8, 20))
    for a, b in zip(ps2, straight):
        assert torch.equal(a.detach().view(torch.int16), b.view(torch.int16))


def test_loads_a_torch_adamw_state_dict() -> None:
    torch.manual_seed(6)
    model = torch.nn.Linear(16, 4)
    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 16)).sum().backward()
    ref.step()
    low = copy.deepcopy(model).bfloat16()
    ours = mixprec.optim.AdamW(low.parameters(), lr=1e-3)
    ours.load_state_dict(ref.state_dict())
    low(torch.randn(3, 16).bfloat16()).float().sum().backward()
    ours.step()
    state = ours.state[low.weight]
    assert state["step"].item() == 2.0 and state["exp_avg"].dtype == torch.float32
    assert torch.equal(low.weight.detach(), state["master"].bfloat16())


@pytest.mark.parametrize("fused", [True, None])
def test_works_with_torch_grad_scaler(fused) -> None:
    """fused=True: torch.amp.GradScaler hands grad_scale/found_inf to the step (no unscale on the host, the
    gradients left unscaled afterwards as torch's fused Adam leaves them); fused=None: torch's scaler
    unscales and checks on the host as for any plain optimizer. Same parameters either way."""
    torch.manual_seed(7)
    model = torch.nn.Linear(8, 8)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    assert opt._step_supports_amp_scaling is bool(fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 8)
    w0 = model.weight.detach().clone()
    scaler.scale(model(x).pow(2).mean()).backward()
    model.weight.grad[0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight.detach(), w0) and scaler.get_scale() == 512.0
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    grads = [p.grad.clone() / 512.0 for p in model.parameters()]
    scaler.step(opt)
    assert not torch.equal(model.weight.detach(), w0)
    assert opt.state[model.weight]["step"].item() == 1.0
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)  # unscaled in .grad afterwards, on either path
    # The step saw unscaled gradients: its first moment is (1 - beta1) * grad.
    torch.testing.assert_close(opt.state[model.weight]["exp_avg"], 0.1 * grads[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_step_divides_by_the_scale_as_torchs_fused_adamw(dtype: torch.dtype) -> None:
    """Under torch.amp.GradScaler with a scale that is not a power of two, fused=True: the gradients left in
    .grad are torch's fused AdamW's, bit for bit (both divide by the scale in fp32), and the parameters
    follow torch's closely. fp16 parameters need fused=True with torch's scaler (it refuses to unscale fp16
    gradients itself, for torch's optimizers as for ours)."""
    torch.manual_seed(18)
    grads = [torch.randn(33, 7) * 3 for _ in range(3)]
    results = []
    for cls in (mixprec.optim.AdamW, torch.optim.AdamW):
        p = torch.nn.Parameter(torch.randn(33, 7, generator=torch.Generator().manual_seed(0)).to(dtype))
        opt = cls([p], lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
        after = []
        for g in grads:
            opt.zero_grad()
            scaler.scale((p.float() * g).sum()).backward()
            scaler.step(opt)
            scaler.update()
            after.append(p.grad.clone())
        results.append((p.detach().clone(), after))
    (ours, ours_grads), (theirs, their_grads) = results
    for a, b in zip(ours_grads, their_grads):
        assert torch.equal(a, b)
    # fp32: the same Adam rule; fp16: ours keeps fp32 masters, torch updates the fp16 values themselves.
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ours, theirs, **tolerance)
    plain = mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))])
    plain.param_groups[0]["params"][0].grad = torch.ones(3, dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.step(plain)


def test_torch_keyword_arguments_are_accepted_and_recorded() -> None:
    """Code written for torch.optim.AdamW/Adam passes these; each is kept in the param groups as torch keeps it."""
    p = torch.nn.Parameter(torch.ones(3))
    for cls in (mixprec.optim.AdamW, mixprec.optim.Adam):
        opt = cls([p], 1e-3, (0.9, 0.99), 1e-8, 0.0, False, foreach=False, maximize=True, capturable=True,
                  differentiable=False, fused=None)
        group = opt.param_groups[0]
        assert (group["foreach"], group["maximize"], group["capturable"], group["differentiable"], group["fused"]) == (
            False, True, True, False, None)
        assert group["decoupled_weight_decay"] is (cls is mixprec.optim.AdamW)
        assert not opt._step_supports_amp_scaling
    assert mixprec.optim.AdamW([p], fused=True)._step_supports_amp_scaling
    assert mixprec.optim.AdamW([p], betas=(torch.tensor(0.9), torch.tensor(0.99))).param_groups[0]["betas"] == (
        pytest.approx(0.9), pytest.approx(0.99))


def test_is_an_instance_of_torchs_own_class() -> None:
    """Code written for torch checks isinstance (frameworks pick param-group rules or weight-decay handling by it)."""
    p = torch.nn.Parameter(torch.ones(3))
    adamw, adam = mixprec.optim.AdamW([p]), mixprec.optim.Adam([p])
    # As torch's classes: AdamW derives from Adam, not the other way round.
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(adamw, torch.optim.Adam)
    assert isinstance(adam, torch.optim.Adam) and not isinstance(adam, torch.optim.AdamW)
    # Nothing of torch's step runs: ours comes first, and torch's __setstate__ (via copy) keeps the state.
    assert type(adamw).step is not torch.optim.AdamW.step
    p.grad = torch.ones(3)
    adamw.step()
    clone = copy.deepcopy(adamw)
    assert clone.param_groups[0]["decoupled_weight_decay"] is True and "master_weights" in clone.param_groups[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_float64_params_take_torchs_float64_step(device: str, cls_name: str, amsgrad: bool) -> None:
    """float64 parameters (next to fp32 and bf16 ones in the same group) are stepped in float64 with float64
    moments, as torch steps them: bit for bit torch's fused step, skipped steps included."""
    torch.manual_seed(21)
    ours_cls, torch_cls = getattr(mixprec.optim, cls_name), getattr(torch.optim, cls_name)
    w64, w32 = torch.randn(37, 5, dtype=torch.float64).to(device), torch.randn(11).to(device)
    a64, a32, a16 = (torch.nn.Parameter(w64.clone()), torch.nn.Parameter(w32.clone()),
                     torch.nn.Parameter(w32.to(torch.bfloat16)))
    b64 = torch.nn.Parameter(w64.clone())
    kw = dict(lr=0.02, weight_decay=0.1, amsgrad=amsgrad)
    ours = ours_cls([a64, a32, a16], **kw)
    fused = torch_cls([b64], fused=True, **kw)
    scaler = mixprec.GradScaler(device, init_scale=2.0)
    grads = []
    for i in range(6):
        g = torch.randn(37, 5, dtype=torch.float64) * (1 + i)
        if i == 3:
            g[0, 0] = float("inf")  # a skipped step: nothing moves, the step count included
        g = g.to(device)
        grads.append(g)
        a64.grad, b64.grad = g * 2.0, g.clone()
        a32.grad, a16.grad = torch.randn(11).to(device), torch.randn(11).bfloat16().to(device)
        scaler.scale(torch.ones((), device=device))  # the grads above stand for a backward of a scaled loss
        scaler.step(ours)
        scaler.update(2.0)
        if i != 3:
            fused.step()
    assert a64.dtype == torch.float64 and torch.equal(a64, b64)
    st, ref = ours.state[a64], fused.state[b64]
    assert set(st) == set(ref)
    for key, value in st.items():
        assert value.dtype == ref[key].dtype and torch.equal(value, ref[key]), key
    assert float(st["step"]) == 5
    # torch's default (for-each) float64 step agrees to float64 rounding, so the step is float64 arithmetic.
    c64 = torch.nn.Parameter(w64.clone())
    plain = torch_cls([c64], **kw)
    for i, g in enumerate(grads):
        if i != 3:
            c64.grad = g
            plain.step()
    torch.testing.assert_close(a64, c64, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_float64_rows_of_any_layout_step_as_torch_and_write_only_the_parameter(cls_name: str,
                                                                              dtype: torch.dtype) -> None:
    """torch's fused float64 kernel walks memory, not strides: a parameter that is a strided view (another
    tensor's every other column), a transposed parameter, and gradients laid out otherwise (transposed,
    expanded) still step as torch's default step does, and the memory between a view's elements is not
    written."""
    torch.manual_seed(5)
    base = torch.randn(6, 10, dtype=dtype)
    outside = base[:, 1::2].clone()
    cases = [  # (initial value, its layout as a parameter, the gradients' layout)
        (base, lambda t: t[:, ::2], lambda g: g.contiguous()),                 # non-dense parameter
        (torch.randn(7, 4, dtype=dtype), lambda t: t, lambda g: g.t().contiguous().t()),  # transposed grad
        (torch.randn(7, 4, dtype=dtype), lambda t: t.t().contiguous().t(), lambda g: g.contiguous()),
        (torch.randn(7, 4, dtype=dtype), lambda t: t, lambda g: g[:1].expand_as(g)),   # expanded grad
    ]
    ours_params = [torch.nn.Parameter(layout(init)) for init, layout, _ in cases]
    ref_params = [torch.nn.Parameter(layout(init).detach().clone()) for init, layout, _ in cases]
    assert not ours_params[0].is_contiguous() and ours_params[0].data_ptr() == base.data_ptr()
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=True)
    ours = getattr(mixprec.optim, cls_name)(ours_params, **kw)
    ref = getattr(torch.optim, cls_name)(ref_params, foreach=False, **kw)
    for step in range(4):
        for (_, _, grad_layout), a, b in zip(cases, ours_params, ref_params):
            g = grad_layout(torch.randn(a.shape, dtype=dtype) * (step + 1))
            a.grad, b.grad = g, g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"], rtol=1e-13, atol=1e-15)
    assert torch.equal(base[:, 1::2], outside)  # the view's neighbours, untouched


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.5, 0.9])
def test_the_first_moment_is_torchs_lerp_bit_for_bit(beta1: float) -> None:
    """exp_avg.lerp_(grad, 1 - beta1) switches form at weight 0.5 in torch (end - (end - self) * (1 - w) for
    large weights): the first moment equals torch's CPU lerp bit for bit for every beta1 (its CUDA lerp leaves
    contraction to nvcc), and with beta1 = 0 it is the gradient itself."""
    device = "cpu"
    torch.manual_seed(9)
    a = torch.nn.Parameter(torch.randn(1000, device=device))
    b = torch.nn.Parameter(a.detach().clone())
    ours = mixprec.optim.AdamW([a], lr=0.01, betas=(beta1, 0.99))
    ref = torch.optim.AdamW([b], lr=0.01, betas=(beta1, 0.99), foreach=False)
    for _ in range(5):
        g = torch.randn(1000, device=device)
        a.grad, b.grad = g, g.clone()
        ours.step()
        ref.step()
        assert torch.equal(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"])
        if beta1 == 0.0:
            assert torch.equal(ours.state[a]["exp_avg"], g)


def test_a_parameter_listed_twice_or_of_an_unsupported_dtype_is_named() -> None:
    """torch warns about a repeated parameter and updates it twice; one fused pass cannot, so the error names the
    entry (and the state is left as it was). A dtype the step has no arithmetic for is refused by name as well."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = mixprec.optim.AdamW([q, p, p], lr=0.1)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(ValueError, match="parameter 2 of the param group appears in it more than once"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(q.detach(), torch.ones(3)) and not opt.state
    n = torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False)
    n.grad = torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="parameter 1 is Int; params must be float32, float16, bfloat16, "
                       "float64, complex64 or complex128"):
        mixprec.optim.AdamW([q, n]).step()
    assert torch.equal(q.detach(), torch.ones(3))


# ---- complex parameters: two independent reals, as torch.optim steps them --------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("amsgrad, maximize", [(False, False), (True, True)])
def test_complex_params_match_torch(device: str, cls_name: str, dtype: torch.dtype, amsgrad: bool,
                                    maximize: bool) -> None:
    """A complex parameter (next to a real one in the same group) follows torch's Adam/AdamW, whose state stays
    complex; the state dicts cross both ways, and the parameter moves as its (real, imag) pair would."""
    torch.manual_seed(5)
    init = [torch.randn(13, 3, dtype=dtype), torch.randn(7)]
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    ours_p = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    ref_p = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    # The same problem over real parameters: the complex one's real and imaginary parts as two tensors.
    real = init[0].real.clone().to(device).requires_grad_()
    imag = init[0].imag.clone().to(device).requires_grad_()
    ours = getattr(mixprec.optim, cls_name)(ours_p, **kw)
    ref = getattr(torch.optim, cls_name)(ref_p, foreach=False, **kw)
    split = getattr(torch.optim, cls_name)([real, imag], foreach=False, **kw)
    gen = torch.Generator().manual_seed(9)
    for step in range(12):
        g = [torch.randn(13, 3, dtype=dtype, generator=gen) * (4.0 if step < 4 else 0.5),
             torch.randn(7, generator=gen)]
        for ps in (ours_p, ref_p):
            for p, gi in zip(ps, g):
                p.grad = gi.to(device)
        real.grad, imag.grad = g[0].real.to(device), g[0].imag.to(device)
        for opt in (ours, ref, split):
            opt.step()
    fp64 = dtype == torch.complex128
    for a, b in zip(ours_p, ref_p):
        assert a.dtype == b.dtype
        if fp64 and a.dtype == torch.complex128:  # torch's float64 arithmetic: float64 rounding
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)
        else:
            assert_close_to_torch(torch.view_as_real(a.detach()) if a.is_complex() else a.detach(),
                                  torch.view_as_real(b.detach()) if b.is_complex() else b.detach())
        st, rs = ours.state[a], ref.state[b]
        assert set(st) == set(rs)
        for key in rs:
            assert st[key].dtype == rs[key].dtype and st[key].shape == rs[key].shape, key
            rtol = 1e-12 if fp64 and a.is_complex() else 1e-5
            torch.testing.assert_close(st[key], rs[key], rtol=rtol, atol=0)
    c = ours_p[0].detach()
    torch.testing.assert_close(torch.view_as_real(c), torch.stack([real.detach(), imag.detach()], -1),
                               rtol=1e-13 if fp64 else 1e-6, atol=1e-15 if fp64 else 1e-6)
    # State dicts cross both ways: a step after the exchange is the same step.
    theirs = getattr(torch.optim, cls_name)([torch.nn.Parameter(p.detach().clone()) for p in ours_p], **kw)
    theirs.load_state_dict(ours.state_dict())
    mine = getattr(mixprec.optim, cls_name)([torch.nn.Parameter(p.detach().clone()) for p in ref_p], **kw)
    mine.load_state_dict(ref.state_dict())
    for key in ref.state[ref_p[0]]:
        assert torch.equal(mine.state[mine.param_groups[0]["params"][0]][key], ref.state[ref_p[0]][key])


def test_a_conjugate_view_gradient_steps_as_its_values() -> None:
    """Autograd leaves a conjugate view in .grad (the gradient of p.conj()); torch's Adam refuses it
    (view_as_real), mixprec's steps with its values, as torch does with the resolved gradient."""
    torch.manual_seed(6)
    init, w = torch.randn(5, dtype=torch.complex64), torch.randn(5, dtype=torch.complex64)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    (p.conj() * w).real.sum().backward()
    assert p.grad.is_conj()
    q.grad = p.grad.resolve_conj()
    r = torch.nn.Parameter(init.clone())
    r.grad = p.grad
    with pytest.raises(RuntimeError, match="view_as_real doesn't work on unresolved conjugated tensors"):
        torch.optim.AdamW([r], lr=0.1).step()
    ours, ref = mixprec.optim.AdamW([p], lr=0.1), torch.optim.AdamW([q], lr=0.1)
    for _ in range(3):
        ours.step()
        ref.step()
    assert_close_to_torch(torch.view_as_real(p.detach()), torch.view_as_real(q.detach()))


def test_complex_params_refuse_what_complex_state_cannot_hold() -> None:
    """No complex bf16 exists: bf16 moments and bf16 remainders of a complex64 parameter are refused by name,
    before any state is created."""
    r = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    r.grad, c.grad = torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="parameter 1 is ComplexFloat, whose moments are complex64; "
                       "moment_dtype=BFloat16 cannot hold them"):
        mixprec.optim.AdamW([r, c], moment_dtype=torch.bfloat16).step()
    with pytest.raises(ValueError, match="parameter 1 is ComplexFloat; master_weights='remainder' needs bfloat16"):
        opt = mixprec.optim.AdamW([r, c], master_weights="remainder")
        opt.step()
    assert not opt.state and torch.equal(r.detach(), torch.ones(3, dtype=torch.bfloat16))
    # complex128 moments are complex128 whatever moment_dtype says, as float64 moments are float64.
    d = torch.nn.Parameter(torch.ones(3, dtype=torch.complex128))
    d.grad = torch.ones(3, dtype=torch.complex128)
    opt = mixprec.optim.AdamW([d], moment_dtype=torch.bfloat16)
    opt.step()
    assert opt.state[d]["exp_avg"].dtype == torch.complex128


def test_parameters_without_gradients_are_not_checked() -> None:
    """As torch's step: a frozen integer weight, or a repeated entry that has no gradient, is skipped."""
    results = []
    for cls in (torch.optim.AdamW, mixprec.optim.AdamW):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 3))
        frozen = torch.nn.Parameter(torch.zeros(3, dtype=torch.int8), requires_grad=False)
        unused = torch.nn.Parameter(torch.ones(2))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = cls([w, frozen, unused, unused], lr=0.1)
        w.grad = torch.ones(3)
        opt.step()
        results.append(w.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_a_refused_float64_gradient_writes_nothing() -> None:
    """The float64 rows' gradients are checked before any bucket of the group steps: the fp32 parameter next
    to them is not moved, so optimizer.state (empty) and the parameters agree."""
    a = torch.nn.Parameter(torch.linspace(-1, 1, 3))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = mixprec.optim.AdamW([a, b], lr=0.1)
    b.grad_dtype = None  # lets b hold a gradient of another dtype, which the step must refuse
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(ValueError, match="gradient of a float64 parameter must be float64"):
        opt.step()
    assert torch.equal(a.detach(), torch.linspace(-1, 1, 3)) and not opt.state
    b.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert float(opt.state[a]["step"]) == 1 and float(opt.state[b]["step"]) == 1


def test_a_refused_state_dict_keeps_the_state_tracked() -> None:
    """torch's Adam.__setstate__ refuses a per-parameter state without "step" (KeyError, as torch); afterwards
    optimizer.state is still tracked, so the core takes whatever it holds at the next step."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = mixprec.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["step"]
    with pytest.raises(KeyError, match="step"):
        opt.load_state_dict(sd)
    assert type(opt.state).__name__ == "_StateMap"
    opt.state[p]["step"] = torch.tensor(41.0)  # an edit after the failure still reaches the core
    opt.step()
    assert float(opt.state[p]["step"]) == 42


def test_decoupled_weight_decay_makes_adam_adamw() -> None:
    """torch.optim.Adam(decoupled_weight_decay=True) is AdamW; so is ours."""
    torch.manual_seed(14)
    w = torch.randn(50)
    grads = [torch.randn(50) for _ in range(5)]

    def run(cls, **kw) -> torch.Tensor:
        p = torch.nn.Parameter(w.clone())
        opt = cls([p], lr=1e-2, weight_decay=0.3, **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(mixprec.optim.Adam, decoupled_weight_decay=True), run(mixprec.optim.AdamW))
    assert not torch.equal(run(mixprec.optim.Adam), run(mixprec.optim.AdamW))
    torch.testing.assert_close(run(mixprec.optim.Adam, decoupled_weight_decay=True),
                               run(torch.optim.Adam, decoupled_weight_decay=True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
        (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
        (dict(lr=torch.ones(2)), ValueError, "Tensor lr must be 1-element"),
    ],
)
def test_what_cannot_be_honoured_is_refused(kwargs: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(3))], **kwargs)


@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "betas"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_hyper_parameters_that_are_not_numbers_are_refused_as_torch_refuses_them(cls: str, name: str) -> None:
    """YAML reads ``lr: 1e-3`` as a string. torch's constructor refuses it (TypeError from its range checks);
    accepting it stored the string in the group, and the first scheduler failed much later."""
    value = ("0.9", 0.999) if name == "betas" else "1e-3"
    for module in (torch.optim, mixprec.optim):
        with pytest.raises(TypeError):
            getattr(module, cls)([torch.nn.Parameter(torch.ones(3))], **{name: value})
    with pytest.raises(TypeError, match="must be a number or a one-element Tensor, got str '1e-3'"):
        mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr="1e-3")
    # NumPy's numbers (from a config) are numbers, as for torch.
    np = pytest.importorskip("numpy")
    opt = mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=np.float64(1e-3), eps=np.float32(1e-8))
    assert opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_an_optimizer_is_rebuilt_from_its_defaults(cls: str) -> None:
    """``type(opt)(params, **opt.defaults)`` (frameworks re-create optimizers that way after model surgery)
    works for torch.optim.Adam; every key of mixprec's defaults is a constructor argument, and the rebuilt
    optimizer steps as the original would."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16)) for _ in range(2)]
    opt = getattr(mixprec.optim, cls)(params, lr=1e-2, weight_decay=0.1, rounding="stochastic", seed=5)
    rebuilt = type(opt)([p.detach().clone().requires_grad_() for p in params], **opt.defaults)
    assert rebuilt.defaults == opt.defaults
    for o in (opt, rebuilt):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    for a, b in zip(opt.param_groups[0]["params"], rebuilt.param_groups[0]["params"]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rng_calls must be a non-negative int"):
        mixprec.optim.AdamW(params, rng_calls=-1)  # the core's check
    with pytest.raises(ValueError, match="rng_calls must be a non-negative int"):
        mixprec.optim.AdamW(params, rng_calls=1.5)


def test_lr_tensor_on_the_cpu_is_read_on_the_host_and_follows_schedulers() -> None:
    """A CPU lr tensor gives the float-lr result, and writing into it (as schedulers on tensor lrs do) takes
    effect at the next step."""
    torch.manual_seed(15)
    grads = [torch.randn(20) for _ in range(4)]
    lrs = [1e-2, 1e-2, 5e-3, 5e-3]

    def run(lr_tensor: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(20))
        lr = torch.tensor(lrs[0]) if lr_tensor else lrs[0]
        opt = mixprec.optim.AdamW([p], lr=lr)
        for g, value in zip(grads, lrs):
            if lr_tensor:
                opt.param_groups[0]["lr"].fill_(value)
            else:
                opt.param_groups[0]["lr"] = value
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(True), run(False))


@requires_cuda
def test_cpu_lr_tensor_with_cuda_params_costs_no_device_sync() -> None:
    p = torch.nn.Parameter(torch.ones(20, device="cuda"))
    opt = mixprec.optim.AdamW([p], lr=torch.tensor(1e-2))
    p.grad = torch.ones(20, device="cuda")
    opt.step()  # warm-up: state creation
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- op-level checks -------------------------------------------------------------------------------------------


def _op_args(device: str, mode: str) -> tuple:
    dtype = torch.float32 if mode == "none" else torch.bfloat16
    p = [torch.randn(9, 5, device=device).to(dtype), torch.randn(17, device=device).to(dtype)]
    g = [torch.randn_like(t, dtype=torch.float32) for t in p]
    m = [torch.zeros_like(t, dtype=torch.float32) for t in p]
    v = [torch.zeros_like(t, dtype=torch.float32) for t in p]
    w = {"none": [], "fp32": [t.float() for t in p], "remainder": [torch.zeros_like(t, dtype=torch.int16) for t in p]}[mode]
    s = [torch.zeros((), device=device) for _ in p]
    return (p, g, m, v, w, s, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False, mode, "nearest", None,
            torch.full((1,), 1e-2, device=device), torch.full((1,), 8.0, device=device), torch.zeros(1, device=device),
            torch.full((1,), 0.5, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["none", "fp32", "remainder"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck(device: str, mode: str, amsgrad: bool) -> None:
    args = _op_args(device, mode)
    if amsgrad:
        args = (*args, [torch.rand_like(t) for t in args[3]])
    torch.library.opcheck(torch.ops.mixprec.adam_step_.default, args)


def test_on_device_inputs_scale_and_clip() -> None:
    """grad_scale divides and clip_coef multiplies the gradients inside the step; lr_tensor replaces lr. The
    gradients are written back divided by grad_scale (not clipped), as torch's fused Adam leaves them."""
    p1, p2 = torch.ones(10), torch.ones(10)
    g = torch.full((10,), 8.0)
    st1, st2 = [torch.zeros(()), torch.zeros(())]
    common = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    m1, v1, m2, v2 = (torch.zeros(10) for _ in range(4))
    ops.adam_step_([p2], [torch.full((10,), 8.0 / 4 * 0.5)], [m2], [v2], [], [st2], lr=0.1, **common)
    ops.adam_step_([p1], [g], [m1], [v1], [], [st1], lr=0.0, lr_tensor=torch.full((1,), 0.1),
                   grad_scale=torch.full((1,), 4.0), clip_coef=torch.full((1,), 0.5), **common)
    assert torch.equal(p1, p2) and torch.equal(m1, m2) and torch.equal(v1, v2)
    assert torch.equal(g, torch.full((10,), 2.0))
    h = torch.full((10,), 8.0)
    ops.adam_step_([p1], [h], [m1], [v1], [], [st1], lr=0.1, clip_coef=torch.full((1,), 0.5), **common)
    assert torch.equal(h, torch.full((10,), 8.0))  # no grad_scale: the gradients are only read
    skipped = torch.full((10,), 8.0)
    ops.adam_step_([p1], [skipped], [m1], [v1], [], [st1], lr=0.1, grad_scale=torch.full((1,), 4.0),
                   found_inf=torch.ones(()), **common)
    assert torch.equal(skipped, torch.full((10,), 8.0))  # an overflowing step writes nothing, grads included


def test_cpu_capabilities_agree_bitwise(tmp_path) -> None:
    torch.manual_seed(8)
    # bf16, fp32 and fp16 rows of odd sizes: vector blocks, the 64-element stochastic blocks and scalar tails,
    # with list-wide draw indices that are not multiples of 64.
    inputs = {"p": [torch.randn(10007).bfloat16(), torch.randn(333), torch.randn(1029).half()],
              "g": [torch.randn(10007).bfloat16(), torch.randn(333), torch.randn(1029).half()]}
    script = """
        out = []
        for mode, rounding, amsgrad in (("fp32", "nearest", False), ("remainder", "nearest", True),
                                        ("none", "stochastic", True), ("fp32", "stochastic", False),
                                        ("fp32", "nearest", True)):
            p = [t.clone() for t in INPUTS["p"]]
            if mode == "remainder":
                p = [p[0]]
            g = [t.clone() for t in INPUTS["g"]][: len(p)]
            m = [torch.zeros_like(t, dtype=torch.float32) for t in p]
            v = [torch.zeros_like(t, dtype=torch.float32) for t in p]
            w = {"none": [], "fp32": [t.float() for t in p], "remainder": [torch.zeros_like(t, dtype=torch.int16) for t in p]}[mode]
            s = [torch.zeros(()) for _ in p]
            # Random maxima in v's range: some lanes keep theirs, some take the new second moment.
            vmax = [torch.rand(t.shape, generator=torch.Generator().manual_seed(9)) * 0.02 for t in v] if amsgrad else None
            for _ in range(3):
                mixprec.ops.adam_step_(p, g, m, v, w, s, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                       master_mode=mode, rounding=rounding, seed=3, grad_scale=torch.full((1,), 2.0),
                                       max_exp_avg_sqs=vmax)
            out.append((p, m, v, w, g, vmax or []))
        RESULT = out
    """
    a = run_with_cpu_capability("default", script, inputs, tmp_path)
    b = run_with_cpu_capability(None, script, inputs, tmp_path)
    for ra, rb in zip(a, b):
        for la, lb in zip(ra, rb):
            for x, y in zip(la, lb):
                assert torch.equal(x, y)


@requires_cuda
@pytest.mark.parametrize("mode, rounding", [("none", "nearest"), ("fp32", "nearest"), ("remainder", "nearest"),
                                            ("none", "stochastic")])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cpu_and_cuda_agree(mode: str, rounding: str, amsgrad: bool) -> None:
    args = list(_op_args("cpu", mode))
    args[14], args[15] = rounding, 5
    if amsgrad:
        args.append([torch.rand_like(t) * 1e-3 for t in args[3]])
    cuda_args = [([t.cuda() for t in a] if isinstance(a, list) else (a.cuda() if isinstance(a, torch.Tensor) else a))
                 for a in args]
    for _ in range(3):
        torch.ops.mixprec.adam_step_.default(*args)
        torch.ops.mixprec.adam_step_.default(*cuda_args)
    # The same element rule, explicit fmaf and no other contraction, IEEE-only bias corrections and the same
    # Philox draws: the documented contract is identical bits, including the unscaled gradients written back.
    for la, lb in zip(args[:6] + args[20:], cuda_args[:6] + cuda_args[20:]):
        for x, y in zip(la, lb):
            assert torch.equal(x, y.cpu())




def _one(dtype=torch.float32) -> tuple[list[torch.Tensor], ...]:
    return [torch.ones(4, dtype=dtype)], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [], [torch.zeros(())]


@pytest.mark.parametrize("device", DEVICES)
def test_rows_sharing_a_step_count_are_refused_and_nothing_is_written(device: str) -> None:
    """Two rows counting in one place would advance it twice (on CUDA: race); distinct elements of one
    buffer are distinct counts and fine."""
    def rows(steps: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [[torch.ones(4, device=device) for _ in steps], [torch.ones(4, device=device) for _ in steps],
                [torch.zeros(4, device=device) for _ in steps], [torch.zeros(4, device=device) for _ in steps], [],
                steps]

    shared = torch.zeros((), device=device)
    buffer = torch.zeros(3, device=device)
    for steps in ([shared, torch.zeros((), device=device), shared], [buffer[1], buffer[0], buffer[1:2].view(())]):
        lists = rows(steps)
        with pytest.raises(RuntimeError, match=r"steps\[0\] and steps\[2\] are the same memory"):
            ops.adam_step_(*lists, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        assert all(torch.equal(p, torch.ones(4, device=device)) for p in lists[0])
        assert shared.item() == 0 and buffer.sum().item() == 0
    lists = rows(list(buffer.unbind()))
    ops.adam_step_(*lists, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert torch.equal(buffer.cpu(), torch.ones(3))


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(beta1=1.0), "beta1"),
        (dict(master_mode="fp64"), "master_mode"),
        (dict(rounding="up"), "rounding"),
        (dict(grads=[torch.ones(5)]), r"grads\[0\]"),
        (dict(grads=[torch.ones(4, dtype=torch.int32)]), r"grads\[0\]"),
        (dict(grads=[torch.ones(4).to_sparse()]), "sparse"),
        (dict(exp_avgs=[torch.zeros(4, dtype=torch.float16)]), r"exp_avgs\[0\]"),
        (dict(steps=[]), "steps"),
        (dict(master_mode="fp32"), "masters"),
        (dict(master_mode="remainder", masters=[torch.zeros(4, dtype=torch.int16)]), "bfloat16"),
        (dict(found_inf=torch.zeros(2)), "found_inf"),
        (dict(max_exp_avg_sqs=[]), "max_exp_avg_sqs"),
        (dict(max_exp_avg_sqs=[torch.zeros(4, dtype=torch.bfloat16)]), r"max_exp_avg_sqs\[0\] must have the dtype"),
        (dict(max_exp_avg_sqs=[torch.zeros(5)]), r"max_exp_avg_sqs\[0\] has shape"),
    ],
)
def test_op_bad_input_names_the_argument_and_writes_nothing(change: dict, needle: str) -> None:
    p, g, m, v, w, s = _one()
    kwargs = dict(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, masters=w, steps=s, lr=1e-2, beta1=0.9, beta2=0.999,
                  eps=1e-8, weight_decay=0.0)
    kwargs.update(change)
    lists = [kwargs.pop(k) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "masters", "steps")]
    with pytest.raises(RuntimeError, match=needle):
        ops.adam_step_(*lists, **kwargs)
    assert torch.equal(p[0], torch.ones(4)) and torch.equal(m[0], torch.zeros(4)) and s[0].item() == 0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=torch.tensor(-1.0)), "learning rate"),  # a Tensor lr is checked too, as torch checks it
        (dict(betas=(0.9, 1.0)), "beta"),
        (dict(eps=-1.0), "epsilon"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(master_weights="fp8"), "master_weights"),
        (dict(moment_dtype=torch.float16), "moment_dtype"),
        (dict(rounding="floor"), "rounding"),
    ],
)
def test_optimizer_bad_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_optimizer_rejects_sparse_and_skips_params_without_grad() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = mixprec.optim.AdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(3))
    b.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="remainder"):
        c = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
        c.grad = torch.ones(3, dtype=torch.float16)
        mixprec.optim.AdamW([c], master_weights="remainder").step()


def _train(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range, forget: bool) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if step % 3 or p.dim() > 1 else None
        if forget:
            opt._forget_cache()  # every parameter through the full path
        opt.step()


def test_resolved_state_is_reused_only_while_nothing_changed() -> None:
    """The step reuses what it resolved per parameter (bucket, state tensors) across steps. A run that
    resolves everything afresh every step must give the same bits, through a state tensor replaced by the
    user, a group switched from fp32 masters to remainders, and a loaded state dict."""
    def run(forget: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in ((7, 5), (5,), (64,))]
        opt = mixprec.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        _train(opt, params, range(0, 4), forget)
        opt.state[params[0]]["exp_avg"] = torch.zeros_like(opt.state[params[0]]["exp_avg"])  # replaced
        _train(opt, params, range(4, 7), forget)
        opt.param_groups[0]["master_weights"] = "remainder"  # fp32 masters split into remainders
        _train(opt, params, range(7, 10), forget)
        saved = copy.deepcopy(opt.state_dict())
        _train(opt, params, range(10, 12), forget)
        opt.load_state_dict(saved)  # back two steps: the replaced state must be the one stepped
        _train(opt, params, range(10, 14), forget)
        st = opt.state[params[0]]
        assert "master" not in st and st["remainder"].dtype == torch.int16
        return [p.detach().clone() for p in params] + [opt.state[p]["exp_avg"] for p in params]

    reused, fresh = run(False), run(True)
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)


def test_a_replaced_state_tensor_is_the_one_updated() -> None:
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = mixprec.optim.AdamW([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.ones(10).bfloat16()
        opt.step()
    old = opt.state[p]["exp_avg"]
    before = old.clone()
    opt.state[p]["exp_avg"] = torch.zeros(10)
    p.grad = torch.ones(10).bfloat16()
    opt.step()
    assert torch.equal(old, before)  # the replaced tensor is left alone
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((10,), 0.1))  # 0.9 * 0 + 0.1 * 1


def _bf16_params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in ((7, 5), (5,), (64,))]


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    _train(opt, params, steps, forget=False)


@pytest.mark.parametrize("edit", ["reassign_dict", "delete", "reset_state", "clear", "update", "cpu_step", "pop",
                                  "popitem", "clear_all", "pop_entry"])
def test_state_edits_from_outside_reach_the_core(edit: str) -> None:
    """optimizer.state is torch's contract: whatever a user does to it, the next step uses what it holds,
    exactly as an optimizer built afresh with that state would."""
    def run(fresh: bool) -> list[torch.Tensor]:
        params = _bf16_params()
        opt = mixprec.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        _steps(opt, params, range(0, 3))
        p = params[0]
        if edit == "reassign_dict":
            opt.state[p] = {k: (v * 0.5 if k.startswith("exp") else v.clone()) for k, v in opt.state[p].items()}
        elif edit == "delete":
            del opt.state[p]
        elif edit == "reset_state":
            opt.state = collections.defaultdict(dict)
        elif edit == "clear":
            opt.state[p].clear()
        elif edit == "update":
            opt.state[p].update(exp_avg_sq=torch.full((7, 5), 0.25))
        elif edit == "cpu_step":  # as torch's non-fused AdamW keeps it
            opt.state[p]["step"] = torch.tensor(10.0)
        elif edit == "pop":
            assert opt.state.pop(p)["exp_avg"].shape == (7, 5)
        elif edit == "popitem":
            opt.state.popitem()
        elif edit == "clear_all":
            opt.state.clear()
        elif edit == "pop_entry":  # a moment dropped: the step starts it again from zero, as a fresh state's
            opt.state[p].pop("exp_avg_sq")
        if fresh:  # the reference: a new optimizer that loads exactly this state
            saved = {"state": {i: dict(opt.state[q]) for i, q in enumerate(params) if opt.state.get(q)},
                     "param_groups": [{**opt.param_groups[0], "params": [0, 1, 2]}]}
            opt = mixprec.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
            opt.load_state_dict(copy.deepcopy(saved))
        _steps(opt, params, range(3, 6))
        assert isinstance(opt.state[p]["exp_avg"], torch.Tensor) and opt.state[p]["step"].item() > 0
        return [q.detach().clone() for q in params] + [opt.state[q]["exp_avg"].clone() for q in params]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_state_created_by_the_core_is_the_state_in_optimizer_state() -> None:
    params = _bf16_params()
    opt = mixprec.optim.AdamW(params, lr=1e-2)
    _steps(opt, params, range(0, 2))
    st = opt.state[params[0]]
    m, master = st["exp_avg"], st["master"]
    before = m.clone()
    _steps(opt, params, range(2, 3))
    assert opt.state[params[0]]["exp_avg"] is m and not torch.equal(m, before)  # updated in place
    assert torch.equal(master.bfloat16(), params[0].detach())
    sd = opt.state_dict()
    assert all(type(v) is dict for v in sd["state"].values())  # plain dicts, loadable without mixprec


def test_pickle_and_deepcopy_resume_bit_for_bit() -> None:
    import pickle

    params = _bf16_params()
    opt = mixprec.optim.AdamW(params, lr=1e-2, weight_decay=0.1, rounding="stochastic", seed=3,
                              master_weights="none", fused=True)
    _steps(opt, params, range(0, 3))
    blob = pickle.dumps((params, opt))
    twin_params, twin = pickle.loads(blob)
    copied_params, copied = copy.deepcopy((params, opt))
    assert twin._step_supports_amp_scaling and type(twin.state) is not collections.defaultdict
    for o, ps in ((opt, params), (twin, twin_params), (copied, copied_params)):
        _steps(o, ps, range(3, 6))
    for a, b, c in zip(params, twin_params, copied_params):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_parameter_converted_in_place_is_stepped_in_its_new_dtype() -> None:
    params = _bf16_params()
    opt = mixprec.optim.AdamW(params, lr=1e-2)
    _steps(opt, params, range(0, 2))
    params[1].data = params[1].data.float()  # same Parameter object, now fp32: its own master from here on
    before = params[1].detach().clone()
    _steps(opt, params, range(2, 4))  # (5,) gets a gradient on steps 1 and 2 only
    assert params[1].dtype == torch.float32 and opt.state[params[1]]["step"].item() == 2
    assert not torch.equal(params[1], before) and not torch.equal(params[1], params[1].bfloat16().float())
    assert params[0].dtype == torch.bfloat16 and torch.equal(opt.state[params[0]]["master"].bfloat16(), params[0])


def test_a_failed_step_leaves_optimizer_state_and_core_in_agreement() -> None:
    """A group that fails half way (remainders asked for an fp16 parameter after bf16 ones got state) must
    not leave state in the core that optimizer.state lacks: after the fix, a step matches a fresh optimizer."""
    def run(fail_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(6).bfloat16()), torch.nn.Parameter(torch.randn(6).half())]
        opt = mixprec.optim.AdamW(params, lr=1e-2, master_weights="remainder" if fail_first else "auto")
        for p in params:
            p.grad = torch.ones(6, dtype=p.dtype)
        if fail_first:
            with pytest.raises(ValueError, match="remainder"):
                opt.step()
            opt.param_groups[0]["master_weights"] = "auto"
        opt.step()
        assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq", "master"}
        return [p.detach().clone() for p in params] + [opt.state[p]["master"] for p in params]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


# ---- torch.optim's contract in the corners (found by comparing with torch) -----------------------------------


def _paired(cls_name: str, **kwargs) -> tuple[list, list, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    ours_p = [torch.nn.Parameter(t.clone()) for t in init]
    ref_p = [torch.nn.Parameter(t.clone()) for t in init]
    return (ours_p, ref_p, getattr(mixprec.optim, cls_name)(ours_p, **kwargs),
            getattr(torch.optim, cls_name)(ref_p, foreach=False, **kwargs))


def _step_both(ours_p, ref_p, ours, ref, step: int) -> None:
    for ps in (ours_p, ref_p):
        for p, g in zip(ps, grads_for(step, SHAPES, "cpu")):
            p.grad = g
    ours.step()
    ref.step()


def test_tensor_betas_are_kept_and_follow_in_place_changes() -> None:
    b_ours, b_ref = (torch.tensor(0.9), torch.tensor(0.999)), (torch.tensor(0.9), torch.tensor(0.999))
    ours_p, ref_p, ours, ref = _paired("AdamW", lr=1e-2)
    ours.param_groups[0]["betas"], ref.param_groups[0]["betas"] = b_ours, b_ref
    ours_t = mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=b_ours)
    assert ours_t.param_groups[0]["betas"][0] is b_ours[0]  # the very tensor, as torch keeps it
    for step in range(6):
        if step == 3:
            b_ours[0].fill_(0.5)
            b_ref[0].fill_(0.5)
        _step_both(ours_p, ref_p, ours, ref, step)
    for a, b in zip(ours_p, ref_p):
        assert_close_to_torch(a.detach(), b.detach())


def test_a_number_step_in_a_loaded_state_dict_advances() -> None:
    """Old checkpoints hold step counts as numbers: the loaded count advances with the steps, as torch's does."""
    ours_p, ref_p, ours, ref = _paired("AdamW", lr=1e-2)
    for step in range(3):
        _step_both(ours_p, ref_p, ours, ref, step)
    for opt in (ours, ref):
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            st["step"] = 3  # a plain number, as torch < 1.12 saved it
        opt.load_state_dict(sd)
    for step in range(3, 5):
        _step_both(ours_p, ref_p, ours, ref, step)
    for a, b in zip(ours_p, ref_p):
        assert float(ours.state[a]["step"]) == float(ref.state[b]["step"]) == 5.0
        assert float(ours.state_dict()["state"][0]["step"]) == 5.0
        assert_close_to_torch(a.detach(), b.detach())


def test_adamw_stays_decoupled_whatever_it_loads() -> None:
    """As torch's AdamW: a torch.optim.Adam state dict loads into AdamW without turning it into L2 Adam, and
    decoupled_weight_decay=False is not an AdamW option."""
    ours_p, ref_p, ours, ref = _paired("AdamW", lr=1e-2, weight_decay=0.1)
    adam_sd = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in ours_p], lr=1e-2,
                               weight_decay=0.1).state_dict()
    ours.load_state_dict(copy.deepcopy(adam_sd))
    ref.load_state_dict(copy.deepcopy(adam_sd))
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    for step in range(3):
        _step_both(ours_p, ref_p, ours, ref, step)
    for a, b in zip(ours_p, ref_p):
        assert_close_to_torch(a.detach(), b.detach())
    with pytest.raises(TypeError, match="always decoupled"):
        mixprec.optim.AdamW(ours_p, decoupled_weight_decay=False)


def test_load_state_dict_hooks_see_and_shape_the_state_as_with_torch() -> None:
    """A load pre-hook's changes to state tensors stay; post-hooks see the state the optimizer keeps."""
    seen = {}
    for name in ("ours", "torch"):
        ours_p, ref_p, ours, ref = _paired("AdamW", lr=1e-2)
        _step_both(ours_p, ref_p, ours, ref, 0)
        opt = ours if name == "ours" else ref
        sd = copy.deepcopy(opt.state_dict())
        opt.register_load_state_dict_pre_hook(
            lambda o, d: {**d, "state": {k: {**v, "exp_avg": v["exp_avg"] * 0} for k, v in d["state"].items()}})
        post = []
        opt.register_load_state_dict_post_hook(lambda o: post.append(float(sum(s["exp_avg"].abs().sum()
                                                                                for s in o.state.values()))))
        opt.load_state_dict(sd)
        kept = float(sum(s["exp_avg"].abs().sum() for s in opt.state.values()))
        seen[name] = (post, kept)
    assert seen["ours"] == seen["torch"] == ([0.0], 0.0)


def test_load_state_dict_as_torch_extra_keys_substituted_dicts_and_keys_older_checkpoints_lack() -> None:
    """What torch's Optimizer.load_state_dict guarantees, side by side with torch.optim.Adam:
    * a state-dict post-hook's extra top-level key reaches the load pre-hooks;
    * a pre-hook may hand back a torch.optim state dict (a converter): the optimizer still steps;
    * group keys an older checkpoint lacks take torch's defaults (False), not this optimizer's settings, while
      mixprec's own keys take this optimizer's settings."""
    old = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((4,), 0.1),
                         "exp_avg_sq": torch.full((4,), 0.01)}},
           "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "params": [0]}]}
    results = {}
    for cls in (torch.optim.Adam, mixprec.optim.Adam):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4))
        kw = dict(master_weights="none", moment_dtype=torch.bfloat16) if cls is mixprec.optim.Adam else {}
        opt = cls([p], lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True, decoupled_weight_decay=True, **kw)
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "ema_decay": 0.999})
        seen = []
        opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(sd.get("ema_decay")))
        opt.load_state_dict(opt.state_dict())
        assert seen == [0.999]
        opt.register_load_state_dict_pre_hook(lambda o, sd: copy.deepcopy(old))  # a converter's output
        opt.load_state_dict(opt.state_dict())
        group = opt.param_groups[0]
        assert {k: group[k] for k in ("amsgrad", "maximize", "decoupled_weight_decay")} == \
            {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}
        if cls is mixprec.optim.Adam:
            assert (group["master_weights"], group["moment_dtype"]) == ("none", torch.bfloat16)
            group["moment_dtype"] = torch.float32  # to compare the step with torch's
        p.grad = torch.ones(4)
        opt.step()
        results[cls] = p.detach().clone()
    assert_close_to_torch(results[mixprec.optim.Adam], results[torch.optim.Adam])


@pytest.mark.parametrize("betas", [[0.9, 0.95], (torch.tensor([0.9]), torch.tensor([0.95]))])
def test_betas_are_stored_as_torch_stores_them(betas) -> None:
    """A tuple of two (a list or a config's sequence is not kept: state dicts must load with weights_only=True),
    one-element tensors as 0-dim ones."""
    stored = []
    for cls in (torch.optim.AdamW, mixprec.optim.AdamW):
        opt = cls([torch.nn.Parameter(torch.ones(2))], betas=betas)
        b = opt.param_groups[0]["betas"]
        assert type(b) is tuple and len(b) == 2
        assert all(not isinstance(x, torch.Tensor) or x.dim() == 0 for x in b)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
        stored.append([float(x) for x in b])
    assert stored[0] == stored[1]


def test_amsgrad_maximum_follows_torch_maximum_with_nan() -> None:
    """torch.maximum's rule: a NaN second moment, or a NaN running maximum, makes the maximum NaN."""
    p, g, m, v, s_ = [torch.ones(4)], [torch.tensor([1.0, float("nan"), 1.0, 1.0])], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(())]
    vmax = [torch.tensor([0.5, 0.0, float("nan"), 0.0])]
    ops.adam_step_(p, g, m, v, [], s_, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   max_exp_avg_sqs=vmax)
    expected = torch.maximum(torch.tensor([0.5, 0.0, float("nan"), 0.0]), v[0])
    torch.testing.assert_close(vmax[0], expected, rtol=0, atol=0, equal_nan=True)
    assert vmax[0][0] == 0.5 and vmax[0][3] == v[0][3] and vmax[0][1].isnan() and vmax[0][2].isnan()


def test_a_step_advances_version_counters_as_torchs_step() -> None:
    """As torch's for-each and for-loop steps (its fused step does not): a step advances the version counter of every tensor it writes (so autograd
    refuses a backward through a parameter overwritten after it was saved), under inference mode too; the
    op refuses, under grad mode, to write into tensors that require grad."""
    for cls in (torch.optim.AdamW, mixprec.optim.AdamW):
        w = torch.nn.Parameter(torch.ones(3))
        opt = cls([w], lr=0.1)
        y = (w * w).sum()  # saves w
        w.grad = torch.ones(3)
        before = w._version
        opt.step()
        assert w._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
        if cls is mixprec.optim.AdamW:
            st = opt.state[w]
            versions = [st[k]._version for k in ("step", "exp_avg", "exp_avg_sq")]
            with torch.inference_mode():
                opt.step()
            assert [st[k]._version for k in ("step", "exp_avg", "exp_avg_sq")] == [v + 1 for v in versions]
    p = torch.nn.Parameter(torch.ones(3))
    args = ([p], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())])
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(RuntimeError, match=r"mixprec::adam_step_: params\[0\] requires grad"):
        ops.adam_step_(*args, **hyper)
    assert torch.equal(p.detach(), torch.ones(3))
    with torch.no_grad():
        ops.adam_step_(*args, **hyper)
    assert not torch.equal(p.detach(), torch.ones(3))


def test_unscale_advances_the_gradients_version_counters() -> None:
    g = [torch.full((4,), 2.0), torch.full((3,), 4.0, dtype=torch.bfloat16)]
    found = torch.zeros(1)
    versions = [t._version for t in g] + [found._version]
    ops.unscale_and_check_(g, found, torch.full((1,), 0.5))
    assert [t._version for t in g] + [found._version] == [v + 1 for v in versions]
    total = ops.unscale_and_check_sumsq_(g, found, torch.full((1,), 0.5))
    assert [t._version for t in g] == [v + 2 for v in versions[:2]] and not total.requires_grad


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
def test_steps_with_what_torchs_step_takes(cls_name: str) -> None:
    """torch checks ranges in the constructor only: its step computes with whatever a group holds by then (an
    unclamped linear decay takes lr below 0, add_param_group and edits are not checked). The same here."""
    ours_p, ref_p, ours, ref = _paired(cls_name, lr=1e-2)
    for opt, ps in ((ours, ours_p), (ref, ref_p)):
        opt.param_groups[0]["params"] = ps[:2]
        opt.add_param_group({"params": ps[2:], "lr": -1e-3, "weight_decay": -0.1, "betas": (1.05, 0.999)})
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 - e / 3) for o in (ours, ref)]
    for step in range(6):
        _step_both(ours_p, ref_p, ours, ref, step)
        for s in scheds:
            s.step()
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < 0
    for a, b in zip(ours_p, ref_p):
        assert torch.isfinite(a).all()
        assert_close_to_torch(a.detach(), b.detach())


def test_a_refused_step_writes_no_group() -> None:
    ours_p, _, ours, _ = _paired("AdamW", lr=1e-2)
    ours.param_groups[0]["params"] = ours_p[:2]
    ours.add_param_group({"params": ours_p[2:], "betas": (1.0, 0.999)})  # the bias correction divides by 0
    before = [p.detach().clone() for p in ours_p]
    for p, g in zip(ours_p, grads_for(0, SHAPES, "cpu")):
        p.grad = g
    with pytest.raises(ValueError, match=r"betas\[0\] must not be 1"):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(ours_p, before)) and not ours.state
    ours.param_groups[1]["betas"] = (0.9, 0.999)
    ours.step()
    assert all(ours.state[p]["step"].item() == 1 for p in ours_p)


@pytest.mark.parametrize("bad", [{"master_weights": "fp64"}, {"rounding": "up"}, {"moment_dtype": torch.float16},
                                 {"seed": -5}, {"seed": 1.5}, {"rng_calls": -1}])
def test_bad_mixprec_group_options_are_refused_where_they_come_in(bad: dict) -> None:
    """mixprec's own group keys are checked when a group is added (add_param_group, the constructor's list) or
    loaded, as the constructor's keywords and the C++ optimizer check them, not at every later step, which
    would fail until the group was removed by hand (after stepping the groups before it). A refused load
    changes nothing."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError):
        mixprec.optim.AdamW([{"params": params[:1]}, {"params": params[1:], **bad}])
    opt = mixprec.optim.AdamW(params[:1], lr=1e-2)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": params[1:], **bad})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:]})
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    good = opt.state_dict()
    broken = copy.deepcopy(good)
    broken["param_groups"][1].update(bad)
    before = copy.deepcopy(good)
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i in before["state"] for k, v in before["state"][i].items())
    opt.step()  # still steps


def test_a_load_refused_for_a_bad_remainder_changes_nothing() -> None:
    """A remainder widened to int32 (a sharded checkpoint's) outside int16's range is refused before torch's loader
    replaces anything: the optimizer keeps its fp32-exact state (it used to keep a half-restored state, rows cast
    to the parameters' bf16 by torch, and train on silently)."""
    params = [torch.nn.Parameter(torch.randn(4, 3).bfloat16()) for _ in range(3)]
    opt = mixprec.optim.AdamW(params, lr=1e-2, master_weights="remainder")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    before = copy.deepcopy(sd)
    broken = copy.deepcopy(sd)
    for i in broken["state"]:
        broken["state"][i]["remainder"] = broken["state"][i]["remainder"].to(torch.int32)
    broken["state"][2]["remainder"][0, 0] = 40000
    with pytest.raises(ValueError, match="outside int16"):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    for i in before["state"]:
        for k, v in before["state"][i].items():
            assert after["state"][i][k].dtype == v.dtype and torch.equal(after["state"][i][k], v), (i, k)


def test_a_group_of_several_dtypes_refused_at_its_second_launch_writes_nothing() -> None:
    """A group holding fp32 and bf16 parameters (Policy.apply's shape) takes one launch per dtype; a gradient the
    second launch refuses (resized in place) used to be found after the first launch had stepped its rows: the
    fp32 parameters moved, their new state never reached optimizer.state, and under a fused scaler their .grad
    was left divided by the scale. Every launch's arguments are now checked before the first writes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    model[2].to(torch.bfloat16)
    params = list(model.parameters())
    opt = mixprec.optim.AdamW(params, lr=1e-2, fused=True)
    scaler = mixprec.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(5, 8)
    loss = model[2](model[1](model[0](x)).bfloat16()).float().pow(2).mean()
    scaler.scale(loss).backward()
    with torch.no_grad():
        params[3].grad.resize_(2)
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params[:2]]
    with pytest.raises(RuntimeError, match="shape"):
        scaler.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and not opt.state
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params[:2]))  # still scaled, as torch leaves them


def test_a_load_torchs_loader_refuses_leaves_the_optimizer_as_it_was() -> None:
    """A row without "step" passes the checks before the load and is refused by torch's Adam.__setstate__ after its
    loader replaced param_groups and state: they come back (the next step went on from the dict's lr and
    bf16-rounded moments, restarting at step 1)."""
    p = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = mixprec.optim.AdamW([p], lr=1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    broken = copy.deepcopy(before)
    broken["param_groups"][0]["lr"] = 0.5
    del broken["state"][0]["step"]
    with pytest.raises(KeyError):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][0][k], v) and after["state"][0][k].dtype == v.dtype
               for k, v in before["state"][0].items())
    opt.step()
    assert opt.state[p]["step"].item() == 2


def test_a_load_frees_the_state_it_replaces() -> None:
    """After load_state_dict (or optimizer.state replaced) the old state tensors are freed at once, as with torch's
    optimizers; the core used to hold them until the next step."""
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    opt = mixprec.optim.AdamW([p], lr=1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    olds = [weakref.ref(t) for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    opt.load_state_dict(sd)
    gc.collect()
    assert all(r() is None for r in olds)
    olds = [weakref.ref(t) for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    opt.state = collections.defaultdict(dict)
    gc.collect()
    assert all(r() is None for r in olds)
    opt.step()  # starts afresh
    assert opt.state[p]["step"].item() == 1


def test_state_dict_post_hooks_may_return_a_new_dict_as_with_torch() -> None:
    seen = {}
    for name in ("ours", "torch"):
        ours_p, ref_p, ours, ref = _paired("AdamW", lr=1e-2)
        _step_both(ours_p, ref_p, ours, ref, 0)
        opt = ours if name == "ours" else ref
        rows = []
        opt.register_state_dict_post_hook(lambda o, sd: rows.append(sorted(sd["state"][0])))  # sees the plain rows
        opt.register_state_dict_post_hook(lambda o, sd: {"param_groups": sd["param_groups"], "note": 1})
        sd = opt.state_dict()
        seen[name] = (sorted(sd), [g["lr"] for g in sd["param_groups"]], rows)
    assert seen["ours"][:2] == seen["torch"][:2] == (["note", "param_groups"], [1e-2])
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(seen["ours"][2][0]) and seen["torch"][2][0] == [
        "exp_avg", "exp_avg_sq", "step"]


@pytest.mark.parametrize("cls", ["AdamW", "Adam"])
def test_the_signature_lists_torchs_parameters_with_torchs_defaults(cls: str) -> None:
    """Code inspects the constructor (nanoGPT passes fused=True only when inspect.signature(AdamW).parameters
    has "fused"; config tools build options from it): every parameter of torch's, of the same kind and default,
    and mixprec's own keywords besides."""
    import inspect

    ours = inspect.signature(getattr(mixprec.optim, cls)).parameters
    theirs = inspect.signature(getattr(torch.optim, cls)).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        assert ours[name].default == p.default, name
    assert {"master_weights", "moment_dtype", "rounding", "seed", "rng_calls"} <= set(ours)
    assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in ours.values())


def test_seeded_stochastic_rounding_draws_apart_across_groups() -> None:
    """Every launch of a step numbers its elements from 0: with one Philox key, element i of every param group
    (the decay / no-decay split of HF Trainer and nanoGPT) and of every dtype bucket would round alike. Each
    (group, launch) has its own key: two equal tensors in two groups round apart as often as in one group, and
    the first launch of group 0 keeps the step's key (a one-group run's bits do not change)."""
    def identical(layout: str) -> float:
        a = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        b = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        groups = [{"params": [a]}, {"params": [b]}] if layout == "groups" else [{"params": [a, b]}]
        opt = mixprec.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, master_weights="none", rounding="stochastic",
                                  seed=123)
        for _ in range(20):
            a.grad = torch.full_like(a, 1e-3)
            b.grad = torch.full_like(b, 1e-3)
            opt.step()
        return (a.float() == b.float()).double().mean().item()

    one = identical("one")
    assert 0.05 < one < 0.5  # offsets run on across tensors within a launch: they draw apart
    assert abs(identical("groups") - one) < 0.05  # it was 1.0: every element drew as its twin
    # The key of group 0's first launch is the step's: group 0 draws the same with or without a second group.
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    other = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    for param, groups in ((p, [{"params": [p]}]), (q, [{"params": [q]}, {"params": [other]}])):
        opt = mixprec.optim.AdamW(groups, lr=1e-3, master_weights="none", rounding="stochastic", seed=9)
        param.grad = torch.full_like(param, 1e-3)
        opt.step()
    assert torch.equal(p, q)


def test_a_remainder_state_widened_to_int32_loads_back_as_int16() -> None:
    """Under FSDP2 state_dict() widens the int16 remainders to int32 (collectives move no int16); such a state
    dict, gathered into plain tensors, loads into an unsharded optimizer as the int16 state it was, and values
    outside int16's range are refused by name."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(37).bfloat16())
    opt = mixprec.optim.AdamW([p], lr=1e-2, master_weights="remainder")
    p.grad = torch.randn(37).bfloat16()
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["remainder"].dtype == torch.int16  # unsharded: as kept
    widened = copy.deepcopy(sd)
    widened["state"][0]["remainder"] = widened["state"][0]["remainder"].to(torch.int32)
    q = torch.nn.Parameter(p.detach().clone())
    other = mixprec.optim.AdamW([q], lr=1e-2, master_weights="remainder")
    other.load_state_dict(widened)
    assert other.state[q]["remainder"].dtype == torch.int16
    assert torch.equal(other.state[q]["remainder"], opt.state[p]["remainder"])
    for opt_, param in ((opt, p), (other, q)):
        param.grad = torch.ones(37).bfloat16()
        opt_.step()
    assert torch.equal(p, q) and torch.equal(other.state[q]["remainder"], opt.state[p]["remainder"])
    # int16's whole range loads, and one past either end is refused.
    for edge, ok in ((-32768, True), (32767, True), (-32769, False), (32768, False)):
        widened["state"][0]["remainder"][:2] = torch.tensor([edge, 0], dtype=torch.int32)
        fresh = mixprec.optim.AdamW([torch.nn.Parameter(q.detach().clone())], master_weights="remainder")
        if ok:
            fresh.load_state_dict(widened)
            loaded = next(iter(fresh.state.values()))["remainder"]
            assert loaded.dtype == torch.int16 and int(loaded[0]) == edge and int(loaded[1]) == 0
        else:
            with pytest.raises(ValueError, match="remainder state widened to int32 holds values outside int16's range"):
                fresh.load_state_dict(widened)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_rows_of_any_layout_in_one_launch_step_as_their_contiguous_copies(device: str, rounding: str) -> None:
    """One launch whose rows mix layouts: dense rows walked in place (one at a storage offset of one element,
    misaligned for vector loads) beside rows walked through copies (a strided parameter, a transposed
    parameter with a plain gradient, a transposed master). Every row steps as the same row made contiguous, bit
    for bit (stochastic draws included: they follow the row's place in the list), the scaled gradients are
    written back unscaled, and the memory between a strided view's elements is not written."""
    torch.manual_seed(11)
    base = torch.randn(8, 10, device=device).bfloat16()
    padded = torch.randn(1 + 7 * 5, device=device).bfloat16()
    params = [
        torch.randn(7, 5, device=device).bfloat16(),            # dense, in place
        base[:, ::2],                                            # strided: copied
        torch.randn(5, 7, device=device).bfloat16().t(),        # transposed; its gradient is plain: copied
        padded[1:].view(7, 5),                                   # in place at an odd element offset
        torch.randn(3, device=device).bfloat16(),               # in place
    ]
    outside = base[:, 1::2].clone()
    grads = [torch.randn(p.shape, device=device).bfloat16() * 64 for p in params]
    exp_avgs = [torch.rand(p.shape, device=device) for p in params]
    exp_avg_sqs = [torch.rand(p.shape, device=device) for p in params]
    vmaxs = [v + torch.rand(p.shape, device=device) for v, p in zip(exp_avg_sqs, params)]
    masters = [p.float() for p in params]
    masters[4] = torch.randn(3, 1, device=device).t().reshape(3)  # a view of a transposed row: still dense
    masters[0] = masters[0].t().contiguous().t()  # a transposed master beside a plain param: copied
    steps = [torch.full((), 2.0, device=device) for _ in params]
    unscaled = [(g.float() / 64).bfloat16() for g in grads]  # exact: 64 is a power of two

    def lists(contiguous: bool) -> list[list[torch.Tensor]]:
        make = (lambda t: t.clone(memory_format=torch.contiguous_format)) if contiguous else (lambda t: t)
        return [[make(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, masters, steps, vmaxs)]

    results = []
    for contiguous in (True, False):  # the copies first: the second run writes the tensors themselves
        p, g, m, v, w, s, vmax = lists(contiguous)
        ops.adam_step_(p, g, m, v, w, s, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                       decoupled_weight_decay=True, maximize=False, master_mode="fp32", rounding=rounding, seed=3,
                       grad_scale=torch.full((1,), 64.0, device=device), max_exp_avg_sqs=vmax)
        results.append((p, g, m, v, w, s, vmax))
    for contiguous, ours in zip(results[0], results[1]):
        for a, b in zip(ours, contiguous):
            assert torch.equal(a, b)
    assert params[1].data_ptr() == base.data_ptr() and not params[1].is_contiguous()
    for g, expected in zip(grads, unscaled):
        assert torch.equal(g, expected)  # written back unscaled, the copied rows' too
    assert torch.equal(base[:, 1::2], outside)
