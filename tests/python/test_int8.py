"""The integer ops: int8_quantize, int8_mm and fake_quantize (mixprec.int8 / mixprec::int8).

Quantization against a float64 computation of the documented rule (every block shape, dtype, empty,
non-contiguous and misaligned inputs, inf/NaN/zero blocks), stochastic rounding unbiased and seeded, the GEMM
exact against an int64 reference, fake quantization bit-identical to torch's fake_quantize in fp32 with the
same straight-through and LSQ gradients, opcheck, bad input, and CPU/CUDA agreement."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec import int8

from conftest import (DEVICES, FLOAT_DTYPES, assert_pairs_agree_across_cpu_capabilities, exact_bias_case,
                      requires_cuda, run_with_cpu_capability)

BLOCKS = [(1, -1), (-1, 1), (-1, -1), (1, 16), (3, 5), (128, 128)]


def reference_quantize(x: torch.Tensor, block: tuple[int, int], pow2: bool = False):
    """The rule of ops/int8.h in float64: amax per block, step = fp32(amax / 127) (at least FLT_MIN; with pow2
    the next power of two up), scale = fp32(1 / step), code = round-half-even of fp32(x * scale) saturated to
    +-127, scale_inv = step (NaN for a non-finite amax, 1 for a zero one). Each fp64 quotient or product of two
    fp32 values, rounded once to fp32, is the correctly rounded fp32 operation."""
    m = x.double().reshape(-1, x.shape[-1]) if x.dim() > 0 else x.double().reshape(1, 1)
    rows, cols = m.shape
    br = max(rows if block[0] == -1 else block[0], 1)
    bc = max(cols if block[1] == -1 else block[1], 1)
    gr = 1 if block[0] == -1 else -(-rows // br)
    gc = 1 if block[1] == -1 else -(-cols // bc)
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    scale_inv = torch.empty(gr, gc, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for i in range(gr):
        for j in range(gc):
            blk = m[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            amax = float("nan") if blk.isnan().any() else (blk.abs().max().item() if blk.numel() else 0.0)
            if amax != amax or amax == float("inf"):
                scale, scale_inv[i, j] = 1.0, float("nan")
            elif amax == 0:
                scale, scale_inv[i, j] = 1.0, 1.0
            else:
                step = max(torch.tensor(amax / 127.0, dtype=torch.float32).item(), tiny)
                if pow2:
                    step = 2.0 ** math.ceil(math.log2(step))
                scale = torch.tensor(1.0 / step, dtype=torch.float32).item()
                scale_inv[i, j] = step
            v = (blk * scale).float().double()  # the fp32 product (exact in fp64, rounded once)
            v = torch.nan_to_num(v, nan=0.0).clamp(-127, 127)
            codes[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = torch.round(v).to(torch.int8)
    return codes.reshape(x.shape), scale_inv


def assert_quantize_matches(x: torch.Tensor, block: tuple[int, int], pow2: bool = False) -> None:
    q = int8.quantize(x, block, pow2_scales=pow2)
    codes, scale_inv = reference_quantize(x.cpu(), block, pow2)
    assert q.data.dtype == torch.int8 and q.data.shape == x.shape
    assert torch.equal(q.data.cpu(), codes)
    torch.testing.assert_close(q.scale_inv.cpu(), scale_inv, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_matches_a_float64_reference(device: str, dtype: torch.dtype, block: tuple[int, int]) -> None:
    torch.manual_seed(0)
    for shape in [(37, 70), (2, 3, 45), (5,), (1, 1), (0, 9)]:
        x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype).to(device)
        assert_quantize_matches(x, block)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_ties_saturation_pow2_and_layouts(device: str) -> None:
    # amax 127 makes the scale 1: the codes are round-half-even of the inputs themselves.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0]], device=device)
    q = int8.quantize(x)
    assert q.data.tolist() == [[127, 0, 2, 2, 0, -2, 126, -127]]
    assert q.scale_inv.item() == 1.0
    torch.manual_seed(1)
    base = torch.randn(65, 130, device=device)
    for view in (base[:, 1:], base.t(), base[::2, ::3], base.flatten()[1:8065].reshape(64, 126)[:, :5]):
        for block in BLOCKS:
            assert_quantize_matches(view, block)
    assert_quantize_matches(base * 1e-30, (1, -1), pow2=True)
    assert_quantize_matches(torch.tensor(3.0, device=device), (-1, -1))  # 0-dim: a [1, 1] matrix
    # Dequantized values are within half a step of the input.
    q = int8.quantize(base, (1, 16))
    step = q.scale_inv.repeat_interleave(16, 1)[:, :130]
    assert ((q.data.float() * step - base).abs() <= step * 0.5000001).all()


def test_quantize_vector_paths_match_the_reference() -> None:
    """Rows long enough for the vector steps (16 elements) with odd tails, per-column blocks across many
    rows, groups wider and narrower than a vector step, ties, saturation and non-finite values inside runs."""
    torch.manual_seed(7)
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(67, 301) * torch.logspace(-4, 4, 301)).to(dtype)
        x[3, 40], x[5, 17], x[9, 290] = float("nan"), float("inf"), -float("inf")
        x[11, :] = ((torch.arange(301) % 254) - 126.5).clamp(-126.5, 127)  # amax 127: scale 1, exact .5 ties
        # Rows whose data starts one element past an aligned address, as the kernels see them.
        misaligned = x.flatten()[1:1 + 66 * 301].view(66, 301)
        assert misaligned.data_ptr() % 32 != 0
        for block in [(1, -1), (-1, 1), (1, 1), (1, 16), (1, 33), (4, 128), (-1, -1), (2, 7)]:
            assert_quantize_matches(x, block)
            assert_quantize_matches(misaligned, block)
            assert_quantize_matches(x[:, 3:], block)  # odd widths (copied contiguous first)


def test_quantize_cpu_capabilities_agree_bitwise(tmp_path) -> None:
    """The DEFAULT and AVX2 builds of the quantize kernels give identical codes and scales, with either rounding
    (515-wide rows: stochastic runs start off the 8-element Philox groups, then run 64 at a time)."""
    torch.manual_seed(8)
    inputs = []
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(129, 515) * torch.logspace(-5, 5, 515)).to(dtype)
        x[7, 100], x[8, 3], x[100, 514] = float("nan"), float("inf"), -float("inf")
        inputs.append(x)
    script = """
        RESULT = [tuple(mixprec.int8.quantize(x, block, rounding=rounding, seed=5)) for x in INPUTS
                  for block in [(1, -1), (-1, 1), (1, 128), (1, 5), (16, 16), (-1, -1)]
                  for rounding in ("nearest", "stochastic")]
    """
    assert_pairs_agree_across_cpu_capabilities(script, inputs, tmp_path, 36)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_zero_inf_and_nan_blocks(device: str) -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, float("inf"), -2.0], [float("nan"), 3.0, -3.0], [63.5, -127.0, 32.0]],
                     device=device)
    q = int8.quantize(x)
    assert q.data.tolist() == [[0, 0, 0], [1, 127, -2], [0, 3, -3], [64, -127, 32]]  # inf saturates, NaN is 0
    assert q.scale_inv[0].item() == 1.0 and q.scale_inv[1:3].isnan().all() and q.scale_inv[3].item() == 1.0
    # A NaN scale makes every product with the block NaN: an overflow upstream is not hidden.
    out = int8.mm(q.data, torch.eye(3, dtype=torch.int8, device=device), q.scale_inv, torch.ones(1, device=device))
    assert out[1:3].isnan().all() and out[[0, 3]].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased_and_seeded(device: str) -> None:
    x = torch.full((2000, 64), 0.3, device=device)
    x[:, 0] = 127.0  # scale 1: the codes are the stochastic roundings of 0.3
    q = int8.quantize(x, (1, -1), rounding="stochastic", seed=7)
    codes = q.data[:, 1:].double()
    assert set(codes.unique().tolist()) == {0.0, 1.0}
    # 126000 Bernoulli(0.3) draws: the mean is within 5 standard deviations (0.0065) of 0.3.
    assert abs(codes.mean().item() - 0.3) < 5 * (0.3 * 0.7 / codes.numel()) ** 0.5
    again = int8.quantize(x, (1, -1), rounding="stochastic", seed=7)
    other = int8.quantize(x, (1, -1), rounding="stochastic", seed=8)
    assert torch.equal(q.data, again.data) and not torch.equal(q.data, other.data)
    # The same draws for every block shape: element i always uses Philox group i / 8.
    assert torch.equal(int8.quantize(x, (-1, -1), rounding="stochastic", seed=7).data, q.data)
    torch.manual_seed(3)
    a = int8.quantize(x, rounding="stochastic").data
    torch.manual_seed(3)
    assert torch.equal(int8.quantize(x, rounding="stochastic").data, a)


def int_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.long() @ b.long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_mm_is_exact_in_int32_and_dequantizes_in_fp32(device: str, out_dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    m, k, n = 40, 2056, 24  # sums up to 2056 * 127^2 > 2^24: the int32 -> fp32 rounding is exercised
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    a[0] = 127
    bt = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    bt[0] = 127
    acc = int_reference(a.cpu(), bt.cpu().t())
    assert acc.abs().max() > 2**24
    ones = torch.ones(1, device=device)
    exact = int8.mm(a, bt.t(), ones, ones, torch.float32)
    assert torch.equal(exact.cpu(), acc.float())  # int64 -> fp32 rounds to nearest even, as int32 -> fp32
    sa = torch.rand(m, 1, device=device) + 0.5
    sb = torch.rand(1, n, device=device) + 0.5
    bias = torch.randn(n, device=device)
    out = int8.mm(a, bt.t(), sa, sb, out_dtype, bias)
    ref = ((acc.float() * sa.cpu()) * sb.cpu() + bias.cpu().to(out_dtype).float()).to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out.cpu(), ref)
    # Against float64: three fp32 roundings (the sum, then each product), nothing else.
    plain = int8.mm(a, bt.t(), sa, sb, torch.float32).cpu().double()
    ref64 = acc.double() * sa.cpu().double() * sb.cpu().double()
    assert ((plain - ref64).abs() <= ref64.abs() * 3.01 * 2.0**-24).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mm_bias_joins_the_product_before_the_one_rounding(device: str, out_dtype: torch.dtype) -> None:
    """The bias joins the fp32 product before the one rounding to out_dtype: exact data (conftest's
    exact_bias_case) gives the correctly rounded float64 result, which rounding twice misses."""
    case = exact_bias_case(11, rowwise=True)
    a, bt = case.a.to(torch.int8).to(device), case.b.to(torch.int8).to(device)
    got = int8.mm(a, bt.t(), case.sa.to(device), case.sb.reshape(1, -1).to(device), out_dtype, case.bias.to(device))
    assert got.dtype == out_dtype and torch.equal(got.cpu(), case.want(out_dtype))
    if out_dtype != torch.float32:  # the check can fail: rounding twice gives other bits here
        assert not torch.equal(case.rounded_twice(out_dtype), case.want(out_dtype))


@pytest.mark.parametrize("k", [1024, 1025])
def test_mm_cpu_sum_is_exact_on_both_sides_of_the_fp32_bound(k: int) -> None:
    """The CPU sums in fp32 while every partial sum stays within 2^24 (k <= 1024), else in float64, and in
    float64 whenever fp32 matmuls may run in reduced precision: the sums equal an int64 reference either way,
    the extreme codes (-128 * -128 summed k times reaches 2^24 at k = 1024) included."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (8, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (k, 8), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = -128, -128
    one = torch.ones(1)
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            got = int8.mm(a, b, one, one, torch.float32)
            assert torch.equal(got, int_reference(a, b).float()) and got[0, 0].item() == k * 2.0**14
    finally:
        torch.set_float32_matmul_precision(previous)


def test_mm_under_torchs_per_backend_matmul_precision() -> None:
    """torch's per-backend precision API (torch.backends.mkldnn.matmul.fp32_precision) makes the legacy
    precision query raise; int8.mm must still run, exactly (float64). A fresh process: the setting is global
    and would make every later legacy query in this one raise too."""
    script = (
        "import torch, mixprec\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'\n"
        "a = torch.randint(-128, 128, (8, 64), dtype=torch.int8)\n"
        "b = torch.randint(-128, 128, (64, 8), dtype=torch.int8)\n"
        "one = torch.ones(1)\n"
        "assert torch.equal(mixprec.int8.mm(a, b, one, one), (a.long() @ b.long()).float())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("device", DEVICES)
def test_mm_layouts_scales_and_empty(device: str) -> None:
    torch.manual_seed(4)
    a = torch.randint(-128, 128, (24, 32), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (32, 16), dtype=torch.int8, device=device)
    s = torch.tensor([0.5], device=device)
    ref = int_reference(a.cpu(), b.cpu()).float() * 0.5 * 0.5
    for aa, bb in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        assert torch.equal(int8.mm(aa, bb, s, s).cpu(), ref)
    assert torch.equal(int8.mm(a, b, s.reshape(1, 1), s.reshape(1, 1)).cpu(), ref)
    assert int8.mm(a[:0], b, s, s).shape == (0, 16)
    bias = torch.arange(16.0, device=device)
    assert torch.equal(int8.mm(a[:, :0], b[:0], s, s, torch.float32, bias).cpu(), bias.cpu().expand(24, 16))
    small = int8.mm(a[:3], b, s, s)  # CUDA pads fewer than 17 rows for torch._int_mm
    assert torch.equal(small.cpu(), ref[:3])


def torch_fake_quantize(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, s.reshape(()), torch.tensor(0, dtype=torch.int32), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, s.reshape(-1), torch.zeros(s.numel(), dtype=torch.int32), axis,
                                                  qmin, qmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qrange", [(-127, 127), (-8, 7), (-128, 127)])
def test_fake_quantize_matches_torch_bit_for_bit(device: str, qrange: tuple[int, int]) -> None:
    torch.manual_seed(5)
    qmin, qmax = qrange
    x = torch.randn(24, 40, device=device) * 3
    x[0, :4] = torch.tensor([0.05, 0.15, 0.25, -0.35])  # ties at a step of 0.1
    per_row = (x.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-6)
    per_tensor = torch.tensor([0.1], device=device)
    per_col = (x.abs().amax(0, keepdim=True) / qmax).clamp_min(1e-6)
    cases = [(per_tensor, (-1, -1), None), (per_row, (1, -1), 0), (per_col, (-1, 1), 1),
             (per_tensor * 40, (-1, -1), None)]  # a large step: most values round into the range's ends
    for s, block, axis in cases:
        xr = x.clone().requires_grad_()
        ours = x.clone().requires_grad_()
        ref = torch_fake_quantize(xr.cpu(), s.cpu(), qmin, qmax, axis)
        out = int8.fake_quantize(ours, s, qmin, qmax, block)
        assert torch.equal(out.cpu(), ref.detach())
        g = torch.randn_like(x)
        ref.backward(g.cpu())
        out.backward(g)
        assert torch.equal(ours.grad.cpu(), xr.grad)  # the straight-through mask is torch's


@pytest.mark.parametrize("device", DEVICES)
def test_learnable_scale_gradient_matches_torch(device: str) -> None:
    torch.manual_seed(6)
    x = torch.randn(16, 32, device=device) * 2
    g = torch.randn(16, 32, device=device)
    for qmin, qmax in ((-127, 127), (-8, 7)):
        s = torch.tensor([0.05], device=device, requires_grad=True)
        ours_x = x.clone().requires_grad_()
        int8.fake_quantize(ours_x, s, qmin, qmax, grad_factor=0.5).backward(g)
        sr = torch.tensor([0.05], requires_grad=True)
        xr = x.cpu().clone().requires_grad_()
        zp = torch.zeros(1)
        torch._fake_quantize_learnable_per_tensor_affine(xr, sr, zp, qmin, qmax, 0.5).backward(g.cpu())
        assert torch.allclose(s.grad.cpu(), sr.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(ours_x.grad.cpu(), xr.grad)
    # Per-row learnable steps against torch's per-channel version.
    s = (x.abs().amax(1, keepdim=True) / 100).requires_grad_()
    int8.fake_quantize(x, s, -127, 127, (1, -1)).backward(g)
    sr = s.detach().cpu().reshape(-1).clone().requires_grad_()
    torch._fake_quantize_learnable_per_channel_affine(x.cpu(), sr, torch.zeros(16), 0, -127, 127, 1.0).backward(g.cpu())
    # fp32 sums of 32 terms of magnitude <= 127, in different orders: a few ulps of 32 * 127 apart.
    assert s.grad.shape == (16, 1) and torch.allclose(s.grad.cpu().reshape(-1), sr.grad, rtol=0, atol=32 * 127 * 2.0**-22)


@pytest.mark.parametrize("cols, block", [(1536, (-1, -1)), (1531, (-1, -1)), (1536, (1, -1)), (1536, (-1, 96))])
def test_learnable_step_gradient_does_not_move_with_the_thread_count(cols: int, block: tuple) -> None:
    """A per-tensor step's gradient sums 1.6M per-element terms: an fp32 at::sum split them by the CPU's thread
    count and moved by 1-4 ulps with it (as torch's own learnable fake quantization does). Now fixed runs, then
    float64 (or float64 throughout for a width no run divides: 1531): the same bits at 1, 2, 3 and 7 threads,
    within a few fp32 ulps of the test's float64 sum of the same fp32 terms."""
    torch.manual_seed(11)
    x = torch.randn(1037, cols) * 3
    g = torch.randn(1037, cols)
    rows, width = (1037 if block[0] == -1 else block[0]), (cols if block[1] == -1 else block[1])
    steps = torch.full((1037 // rows, cols // width), 0.05)
    _, _, term = reference_fake_quantize(x, steps.repeat_interleave(rows, 0).repeat_interleave(width, 1), -127, 127)
    expected = (term * g).double().reshape(1037 // rows, rows, cols // width, width).sum((1, 3)) * 0.5
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            s = steps.clone().requires_grad_()
            int8.fake_quantize(x, s, -127, 127, block, grad_factor=0.5).backward(g)
            grads.append(s.grad)
    finally:
        torch.set_num_threads(threads)
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])
    # Each fp32 run of 64 terms (|term * g| < 4) rounds by at most 2^-24 of its magnitude bound.
    torch.testing.assert_close(grads[0].double(), expected, rtol=0, atol=1037 * cols / 64 * 64 * 4 * 2.0**-24 * 0.5)


def reference_fake_quantize(x: torch.Tensor, steps: torch.Tensor, qmin: int, qmax: int):
    """The rule in fp32 torch ops, `steps` expanded to x's shape: (output in x's dtype, the straight-through
    mask, the LSQ term per element). NaN stays NaN; a NaN's code and term are 0."""
    xf, sf = x.float(), steps.float()
    v = xf * (1.0 / sf)
    r = torch.round(v.clamp(qmin - 1, qmax + 1))
    inside = (r >= qmin) & (r <= qmax)
    q = torch.nan_to_num(r.clamp(qmin, qmax), nan=0.0)
    y = torch.where(v.isnan(), v, q * sf).to(x.dtype)
    return y, inside, torch.where(inside, q - v, q)


def test_fake_quantize_vector_paths_match_the_rule() -> None:
    """The CPU kernels' vector steps (16 elements sharing a step, or per-column steps), their scalar tails and
    blocks narrower than a step, with NaN, inf and ties inside runs: forward, straight-through gradient and
    the per-element LSQ terms, bit for bit."""
    torch.manual_seed(11)
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(48, 203) * torch.logspace(-2, 2, 203)).to(dtype)
        x[1, 30], x[2, 64], x[3, 100] = float("nan"), float("inf"), -float("inf")
        x[0, :] = (torch.arange(203) - 101).to(dtype) * 0.0625  # exact ties at a step of 0.125 (block 0's)
        g = torch.randn(48, 203).to(dtype)
        g[5, 17], g[6, 50] = float("nan"), float("inf")
        for block in [(-1, -1), (1, -1), (-1, 1), (1, 1), (2, 29), (48, 7), (16, 203)]:
            br = 48 if block[0] == -1 else block[0]
            bc = 203 if block[1] == -1 else block[1]
            steps = (torch.rand(48 // br, 203 // bc) * 0.2 + 0.01).float()
            steps.view(-1)[0] = 0.125
            if steps.numel() > 2:  # an infinite step (inf amax / 127: its outputs are 0 * inf = NaN) and a NaN one
                steps.view(-1)[1], steps.view(-1)[2] = float("inf"), float("nan")
            full = steps.repeat_interleave(br, 0).repeat_interleave(bc, 1)
            y_ref, inside, terms_ref = reference_fake_quantize(x, full, -127, 127)
            y = torch.ops.mixprec.fake_quantize_forward(x, steps, -127, 127, *block)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
            gx, terms = torch.ops.mixprec.fake_quantize_backward(g, x, steps, -127, 127, *block, True)
            torch.testing.assert_close(gx, torch.where(inside, g, torch.zeros_like(g)), rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(terms, terms_ref * g.float(), rtol=0, atol=0, equal_nan=True)


def test_fake_quantize_cpu_capabilities_agree_bitwise(tmp_path) -> None:
    """The DEFAULT and AVX2 builds of the fake-quantization kernels give identical bits, the payloads of NaNs
    from NaN inputs, NaN steps and infinite steps included."""
    torch.manual_seed(12)
    inputs = []
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(40, 301) * 3).to(dtype)
        x[0, 5], x[1, 200], x[2, 33] = float("nan"), float("inf"), -float("nan")
        g = torch.randn(40, 301).to(dtype)
        g[3, 18] = float("nan")
        inputs.append((x, g))
    script = """
        RESULT = []
        for x, g in INPUTS:
            row_steps = torch.full((40, 1), 0.02)
            row_steps[4], row_steps[5] = float("inf"), float("nan")
            for block, steps in [((1, -1), row_steps), ((-1, 1), torch.full((1, 301), 0.05)),
                                 ((1, 43), torch.full((40, 7), 0.03)), ((-1, -1), torch.full((1, 1), 0.1))]:
                y = torch.ops.mixprec.fake_quantize_forward(x, steps, -8, 7, *block)
                gx, terms = torch.ops.mixprec.fake_quantize_backward(g, x, steps, -8, 7, *block, True)
                RESULT.append((y, gx, terms))
    """
    a = run_with_cpu_capability("default", script, inputs, tmp_path)
    b = run_with_cpu_capability(None, script, inputs, tmp_path)
    assert len(a) == len(b) == 12
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    for ta, tb in zip(a, b):
        for u, v in zip(ta, tb):
            assert torch.equal(u.view(bits[u.dtype]), v.view(bits[v.dtype]))


def test_fake_quantize_double_backward() -> None:
    """Under create_graph the gradients are recorded as functions of the incoming gradient g: x's is mask * g,
    the step's the per-block sum of the LSQ terms times g; differentiating them again in g gives those
    factors back, computed here from the rule."""
    torch.manual_seed(10)
    x = torch.randn(6, 8) * 0.3
    x[0, 0] = 9.0  # outside the range: masked, and its LSQ term is the clamped code
    s = torch.full((6, 1), 0.05, requires_grad=True)
    xg = x.clone().requires_grad_()
    g = torch.randn(6, 8, requires_grad=True)
    gx, gs = torch.autograd.grad(int8.fake_quantize(xg, s, -127, 127, (1, -1)), (xg, s), g, create_graph=True)
    v = torch.randn(6, 8)
    (dg,) = torch.autograd.grad((gx * v).sum() + gs.sum(), g)
    scaled = x * (1 / s.detach())
    r = scaled.round()
    inside = (r >= -127) & (r <= 127)
    q = r.clamp(-127, 127)
    terms = torch.where(inside, q - scaled, q)
    assert not inside[0, 0]
    assert torch.allclose(dg, inside.float() * v + terms, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantize_16_bit_inputs_and_autocast(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    x = (torch.randn(8, 64, device=device) * 4).to(dtype)
    s = torch.full((1, 1), 0.03, device=device)
    out = int8.fake_quantize(x, s)
    assert out.dtype == dtype
    assert torch.equal(out, int8.fake_quantize(x.float(), s).to(dtype))
    groups = (x.float().abs().reshape(8, 4, 16).amax(-1) / 7).clamp_min(1e-6)
    assert torch.equal(int8.fake_quantize(x, groups, -8, 7, (1, 16)),
                       int8.fake_quantize(x.float(), groups, -8, 7, (1, 16)).to(dtype))
    with torch.autocast(device, dtype):
        y = int8.fake_quantize(x.float().requires_grad_(), s)
    assert y.dtype == torch.float32  # fake quantization keeps its input's dtype, as torch's does
    nan = int8.fake_quantize(torch.tensor([float("nan"), 1.0], device=device, dtype=dtype), s)
    assert nan[0].isnan() and nan[1].item() == pytest.approx(0.99, abs=0.01)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 40), br=st.sampled_from([-1, 1, 2, 7]),
       bc=st.sampled_from([-1, 1, 3, 16]), scale=st.floats(1e-6, 1e6), dtype=st.sampled_from(FLOAT_DTYPES))
def test_quantize_properties(rows: int, cols: int, br: int, bc: int, scale: float, dtype: torch.dtype) -> None:
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 41 + cols)) * scale).to(dtype)
    assert_quantize_matches(x, (br, bc))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    torch.manual_seed(8)
    x = torch.randn(16, 32, device=device)
    torch.library.opcheck(torch.ops.mixprec.int8_quantize.default, (x, 1, -1))
    torch.library.opcheck(torch.ops.mixprec.int8_quantize.default, (x.bfloat16(), 4, 8, "stochastic", 3, True))
    q = int8.quantize(x)
    w = int8.quantize(torch.randn(24, 32, device=device))
    torch.library.opcheck(torch.ops.mixprec.int8_mm.default,
                          (q.data, w.data.t(), q.scale_inv, w.scale_inv.reshape(1, 24), torch.bfloat16,
                           torch.randn(24, device=device)))
    s = torch.full((16, 1), 0.02, device=device)
    torch.library.opcheck(torch.ops.mixprec.fake_quantize_forward.default, (x, s, -127, 127, 1, -1))
    torch.library.opcheck(torch.ops.mixprec.fake_quantize_backward.default,
                          (torch.randn_like(x), x, s, -127, 127, 1, -1, True))
    # The differentiable op, above autograd: its own schema checks do not apply (as float8_linear's).
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.mixprec.fake_quantize.default,
                          (x.requires_grad_(), s.requires_grad_(), -127, 127, 1, -1, 0.5), test_utils=no_schema)


def test_bad_input_names_the_argument() -> None:
    x = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="int8_quantize: input must be float32, float16 or bfloat16, got Double"):
        int8.quantize(x.double())
    with pytest.raises(ValueError, match="block_rows must be positive or -1"):
        int8.quantize(x, (0, -1))
    with pytest.raises(RuntimeError, match="int8_quantize: rounding must be \"nearest\" or \"stochastic\""):
        int8.quantize(x, rounding="up")
    with pytest.raises(ValueError, match=r"block must be \(block_rows, block_cols\)"):
        int8.quantize(x, (1,))  # type: ignore[arg-type]
    a = torch.zeros(4, 8, dtype=torch.int8)
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="int8_mm: b must be int8, got Float"):
        int8.mm(a, torch.zeros(8, 4), one, one)
    with pytest.raises(RuntimeError, match=r"a \[m, k\] and b \[k, n\] must share k"):
        int8.mm(a, a, one, one)
    with pytest.raises(RuntimeError, match=r"a_scale_inv must have one element \(per tensor\) or shape \[4, 1\]"):
        int8.mm(a, a.t(), torch.ones(3), one)
    with pytest.raises(RuntimeError, match=r"b_scale_inv must have one element \(per tensor\) or shape \[1, 4\]"):
        int8.mm(a, a.t(), one, torch.ones(4, 1))
    with pytest.raises(RuntimeError, match="b_scale_inv must be float32"):
        int8.mm(a, a.t(), one, one.double())
    with pytest.raises(ValueError, match="k must be at most 131071"):
        int8.mm(torch.zeros(1, 131072, dtype=torch.int8), torch.zeros(131072, 1, dtype=torch.int8), one, one)
    with pytest.raises(ValueError, match="out_dtype must be float32, bfloat16 or float16"):
        int8.mm(a, a.t(), one, one, torch.int32)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\]"):
        int8.mm(a, a.t(), one, one, torch.float32, torch.ones(5))
    with pytest.raises(ValueError, match=r"quant_min < quant_max"):
        int8.fake_quantize(x, one, 5, 5)
    with pytest.raises(ValueError, match=r"blocks of 3 x -1 must divide the input's \[8, 16\] matrix view"):
        int8.fake_quantize(x, torch.ones(3, 1), -127, 127, (3, -1))
    with pytest.raises(RuntimeError, match=r"fake_quantize_forward: scale must have shape \[8, 1\]"):
        int8.fake_quantize(x, one, -127, 127, (1, -1))
    with pytest.raises(RuntimeError, match="int8_quantize: input must be a dense"):
        int8.quantize(x.to_sparse())


def test_package_exports() -> None:
    assert mixprec.int8.quantize is int8.quantize
    assert {"quantize", "mm", "fake_quantize", "Quantized"} <= set(int8.__all__)


@requires_cuda
def test_cpu_and_cuda_agree_bit_for_bit() -> None:
    torch.manual_seed(9)
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(300, 520) * torch.logspace(-4, 4, 520)).to(dtype)
        x[3, 5] = float("nan")
        x[7, 9] = float("inf")
        for block in BLOCKS:
            for rounding in ("nearest", "stochastic"):
                c = int8.quantize(x, block, rounding=rounding, seed=11)
                g = int8.quantize(x.cuda(), block, rounding=rounding, seed=11)
                assert torch.equal(c.data, g.data.cpu())
                torch.testing.assert_close(g.scale_inv.cpu(), c.scale_inv, rtol=0, atol=0, equal_nan=True)
        s = (x.float().abs().reshape(300, 65, 8).amax(-1).nan_to_num(1.0, 1.0) / 7).clamp_min(1e-6)
        xg = x.cuda().requires_grad_()
        xc = x.clone().requires_grad_()
        sg, sc = s.cuda().requires_grad_(), s.clone().requires_grad_()
        out_g = int8.fake_quantize(xg, sg, -8, 7, (1, 8))
        out_c = int8.fake_quantize(xc, sc, -8, 7, (1, 8))
        torch.testing.assert_close(out_g.cpu(), out_c, rtol=0, atol=0, equal_nan=True)
        grad = torch.randn(300, 520).to(dtype)
        out_g.backward(grad.cuda())
        out_c.backward(grad)
        assert torch.equal(xg.grad.cpu(), xc.grad)
        assert torch.allclose(sg.grad.cpu().nan_to_num(), sc.grad.nan_to_num(), rtol=1e-4, atol=1e-4)
    # More blocks than one launch of 65535 x 256 threads covers: every scale is written.
    big = torch.randn(4100, 4100)
    c, g = int8.quantize(big, (1, 1)), int8.quantize(big.cuda(), (1, 1))
    assert torch.equal(c.scale_inv, g.scale_inv.cpu()) and torch.equal(c.data, g.data.cpu())
    for m in (5, 64, 1000):
        a = torch.randint(-127, 128, (m, 1024), dtype=torch.int8)
        b = torch.randint(-127, 128, (256, 1024), dtype=torch.int8)
        sa, sb = torch.rand(m, 1), torch.rand(1, 256)
        bias = torch.randn(256)
        for out_dtype in FLOAT_DTYPES:
            c = int8.mm(a, b.t(), sa, sb, out_dtype, bias)
            g = int8.mm(a.cuda(), b.cuda().t(), sa.cuda(), sb.cuda(), out_dtype, bias.cuda())
            assert torch.equal(c, g.cpu())


@requires_cuda
def test_cuda_mm_shape_rules() -> None:
    a = torch.zeros(32, 12, dtype=torch.int8, device="cuda")
    one = torch.ones(1, device="cuda")
    with pytest.raises(ValueError, match="on CUDA k and n must be multiples of 8"):
        int8.mm(a, torch.zeros(12, 16, dtype=torch.int8, device="cuda"), one, one)
