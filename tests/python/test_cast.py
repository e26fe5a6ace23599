"""cast / cast_ / split_bf16_remainder / merge_bf16_remainder: bit-exact nearest, unbiased stochastic
rounding, saturation, exact remainders; CPU and (when present) CUDA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, requires_cuda, run_with_cpu_capability

from mixprec import ops

LOW_PRECISION = [torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def assert_same_bits_or_both_nan(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a_nan, e_nan = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(a_nan, e_nan), "NaN positions differ"
    keep = ~a_nan
    mismatched = (bits(actual)[keep] != bits(expected)[keep]).sum().item()
    assert mismatched == 0, f"{mismatched} values differ from the reference bits"


def random_float_bits(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)


def special_floats() -> torch.Tensor:
    as_bits = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x00000001,
               0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,
               0x3F808000, 0x3F818000, 0x3F808001]  # last three: bf16 ties to even (down, up) and above a tie
    values = [65504.0, 65519.0, 65519.996, 65520.0, 65536.0, -65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.5,
              2.0**-26, 6.103515625e-05, 6.097555160522461e-05, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 3.0e38, -3.4e38]
    t = torch.tensor(values, dtype=torch.float32)
    b = torch.tensor([x - 2**32 if x >= 2**31 else x for x in as_bits], dtype=torch.int32).view(torch.float32)
    return torch.cat([t, b])


# ---- nearest -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_nearest_matches_tensor_to_on_random_bit_patterns(device: str, dtype: torch.dtype) -> None:
    x = torch.cat([random_float_bits(1 << 22, seed=11), special_floats()]).to(device)
    assert_same_bits_or_both_nan(ops.cast(x, dtype), x.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_every_16_bit_value_round_trips(device: str, dtype: torch.dtype) -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    wide = ops.cast(every, torch.float32)
    assert_same_bits_or_both_nan(wide, every.to(torch.float32))
    assert_same_bits_or_both_nan(ops.cast(wide, dtype), every)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    assert_same_bits_or_both_nan(ops.cast(every, other), every.to(other))


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_sizes(device: str) -> None:
    torch.manual_seed(0)
    for n in (0, 1, 3, 4, 5, 15, 16, 17, 65537):
        x = torch.randn(n, device=device) * 1000
        assert torch.equal(ops.cast(x, torch.float16), x.half())
    t = torch.randn(33, 20, device=device).t()  # dense, permuted: output keeps the layout
    out = ops.cast(t, torch.bfloat16)
    assert out.stride() == t.stride() and torch.equal(out, t.bfloat16())
    s = torch.randn(40, 30, device=device)[::3, 1::2]  # strided with gaps
    assert torch.equal(ops.cast(s, torch.float16), s.half())


def test_cpu_capabilities_agree_bitwise(tmp_path) -> None:
    """DEFAULT and AVX2 builds of the cast kernel agree bit for bit, in every mode."""
    x = torch.cat([random_float_bits(1 << 20, seed=5), special_floats()])
    x = x[~torch.isnan(x)]
    script = """
        x = INPUTS
        RESULT = [mixprec.ops.cast(x, dt, r, s, seed=9).view(torch.int16)
                  for dt in (torch.float16, torch.bfloat16) for r in ("nearest", "stochastic") for s in (False, True)]
        RESULT.append(mixprec.ops.cast(x.half(), torch.float32).view(torch.int32))
        RESULT.append(mixprec.ops.cast(x.bfloat16(), torch.float32).view(torch.int32))
    """
    a = run_with_cpu_capability("default", script, x, tmp_path)
    b = run_with_cpu_capability(None, script, x, tmp_path)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"result {i} differs between capabilities"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_stochastic_nan_keeps_its_sign_in_every_path(device: str, dtype: torch.dtype) -> None:
    """NaNs of either sign, with or without payload bits, in the vector body (64-element blocks) and the scalar
    tail alike, become the quiet NaN with the input's sign and no payload (fp16 0x7e00, bf16 0x7fc0), on every
    device: a seeded cast promises the same bits everywhere, and c10's own fp16 conversion of a NaN differs
    by device (canonical 0x7fff on CUDA) and build (F16C keeps payload bits). Infinities keep their sign."""
    patterns = torch.tensor([0x7FC00000, 0xFFC00000, 0x3F800000, 0x7F800001, 0xFFA5A5A5, 0x7FFFFFFF, 0x7F800000,
                             0xFF800000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = patterns.repeat(25).to(device)  # 200 elements: vector blocks and a tail
    out = ops.cast(x, dtype, "stochastic", seed=3).view(torch.int16).cpu().to(torch.int64) & 0xFFFF
    quiet, inf = (0x7E00, 0x7C00) if dtype == torch.float16 else (0x7FC0, 0x7F80)
    sign = torch.signbit(x.cpu()).to(torch.int64) * 0x8000
    want = torch.where(torch.isnan(x.cpu()), sign | quiet, torch.where(torch.isinf(x.cpu()), sign | inf, out))
    assert torch.equal(out, want)
    assert (out[2::8] == (0x3C00 if dtype == torch.float16 else 0x3F80)).all()  # 1.0 stays 1.0


# ---- cast_ (lists) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_cast_list_of_mixed_pairs(device: str) -> None:
    torch.manual_seed(1)
    src = [
        torch.randn(1000, device=device),
        torch.randn(7, 9, device=device).to(torch.bfloat16),
        torch.randn(300, device=device).to(torch.float16),
        torch.randn(5, device=device),
        torch.randn(0, device=device),
        torch.randn(20, 30, device=device).t(),  # src transposed, dst contiguous
        torch.randn(70001, device=device),
    ]
    dst = [
        torch.empty(1000, device=device, dtype=torch.bfloat16),
        torch.empty(7, 9, device=device),
        torch.empty(300, device=device, dtype=torch.bfloat16),
        torch.empty(5, device=device),
        torch.empty(0, device=device, dtype=torch.float16),
        torch.empty(30, 20, device=device, dtype=torch.float16),
        torch.empty(70001 * 2, device=device, dtype=torch.float16)[::2],  # dst strided with gaps
    ]
    ops.cast_(dst, src)
    for d, s in zip(dst, src):
        assert torch.equal(d, s.to(d.dtype))


# ---- stochastic rounding -------------------------------------------------------------------------------------


def neighbours(x: float, dtype: torch.dtype) -> tuple[float, float]:
    """The two representable values of dtype around x (float64), below and above in magnitude."""
    t = torch.tensor([x], dtype=torch.float64)
    down = t.to(dtype).double()
    if abs(down.item()) > abs(x):
        down = torch.nextafter(down.to(dtype), torch.zeros(1, dtype=dtype)).double()
    up = torch.nextafter(down.to(dtype), torch.full((1,), math.copysign(math.inf, x), dtype=dtype)).double()
    return down.item(), up.item()


STOCHASTIC_CASES = [
    (torch.bfloat16, 1.0 + 0.3 * 2.0**-7),
    (torch.bfloat16, -3.7e-3),
    (torch.bfloat16, 1.7e-39),  # a bf16 subnormal
    (torch.float16, 1.0 + 0.3 * 2.0**-10),
    (torch.float16, -1234.567),
    (torch.float16, 3.0e-6),  # fp16 subnormal range
    (torch.float16, 65510.0),  # rounds up to inf with probability 6/32
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, x", STOCHASTIC_CASES)
def test_stochastic_is_unbiased(device: str, dtype: torch.dtype, x: float) -> None:
    n = 200_000
    x32 = float(np.float32(x))
    src = torch.full((n,), x32, device=device)
    out = ops.cast(src, dtype, "stochastic", seed=1234).double().cpu()
    low, high = neighbours(x32, dtype)
    if high == math.inf or high == -math.inf:
        high_finite = math.copysign(65536.0, x32)  # fp16 overflow: the would-be next value
        up = torch.isinf(out)
        assert torch.all(up | (out == low))
        p_hat = up.double().mean().item()
        p = (abs(x32) - abs(low)) / (abs(high_finite) - abs(low))
        assert abs(p_hat - p) < 5 * math.sqrt(p * (1 - p) / n)
        return
    assert torch.all((out == low) | (out == high)), "a result is neither neighbour"
    p = (x32 - low) / (high - low)
    sigma = abs(high - low) * math.sqrt(p * (1 - p) / n)
    assert abs(out.mean().item() - x32) < 5 * sigma, (out.mean().item(), x32, sigma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_stochastic_never_moves_representable_values(device: str, dtype: torch.dtype) -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[~torch.isnan(every)].to(device)
    out = ops.cast(every.float(), dtype, "stochastic", seed=5)
    assert torch.equal(bits(out), bits(every))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_reproducible_and_keyed(device: str) -> None:
    x = torch.randn(10_000, device=device)
    a = ops.cast(x, torch.bfloat16, "stochastic", seed=7)
    assert torch.equal(a, ops.cast(x, torch.bfloat16, "stochastic", seed=7))
    assert not torch.equal(a, ops.cast(x, torch.bfloat16, "stochastic", seed=8))
    torch.manual_seed(3)
    b = ops.cast(x, torch.bfloat16, "stochastic")
    c = ops.cast(x, torch.bfloat16, "stochastic")
    torch.manual_seed(3)
    assert torch.equal(b, ops.cast(x, torch.bfloat16, "stochastic")), "torch.manual_seed does not govern it"
    assert not torch.equal(b, c), "two unseeded calls drew the same numbers"
    # The list form numbers its draws across the list: cast_ of one tensor equals cast with the same seed.
    d = torch.empty_like(x, dtype=torch.bfloat16)
    ops.cast_([d], [x], "stochastic", seed=7)
    assert torch.equal(d, a)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_draws_are_independent(device: str) -> None:
    n = 1 << 18
    x = torch.full((n,), 1.0 + 0.5 * 2.0**-7, device=device)  # p(up) = 1/2
    up = (ops.cast(x, torch.bfloat16, "stochastic", seed=99).float() > 1.0).double().cpu()
    centred = up - up.mean()
    for lag in (1, 2, 3, 4, 5, 64):
        corr = (centred[:-lag] * centred[lag:]).mean() / centred.var()
        assert abs(corr.item()) < 5 / math.sqrt(n), f"lag {lag}: correlation {corr.item():.4f}"
    # Two tensors in one cast_ call do not share draws.
    a, b = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.bfloat16)
    ops.cast_([a, b], [x, x], "stochastic", seed=99)
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n)


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_seeded_cast_same_bits_on_cpu_and_cuda(dtype: torch.dtype) -> None:
    x = torch.cat([random_float_bits(1 << 20, seed=3), special_floats()])
    for rounding in ("nearest", "stochastic"):
        # Nearest NaNs take each device's Tensor.to bits (the CPU's 0x7e00 | sign for fp16, CUDA's 0x7fff).
        y = x if rounding == "stochastic" else x[~torch.isnan(x)]
        for saturate in (False, True):
            cpu = ops.cast(y, dtype, rounding, saturate, seed=21)
            gpu = ops.cast(y.cuda(), dtype, rounding, saturate, seed=21).cpu()
            assert torch.equal(bits(cpu), bits(gpu)), (rounding, saturate)


# ---- saturation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_saturate_fp16(device: str, rounding: str) -> None:
    x = torch.tensor([65504.0, 65519.0, 65520.0, 70000.0, 1e30, -1e30, -65520.0, 1.0, math.inf, -math.inf, math.nan],
                     device=device)
    out = ops.cast(x, torch.float16, rounding, saturate=True, seed=0).float().cpu()
    expected = torch.tensor([65504.0, 65504.0, 65504.0, 65504.0, 65504.0, -65504.0, -65504.0, 1.0, math.inf, -math.inf,
                             math.nan])
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)
    plain = ops.cast(x, torch.float16, "nearest").float().cpu()
    assert plain[2].item() == math.inf and plain[0].item() == 65504.0


@pytest.mark.parametrize("device", DEVICES)
def test_saturate_bf16(device: str) -> None:
    bf16_max = torch.finfo(torch.bfloat16).max
    x = torch.tensor([3.4e38, -3.4e38, bf16_max, math.inf, math.nan], device=device)
    out = ops.cast(x, torch.bfloat16, saturate=True).float().cpu()
    torch.testing.assert_close(out, torch.tensor([bf16_max, -bf16_max, bf16_max, math.inf, math.nan]),
                               equal_nan=True, rtol=0, atol=0)
    assert ops.cast(x, torch.bfloat16)[0].item() == math.inf


# ---- bf16 + remainder -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_remainder_round_trip_is_exact(device: str) -> None:
    x = torch.cat([random_float_bits(1 << 22, seed=17), special_floats()])
    x = x[~torch.isnan(x)].to(device)
    hi, lo = ops.split_bf16_remainder(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16 and hi.shape == x.shape
    back = ops.merge_bf16_remainder(hi, lo)
    assert torch.equal(bits(back), bits(x))
    # The bf16 half follows the documented rule: high half, plus one when the low half's top bit is set.
    u = x.cpu().view(torch.int32).numpy().view(np.uint32)
    expected_hi = ((u >> 16) + ((u & 0xFFFF) >= 0x8000)).astype(np.uint16)
    assert np.array_equal(hi.cpu().view(torch.int16).numpy().view(np.uint16), expected_hi)
    # ...which is round-to-nearest except at ties, so |bf16 - x| is at most half a bf16 ulp.
    finite = torch.isfinite(hi.float()) & torch.isfinite(x) & (x.abs() > 1e-30)
    err = (hi.float()[finite].double() - x[finite].double()).abs()
    assert torch.all(err <= torch.abs(x[finite].double()) * 2.0**-8)


@pytest.mark.parametrize("device", DEVICES)
def test_remainder_nan(device: str) -> None:
    x = torch.tensor([math.nan, -math.nan, 1.0], device=device)
    x[0] = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)[0]  # a NaN with only low payload
    hi, lo = ops.split_bf16_remainder(x)
    assert torch.isnan(hi[:2]).all() and torch.isnan(ops.merge_bf16_remainder(hi, lo)[:2]).all()


# ---- opcheck and errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x = torch.randn(33, 5, device=device)
    torch.library.opcheck(torch.ops.mixprec.cast.default, (x, torch.bfloat16, "nearest", False, None))
    torch.library.opcheck(torch.ops.mixprec.cast.default, (x, torch.float16, "stochastic", True, 3))
    dst = [torch.empty(33, 5, device=device, dtype=torch.float16), torch.empty(4, device=device)]
    torch.library.opcheck(torch.ops.mixprec.cast_.default, (dst, [x, torch.randn(4, device=device).bfloat16()],
                                                            "stochastic", False, 11))
    torch.library.opcheck(torch.ops.mixprec.split_bf16_remainder.default, (x,))
    hi, lo = ops.split_bf16_remainder(x)
    torch.library.opcheck(torch.ops.mixprec.merge_bf16_remainder.default, (hi, lo))


BAD = [
    ("unknown rounding", lambda: ops.cast(torch.ones(3), torch.float16, "truncate"), "rounding"),
    ("int source", lambda: ops.cast(torch.ones(3, dtype=torch.int32), torch.float16), "src"),
    ("fp64 target", lambda: ops.cast(torch.ones(3), torch.float64),
     "dtype must be float32, float16 or bfloat16, got Double"),
    ("list lengths", lambda: ops.cast_([torch.empty(3, dtype=torch.float16)], []), "same length"),
    ("pair shapes", lambda: ops.cast_([torch.empty(3, dtype=torch.float16)], [torch.ones(4)]), "shape"),
    ("sparse source", lambda: ops.cast_([torch.empty(3, dtype=torch.float16)], [torch.ones(3).to_sparse()]),
     r"src\[0\] must be a dense"),
    ("split fp16", lambda: ops.split_bf16_remainder(torch.ones(3, dtype=torch.float16)), "float32"),
    ("merge dtypes", lambda: ops.merge_bf16_remainder(torch.ones(3, dtype=torch.bfloat16), torch.ones(3)), "int16"),
    ("merge shapes", lambda: ops.merge_bf16_remainder(torch.ones(3, dtype=torch.bfloat16),
                                                      torch.ones(4, dtype=torch.int16)), "shape"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case) -> None:
    _, call, needle = case
    with pytest.raises(RuntimeError, match=needle):
        call()


def test_bad_input_writes_nothing() -> None:
    dst = [torch.zeros(3, dtype=torch.float16), torch.zeros(2, dtype=torch.float16)]
    with pytest.raises(RuntimeError, match=r"src\[1\]"):
        ops.cast_(dst, [torch.ones(3), torch.ones(2, dtype=torch.int64)])
    assert all(torch.equal(d, torch.zeros_like(d)) for d in dst)


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_pairs_refused_before_anything_is_written(device: str) -> None:
    """The pairs are cast in parallel, so a dst written twice (the same tensor, overlapping views) or a src that
    overlaps another pair's dst, or its own in part, would give results that depend on the schedule (and the
    thread count): refused, naming both, with nothing written. A partial overlap within a pair is what torch's
    copy_ refuses too."""
    n = 200_000  # large enough for several CPU chunks
    buf = torch.zeros(n, dtype=torch.bfloat16, device=device)
    one, two = torch.full((n,), 1.0, device=device), torch.full((n,), 2.0, device=device)
    with pytest.raises(RuntimeError, match=r"dst\[0\] and dst\[1\] share memory"):
        ops.cast_([buf, buf], [one, two])
    with pytest.raises(RuntimeError, match=r"dst\[0\] and dst\[1\] share memory"):
        ops.cast_([buf[:1000], buf[500:1500]], [one[:1000], two[:1000]])
    assert (buf == 0).all()
    half = torch.arange(9, dtype=torch.float16, device=device)
    with pytest.raises(RuntimeError, match=r"src\[0\] partly overlaps dst\[0\]"):
        ops.cast_([half[1:]], [half[:-1]], saturate=True)
    flat = torch.arange(8, dtype=torch.float32, device=device)
    out = torch.zeros(4, dtype=torch.float16, device=device)
    with pytest.raises(RuntimeError, match=r"src\[1\] shares memory with dst\[0\]"):
        ops.cast_([flat[:4], out], [torch.ones(4, device=device), flat[2:6]])
    assert torch.equal(half.cpu(), torch.arange(9, dtype=torch.float16))
    assert torch.equal(flat.cpu(), torch.arange(8, dtype=torch.float32)) and (out == 0).all()
    # A strided dst view (which torch's overlap test cannot place) between them does not hide the overlap.
    wide = torch.zeros(100, dtype=torch.float16, device=device)
    with pytest.raises(RuntimeError, match=r"src\[1\] shares memory with dst\[0\]"):
        ops.cast_([wide[:100], wide[10:20:2]], [torch.ones(100, device=device), wide[50:55]])
    # What stays allowed: disjoint views of one buffer, and a pair cast in place over the same elements.
    ops.cast_([buf[: n // 2], buf[n // 2:]], [one[: n // 2], two[n // 2:]])
    assert (buf[: n // 2] == 1).all() and (buf[n // 2:] == 2).all()
    raw = torch.arange(16, dtype=torch.float16, device=device)
    ops.cast_([raw.view(torch.bfloat16)], [raw])  # fp16 -> bf16 over the same 32 bytes
    assert torch.equal(raw.view(torch.bfloat16).cpu(), torch.arange(16, dtype=torch.bfloat16))


@requires_cuda
def test_mixed_devices_rejected() -> None:
    with pytest.raises(RuntimeError, match=r"dst\[0\]"):
        ops.cast_([torch.empty(3, dtype=torch.float16)], [torch.ones(3, device="cuda")])


def test_direct_binding_is_the_same_op_with_version_counters_advanced() -> None:
    """ops.cast_ in eager mode takes mixprec._C's binding; it is the same op as torch.ops.mixprec.cast_ (the same
    bits, seeded stochastic draws included), and like torch's in-place ops both advance the version counter of
    every destination, so autograd refuses a backward through a tensor overwritten after it was saved."""
    import mixprec

    torch.manual_seed(5)
    src = [torch.randn(37), torch.randn(3, 5).t(), torch.randn(0), torch.randn(1000)]
    for rounding, seed in (("nearest", None), ("stochastic", 11)):
        fast = [torch.empty(s.shape, dtype=torch.bfloat16) for s in src]
        boxed = [torch.empty(s.shape, dtype=torch.bfloat16) for s in src]
        ops.cast_(fast, tuple(src), rounding, seed=seed)
        torch.ops.mixprec.cast_.default(boxed, src, rounding, False, seed)
        assert all(torch.equal(a, b) for a, b in zip(fast, boxed))
        assert [t._version for t in fast] == [1] * 4 and [t._version for t in boxed] == [1] * 4
    w = torch.ones(3, requires_grad=True)
    h = torch.ones(3, dtype=torch.bfloat16)
    y = (w.bfloat16() * h).sum()  # saves h for backward
    ops.cast_([h], [torch.full((3,), 2.0)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # Under inference mode too (torch's in-place ops bump versions in ADInplaceOrView, which still runs there).
    y = (w.bfloat16() * h).sum()
    with torch.inference_mode():
        ops.cast_([h], [torch.full((3,), 5.0)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # A tensor autograd tracks is not written (cast_ is not differentiable), as torch refuses in-place writes
    # into leaves that require grad; under no_grad it is.
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match=r"mixprec::cast_: dst\[0\] requires grad, and the op is not differentiable"):
        ops.cast_([p], [torch.full((3,), 2.0)])
    assert torch.equal(p.detach(), torch.ones(3))
    with torch.no_grad():
        ops.cast_([p], [torch.full((3,), 2.0)])
    assert torch.equal(p.detach(), torch.full((3,), 2.0))
    with pytest.raises(TypeError, match=r"dst\[1\] must be a Tensor, got NoneType"):
        mixprec._C.cast_([h, None], [h, h], "nearest", False, None)


def test_function_and_dispatch_modes_see_the_op() -> None:
    """Under a __torch_function__ mode ops.cast_ goes through torch.ops (the mode sees the call); a
    __torch_dispatch__ mode sees the op on either path."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(f"function:{func}")
            return func(*args, **(kwargs or {}))

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(f"dispatch:{func}")
            return func(*args, **(kwargs or {}))

    dst, src = [torch.empty(4, dtype=torch.float16)], [torch.ones(4)]
    with Functions():
        ops.cast_(dst, src)
    assert any(s.startswith("function:mixprec.cast_") for s in seen)
    seen.clear()
    with Dispatch():
        ops.cast_(dst, src)
    assert seen == ["dispatch:mixprec.cast_.default"]
    assert torch.equal(dst[0], torch.ones(4, dtype=torch.float16))
