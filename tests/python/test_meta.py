"""The meta device: the ops' C++ Meta kernels (csrc/ops/meta.cpp, also the fake kernels torch.compile traces
with) against what the CPU kernels return, and the module lifecycle torch's layers support on meta tensors
(deferred initialisation with to_empty + reset_parameters, loading with assign=True, shape inference), side by
side with the same flow on the CPU."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch import nn

import mixprec
from mixprec import fp8, qat

ops = torch.ops.mixprec
E4M3 = torch.float8_e4m3fn


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _outputs(result: Any) -> list[torch.Tensor]:
    if result is None:
        return []
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _fp8(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols).to(E4M3)


# (name, arguments on the CPU): every kernel op with outputs, in shapes where a rule could go wrong (odd sizes,
# more than two dimensions, partial blocks, a transposed copy, an empty batch).
FUNCTIONAL: list[tuple[str, Callable[[], tuple]]] = [
    ("unscale_and_check_sumsq_", lambda: ([torch.randn(3, 5)], torch.zeros(1), torch.ones(1))),
    ("grad_stats", lambda: ([torch.randn(7), torch.randn(2, 3)], torch.ones(1), -40, 17)),
    ("cast", lambda: (torch.randn(4, 6).t(), torch.bfloat16)),
    ("cast", lambda: (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.float16)),
    ("split_bf16_remainder", lambda: (torch.randn(3, 7),)),
    ("merge_bf16_remainder", lambda: (torch.randn(3, 7).bfloat16(), torch.zeros(3, 7, dtype=torch.int16))),
    ("linear_wgrad", lambda: (torch.randn(2, 3, 5), torch.randn(2, 3, 7))),
    ("linear_wgrad", lambda: (torch.randn(0, 5), torch.randn(0, 7))),
    ("fp8_quantize", lambda: (torch.randn(2, 3, 5), torch.ones(1), E4M3, "nearest", True, None, True)),
    ("fp8_quantize", lambda: (torch.randn(4, 6), torch.ones(1), torch.float8_e5m2)),
    ("fp8_quantize_blockwise", lambda: (torch.randn(130, 300), E4M3, 128, 128)),
    ("fp8_quantize_blockwise", lambda: (torch.randn(3, 4, 200), E4M3, 1, 128)),
    ("fp8_quantize_blockwise", lambda: (torch.randn(5, 9), E4M3, -1, -1)),
    ("fp8_gemm", lambda: (_fp8(5, 32), _fp8(3, 32), torch.ones(1), torch.ones(1), torch.bfloat16)),
    ("fp8_dequantize", lambda: (_fp8(5, 32), torch.ones(5, 1))),
    ("int8_quantize", lambda: (torch.randn(6, 10), 4, -1)),
    ("int8_quantize", lambda: (torch.randn(2, 3, 10), 1, 3)),
    ("int8_mm", lambda: (torch.ones(5, 16, dtype=torch.int8), torch.ones(16, 3, dtype=torch.int8), torch.ones(5, 1),
                         torch.ones(1, 3), torch.float16)),
    ("fake_quantize_forward", lambda: (torch.randn(4, 6).bfloat16(), torch.full((2, 1), 0.1), -127, 127, 2, -1)),
    ("fake_quantize_backward", lambda: (torch.randn(4, 6), torch.randn(4, 6), torch.full((1, 1), 0.1), -127, 127, -1,
                                        -1, True)),
    ("fake_quantize_backward", lambda: (torch.randn(4, 6), torch.randn(4, 6), torch.full((1, 1), 0.1), -127, 127, -1,
                                        -1, False)),
]


@pytest.mark.parametrize("name, make", FUNCTIONAL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUNCTIONAL)])
def test_meta_kernels_describe_what_the_cpu_kernels_return(name: str, make: Callable[[], tuple]) -> None:
    """Shape, dtype and strides of every output, from the C++ Meta kernel, equal the CPU kernel's real ones."""
    args = make()
    real = _outputs(getattr(ops, name)(*args))
    meta = _outputs(getattr(ops, name)(*_to_meta(args)))
    assert len(meta) == len(real)
    for m, r in zip(meta, real):
        assert m.is_meta
        assert (m.shape, m.dtype, m.stride()) == (r.shape, r.dtype, r.stride())


IN_PLACE: list[tuple[str, Callable[[], tuple]]] = [
    ("unscale_and_check_", lambda: ([torch.randn(3)], torch.zeros(1), torch.ones(1))),
    ("update_scale_", lambda: (torch.ones(1), torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                               torch.zeros(1), 2.0, 0.5, 10)),
    ("cast_", lambda: ([torch.empty(3, dtype=torch.bfloat16)], [torch.randn(3)])),
    ("adam_step_", lambda: ([torch.randn(3)], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                            [torch.zeros(1)], 1e-3, 0.9, 0.999, 1e-8, 0.0)),
    ("linear_wgrad_accum_", lambda: (torch.zeros(5, 7), torch.randn(3, 5), torch.randn(3, 7))),
    ("fp8_update_scales_", lambda: (torch.zeros(4, 2), torch.ones(2), torch.ones(2), E4M3)),
    ("fp8_gemm_accum_", lambda: (torch.zeros(5, 3), _fp8(5, 32), _fp8(3, 32), torch.ones(1), torch.ones(1))),
]


@pytest.mark.parametrize("name, make", IN_PLACE, ids=[n for n, _ in IN_PLACE])
def test_in_place_ops_run_on_meta_tensors_and_refuse_a_mix_with_real_ones(name: str, make: Callable[[], tuple]) -> None:
    args = make()
    assert getattr(ops, name)(*_to_meta(args)) is None
    # The first tensor argument stays on the CPU, the rest go to meta: the dispatcher picks the Meta kernel, which
    # refuses the mix by name instead of describing outputs of memory that was never computed.
    first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) or isinstance(a, list) and a)
    mixed = list(_to_meta(args))
    mixed[first] = args[first]
    with pytest.raises(RuntimeError, match=f"mixprec::{name}: every tensor must be on one device, got meta tensors "
                                           "with cpu ones"):
        getattr(ops, name)(*mixed)


def test_meta_kernels_check_the_arguments_an_output_is_shaped_by() -> None:
    """The arguments the outputs' dtype or shape come from are refused on meta tensors (so at trace time) by the
    kernels' own checks, with their messages."""
    x = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="mixprec::fp8_quantize: dtype must be torch.float8_e4m3fn"):
        ops.fp8_quantize(x, torch.ones(1, device="meta"), torch.float16)
    with pytest.raises(ValueError, match="mixprec::int8_quantize: block_rows must be positive or -1"):
        ops.int8_quantize(x, 0, -1)
    with pytest.raises(ValueError, match="mixprec::fp8_gemm: out_dtype must be float32, bfloat16 or float16"):
        a = torch.empty(4, 16, device="meta", dtype=E4M3)
        ops.fp8_gemm(a, a, torch.ones(1, device="meta"), torch.ones(1, device="meta"), torch.int32)
    with pytest.raises(RuntimeError, match=r"mixprec::grad_stats: num_bins must be in \[1, 4096\]"):
        ops.grad_stats([x], torch.ones(1, device="meta"), -40, 0)
    with pytest.raises(RuntimeError, match="mixprec::cast: dtype must be float32, float16 or bfloat16, got Double"):
        ops.cast(x, torch.float64)
    with pytest.raises(RuntimeError, match="mixprec::linear_wgrad: grad_output and input must have the same leading"):
        ops.linear_wgrad(x, torch.empty(3, 5, device="meta"))
    with pytest.raises(RuntimeError, match="mixprec::merge_bf16_remainder: bf16 has shape"):
        ops.merge_bf16_remainder(x.bfloat16(), torch.empty(4, 9, device="meta", dtype=torch.int16))
    with pytest.raises(RuntimeError, match="mixprec::fp8_dequantize: data must be a 2-D matrix, got 3 dimensions"):
        ops.fp8_dequantize(torch.empty(2, 4, 8, device="meta", dtype=E4M3), torch.ones(1, device="meta"))
    with pytest.raises(RuntimeError, match="mixprec::int8_mm: b must be int8, got Float"):
        ops.int8_mm(torch.empty(4, 8, device="meta", dtype=torch.int8), x.t(), torch.ones(1, device="meta"),
                    torch.ones(1, device="meta"), torch.float32)


def test_dynamic_shapes_trace_through_the_meta_kernels() -> None:
    """torch.compile(dynamic=True) traces with symbolic sizes: one graph serves every batch size, with the
    results eager gives."""
    def f(x: torch.Tensor) -> torch.Tensor:
        q, s = mixprec.int8.quantize(x, (1, -1))
        data, scale_inv = fp8.quantize_blockwise(x, E4M3, (1, 128))
        return q.float() * s + fp8.dequantize(data, scale_inv).sum(-1, keepdim=True)

    compiled = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (3, 5, 9):
        x = torch.randn(rows, 200)
        assert torch.equal(compiled(x), f(x))


def test_data_dependent_sizes_trace_as_torchs_matmul() -> None:
    """Operands whose batch sizes come from separate nonzero() calls: the Meta kernels' shape checks become runtime
    assertions (expect_true), as torch's own mm traces them, instead of guards the trace cannot make."""
    import torch._dynamo

    def wgrad(m1: torch.Tensor, m2: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_wgrad(g[m1.nonzero().squeeze(1)], x[m2.nonzero().squeeze(1)])

    def merge(m1: torch.Tensor, m2: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return ops.merge_bf16_remainder(b[m1.nonzero().squeeze(1)], r[m2.nonzero().squeeze(1)])

    m = torch.tensor([True, False, True, True])
    cases = [(wgrad, (m, m.clone(), torch.randn(4, 3), torch.randn(4, 5))),
             (merge, (m, m.clone(), torch.randn(4, 3).bfloat16(), torch.zeros(4, 3, dtype=torch.int16)))]
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for fn, args in cases:
            torch._dynamo.reset()
            assert torch.equal(torch.compile(fn, backend="eager", fullgraph=True)(*args), fn(*args))


# -- layers on the meta device ------------------------------------------------------------------------------------


def _layers() -> dict[str, Callable[[], nn.Module]]:
    def qat_model(config: qat.QATConfig, conv: bool) -> nn.Module:
        if conv:
            return qat.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), config)
        return qat.prepare(nn.Sequential(nn.Linear(16, 8)), config)

    las = qat.QATConfig(learnable_scales=True, learnable_activation_scales=True)
    return {
        "Linear": lambda: mixprec.nn.Linear(16, 8),
        "Float8Linear": lambda: mixprec.nn.Float8Linear(16, 8),
        "Int8Linear": lambda: mixprec.nn.Int8Linear(16, 8),
        "QATLinear": lambda: qat_model(qat.QATConfig(), False),
        "QATLinear-learnable": lambda: qat_model(las, False),
        "QATConv2d-folded": lambda: qat_model(qat.QATConfig(fold_batchnorm=True), True),
        "QATConv2d-learnable": lambda: qat_model(las, True),
        "QuantizedLinear": lambda: qat.convert(qat_model(qat.QATConfig(), False)),
        "QuantizedConv2d": lambda: qat.convert(qat_model(qat.QATConfig(), True)),
    }


@pytest.mark.parametrize("kind", [*_layers(), "Policy-mixed"])
def test_every_layer_runs_on_meta_tensors_as_on_real_ones(kind: str) -> None:
    """Shape inference (and FlopCounterMode on a meta model): a model built on the meta device runs forward and
    backward, with the shapes, dtypes and FLOP count of the same model on the CPU. (autocast has no state for the
    meta device; the layers asked torch about it, which threw.)"""
    if kind == "Policy-mixed":  # a mixed policy's hooks ask autocast about the outputs' device
        def make() -> nn.Module:
            model = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
            return mixprec.Policy("mixed_bfloat16").apply(model)
    else:
        make = _layers()[kind]
    torch.manual_seed(0)
    real = make()
    with torch.device("meta"):
        meta = make()
    conv = "Conv2d" in kind
    x = torch.randn(2, 3, 6, 6) if conv else torch.randn(4, 16)
    counts = []
    for model, inp in ((real, x), (meta, x.to("meta"))):
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            out = model(inp)
            if any(p.requires_grad for p in model.parameters()):
                out.float().sum().backward()
        counts.append(counter.get_total_flops())
        assert out.is_meta == (model is meta)
        if model is real:
            expected = (out.shape, out.dtype)
        else:
            assert (out.shape, out.dtype) == expected
    assert counts[0] == counts[1]


@pytest.mark.parametrize("config", [
    qat.QATConfig(learnable_scales=True),
    qat.QATConfig(learnable_activation_scales=True),
    qat.QATConfig(learnable_scales=True, learnable_activation_scales=True, fold_batchnorm=True),
], ids=["weight-steps", "input-steps", "folded"])
def test_deferred_initialisation_starts_the_qat_steps_as_prepare_does(config: qat.QATConfig) -> None:
    """prepare on the meta device, to_empty, reset_parameters on every module (torch's deferred initialisation):
    the same steps, outputs and gradients as the model built and prepared on the CPU from the same seed. The
    learnable steps held uninitialised memory after to_empty; reset_parameters left them there."""
    def make() -> nn.Module:
        return qat.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(8 * 36, 10)), config)

    torch.manual_seed(0)
    eager = make()
    with torch.device("meta"):
        deferred = make()
    deferred.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in deferred.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert eager.state_dict().keys() == deferred.state_dict().keys()
    for (name, a), b in zip(eager.state_dict().items(), deferred.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, 6, 6)
    outs = [m(x) for m in (eager, deferred)]
    assert torch.equal(outs[0], outs[1])
    for out in outs:
        out.sum().backward()
    for (name, a), b in zip(eager.named_parameters(), deferred.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_reset_parameters_restarts_the_steps_of_a_trained_qat_layer() -> None:
    """The steps start from the new weight, as prepare starts them: a reset layer equals a freshly prepared one."""
    config = qat.QATConfig(learnable_scales=True, learnable_activation_scales=True)
    layer = qat.prepare(nn.Sequential(nn.Linear(16, 8)), config)[0]
    layer(torch.randn(4, 16))  # sets the input step
    with torch.no_grad():
        layer.weight_step.mul_(3.0)
    weight_step = layer.weight_step
    layer.reset_parameters()
    assert layer.weight_step is weight_step  # in place: an optimizer keeps its tensor
    fresh = qat.prepare(nn.Sequential(nn.Linear(16, 8)), config)[0]
    fresh.load_state_dict({"weight": layer.weight, "bias": layer.bias}, strict=False)
    assert torch.equal(layer.weight_step, fresh.weight_step)
    assert torch.equal(layer.input_step, torch.zeros(1))


@pytest.mark.parametrize("config", [qat.QATConfig(learnable_scales=True),
                                    qat.QATConfig(learnable_activation_scales=True)], ids=["weight", "input"])
def test_a_meta_prepared_model_loads_a_plain_checkpoint_with_assign(config: qat.QATConfig) -> None:
    """prepare on meta, then load_state_dict(plain checkpoint, assign=True): the steps restart on the checkpoint's
    device (they stayed on meta, and the next forward failed), as the CPU-prepared model's."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 8))
    with torch.device("meta"):
        deferred = qat.prepare(nn.Sequential(nn.Linear(16, 8)), config)
    deferred.load_state_dict(plain.state_dict(), assign=True)
    eager = qat.prepare(copy.deepcopy(plain), config)
    for (name, a), b in zip(eager.state_dict().items(), deferred.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a, b), name
    x = torch.randn(4, 16)
    assert torch.equal(eager(x), deferred(x))


def test_skip_init_builds_a_mixprec_linear() -> None:
    """torch.nn.utils.skip_init reads the constructor's signature for `device`."""
    layer = torch.nn.utils.skip_init(mixprec.nn.Linear, 16, 8, bias=False)
    assert type(layer) is mixprec.nn.Linear and layer.weight.shape == (8, 16) and layer.bias is None
    assert layer.weight.grad_dtype == torch.float32


@pytest.mark.parametrize("make", [lambda: mixprec.nn.Linear(4, 4), lambda: mixprec.nn.Float8Linear(16, 16),
                                  lambda: mixprec.nn.Int8Linear(16, 16),
                                  lambda: qat.prepare(nn.Sequential(nn.Linear(4, 4)))[0],
                                  lambda: qat.convert(qat.prepare(nn.Sequential(nn.Conv2d(2, 4, 3))))[0]],
                         ids=["Linear", "Float8Linear", "Int8Linear", "QATLinear", "QuantizedConv2d"])
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:FutureWarning")
def test_torchscript_is_refused_by_name(make: Callable[[], nn.Module]) -> None:
    """torch.jit.script calls __prepare_scriptable__ on every submodule first: a clear error naming the layer
    instead of TorchScript's internal ones."""
    layer = make()
    model = nn.Sequential(nn.Linear(4, 4), layer) if isinstance(layer, mixprec.nn.Linear) else layer
    with pytest.raises(RuntimeError, match=f"{type(layer).__qualname__}: torch.jit.script cannot compile mixprec's "
                                           "layers .* Use torch.compile or torch.export"):
        torch.jit.script(model)
