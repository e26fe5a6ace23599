"""linear_wgrad_accum_ / linear_wgrad (the weight gradient in fp32, added in the GEMM or fresh) and
mixprec.nn.Linear/convert (an fp32 weight.grad for 16-bit weights)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mixprec
from mixprec import ops
from conftest import DEVICES, FLOAT_DTYPES, requires_cuda

U32 = 2.0**-24  # unit roundoff of fp32


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def check_against_float64(main_grad: torch.Tensor, before: torch.Tensor, go: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad == before + go^T x up to fp32 GEMM rounding: |err| <= (k + 2) u (|go|^T |x| + |before|)."""
    g, xx = rows(go).double().cpu(), rows(x).double().cpu()
    ref = before.double().cpu() + g.t() @ xx
    bound = (g.shape[0] + 2) * U32 * (g.abs().t() @ xx.abs() + before.double().abs().cpu()) + 1e-30
    err = (main_grad.double().cpu() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, max bound {bound.max().item():.3g}"


SHAPES = {
    "2d": ((37,), 19, 23),
    "3d": ((4, 9), 16, 33),
    "1d": ((), 5, 3),
    "ones": ((1,), 1, 1),
    "long batch": ((1000,), 8, 12),
    "odd": ((3, 1, 7), 17, 129),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("op", ["accumulate", "fresh"])
def test_matches_float64_reference(device: str, dtype: torch.dtype, shape: str, op: str) -> None:
    """linear_wgrad_accum_ adds into an fp32 accumulator; linear_wgrad returns a fresh fp32 gradient."""
    lead, out_f, in_f = SHAPES[shape]
    torch.manual_seed(0)
    go = torch.randn(*lead, out_f, device=device).to(dtype)
    x = torch.randn(*lead, in_f, device=device).to(dtype)
    if op == "accumulate":
        main_grad = torch.randn(out_f, in_f, device=device)
        before = main_grad.clone()
        ops.linear_wgrad_accum_(main_grad, go, x)
    else:
        before = torch.zeros(out_f, in_f)
        main_grad = ops.linear_wgrad(go, x)
        assert main_grad.dtype == torch.float32 and main_grad.shape == (out_f, in_f) and main_grad.device.type == device
    check_against_float64(main_grad, before, go, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_inputs(device: str, dtype: torch.dtype) -> None:
    """Rows with a larger stride are read in place; other layouts are made contiguous first."""
    torch.manual_seed(1)
    n, out_f, in_f = 29, 10, 14
    cases = {
        "row stride > width": (torch.randn(n, out_f + 6, device=device).to(dtype)[:, 3:3 + out_f],
                               torch.randn(n, in_f + 2, device=device).to(dtype)[:, :in_f]),
        "transposed": (torch.randn(out_f, n, device=device).to(dtype).t(), torch.randn(in_f, n, device=device).to(dtype).t()),
        "every other row": (torch.randn(2 * n, out_f, device=device).to(dtype)[::2],
                            torch.randn(2 * n, in_f, device=device).to(dtype)[::2]),
        "permuted 3-d": (torch.randn(out_f, 5, 3, device=device).to(dtype).permute(1, 2, 0),
                         torch.randn(5, in_f, 3, device=device).to(dtype).permute(0, 2, 1)),
    }
    for name, (go, x) in cases.items():
        assert not (go.is_contiguous() and x.is_contiguous()), name
        main_grad = torch.randn(out_f, in_f, device=device)
        before = main_grad.clone()
        go_before, x_before = go.clone(), x.clone()
        ops.linear_wgrad_accum_(main_grad, go, x)
        check_against_float64(main_grad, before, go, x)
        assert torch.equal(go, go_before) and torch.equal(x, x_before), f"{name}: inputs modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 4)], ids=str)
def test_empty_batch_adds_nothing(device: str, lead: tuple[int, ...]) -> None:
    main_grad = torch.randn(6, 5, device=device)
    before = main_grad.clone()
    ops.linear_wgrad_accum_(main_grad, torch.empty(*lead, 6, device=device).bfloat16(),
                            torch.empty(*lead, 5, device=device).bfloat16())
    assert torch.equal(main_grad, before)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_layer(device: str) -> None:
    for out_f, in_f in [(0, 4), (4, 0)]:
        main_grad = torch.zeros(out_f, in_f, device=device)
        ops.linear_wgrad_accum_(main_grad, torch.randn(3, out_f, device=device), torch.randn(3, in_f, device=device))
        assert main_grad.shape == (out_f, in_f)


BAD = {
    "main_grad dtype": (lambda d: (torch.zeros(3, 4, device=d).half(), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d)),
                        "main_grad must be float32"),
    "main_grad not contiguous": (lambda d: (torch.zeros(4, 3, device=d).t(), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d)),
                                 "main_grad must be contiguous"),
    "main_grad shape": (lambda d: (torch.zeros(3, 5, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d)),
                        r"main_grad must have shape \[grad_output.size\(-1\), input.size\(-1\)\] = \[3, 4\]"),
    "main_grad 1-d": (lambda d: (torch.zeros(12, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d)),
                      "main_grad must be 2-D"),
    "mixed dtypes": (lambda d: (torch.zeros(3, 4, device=d), torch.ones(2, 3, device=d).half(), torch.ones(2, 4, device=d).bfloat16()),
                     "input must have grad_output's dtype"),
    "integer operands": (lambda d: (torch.zeros(3, 4, device=d), torch.ones(2, 3, device=d, dtype=torch.int32),
                                    torch.ones(2, 4, device=d, dtype=torch.int32)), "grad_output must be float32, float16 or bfloat16"),
    "float64 operands": (lambda d: (torch.zeros(3, 4, device=d), torch.ones(2, 3, device=d).double(), torch.ones(2, 4, device=d).double()),
                         "grad_output must be float32, float16 or bfloat16"),
    "batch mismatch": (lambda d: (torch.zeros(3, 4, device=d), torch.ones(2, 3, device=d), torch.ones(5, 4, device=d)),
                       "same leading"),
    "rank mismatch": (lambda d: (torch.zeros(3, 4, device=d), torch.ones(2, 3, device=d), torch.ones(1, 2, 4, device=d)),
                      "same number"),
    "sparse input": (lambda d: (torch.zeros(3, 4, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d).to_sparse()),
                     "input must be a dense"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_the_argument_and_writes_nothing(device: str, case: str) -> None:
    make, message = BAD[case]
    main_grad, go, x = make(device)
    before = main_grad.clone()
    with pytest.raises(RuntimeError, match=message):
        ops.linear_wgrad_accum_(main_grad, go, x)
    assert torch.equal(main_grad, before)


@requires_cuda
def test_mixed_devices_are_rejected() -> None:
    with pytest.raises(RuntimeError, match="input is on cpu but main_grad is on cuda"):
        ops.linear_wgrad_accum_(torch.zeros(3, 4, device="cuda"), torch.ones(2, 3, device="cuda"), torch.ones(2, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    go = torch.randn(2, 5, 6, device=device).to(dtype)
    x = torch.randn(2, 5, 3, device=device).to(dtype)
    torch.library.opcheck(torch.ops.mixprec.linear_wgrad_accum_.default, (torch.randn(6, 3, device=device), go, x))


@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_and_cuda_agree(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    go = torch.randn(3, 300, 96).to(dtype)
    x = torch.randn(3, 300, 80).to(dtype)
    main_cpu = torch.randn(96, 80)
    main_cuda = main_cpu.cuda()
    ops.linear_wgrad_accum_(main_cpu, go, x)
    ops.linear_wgrad_accum_(main_cuda, go.cuda(), x.cuda())
    # Both are fp32 GEMMs of the same operands; they differ only in summation order.
    torch.testing.assert_close(main_cuda.cpu(), main_cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_single_row_with_arbitrary_strides(device: str) -> None:
    """A one-row matrix may report any row stride (0, or 1 when transposed); cuBLASLt needs
    a leading dimension >= the width, so the kernel picks one itself."""
    torch.manual_seed(7)
    for dtype in FLOAT_DTYPES:
        g = torch.randn(9, device=device).to(dtype).as_strided((1, 9), (0, 1))
        xx = torch.randn(6, 1, device=device).to(dtype).t()
        assert g.stride() == (0, 1) and xx.stride() == (1, 1)
        main_grad = torch.randn(9, 6, device=device)
        before = main_grad.clone()
        ops.linear_wgrad_accum_(main_grad, g, xx)
        check_against_float64(main_grad, before, g, xx)


@requires_cuda
def test_cuda_graph_capture_and_replay() -> None:
    """Captured into a CUDA graph (which fails if the GEMM ran off the capturing stream), replayed 3x."""
    go = torch.randn(64, 48, device="cuda").bfloat16()
    x = torch.randn(64, 40, device="cuda").bfloat16()
    expected = rows(go).float().t() @ rows(x).float()
    main_grad = torch.zeros(48, 40, device="cuda")
    ops.linear_wgrad_accum_(main_grad, go, x)  # warm-up outside capture: plan cache and workspace
    graph = torch.cuda.CUDAGraph()
    main_grad.zero_()
    with torch.cuda.graph(graph):
        ops.linear_wgrad_accum_(main_grad, go, x)
    main_grad.zero_()
    for _ in range(3):
        graph.replay()
    torch.testing.assert_close(main_grad, 3 * expected, rtol=1e-5, atol=1e-4)


# ---- linear_wgrad: the same GEMM into a fresh fp32 tensor ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_linear_wgrad_non_contiguous_empty_and_bad_input(device: str) -> None:
    torch.manual_seed(11)
    go = torch.randn(7, 20, device=device).bfloat16()[:, 2:12]
    x = torch.randn(9, 7, device=device).bfloat16().t()
    check_against_float64(ops.linear_wgrad(go, x), torch.zeros(10, 9), go, x)
    for lead in [(0,), (3, 0)]:
        empty = ops.linear_wgrad(torch.empty(*lead, 6, device=device), torch.empty(*lead, 5, device=device))
        assert empty.shape == (6, 5) and not empty.any()
    assert ops.linear_wgrad(torch.ones(3, 0, device=device), torch.ones(3, 4, device=device)).shape == (0, 4)
    for make, message in [BAD[k] for k in ("mixed dtypes", "integer operands", "batch mismatch", "rank mismatch",
                                           "sparse input")]:
        _, g, i = make(device)
        with pytest.raises(RuntimeError, match=message):
            ops.linear_wgrad(g, i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_wgrad_opcheck(device: str, dtype: torch.dtype) -> None:
    go = torch.randn(2, 5, 6, device=device).to(dtype)
    x = torch.randn(2, 5, 3, device=device).to(dtype)
    torch.library.opcheck(torch.ops.mixprec.linear_wgrad.default, (go, x))


@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_wgrad_cpu_and_cuda_agree(dtype: torch.dtype) -> None:
    torch.manual_seed(12)
    go = torch.randn(3, 300, 96).to(dtype)
    x = torch.randn(3, 300, 80).to(dtype)
    # Both are fp32 GEMMs of the same operands; they differ only in summation order.
    torch.testing.assert_close(ops.linear_wgrad(go.cuda(), x.cuda()).cpu(), ops.linear_wgrad(go, x), rtol=1e-5,
                               atol=1e-4)


# ---- the accumulation benefit -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_64_bf16_micro_batches_stay_within_fp32_rounding(device: str) -> None:
    """weight.grad (fp32) stays within fp32 rounding of the float64 sum; bf16 .grad accumulation is far worse.
    From the second micro-batch on the GEMM adds into weight.grad in place (the same tensor throughout)."""
    torch.manual_seed(3)
    out_f, in_f, batch, micro_batches = 48, 40, 16, 64
    plain = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    fused = mixprec.nn.convert(copy.deepcopy(plain))
    exact = torch.zeros(out_f, in_f, dtype=torch.float64)
    addresses = set()
    for _ in range(micro_batches):
        x = torch.randn(batch, in_f, device=device).bfloat16()
        upstream = torch.randn(batch, out_f, device=device).bfloat16()
        plain(x).backward(upstream)
        fused(x).backward(upstream)
        exact += upstream.double().cpu().t() @ x.double().cpu()
        addresses.add(fused.weight.grad.data_ptr())
    assert fused.weight.grad.dtype == torch.float32 and plain.weight.grad.dtype == torch.bfloat16
    assert len(addresses) == 1  # accumulated in place, never replaced
    scale = exact.abs().max().item()
    fused_error = (fused.weight.grad.double().cpu() - exact).abs().max().item() / scale
    bf16_error = (plain.weight.grad.double().cpu() - exact).abs().max().item() / scale
    # fp32: (batch products + micro_batches adds) * 2^-24 ~ 5e-6 at the very worst.
    assert fused_error < 5e-6, fused_error
    # bf16 keeps 8 bits: each of the 64 additions rounds to ~2^-9 of the running sum.
    assert bf16_error > 1e-3, bf16_error
    assert bf16_error > 100 * fused_error


# ---- mixprec.nn.Linear and convert ---------------------------------------------------------------------------


def make_mlp(device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 16), nn.Tanh()), nn.Linear(16, 3)).to(
        device=device, dtype=dtype)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("device", DEVICES)
def test_convert_keeps_outputs_parameters_and_state_dict(device: str) -> None:
    model = make_mlp(device, torch.bfloat16)
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    x = torch.randn(7, 12, device=device).bfloat16()
    out_before = model(x)
    assert mixprec.nn.convert(model) is model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(type(m) is mixprec.nn.Linear for m in linears)
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert list(model.state_dict()) == keys_before
    assert torch.equal(model(x), out_before)
    assert all(w.grad_dtype == torch.float32 for w in weights(model))
    assert all(m.bias.grad_dtype == torch.bfloat16 for m in linears)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_nn_linear(device: str) -> None:
    """Input and bias gradients as nn.Linear's; the weight gradient is fp32 in .grad."""
    ref = make_mlp(device)
    ours = mixprec.nn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 5, 12, device=device)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref).pow(2).sum().backward()
    ours(x_ours).pow(2).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for p, p_ref in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)


def test_existing_16bit_grad_becomes_fp32_and_later_dtype_changes_keep_it() -> None:
    model = make_mlp(dtype=torch.bfloat16)
    model(torch.randn(3, 12).bfloat16()).sum().backward()
    bf16_grad = model[0].weight.grad.clone()
    mixprec.nn.convert(model)
    assert model[0].weight.grad.dtype == torch.float32 and torch.equal(model[0].weight.grad, bf16_grad.float())
    fp32_model = mixprec.nn.convert(make_mlp())
    fp32_model.bfloat16()  # converted while fp32, cast afterwards: the gradient stays fp32
    fp32_model(torch.randn(3, 12).bfloat16()).sum().backward()
    assert all(w.grad.dtype == torch.float32 for w in weights(fp32_model))


def test_copies_pickles_and_assigned_state_keep_the_fp32_gradient() -> None:
    import io
    model = mixprec.nn.convert(make_mlp(dtype=torch.bfloat16))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assigned = mixprec.nn.convert(make_mlp(dtype=torch.bfloat16))
    assigned.load_state_dict(make_mlp(dtype=torch.bfloat16).state_dict(), assign=True)  # new Parameter objects
    for other in (copy.deepcopy(model), loaded, assigned):
        assert all(w.grad_dtype == torch.float32 for w in weights(other))
        other(torch.randn(2, 12).bfloat16()).sum().backward()
        assert all(w.grad.dtype == torch.float32 for w in weights(other))


@pytest.mark.parametrize("layer", ["Linear", "Float8Linear", "Int8Linear"])
def test_new_parameters_from_module_conversions_keep_the_fp32_gradient(layer: str) -> None:
    """Module._apply makes new Parameter objects for to_empty from the meta device (deferred initialisation)
    and for every conversion under torch's swap_module_params_on_conversion: they get the fp32 gradient too."""
    cls = getattr(mixprec.nn, layer)

    def check(module: torch.nn.Module) -> None:
        assert module.weight.grad_dtype == torch.float32
        module(torch.randn(16, 32, dtype=module.weight.dtype)).float().sum().backward()
        assert module.weight.grad.dtype == torch.float32 and module.bias.grad.dtype == module.weight.dtype

    deferred = cls(32, 16, device="meta", dtype=torch.bfloat16)
    deferred.to_empty(device="cpu")
    deferred.reset_parameters()
    check(deferred)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        swapped = cls(32, 16)
        before = swapped.weight
        swapped.bfloat16()
        check(swapped)
        assert swapped.weight is before  # swap_tensors keeps the object, exchanging its contents
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def _eight_bit_or_not(layer: str, model: nn.Module) -> nn.Module:
    if layer == "Float8Linear":
        return mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe(), filter=lambda name, m: True)
    if layer == "Int8Linear":
        return mixprec.nn.convert(model, int8=True, filter=lambda name, m: True)
    return mixprec.nn.convert(model)


@pytest.mark.parametrize("layer", ["Linear", "Float8Linear", "Int8Linear"])
def test_frozen_layers_build_no_graph_and_save_what_torchs_linear_saves(layer: str) -> None:
    """As torch.nn.Linear: a frozen layer on an input without grad gives an output without grad (no graph, no
    backward through a frozen backbone); the input is saved only for a weight gradient and the weight only for
    an input gradient, so writing in place into the other after forward is fine."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(32, 16))
    ours = _eight_bit_or_not(layer, copy.deepcopy(ref))
    assert type(ours[0]).__name__ == layer
    x = torch.randn(8, 32)
    for model in (ref, ours):
        model.requires_grad_(False)
        y = model(x)
        assert not y.requires_grad and y.grad_fn is None
        xg = x.clone().requires_grad_()
        y = model(xg)
        with torch.no_grad():
            xg.mul_(2.0)  # not saved: the weight is frozen
        y.sum().backward()
        assert xg.grad is not None and xg.grad.shape == x.shape
        model.requires_grad_(True)
        y = model(x)
        with torch.no_grad():
            model[0].weight.mul_(1.0)  # not saved: the input needs no gradient
        y.sum().backward()
        assert model[0].weight.grad is not None


@pytest.mark.parametrize("layer", ["Linear", "Float8Linear", "Int8Linear"])
def test_weights_frozen_when_converted_or_assigned_later_keep_the_fp32_gradient(layer: str) -> None:
    """Frozen when converted and unfrozen later (a fine-tuning schedule), or replaced by a new Parameter after
    conversion (weight tying, resized or re-initialised layers): the 16-bit weight's gradient is still fp32."""
    model = nn.Sequential(nn.Linear(32, 16)).bfloat16().requires_grad_(False)
    _eight_bit_or_not(layer, model)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    model.requires_grad_(True)
    model(x).float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    model[0].weight = nn.Parameter(torch.randn(16, 32, dtype=torch.bfloat16))
    model(x).float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32


def test_autocast_runs_the_gemms_in_the_autocast_dtype() -> None:
    torch.manual_seed(5)
    ref = nn.Linear(24, 8)
    ours = mixprec.nn.convert(copy.deepcopy(ref))
    x = torch.randn(6, 24)
    upstream = torch.randn(6, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    y.backward(upstream)
    y_ref.backward(upstream)
    grad = ours.weight.grad
    assert grad.dtype == torch.float32
    check_against_float64(grad, torch.zeros_like(grad), upstream, x.bfloat16())  # the bf16 operands the GEMM saw
    torch.testing.assert_close(grad, ref.weight.grad, rtol=1e-2, atol=1e-2)  # torch's is rounded to bf16


@pytest.mark.parametrize("zero", ["optimizer", "model", "set_to_zero"])
@pytest.mark.parametrize("device", DEVICES)
def test_trains_like_nn_linear_with_fp32_grads(device: str, zero: str) -> None:
    """fp32: mixprec.nn.Linear tracks nn.Linear step for step; bf16 + fp32 masters tracks the fp32 run within
    bf16 noise. Two micro-batches per step, so weight.grad accumulates, and whichever zero_grad a trainer
    calls (the optimizer's, the model's, set_to_none=False) starts the next step afresh."""
    torch.manual_seed(6)
    data = [(torch.randn(16, 12, device=device), torch.randn(16, 3, device=device)) for _ in range(4)]

    def train(model: nn.Module, dtype: torch.dtype, steps: int = 30) -> list[float]:
        opt = mixprec.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        losses = []
        for step in range(steps):
            if zero == "optimizer":
                opt.zero_grad()
            elif zero == "model":
                model.zero_grad()
            else:
                opt.zero_grad(set_to_none=False)
            total = 0.0
            for x, y in data[(2 * step) % 4:(2 * step) % 4 + 2]:
                loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y) / 2
                loss.backward()
                total += loss.item()
            opt.step()
            losses.append(total)
        return losses

    reference = make_mlp(device)
    ours = mixprec.nn.convert(make_mlp(device))
    ref_losses = train(reference, torch.float32)
    our_losses = train(ours, torch.float32)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ref_losses[-1] < 0.8 * ref_losses[0]
    bf16 = mixprec.nn.convert(make_mlp(device, torch.bfloat16))
    bf16_losses = train(bf16, torch.bfloat16)
    assert all(w.grad.dtype == torch.float32 for w in weights(bf16))
    assert abs(bf16_losses[-1] - ref_losses[-1]) < 0.05 * ref_losses[0]
    assert max(abs(a - b) for a, b in zip(our_losses, ref_losses)) < 1e-4 * ref_losses[0]


@pytest.mark.parametrize("scaler_cls", [mixprec.GradScaler, torch.amp.GradScaler])
@pytest.mark.parametrize("device", DEVICES)
def test_both_grad_scalers_unscale_and_check_the_fp32_weight_grads(device: str, scaler_cls: type) -> None:
    """Scaled fp32 weight gradients are unscaled by either GradScaler; an inf there skips the step and backs
    off. (torch's scaler refuses fp16 gradients, so the model is bf16 for it.)"""
    dtype = torch.float16 if device == "cuda" and scaler_cls is mixprec.GradScaler else torch.bfloat16
    model = mixprec.nn.convert(make_mlp(device, dtype))
    reference = copy.deepcopy(model)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = scaler_cls(device, init_scale=1024.0)
    x = torch.randn(8, 12, device=device).to(dtype)
    scaler.scale(model(x).float().pow(2).mean()).backward()
    reference(x).float().pow(2).mean().backward()
    scaler.unscale_(opt)
    for w, r in zip(weights(model), weights(reference)):
        assert torch.equal(w.grad, r.grad)  # a power-of-two scale: exact in fp32
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 1024.0

    opt.zero_grad()
    scaler.scale(model(x).float().pow(2).mean()).backward()
    model[0].weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 512.0


def test_torch_clip_grad_norm_sees_the_converted_weights() -> None:
    """torch.nn.utils.clip_grad_norm_ on a converted bf16 model: the norm covers the fp32 weight gradients
    (checked against a float64 norm of every gradient) and the weights are clipped with the rest."""
    model = mixprec.nn.convert(make_mlp(dtype=torch.bfloat16))
    model(torch.randn(5, 12).bfloat16()).float().pow(2).sum().backward()
    grads = [p.grad.double().clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5 * expected)
    # torch takes each bf16 bias gradient's norm in bf16 (2^-8 relative rounding); without the weights the
    # norm would be a fraction of this.
    weight_share = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0::2]])).item()
    assert weight_share > 0.5 * expected
    assert norm.item() == pytest.approx(expected, rel=8e-3)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad.double(), g * 0.5, rtol=1e-2, atol=1e-6)


def test_tensor_hooks_see_each_micro_batch_and_post_accumulate_hooks_run() -> None:
    """A tensor hook on the weight sees every micro-batch's own gradient (the GEMM then does not add in
    place), and post-accumulate-grad hooks run after every backward either way."""
    torch.manual_seed(13)
    layer = mixprec.nn.Linear(6, 4, dtype=torch.bfloat16)
    seen, after = [], []
    handle = layer.weight.register_hook(lambda g: seen.append(g.clone()))
    layer.weight.register_post_accumulate_grad_hook(lambda p: after.append(p.grad.clone()))
    xs = [torch.randn(3, 6).bfloat16() for _ in range(3)]
    for x in xs:
        layer(x).sum().backward()
    expected = [ops.linear_wgrad(torch.ones(3, 4).bfloat16(), x) for x in xs]
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert len(after) == 3 and torch.equal(after[-1], sum(expected[1:], expected[0]))
    handle.remove()
    layer(xs[0]).sum().backward()  # in place now
    assert len(after) == 4 and torch.equal(after[-1], layer.weight.grad)


def test_tied_weights_add_both_uses() -> None:
    """An LM head tied to the embedding: both gradients land in the one fp32 .grad."""
    vocab, d = 11, 6

    def make() -> nn.Module:
        torch.manual_seed(8)
        m = nn.ModuleDict({"emb": nn.Embedding(vocab, d), "head": nn.Linear(d, vocab, bias=False)})
        m["head"].weight = m["emb"].weight
        return m

    ref, ours = make(), mixprec.nn.convert(make())
    idx = torch.randint(0, vocab, (4, 5))
    for _ in range(2):  # the second backward adds in place
        for m in (ref, ours):
            m["head"](m["emb"](idx)).logsumexp(-1).sum().backward()
    torch.testing.assert_close(ours["emb"].weight.grad, ref["emb"].weight.grad, rtol=1e-5, atol=1e-6)


def test_weights_without_a_gradient_this_step_are_skipped() -> None:
    """As torch skips a None .grad: an unused Linear's weight gets no decay and no step count."""
    model = mixprec.nn.convert(nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)}))
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    for step in range(2):
        opt.zero_grad()
        model["used"](torch.randn(2, 4)).sum().backward()
        if step == 0:
            model["unused"](torch.randn(2, 4)).sum().backward()  # used once, then never
        before = model["unused"].weight.detach().clone()
        opt.step()
    assert torch.equal(model["unused"].weight, before)
    assert int(opt.state[model["used"].weight]["step"]) == 2
    assert int(opt.state[model["unused"].weight]["step"]) == 1


def test_computed_weight_gets_an_ordinary_gradient() -> None:
    """A parametrized weight is not a leaf: its gradient flows on to the underlying parameter."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    torch.manual_seed(9)
    ref = nn.Linear(5, 3)
    ours = mixprec.nn.convert(copy.deepcopy(ref))
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight", Double())
    x = torch.randn(4, 5)
    ref(x).pow(2).sum().backward()
    ours(x).pow(2).sum().backward()
    original = ours.parametrizations.weight.original
    torch.testing.assert_close(original.grad, ref.parametrizations.weight.original.grad, rtol=1e-5, atol=1e-6)


def test_a_weight_never_converted_keeps_gradients_in_its_own_dtype() -> None:
    """mixprec.nn.linear on a bf16 weight whose grad_dtype is its own (never converted): .grad stays bf16 over
    accumulated backwards, the fp32 GEMM result rounded once and added by autograd, as torch.nn.functional.linear
    accumulates (which rounds its fp32 sums once too: the same bits)."""
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(4, 8).bfloat16())
    ref = nn.Parameter(w.detach().clone())
    for _ in range(3):
        x = torch.randn(5, 8).bfloat16()
        mixprec.nn.linear(x, w).float().pow(2).sum().backward()
        torch.nn.functional.linear(x, ref).float().pow(2).sum().backward()
        assert w.grad.dtype == torch.bfloat16
    assert torch.equal(w.grad, ref.grad)


def test_torch_compile_runs_a_converted_model() -> None:
    """torch.compile runs a converted model and trains like eager within bf16 rounding. Limits of torch's,
    documented: Dynamo refuses (fullgraph=True) or graph-breaks on a parameter whose .grad dtype differs from
    its own once that .grad exists, and AOTAutograd's fake tensors do not carry grad_dtype, so a compiled
    backward's weight gradient is rounded to the weight's dtype before autograd accumulates it in fp32."""
    torch.manual_seed(16)
    eager = mixprec.nn.convert(make_mlp(dtype=torch.bfloat16))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(9, 12).bfloat16()
    for _ in range(2):
        eager(x).float().pow(2).sum().backward()
        compiled(x).float().pow(2).sum().backward()
    for a, b in zip(compiled_model.parameters(), eager.parameters()):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=2**-7, atol=1e-3 * b.grad.abs().max().item())


def test_only_a_plain_backward_adds_into_grad() -> None:
    """With an fp32 .grad already there, torch.autograd.grad and backward(inputs=...) leave it untouched (as
    torch promises), autograd.grad with respect to the weight returns the weight's gradient, and a
    create_graph backward accumulates correctly; only a plain backward() adds in place."""
    torch.manual_seed(17)
    layer = mixprec.nn.Linear(6, 4, dtype=torch.bfloat16)
    x = torch.randn(3, 6).bfloat16().requires_grad_()
    layer(x).float().sum().backward()
    accumulated = layer.weight.grad.clone()
    expected = ops.linear_wgrad(torch.ones(3, 4).bfloat16(), x.detach())

    (gx,) = torch.autograd.grad(layer(x).float().sum(), [x])
    assert gx is not None and torch.equal(layer.weight.grad, accumulated)
    layer(x).float().sum().backward(inputs=[x])
    assert torch.equal(layer.weight.grad, accumulated)
    (gw,) = torch.autograd.grad(layer(x).float().sum(), [layer.weight])
    assert gw.dtype == torch.float32 and torch.equal(gw, expected) and torch.equal(layer.weight.grad, accumulated)
    layer(x).float().sum().backward(create_graph=True)
    assert torch.equal(layer.weight.grad.detach(), accumulated + expected)
    layer.weight.grad = None
    layer(x).float().sum().backward()
    address = layer.weight.grad.data_ptr()
    layer(x).float().sum().backward()
    assert layer.weight.grad.data_ptr() == address and torch.equal(layer.weight.grad, 2 * expected)


def _penalty_grads(layer: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """A gradient penalty (WGAN-GP / R1 style): the loss plus |d out / d x|^2, whose gradient needs the
    second derivative through the layer to its weight, bias and input."""
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = torch.tanh(layer(xi))
    (gx,) = torch.autograd.grad(out.float().sum(), xi, create_graph=True)
    assert gx.requires_grad
    loss = out.float().pow(2).mean() + gx.float().pow(2).sum()
    loss.backward()
    weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
    grads = [weight.grad, layer.bias.grad, xi.grad]
    assert all(g is not None for g in grads)
    return [g.detach().double() for g in grads]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class _Doubled(nn.Module):
    """A parametrization: the weight the layer sees is computed (a non-leaf), 2 * the parameter."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


@pytest.mark.parametrize("kind", ["Linear", "Int8Linear-16bit", "Int8Linear"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("computed_weight", [False, True])
def test_double_backward_under_autocast_reaches_weight_and_input(kind: str, weight_dtype: torch.dtype,
                                                                 computed_weight: bool) -> None:
    """Under autocast the layer casts its operands itself. Those casts must stay on the graph of a create_graph
    backward: before, the second-order terms to the weight and the input were silently dropped (the penalty's
    weight gradient was 50% off, x's gradient lost its penalty part). torch.nn.Linear under the same autocast
    and a float64 computation without it are the references."""
    torch.manual_seed(21)
    reference = nn.Linear(24, 16)
    x = torch.randn(10, 24)
    if kind == "Linear":
        layer = mixprec.nn.Linear(24, 16)
    else:
        gemms = mixprec.nn.Int8Gemms(False, False, False) if kind == "Int8Linear-16bit" else mixprec.nn.Int8Gemms()
        layer = mixprec.nn.Int8Linear(24, 16, gemms=gemms)
    layer.load_state_dict(reference.state_dict())
    reference, layer = reference.to(weight_dtype), layer.to(weight_dtype)
    if computed_weight:
        for module in (reference, layer):
            torch.nn.utils.parametrize.register_parametrization(module, "weight", _Doubled())
    exact = _penalty_grads(copy.deepcopy(reference).double(), x.double(), autocast=False)
    torch_amp = _penalty_grads(reference, x, autocast=True)
    ours = _penalty_grads(layer, x, autocast=True)
    # bf16 operands: torch's own error against float64 is about 1e-2; INT8 products in the first-order part
    # add theirs.
    bound = 0.1 if kind == "Int8Linear" else 3e-2
    for got, torch_got, want in zip(ours, torch_amp, exact):
        assert _rel(torch_got, want) < 3e-2
        assert _rel(got, want) < bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["Linear", "Float8Linear", "Int8Linear"])
def test_dtype_casts_between_micro_batches_keep_the_fp32_accumulator(kind: str, dtype: torch.dtype) -> None:
    """Module._apply casts .grad with the weight. For the fp32 accumulator of a 16-bit weight that rounded the
    micro-batches summed so far (an fp16 sum past 65504 became inf), even for a cast that changes nothing
    (`.to(device, dtype)` from a framework, `.bfloat16()` of a bf16 model). The accumulator keeps its values
    and its object; `.double()` still gives float64 gradients."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 16))
    if kind == "Linear":
        mixprec.nn.convert(model)
    else:
        mixprec.nn.convert(model, **({"fp8": mixprec.fp8.Recipe(scaling="current")} if kind == "Float8Linear"
                                    else {"int8": True}),
                           filter=lambda name, module: True)
    model.to(dtype)
    weight = model[0].weight
    for _ in range(4):
        (model(torch.randn(8, 16, dtype=dtype)).float() * 3e4).sum().backward()
    assert weight.grad.dtype == torch.float32 and weight.grad.abs().max() > 70000  # beyond fp16's range
    before, grad_object = weight.grad.clone(), weight.grad
    for cast in (lambda m: m.to(dtype), lambda m: m.to("cpu", dtype), lambda m: m.bfloat16(), lambda m: m.half(),
                 lambda m: m.float(), lambda m: m.to(dtype)):
        cast(model)
        assert model[0].weight.grad is grad_object and torch.equal(grad_object, before)
    model.double()
    assert model[0].weight.grad.dtype == torch.float64 and torch.equal(model[0].weight.grad, before.double())


@pytest.mark.parametrize("kind", ["Linear", "Int8Linear"])
@pytest.mark.parametrize("features", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("shape", [(3,), (2, 3), ()])
def test_layers_without_features_match_torch(kind: str, features: tuple[int, int], shape: tuple[int, ...]) -> None:
    """in_features or out_features of 0, with a bias (torch.nn.Linear takes both): outputs and every gradient
    as torch's, for 1-D, 2-D and 3-D inputs (a backward of out_features=0 failed to reshape its rows)."""
    torch.manual_seed(1)
    reference = nn.Linear(*features)
    layer = getattr(mixprec.nn, kind)(*features)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(*shape, features[0])
    results = []
    for module in (reference, layer):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out.sum() + out.pow(2).sum()).backward()
        results.append([out.detach(), xi.grad, module.weight.grad, module.bias.grad])
    for want, got in zip(*results):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["Linear", "Int8Linear"])
def test_an_in_place_change_to_the_weight_between_forward_and_backward_under_autocast(kind: str) -> None:
    """Under autocast torch's linear saves only the cast weight, so a weight changed in place between forward
    and backward does not stop the backward; the layers (which recast the weight for a create_graph backward)
    must not start refusing it either."""
    results = []
    for cls in (nn.Linear, getattr(mixprec.nn, kind)):
        torch.manual_seed(3)
        layer = cls(8, 4)
        x = torch.randn(3, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        y.float().sum().backward()
        results.append(x.grad)
    assert results[1] is not None and results[1].shape == results[0].shape


def test_float64_weights_keep_float64_gradients() -> None:
    """A converted model cast to float64 (after conversion, too) has float64 gradients, computed in float64."""
    ref = make_mlp().double()
    ours = mixprec.nn.convert(make_mlp()).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    ref(x).pow(2).sum().backward()
    ours(x).pow(2).sum().backward()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert a.grad.dtype == torch.float64
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_op_opcheck(device: str, dtype: torch.dtype, bias: bool) -> None:
    """mixprec::linear (C++'s mixprec::nn::linear, which Python's mixprec.nn.linear calls) under opcheck."""
    x = torch.randn(2, 5, 6, device=device).to(dtype).requires_grad_()
    w = nn.Parameter(torch.randn(4, 6, device=device).to(dtype))
    b = nn.Parameter(torch.randn(4, device=device).to(dtype)) if bias else None
    torch.library.opcheck(torch.ops.mixprec.linear.default, (x, w, b))


def test_a_layer_without_bias_trains() -> None:
    layer = mixprec.nn.Linear(6, 4, bias=False, dtype=torch.bfloat16)
    x = torch.randn(3, 6).bfloat16()
    layer(x).float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, ops.linear_wgrad(torch.ones(3, 4).bfloat16(), x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_func_transforms_and_forward_ad_give_torchs_results(dtype: torch.dtype) -> None:
    """torch.func (grad, vmap, jvp) and forward-mode AD cannot run a C++ autograd Function; they return
    gradients rather than accumulating into .grad, so the layer is torch's linear there: the same results as
    torch.nn.Linear bit for bit, and no batching-rule fallback under vmap."""
    import warnings

    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad, jvp, vmap

    torch.manual_seed(3)
    ours = mixprec.nn.Linear(6, 5).to(dtype)
    ref = torch.nn.Linear(6, 5).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x, t = torch.randn(4, 6, dtype=dtype), torch.randn(4, 6, dtype=dtype)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(model: torch.nn.Module):  # noqa: ANN202
        return lambda p, xx: functional_call(model, p, (xx,)).float().pow(2).sum()

    g_ours, g_ref = grad(loss(ours))(params, x), grad(loss(ref))(params, x)
    assert all(g_ours[k].dtype == dtype and torch.equal(g_ours[k], g_ref[k]) for k in params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing batching rule warns
        v_ours = vmap(lambda xx: functional_call(ours, params, (xx,)))(x)
    assert torch.equal(v_ours, vmap(lambda xx: functional_call(ref, params, (xx,)))(x))
    assert all(torch.equal(a, b) for a, b in zip(jvp(ours, (x,), (t,)), jvp(ref, (x,), (t,))))
    with fwAD.dual_level():
        out_ours, out_ref = ours(fwAD.make_dual(x, t)), ref(fwAD.make_dual(x, t))
        assert torch.equal(fwAD.unpack_dual(out_ours).tangent, fwAD.unpack_dual(out_ref).tangent)
        # Inside a dual level, tensors without tangents still take the fp32-gradient op.
        ours(x).float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32


def _twins(dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(8, 4, dtype=dtype, device=device)
    return ref, mixprec.nn.convert(copy.deepcopy(ref))


def test_complex_layers_compute_as_torchs_linear() -> None:
    """The weight-gradient GEMM is real: a complex layer (an input gradient needs the conjugate weight) computes
    as torch's linear, frozen or trained."""
    x0 = torch.randn(5, 8, dtype=torch.complex64)
    for frozen in (True, False):
        grads = []
        for m in _twins(torch.complex64):
            m.requires_grad_(not frozen)
            x = x0.clone().requires_grad_()
            m(x).abs().pow(2).sum().backward()
            grads.append((x.grad, m.weight.grad))
        assert torch.equal(grads[0][0], grads[1][0])
        assert (grads[0][1] is None) == frozen and (frozen or torch.equal(grads[0][1], grads[1][1]))


def test_meta_device_and_nested_inputs_compute_as_torchs_linear() -> None:
    for m in _twins(device="meta"):  # shape inference on the meta device
        assert m(torch.empty(5, 8, device="meta")).shape == (5, 4)
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)], layout=torch.jagged)
    grads = []
    for m in _twins():
        m(nested).values().sum().backward()
        grads.append(m.weight.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("hook", ["pre", "post"])
def test_hooks_on_the_weights_accumulate_grad_node_see_every_backward(hook: str) -> None:
    """A hook on the weight's AccumulateGrad node (reached through grad_fn.next_functions, as apex-, Megatron- and
    DDP-style code registers them) sees each backward's gradient, and a pre-hook may replace it: no in-place
    add then."""
    x = torch.randn(6, 8)
    seen = {}
    for name, m in zip(("torch", "ours"), _twins()):
        calls = []
        node = m.weight.view_as(m.weight).grad_fn.next_functions[0][0]
        if hook == "pre":
            node.register_prehook(lambda go, calls=calls: (calls.append(go[0]), (go[0] * 0,))[1])
        else:
            node.register_hook(lambda gi, go, calls=calls: calls.append(go[0]))
        for _ in range(3):
            m(x).sum().backward()
        seen[name] = ([None if g is None else g.sum().item() for g in calls], m.weight.grad.sum().item())
    assert seen["ours"] == seen["torch"]
    assert None not in seen["ours"][0] and len(seen["ours"][0]) == 3


def test_a_converted_layer_cast_to_float64_after_a_backward_takes_float64_gradients() -> None:
    x = torch.randn(3, 8)
    out = []
    for m in _twins():
        m(x).sum().backward()
        m.double()
        assert m.weight.grad_dtype == torch.float64 and m.weight.grad.dtype == torch.float64
        m.zero_grad(set_to_none=False)
        m(x.double().mul(1 / 3)).sum().backward()
        out.append(m.weight.grad)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("conversion", ["linear", "fp8", "int8"])
def test_flop_counter_counts_converted_layers_as_torchs(conversion: str) -> None:
    """torch.utils.flop_counter sees the weight-gradient and 8-bit GEMM ops as the mm they replace (MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    kwargs = {"fp8": dict(fp8=mixprec.fp8.Recipe()), "int8": dict(int8=mixprec.nn.Int8Gemms())}.get(conversion, {})
    ours = mixprec.nn.convert(copy.deepcopy(ref), filter=lambda *a: True, **kwargs)
    x = torch.randn(16, 32, requires_grad=True)
    counts = []
    for m in (ref, ours):
        with FlopCounterMode(display=False) as counter:
            for _ in range(2):  # the second backward adds into .grad in place
                m(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[1] == counts[0] == 2 * 3 * 2 * 16 * (32 * 64 + 64 * 32)


@pytest.mark.parametrize("conversion", ["fp8", "int8", "qat"])
def test_torch_func_transforms_through_8bit_and_qat_layers_are_refused_by_name(conversion: str) -> None:
    """Their autograd functions are C++'s, which functorch cannot run: the error names the layer and the way
    out instead of torch's generic one. (mixprec.nn.Linear computes as torch's linear there instead.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    if conversion == "qat":
        model = mixprec.qat.prepare(model)
        name = "mixprec.qat.QATLinear"
    else:
        kwargs = dict(fp8=mixprec.fp8.Recipe()) if conversion == "fp8" else dict(int8=True)
        mixprec.nn.convert(model, filter=lambda *a: True, **kwargs)
        name = f"mixprec.nn.{conversion}_linear" if conversion == "int8" else "mixprec.nn.float8_linear"
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, (p, buffers), (x,)).square().sum()

    with pytest.raises(RuntimeError, match=f"{name} cannot run under torch.func transforms"):
        torch.func.grad(loss)(params, torch.randn(4, 32))
    # Forward-mode AD (torch.autograd.forward_ad) too: torch's message there ("jvp is not implemented for the c++
    # API of custom Function") leaked through unnamed.
    import torch.autograd.forward_ad as fwAD

    with pytest.raises(RuntimeError, match=f"{name} cannot run under torch.func transforms .* or forward-mode AD"):
        with fwAD.dual_level():
            x = torch.randn(4, 32)
            model(fwAD.make_dual(x, torch.ones_like(x)))
    model(torch.randn(4, 32)).sum().backward()  # outside a transform, as ever
