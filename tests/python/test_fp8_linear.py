"""mixprec.nn.Float8Linear / float8_linear / convert(fp8=...): FP8 training layers on every recipe.

Accuracy against fp32 nn.Linear, delayed scaling's state after known steps, the fp32 weight gradient and
its in-place accumulation, state dicts and exact resume, a small transformer trained on real text within
2% of its bf16 run for each recipe, and bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import mixprec
from mixprec import fp8

from conftest import accumulate_cycle, rename_legacy_keys
from text_training import train_on_text

RECIPES = {
    "delayed": fp8.Recipe(),
    "current": fp8.Recipe(scaling="current"),
    "rowwise": fp8.Recipe(scaling="rowwise"),
    "blockwise": fp8.Recipe(scaling="blockwise"),
    "delayed-e4m3-pow2": fp8.Recipe(format="e4m3", pow2_scales=True, amax_history_len=4, margin=1),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", list(RECIPES))
def test_forward_and_backward_track_fp32_linear(name: str) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(256, 128)
    layer = mixprec.nn.Float8Linear(256, 128, recipe=RECIPES[name])
    layer.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(4, 32, 256)
    grad = torch.randn(4, 32, 128) * 1e-3
    for _ in range(3):  # delayed scaling needs a step to learn its scales
        ref.zero_grad()
        layer.zero_grad()
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out = ref(xr), layer(xf)
        out_ref.backward(grad)
        out.backward(grad)
    assert out.shape == (4, 32, 128) and out.dtype == torch.float32
    e4m3_only = RECIPES[name].format == "e4m3"
    assert rel(out, out_ref) < 0.05
    assert rel(xf.grad, xr.grad) < (0.05 if e4m3_only else 0.08)
    assert layer.weight.grad.dtype == torch.float32
    assert rel(layer.weight.grad, ref.weight.grad) < (0.05 if e4m3_only else 0.08)
    assert torch.allclose(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-7)


def test_delayed_scaling_state_after_two_steps() -> None:
    torch.manual_seed(1)
    layer = mixprec.nn.Float8Linear(64, 32)
    x1, x2 = torch.randn(16, 64) * 3, torch.randn(16, 64)
    g1 = torch.randn(16, 32) * 1e-2
    layer(x1).backward(g1)
    # Step 1 used scale 1 (nothing recorded yet) and recorded its amaxes in row 0.
    assert layer.fp8_forward_scale.tolist() == [1.0, 1.0]
    assert layer.fp8_forward_amax_history[0].tolist() == [x1.abs().max().item(), layer.weight.abs().max().item()]
    assert layer.fp8_backward_amax_history[0, 0].item() == g1.abs().max().item()
    layer(x2)
    # Step 2's scales map step 1's amaxes onto 448 (fp32 division), and the window moved down.
    amax1 = torch.tensor([x1.abs().max().item(), layer.weight.abs().max().item()])
    assert torch.equal(layer.fp8_forward_scale, torch.tensor(448.0) / amax1)
    assert torch.equal(layer.fp8_forward_scale_inv, 1.0 / layer.fp8_forward_scale)
    assert torch.equal(layer.fp8_forward_amax_history[1], amax1)
    assert layer.fp8_forward_amax_history[0, 0].item() == x2.abs().max().item()


def test_weight_gradient_accumulates_in_fp32_in_place() -> None:
    torch.manual_seed(2)
    layer = mixprec.nn.Float8Linear(64, 48, recipe=fp8.Recipe(scaling="current")).bfloat16()
    assert layer.weight.dtype == torch.bfloat16
    xs = [torch.randn(16, 64).bfloat16() for _ in range(3)]
    gs = [torch.randn(16, 48).bfloat16() for _ in range(3)]
    singles = []
    for x, g in zip(xs, gs):
        layer.zero_grad()
        layer(x).backward(g)
        singles.append(layer.weight.grad.clone())
    layer.zero_grad()
    for x, g in zip(xs, gs):
        layer(x).backward(g)
        held = layer.weight.grad
    assert held.dtype == torch.float32
    # The same products, summed in fp32 (in place by the GEMM from the second micro-batch on).
    assert torch.allclose(held, sum(singles), rtol=1e-5, atol=1e-6)
    # autograd.grad leaves .grad alone and returns the new part alone.
    before = layer.weight.grad.clone()
    (gw,) = torch.autograd.grad(layer(xs[0]), [layer.weight], gs[0])
    assert torch.equal(layer.weight.grad, before) and torch.allclose(gw.float(), singles[0], rtol=1e-2, atol=1e-2)


def _accumulate(layer: nn.Module, xs: list[torch.Tensor], gs: list[torch.Tensor], cached: bool) -> list:
    """One gradient-accumulation cycle; the outputs, input gradients, weight gradient and scaling state."""
    return accumulate_cycle(layer, xs, gs, cached) + [getattr(layer, n).clone() for n in mixprec.nn._FP8_BUFFERS]


@pytest.mark.parametrize("name", list(RECIPES))
def test_weight_cache_across_micro_batches_changes_nothing(name: str) -> None:
    """is_first_microbatch=True quantizes the weight and keeps it, False reuses it: with the weight unchanged
    within a cycle, every output, gradient and scaling-state bit equals the uncached run's. Delayed scaling
    first runs a cycle, so the weight's scale has settled (the cache keeps the scale of the cycle's first
    call; without it each call would use the newest, which differs only while the window fills)."""
    torch.manual_seed(3)
    a = mixprec.nn.Float8Linear(64, 48, recipe=RECIPES[name]).bfloat16()
    b = copy.deepcopy(a)
    xs = [torch.randn(16, 64).bfloat16() for _ in range(3)]
    gs = [torch.randn(16, 48).bfloat16() for _ in range(3)]
    if RECIPES[name].scaling == "delayed":
        _accumulate(a, xs, gs, cached=False)
        _accumulate(b, xs, gs, cached=False)
    plain, cached = _accumulate(a, xs, gs, cached=False), _accumulate(b, xs, gs, cached=True)
    assert len(plain) == len(cached) == 7 + len(mixprec.nn._FP8_BUFFERS)
    for got, want in zip(cached, plain):
        assert torch.equal(got, want)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_weight_cache_under_activation_checkpointing(kind: str, use_reentrant: bool) -> None:
    """Micro-batches through checkpoint(layer, x, is_first_microbatch): the recomputation of the first one
    reuses the filled cache (torch's non-reentrant checkpoint stops a recomputation early, which left a new,
    empty cache and refused the second micro-batch), and every gradient equals the uncheckpointed run's."""
    from torch.utils.checkpoint import checkpoint

    def make() -> nn.Module:
        torch.manual_seed(6)
        if kind == "int8":
            return mixprec.nn.Int8Linear(32, 32)
        return mixprec.nn.Float8Linear(32, 32, recipe=fp8.Recipe(scaling="current"))

    xs = [torch.randn(16, 32) for _ in range(3)]
    grads = []
    for checkpointed in (False, True):
        layer = make()
        inputs = [x.clone().requires_grad_() for x in xs]
        for i, x in enumerate(inputs):
            first = i == 0
            out = checkpoint(layer, x, first, use_reentrant=use_reentrant) if checkpointed else layer(x, first)
            out.pow(2).sum().backward()
        grads.append([layer.weight.grad, layer.bias.grad] + [x.grad for x in inputs])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_weight_cache_is_used_and_checked() -> None:
    torch.manual_seed(4)
    # Filled under bf16 autocast it holds the bf16 weight's quantization: reusing it outside autocast is refused
    # before anything is written (delayed scaling's state included).
    delayed = mixprec.nn.Float8Linear(32, 16, recipe=fp8.Recipe(scaling="delayed"))
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delayed(x, is_first_microbatch=True)
    before = [getattr(delayed, n).clone() for n in mixprec.nn._FP8_BUFFERS]
    with pytest.raises(ValueError, match="quantized in BFloat16, and this call computes in Float"):
        delayed(x, is_first_microbatch=False)
    assert all(torch.equal(getattr(delayed, n), b) for n, b in zip(mixprec.nn._FP8_BUFFERS, before))
    layer = mixprec.nn.Float8Linear(32, 16, recipe=fp8.Recipe(scaling="current"))
    with pytest.raises(RuntimeError, match="is_first_microbatch=True"):
        layer(x, is_first_microbatch=False)
    first = layer(x, is_first_microbatch=True)
    with torch.no_grad():
        layer.weight.mul_(2)  # not read again until the next True
    assert torch.equal(layer(x, is_first_microbatch=False), first)
    assert not torch.equal(layer(x, is_first_microbatch=True), first)
    assert not torch.equal(layer(x), first)
    layer.to(torch.bfloat16)  # a cast empties the cache
    with pytest.raises(RuntimeError, match="there was none"):
        layer(x.bfloat16(), is_first_microbatch=False)
    for make in (lambda: copy.deepcopy(layer), lambda: mixprec.nn.Int8Linear(32, 16).bfloat16()):
        cached = make()
        cached(x.bfloat16(), is_first_microbatch=True)
        mixprec.Policy("16-true").apply(cached)  # a policy's cast too (it was refused as an autocast change)
        with pytest.raises(RuntimeError, match="there was none"):
            cached(x.half(), is_first_microbatch=False)
    # The functional form checks a cache against the weight it is used with.
    cache: list[torch.Tensor] = []
    state = [getattr(layer, name) for name in mixprec.nn._FP8_BUFFERS]
    mixprec.nn.float8_linear(x.bfloat16(), layer.weight, None, state, layer.recipe, cache)
    assert [t.dtype for t in cache[:4]] == [torch.float8_e4m3fn, torch.float32, torch.float8_e4m3fn, torch.float32]
    assert cache[5].dtype == torch.bfloat16 and cache[5].numel() == 0  # the dtype the weight was quantized in
    assert cache[0].shape == (16, 32) and cache[2].shape == (32, 16)
    other = torch.randn(16, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight cache does not hold"):
        mixprec.nn.float8_linear(torch.randn(8, 48).bfloat16(), other, None, state, layer.recipe, cache)
    with pytest.raises(ValueError, match="weight cache does not hold"):  # per-tensor scales, row-wise recipe
        mixprec.nn.float8_linear(x.bfloat16(), layer.weight, None, state, fp8.Recipe(scaling="rowwise"), cache)
    # A copy (or a pickle) leaves the cache behind: it is derived from the weight.
    layer(x.bfloat16(), is_first_microbatch=True)
    with pytest.raises(RuntimeError, match="there was none"):
        copy.deepcopy(layer)(x.bfloat16(), is_first_microbatch=False)


def test_state_dict_resume_is_exact() -> None:
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
        mixprec.nn.convert(model, fp8=fp8.Recipe(amax_history_len=3), filter=lambda name, m: True)
        return model, mixprec.optim.AdamW(model.parameters(), lr=1e-2)

    data = [(torch.randn(16, 32), torch.randn(16, 16)) for _ in range(8)]

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    straight, sopt = make()
    run(straight, sopt, data)
    first, fopt = make()
    run(first, fopt, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": fopt.state_dict()}, buffer)
    assert "0.fp8_forward_amax_history" in first.state_dict()
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, ropt = make()
    resumed.load_state_dict(saved["model"])
    ropt.load_state_dict(saved["opt"])
    run(resumed, ropt, data[5:])
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_plain_linear_checkpoint_loads_after_convert() -> None:
    """Pretrained weights saved from torch.nn.Linear layers load strictly into the converted model: the FP8
    layers start from the initial scaling state, as BatchNorm fills in a missing num_batches_tracked, and train
    exactly as layers converted after the load. A checkpoint holding part of the scaling state reports the
    rest missing; the other direction (FP8 state into plain layers) reports it unexpected, as torch does."""
    def plain() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))

    pretrained = {k: v + 0.5 for k, v in plain().state_dict().items()}  # not what make() initialises
    recipe = fp8.Recipe(amax_history_len=3)
    before = mixprec.nn.convert(plain(), fp8=recipe, filter=lambda name, m: True)
    fresh_state = {k: v.clone() for k, v in before.state_dict().items() if "fp8_" in k}
    assert fresh_state
    assert str(before.load_state_dict(pretrained)) == "<All keys matched successfully>"
    after = plain()
    after.load_state_dict(pretrained)
    mixprec.nn.convert(after, fp8=recipe, filter=lambda name, m: True)
    for k, v in before.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), k
        if k in fresh_state:
            assert torch.equal(v, fresh_state[k]), k
    x = torch.randn(16, 32)
    for model in (before, after):
        model(x).pow(2).mean().backward()
    for a, b in zip(before.parameters(), after.parameters()):
        assert torch.equal(a.grad, b.grad)
    # Part of a state loads as torch loads it: strict reports the rest missing; strict=False takes the piece (a
    # loader that goes shard by shard brings the rest next), and the turn alone is no state.
    partial = {**pretrained, "0.fp8_forward_scale": torch.full((2,), 7.0)}
    with pytest.raises(RuntimeError, match='Missing key.*"0.fp8_forward_amax_history"'):
        before.load_state_dict(partial)
    rest = {k: v for k, v in before.state_dict().items() if k.startswith("0.fp8_") and k != "0.fp8_forward_scale"}
    before.load_state_dict({"0.fp8_forward_scale": torch.full((2,), 7.0)}, strict=False)
    before.load_state_dict(rest, strict=False)
    assert torch.equal(before[0].fp8_forward_scale, torch.full((2,), 7.0))
    turn_only = {**pretrained, "0.fp8_turn": torch.zeros(1), "2.fp8_turn": torch.zeros(1)}
    assert str(before.load_state_dict(turn_only)) == "<All keys matched successfully>"
    for k, v in before.state_dict().items():  # restarted
        if "fp8_" in k and not k.endswith("fp8_turn"):
            assert torch.equal(v, fresh_state[k]), k
    with pytest.raises(RuntimeError, match='Unexpected key.*"0.fp8_forward_amax_history"'):
        plain().load_state_dict(before.state_dict())


@pytest.mark.parametrize("flow", ["trained", "meta"])
def test_a_plain_checkpoint_starts_the_scaling_state_afresh(flow: str) -> None:
    """What a layer recorded belongs to its old weights, and after deferred initialisation (built on the meta
    device, converted, to_empty) its buffers hold uninitialised memory: a checkpoint without scaling state gives
    the initial state, and the model equals one converted after loading."""
    def plain(device: str = "cpu") -> nn.Module:
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(32, 64, device=device), nn.GELU(), nn.Linear(64, 16, device=device))

    pretrained = plain().state_dict()
    recipe = fp8.Recipe(amax_history_len=3)
    if flow == "meta":
        model = mixprec.nn.convert(plain("meta"), fp8=recipe, filter=lambda name, m: True).to_empty(device="cpu")
        for name in mixprec.nn._FP8_BUFFERS[:-1]:  # what uninitialised memory may hold
            getattr(model[0], name).fill_(-1e-23 if "scale" in name else 3e38)
    else:
        model = mixprec.nn.convert(plain(), fp8=recipe, filter=lambda name, m: True)
        for _ in range(2):
            model(torch.randn(8, 32) * 100).sum().backward()
        assert model[0].fp8_forward_amax_history.abs().sum() > 0
    model.load_state_dict(pretrained)
    reference = mixprec.nn.convert(plain(), fp8=recipe, filter=lambda name, m: True)
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(16, 32)
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
        m(x).pow(2).mean().backward()
    assert torch.isfinite(model(x)).all()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("name", ["current", "rowwise", "blockwise"])
def test_recipes_without_state_save_torch_linears_state_dict(name: str) -> None:
    """Only delayed scaling has state; the other recipes' state dicts are torch.nn.Linear's (strict loads both
    ways). A delayed checkpoint, or one saved when these recipes kept empty buffers, loads strictly: there is
    no state to take from it."""
    torch.manual_seed(0)
    layer = mixprec.nn.Float8Linear(32, 16, recipe=RECIPES[name])
    plain = nn.Linear(32, 16)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(layer.state_dict())
    layer.load_state_dict(nn.Linear(32, 16).state_dict())
    delayed = mixprec.nn.Float8Linear(32, 16).state_dict()
    layer.load_state_dict(delayed)
    assert torch.equal(layer.weight, delayed["weight"])
    older = {**nn.Linear(32, 16).state_dict(), **{key: torch.empty(0) for key in mixprec.nn._FP8_BUFFERS}}
    layer.load_state_dict(older)
    assert torch.equal(layer.weight, older["weight"]) and layer.fp8_forward_scale.numel() == 0
    fresh = mixprec.nn.Float8Linear(32, 16)  # and the other way: delayed scaling keeps its own initial state
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.fp8_forward_scale, torch.ones(2))


def test_the_forward_dequantizes_with_the_reciprocal_of_its_scale() -> None:
    """Buffers averaged or edited from outside (an EMA model's, torch.optim.swa_utils.AveragedModel with
    use_buffers=True) stay consistent: the forward's scale_inv is 1/scale, bit for bit what the state holds after
    an update, so an evaluation forward with a stray fp8_forward_scale_inv gives the same output."""
    torch.manual_seed(0)
    layer = mixprec.nn.Float8Linear(32, 16)
    for _ in range(3):
        layer(torch.randn(8, 32)).sum().backward()
    assert torch.equal(layer.fp8_forward_scale_inv, torch.reciprocal(layer.fp8_forward_scale))
    layer.eval()
    x = torch.randn(8, 32) * 3
    with torch.no_grad():
        expected = layer(x)
        layer.fp8_forward_scale_inv.mul_(7.0)
        assert torch.equal(layer(x), expected)
        # An averaged pair: the output is the one its scale gives.
        layer.fp8_forward_scale.mul_(0.5)
        layer.fp8_forward_scale_inv.copy_(torch.reciprocal(layer.fp8_forward_scale))
        paired = layer(x)
        layer.fp8_forward_scale_inv.fill_(1.0)
        assert torch.equal(layer(x), paired)


def test_a_double_backward_through_an_fp8_layer_is_refused_by_name() -> None:
    """A gradient penalty (create_graph=True) cannot pass through FP8 GEMMs, which are not differentiable: an
    error naming the layer, not second-order gradients that are silently zero."""
    layer = mixprec.nn.Float8Linear(32, 16, recipe=RECIPES["current"])
    x = torch.randn(8, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* FP8 layer"):
        torch.autograd.grad(torch.tanh(layer(x)).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(torch.tanh(layer(x)).sum(), x)  # without create_graph: as before
    assert gx.shape == x.shape


@pytest.mark.parametrize("name", ["delayed", "delayed-e4m3-pow2", "rowwise"])
def test_deferred_initialisation_and_reset_parameters_give_the_initial_scaling_state(name: str) -> None:
    """Built on the meta device, moved with to_empty (the buffers then hold whatever memory they got) and
    initialised with reset_parameters, as FSDP2 trainers initialise: the scaling state is a fresh layer's.
    reset_parameters of a trained layer resets it too, in the same buffer tensors (as BatchNorm's)."""
    recipe = RECIPES[name]
    fresh = dict(mixprec.nn.Float8Linear(32, 16, recipe=recipe).named_buffers())
    deferred = mixprec.nn.Float8Linear(32, 16, device="meta", recipe=recipe)
    deferred.to_empty(device="cpu")
    for buffer in deferred.buffers():
        buffer.fill_(float("nan"))  # what to_empty's memory may hold
    deferred.reset_parameters()
    for key, value in deferred.named_buffers():
        assert torch.equal(value, fresh[key]), key
    trained = mixprec.nn.Float8Linear(32, 16, recipe=recipe)
    for _ in range(2):
        trained(torch.randn(8, 32) * 3).sum().backward()
    held = dict(trained.named_buffers())
    if name != "rowwise":  # row-wise scaling keeps no state
        assert not torch.equal(held["fp8_forward_scale"], fresh["fp8_forward_scale"])
    trained.reset_parameters()
    for key, value in trained.named_buffers():
        assert value is held[key] and torch.equal(value, fresh[key]), key


def test_convert_that_makes_nothing_8_bit_says_so() -> None:
    """A model whose projections are not torch.nn.Linear (GPT-2's Conv1D), or whose only Linears are the first
    and the last, got nothing in FP8 or INT8 without a word."""
    two = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.warns(UserWarning, match="no layer became Float8Linear: of the model's 2 torch.nn.Linear"):
        mixprec.nn.convert(two, fp8=RECIPES["current"])
    assert [type(m) for m in two if not isinstance(m, nn.ReLU)] == [mixprec.nn.Linear] * 2
    with pytest.warns(UserWarning, match="no layer became Int8Linear"):
        mixprec.nn.convert(nn.Sequential(nn.Conv1d(4, 4, 1)), int8=True)
    three = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixprec.nn.convert(three, fp8=RECIPES["current"])
        mixprec.nn.convert(three, fp8=RECIPES["current"])  # again: already converted, nothing to say
    assert type(three[1]) is mixprec.nn.Float8Linear


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["current", "rowwise", "blockwise"])
def test_autocast_computes_as_the_16_bit_layer_does(name: str, dtype: torch.dtype) -> None:
    """Under autocast the layer computes exactly what it computes on the operands cast by hand: the CPU
    emulation's fp32 GEMM of the dequantized operands must not run under autocast (an fp16 or bf16 mm)."""
    torch.manual_seed(8)
    layer = mixprec.nn.Float8Linear(128, 32, recipe=RECIPES[name])
    x = torch.randn(16, 128) * 3
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    by_hand = copy.deepcopy(layer).to(dtype)(x.to(dtype))
    assert y.dtype == dtype and torch.equal(y, by_hand)


@pytest.mark.parametrize("name", ["delayed", "delayed-e4m3-pow2", "current", "blockwise"])
@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_activation_checkpointing_and_evaluation_change_nothing(name: str, checkpointing: str) -> None:
    """Training with torch.utils.checkpoint around every layer equals training without it, bit for bit
    (parameters, gradients, scaling state): the recomputation inside backward quantizes with the scales the
    original forward set and records no amax a second time. Evaluation between the steps (eval mode, with no
    grad or taking input gradients through the model) changes nothing either, as BatchNorm's running
    statistics stay put in eval mode."""
    recipe = RECIPES[name]

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
        mixprec.nn.convert(model, fp8=recipe, filter=lambda n, m: True)
        return model, mixprec.optim.AdamW(model.parameters(), lr=1e-2)

    def forward(model: nn.Module, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
        for layer in model:
            if checkpoint and isinstance(layer, mixprec.nn.Float8Linear):
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=checkpointing == "reentrant")
            else:
                x = layer(x)
        return x

    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 32, generator=gen) * 4, torch.randn(16, 16, generator=gen)) for _ in range(5)]
    runs = []
    for checkpoint, evaluate in ((False, None), (True, None), (False, "no_grad"), (False, "input_grad")):
        model, opt = make()
        for x, y in data:
            opt.zero_grad()
            # The reentrant form needs an input that requires grad to build the graph through the layers.
            nn.functional.mse_loss(forward(model, x.requires_grad_(checkpointing == "reentrant"), checkpoint),
                                   y).backward()
            opt.step()
            if evaluate:
                model.eval()
                x = torch.randn(16, 32) * 100  # a very different amax, which must not be recorded
                if evaluate == "no_grad":
                    with torch.no_grad():
                        model(x)
                else:  # input gradients of the model in eval mode (saliency, adversarial examples)
                    x.requires_grad_()
                    torch.autograd.grad(model(x).pow(2).sum() * 1e4, x)
                model.train()
        runs.append((model.state_dict(), [p.grad for p in model.parameters()]))
    (state, grads), *others = runs
    for other_state, other_grads in others:
        for key, value in state.items():
            assert torch.equal(value, other_state[key]), key
        for a, b in zip(grads, other_grads):
            assert torch.equal(a, b)


def test_delayed_scaling_moves_once_per_forward_backward_cycle() -> None:
    """The turn: a layer called twice before its backward quantizes both calls with the scales the first one
    set (equal outputs for equal inputs), records the max of their amaxes (float64 reference), and moves the
    window once; a second backward of a retained graph quantizes its output gradient as the first did, so
    the input gradient is exactly twice one backward's, as with torch.nn.Linear."""
    torch.manual_seed(5)
    layer = mixprec.nn.Float8Linear(32, 16, recipe=fp8.Recipe(amax_history_len=4))
    for _ in range(2):  # a few cycles, so the window holds amaxes and the scales are no longer 1
        layer(torch.randn(8, 32) * 3).sum().backward()
    x1, x2 = torch.randn(8, 32) * 5, torch.randn(8, 32) * 2
    window = layer.fp8_forward_amax_history.clone()
    y1 = layer(x1)
    scale, rolled = layer.fp8_forward_scale.clone(), layer.fp8_forward_amax_history[1:].clone()
    assert not torch.equal(rolled, window[1:])  # the first forward moved the window
    y2, y1_again = layer(x2), layer(x1)
    assert torch.equal(y1_again, y1) and torch.equal(layer.fp8_forward_scale, scale)
    assert torch.equal(layer.fp8_forward_amax_history[1:], rolled)
    amax = max(x1.double().abs().max().item(), x2.double().abs().max().item())
    assert layer.fp8_forward_amax_history[0].tolist() == [amax, layer.weight.double().abs().max().item()]
    # A retained graph backpropagated twice.
    xa = torch.randn(8, 32, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    twin = copy.deepcopy(layer)
    g = torch.randn(8, 16)
    out = layer(xa)
    out.backward(g, retain_graph=True)
    out.backward(g)
    twin(xb).backward(g)
    assert torch.equal(xa.grad, 2 * xb.grad)
    assert torch.equal(layer.fp8_backward_scale, twin.fp8_backward_scale)
    assert torch.equal(layer.fp8_backward_amax_history, twin.fp8_backward_amax_history)
    assert layer.fp8_turn.item() == twin.fp8_turn.item() == 1.0


@pytest.mark.parametrize("case", ["frozen", "no_grad"])
def test_forwards_without_a_backward_keep_updating_the_scales(case: str) -> None:
    """A layer no backward runs through (frozen, or called under no_grad in train mode: rollouts, a teacher)
    updates its forward scales on every pass, as a six-tensor state (no turn) does, bit for bit; the turn is
    left marking both sides due, so a later training step updates both sides as usual."""
    torch.manual_seed(2)
    layer = mixprec.nn.Float8Linear(64, 32, recipe=fp8.Recipe(amax_history_len=3))
    twin = copy.deepcopy(layer)
    if case == "frozen":
        layer.requires_grad_(False)
    xs = [torch.randn(16, 64) * 1000 * (k + 1) for k in range(5)]  # beyond E4M3's 448: the scales must move
    six = [getattr(twin, n) for n in mixprec.nn._FP8_BUFFERS[:6]]
    for x in xs:
        with torch.no_grad() if case == "no_grad" else contextlib.nullcontext():
            y = layer(x)
        expected = mixprec.nn.float8_linear(x, twin.weight.detach(), twin.bias.detach(), six, twin.recipe)
        assert torch.equal(y, expected)
    for name in mixprec.nn._FP8_BUFFERS[:6]:
        assert torch.equal(getattr(layer, name), getattr(twin, name)), name
    assert layer.fp8_forward_scale[0].item() < 1 and layer.fp8_turn.item() == 2.0
    # Training steps afterwards: the forward updates (due) and takes the turn, the backward updates too and
    # records the gradient's amax (1e5: its scale moves at the next backward), and the turn is back to 1.
    layer.requires_grad_(True)
    for _ in range(2):
        layer(xs[0]).sum().mul(1e5).backward()
        assert layer.fp8_turn.item() == 1.0 and layer.fp8_backward_amax_history[0, 0].item() == 1e5
    assert layer.fp8_backward_scale.item() == torch.tensor(57344.0 / 1e5, dtype=torch.float32).item()


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "compile-non-reentrant"])
def test_a_layer_called_twice_trains_the_same_with_activation_checkpointing(checkpointing: str) -> None:
    """A layer applied twice per step (shared weights) and two micro-batches summed into one loss, with
    torch.utils.checkpoint (non-reentrant: the reentrant form runs its first pass under no_grad, which builds no
    backward and so takes no turn) around every FP8 call, equal the run without checkpointing bit for bit: each
    recomputation reads the scales every forward of the cycle used. Under torch.compile too (the whole loss
    one compiled graph), where AOTAutograd recomputes the checkpointed scale update from the buffers the
    forward already wrote."""
    compiled = checkpointing.startswith("compile")

    class Shared(nn.Module):
        def __init__(self, checkpoint: bool) -> None:
            super().__init__()
            torch.manual_seed(11)
            self.inp, self.mid, self.out = nn.Linear(32, 48), nn.Linear(48, 48), nn.Linear(48, 16)
            mixprec.nn.convert(self, fp8=fp8.Recipe(amax_history_len=3), filter=lambda n, m: True)
            self.checkpoint = checkpoint

        def call(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if not self.checkpoint:
                return layer(x)
            return torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.call(self.inp, x))
            h = torch.relu(self.call(self.mid, h))
            return self.call(self.out, torch.relu(self.call(self.mid, h)))  # mid twice

    gen = torch.Generator().manual_seed(2)
    data = [[(torch.randn(8, 32, generator=gen) * s, torch.randn(8, 16, generator=gen)) for s in (4, 1)]
            for _ in range(4)]
    runs = []
    for checkpoint in (False, True):
        model = Shared(checkpoint)

        def loss_of(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            # Two micro-batches in one loss: every layer runs twice before its backward (mid four times).
            return sum(nn.functional.mse_loss(model(x), y) for x, y in batch)

        run = torch.compile(loss_of) if compiled else loss_of
        opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
        for batch in data:
            opt.zero_grad()
            run(batch).backward()
            opt.step()
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_a_checkpoint_without_the_turn_loads_with_the_initial_turn() -> None:
    """State dicts saved before fp8_turn existed (the six other buffers) load strictly; the layer takes the
    initial turn (a checkpoint is saved between steps: the backward updated last), so the next forward
    updates its scales, as it did when the checkpoint was written."""
    torch.manual_seed(0)
    layer = mixprec.nn.Float8Linear(32, 16)
    layer(torch.randn(8, 32)).sum().backward()
    older = {k: v for k, v in layer.state_dict().items() if k != "fp8_turn"}
    layer(torch.randn(8, 32))  # a forward without its backward: the turn is the forward's now
    assert layer.fp8_turn.item() == 0.0
    other = mixprec.nn.Float8Linear(32, 16)
    other.fp8_turn.fill_(0.0)
    assert str(other.load_state_dict(older)) == "<All keys matched successfully>"
    assert other.fp8_turn.item() == 1.0
    for key, value in older.items():
        assert torch.equal(getattr(other, key), value), key
    with pytest.raises(RuntimeError, match='Missing key.*"fp8_forward_scale"'):
        other.load_state_dict({k: v for k, v in older.items() if k != "fp8_forward_scale"})
    # Into a model built on the meta device, with assign=True: the turn is made where the checkpoint lies.
    meta = mixprec.nn.Float8Linear(32, 16, device="meta")
    meta.load_state_dict(older, assign=True)
    assert all(b.device.type == "cpu" for b in meta.buffers()) and meta.fp8_turn.item() == 1.0
    meta(torch.randn(8, 32)).sum().backward()


@pytest.mark.parametrize("name", list(RECIPES))
def test_an_inf_reaches_the_products_as_in_torch(name: str) -> None:
    """An inf in the input or the output gradient (an fp16 overflow) makes the output, or the weight and input
    gradients, non-finite, as torch.nn.Linear's are, so a GradScaler skips the step: saturating casts used to
    turn it into the largest code and hide it. Finite values beyond a delayed scale's range still saturate (the
    products stay finite), and a clean step stays finite."""
    torch.manual_seed(7)
    layer = mixprec.nn.Float8Linear(32, 16, bias=False, recipe=RECIPES[name])
    plain = nn.Linear(32, 16, bias=False)
    for _ in range(2):  # delayed scaling settles its scales
        layer(torch.randn(8, 32)).backward(torch.randn(8, 16))
    for module in (layer, plain):
        module.zero_grad()
        x = torch.randn(8, 32, requires_grad=True)
        g = torch.randn(8, 16)
        g[3, 5] = float("inf")
        module(x).backward(g)
        assert not torch.isfinite(module.weight.grad).all() and not torch.isfinite(x.grad).all(), module
        x = torch.randn(8, 32)
        x[2, 7] = float("-inf")
        assert not torch.isfinite(module(x)).all(), module
    layer.zero_grad()
    x = (torch.randn(8, 32) * 1e4).requires_grad_()  # far beyond the settled scales: saturates, stays finite
    layer(x).backward(torch.randn(8, 16) * 1e4)
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()


def test_a_grad_scaler_skips_an_fp16_overflow_through_fp8_layers() -> None:
    """Under fp16 autocast with a GradScaler, a loss scale that overflows the output gradient of an FP8 layer
    is caught: the step is skipped and the scale backs off, as with torch.nn.Linear."""
    for convert in (True, False):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False))
        if convert:
            mixprec.nn.convert(model, fp8=fp8.Recipe(), filter=lambda n, m: True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = mixprec.GradScaler("cpu", init_scale=2.0**24)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(16, 32) * 50).float().pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 2.0**23, convert
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), convert


def test_convert_default_filter_and_deepcopy() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 24), nn.Linear(24, 16),
                          nn.Linear(16, 8))
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    mixprec.nn.convert(model, fp8=fp8.Recipe(scaling="rowwise"))
    kinds = [type(m).__name__ for m in model if isinstance(m, nn.Linear)]
    # First and last stay out; 64 -> 24 is not a multiple of 16 on its output.
    assert kinds == ["Linear", "Float8Linear", "Linear", "Linear", "Linear"]
    assert all(type(m) is not nn.Linear for m in model if isinstance(m, nn.Linear))
    assert [m.weight for m in model if isinstance(m, nn.Linear)] == weights  # the same tensors
    assert "scaling=rowwise" in repr(model[2])
    twin = copy.deepcopy(model)
    x = torch.randn(8, 32)
    assert torch.equal(twin(x), model(x))


def test_default_filters_leave_out_the_input_layer_only_when_a_linear_reads_the_input() -> None:
    """In a transformer (an embedding, then blocks of projections, then the head) every projection of block 0
    is converted alike, and the head is left out; with a convolution in front the same holds; a plain MLP keeps
    its first Linear. The filters agree for FP8 and INT8."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.mlp = nn.Linear(32, 32)

    class LM(nn.Module):
        def __init__(self, stem: nn.Module) -> None:
            super().__init__()
            self.stem, self.blocks, self.norm = stem, nn.ModuleList([Block(), Block()]), nn.LayerNorm(32)
            self.lm_head = nn.Linear(32, 64)

    for stem in (nn.Embedding(64, 32), nn.Conv1d(3, 32, 1)):
        for make in (mixprec.nn.fp8_default_filter, mixprec.nn.int8_default_filter):
            model = LM(stem)
            take = make(model)
            taken = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and take(name, m)]
            assert taken == [f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "mlp")]
    mlp = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    assert [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)
            and mixprec.nn.fp8_default_filter(mlp)(n, m)] == ["2"]
    model = mixprec.nn.convert(LM(nn.Embedding(64, 32)), fp8=fp8.Recipe(scaling="current"))
    assert type(model.blocks[0].q_proj) is mixprec.nn.Float8Linear and type(model.lm_head) is mixprec.nn.Linear

    class LoraLayer(nn.Module):  # peft's layout: base_layer, and the adapters in ModuleDicts by adapter name
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = nn.Linear(32, 32)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(32, 16, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(16, 32, bias=False)})

    lm = LM(nn.Embedding(64, 32))
    lm.blocks[0].q_proj = LoraLayer()
    lm.lm_head = LoraLayer()  # an adapted head: its base layer is still the output layer
    for make in (mixprec.nn.fp8_default_filter, mixprec.nn.int8_default_filter):
        take = make(lm)
        taken = {name for name, m in lm.named_modules() if isinstance(m, nn.Linear) and take(name, m)}
        assert "blocks.0.q_proj.base_layer" in taken and not any("lora_" in name for name in taken)
        assert "lm_head.base_layer" not in taken


def test_convert_again_converts_what_an_earlier_call_left_and_refuses_to_discard_state() -> None:
    """A model converted for fp32 weight gradients first (convert(model)) and for FP8 afterwards gets the same
    layers as one converted for FP8 at once; converting again the same way changes nothing; another recipe or
    INT8 on an FP8 layer is refused by name before any layer changes."""
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 16))

    recipe = fp8.Recipe(scaling="current")
    at_once = mixprec.nn.convert(build(), fp8=recipe)
    twice = mixprec.nn.convert(mixprec.nn.convert(build()), fp8=recipe)
    kinds = lambda model: [type(m).__name__ for m in model if isinstance(m, nn.Linear)]  # noqa: E731
    assert kinds(twice) == kinds(at_once) == ["Linear", "Float8Linear", "Float8Linear", "Linear"]
    x = torch.randn(16, 32)
    assert torch.equal(twice(x), at_once(x))

    twice(x).sum().backward()
    history = twice[2].fp8_forward_amax_history.clone()
    mixprec.nn.convert(twice, fp8=recipe)  # the same recipe again: nothing changes
    assert kinds(twice) == kinds(at_once) and torch.equal(twice[2].fp8_forward_amax_history, history)
    assert len(twice[2]._load_state_dict_post_hooks) == 1
    assert twice[2].weight.grad.dtype == torch.float32
    for kwargs, message in ((dict(fp8=fp8.Recipe(scaling="rowwise")), "'2' is already a Float8Linear"),
                            (dict(int8=True), "cannot be converted to Int8Linear")):
        before = {k: v.clone() for k, v in twice.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            mixprec.nn.convert(twice, **kwargs)
        assert kinds(twice) == kinds(at_once) and twice[2].recipe == recipe
        after = twice.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Leaving the FP8 layers out converts the rest.
    mixprec.nn.convert(twice, int8=True, filter=lambda name, layer: type(layer) is not mixprec.nn.Float8Linear)
    assert kinds(twice) == ["Int8Linear", "Float8Linear", "Float8Linear", "Int8Linear"]


def _train_on_text(recipe: fp8.Recipe | None) -> float:
    """The text run (text_training.py) with the blocks' MLPs in FP8 under `recipe` (None: bf16)."""
    def convert(model: nn.Module) -> None:
        mixprec.nn.convert(model, fp8=recipe, filter=lambda n, m: ".mlp." in n)
        assert sum(isinstance(m, mixprec.nn.Float8Linear) for m in model.modules()) == 4

    return train_on_text(None if recipe is None else ("fp8", recipe), None if recipe is None else convert)


@pytest.mark.parametrize("name", list(RECIPES))
def test_small_transformer_on_real_text_within_2_percent_of_bf16(name: str) -> None:
    baseline = _train_on_text(None)
    assert baseline < 3.2  # it learns: ln(256) = 5.5 at the start
    final = _train_on_text(RECIPES[name])
    assert abs(final - baseline) <= 0.02 * baseline, (final, baseline)


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32)])
def test_an_empty_batch_gives_what_torch_linear_gives(name: str, shape: tuple[int, ...]) -> None:
    """An empty batch (the last, ragged one of a loader; a rank with no tokens of an expert) runs forward and
    backward for every recipe, as torch.nn.Linear does: an empty output and zero weight and bias gradients."""
    torch.manual_seed(0)
    layer = mixprec.nn.Float8Linear.from_linear(nn.Linear(32, 16), RECIPES[name])
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == (*shape[:-1], 16) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(16, 32)) and torch.equal(layer.bias.grad, torch.zeros(16))
    assert all(torch.isfinite(b).all() for b in layer.buffers())
    out = layer(torch.randn(4, 32))  # and the layer goes on to a full batch
    assert torch.isfinite(out).all()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="format must be 'hybrid' or 'e4m3'"):
        fp8.Recipe(format="e5m2")
    # A recipe fails where it is written (C++'s check_recipe), not at the first forward.
    for kwargs, message in ((dict(scaling="tensorwise"), r"scaling must be \"delayed\", \"current\""),
                            (dict(amax_history_len=0), "amax_history_len must be >= 1"),
                            (dict(amax_compute_algo="mean"), "amax_compute_algo must be"),
                            (dict(margin=-1), r"margin must be in \[0, 32\]"),
                            (dict(margin=33), r"margin must be in \[0, 32\]")):
        with pytest.raises(ValueError, match=message):
            fp8.Recipe(**kwargs)
    fp8.Recipe(amax_compute_algo="most_recent", margin=32, amax_history_len=1)  # the edges are accepted
    torch.library.opcheck(torch.ops.mixprec.fp8_check_recipe.default,
                          ("delayed", torch.float8_e4m3fn, torch.float8_e5m2, 16, "max", 0))
    layer = mixprec.nn.Float8Linear(32, 16)
    with pytest.raises(RuntimeError, match="float64 input or weight has no FP8 path"):
        layer(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not match"):
        layer(torch.randn(4, 31))
    # As torch.nn.Linear (and Int8Linear): outside autocast input and weight share a dtype; integers are named.
    with pytest.raises(RuntimeError, match="input and weight must share a dtype, got BFloat16 and Float"):
        layer(torch.randn(4, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="input and weight must be floating point, got Long and Float"):
        layer(torch.ones(4, 32, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both: accepted
        assert layer(torch.randn(4, 32)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"scaling must be \"delayed\", \"current\""):
        torch.ops.mixprec.float8_linear(torch.randn(4, 32), layer.weight, None, *[torch.empty(0)] * 6, "tensor",
                                        torch.float8_e4m3fn, torch.float8_e5m2, "max", 0, False, True)
    with pytest.raises(RuntimeError, match="delayed scaling needs its state; forward_amax_history is empty"):
        torch.ops.mixprec.float8_linear(torch.randn(4, 32), layer.weight, None, *[torch.empty(0)] * 6, "delayed",
                                        torch.float8_e4m3fn, torch.float8_e5m2, "max", 0, False, True)
    with pytest.raises(ValueError, match=r"Recipe.forward_dtype \(input and weight\) must be Float8_e4m3fn, got BFloat16"):
        torch.ops.mixprec.float8_linear(torch.randn(4, 32), layer.weight, None, *[torch.empty(0)] * 6, "current",
                                        torch.bfloat16, torch.float8_e5m2, "max", 0, False, True)
    with pytest.raises(ValueError, match=r"Recipe.forward_dtype \(input and weight\) must be Float8_e4m3fn, got "
                                         r"Float8_e5m2"):  # no FP8 GEMM takes two E5M2 operands
        torch.ops.mixprec.float8_linear(torch.randn(4, 32), layer.weight, None, *[torch.empty(0)] * 6, "current",
                                        torch.float8_e5m2, torch.float8_e5m2, "max", 0, False, True)
    before = [b.clone() for b in layer.buffers()]
    *six, turn = layer.buffers()
    # The recipe's state on another device than the input (here the input on meta): named, nothing written.
    with pytest.raises(RuntimeError, match="forward_amax_history is on cpu but input is on meta"):
        torch.ops.mixprec.float8_linear(torch.randn(4, 32, device="meta"), layer.weight.to("meta"), None,
                                        *six, "delayed", torch.float8_e4m3fn, torch.float8_e5m2, "max", 0,
                                        False, True, turn=turn)
    with pytest.raises(RuntimeError, match="turn is on cpu but input is on meta"):
        torch.ops.mixprec.float8_linear(torch.randn(4, 32, device="meta"), layer.weight.to("meta"), None,
                                        *[t.to("meta") for t in six], "delayed", torch.float8_e4m3fn,
                                        torch.float8_e5m2, "max", 0, False, True, turn=turn)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))
    with pytest.raises(ValueError, match="amax_compute_algo must be"):
        torch.ops.mixprec.float8_linear(torch.randn(4, 32), layer.weight, None, *six, "delayed",
                                        torch.float8_e4m3fn, torch.float8_e5m2, "mean", 0, False, True, turn=turn)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))
    with pytest.raises(ValueError, match="state must be the 6 or 7 scaling tensors"):
        mixprec.nn.float8_linear(torch.randn(4, 32), layer.weight, None, six[:5], layer.recipe)


def test_scaling_state_buffers() -> None:
    """The buffers Float8Linear registers (C++'s make_scaling_state): delayed scaling's window and scales,
    fp32 on the weight's device, and the turn (1: the first forward updates); other recipes seven empty,
    distinct tensors."""
    layer = mixprec.nn.Float8Linear(32, 16, recipe=fp8.Recipe(amax_history_len=5), dtype=torch.bfloat16)
    state = [getattr(layer, n) for n in mixprec.nn._FP8_BUFFERS]
    assert [tuple(t.shape) for t in state] == [(5, 2), (2,), (2,), (5, 1), (1,), (1,), (1,)]
    assert [t.unique().tolist() for t in state] == [[0.0], [1.0], [1.0], [0.0], [1.0], [1.0], [1.0]]
    assert all(t.dtype == torch.float32 and t.device == layer.weight.device for t in state)
    current = mixprec.nn.Float8Linear(32, 16, recipe=fp8.Recipe(scaling="current"), device="meta")
    state = [getattr(current, n) for n in mixprec.nn._FP8_BUFFERS]
    assert all(t.shape == (0,) and t.device.type == "meta" for t in state)
    assert len({id(t) for t in state}) == 7
    with pytest.raises(ValueError, match="amax_history_len must be >= 1"):
        torch.ops.mixprec.fp8_scaling_state("delayed", 0, layer.weight)


def test_dtype_casts_leave_the_scaling_state_in_fp32() -> None:
    layer = mixprec.nn.Float8Linear(32, 16)
    layer.fp8_forward_scale.fill_(1.0 / 3.0)  # not representable in bf16: a cast would change it
    third = layer.fp8_forward_scale.clone()
    for cast in (lambda m: m.bfloat16(), lambda m: m.to(torch.float16), lambda m: m.half().float(),
                 lambda m: mixprec.Policy("bf16-true").apply(m)):
        cast(layer)
        assert all(getattr(layer, n).dtype == torch.float32 for n in mixprec.nn._FP8_BUFFERS)
        assert torch.equal(layer.fp8_forward_scale, third)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    mixprec.nn.convert(model, fp8=fp8.Recipe())
    mixprec.Policy("bf16-true").apply(model)  # bf16 storage
    assert model[1].weight.dtype == torch.bfloat16 and model[1].fp8_forward_scale.dtype == torch.float32
    model(torch.randn(4, 32).bfloat16()).float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32


def test_torch_compile_fullgraph_matches_eager_bit_for_bit() -> None:
    """Dynamo traces the op (its state mutation included) as one node; the compiled layer's outputs, weight
    gradients and delayed-scaling buffers equal the eager twin's over several steps."""
    torch.manual_seed(0)
    layer = mixprec.nn.Float8Linear(64, 32)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(3):
        x = torch.randn(16, 64)
        y = compiled(x)
        y.sum().backward()
        z = twin(x)
        z.sum().backward()
        assert torch.equal(y, z)
    assert torch.equal(layer.weight.grad, twin.weight.grad)
    assert all(torch.equal(a, b) for a, b in zip(layer.buffers(), twin.buffers()))


@pytest.mark.parametrize("scaling", ["current", "delayed", "blockwise"])
def test_opcheck(scaling: str) -> None:
    """float8_linear and float8_linear_cached (filling and reusing) under opcheck; the SchemaCheckMode test
    cannot run (it multiplies the FP8 intermediates, which has no CPU kernel), and the AOT test, which
    differentiates a sum of every floating output, cannot sum the FP8 cache: it runs without gradients."""
    torch.manual_seed(6)
    recipe = fp8.Recipe(scaling=scaling)
    state = [getattr(mixprec.nn.Float8Linear(32, 16, recipe=recipe), n) for n in mixprec.nn._FP8_BUFFERS]
    flags = (recipe.scaling, recipe.forward_dtype, recipe.backward_dtype, recipe.amax_compute_algo, 0, False, True)
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for grad in (True, False):
        x, w, b = (torch.randn(*shape, requires_grad=grad) for shape in ((8, 32), (16, 32), (16,)))
        args, turn = (x, w, b, *state[:6], *flags), {"turn": state[6]}
        for kwargs in (turn, {}):  # with the turn and without (a six-tensor state)
            torch.library.opcheck(torch.ops.mixprec.float8_linear.default, args, kwargs, test_utils=no_schema)
        utils = no_schema if not grad else no_schema[:2]
        torch.library.opcheck(torch.ops.mixprec.float8_linear_cached.default, (*args, []), turn, test_utils=utils)
        cache: list[torch.Tensor] = []
        mixprec.nn.float8_linear(x, w, b, state, recipe, cache)
        torch.library.opcheck(torch.ops.mixprec.float8_linear_cached.default, (*args, cache), turn, test_utils=utils)


def test_evaluating_delayed_scaling_that_never_recorded_an_amax_warns_once() -> None:
    """An evaluation reads the scaling state without updating it (as BatchNorm's statistics): a fresh layer, or
    one loaded from a checkpoint without its state, would quantize with the initial scale 1, silently."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(8, 32) * 1000  # beyond E4M3's 448 at scale 1
    fresh = mixprec.nn.Float8Linear(32, 16).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):  # a dry run cannot read the state, nor needs to
        fresh(torch.empty(8, 32))
    with pytest.warns(UserWarning, match="never recorded an amax"):
        fresh(x)
    trained = mixprec.nn.Float8Linear(32, 16)
    trained(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(x)  # once per layer
        trained.eval()(x)
        mixprec.nn.Float8Linear(32, 16, recipe=fp8.Recipe(scaling="current")).eval()(x)
    trained.load_state_dict(nn.Linear(32, 16).state_dict())  # no scaling state: the initial one, unwarned yet
    with pytest.warns(UserWarning, match="never recorded an amax"):
        trained(x)
    trained.train()(x).sum().backward()  # records an amax again: evaluating it is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.eval()(x)
    trained.reset_parameters()  # back to the initial scaling state, as after deferred initialisation
    with pytest.warns(UserWarning, match="never recorded an amax"):
        trained(x)


def test_convert_keeps_the_users_ddp_ignore_list_and_lists_each_buffer_once() -> None:
    """convert(fp8=...) adds the delayed-scaling buffers to ``_ddp_params_and_buffers_to_ignore`` after the names
    the user put there; converting again (the layers already FP8) lists nothing twice and drops nothing."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model._ddp_params_and_buffers_to_ignore = ["0.bias"]
    recipe = fp8.Recipe(scaling="delayed")
    mixprec.nn.convert(model, fp8=recipe, filter=lambda name, m: True)
    buffers = [f"{i}.{b}" for i in (0, 2) for b, _ in model[i].named_buffers()]
    assert len(buffers) == 14  # the seven scaling-state tensors of each layer
    assert model._ddp_params_and_buffers_to_ignore == ["0.bias", *buffers]
    mixprec.nn.convert(model, fp8=recipe, filter=lambda name, m: True)
    assert model._ddp_params_and_buffers_to_ignore == ["0.bias", *buffers]


def test_a_load_pre_hook_renaming_legacy_keys_runs_before_the_scaling_state_decision() -> None:
    """A module's load pre-hooks may rename a legacy checkpoint's keys. torch runs them inside its own
    _load_from_state_dict, which the layer's override called only after deciding whether to restart the scaling
    state: the decision saw no "weight" and strict loading reported the state missing. Now the hooks run first
    (once each), so converting before loading such a checkpoint gives what converting after it gives."""
    torch.manual_seed(3)
    plain = nn.Linear(32, 16)
    legacy = {"w_" + k: v + 0.25 for k, v in plain.state_dict().items()}
    recipe = fp8.Recipe(amax_history_len=4)
    layer = mixprec.nn.convert(nn.Sequential(nn.Linear(32, 16)), fp8=recipe, filter=lambda n, m: True)[0]
    calls = []
    layer.register_load_state_dict_pre_hook(lambda *a: calls.append(1))
    layer._register_load_state_dict_pre_hook(rename_legacy_keys)
    fresh = {k: v.clone() for k, v in layer.state_dict().items() if "fp8_" in k}
    layer(torch.randn(4, 32)).sum().backward()  # a recorded amax, which the restart must drop
    assert str(layer.load_state_dict(legacy)) == "<All keys matched successfully>"
    assert calls == [1] and len(layer._load_state_dict_pre_hooks) == 2  # each hook once, and kept
    assert torch.equal(layer.weight, plain.weight + 0.25)
    for k, v in fresh.items():
        assert torch.equal(layer.state_dict()[k], v), k


def test_delayed_scaling_state_leaving_the_meta_device_starts_afresh() -> None:
    """Deferred initialisation as torchtitan does it: build on the meta device, convert, to_empty, then an init
    that sets only the parameters. The scaling state was left as uninitialised memory (NaN losses from the first
    step); it depends on no weight, so leaving the meta device starts it as a fresh layer's."""
    recipe = fp8.Recipe(amax_history_len=5)
    torch.manual_seed(0)
    fresh = mixprec.nn.Float8Linear.from_linear(nn.Linear(32, 16), recipe)
    expected = {k: v.clone() for k, v in fresh.state_dict().items() if "fp8_" in k}
    for _ in range(3):  # memory the allocator hands out again, full of non-zeros
        garbage = [torch.full_like(v, 7.5) for v in expected.values()]
        del garbage
    with torch.device("meta"):
        layer = mixprec.nn.Float8Linear.from_linear(nn.Linear(32, 16), recipe)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        nn.init.normal_(layer.weight)  # the parameters only
        nn.init.zeros_(layer.bias)
    for k, v in expected.items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert torch.isfinite(layer(torch.randn(4, 32))).all()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_the_recomputation_of_a_checkpointed_forward_reduces_no_amax(use_reentrant: bool) -> None:
    """With amax_group the training forward MAX-reduces the last step's amaxes (a collective). The
    recomputation inside backward (activation checkpointing) reads the state without updating it, and ran the
    collective again: harmless in value, but one more collective per layer in backward."""
    layer = mixprec.nn.Float8Linear.from_linear(nn.Linear(32, 16), fp8.Recipe())
    layer.amax_group = "a group"  # the reduction itself is replaced by a count
    calls = []
    layer.reduce_amax_ = lambda: calls.append(torch._C._current_graph_task_id())  # type: ignore[method-assign]
    x = torch.randn(4, 32, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()
    assert calls == ([] if use_reentrant else [-1])  # the reentrant first pass runs without grad
    layer(x).sum().backward()
    assert len(calls) == (1 if use_reentrant else 2)
