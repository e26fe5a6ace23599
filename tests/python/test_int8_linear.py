"""mixprec.nn.Int8Linear / int8_linear / convert(int8=...): INT8 GEMMs in training.

Accuracy against fp32 nn.Linear for every choice of INT8 GEMMs, exactness of the forward against the int8
ops it is built from, the fp32 weight gradient and its in-place accumulation, autocast, state dicts, a small
transformer trained on real text within 2% of its bf16 run, torch.compile, opcheck and bad input."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import mixprec
from mixprec import int8
from mixprec.nn import Int8Gemms

from conftest import DEVICES, accumulate_cycle
from text_training import train_on_text

GEMMS = {
    "switchback": Int8Gemms(),
    "all": Int8Gemms(weight_grad=True),
    "forward-only": Int8Gemms(input_grad=False),
    "none": Int8Gemms(forward=False, input_grad=False),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", list(GEMMS))
def test_forward_and_backward_track_fp32_linear(name: str) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(256, 128)
    layer = mixprec.nn.Int8Linear(256, 128, gemms=GEMMS[name])
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 32, 256)
    grad = torch.randn(4, 32, 128) * 1e-3
    xr, xi = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(xr), layer(xi)
    out_ref.backward(grad)
    out.backward(grad)
    g = GEMMS[name]
    assert out.shape == (4, 32, 128) and out.dtype == torch.float32
    # Row-wise INT8 of Gaussian data: about 1% relative error per GEMM; exact (fp32) otherwise.
    assert rel(out, out_ref) < (0.02 if g.forward else 1e-6)
    assert rel(xi.grad, xr.grad) < (0.02 if g.input_grad else 1e-6)
    assert layer.weight.grad.dtype == torch.float32
    assert rel(layer.weight.grad, ref.weight.grad) < (0.02 if g.weight_grad else 1e-6)
    assert torch.allclose(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-7)


def test_forward_is_exactly_the_int8_ops() -> None:
    torch.manual_seed(1)
    layer = mixprec.nn.Int8Linear(64, 48)
    x = torch.randn(5, 7, 64)
    qx, qw = int8.quantize(x.reshape(35, 64)), int8.quantize(layer.weight.detach())
    expected = int8.mm(qx.data, qw.data.t(), qx.scale_inv, qw.scale_inv.reshape(1, 48), torch.float32, layer.bias)
    assert torch.equal(layer(x), expected.reshape(5, 7, 48))
    g = torch.randn(5, 7, 48)
    xg = x.clone().requires_grad_()
    layer(xg).backward(g)
    qg, qwc = int8.quantize(g.reshape(35, 48)), int8.quantize(layer.weight.detach(), (-1, 1))
    assert torch.equal(xg.grad, int8.mm(qg.data, qwc.data, qg.scale_inv, qwc.scale_inv).reshape(5, 7, 64))


def test_weight_gradient_accumulates_in_fp32_in_place() -> None:
    torch.manual_seed(2)
    for gemms in (Int8Gemms(), Int8Gemms(weight_grad=True)):
        layer = mixprec.nn.Int8Linear(32, 16, dtype=torch.bfloat16, gemms=gemms)
        xs = [torch.randn(8, 32, dtype=torch.bfloat16) for _ in range(3)]
        layer(xs[0]).float().sum().backward()
        accumulator = layer.weight.grad
        assert accumulator.dtype == torch.float32
        for x in xs[1:]:
            layer(x).float().sum().backward()
        assert layer.weight.grad is accumulator  # added into, not replaced
        fresh = copy.deepcopy(layer)
        fresh.weight.grad = None
        total = torch.zeros(16, 32)
        for x in xs:
            fresh.weight.grad = None
            fresh(x).float().sum().backward()
            total += fresh.weight.grad
        assert torch.allclose(accumulator, total, rtol=1e-6, atol=1e-5)
        # The GEMM added into it itself: the layer's node hands autograd no weight gradient to add.
        handed = []
        y = layer(xs[0])
        y.grad_fn.register_hook(lambda grad_inputs, _: handed.append(grad_inputs[1]))
        y.float().sum().backward()
        assert handed == [None]


def test_autocast_and_16_bit_weights() -> None:
    torch.manual_seed(3)
    layer = mixprec.nn.Int8Linear(64, 32)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = nn.functional.linear(x, layer.weight, layer.bias)
    assert rel(y.float(), ref) < 0.03
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    with pytest.raises(RuntimeError, match="input and weight must share a dtype"):
        layer(x.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_computes_as_the_16_bit_layer_does(dtype: torch.dtype) -> None:
    """Under autocast the layer computes exactly what it computes on the operands cast by hand: the integer
    GEMM's exact sums must not run under autocast, which made them fp16 (inf past 65504: every output of an
    fp16-autocast layer was inf on the CPU) or bf16 (rounded sums)."""
    torch.manual_seed(8)
    layer = mixprec.nn.Int8Linear(64, 32)
    x = torch.randn(8, 64) * 3
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    by_hand = copy.deepcopy(layer).to(dtype)(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.equal(y, by_hand)


def test_state_dict_pickle_convert_and_repr() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    keys = set(model.state_dict())
    mixprec.nn.convert(model, int8=True)
    assert type(model[0]) is mixprec.nn.Linear and type(model[4]) is mixprec.nn.Linear  # edges stay
    assert type(model[2]) is mixprec.nn.Int8Linear and model[2].gemms == Int8Gemms()
    assert set(model.state_dict()) == keys
    assert "int8_forward=True" in repr(model[2])
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(4, 16)
    assert torch.equal(clone(x), model(x))
    clone(x).sum().backward()
    assert clone[2].weight.grad.dtype == torch.float32
    every = mixprec.nn.convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), int8=Int8Gemms(weight_grad=True),
                               filter=lambda n, m: True)
    assert all(type(m) is mixprec.nn.Int8Linear and m.gemms.weight_grad for m in every)
    with pytest.raises(ValueError, match="pass fp8= or int8=, not both"):
        mixprec.nn.convert(nn.Linear(8, 8), fp8=mixprec.fp8.Recipe(), int8=True)


def _train_on_text(name: str | None) -> float:
    """The text run (text_training.py) with the blocks' MLPs as Int8Linear with GEMMS[name] (None: bf16)."""
    def convert(model: nn.Module) -> None:
        mixprec.nn.convert(model, int8=GEMMS[name], filter=lambda n, m: n.startswith("blocks."))
        assert sum(isinstance(m, mixprec.nn.Int8Linear) for m in model.modules()) == 4

    return train_on_text(None if name is None else ("int8", name), None if name is None else convert)


@pytest.mark.parametrize("name", ["switchback", "all"])
def test_small_transformer_on_real_text_within_2_percent_of_bf16(name: str) -> None:
    baseline = _train_on_text(None)
    assert baseline < 3.2  # it learns: ln(256) = 5.5 at the start
    final = _train_on_text(name)
    assert abs(final - baseline) <= 0.02 * baseline, (final, baseline)


def test_torch_compile_fullgraph_matches_eager_bit_for_bit() -> None:
    torch.manual_seed(5)
    layer = mixprec.nn.Int8Linear(64, 32)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(2):
        x = torch.randn(16, 64)
        y = compiled(x)
        y.sum().backward()
        z = twin(x)
        z.sum().backward()
        assert torch.equal(y, z)
    assert torch.equal(layer.weight.grad, twin.weight.grad)


def test_torch_compile_with_dynamic_batch_sizes() -> None:
    """Two batch sizes under dynamic=True: the layer traces with a symbolic token count."""
    torch.manual_seed(7)
    layer = mixprec.nn.Int8Linear(64, 32, gemms=Int8Gemms(weight_grad=True))
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, dynamic=True)
    for tokens in (16, 24):
        x = torch.randn(tokens, 64)
        y, z = compiled(x), twin(x)
        y.sum().backward()
        z.sum().backward()
        assert torch.equal(y, z)
    assert torch.equal(layer.weight.grad, twin.weight.grad)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", list(GEMMS))
def test_weight_cache_across_micro_batches_changes_nothing(name: str, autocast: bool) -> None:
    """is_first_microbatch=True quantizes the weight (both INT8 operands) and keeps it, False reuses it: with
    the weight unchanged within a cycle, every output and gradient bit equals the uncached run's."""
    torch.manual_seed(3)
    a = mixprec.nn.Int8Linear(64, 48, gemms=GEMMS[name])
    b = copy.deepcopy(a)
    dtype = torch.bfloat16 if autocast else torch.float32
    xs = [torch.randn(16, 64) for _ in range(3)]
    gs = [torch.randn(16, 48, dtype=dtype) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = accumulate_cycle(a, xs, gs, cached=False) + [a.bias.grad.clone()]
        cached = accumulate_cycle(b, xs, gs, cached=True) + [b.bias.grad.clone()]
    for got, want in zip(cached, plain):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_weight_cache_double_backward_matches_uncached() -> None:
    """Under create_graph a 16-bit input gradient reads the weight through a differentiable cast either way
    (the cached path casts the saved weight in backward, the uncached one the weight forward was given), so
    both give the same gradient and the same second-order path to the weight."""
    torch.manual_seed(9)
    layer = mixprec.nn.Int8Linear(32, 16, gemms=Int8Gemms(input_grad=False))
    x, g = torch.randn(8, 32), torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for cached in (False, True):
        if cached:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # filled as it is reused
                layer(x, is_first_microbatch=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xi, is_first_microbatch=False) if cached else layer(xi)
        (gx,) = torch.autograd.grad(out, xi, g, create_graph=True)
        gw, gg = torch.autograd.grad(gx.float().sum(), (layer.weight, g), allow_unused=True)
        results.append((gx.detach(), gw, gg))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])
    assert results[0][1] is not None and torch.equal(results[0][1], results[1][1])
    # d/dW of sum(g @ W) is the column sums of g, broadcast over W's input features (a bf16 product: rounded once).
    torch.testing.assert_close(results[0][1], g.detach().float().sum(0)[:, None].expand(16, 32), rtol=2**-8, atol=0)


@pytest.mark.parametrize("cls", ["Int8Linear", "Float8Linear"])
@pytest.mark.parametrize("change", ["reset_parameters", "load_state_dict"])
def test_a_new_weight_drops_the_weight_cache(cls: str, change: str) -> None:
    """reset_parameters and load_state_dict replace the weight's values: a kept quantization of the old weight
    would be reused silently by is_first_microbatch=False (Int8Linear kept it through both, Float8Linear through
    a load). The next reuse is refused, as after a move or a cast."""
    torch.manual_seed(0)
    layer = getattr(mixprec.nn, cls)(32, 16)
    other = getattr(mixprec.nn, cls)(32, 16)
    layer(torch.randn(4, 32), is_first_microbatch=True)
    if change == "reset_parameters":
        layer.reset_parameters()
    else:
        layer.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="is_first_microbatch=False reuses the weight quantized by an earlier call"):
        layer(torch.randn(4, 32), is_first_microbatch=False)


def test_weight_cache_is_used_and_checked() -> None:
    torch.manual_seed(4)
    layer = mixprec.nn.Int8Linear(32, 16)
    x, g = torch.randn(8, 32), torch.randn(8, 16)
    # Filled under bf16 autocast it holds codes of the bf16 weight: a call outside autocast would quantize the
    # fp32 weight, so reusing it there is refused (and back under autocast it serves).
    under_autocast = copy.deepcopy(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        filled = under_autocast(x, is_first_microbatch=True)
    with pytest.raises(ValueError, match="quantized in BFloat16, and this call computes in Float"):
        under_autocast(x, is_first_microbatch=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(under_autocast(x, is_first_microbatch=False), filled)
    with pytest.raises(RuntimeError, match="is_first_microbatch=True"):
        layer(x, is_first_microbatch=False)
    x1 = x.clone().requires_grad_()
    first = layer(x1, is_first_microbatch=True)
    first.backward(g)
    with torch.no_grad():
        layer.weight.mul_(2)  # not read again until the next True: neither operand is quantized from it
    x2 = x.clone().requires_grad_()
    again = layer(x2, is_first_microbatch=False)
    again.backward(g)
    assert torch.equal(again, first) and torch.equal(x2.grad, x1.grad)
    assert not torch.equal(layer(x, is_first_microbatch=True), first)
    assert not torch.equal(layer(x), first)
    layer.to(torch.bfloat16)  # a cast empties the cache
    with pytest.raises(RuntimeError, match="there was none"):
        layer(x.bfloat16(), is_first_microbatch=False)
    # The functional form: the operands by row (forward) and by column (input gradient), checked against the
    # weight they are used with.
    cache: list[torch.Tensor] = []
    mixprec.nn.int8_linear(x.bfloat16(), layer.weight, None, Int8Gemms(), cache)
    # The fifth, empty, names the dtype the weight was quantized in.
    assert [t.dtype for t in cache] == [torch.int8, torch.float32, torch.int8, torch.float32, torch.bfloat16]
    assert [tuple(t.shape) for t in cache] == [(16, 32), (16, 1), (16, 32), (1, 32), (0,)]
    rows, cols = int8.quantize(layer.weight, (1, -1)), int8.quantize(layer.weight, (-1, 1))
    assert torch.equal(cache[0], rows.data) and torch.equal(cache[1], rows.scale_inv)
    assert torch.equal(cache[2], cols.data) and torch.equal(cache[3], cols.scale_inv)
    other = torch.randn(16, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight cache does not hold"):
        mixprec.nn.int8_linear(torch.randn(8, 48).bfloat16(), other, None, Int8Gemms(), cache)
    with pytest.raises(ValueError, match="five tensors"):
        mixprec.nn.int8_linear(x.bfloat16(), layer.weight, None, Int8Gemms(), cache[:2])
    # Only the INT8 GEMMs' operands are kept; a 16-bit input gradient reads the weight as it is then.
    cache = []
    forward_only = Int8Gemms(input_grad=False)
    mixprec.nn.int8_linear(x.bfloat16(), layer.weight, None, forward_only, cache)
    assert cache[2].numel() == 0 and cache[3].numel() == 0
    x3 = x.bfloat16().requires_grad_()
    mixprec.nn.int8_linear(x3, layer.weight, None, forward_only, cache).backward(g.bfloat16())
    assert torch.equal(x3.grad, g.bfloat16() @ layer.weight)
    # A copy (or a pickle) leaves the cache behind: it is derived from the weight.
    layer(x.bfloat16(), is_first_microbatch=True)
    with pytest.raises(RuntimeError, match="there was none"):
        copy.deepcopy(layer)(x.bfloat16(), is_first_microbatch=False)
    with pytest.raises(RuntimeError, match="there was none"):
        pickle.loads(pickle.dumps(layer))(x.bfloat16(), is_first_microbatch=False)


def test_opcheck() -> None:
    torch.manual_seed(6)
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for grad in (True, False):
        x, w, b = (torch.randn(*shape, requires_grad=grad) for shape in ((8, 32), (16, 32), (16,)))
        for gemms in GEMMS.values():
            args = (x, w, b, gemms.forward, gemms.input_grad, gemms.weight_grad)
            torch.library.opcheck(torch.ops.mixprec.int8_linear.default, args, test_utils=no_schema)
            filled = torch.ops.mixprec.int8_linear_cached(*args, [])[1]
            for cache in ([], filled):
                torch.library.opcheck(torch.ops.mixprec.int8_linear_cached.default, (*args, cache),
                                      test_utils=no_schema)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device: str) -> None:
    layer = mixprec.nn.Int8Linear(32, 16, device=device)
    with pytest.raises(RuntimeError, match="float64 input or weight has no INT8 path"):
        layer(torch.randn(4, 32, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="do not match"):
        layer(torch.randn(4, 31, device=device))
