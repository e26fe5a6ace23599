"""What the documentation promises when an argument is left out, and the contracts of small helpers (return types,
argument checks, copies), checked by behaviour: each test here failed under a mutation of the Python layer that
the rest of the suite let pass (stop 44's mutation probe of ops.py, fp8.py, int8.py and nn.py)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import pytest
import torch

import mixprec
from mixprec import fp8, int8, ops


# -- ops ----------------------------------------------------------------------------------------------------------

def test_grad_stats_bins_start_at_two_to_the_minus_40_by_default() -> None:
    """The default histogram has 64 bins of exponents -40 to 23 (``min_exponent=-40``); the end bins also take
    what lies beyond them."""
    g = torch.tensor([2.0**-40, 2.0**-39, 2.0**-41, 2.0**23, 2.0**30])
    row = ops.grad_stats([g], torch.ones(1))[0]
    hist = row[8:]
    assert hist.numel() == 64
    assert hist[:3].tolist() == [2.0, 1.0, 0.0] and hist[63].item() == 2.0 and hist.sum().item() == 5.0
    assert torch.equal(row, ops.grad_stats([g], torch.ones(1), min_exponent=-40, num_bins=64)[0])


def test_adam_step_is_adamw_unless_told_otherwise() -> None:
    """``adam_step_`` decouples weight decay by default (AdamW), as ``torch.optim.AdamW`` steps."""
    p, g = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5])
    m, v, step = torch.zeros(2), torch.zeros(2), torch.zeros(1)
    ops.adam_step_([p], [g], [m], [v], [], [step], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5)
    ref = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    ref.grad = g.double()
    torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5).step()
    torch.testing.assert_close(p, ref.detach().float(), rtol=1e-6, atol=0)


def test_split_bf16_remainder_returns_a_tuple() -> None:
    parts = ops.split_bf16_remainder(torch.tensor([1.0, 1.0 + 2.0**-10]))
    assert type(parts) is tuple and len(parts) == 2
    assert torch.equal(ops.merge_bf16_remainder(*parts), torch.tensor([1.0, 1.0 + 2.0**-10]))


class _Recorded(torch.Tensor):
    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("side", ["src", "dst"])
def test_cast_honours_a_tensor_subclass_on_either_side(side: str) -> None:
    """A subclass with ``__torch_function__`` in either list takes the torch.ops path, where its override runs
    (the direct binding would skip it)."""
    dst, src = [torch.empty(4, dtype=torch.float16)], [torch.full((4,), 1.5)]
    if side == "src":
        src = [src[0].as_subclass(_Recorded)]
    else:
        dst = [dst[0].as_subclass(_Recorded)]
    _Recorded.seen = []
    ops.cast_(dst, src)
    assert _Recorded.seen == ["mixprec.cast_.default"]
    assert torch.equal(dst[0].as_subclass(torch.Tensor), torch.full((4,), 1.5, dtype=torch.float16))


# -- fp8 ----------------------------------------------------------------------------------------------------------

def test_a_default_recipe_is_transformer_engines_and_frozen() -> None:
    """``Recipe()`` keeps 16 amaxes of history and accumulates fast; a recipe cannot change after its checks ran
    (frozen) and serves as a dict key (hashable)."""
    recipe = fp8.Recipe()
    assert recipe.amax_history_len == 16 and recipe.fast_accum
    state = torch.ops.mixprec.fp8_scaling_state("delayed", recipe.amax_history_len, torch.empty(0))
    assert state[0].shape == (16, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.margin = 99  # type: ignore[misc]
    assert hash(recipe) == hash(fp8.Recipe()) and {recipe: 1}[fp8.Recipe()] == 1


def test_quantize_blockwise_defaults_to_one_saturating_scale_per_tensor() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q = fp8.quantize_blockwise(x)
    assert q.scale_inv.shape == (1, 1)
    explicit = fp8.quantize_blockwise(x, block=(-1, -1))
    assert torch.equal(q.scale_inv, explicit.scale_inv) and torch.equal(q.data.float(), explicit.data.float())
    inf = fp8.quantize_blockwise(torch.tensor([[1.0, math.inf]]), torch.float8_e4m3fn)
    assert inf.data.float().tolist() == [[1.0, 448.0]]  # saturated, not NaN


@pytest.mark.parametrize("quantize", [fp8.quantize_blockwise, int8.quantize])
def test_a_block_of_other_than_two_sizes_is_refused(quantize) -> None:  # noqa: ANN001
    for block in ((1, 2, 3), (4,)):
        with pytest.raises(ValueError, match=r"block must be \(block_rows, block_cols\)"):
            quantize(torch.ones(4, 4), block=block)


def test_update_scales_updates_the_forward_side_by_default() -> None:
    """With ``turn`` showing the backward side updated last, a call that names no side updates the forward one
    (side 0): scale = 448 / 2 (history max 2, margin 0) and the turn passes to the backward side."""
    hist, scale, scale_inv, turn = torch.tensor([[2.0], [0.0]]), torch.ones(1), torch.ones(1), torch.ones(1)
    fp8.update_scales_(hist, scale, scale_inv, turn=turn)
    assert scale.tolist() == [224.0] and turn.tolist() == [0.0]
    assert torch.equal(scale_inv, torch.tensor([1 / 224.0]))  # the float32 reciprocal


def test_fp8_gemm_returns_bfloat16_by_default() -> None:
    a = fp8.quantize(torch.ones(16, 16), torch.ones(1)).data
    assert fp8.gemm(a, a, torch.ones(1), torch.ones(1)).dtype == torch.bfloat16


# -- int8 ---------------------------------------------------------------------------------------------------------

def test_int8_quantize_scales_by_amax_over_127_by_default() -> None:
    """Not a power of two unless asked: the row's largest magnitude maps to exactly 127."""
    q = int8.quantize(torch.tensor([[1.0, -3.0]]))
    assert q.scale_inv.tolist() == [[torch.tensor(3.0 / 127).item()]]
    assert q.data.tolist() == [[42, -127]]


def test_fake_quantize_is_symmetric_by_default() -> None:
    y = int8.fake_quantize(torch.tensor([-128.0, -127.0, 127.0, 128.0]), torch.ones(1))
    assert y.tolist() == [-127.0, -127.0, 127.0, 127.0]


# -- nn -----------------------------------------------------------------------------------------------------------

def test_int8_gemms_default_to_switchback() -> None:
    """SwitchBack: the forward and input-gradient GEMMs in INT8, the weight gradient not."""
    assert mixprec.nn.Int8Gemms() == mixprec.nn.Int8Gemms(forward=True, input_grad=True, weight_grad=False)


def test_convert_refuses_an_int8_argument_of_another_type_before_converting() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    with pytest.raises(TypeError, match="int8 must be an Int8Gemms or True, got 'yes'"):
        mixprec.nn.convert(model, int8="yes")
    assert all(type(m) is torch.nn.Linear for m in model)


def test_a_float8_layers_amax_group_is_shared_by_deep_copies_and_left_out_of_pickles() -> None:
    """A process group is neither copyable nor picklable: a deep copy reduces over the same group, a pickle
    carries none (the loader sets it again)."""
    layer = mixprec.nn.Float8Linear(16, 16)
    group = object()  # stands in for a process group: only its identity matters here
    layer.amax_group = group
    assert copy.deepcopy(layer).amax_group is group
    layer.amax_group = None
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.amax_group is None
    layer.amax_group = "WORLD"  # picklable stand-in: still left out
    assert pickle.loads(pickle.dumps(layer)).amax_group is None
