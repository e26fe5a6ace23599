"""mixprec.Policy (the C++ parser underneath), mixprec.autocast, Policy.apply and its helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixprec
from mixprec import Policy


@pytest.mark.parametrize(
    "names, compute, params, scaling",
    [
        (["float32", "32-true", "32", "no"], torch.float32, torch.float32, False),
        (["mixed_float16", "16-mixed", "16", "fp16"], torch.float16, torch.float32, True),
        (["mixed_bfloat16", "bf16-mixed", "bf16"], torch.bfloat16, torch.float32, False),
        (["float16", "16-true"], torch.float16, torch.float16, True),
        (["bfloat16", "bf16-true"], torch.bfloat16, torch.bfloat16, False),
    ],
)
def test_every_known_name(names: list[str], compute: torch.dtype, params: torch.dtype, scaling: bool) -> None:
    """The table is what each framework documents for its name; the behaviour behind it (autocast dtype,
    parameter dtype, scaler, optimizer) is checked against torch and Lightning below."""
    for n in names:
        p = Policy(n)
        assert (p.compute_dtype, p.param_dtype, p.needs_loss_scaling) == (compute, params, scaling), n
        assert p == Policy(p.name)


LIGHTNING_NAMES = ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]


@pytest.mark.parametrize("name", LIGHTNING_NAMES)
def test_lightning_names_behave_as_lightnings_own_plugins(name: str) -> None:
    """Lightning's own precision plugins are the oracle for its names: the dtype its forward context computes
    in, the dtype it gives the module's parameters, and whether it makes a loss scaler; our policy under the
    same name must produce the same on a model."""
    pytest.importorskip("lightning")
    from lightning.fabric.plugins.precision import HalfPrecision, MixedPrecision, Precision

    plugin = {"32-true": lambda: Precision(), "16-mixed": lambda: MixedPrecision("16-mixed", "cpu"),
              "bf16-mixed": lambda: MixedPrecision("bf16-mixed", "cpu"),
              "16-true": lambda: HalfPrecision("16-true"), "bf16-true": lambda: HalfPrecision("bf16-true")}[name]()
    policy = Policy(name)
    theirs = plugin.convert_module(nn.Sequential(nn.Linear(4, 4)))
    ours = policy.apply(nn.Sequential(nn.Linear(4, 4)))
    assert ours[0].weight.dtype == theirs[0].weight.dtype
    x = torch.randn(2, 4)
    with plugin.forward_context():
        expected = (x.to(theirs[0].weight.dtype) @ x.to(theirs[0].weight.dtype).t()).dtype
    with mixprec.autocast(policy, "cpu"):
        got = (x.to(ours[0].weight.dtype) @ x.to(ours[0].weight.dtype).t()).dtype
    assert got == expected
    if isinstance(plugin, MixedPrecision):
        assert policy.needs_loss_scaling == (plugin.scaler is not None)
    else:  # Lightning gives pure fp16 no scaler; ours asks for one, since fp16 gradients underflow without it
        assert policy.needs_loss_scaling == (policy.compute_dtype == torch.float16)


@pytest.mark.parametrize("name, lr", [("mixed_float16", 1e-5), ("mixed_bfloat16", 1e-5), ("float16", 1e-7),
                                      ("bfloat16", 3e-6)])
def test_the_policys_optimizer_moves_16_bit_weights_by_sub_ulp_updates(name: str, lr: float) -> None:
    """Mixed policies keep fp32 parameters (their own masters: no copy). Pure 16-bit policies keep no fp32
    copy and round the updates stochastically: with an lr far below half an ulp of most weights, nearest
    rounding leaves almost every weight where it was, while the policy's optimizer moves several times as
    many (each with probability |update| / ulp), so training still makes progress on average."""
    policy = Policy(name)

    def moved(**overrides) -> tuple[float, dict]:
        torch.manual_seed(0)
        model = policy.apply(nn.Linear(256, 256))
        opt = policy.optimizer(model.parameters(), lr=lr, seed=0, **overrides)
        before = model.weight.detach().clone()
        model(torch.randn(16, 256).to(policy.param_dtype)).float().pow(2).sum().backward()
        opt.step()
        return (model.weight.detach() != before).float().mean().item(), opt.state[model.weight]

    fraction, state = moved()
    assert "master" not in state
    if policy.param_dtype == torch.float32:
        assert fraction > 0.99  # fp32 resolves an update of lr everywhere
    else:
        nearest, _ = moved(rounding="nearest")
        # measured: 1.8% vs 0.4% (fp16), 5.2% vs 1.7% (bf16) of 65536 weights
        assert fraction > 2.5 * nearest, (fraction, nearest)


def test_autocast_sets_and_restores_state_like_torch() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert not torch.is_autocast_enabled("cpu")
    with mixprec.autocast("mixed_bfloat16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
        with mixprec.autocast("float32", "cpu"):  # a float32 policy disables autocast inside
            assert (a @ b).dtype == torch.float32
        with mixprec.autocast(Policy("mixed_float16"), "cpu"):
            assert (a @ b).dtype == torch.float16
        assert (a @ b).dtype == torch.bfloat16
        with pytest.raises(ValueError):
            with mixprec.autocast("mixed_float16", "cpu"):
                raise ValueError("boom")
        assert (a @ b).dtype == torch.bfloat16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32

    @mixprec.autocast("mixed_bfloat16", "cpu")
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y

    assert f(a, b).dtype == torch.bfloat16 and (a @ b).dtype == torch.float32


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16", "float32"])
def test_the_policys_grad_scaler_is_on_for_fp16_unless_told_otherwise(name: str) -> None:
    """Policy.grad_scaler: dynamic loss scaling for fp16 compute, disabled otherwise; an explicit ``enabled`` wins
    either way, and the other arguments reach the scaler."""
    policy = Policy(name)
    default = policy.grad_scaler("cpu", init_scale=256.0)
    assert default.is_enabled() == (name == "mixed_float16") == policy.needs_loss_scaling
    assert default.get_scale() == (256.0 if name == "mixed_float16" else 1.0)
    forced_on = policy.grad_scaler("cpu", enabled=True, init_scale=32.0, hysteresis=2)
    assert forced_on.is_enabled() and forced_on.get_scale() == 32.0 and forced_on.state_dict()["hysteresis"] == 2
    assert not policy.grad_scaler("cpu", enabled=False).is_enabled()


@pytest.mark.parametrize("how", ["enabled=False", "float32"])
def test_a_disabling_autocast_decorates_as_its_with_block(how: str) -> None:
    """mixprec.autocast(..., enabled=False) and a float32 policy turn autocast off inside, inside an outer
    autocast too: the same used as a decorator as in a ``with`` block, as torch.autocast's decorator does."""
    make = (lambda: mixprec.autocast("mixed_bfloat16", "cpu", enabled=False)) if how == "enabled=False" else \
        (lambda: mixprec.autocast("float32", "cpu"))
    a, b = torch.randn(4, 4), torch.randn(4, 4)

    @make()
    def decorated() -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cpu"), (a @ b).dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with make():
            in_block = torch.is_autocast_enabled("cpu"), (a @ b).dtype
        in_call = decorated()
        assert torch.is_autocast_enabled("cpu")  # the outer one back after either
    assert in_block == in_call == (False, torch.float32)


def test_the_autocast_decorator_keeps_cache_enabled_as_torchs_does() -> None:
    """torch.autocast(..., cache_enabled=False) used as a decorator keeps the setting inside the call."""
    seen = {}

    @torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    def theirs() -> None:
        seen["torch"] = torch.is_autocast_cache_enabled()

    @mixprec.autocast("mixed_bfloat16", "cpu", cache_enabled=False)
    def ours() -> None:
        seen["mixprec"] = torch.is_autocast_cache_enabled()

    theirs()
    ours()
    assert seen == {"torch": False, "mixprec": False}
    assert torch.is_autocast_cache_enabled()


def test_policies_and_autocast_objects_pickle_and_copy() -> None:
    """Configs that hold a policy are deep-copied and pickled (Lightning's and Accelerate's do both)."""
    import copy
    import pickle

    policy = Policy("params=float32,compute=bfloat16,output=float32", keep_fp32=["RMSNorm", "Embedding"])
    for clone in (pickle.loads(pickle.dumps(policy)), copy.deepcopy(policy), copy.copy(policy)):
        assert clone == policy and clone.keep_fp32 == ["RMSNorm", "Embedding"]
        assert (clone.compute_dtype, clone.param_dtype, clone.output_dtype) == \
            (torch.bfloat16, torch.float32, torch.float32)
        assert clone.keeps_fp32(nn.Embedding) and not clone.keeps_fp32(nn.LayerNorm)
    class Mine(Policy):
        pass

    assert type(copy.deepcopy(Mine("bf16-mixed"))) is Mine
    ctx = pickle.loads(pickle.dumps(mixprec.autocast(policy, "cpu")))
    with ctx:
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def _compiled(fn, *args):
    """fn compiled with fullgraph=True (any graph break is an error), its output and its graph count."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(fn, backend="eager", fullgraph=True)(*args)
    return out, counters["stats"]["unique_graphs"]


_DYNAMO_BUILDS_AUTOCAST = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14)


def test_autocast_compiles_in_one_graph_as_torchs() -> None:
    """torch.compile traces mixprec.autocast as it traces torch.autocast, fullgraph=True included: as a context
    manager built inside or outside the compiled function (from a policy or a name), nested, in a module's
    forward, and as a decorator; the outputs are torch.autocast's, bit for bit."""
    x = torch.randn(8, 8)
    layer = nn.Linear(8, 8)
    policy = Policy("mixed_bfloat16")
    outside = mixprec.autocast(policy, "cpu")
    assert isinstance(outside, torch.autocast)

    def torchs(a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(a) @ a

    def from_policy(a):
        with mixprec.autocast(policy, "cpu"):
            return layer(a) @ a

    def from_name(a):
        with mixprec.autocast("bf16-mixed", "cpu"):
            return layer(a) @ a

    def prebuilt(a):
        with outside:
            return layer(a) @ a

    def nested(a):
        with mixprec.autocast("mixed_float16", "cpu"):
            with mixprec.autocast("float32", "cpu"):
                inner = layer(a)
            return inner, layer(a) @ a

    @mixprec.autocast(policy, "cpu")
    def decorated(a):
        return layer(a) @ a

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer
            self.policy = policy

        def forward(self, a):
            with mixprec.autocast(self.policy, "cpu"):
                return self.layer(a) @ a

    expected, _ = _compiled(torchs, x)
    assert expected.dtype == torch.bfloat16
    # Dynamo before torch 2.14 cannot trace the construction of a torch.autocast subclass inside the compiled
    # function (torch 2.11: "isinstance() cannot determine type"); a prebuilt object and the decorator trace.
    if not _DYNAMO_BUILDS_AUTOCAST:
        for fn in (prebuilt, decorated):
            out, graphs = _compiled(fn, x)
            assert graphs == 1 and torch.equal(out, expected), fn
        return
    for fn in (from_policy, from_name, prebuilt, decorated, Model()):
        out, graphs = _compiled(fn, x)
        assert graphs == 1 and torch.equal(out, expected), fn
    (inner, out), graphs = _compiled(nested, x)
    assert graphs == 1 and inner.dtype == torch.float32 and out.dtype == torch.float16

    other = nn.Linear(8, 8)  # (torch's cast cache is per tensor, whatever the dtype: one layer per dtype)

    def inside_torchs(a):  # mixprec.autocast within torch.autocast (Dynamo refused this: "global autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):  # state changed while tracing")
            with mixprec.autocast("mixed_float16", "cpu"):
                half = other(a)
            with mixprec.autocast("float32", "cpu"):
                full = layer(a)
            return half, full, layer(a)

    compiled, graphs = _compiled(inside_torchs, x)
    assert graphs == 1 and [t.dtype for t in compiled] == [torch.float16, torch.float32, torch.bfloat16]
    assert all(torch.equal(c, e) for c, e in zip(compiled, inside_torchs(x)))
    assert not torch.is_autocast_enabled("cpu")


def test_keeps_fp32_inside_a_compiled_function() -> None:
    """The docs say a policy read inside a compiled function breaks no graph; keeps_fp32 went through the C++
    object, which Dynamo cannot trace."""
    policy = Policy("mixed_bfloat16")
    norm, layer = nn.LayerNorm(8), nn.Linear(8, 8)

    def fn(a):
        built = Policy("bf16-true", keep_fp32=["Linear"])
        return a * (2 if policy.keeps_fp32(norm) else 3) + (1 if built.keeps_fp32(layer) else 0)

    out, graphs = _compiled(fn, torch.ones(2))
    assert graphs == 1 and torch.equal(out, torch.full((2,), 3.0))


def test_autocast_on_an_unavailable_device_is_an_error() -> None:
    for device_type in ("no_such_device", "meta"):
        with pytest.raises(RuntimeError, match="not available"):
            mixprec.autocast("mixed_float16", device_type)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16),
                         nn.Linear(16, 1))


@pytest.mark.parametrize("name", ["bfloat16", "mixed_bfloat16", "mixed_float16"])
def test_apply_keeps_norms_fp32_and_forward_works(name: str) -> None:
    policy = Policy(name)
    model = policy.apply(make_model())
    linear_dtype = policy.param_dtype
    assert model[0].weight.dtype == linear_dtype and model[5].weight.dtype == linear_dtype
    for norm in (model[1], model[4]):
        assert all(p.dtype == torch.float32 for p in norm.parameters())
    assert model[1].running_mean.dtype == torch.float32
    x = torch.randn(6, 8).to(linear_dtype)
    with mixprec.autocast(policy, "cpu"):
        out = model(x)
    assert out.dtype == policy.compute_dtype
    assert torch.isfinite(out).all()
    if policy.param_dtype == torch.float32:
        # A mixed policy leaves an fp32 model as it is, so its forward is torch.autocast's, bit for bit.
        reference = make_model()  # train mode: BatchNorm normalises with this batch's statistics in both
        with torch.autocast("cpu", dtype=policy.compute_dtype):
            expected = reference(x)
        with mixprec.autocast(policy, "cpu"):
            assert torch.equal(model(x), expected)


@pytest.mark.parametrize("name", ["mixed_bfloat16", "bfloat16", "mixed_float16"])
def test_training_with_policy_scaler_and_optimizer(name: str) -> None:
    policy = Policy(name)
    model = policy.apply(make_model())
    scaler = policy.grad_scaler("cpu")
    assert scaler.is_enabled() == policy.needs_loss_scaling
    opt = policy.optimizer(model.parameters(), lr=1e-2, seed=0)
    torch.manual_seed(1)
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    losses = []
    for _ in range(150):
        opt.zero_grad()
        with mixprec.autocast(policy, "cpu"):
            loss = nn.functional.mse_loss(model(x.to(policy.param_dtype)).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    if policy.param_dtype == torch.bfloat16:  # pure bf16: no masters, stochastic rounding
        assert opt.param_groups[0]["master_weights"] == "none" and opt.param_groups[0]["rounding"] == "stochastic"


def test_apply_rejects_non_floating_parameters() -> None:
    model = nn.Linear(2, 2)
    model.ticks = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="ticks"):
        Policy("bfloat16").apply(model)
    assert model.weight.dtype == torch.float32


def test_a_model_under_a_policy_saves_whole_and_a_second_policy_replaces_the_first() -> None:
    """``torch.save(model)`` pickles the module with its hooks: the policy's fp32 hooks must pickle, and the
    loaded model must compute what the saved one does. Applying another policy afterwards must behave as if
    only that policy had been applied (its compute dtype on the kept modules' outputs, no stacked hooks)."""
    import io

    model = Policy("mixed_bfloat16").apply(make_model()).eval()
    x = torch.randn(4, 8)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with mixprec.autocast("mixed_bfloat16", "cpu"):
        expected, got = model(x), loaded(x)
        assert loaded[4](torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert got.dtype == expected.dtype and torch.equal(got, expected)

    fresh = Policy("mixed_float16").apply(make_model()).eval()
    Policy("mixed_float16").apply(model)
    for kept in (1, 4):
        assert len(model[kept]._forward_pre_hooks) == len(fresh[kept]._forward_pre_hooks) == 1
        assert len(model[kept]._forward_hooks) == len(fresh[kept]._forward_hooks) == 1
    layer_norm_in = torch.randn(2, 16, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert model[4](layer_norm_in).dtype == torch.float16  # the first policy's hook would give bfloat16
    Policy("float32").apply(model)  # nothing computes in 16 bits: no output cast is left
    assert len(model[4]._forward_hooks) == 0 and model[4](layer_norm_in).dtype == torch.float32


@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_policy_model_also_runs_without_autocast(name: str) -> None:
    """A mixed policy keeps fp32 parameters; its kept norms cast their outputs to the compute dtype only
    while autocast runs. Before, the model failed outside autocast (evaluation, export, a quick check) with
    "mat1 and mat2 must have the same dtype": a bf16 norm output met the next fp32 Linear."""
    model = Policy(name).apply(make_model()).eval()
    x = torch.randn(4, 8)
    assert torch.equal(model(x), make_model().eval()(x))  # as the fp32 model it still is
    with mixprec.autocast(name, "cpu"):
        assert model[4](torch.randn(2, 16)).dtype == Policy(name).compute_dtype
    pure = Policy("bfloat16").apply(make_model()).eval()  # 16-bit parameters: the cast is always needed
    assert pure(x.bfloat16()).dtype == torch.bfloat16


def test_keep_fp32_takes_one_name_as_a_string_and_policies_hash() -> None:
    """keep_fp32="LayerNorm" was split into its characters (keeping every module whose class name contains
    an "L", an "a", ...: Linear included). Policies are hashable, equal ones (aliases) alike."""
    policy = Policy("bf16-true", keep_fp32="LayerNorm")
    assert policy.keep_fp32 == ["LayerNorm"]
    model = policy.apply(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert Policy("bf16-mixed") == Policy("mixed_bfloat16") and hash(Policy("bf16-mixed")) == hash(Policy("mixed_bfloat16"))
    assert len({Policy("bf16-mixed"), Policy("mixed_bfloat16"), Policy("mixed_float16")}) == 2
    assert Policy("mixed_bfloat16") != "mixed_bfloat16"


def test_kept_modules_take_and_return_namedtuples_and_dict_subclasses() -> None:
    """The fp32-kept modules' hooks cast inside containers and rebuild each as its own type: a PackedSequence
    (a namedtuple) into a kept LSTM, a namedtuple and an OrderedDict subclass out of a kept norm layer. The
    first failed inside PackedSequence's constructor, the others lost their type."""
    import collections

    from torch.nn.utils.rnn import pack_padded_sequence

    lstm = nn.LSTM(4, 8, batch_first=True)
    policy = Policy("mixed_bfloat16", keep_fp32=["LSTM"])
    policy.apply(lstm)
    packed = pack_padded_sequence(torch.randn(3, 5, 4), torch.tensor([5, 3, 2]), batch_first=True)
    with mixprec.autocast(policy, "cpu"):
        out, _ = lstm(packed)
    assert type(out).__name__ == "PackedSequence" and out.data.dtype == torch.bfloat16

    Stats = collections.namedtuple("Stats", "y mean")

    class Out(collections.OrderedDict):
        def __getattr__(self, name: str):
            return self[name]

    class StatsNorm(nn.BatchNorm1d):
        def forward(self, x):
            y = super().forward(x)
            return Stats(y, y.mean()) if self.training else Out(y=y)

    norm = Policy("bf16-true").apply(StatsNorm(4))
    x = torch.randn(6, 4, dtype=torch.bfloat16)
    stats = norm(x)
    assert type(stats) is Stats and stats.y.dtype == stats.mean.dtype == torch.bfloat16
    norm.eval()
    out = norm(x)
    assert type(out) is Out and out.y.dtype == torch.bfloat16


def test_a_pure_16_bit_policys_optimizer_resumes_bit_for_bit() -> None:
    """Policy("bf16-true").optimizer() seeds its stochastic rounding from torch.initial_seed(): the draws come
    from the optimizer's counter, which its state dict saves, so a resume continues bit for bit whatever
    torch's global generator holds then, and the step leaves that generator to the user's own draws.
    Unseeded, it drew from that generator, which no state dict saves."""
    policy = Policy("bf16-true")
    batches = [torch.randn(4, 16, generator=torch.Generator().manual_seed(k)).bfloat16() for k in range(6)]

    def train(model: nn.Module, opt: torch.optim.Optimizer, ks: range) -> None:
        for k in ks:
            opt.zero_grad()
            model(batches[k]).float().pow(2).mean().backward()
            opt.step()

    torch.manual_seed(3)
    model = policy.apply(nn.Linear(16, 16))
    opt = policy.optimizer(model.parameters(), lr=1e-3)
    assert opt.param_groups[0]["seed"] == 3
    train(model, opt, range(3))
    checkpoint = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    before = torch.get_rng_state()
    train(model, opt, range(3, 6))
    assert torch.equal(torch.get_rng_state(), before)  # the steps drew nothing from torch's generator
    torch.manual_seed(999)  # another process, another global state
    resumed = policy.apply(nn.Linear(16, 16))
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = policy.optimizer(resumed.parameters(), lr=1e-3)
    resumed_opt.load_state_dict(checkpoint["opt"])
    torch.randn(100)  # the user's own draws in between
    train(resumed, resumed_opt, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mixed_bfloat16", "params=float32,compute=bfloat16,output=float32", "float16"])
def test_jmp_casts_follow_the_policys_dtypes(name: str) -> None:
    """cast_to_compute / cast_to_param / cast_to_output (jmp's API) move floating tensors, nested in containers
    too, to the policy's dtypes, differentiably; integer tensors and other values pass unchanged. The output
    dtype is the compute dtype unless the name says otherwise."""
    policy = Policy(name)
    x = torch.randn(3, 4, requires_grad=True)
    index = torch.arange(3)
    for cast, dtype in ((policy.cast_to_compute, policy.compute_dtype), (policy.cast_to_param, policy.param_dtype),
                        (policy.cast_to_output, policy.output_dtype)):
        out = cast({"x": [x, (x, index)], "n": 3})
        assert out["n"] == 3 and out["x"][1][1] is index
        assert out["x"][0].dtype == out["x"][1][0].dtype == dtype
        assert torch.equal(out["x"][0], x.to(dtype))
        out["x"][0].float().sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
        x.grad = None
    expected_output = torch.float32 if "output=float32" in name else policy.compute_dtype
    assert policy.output_dtype == expected_output
    y = torch.randn(2, dtype=policy.output_dtype)
    assert policy.cast_to_output(y) is y  # already in that dtype: the same tensor, as Tensor.to


# ---- apply and autocast as torch users write them (a drop-in probe's findings) --------------------------------


def test_an_applied_model_compiles_as_one_graph() -> None:
    """The kept modules' hooks cast plain dicts (their kwargs) with a comprehension Dynamo traces."""
    torch.manual_seed(0)
    model = Policy("bf16-true").apply(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)))
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))
    assert Policy("mixed_bfloat16").cast_to_compute({"a": torch.ones(2)})["a"].dtype == torch.bfloat16


def test_kept_types_match_base_classes_parametrizations_classes_and_tied_weights() -> None:
    class MyNorm(nn.LayerNorm):
        pass

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    ln = nn.LayerNorm(4)
    torch.nn.utils.parametrize.register_parametrization(ln, "weight", Scale())
    model = Policy("bf16-true").apply(nn.Sequential(nn.Linear(4, 4), MyNorm(4), ln))
    assert model[1].weight.dtype == torch.float32  # a subclass of LayerNorm is a LayerNorm
    assert model[2].parametrizations.weight.original.dtype == torch.float32  # where a parametrized weight lives
    out = model(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert Policy("bf16-true", keep_fp32=[nn.LayerNorm]).keep_fp32 == ["LayerNorm"]  # classes by their names
    for order in ("kept first", "kept last"):
        emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        head.weight = emb.weight  # tied across a kept and a cast module: the policy's dtype, whichever comes last
        tied = Policy("bf16-true", keep_fp32=["Embedding"]).apply(
            nn.Sequential(emb, head) if order == "kept first" else nn.Sequential(nn.Identity(), head, emb))
        assert emb.weight.dtype == torch.bfloat16 and head.weight is emb.weight
        assert head(emb(torch.tensor([1, 2]))).dtype == torch.bfloat16  # both run


def test_apply_casts_gradients_with_their_parameters_as_module_to_does() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    mixprec.nn.convert(model[1:])  # a converted layer keeps its fp32 gradient
    model(torch.randn(2, 4)).sum().backward()
    Policy("bf16-true").apply(model)
    assert model[0].weight.grad.dtype == torch.bfloat16 and model[0].bias.grad.dtype == torch.bfloat16
    assert model[1].weight.grad.dtype == torch.float32
    torch.optim.AdamW(model[0].parameters(), foreach=True).step()  # what failed with fp32 grads of bf16 params


def test_autocast_reads_settings_when_built_and_takes_enabled_as_torchs() -> None:
    torch.set_autocast_cache_enabled(False)
    try:
        @mixprec.autocast("bf16-mixed", "cpu")
        def ours() -> bool:
            return torch.is_autocast_cache_enabled()

        @torch.autocast("cpu", dtype=torch.bfloat16)
        def theirs() -> bool:
            return torch.is_autocast_cache_enabled()
    finally:
        torch.set_autocast_cache_enabled(True)
    assert ours() == theirs() is False
    with mixprec.autocast("bf16-mixed", "cpu", enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_policies_are_equal_by_what_they_do_and_jmp_defaults_follow_jmp() -> None:
    assert Policy("compute=bfloat16") == Policy("mixed_bfloat16")
    assert hash(Policy("compute=bfloat16")) == hash(Policy("mixed_bfloat16"))
    assert Policy("bf16", keep_fp32=["LayerNorm", "BatchNorm"]) == Policy("bf16", keep_fp32=["BatchNorm", "LayerNorm"])
    assert Policy("bf16") != Policy("bf16-true") and Policy("bf16") != Policy("bf16", keep_fp32=[])
    params_only = Policy("p=bf16")  # jmp: compute follows params, output follows compute
    assert (params_only.param_dtype, params_only.compute_dtype, params_only.output_dtype) == (torch.bfloat16,) * 3
