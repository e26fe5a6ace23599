"""FP8 quantization (mixprec.fp8 / torch.ops.mixprec.fp8_*): the casts against torch's own conversion,
exhaustively over the codes and over random fp32 bit patterns; amax and scales against float64; every
block-scaling granularity; the delayed-scaling window after a spike; opcheck; bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import fp8

from conftest import (DEVICES, FLOAT_DTYPES, HAS_CUDA, assert_pairs_agree_across_cpu_capabilities, exact_bias_case,
                      on_device)

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def one(value: float, device: str = "cpu") -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def assert_same_codes(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit equality of two FP8 tensors, reporting the first differing element."""
    a, b = bits(ours).cpu().flatten(), bits(ref).cpu().flatten()
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} codes differ, first at {diff[0].item()}: {a[diff[0]].item():#04x} vs {b[diff[0]].item():#04x}"


def all_codes(dtype: torch.dtype) -> torch.Tensor:
    """The fp32 value of every one of the 256 codes (NaN codes included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def finite_grid(dtype: torch.dtype) -> torch.Tensor:
    """The non-negative finite values of the format, ascending (float64, exact)."""
    v = all_codes(dtype).double()
    return torch.unique(v[torch.isfinite(v) & (v >= 0)])


def rounding_probes(dtype: torch.dtype) -> torch.Tensor:
    """Every grid value, every midpoint between neighbours and the fp32 neighbours of each midpoint (the
    ties and near-ties where rounding decides), beyond the largest value too, with both signs."""
    g = finite_grid(dtype)
    top = g[-1] + (g[-1] - g[-2])  # the value one step past the largest finite one
    g = torch.cat([g, top.reshape(1), (2 * top).reshape(1)])
    mids = ((g[1:] + g[:-1]) / 2).float()
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    x = torch.cat([g.float(), mids, up, down])
    return torch.cat([x, -x])


# ---- the casts, bit for bit against Tensor.to ----------------------------------------------------------------
#
# torch 2.14 made Tensor.to(float8_e4m3fn) saturate (overflow and inf -> +-448); earlier releases (the GPU
# machines' 2.11) give NaN. Our two modes are fixed: saturate=True is the former, saturate=False the latter;
# E5M2's Tensor.to never saturates. So each mode is checked against torch's conversion of inputs where
# every release agrees, and whichever mode this torch's Tensor.to implements is checked against it on
# everything.

TORCH_E4M3_SATURATES = bits(torch.tensor([1e30]).to(torch.float8_e4m3fn)).item() == 0x7E


def saturated_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturation through torch alone: clamp (NaN passes, inf becomes +-max), then convert."""
    return x.clamp(-MAX[dtype], MAX[dtype]).to(dtype)


def unsaturated_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Without saturation: E5M2 is Tensor.to; E4M3 is Tensor.to where the value rounds to a finite
    code (|x| <= 464, the tie above 448 going to even 448) and NaN, with x's sign, beyond."""
    ref = x.to(dtype)
    if dtype == torch.float8_e5m2:
        return ref
    codes = bits(ref).clone()
    over = ~(x.abs() <= 464.0) & ~x.isnan()
    codes[over] = torch.where(x[over] < 0, 0xFF, 0x7F).to(torch.uint8)
    return codes.view(dtype)


def check_both_modes(x: torch.Tensor, dtype: torch.dtype, device: str) -> None:
    sat = fp8.quantize(on_device(x, device), one(1.0, device), dtype).data  # saturate=True is the default
    raw = fp8.quantize(on_device(x, device), one(1.0, device), dtype, saturate=False).data
    assert sat.dtype == dtype and sat.shape == x.shape
    assert_same_codes(sat, saturated_reference(x, dtype))
    assert_same_codes(raw, unsaturated_reference(x, dtype))
    torch_saturates = dtype == torch.float8_e4m3fn and TORCH_E4M3_SATURATES
    assert_same_codes(sat if torch_saturates else raw, x.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
def test_nearest_matches_torch_on_every_code_and_tie(device: str, dtype: torch.dtype) -> None:
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 3e38, -3e38,
                             MAX[dtype] * 1.03, -MAX[dtype] * 1.07])
    x = torch.cat([all_codes(dtype), rounding_probes(dtype), specials])
    check_both_modes(x, dtype, device)
    # Every code's value comes back as that code: the 256 codes round-trip.
    q = fp8.quantize(all_codes(dtype).to(device), one(1.0, device), dtype, saturate=False).data
    assert torch.equal(q.float().cpu().nan_to_num(7.0), all_codes(dtype).nan_to_num(7.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
def test_nearest_matches_torch_on_random_fp32_bit_patterns(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    raw = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32)
    # Half of them moved into the format's range, where rounding (not overflow) decides.
    x[::2] = x[::2].nan_to_num(0.0).abs().clamp(max=1.0).mul(2 * MAX[dtype]) * torch.where(x[::2] < 0, -1.0, 1.0)
    check_both_modes(x, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", FP8)
def test_every_16_bit_input_matches_torch(device: str, src_dtype: torch.dtype, dtype: torch.dtype) -> None:
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(src_dtype)
    ours = fp8.quantize(x.to(device), one(1.0, device), dtype).data
    assert_same_codes(ours, saturated_reference(x.float(), dtype))


def test_quantize_cpu_capabilities_agree_bitwise(tmp_path) -> None:
    """The DEFAULT (scalar) and AVX2 (8 lanes of arithmetic on the fp32 bits, Philox on 8 groups at once) builds
    of the quantize give identical codes, amaxes and block scales, with either rounding: every 16-bit input,
    random fp32 bit patterns, odd lengths, a misaligned start, and 131-wide rows whose blocks start off the
    8-element Philox groups (a scalar head, vector groups, a scalar tail)."""
    g = torch.Generator().manual_seed(13)
    bits = torch.randint(-(2**31), 2**31, (4099,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    halves = [torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(d) for d in (torch.float16,
                                                                                                 torch.bfloat16)]
    inputs = [bits, bits.clamp(-1e3, 1e3).nan_to_num(5.0)] + halves
    script = """
        import mixprec.fp8 as fp8
        RESULT = []
        for x in INPUTS:
            for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                for saturate in (True, False):
                    q = fp8.quantize(x, torch.tensor([0.75]), dtype, saturate=saturate)
                    RESULT.append((q.data.view(torch.uint8), q.amax))
                    for start in (0, 5):
                        q = fp8.quantize(x[start:], torch.tensor([0.75]), dtype, saturate=saturate,
                                         rounding="stochastic", seed=3)
                        RESULT.append((q.data.view(torch.uint8), q.amax))
                m = x[: x.numel() // 131 * 131].reshape(-1, 131).nan_to_num(0.0)
                for rounding in ("nearest", "stochastic"):
                    b = fp8.quantize_blockwise(m, dtype, (1, 128), rounding=rounding, seed=4)
                    RESULT.append((b.data.view(torch.uint8), b.scale_inv))
    """
    assert_pairs_agree_across_cpu_capabilities(script, inputs, tmp_path, 64)


def test_stochastic_amax_counts_elements_before_a_philox_group() -> None:
    """A parallel piece may start off an 8-element Philox group (100002 elements on 2 threads: the second
    starts at 50001); its first elements run the scalar rule, and their magnitudes count in the amax."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for at in (50002, 50003, 50007):
            x = torch.full((100002,), 0.5)
            x[at] = -300.0
            for rounding in ("nearest", "stochastic"):
                q = fp8.quantize(x, torch.tensor([1.0]), torch.float8_e4m3fn, rounding=rounding, seed=1)
                assert q.amax.item() == 300.0, (at, rounding)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES)
def test_scaled_quantize_and_amax(device: str, dtype: torch.dtype, src_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 61, generator=g) * 5).to(src_dtype)
    x[3, 5] = -40.0
    scale = one(3.25, device)
    q = fp8.quantize(on_device(x, device), scale, dtype)
    # fp32 product, then the format's rounding: what x.float() * scale does in torch.
    assert_same_codes(q.data, (x.float() * 3.25).clamp(-MAX[dtype], MAX[dtype]).to(dtype))
    assert q.amax.shape == () and q.amax.dtype == torch.float32
    assert q.amax.item() == x.double().abs().max().item() == 40.0
    # Dequantized values are within half an fp8 ulp (relative 2^-(mantissa+1)) of the float64 product.
    mantissa = 3 if dtype == torch.float8_e4m3fn else 2
    exact = x.double() * 3.25
    err = (q.data.cpu().double() - exact).abs()
    normal = exact.abs() >= 2.0 ** (-6 if mantissa == 3 else -14)
    assert (err[normal] <= exact.abs()[normal] * 2.0 ** -(mantissa + 1)).all()
    assert q.data_t is None


@pytest.mark.parametrize("device", DEVICES)
# (2_100_000,): more 32-wide column tiles than a CUDA grid's y dimension holds (65535).
@pytest.mark.parametrize("shape", [(33, 65), (1, 7), (128, 128), (3, 5, 40), (17,), (0, 9), (9, 0), (2_100_000,)])
def test_transposed_copy_holds_the_same_codes(device: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape) * 30
    q = fp8.quantize(on_device(x, device), one(2.0, device), torch.float8_e4m3fn, transpose=True)
    rows = math.prod(shape[:-1])
    assert q.data_t is not None and q.data_t.shape == (shape[-1], rows) and q.data_t.is_contiguous()
    assert torch.equal(bits(q.data_t).cpu(), bits(q.data).cpu().reshape(rows, shape[-1]).t())
    assert_same_codes(q.data, (x * 2.0).clamp(-448, 448).to(torch.float8_e4m3fn))
    assert q.amax.item() == (x.abs().max().item() if x.numel() else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_misaligned_inputs(device: str) -> None:
    base = torch.randn(4099) * 100
    x = base[3:].reshape(128, 32)[:, 1:30].t()  # offset start, gaps and a transpose
    q = fp8.quantize(on_device(x, device), one(1.5, device), torch.float8_e5m2)
    assert_same_codes(q.data, (x * 1.5).to(torch.float8_e5m2))
    assert q.amax.item() == x.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_amax_propagates_nan_and_inf_and_is_zero_when_empty(device: str) -> None:
    x = torch.ones(1000)
    x[500] = -math.inf
    assert fp8.quantize(x.to(device), one(1.0, device)).amax.item() == math.inf
    x[600] = math.nan
    assert math.isnan(fp8.quantize(x.to(device), one(1.0, device)).amax.item())
    assert fp8.quantize(torch.empty(0, 4, device=device), one(1.0, device)).amax.item() == 0.0


# ---- stochastic rounding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(device: str, dtype: torch.dtype) -> None:
    grid = finite_grid(dtype)
    n = 1 << 16
    # Points between neighbours in the subnormal range, the normal range and the top binade.
    picks = [2, 5, len(grid) // 2, len(grid) - 3]
    for i in picks:
        lo, hi = grid[i].item(), grid[i + 1].item()
        for frac in (0.1, 0.5, 0.83):
            value = lo + frac * (hi - lo)
            x = torch.full((n,), value, dtype=torch.float32)
            for sign in (1.0, -1.0):
                q = fp8.quantize((sign * x).to(device), one(1.0, device), dtype, rounding="stochastic", seed=7).data
                v = q.cpu().double() * sign
                assert ((v == lo) | (v == hi)).all()
                p = (v == hi).double().mean().item()
                sigma = math.sqrt(frac * (1 - frac) / n)
                assert abs(p - frac) < 5 * sigma + 2.0**-16, (value, p, frac)
    # Values on the grid never move.
    g = torch.cat([grid, -grid]).float()
    exact = fp8.quantize(g.to(device), one(1.0, device), dtype, rounding="stochastic", seed=1).data
    assert torch.equal(exact.cpu().float(), g)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_seeded(device: str) -> None:
    x = (torch.randn(4097) * 10).to(device)
    a = fp8.quantize(x, one(1.0, device), rounding="stochastic", seed=5).data
    b = fp8.quantize(x, one(1.0, device), rounding="stochastic", seed=5).data
    c = fp8.quantize(x, one(1.0, device), rounding="stochastic", seed=6).data
    assert torch.equal(bits(a), bits(b)) and not torch.equal(bits(a), bits(c))
    torch.manual_seed(0)
    d = fp8.quantize(x, one(1.0, device), rounding="stochastic").data
    torch.manual_seed(0)
    e = fp8.quantize(x, one(1.0, device), rounding="stochastic").data
    assert torch.equal(bits(d), bits(e))
    # The transposed copy and the block-scaled path draw element i's bits from the same place.
    t = fp8.quantize(x.reshape(17, 241), one(1.0, device), rounding="stochastic", seed=5, transpose=True)
    assert torch.equal(bits(t.data).flatten(), bits(a)) and torch.equal(bits(t.data_t), bits(a).reshape(17, 241).t())


# ---- block scaling -----------------------------------------------------------------------------------------------


def reference_blockwise(x: torch.Tensor, dtype: torch.dtype, block: tuple[int, int], margin: int, pow2: bool):
    """Scales from float64 amaxes, then torch's own fp32 multiply and FP8 conversion, block by block."""
    m = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    rows, cols = m.shape
    br = rows if block[0] == -1 else block[0]
    bc = cols if block[1] == -1 else block[1]
    gr = 1 if block[0] == -1 else -(-rows // br)
    gc = 1 if block[1] == -1 else -(-cols // bc)
    data = torch.empty(rows, cols, dtype=dtype)
    scale_inv = torch.empty(gr, gc)
    for i in range(gr):
        for j in range(gc):
            blk = m[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            amax = blk.double().abs().max().item() if blk.numel() else 0.0
            if amax == 0 or not math.isfinite(amax):
                scale = torch.tensor(1.0)
            else:
                scale = torch.tensor(MAX[dtype], dtype=torch.float32) / torch.tensor(amax, dtype=torch.float32)
                scale = scale / 2.0**margin
                if pow2:
                    scale = torch.exp2(torch.floor(torch.log2(scale)))
            scale_inv[i, j] = 1.0 / scale
            data[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk * scale).clamp(-MAX[dtype], MAX[dtype]).to(dtype)
    return data.reshape(x.shape), scale_inv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "block,shape",
    [
        ((-1, -1), (300, 70)),  # per tensor
        ((1, -1), (33, 257)),  # row-wise
        ((1, 128), (5, 300)),  # activations and gradients, partial last block
        ((128, 128), (130, 200)),  # weights, partial blocks on both axes
        ((16, 8), (2, 3, 40)),  # 3-D input: leading dimensions are rows
        ((1, 128), (0, 128)),
        ((-1, -1), (0, 4)),
        ((-1, -1), ()),
    ],
)
@pytest.mark.parametrize("dtype", FP8)
def test_blockwise_matches_a_float64_reference(device, block, shape, dtype) -> None:
    g = torch.Generator().manual_seed(sum(shape) + block[0])
    x = torch.randn(shape, generator=g) * (torch.logspace(-3, 3, shape[-1]) if shape else 1.0)
    if x.numel() > 300:
        x.view(-1)[:200] = 0.0  # an all-zero block gets scale 1
    q = fp8.quantize_blockwise(on_device(x, device), dtype, block)
    data, scale_inv = reference_blockwise(x, dtype, block, 0, False)
    assert q.scale_inv.dtype == torch.float32 and q.scale_inv.shape == scale_inv.shape
    assert torch.equal(q.scale_inv.cpu(), scale_inv)
    assert_same_codes(q.data, data)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES)
def test_blockwise_margin_pow2_and_input_dtypes(device: str, src_dtype: torch.dtype) -> None:
    x = (torch.randn(64, 256) * 7).to(src_dtype)
    for margin, pow2 in [(0, True), (2, False), (3, True)]:
        q = fp8.quantize_blockwise(on_device(x, device), torch.float8_e4m3fn, (1, 128), margin=margin, pow2_scales=pow2)
        data, scale_inv = reference_blockwise(x, torch.float8_e4m3fn, (1, 128), margin, pow2)
        assert torch.equal(q.scale_inv.cpu(), scale_inv)
        assert_same_codes(q.data, data)
        if pow2:  # power-of-two scales: scale_inv is exact, a power of two too
            assert torch.equal(torch.exp2(torch.log2(q.scale_inv)), q.scale_inv)
    # Dequantization error per block is at most half an E4M3 ulp of the value (2^-4 relative).
    q = fp8.quantize_blockwise(x.to(device), torch.float8_e4m3fn, (1, 128))
    deq = q.data.cpu().double().reshape(64, 2, 128) * q.scale_inv.cpu().double().reshape(64, 2, 1)
    exact = x.double().reshape(64, 2, 128)
    amax = exact.abs().amax(-1, keepdim=True)
    normal = exact.abs() * 448 / amax >= 2.0**-6
    assert ((deq - exact).abs()[normal] <= exact.abs()[normal] * 2.0**-4 * (1 + 1e-6)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_stochastic_uses_the_same_draws_as_quantize(device: str) -> None:
    x = (torch.randn(8, 96) * 3).to(device)
    b = fp8.quantize_blockwise(x, torch.float8_e5m2, (-1, -1), pow2_scales=True, rounding="stochastic", seed=9)
    scale = (1.0 / b.scale_inv).reshape(1)
    q = fp8.quantize(x, scale, torch.float8_e5m2, rounding="stochastic", seed=9)
    assert torch.equal(bits(b.data), bits(q.data))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("block", [(-1, -1), (1, 128)])
def test_blockwise_stochastic_without_saturation_keeps_finite_blocks_finite(device, dtype, block) -> None:
    # An amax whose rounded scale puts it an fp32 ulp beyond the largest finite value (448.00003): stochastic
    # rounding must not carry it a step up to the overflow code, which one draw in 2^16 (16-bit draws) did.
    v = next(v for v in (1.0 + k / 1024 for k in range(1, 1024))
             if (torch.tensor(MAX[dtype]) / torch.tensor(v)) * torch.tensor(v) > MAX[dtype])
    x = torch.full((1 << 14, 128), v)  # 2^21 elements at the amax: about 32 overflows with the old rule
    x[1::2] = -v
    if block != (-1, -1):
        x[0, 0] = math.inf  # the first block, scaled by 1, still casts without saturation
    q = fp8.quantize_blockwise(on_device(x, device), dtype, block, rounding="stochastic", saturate=False, seed=3)
    codes = q.data.cpu().float()
    expect = x.sign() * MAX[dtype]
    if block != (-1, -1):
        assert math.isnan(codes[0, 0]) if dtype == torch.float8_e4m3fn else codes[0, 0] == math.inf
        codes, expect = codes.view(-1)[128:], expect.view(-1)[128:]
    assert torch.equal(codes, expect)


# ---- delayed scaling -----------------------------------------------------------------------------------------------


def reference_window(amaxes: list[list[float]], history: int, dtype: torch.dtype, algo: str, margin: int):
    """The scales delayed scaling must produce, step by step, from the rule in plain Python and float64."""
    scale = [1.0] * len(amaxes[0])
    window: list[list[float]] = []
    out = []
    for step in amaxes:
        window = [step] + window[: history - 1]
        for j in range(len(step)):
            col = [w[j] for w in window]
            a = col[0] if algo == "most_recent" else (math.nan if any(map(math.isnan, col)) else max(col))
            if a > 0 and math.isfinite(a):
                s = torch.tensor(MAX[dtype], dtype=torch.float32) / torch.tensor(a, dtype=torch.float32) / 2.0**margin
                scale[j] = s.item()
        out.append(list(scale))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_scaling_after_a_spike(device: str, algo: str) -> None:
    history, n = 4, 3
    amax_history = torch.zeros(history, n, device=device)
    scale = torch.ones(n, device=device)
    scale_inv = torch.ones(n, device=device)
    steps = [[1.0, 2.0, 0.5]] * 3 + [[1000.0, 2.0, 0.0]] + [[1.0, 2.0, math.inf]] * 5 + [[1.0, math.nan, 0.5]]
    expected = reference_window(steps, history, torch.float8_e4m3fn, algo, 1)
    for k, step in enumerate(steps):
        amax_history[0] = torch.tensor(step, device=device)
        fp8.update_scales_(amax_history, scale, scale_inv, torch.float8_e4m3fn, algo=algo, margin=1)
        assert scale.cpu().tolist() == expected[k], (k, scale.cpu().tolist(), expected[k])
        assert torch.equal(scale_inv.cpu(), 1.0 / scale.cpu())
        assert (amax_history[0] == 0).all()
    if algo == "max":
        # The spike (step 3) held column 0's scale down for exactly `history` steps, then it recovered.
        s0 = [e[0] for e in expected]
        spike = torch.tensor(448 / 1000 / 2, dtype=torch.float32).item()
        assert s0[3] == s0[6] == spike and s0[7] == s0[2] == 448 / 2 and s0[2] != spike


@pytest.mark.parametrize("device", DEVICES)
def test_update_scales_window_and_pow2(device: str) -> None:
    h = torch.tensor([[3.0, 0.0], [5.0, 7.0], [2.0, 1.0]], device=device)
    scale = torch.tensor([1.0, 4.0], device=device)
    scale_inv = torch.empty(2, device=device)
    versions = [t._version for t in (h, scale, scale_inv)]
    fp8.update_scales_(h, scale, scale_inv, torch.float8_e5m2, pow2_scales=True)
    # Written in place: autograd sees the new versions (a saved scale_inv would be caught).
    assert all(t._version > v for t, v in zip((h, scale, scale_inv), versions))
    # Column 0: max 5 -> 57344 / 5 = 11468.8 -> 8192; column 1: max 7 -> 8192.0 exactly -> 8192.
    assert scale.cpu().tolist() == [8192.0, 8192.0] and scale_inv.cpu().tolist() == [2.0**-13, 2.0**-13]
    assert h.cpu().tolist() == [[0.0, 0.0], [3.0, 0.0], [5.0, 7.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_update_scales_takes_turns(device: str) -> None:
    """With a turn, a side updates only when the other side (or any value but its own: an averaged 0.5, NaN,
    2 for both sides) updated last, and the turn then names it; an update that is not due leaves history and
    scales as they were. Without take_turn a due update marks the turn 2 and one not due leaves it. Checked
    against the same update without a turn on copies."""
    for turn_value in (0.0, 1.0, 2.0, 0.5, math.nan):
        for side in (0, 1):
            for take_turn in (True, False):
                h = torch.tensor([[3.0, 0.0], [5.0, 7.0], [2.0, 1.0]], device=device)
                scale, scale_inv = torch.tensor([1.0, 4.0], device=device), torch.full((2,), 0.25, device=device)
                ungated = [t.clone() for t in (h, scale, scale_inv)]
                fp8.update_scales_(*ungated, torch.float8_e5m2)
                due = turn_value != side  # NaN != side
                want = ungated if due else [t.clone() for t in (h, scale, scale_inv)]
                turn = torch.tensor([turn_value], device=device)
                fp8.update_scales_(h, scale, scale_inv, torch.float8_e5m2, turn=turn, side=side, take_turn=take_turn)
                assert all(torch.equal(a, b) for a, b in zip((h, scale, scale_inv), want)), (turn_value, side)
                want_turn = float(side) if take_turn else (2.0 if due else turn_value)
                assert turn.item() == want_turn or (math.isnan(want_turn) and math.isnan(turn.item()))
    # A forward, a second forward, a backward, a second backward: each side moves once.
    fwd = [torch.tensor([[2.0]], device=device), torch.ones(1, device=device), torch.ones(1, device=device)]
    bwd = [torch.tensor([[8.0]], device=device), torch.ones(1, device=device), torch.ones(1, device=device)]
    turn = torch.ones(1, device=device)
    for state, side, moved in ((fwd, 0, True), (fwd, 0, False), (bwd, 1, True), (bwd, 1, False)):
        before = state[1].clone()
        state[0].fill_(4.0)
        fp8.update_scales_(*state, torch.float8_e4m3fn, turn=turn, side=side)
        assert (not torch.equal(state[1], before)) == moved, (side, moved)
    # An empty history still passes the turn on.
    turn = torch.zeros(1, device=device)
    fp8.update_scales_(torch.zeros(4, 0, device=device), torch.ones(0, device=device), torch.ones(0, device=device),
                       turn=turn, side=1)
    assert turn.item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_delayed_recipe_round_trip(device: str) -> None:
    """quantize's amax feeds the history; the next step's scale maps that amax onto 448."""
    x = (torch.randn(64, 64) * 12).to(device)
    h = torch.zeros(8, 1, device=device)
    scale, scale_inv = torch.ones(1, device=device), torch.ones(1, device=device)
    q = fp8.quantize(x, scale, torch.float8_e4m3fn)
    h[0, 0] = q.amax
    fp8.update_scales_(h, scale, scale_inv, torch.float8_e4m3fn)
    q2 = fp8.quantize(x, scale, torch.float8_e4m3fn)
    assert q2.data.float().abs().max().item() == 448.0
    assert torch.allclose(q2.data.float() * scale_inv, x, rtol=2**-4, atol=0)


# ---- opcheck, compile, C++ parity of max_finite, errors --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x = torch.randn(6, 40, device=device)
    s = one(2.0, device)
    for args in [(x, s, torch.float8_e4m3fn, "nearest", True, None, False),
                 (x.half(), s, torch.float8_e5m2, "stochastic", False, 3, True)]:
        torch.library.opcheck(torch.ops.mixprec.fp8_quantize.default, args)
    torch.library.opcheck(torch.ops.mixprec.fp8_quantize_blockwise.default,
                          (x, torch.float8_e4m3fn, 1, 16, 1, True, "nearest", True, None))
    torch.library.opcheck(torch.ops.mixprec.fp8_quantize_blockwise.default,
                          (x.bfloat16(), torch.float8_e5m2, -1, -1, 0, False, "stochastic", True, 4))
    h = torch.rand(4, 3, device=device)
    for turn, take_turn in ((None, True), (torch.zeros(1, device=device), True), (torch.ones(1, device=device), False)):
        torch.library.opcheck(torch.ops.mixprec.fp8_update_scales_.default,
                              (h.clone(), torch.ones(3, device=device), torch.ones(3, device=device),
                               torch.float8_e4m3fn, "max", 0, False, turn, 0, take_turn))


def test_max_finite() -> None:
    assert fp8.max_finite(torch.float8_e4m3fn) == torch.finfo(torch.float8_e4m3fn).max
    assert fp8.max_finite(torch.float8_e5m2) == torch.finfo(torch.float8_e5m2).max
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        fp8.max_finite(torch.float16)


def test_bad_input_names_the_argument() -> None:
    x = torch.randn(4, 4)
    s = one(1.0)
    with pytest.raises(ValueError, match=r"fp8_quantize: dtype must be torch.float8_e4m3fn or torch.float8_e5m2"):
        fp8.quantize(x, s, torch.float16)
    with pytest.raises(ValueError, match="got Float8_e4m3fnuz"):
        fp8.quantize(x, s, torch.float8_e4m3fnuz)
    with pytest.raises(RuntimeError, match="input must be float32, float16 or bfloat16, got Int"):
        fp8.quantize(torch.ones(3, dtype=torch.int32), s)
    with pytest.raises(RuntimeError, match="scale must be a one-element Float tensor, got 2 elements"):
        fp8.quantize(x, torch.ones(2), torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="scale must be a one-element Float tensor, got dtype Double"):
        fp8.quantize(x, torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match='rounding must be "nearest" or "stochastic", got "up"'):
        fp8.quantize(x, s, rounding="up")
    with pytest.raises(RuntimeError, match="input must be a dense"):
        fp8.quantize(x.to_sparse(), s)
    with pytest.raises(ValueError, match="block_rows must be positive or -1"):
        fp8.quantize_blockwise(x, block=(0, 4))
    with pytest.raises(ValueError, match="block_cols must be positive or -1"):
        fp8.quantize_blockwise(x, block=(1, -2))
    with pytest.raises(ValueError, match=r"margin must be in \[0, 32\]"):
        fp8.quantize_blockwise(x, block=(1, 4), margin=-1)
    with pytest.raises(ValueError, match="block must be"):
        fp8.quantize_blockwise(x, block=(1,))  # type: ignore[arg-type]


def test_bad_update_writes_nothing() -> None:
    h = torch.rand(3, 2)
    scale = torch.ones(2)
    scale_inv = torch.ones(2)
    before = (h.clone(), scale.clone(), scale_inv.clone())
    cases = [
        (dict(algo="mean"), ValueError, 'algo must be "max" or "most_recent", got "mean"'),
        (dict(margin=40), ValueError, r"margin must be in \[0, 32\]"),
        (dict(scale=torch.ones(3)), RuntimeError, r"scale must have shape \[2\]"),
        (dict(scale_inv=torch.ones(2, dtype=torch.float64)), RuntimeError, "scale_inv must be float32"),
        (dict(amax_history=torch.rand(2)), RuntimeError, r"amax_history must be a \[history, n\] matrix"),
        (dict(amax_history=torch.rand(2, 3)[:, :2]), RuntimeError, "amax_history must be a contiguous"),
        (dict(dtype=torch.bfloat16), ValueError, "dtype must be torch.float8_e4m3fn"),
        (dict(turn=torch.zeros(2)), RuntimeError, r"turn must be a one-element float32 tensor, got .* shape \[2\]"),
        (dict(turn=torch.zeros(1, dtype=torch.float64)), RuntimeError, "turn must be a one-element float32"),
        (dict(turn=torch.zeros(1), side=2), ValueError, "side must be 0 .* or 1 .*, got 2"),
        (dict(turn=h[0, :1]), RuntimeError, "turn shares memory with amax_history"),
    ]
    for overrides, error, message in cases:
        args = dict(amax_history=h, scale=scale, scale_inv=scale_inv, dtype=torch.float8_e4m3fn)
        kwargs = {k: overrides.pop(k) for k in list(overrides) if k in ("algo", "margin", "turn", "side")}
        args.update(overrides)
        with pytest.raises(error, match=message):
            fp8.update_scales_(args["amax_history"], args["scale"], args["scale_inv"], args["dtype"], **kwargs)
    assert all(torch.equal(a, b) for a, b in zip((h, scale, scale_inv), before))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU to place tensors on two devices")
def test_scale_on_another_device_is_refused() -> None:
    with pytest.raises(RuntimeError, match="scale must be on cuda:0"):
        fp8.quantize(torch.ones(4, device="cuda"), one(1.0))


def test_package_exports() -> None:
    assert mixprec.fp8 is fp8 and set(fp8.__all__) <= set(dir(fp8))


# ---- scaled GEMMs ------------------------------------------------------------------------------------------------


def expand_scale(scale_inv: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """scale_inv broadcast to its [rows, k] operand, in float64, from the layout rules (independently of
    the kernels' own expansion)."""
    s = scale_inv.double().cpu()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, k)
    br = 1 if s.shape[0] == rows else 128
    bc = k if s.shape[1] == 1 else 128
    r = torch.arange(rows) // br
    c = torch.arange(k) // bc
    return s[r][:, c]


def gemm_reference(a, b, sa, sb, tensor_cores: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product in float64 and the bound of an fp32 computation of it: the two dequantizing
    products (one rounding each) and k additions, each within 2^-24 relative, over sum |a_i b_i|.

    ``tensor_cores``: the GEMM runs on FP8 tensor cores (cuBLASLt, sm_89+), which add their products in an
    accumulator narrower than fp32 (about 14 bits, truncated; DeepSeek-V3 section 3.3.2) that cuBLASLt
    promotes to fp32 every few MMAs: an empirical allowance of 2^-12 of sum |a_i b_i| more, still far below
    what a wrong scale, block or layout gives (about 1/sqrt(k) of the sum here). The emulation keeps the
    fp32 bound."""
    m, k = a.shape
    n = b.shape[0]
    a64 = a.cpu().double() * expand_scale(sa, m, k)
    b64 = b.cpu().double() * expand_scale(sb, n, k)
    exact = a64 @ b64.t()
    magnitude = a64.abs() @ b64.abs().t()
    bound = (k + 2) * 2.0**-24 * magnitude * 1.01
    if tensor_cores:
        bound = bound + 2.0**-12 * magnitude
    return exact, bound


def runs_on_tensor_cores(device: str, types, granularity: str) -> bool:
    """Whether fp8.gemm takes cuBLASLt's FP8 kernels for these operands (fp8_gemm.cpp's choice; what it turns
    down runs the emulation): per-tensor scales on sm_89+, row-wise ones on sm_90+, never E5M2 x E5M2."""
    if device != "cuda" or types == (torch.float8_e5m2, torch.float8_e5m2):
        return False
    cc = torch.cuda.get_device_capability()
    return (granularity == "tensor" and cc >= (8, 9)) or (granularity == "row" and cc >= (9, 0))


GRANULARITIES = {
    "tensor": ((-1, -1), (-1, -1)),
    "row": ((1, -1), (1, -1)),
    "block": ((1, 128), (128, 128)),
    "tensor x row": ((-1, -1), (1, -1)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("types", [(torch.float8_e4m3fn, torch.float8_e4m3fn), (torch.float8_e4m3fn, torch.float8_e5m2),
                                   (torch.float8_e5m2, torch.float8_e5m2)])
def test_gemm_matches_float64_within_fp32_rounding(device: str, granularity: str, types) -> None:
    g = torch.Generator().manual_seed(4)
    m, n, k = 48, 80, 272  # multiples of 16 (CUDA), k not of 128 (partial blocks)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)
    w = torch.randn(n, k, generator=g) * 0.1
    (ba, bb) = GRANULARITIES[granularity]
    qa = fp8.quantize_blockwise(x.to(device), types[0], ba, pow2_scales=granularity == "row")
    qb = fp8.quantize_blockwise(w.to(device), types[1], bb)
    exact, bound = gemm_reference(qa.data, qb.data, qa.scale_inv, qb.scale_inv,
                                  runs_on_tensor_cores(device, types, granularity))
    out = fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert ((out.cpu().double() - exact).abs() <= bound).all()
    # bf16 output: the fp32 result rounded once more (half a bf16 ulp, 2^-9 relative).
    out16 = fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    assert ((out16.cpu().double() - exact).abs() <= bound + exact.abs() * 2.0**-8).all()
    # And it is a matmul of the original operands within FP8's precision.
    rel = (out.cpu() - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < (0.15 if torch.float8_e5m2 in types else 0.08)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="cuBLASLt's 1x128 / 128x128 block-scale modes exist on sm_90 only")
@pytest.mark.parametrize("blocks", [((1, 128), (128, 128)), ((128, 128), (1, 128)), ((1, 128), (1, 128))])
def test_cuda_block_scaled_gemms_in_cublaslt(blocks, monkeypatch: pytest.MonkeyPatch) -> None:
    """MIXPREC_FP8_BLOCK_CUBLASLT=1 on Hopper: DeepSeek-V3's three block-scaled GEMMs (forward, input gradient,
    weight gradient) run in cuBLASLt's VEC128 / BLK128x128 modes (MIXPREC_FP8_GEMM_STRICT: no fallback to the
    emulation), within the fp32 rounding bound of the float64 product, for k with a partial last block and
    rows not a multiple of 128; the accumulating form adds into its fp32 output."""
    monkeypatch.setenv("MIXPREC_FP8_BLOCK_CUBLASLT", "1")
    monkeypatch.setenv("MIXPREC_FP8_GEMM_STRICT", "1")
    g = torch.Generator().manual_seed(21)
    for m, n, k in ((48, 80, 272), (256, 384, 512), (144, 400, 640)):
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)
        w = torch.randn(n, k, generator=g) * 0.1
        qa = fp8.quantize_blockwise(x.cuda(), torch.float8_e4m3fn, blocks[0])
        qb = fp8.quantize_blockwise(w.cuda(), torch.float8_e4m3fn, blocks[1])
        exact, bound = gemm_reference(qa.data, qb.data, qa.scale_inv, qb.scale_inv, tensor_cores=True)
        for out_dtype in (torch.float32, torch.bfloat16):
            out = fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, out_dtype)
            slack = 0 if out_dtype == torch.float32 else exact.abs() * 2.0**-8
            assert ((out.cpu().double() - exact).abs() <= bound + slack).all(), (m, n, k, out_dtype)
        start = torch.randn(m, n, generator=g)
        acc = start.cuda()
        fp8.gemm_accum_(acc, qa.data, qb.data, qa.scale_inv, qb.scale_inv)
        assert ((acc.cpu().double() - (exact + start.double())).abs() <= bound + start.double().abs() * 2.0**-23).all()


def dequantize_reference(data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """torch's own code conversion, the scale expanded over its blocks, the product in float64 rounded once to
    fp32 (exact: an fp8 value has at most 4 significant bits)."""
    rows, k = data.shape
    s = scale_inv.double().cpu()
    if s.numel() != 1:
        br = 1 if s.shape[0] == rows else 128
        bc = k if s.shape[1] == 1 else 128
        s = s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :k]
    return (data.cpu().to(torch.float64) * s).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8)
def test_dequantize_every_code_and_scale_layout(device: str, dtype: torch.dtype) -> None:
    """All 256 codes (NaN and inf included) in a 200 x 300 matrix (odd sizes: vector tails and partial blocks),
    contiguous, transposed and misaligned, under every scale layout gemm takes."""
    g = torch.Generator().manual_seed(13)
    codes = torch.randint(0, 256, (200, 300), generator=g, dtype=torch.uint8)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    data = codes.view(dtype)
    layouts = [torch.tensor([0.375]), torch.rand(200, 1, generator=g) + 0.5, torch.rand(200, 3, generator=g) + 0.5,
               torch.rand(2, 3, generator=g) + 0.5]
    offset = torch.empty(200 * 300 + 1, dtype=torch.uint8)[1:].view(200, 300)  # starts one byte off
    offset.copy_(codes)
    for x in (data, data.t().contiguous().t(), offset.view(dtype)):
        for s in layouts:
            got = fp8.dequantize(on_device(x, device), s.to(device))
            assert got.dtype == torch.float32 and got.shape == x.shape
            torch.testing.assert_close(got.cpu(), dequantize_reference(x, s), rtol=0, atol=0, equal_nan=True)
    assert fp8.dequantize(data[:0].to(device), one(1.0, device)).shape == (0, 300)
    # As for fp8_gemm: torch's schema check has no FP8 multiply; every other opcheck test runs.
    finite = torch.randn(16, 32, generator=g).to(dtype).to(device)  # opcheck compares outputs: no NaN codes
    torch.library.opcheck(torch.ops.mixprec.fp8_dequantize.default, (finite, layouts[1][:16].to(device)),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    with pytest.raises(RuntimeError, match=r"scale_inv must have shape"):
        fp8.dequantize(data.to(device), torch.ones(7, 1, device=device))
    with pytest.raises(RuntimeError, match="data must be a 2-D matrix"):
        fp8.dequantize(data.reshape(-1).to(device), one(1.0, device))


def test_dequantize_default_and_avx2_agree(tmp_path) -> None:
    codes = torch.arange(256, dtype=torch.uint8).repeat(37)[:9001]
    inputs = {"codes": codes, "scales": [torch.tensor([0.375]), torch.tensor([3.0e-39]), torch.tensor([1e30])]}
    script = """
    RESULT = []
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        data = INPUTS["codes"].view(dtype).reshape(1, -1)
        for s in INPUTS["scales"]:
            RESULT.append((data.view(torch.uint8), mixprec.fp8.dequantize(data, s)))
    """
    assert_pairs_agree_across_cpu_capabilities(script, inputs, tmp_path, 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rowwise", [False, True])
def test_gemm_bias_joins_the_product_before_the_one_rounding(device: str, out_dtype: torch.dtype, rowwise: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The bias joins the fp32 product before the one rounding to out_dtype: exact data (conftest's
    exact_bias_case) gives the correctly rounded float64 result, which rounding twice misses. On a GPU with
    FP8 tensor cores, per-tensor scales with a 16-bit output must take cuBLASLt's bias epilogue
    (MIXPREC_FP8_GEMM_STRICT turns a fallback to the emulation into an error), and torch._scaled_mm, which
    takes the same path, gives the same bits."""
    case = exact_bias_case(12, rowwise)
    qa, qb = case.a.to(torch.float8_e4m3fn).to(device), case.b.to(torch.float8_e4m3fn).to(device)
    sa, sb, bias = case.sa.to(device), case.sb.to(device), case.bias.to(device)
    epilogue = (device == "cuda" and not rowwise and out_dtype != torch.float32
                and torch.cuda.get_device_capability() >= (8, 9))
    if epilogue:
        monkeypatch.setenv("MIXPREC_FP8_GEMM_STRICT", "1")
    got = fp8.gemm(qa, qb, sa, sb, out_dtype, bias)
    assert got.dtype == out_dtype and torch.equal(got.cpu(), case.want(out_dtype))
    if epilogue:
        theirs = torch._scaled_mm(qa, qb.t(), sa.reshape(()), sb.reshape(()), bias=bias.to(out_dtype),
                                  out_dtype=out_dtype)
        assert torch.equal(theirs, got)
    if out_dtype != torch.float32:  # the check can fail: rounding twice gives other bits here
        assert not torch.equal(case.rounded_twice(out_dtype), case.want(out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_bias_fast_accum_and_accumulation(device: str) -> None:
    g = torch.Generator().manual_seed(8)
    a32, b32 = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)
    qa = fp8.quantize_blockwise(a32.to(device), torch.float8_e4m3fn, (-1, -1))
    qb = fp8.quantize_blockwise(b32.to(device), torch.float8_e4m3fn, (-1, -1))
    exact, bound = gemm_reference(qa.data, qb.data, qa.scale_inv, qb.scale_inv,
                                  runs_on_tensor_cores(device, (torch.float8_e4m3fn,) * 2, "tensor"))
    bias = torch.randn(16, generator=g).to(device)
    out = fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.float32, bias)
    assert ((out.cpu().double() - exact - bias.cpu().double()).abs() <= bound + 1e-6).all()
    fast = fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.float32, use_fast_accum=True)
    if device == "cpu":  # every CPU sum is fp32 anyway
        assert torch.equal(fast, fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.float32))
    else:
        assert ((fast.cpu().double() - exact).abs() <= 2 * bound + exact.abs() * 2.0**-10).all()
    # beta = 1: accumulate into an fp32 main_grad twice.
    acc0 = torch.randn(32, 16, generator=g)
    acc = acc0.clone().to(device)
    fp8.gemm_accum_(acc, qa.data, qb.data, qa.scale_inv, qb.scale_inv)
    fp8.gemm_accum_(acc, qa.data, qb.data, qa.scale_inv, qb.scale_inv)
    expected = acc0.double() + 2 * exact
    assert ((acc.cpu().double() - expected).abs() <= 2 * bound + acc0.abs().double() * 2.0**-23 + 1e-6).all()


def reduced_precision_case() -> tuple:
    """Block-scaled operands, the fp32 result of the exact float64 sum over the dequantized operands
    (dequantize_reference), and the same with an fp32 accumulator added before that one rounding."""
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(32, 272, generator=g) * 4, torch.randn(48, 272, generator=g)
    qa = fp8.quantize_blockwise(x, torch.float8_e4m3fn, (1, 128))
    qb = fp8.quantize_blockwise(w, torch.float8_e4m3fn, (128, 128))
    a64 = dequantize_reference(qa.data, qa.scale_inv).double()
    b64 = dequantize_reference(qb.data, qb.scale_inv).double()
    acc0 = torch.randn(32, 48, generator=g)
    return qa, qb, (a64 @ b64.t()).float(), (acc0.double() + a64 @ b64.t()).float(), acc0


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_cpu_gemm_sums_exactly_under_reduced_matmul_precision(precision: str) -> None:
    """torch's reduced fp32 matmul precision lets the CPU GEMM use bf16 or TF32 products; the emulation is the
    reference, so it sums in float64 then and rounds once: the result equals the float64 sum rounded to fp32
    (an fp32 GEMM of k = 272 terms misses those bits, so this can fail), for gemm and for gemm_accum_."""
    qa, qb, want, want_acc, acc0 = reduced_precision_case()
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert torch.equal(fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.float32), want)
        acc = acc0.clone()
        fp8.gemm_accum_(acc, qa.data, qb.data, qa.scale_inv, qb.scale_inv)
        assert torch.equal(acc, want_acc)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_cpu_gemm_sums_exactly_under_torchs_per_backend_precision() -> None:
    """The same under torch's per-backend API (torch.backends.mkldnn.matmul.fp32_precision = 'bf16'), which
    makes the legacy precision query raise. A fresh process: the setting is global and would make every later
    legacy query in this one raise too."""
    script = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import torch\n"
        "from mixprec import fp8\n"
        "import test_fp8 as t\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'\n"
        "qa, qb, want, want_acc, acc0 = t.reduced_precision_case()\n"
        "assert torch.equal(fp8.gemm(qa.data, qb.data, qa.scale_inv, qb.scale_inv, torch.float32), want)\n"
        "fp8.gemm_accum_(acc0, qa.data, qb.data, qa.scale_inv, qb.scale_inv)\n"
        "assert torch.equal(acc0, want_acc)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], check=True)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cpu_gemm_equals_torchs_scaled_mm_where_torch_has_the_granularity(out_dtype: torch.dtype) -> None:
    """On the CPU torch._scaled_mm takes per-tensor and row-wise scales; there the emulation (dequantize, one
    fp32 GEMM, one rounding) gives its bits exactly (so it serves as the CPU path for every granularity, and
    it is as fast here), with a bias too (in the output's dtype, added before the rounding by both)."""
    torch.manual_seed(7)
    m, k, n = 64, 256, 48
    a = (torch.randn(m, k) * 3).to(torch.float8_e4m3fn)
    b = torch.randn(n, k).to(torch.float8_e5m2)
    per_tensor = (torch.tensor(0.75), torch.tensor(1.5))
    rowwise = (torch.rand(m, 1) + 0.5, torch.rand(n, 1) + 0.5)
    for sa, sb in (per_tensor, rowwise):
        ours = fp8.gemm(a, b, sa.reshape(-1, 1) if sa.dim() else sa.reshape(1), sb.reshape(-1, 1) if sb.dim() else
                        sb.reshape(1), out_dtype)
        try:
            theirs = torch._scaled_mm(a, b.t(), sa, sb.t() if sb.dim() else sb, out_dtype=out_dtype)
        except (RuntimeError, NotImplementedError) as e:  # an older torch's CPU _scaled_mm may lack it
            pytest.skip(f"this torch's CPU _scaled_mm refuses these scales: {e}")
        assert torch.equal(ours, theirs)
    bias = torch.randn(n).to(out_dtype)
    for sa, sb in (per_tensor, rowwise):
        try:
            theirs = torch._scaled_mm(a, b.t(), sa, sb.t() if sb.dim() else sb, bias=bias, out_dtype=out_dtype)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"this torch's CPU _scaled_mm refuses a bias here: {e}")
        ours = fp8.gemm(a, b, sa.reshape(-1, 1) if sa.dim() else sa.reshape(1), sb.reshape(-1, 1) if sb.dim() else
                        sb.reshape(1), out_dtype, bias=bias)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_empty_shapes(device: str) -> None:
    s = one(1.0, device)
    for m, n, k in [(0, 16, 32), (16, 0, 32), (16, 16, 0)]:
        a = torch.zeros(m, k, device=device).to(torch.float8_e4m3fn)
        b = torch.zeros(n, k, device=device).to(torch.float8_e4m3fn)
        out = fp8.gemm(a, b, s, s, torch.float32)
        assert out.shape == (m, n) and (out == 0).all()
        acc = torch.ones(m, n, device=device)
        fp8.gemm_accum_(acc, a, b, s, s)
        assert (acc == 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_opcheck(device: str) -> None:
    a = torch.randn(32, 48, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(16, 48, device=device).to(torch.float8_e4m3fn)
    s = one(0.5, device)
    # torch's schema check (SchemaCheckMode) compares inputs before and after with a multiply that has no
    # FP8 kernel, so it cannot run on FP8 inputs; every other opcheck test does.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.mixprec.fp8_gemm.default, (a, b, s, s, torch.bfloat16, None, False),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.mixprec.fp8_gemm.default,
                          (a, b, torch.rand(32, 1, device=device), torch.rand(1, 1, device=device), torch.float32,
                           torch.randn(16, device=device), False), test_utils=utils)
    torch.library.opcheck(torch.ops.mixprec.fp8_gemm_accum_.default, (torch.zeros(32, 16, device=device), a, b, s, s),
                          test_utils=utils)


def test_gemm_bad_input_names_the_argument() -> None:
    a = torch.randn(32, 48).to(torch.float8_e4m3fn)
    b = torch.randn(16, 48).to(torch.float8_e4m3fn)
    s = one(1.0)
    cases = [
        (lambda: fp8.gemm(a.float(), b, s, s), ValueError, "mixprec::fp8_gemm: a must be torch.float8_e4m3fn or"),
        (lambda: fp8.gemm(a, b.float(), s, s), ValueError, "mixprec::fp8_gemm: b must be torch.float8_e4m3fn or"),
        (lambda: fp8.dequantize(a.float(), s), ValueError, "mixprec::fp8_dequantize: data must be torch.float8_"),
        (lambda: fp8.gemm(a, b[:, :40], s, s), RuntimeError, r"a \[m, k\] and b \[n, k\] must share k"),
        (lambda: fp8.gemm(a.reshape(2, 16, 48), b, s, s), RuntimeError, "a must be a 2-D matrix"),
        (lambda: fp8.gemm(a, b, torch.ones(32, 2), s), RuntimeError,
         r"a_scale_inv must have shape \[1\] \(per tensor\), \[32, 1\] \(per row\), \[32, 1\] \(1x128 blocks\)"),
        (lambda: fp8.gemm(a, b, s, s.double()), RuntimeError, "b_scale_inv must be float32"),
        (lambda: fp8.gemm(a, b, s, s, torch.int32), ValueError, "out_dtype must be float32, bfloat16 or float16"),
        (lambda: fp8.gemm(a, b, s, s, bias=torch.ones(32)), RuntimeError, r"bias must have shape \[16\]"),
        (lambda: fp8.gemm_accum_(torch.zeros(32, 16).bfloat16(), a, b, s, s), RuntimeError, "out must be float32"),
        (lambda: fp8.gemm_accum_(torch.zeros(16, 32), a, b, s, s), RuntimeError, r"out must have shape \[32, 16\]"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # A valid accumulator with a bad operand or scale is left as it was.
    out = torch.full((32, 16), 3.0)
    for bad in ((a, b[:, :40], s, s), (a, b, torch.ones(32, 2), s), (a.float(), b, s, s), (a, b, s, s.double())):
        with pytest.raises((RuntimeError, ValueError)):
            fp8.gemm_accum_(out, *bad)
        assert torch.equal(out, torch.full((32, 16), 3.0))


@pytest.mark.skipif(not HAS_CUDA, reason="the multiple-of-16 rule is CUDA's (cuBLASLt's FP8 kernels)")
def test_gemm_on_cuda_wants_multiples_of_16() -> None:
    a = torch.randn(24, 48, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(16, 48, device="cuda").to(torch.float8_e4m3fn)
    s = one(1.0, "cuda")
    with pytest.raises(RuntimeError, match="must be a multiple of 16 .* got m=24, n=16, k=48"):
        fp8.gemm(a, b, s, s)


@pytest.mark.parametrize("call", [
    lambda m: fp8.gemm(torch.ones(4, 16).to(torch.float8_e4m3fn), torch.ones(3, 16).to(torch.float8_e4m3fn), m,
                       torch.ones(1), torch.float32),
    lambda m: fp8.quantize(torch.full((2, 8), 3.0), m),
    lambda m: fp8.update_scales_(torch.zeros(4, 1), torch.ones(1), m),
    lambda m: mixprec.int8.mm(torch.ones(4, 16, dtype=torch.int8), torch.ones(16, 3, dtype=torch.int8), m,
                              torch.ones(1, 3), torch.float32),
])
def test_a_meta_tensor_among_tensors_with_data_is_refused(call) -> None:
    """The fake kernels also serve as Meta kernels: a meta scale with CPU operands must not give uninitialised
    memory as a result (FakeTensors, which report their fake device, trace as before)."""
    with pytest.raises(RuntimeError, match="every tensor must be on one device, got meta tensors with cpu"):
        call(torch.ones(1, device="meta"))


@pytest.mark.parametrize("pow2", [False, True])
def test_a_huge_amax_with_a_margin_keeps_a_finite_dequantization_factor(pow2: bool) -> None:
    """448 / 3e38 / 2^10 is below 2^-128: its reciprocal would be inf and every code would dequantize to NaN.
    The scale stops at 2^-126 (exact reciprocal), which still keeps every finite value in the format."""
    x = torch.tensor([[3.0e38, -1e38, 1e37]])
    q = fp8.quantize_blockwise(x, torch.float8_e4m3fn, (1, -1), margin=10, pow2_scales=pow2)
    assert q.scale_inv.item() == 2.0**126
    back = fp8.dequantize(q.data, q.scale_inv)
    assert torch.isfinite(back).all()
    assert torch.allclose(back.double(), x.double(), rtol=2**-4, atol=0)  # half an E4M3 ulp
    history, scale, scale_inv = torch.tensor([[3.0e38]]), torch.ones(1), torch.ones(1)
    fp8.update_scales_(history, scale, scale_inv, torch.float8_e4m3fn, margin=10, pow2_scales=pow2)
    assert (scale.item(), scale_inv.item()) == (2.0**-126, 2.0**126)
