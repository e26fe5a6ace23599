"""torch's grad-scaling scenarios run with torch.amp.GradScaler and with mixprec.GradScaler, for torch's
optimizers (SGD, Adam, AdamW, Adagrad: for-loop, foreach and fused) and mixprec's: the scale history, the
parameters, the optimizer state and what ``.grad`` holds after every step must be identical."""

from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Callable

import pytest
import torch
from conftest import DEVICES
from torch.amp.grad_scaler import OptState

import mixprec


def _opt(cls: type, **kw) -> Callable:
    return lambda params: cls(params, **kw)


OPTIMIZERS = {
    "sgd": _opt(torch.optim.SGD, lr=0.05, momentum=0.9, foreach=False),
    "sgd-foreach": _opt(torch.optim.SGD, lr=0.05, momentum=0.9, foreach=True),
    "sgd-fused": _opt(torch.optim.SGD, lr=0.05, momentum=0.9, fused=True),
    "adam": _opt(torch.optim.Adam, lr=1e-2, foreach=False),
    "adam-foreach": _opt(torch.optim.Adam, lr=1e-2, foreach=True),
    "adam-fused": _opt(torch.optim.Adam, lr=1e-2, fused=True),
    "adamw": _opt(torch.optim.AdamW, lr=1e-2, foreach=False),
    "adamw-foreach": _opt(torch.optim.AdamW, lr=1e-2, foreach=True),
    "adamw-fused": _opt(torch.optim.AdamW, lr=1e-2, fused=True),
    "adagrad": _opt(torch.optim.Adagrad, lr=0.1, foreach=False),
    "adagrad-foreach": _opt(torch.optim.Adagrad, lr=0.1, foreach=True),
    "adagrad-fused": _opt(torch.optim.Adagrad, lr=0.1, fused=True),
    "mixprec-adamw": _opt(mixprec.optim.AdamW, lr=1e-2),
    "mixprec-adamw-fused": _opt(mixprec.optim.AdamW, lr=1e-2, fused=True),
    "mixprec-adam": _opt(mixprec.optim.Adam, lr=1e-2, weight_decay=0.1),
}
PLANT = (4, 5, 13)  # iterations whose gradients get an inf or a NaN


def make_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)


def plant(i: int, model: torch.nn.Module) -> None:
    if i in PLANT:
        model[0].weight.grad.view(-1)[i] = math.inf if i % 2 else math.nan


# -- the scenarios: body(i, model, opts, scaler, x) runs one iteration ------------------------------------------

def plain(i, model, opts, scaler, x):
    opts[0].zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    plant(i, model)
    scaler.step(opts[0])
    scaler.update()


def unscale_and_clip(i, model, opts, scaler, x):
    opts[0].zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    plant(i, model)
    scaler.unscale_(opts[0])
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    scaler.step(opts[0])
    scaler.update()


def accumulation(i, model, opts, scaler, x):
    opts[0].zero_grad()
    for chunk in x.chunk(3):
        scaler.scale(model(chunk).pow(2).mean() / 3).backward()
    plant(i, model)
    scaler.step(opts[0])
    scaler.update()


def two_optimizers_two_losses(i, model, opts, scaler, x):
    for opt in opts:
        opt.zero_grad()
    out = model(x)
    scaler.scale(out.pow(2).mean()).backward(retain_graph=True)
    scaler.scale(out.abs().mean()).backward()
    plant(i, model)
    scaler.step(opts[0])
    scaler.step(opts[1])
    scaler.update()


def gradient_penalty(i, model, opts, scaler, x):
    opts[0].zero_grad()
    x = x.clone().requires_grad_()
    out = model(x)
    scaled = torch.autograd.grad(scaler.scale(out.sum()), [x], create_graph=True)
    inv = 1.0 / scaler.get_scale()
    penalty = sum((g * inv).pow(2).sum() for g in scaled)
    scaler.scale(out.pow(2).mean() + penalty).backward()
    plant(i, model)
    scaler.step(opts[0])
    scaler.update()


def setters(i, model, opts, scaler, x):
    if i == 7:
        scaler.set_growth_factor(4.0)
        scaler.set_backoff_factor(0.25)
        scaler.set_growth_interval(2)
    plain(i, model, opts, scaler, x)


def held_scale(i, model, opts, scaler, x):
    """Factors of exactly 1, as training code sets them through torch's setters: a floor under the scale (no
    backoff) from iteration 6, then a cap (no growth) with backoff again from iteration 10."""
    if i == 6:
        scaler.set_backoff_factor(1.0)
    if i == 10:
        scaler.set_growth_factor(1.0)
        scaler.set_backoff_factor(0.5)
    plain(i, model, opts, scaler, x)


def assigned_scale(i, model, opts, scaler, x):
    """torch's attributes assigned as public training code assigns them: a floor under the scale written into
    `_scale`, and the growth count restarted through `_growth_tracker`."""
    plain(i, model, opts, scaler, x)
    if scaler._scale < 600.0:
        scaler._scale = torch.tensor(600.0).to(scaler._scale)
    if i == 8:
        scaler._growth_tracker = torch.zeros((), dtype=torch.int32, device=scaler._scale.device)


SCENARIOS = {f.__name__: f for f in (plain, unscale_and_clip, accumulation, two_optimizers_two_losses,
                                     gradient_penalty, setters, held_scale, assigned_scale)}


def run(scaler_cls: type, device: str, make_opt: Callable, body: Callable, steps: int = 20,
        restart_at: int | None = None, restart: str = "state_dict", scaler_device: str | None = None) -> dict:
    """Train with `body`; with `restart_at`, rebuild scaler and optimizers from a checkpoint (state dicts, a
    pickle or a deepcopy of the scaler) at that iteration and go on with the new objects. The scaler is
    built for `scaler_device` (default: `device`)."""
    model = make_model(device)
    params = list(model.parameters())
    opts = [make_opt(params[:2]), make_opt(params[2:])] if body is two_optimizers_two_losses else [make_opt(params)]
    scaler = scaler_cls(scaler_device or device, init_scale=2.0**10, growth_interval=3)
    gen = torch.Generator().manual_seed(1)
    record: dict = {"scales": [], "grads": [], "growth": []}
    for i in range(steps):
        if i == restart_at:
            if restart == "state_dict":
                saved = scaler.state_dict()
                scaler = scaler_cls(device)
                scaler.load_state_dict(saved)
            elif restart == "pickle":
                scaler = pickle.loads(pickle.dumps(scaler))
            else:
                scaler = copy.deepcopy(scaler)
            fresh = []
            for opt in opts:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                new = make_opt(opt.param_groups[0]["params"])
                new.load_state_dict(torch.load(buffer))
                fresh.append(new)
            opts = fresh
        x = torch.randn(6, 8, generator=gen).to(device)
        body(i, model, opts, scaler, x)
        record["scales"].append(scaler.get_scale())
        record["growth"].append(scaler.state_dict()["_growth_tracker"])
        record["grads"].append([None if p.grad is None else p.grad.detach().clone() for p in params])
    record["params"] = [p.detach().clone() for p in params]
    record["state"] = [{k: v for k, v in opt.state_dict()["state"].items()} for opt in opts]
    record["scaler"] = scaler.state_dict()
    return record


def assert_identical(a: dict, b: dict) -> None:
    assert a["scales"] == b["scales"], "scale histories differ"
    assert a["growth"] == b["growth"], "growth trackers differ"
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y) or (x.isnan() == y.isnan()).all() and torch.equal(x.nan_to_num(), y.nan_to_num()), \
                    f".grad differs after step {step}"
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y), "parameters differ"
    for sa, sb in zip(a["state"], b["state"]):
        assert sa.keys() == sb.keys()
        for key in sa:
            for name, value in sa[key].items():
                other = sb[key][name]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other), f"optimizer state {name} differs"
                else:
                    assert value == other
    common = a["scaler"].keys() & b["scaler"].keys()  # at least torch's five keys; ours has more
    assert {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= common
    assert all(a["scaler"][k] == b["scaler"][k] for k in common)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_same_as_torch_grad_scaler(optimizer: str, scenario: str, device: str) -> None:
    make_opt, body = OPTIMIZERS[optimizer], SCENARIOS[scenario]
    ours = run(mixprec.GradScaler, device, make_opt, body)
    theirs = run(torch.amp.GradScaler, device, make_opt, body)
    assert any(math.isinf(s) or s < 2.0**10 for s in ours["scales"]), "no overflow was exercised"
    assert_identical(ours, theirs)


@pytest.mark.parametrize("restart", ["state_dict", "pickle", "deepcopy"])
@pytest.mark.parametrize("optimizer", ["adam-fused", "sgd", "mixprec-adamw"])
def test_resume_mid_run_is_identical(optimizer: str, restart: str) -> None:
    """Checkpointing the scaler (state dict, pickle, deepcopy) and the optimizer at step 9 and going on with
    the restored objects gives the run that never stopped, with either scaler."""
    straight = run(mixprec.GradScaler, "cpu", OPTIMIZERS[optimizer], plain)
    resumed = run(mixprec.GradScaler, "cpu", OPTIMIZERS[optimizer], plain, restart_at=9, restart=restart)
    torch_resumed = run(torch.amp.GradScaler, "cpu", OPTIMIZERS[optimizer], plain, restart_at=9,
                        restart=restart)
    assert_identical(straight, resumed)
    assert_identical(straight, torch_resumed)


def test_fused_optimizers_receive_torchs_shapes() -> None:
    """What a `_step_supports_amp_scaling` optimizer sees: 0-dim float32 grad_scale (the scale, gradients still
    scaled) and found_inf, on the scale's device; after unscale_() only found_inf and no grad_scale."""
    seen = []

    class Probe(torch.optim.SGD):
        _step_supports_amp_scaling = True

        def step(self, closure=None):
            seen.append((getattr(self, "grad_scale", None), getattr(self, "found_inf", None),
                         self.param_groups[0]["params"][0].grad.clone()))

    model = make_model("cpu")
    opt = Probe(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler("cpu", init_scale=8.0)
    scaler.scale(model(torch.ones(2, 8)).sum()).backward()
    raw = model[0].weight.grad.clone()
    scaler.step(opt)
    scaler.update()
    grad_scale, found_inf, grad = seen[0]
    assert grad_scale.shape == () and grad_scale.dtype == torch.float32 and grad_scale.item() == 8.0
    assert found_inf.shape == () and found_inf.dtype == torch.float32 and found_inf.item() == 0.0
    assert torch.equal(grad, raw)  # only checked, not unscaled
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")

    opt.zero_grad()
    scaler.scale(model(torch.ones(2, 8)).sum()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    assert seen[1][0] is None and seen[1][1].shape == ()
    scaler.update()


class Recorder:
    """Stands in for the C++ object and records which of its methods a call reached."""

    def __init__(self, impl) -> None:
        self._impl, self.calls = impl, []

    def __getattr__(self, name: str):
        self.calls.append(name)
        return getattr(self._impl, name)


def test_getters_do_not_touch_the_device_and_setters_are_checked() -> None:
    """The getters read the C++ options only: no state dict, no scale (each of which reads device tensors)."""
    scaler = mixprec.GradScaler("cpu", growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    scaler.scale(torch.ones(()))  # the scale tensor exists now
    scaler._impl = recorder = Recorder(scaler._impl)
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()) == (3.0, 0.25, 7)
    assert recorder.calls == ["get_growth_factor", "get_backoff_factor", "get_growth_interval"]
    scaler._impl = recorder._impl
    scaler.set_growth_factor(5.0)
    scaler.set_backoff_factor(0.75)
    scaler.set_growth_interval(11)
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()) == (5.0, 0.75, 11)
    sd = scaler.state_dict()
    assert (sd["growth_factor"], sd["backoff_factor"], sd["growth_interval"]) == (5.0, 0.75, 11)
    for setter, bad, needle in [(scaler.set_growth_factor, 0.5, "growth_factor"),
                                (scaler.set_growth_factor, float("inf"), "growth_factor"),
                                (scaler.set_backoff_factor, 1.5, "backoff_factor"),
                                (scaler.set_backoff_factor, 0.0, "backoff_factor"),
                                (scaler.set_growth_interval, 0, "growth_interval")]:
        with pytest.raises(ValueError, match=needle):
            setter(bad)
    disabled = mixprec.GradScaler("cpu", enabled=False, growth_factor=3.0)
    assert disabled.get_growth_factor() == 3.0 and disabled.state_dict() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the sync check needs a GPU")
def test_getters_cost_no_device_sync_on_cuda() -> None:
    scaler = mixprec.GradScaler("cuda", growth_factor=3.0)
    scaler.scale(torch.ones((), device="cuda"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()
        scaler.set_growth_interval(5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pickle_rules_follow_torch() -> None:
    """Pickling and deep-copying work between iterations and are refused inside one, as torch's; a copy is
    independent of the original; a disabled scaler round-trips too."""
    model = make_model("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler("cpu", init_scale=64.0, hysteresis=2, max_scale=2.0**20)
    scaler.scale(model(torch.ones(2, 8)).sum()).backward()
    scaler.unscale_(opt)
    for fn in (pickle.dumps, copy.deepcopy):
        with pytest.raises(AssertionError, match="only be"):
            fn(scaler)
    scaler.step(opt)
    scaler.update()
    clone = pickle.loads(pickle.dumps(scaler))
    twin = copy.deepcopy(scaler)
    for other in (clone, twin):
        assert other.state_dict() == scaler.state_dict() and other.is_enabled()
    twin.update(2.0)
    assert twin.get_scale() == 2.0 and scaler.get_scale() == 64.0
    off = pickle.loads(pickle.dumps(mixprec.GradScaler("cpu", enabled=False)))
    assert not off.is_enabled() and off.state_dict() == {}


class _TorchCounting(torch.amp.GradScaler):
    """A subclass with an attribute of its own and an override, as a user writes one (module level: it pickles)."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscales += 1
        super().unscale_(optimizer)


class _MixprecCounting(mixprec.GradScaler):
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscales += 1
        super().unscale_(optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        self.loads = getattr(self, "loads", 0) + 1 if hasattr(self, "unscales") else -1  # reads its own attribute
        super().load_state_dict(state_dict)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))], ids=["deepcopy", "pickle"])
def test_a_subclass_keeps_its_class_and_attributes_through_copies_as_torchs(copier: Callable) -> None:
    """torch's scaler pickles and copies its instance dict: a subclass stays one (its overrides run) and keeps its
    own attributes. Ours built a plain mixprec.GradScaler on deepcopy and dropped the attributes on pickle."""
    results = []
    for cls in (_TorchCounting, _MixprecCounting):
        scaler = cls("cpu", init_scale=8.0)
        scaler.unscales = 0
        scaler.note = ["kept"]
        other = copier(scaler)
        assert type(other) is cls and other.note == ["kept"] and other.note is not scaler.note
        if cls is _MixprecCounting:  # its load_state_dict override ran with its own attributes in place
            assert other.loads == 1 and not hasattr(scaler, "loads")
        model = make_model("cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        other.scale(model(torch.ones(2, 8)).sum()).backward()
        other.unscale_(opt)
        other.step(opt)
        other.update()
        results.append((other.unscales, scaler.unscales, other.get_scale()))
    assert results[0] == results[1] == (1, 0, 8.0)


@pytest.mark.parametrize("second", ["adamw-fused", "adam-fused", "mixprec-adamw-fused"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_an_optimizer_without_gradients_this_iteration(second: str, unscale_first: bool) -> None:
    """Two optimizers, the second's parameters unused in some iterations (no gradients). An optimizer that
    takes the flag itself steps as a no-op there, with torch's scaler and ours; update() runs on the first's
    checks; the results are identical."""
    results = []
    for scaler_cls in (torch.amp.GradScaler, mixprec.GradScaler):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), OPTIMIZERS[second](b.parameters())
        scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2)
        x = torch.randn(2, 4)
        for it in range(4):
            opt_a.zero_grad(set_to_none=True)
            opt_b.zero_grad(set_to_none=True)
            loss = a(x).sum() + (b(x).sum() if it % 2 == 0 else 0.0)
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt_b)
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
        results.append([p.detach().clone() for p in (*a.parameters(), *b.parameters())] + [scaler.get_scale()])
    for x, y in zip(*results):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused", "mixprec-adamw"])
def test_flags_changed_in_place_after_unscale_decide_the_step(optimizer: str) -> None:
    """The data-parallel pattern: after unscale_, loops take _found_inf_per_device(opt) and all-reduce the flags
    in place (here: another rank's overflow, written in by hand in iteration 1) or assign the reduced flag back
    into the dict (iteration 2). step() then skips and update() backs off, with torch's scaler and ours alike."""
    results = []
    for scaler_cls in (torch.amp.GradScaler, mixprec.GradScaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = OPTIMIZERS[optimizer](model.parameters())
        scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=3)
        x = torch.randn(2, 4)
        seen = []
        for it in range(4):
            opt.zero_grad(set_to_none=True)
            scaler.scale(model(x).sum()).backward()
            assert scaler._found_inf_per_device(opt) == {}  # nothing recorded before unscale_
            scaler.unscale_(opt)
            flags = scaler._found_inf_per_device(opt)
            assert list(flags) == [torch.device("cpu")]
            seen.append(float(sum(flags.values())))
            if it == 1:
                for flag in flags.values():
                    flag.fill_(1.0)  # what MAX-reducing with an overflowing rank does
            if it == 2:  # a reduced flag assigned into torch's dict (not in place) decides as well
                flags[torch.device("cpu")] = torch.ones((), dtype=torch.float32)
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()] + [scaler.get_scale(), seen])
    for x, y in zip(*results):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y
    assert results[1][-2] == 2.0**8  # both flags backed the scale off (no growth within 3 steps)


def test_call_order_errors_have_torchs_types() -> None:
    """Where torch's scaler asserts its call order (AssertionError), ours raises the same type: loops catch it."""

    def scenarios(scaler_cls: type) -> list[str]:
        out = []
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for call in ("step", "unscale_", "update"):
            fresh = scaler_cls("cpu")
            try:
                getattr(fresh, call)(*([] if call == "update" else [opt]))
                out.append(f"{call}: ok")
            except Exception as e:  # noqa: BLE001 - the type and torch's message are what is compared
                out.append(f"{call}: {type(e).__name__}: {str(e).split('.')[0]}")
        scaler = scaler_cls("cpu")
        scaler.scale(torch.ones(1))
        try:
            scaler.step(opt)  # no gradients: no inf checks for a plain optimizer
            out.append("no grads: ok")
        except Exception as e:  # noqa: BLE001
            out.append(f"no grads: {type(e).__name__}")
        return out

    theirs, ours = scenarios(torch.amp.GradScaler), scenarios(mixprec.GradScaler)
    assert ours == theirs
    assert theirs == ["step: AssertionError: Attempted step but _scale is None",
                      "unscale_: AssertionError: Attempted unscale_ but _scale is None",
                      "update: AssertionError: Attempted update but _scale is None", "no grads: AssertionError"]


def test_update_with_a_new_scale_tensor_takes_and_refuses_what_torch_does() -> None:
    """update(new_scale=tensor): torch copies a one-element tensor of any dtype into its fp32 scale and asserts
    (AssertionError) the rest; ours did the opposite for a float64 or bf16 one (a ValueError)."""
    def run(scaler_cls: type, new_scale: torch.Tensor) -> str:
        scaler = scaler_cls("cpu")
        scaler.scale(torch.ones(()))
        try:
            scaler.update(new_scale)
        except Exception as e:  # noqa: BLE001 - the type and torch's message are what is compared
            return f"{type(e).__name__}: {e}"
        return f"scale {scaler.get_scale()}"

    for new_scale in (torch.tensor(4.0, dtype=torch.float64), torch.tensor(8.0, dtype=torch.bfloat16),
                      torch.tensor(16, dtype=torch.int32), torch.tensor([2.0, 3.0]), torch.empty(0),
                      torch.tensor(2.0, requires_grad=True), torch.tensor(32.0)):
        assert run(mixprec.GradScaler, new_scale) == run(torch.amp.GradScaler, new_scale), new_scale


def test_load_state_dict_takes_what_torchs_takes_and_refuses_atomically() -> None:
    """Numbers of any kind (NumPy's, one-element tensors) load as with torch; a missing key is a KeyError as
    there; a value our checks refuse leaves the scaler exactly as it was."""
    import numpy as np

    loose = {"scale": torch.tensor(8.0), "growth_factor": np.float64(3.0), "backoff_factor": 0.25,
             "growth_interval": np.int64(10), "_growth_tracker": torch.tensor(3)}
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        scaler = cls("cpu")
        scaler.load_state_dict(dict(loose))
        assert (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(),
                scaler.get_growth_interval(), scaler._get_growth_tracker()) == (8.0, 3.0, 0.25, 10, 3)
        with pytest.raises(KeyError, match="growth_factor"):
            cls("cpu").load_state_dict({k: v for k, v in loose.items() if k != "growth_factor"})
    scaler = mixprec.GradScaler("cpu", init_scale=64.0, growth_interval=7)
    before = scaler.state_dict()
    with pytest.raises(ValueError, match="growth"):
        scaler.load_state_dict({**before, "scale": 2.0, "growth_factor": 0.5})
    with pytest.raises(ValueError, match="'growth_interval' must be a whole number"):
        scaler.load_state_dict({**before, "scale": 2.0, "growth_interval": math.nan})
    # A value that is no number is named (torch kept the string '128' as its scale).
    with pytest.raises(ValueError, match="'scale' must be a number"):
        scaler.load_state_dict({**before, "scale": "128"})
    assert scaler.state_dict() == before


@pytest.mark.parametrize("scale", [0.0, math.inf])
def test_a_scale_that_fell_to_zero_or_was_set_to_inf_saves_loads_and_resumes_as_torchs(scale: float) -> None:
    """min_scale is 0 by default: a diverged run backs its scale off to 0 and keeps checkpointing (update(inf)
    by hand gives the other end). torch's scaler loads such a state dict, deep-copies and unpickles; ours
    refused them all ("init_scale must be a finite number > 0"), so a checkpoint saved could not be resumed.
    A step after the load behaves as torch's does."""
    results = []
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        torch.manual_seed(2)
        p = torch.nn.Parameter(torch.randn(4))
        opt = torch.optim.SGD([p], lr=0.1)
        scaler = cls("cpu", growth_interval=1)
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        scaler.update(scale)
        state = scaler.state_dict()
        assert state["scale"] == scale
        fresh = cls("cpu")
        fresh.load_state_dict(state)
        copies = [fresh, copy.deepcopy(scaler), pickle.loads(pickle.dumps(scaler))]
        assert [c.get_scale() for c in copies] == [scale] * 3
        opt.zero_grad()
        fresh.scale(p.sum()).backward()
        fresh.step(opt)
        fresh.update()
        results.append((p.detach().clone(), fresh.get_scale(), fresh.state_dict()))
    (p_torch, scale_torch, state_torch), (p_ours, scale_ours, state_ours) = results
    torch.testing.assert_close(p_ours, p_torch, rtol=0, atol=0, equal_nan=True)  # scale 0: 0 * inf, NaN in both
    assert scale_torch == scale_ours
    assert {k: state_ours[k] for k in state_torch} == state_torch


def test_get_scale_async_is_none_until_the_first_scale() -> None:
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        scaler = cls("cpu", init_scale=8.0)
        assert scaler._get_scale_async() is None
        scaler.scale(torch.ones(1))
        assert float(scaler._get_scale_async()) == 8.0


def test_the_scale_is_created_on_the_first_outputs_device() -> None:
    """torch creates the scale where the first scaled output lives, whatever device the constructor named (a
    scaler built as "cuda" before torch.cuda.set_device(rank) scales on that rank's GPU). The meta device
    shows it on any machine: a scale made on the constructor's device would be on the CPU."""
    for outputs in (torch.ones(2, device="meta"), [torch.ones(2, device="meta"), torch.ones(3, device="meta")]):
        devices = []
        for cls in (torch.amp.GradScaler, mixprec.GradScaler):
            scaler = cls("cpu", init_scale=4.0)
            scaled = scaler.scale(outputs)
            devices.append((scaler._scale.device, scaler._growth_tracker.device,
                            [t.device for t in (scaled if isinstance(scaled, list) else [scaled])]))
        assert devices[0] == devices[1] and devices[1][0] == torch.device("meta")
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):  # torch's private hook takes the device too
        scaler = cls("cpu")
        scaler._lazy_init_scale_growth_tracker(torch.device("meta"))
        assert scaler._scale.device == torch.device("meta")
        with pytest.raises(AssertionError, match="_growth_tracker initialized before _scale"):
            scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_step_on_the_second_gpu_matches_torch() -> None:
    """Scaler built as "cuda" while cuda:0 is current, model and data on cuda:1: torch's and ours keep the
    scale on cuda:1 and train identically."""
    records = [run(cls, "cuda:1", OPTIMIZERS["adamw-fused"], plain, steps=8, scaler_device="cuda")
               for cls in (torch.amp.GradScaler, mixprec.GradScaler)]
    assert_identical(*records)
    scaler = mixprec.GradScaler("cuda")
    scaler.scale(torch.ones((), device="cuda:1"))
    assert scaler._scale.device == torch.device("cuda:1")
    scaler = mixprec.GradScaler("cuda")
    scaler._lazy_init_scale_growth_tracker(torch.device("cuda:1"))
    assert scaler._scale.device == torch.device("cuda:1")


class _LegacyScalingSGD(torch.optim.SGD):
    """An optimizer of torch's older protocol (apex, timm): it takes the scaler as `grad_scaler` and checks and
    unscales itself through the scaler's private accessors."""

    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):  # type: ignore[override]
        if grad_scaler is not None:
            if sum(v.item() for v in grad_scaler._check_inf_per_device(self).values()):
                return "skipped"
            inv = 1.0 / grad_scaler._get_scale_async()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv)
        super().step(closure)
        return "stepped"


def test_the_older_grad_scaler_keyword_protocol() -> None:
    """An optimizer whose step takes `grad_scaler` receives the scaler (with torch's FutureWarning) and does the
    rest itself: the same parameters, returns, scale and warnings as with torch's scaler, overflow included."""
    results = []
    for scaler_cls in (torch.amp.GradScaler, mixprec.GradScaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = _LegacyScalingSGD(model.parameters(), lr=0.1)
        scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2)
        x = torch.randn(2, 4)
        returns = []
        for it in range(4):
            opt.zero_grad(set_to_none=True)
            loss = model(x).sum() * (math.inf if it == 1 else 1.0)
            scaler.scale(loss).backward()
            with pytest.warns(FutureWarning, match="stop passing itself"):
                returns.append(scaler.step(opt))
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()] + [scaler.get_scale(), returns])
    for x, y in zip(*results):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert results[1][-1] == ["stepped", "skipped", "stepped", "stepped"]


class _ClippingLegacySGD(torch.optim.SGD):
    """A clipping optimizer of the older protocol as written against torch (timm's AGC wrapper, apex's
    distributed optimizers): it reads the scaler's per-optimizer record, unscales through the scaler, reads the
    same record again (now UNSCALED) and lets the scaler decide through `_maybe_opt_step`."""

    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):  # type: ignore[override]
        from torch.amp.grad_scaler import OptState

        if grad_scaler is None:  # _maybe_opt_step's call
            return super().step(closure)
        record = grad_scaler._per_optimizer_states[id(self)]
        assert record["stage"] is OptState.READY
        grad_scaler.unscale_(self)
        assert record["stage"] is OptState.UNSCALED and len(record["found_inf_per_device"]) == 1
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 0.5)
        return grad_scaler._maybe_opt_step(self, record)


def _per_optimizer_scenario(scaler_cls: type, edit: str) -> list:
    from torch.amp.grad_scaler import OptState

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = (_ClippingLegacySGD if edit == "legacy" else torch.optim.SGD)(model.parameters(), lr=0.1)
    scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2)
    x = torch.randn(2, 4)
    out: list = []
    for it in range(5):
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(x).sum() * (math.inf if it == 1 else 1.0)).backward()
        if edit == "legacy":
            with pytest.warns(FutureWarning):
                out.append(scaler.step(opt))
        else:
            scaler.unscale_(opt)
            record = scaler._per_optimizer_states[id(opt)]
            out.append((record["stage"], {d: float(f) for d, f in record["found_inf_per_device"].items()}))
            if edit == "retry" and it == 1:
                # Loops that recompute an overflowing micro-batch put the record back to READY and go again.
                scaler._per_optimizer_states[id(opt)]["stage"] = OptState.READY
                scaler._per_optimizer_states[id(opt)]["found_inf_per_device"] = {}
                opt.zero_grad(set_to_none=True)
                scaler.scale(model(x).sum()).backward()
            elif edit == "pop":
                # Phase-wise loops drop the record after clipping; the step unscales (again) on its own.
                out.append(sorted(scaler._per_optimizer_states.pop(id(opt), {}).keys()))
                out.append(scaler._per_optimizer_states.pop(id(opt), None))
            elif edit == "clear" and it == 3:
                scaler._per_optimizer_states.clear()
            scaler.step(opt)
        scaler.update()
        out.append(scaler.get_scale())
        out.extend(p.detach().clone() for p in model.parameters())
    return out


@pytest.mark.parametrize("edit", ["legacy", "retry", "pop", "clear"])
def test_per_optimizer_states_read_and_edited_as_with_torch(edit: str) -> None:
    """`_per_optimizer_states` (a private dict of torch's that frameworks and optimizers read and reset) is a live
    view of the C++ records: reading, resetting to READY, popping and clearing it give the run torch's gives."""
    ours = _per_optimizer_scenario(mixprec.GradScaler, edit)
    theirs = _per_optimizer_scenario(torch.amp.GradScaler, edit)
    assert len(ours) == len(theirs)
    for x, y in zip(ours, theirs):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, (x, y)


def test_reading_a_record_creates_it_as_torchs_defaultdict_does() -> None:
    """Reading `_per_optimizer_states[key]` creates a READY record without flags (torch's is a defaultdict):
    it counts in len/in/iteration, makes pickling refuse until update(), and takes no part in the step; `get`
    creates nothing; resetting a record to READY keeps it as an entry."""
    from torch.amp.grad_scaler import OptState

    seen = []
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        other = torch.optim.SGD(model.parameters(), lr=0.1)  # never stepped: only its record is read
        scaler = cls("cpu", init_scale=2.0**10, growth_interval=1)
        states = scaler._per_optimizer_states
        out = [states.get(id(other)), len(states), id(other) in states]
        record = states[id(other)]
        out += [record["stage"] is OptState.READY, dict(record["found_inf_per_device"]), len(states),
                id(other) in states, list(states) == [id(other)]]
        for refused_copy in (pickle.dumps, copy.deepcopy):
            with pytest.raises(Exception) as refused:
                refused_copy(scaler)
            out.append(type(refused.value).__name__)
        scaler.scale(model(torch.randn(2, 4)).sum()).backward()
        scaler.step(opt)
        states[id(opt)] = {"stage": OptState.READY, "found_inf_per_device": {}}  # a reset keeps the entry
        out += [len(states), states[id(opt)]["stage"] is OptState.READY]
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        out += [len(scaler._per_optimizer_states), scaler.get_scale()]
        out += [p.detach().clone() for p in model.parameters()]
        pickle.dumps(scaler)  # no record after update()
        seen.append(out)
    for x, y in zip(*seen):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, (x, y)


def test_is_an_instance_of_torchs_scaler_and_serves_its_private_helpers() -> None:
    """isinstance(scaler, torch.amp.GradScaler) holds; torch's helpers that subclasses and frameworks call give
    torch's results: `_unscale_grads_` (fp16 refused unless allowed), `_check_scale_growth_tracker`."""
    scalers = [cls("cpu", init_scale=8.0) for cls in (torch.amp.GradScaler, mixprec.GradScaler)]
    assert all(isinstance(s, torch.amp.GradScaler) for s in scalers)
    results = []
    for scaler in scalers:
        with pytest.raises(AssertionError, match="_scale is None"):
            scaler._check_scale_growth_tracker("unscale_")
        scaler.scale(torch.ones(()))
        scale, tracker = scaler._check_scale_growth_tracker("unscale_")
        p = torch.nn.Parameter(torch.ones(5))
        q = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
        p.grad = torch.tensor([2.0, -4.0, math.inf, 0.5, 1e30])
        q.grad = torch.ones(3, dtype=torch.float16)
        opt = torch.optim.SGD([p, q], lr=0.1)
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
            scaler._unscale_grads_(opt, torch.full((), 0.25), torch.zeros(()), False)
        q.grad = None
        flags = scaler._unscale_grads_(opt, torch.full((), 0.25), torch.zeros(()), False)
        results.append((float(scale), int(tracker), {d: (f.shape, float(f)) for d, f in flags.items()},
                        p.grad.clone()))
    (s1, t1, f1, g1), (s2, t2, f2, g2) = results
    assert (s1, t1, f1) == (s2, t2, f2) and torch.equal(g1, g2)
    # Complex gradients, which torch's CPU kernel refuses, as mixprec's unscale_ takes them: real and imaginary
    # parts, each exactly multiplied by the power-of-two inverse scale.
    c = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    c.grad = torch.tensor([2 + 4j, 1j, complex(8, math.inf)], dtype=torch.complex64)
    flags = scalers[1]._unscale_grads_(torch.optim.SGD([c], lr=0.1), torch.full((), 0.25), torch.zeros(()), False)
    assert torch.equal(c.grad, torch.tensor([0.5 + 1j, 0.25j, complex(2, math.inf)], dtype=torch.complex64))
    assert float(flags[torch.device("cpu")]) == 1.0
    c.grad = torch.tensor([4 + 8j, 4j, 8], dtype=torch.complex64).conj()  # a conjugate view, as unscale_ takes it
    scalers[1]._unscale_grads_(torch.optim.SGD([c], lr=0.1), torch.full((), 0.25), torch.zeros(()), False)
    assert torch.equal(c.grad.resolve_conj(), torch.tensor([1 - 2j, -1j, 2], dtype=torch.complex64))


@pytest.mark.parametrize("optimizer", ["sgd", "sparse-adam"])
def test_sparse_gradients_are_unscaled_and_checked_as_torch_does(optimizer: str) -> None:
    """nn.Embedding(sparse=True) gives sparse COO gradients: their values are unscaled and checked, with the
    same parameters, .grad and scales as torch's scaler, an overflowing step included."""
    results = []
    for scaler_cls in (torch.amp.GradScaler, mixprec.GradScaler):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = (torch.optim.SGD(emb.parameters(), lr=0.1) if optimizer == "sgd"
               else torch.optim.SparseAdam(emb.parameters(), lr=0.1))
        scaler = scaler_cls("cpu", init_scale=2.0**12, growth_interval=2)
        seen = []
        for it in range(5):
            opt.zero_grad(set_to_none=True)
            loss = emb(torch.tensor([1, 4, 4, 4, 7])).sum() * (math.inf if it == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad = emb.weight.grad
            seen.append((grad.is_sparse, grad.coalesce().to_dense().nan_to_num().clone()))
            scaler.step(opt)
            scaler.update()
            seen.append(scaler.get_scale())
        results.append(seen + [emb.weight.detach().clone()])
    for x, y in zip(*results):
        if isinstance(x, tuple):
            assert x[0] == y[0] and torch.equal(x[1], y[1])
        else:
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert results[1][5] == results[1][3] / 2, "the overflow was not seen"


def test_fp16_sparse_gradients_are_coalesced_before_the_check() -> None:
    """torch's rule for fp16 sparse gradients (torch's unscale_ refuses fp16; mixprec's takes it): coalesce
    first, since rows used several times sum past fp16's range only then. Here each of five uses of row 2
    gives 30000 (finite in fp16), their sum 150000 is not: the step is skipped and the scale backs off."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).half()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = mixprec.GradScaler("cpu", init_scale=2.0**12, growth_interval=100)
    before = emb.weight.detach().clone()
    scaler.scale(emb(torch.tensor([2, 2, 2, 2, 2])).float().sum() * (30000.0 / 2.0**12)).backward()
    assert not emb.weight.grad.is_coalesced() and emb.weight.grad._values().isfinite().all()
    scaler.unscale_(opt)
    assert emb.weight.grad.is_coalesced()  # replaced by its coalesced form, as torch does
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11 and torch.equal(emb.weight.detach(), before)
    # A clean fp16 step: the coalesced values divided by the scale.
    opt.zero_grad(set_to_none=True)
    scaler.scale(emb(torch.tensor([2, 2, 5])).float().sum()).backward()
    scaler.unscale_(opt)
    dense = emb.weight.grad.to_dense()
    assert dense[2].eq(2.0).all() and dense[5].eq(1.0).all() and dense[0].eq(0.0).all()


def _hooked(base: type) -> type:
    """A subclass in the style of sharded scalers and loggers: it overrides the methods torch's step() routes
    through, records the calls, and its unscale_ marks an overflow on iteration 1 (as an all-reduce of another
    rank's flag would)."""

    class Hooked(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[str] = []
            self.iteration = 0

        def unscale_(self, optimizer):
            self.calls.append("unscale_")
            super().unscale_(optimizer)
            if self.iteration == 1:
                for flag in self._found_inf_per_device(optimizer).values():
                    flag.fill_(1.0)

        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
            self.calls.append("_unscale_grads_")
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)

        def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
            self.calls.append("_maybe_opt_step")
            return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)

        def _check_inf_per_device(self, optimizer):
            self.calls.append("_check_inf_per_device")
            return super()._check_inf_per_device(optimizer)

    return Hooked


@pytest.mark.parametrize("explicit_unscale", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "sgd-fused", "adamw-fused", "mixprec-adamw", "mixprec-adamw-fused"])
def test_subclasses_overriding_torchs_hooks_are_called_as_torchs_step_calls_them(optimizer: str,
                                                                               explicit_unscale: bool) -> None:
    """torch documents that step() unscales through unscale_ (and, in its code, decides through _maybe_opt_step
    and checks fused optimizers' gradients through _check_inf_per_device, both of which reach _unscale_grads_).
    A subclass of mixprec.GradScaler that overrides them is called in the same order, and an overflow its
    unscale_ marks skips the step as with torch's scaler."""
    outcomes = {}
    for base in (torch.amp.GradScaler, mixprec.GradScaler):
        model = make_model("cpu")
        opt = OPTIMIZERS[optimizer](list(model.parameters()))
        scaler = _hooked(base)("cpu", init_scale=4.0, growth_interval=100)
        gen = torch.Generator().manual_seed(2)
        per_iteration = []
        for i in range(3):
            scaler.iteration = i
            scaler.calls.clear()
            opt.zero_grad()
            scaler.scale(model(torch.randn(6, 8, generator=gen)).pow(2).mean()).backward()
            if explicit_unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            per_iteration.append((list(scaler.calls), scaler.get_scale()))
        outcomes[base] = (per_iteration, [p.detach().clone() for p in model.parameters()])
    ours, theirs = outcomes[mixprec.GradScaler], outcomes[torch.amp.GradScaler]
    assert ours[0] == theirs[0]
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))


def test_the_loaded_growth_count_is_torchs_init_growth_tracker() -> None:
    """A state dict's `_growth_tracker` is where the count starts when the tracker is created, as torch's
    `_init_growth_tracker` says."""
    seen = []
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        scaler = cls("cpu", growth_interval=10)
        scaler.load_state_dict({**torch.amp.GradScaler("cpu").state_dict(), "scale": 8.0, "growth_factor": 2.0,
                                "backoff_factor": 0.5, "growth_interval": 10, "_growth_tracker": 5})
        scaler.scale(torch.ones(()))
        seen.append((scaler._init_growth_tracker, int(scaler._growth_tracker)))
    assert seen[0] == seen[1] == (5, 5)


def test_torchs_scaler_attributes_read_and_write_as_in_torch() -> None:
    """Attributes of torch's scaler that code reads or sets (`_init_scale` before the first scale(), the
    factors, `_per_optimizer_states` reassigned to reset an iteration, `_scale` None until the first
    scale(), absent on a disabled scaler), with the same outcome as torch's."""
    from collections import defaultdict

    from torch.amp.grad_scaler import _refresh_per_optimizer_state

    outcomes = []
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        scaler = cls("cpu", growth_interval=2)
        row = [scaler._scale, scaler._growth_tracker, scaler._init_scale, scaler._growth_factor,
               scaler._backoff_factor, scaler._growth_interval, scaler._init_growth_tracker]
        scaler._init_scale = 32.0
        scaler._growth_interval = 1
        row.append(float(scaler.scale(torch.ones(()))))
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        scaler.unscale_(opt)
        scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)  # drop the iteration
        row.append(len(scaler._per_optimizer_states))
        scaler.step(opt)  # unscales again: the record was reset
        scaler.update()
        row += [scaler.get_scale(), [p.detach().clone() for p in model.parameters()],
                scaler._per_optimizer_states.get(12345)]
        outcomes.append(row)
        disabled = cls("cpu", enabled=False)
        with pytest.raises(AttributeError):
            disabled._scale
    for x, y in zip(*outcomes):
        if isinstance(x, list):
            assert all(torch.equal(a, b) for a, b in zip(x, y))
        else:
            assert x == y, (x, y)
    assert outcomes[1][7] == 32.0 and outcomes[1][9] == 64.0


# -- behaviours a mutation of the scaler left unnoticed (each test below fails with its mutation) -----------------

def test_scale_keeps_each_containers_type_as_torch() -> None:
    """torch's scale() rebuilds lists and tuples as the type they were (nested ones too) and maps other
    iterables lazily."""
    out = []
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        scaler = cls("cpu", init_scale=4.0)
        a, b, c = torch.ones(2), torch.full((3,), 2.0), torch.full((1,), -1.0)
        scaled = scaler.scale((a, [b, (c,)]))
        lazy = scaler.scale(iter([a]))
        out.append((scaled, list(lazy), type(lazy).__name__))
    (t_scaled, t_lazy, t_kind), (m_scaled, m_lazy, m_kind) = out
    assert type(m_scaled) is tuple and type(m_scaled[1]) is list and type(m_scaled[1][1]) is tuple
    assert type(t_scaled) is type(m_scaled) and type(t_scaled[1]) is type(m_scaled[1])
    assert torch.equal(m_scaled[0], t_scaled[0]) and torch.equal(m_scaled[1][0], t_scaled[1][0])
    assert torch.equal(m_scaled[1][1][0], torch.full((1,), -4.0)) and m_kind == t_kind == "map"
    assert torch.equal(m_lazy[0], t_lazy[0])


@pytest.mark.parametrize("fused", ["torch-adamw-fused", "mixprec-adamw-fused"])
def test_a_host_skipped_fused_step_still_counts_as_the_steps_call(fused: str) -> None:
    """With host_skip, an overflowing fused optimizer is not called; the iteration's record is still STEPPED, as
    torch's scaler leaves it after a fused step: a second step() before update() is refused the same way."""
    make = {"torch-adamw-fused": _opt(torch.optim.AdamW, lr=1e-2, fused=True),
            "mixprec-adamw-fused": _opt(mixprec.optim.AdamW, lr=1e-2, fused=True)}[fused]
    seen = []
    for scaler in (torch.amp.GradScaler("cpu", init_scale=8.0), mixprec.GradScaler("cpu", init_scale=8.0,
                                                                                   host_skip=True)):
        model = make_model("cpu")
        before = [p.detach().clone() for p in model.parameters()]
        opt = make(model.parameters())
        scaler.scale(model(torch.ones(2, 8)).sum()).backward()
        model[0].weight.grad.view(-1)[0] = math.inf
        assert scaler.step(opt) is None
        assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.STEPPED
        with pytest.raises(RuntimeError, match="step\\(\\) has already been called since the last update\\(\\)"):
            scaler.step(opt)
        scaler.update()
        seen.append(scaler.get_scale())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert seen == [4.0, 4.0]


def test_unscale_grads_returns_copies_of_found_inf_and_leaves_the_callers_tensor_alone() -> None:
    """torch's _unscale_grads_ records each device's overflow in a copy of ``found_inf`` (its replicator copies
    it), so a caller's zero tensor, reused for the next optimizer (torch's unscale_ makes a new one each time, a
    subclass may not), stays zero."""
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        scaler = cls("cpu", init_scale=8.0)
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.tensor([1.0, math.inf, 2.0])
        found_inf = torch.zeros(())
        flags = scaler._unscale_grads_(torch.optim.SGD([p], lr=0.1), torch.full((), 0.5), found_inf, False)
        flag = flags[torch.device("cpu")]
        assert float(flag) == 1.0 and float(found_inf) == 0.0, cls
        assert flag.data_ptr() != found_inf.data_ptr() and flag.shape == found_inf.shape


def test_a_deep_copy_of_the_per_optimizer_records_is_independent_as_torchs() -> None:
    """Frameworks snapshot ``_per_optimizer_states`` with deepcopy (checkpoint-on-error, iteration replays): the
    copy's flags are tensors of their own, so editing the snapshot leaves the scaler's decision alone."""
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        model = make_model("cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = cls("cpu", init_scale=8.0)
        scaler.scale(model(torch.ones(2, 8)).sum()).backward()
        model[0].weight.grad.view(-1)[0] = math.inf
        scaler.unscale_(opt)
        snapshot = copy.deepcopy(scaler._per_optimizer_states)
        snapshot[id(opt)]["found_inf_per_device"][torch.device("cpu")].zero_()
        snapshot[id(opt)]["stage"] = OptState.READY
        live = scaler._per_optimizer_states[id(opt)]
        assert live["stage"] is OptState.UNSCALED, cls
        assert float(live["found_inf_per_device"][torch.device("cpu")]) == 1.0, cls
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)  # still skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), cls


@pytest.mark.parametrize("optimizer", ["sgd-fused", "adamw-fused", "mixprec-adamw-fused"])
def test_a_grad_scale_the_user_set_is_multiplied_in_as_torch(optimizer: str) -> None:
    """torch's step: for an optimizer that takes ``grad_scale``, a ``grad_scale`` the user set on it is multiplied
    by the loss scale (a second scaling the user applied to the loss), and both attributes are gone afterwards."""
    results = []
    for cls in (torch.amp.GradScaler, mixprec.GradScaler):
        p = torch.nn.Parameter(torch.ones(2))
        opt = OPTIMIZERS[optimizer]([p])
        if optimizer == "sgd-fused":
            opt = torch.optim.SGD([p], lr=1.0, fused=True)
        scaler = cls("cpu", init_scale=4.0)
        scaler.scale(p.sum() * 2.0).backward()  # the user's own factor 2 on top of the scale
        opt.grad_scale = torch.tensor(2.0)
        scaler.step(opt)
        scaler.update()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
    if optimizer == "sgd-fused":
        assert torch.equal(results[1], torch.zeros(2))  # 1 - lr * (2 * 4 * 1) / (4 * 2)
