"""unscale_and_check_ / unscale_and_check_sumsq_ against float64 references, on CPU and CUDA."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, requires_cuda, run_with_cpu_capability
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec import ops


def reference(grads: list[torch.Tensor], inv_scale: float) -> tuple[list[torch.Tensor], bool, float]:
    """What the op must produce: g * inv_scale in float64 rounded once to g's dtype, the flag, and the
    sum of squares of the unscaled values in float64."""
    inv_scale = float(torch.tensor(inv_scale, dtype=torch.float32))  # the op receives it as float32
    out, found, sumsq = [], False, 0.0
    for g in grads:
        exact = g.detach().to(torch.float64) * inv_scale
        out.append(exact.to(g.dtype))
        found = found or not bool(torch.isfinite(g).all())
        finite = exact[torch.isfinite(exact)]
        sumsq += float((finite * finite).sum())
    return out, found, sumsq


def one(value: float, device: str) -> torch.Tensor:
    return torch.full((1,), value, dtype=torch.float32, device=device)


def assert_unscaled(actual: torch.Tensor, expected: torch.Tensor, exact_power_of_two: bool) -> None:
    if exact_power_of_two:
        # Multiplying by a power of two is exact (barring underflow, which both sides round alike).
        assert torch.equal(actual, expected)
    else:
        # fp32 product then a rounding to the dtype may differ from one rounding by one ulp of the dtype.
        torch.testing.assert_close(actual, expected, rtol=2 * torch.finfo(actual.dtype).eps, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 31, 4097, 65536, 65537, 300001])
@pytest.mark.parametrize("inv_scale", [2.0**-10, 0.3])
def test_matches_float64_reference(device: str, dtype: torch.dtype, numel: int, inv_scale: float) -> None:
    torch.manual_seed(numel)
    g = (torch.randn(numel, dtype=torch.float64) * 1000).to(dtype).to(device)
    expected, _, _ = reference([g], inv_scale)
    found_inf = one(0.0, device)
    ops.unscale_and_check_([g], found_inf, one(inv_scale, device))
    assert_unscaled(g, expected[0], inv_scale == 2.0**-10)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_shapes_and_sumsq(device: str) -> None:
    torch.manual_seed(0)
    grads = [
        torch.randn(3, 5, device=device),
        torch.randn(1001, device=device, dtype=torch.float16),
        torch.randn(17, 33, 2, device=device, dtype=torch.bfloat16),
        torch.randn(1, device=device, dtype=torch.float64),
        torch.empty(0, 4, device=device, dtype=torch.float16),
        torch.randn(70000, device=device),
    ]
    expected, _, expected_sumsq = reference(grads, 0.125)
    found_inf = one(0.0, device)
    sumsq = ops.unscale_and_check_sumsq_(grads, found_inf, one(0.125, device))
    for actual, want in zip(grads, expected):
        assert torch.equal(actual, want)
    assert sumsq.shape == () and sumsq.dtype == torch.float32 and sumsq.device.type == device
    assert math.isclose(sumsq.item(), expected_sumsq, rel_tol=1e-5)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list(device: str) -> None:
    found_inf = one(0.0, device)
    ops.unscale_and_check_([], found_inf, one(0.5, device))
    sumsq = ops.unscale_and_check_sumsq_([], found_inf, one(0.5, device))
    assert sumsq.item() == 0.0 and found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_tensors(device: str) -> None:
    """More tensors than one CUDA launch carries, so the list is split across launches."""
    torch.manual_seed(1)
    dtypes = FLOAT_DTYPES
    grads = [torch.randn(1 + (i * 37) % 300, device=device, dtype=dtypes[i % 3]) for i in range(2000)]
    expected, _, expected_sumsq = reference(grads, 2.0**-3)
    found_inf = one(0.0, device)
    sumsq = ops.unscale_and_check_sumsq_(grads, found_inf, one(2.0**-3, device))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    assert math.isclose(sumsq.item(), expected_sumsq, rel_tol=1e-5)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_one_large_tensor(device: str) -> None:
    torch.manual_seed(2)
    g = torch.randn(1 << 23, device=device, dtype=torch.bfloat16)
    expected, _, expected_sumsq = reference([g], 2.0**-4)
    found_inf = one(0.0, device)
    sumsq = ops.unscale_and_check_sumsq_([g], found_inf, one(2.0**-4, device))
    assert torch.equal(g, expected[0])
    assert math.isclose(sumsq.item(), expected_sumsq, rel_tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_planted_non_finite_is_found(device: str, dtype: torch.dtype, bad: float, where: str) -> None:
    torch.manual_seed(3)
    grads = [torch.randn(n, device=device, dtype=dtype) for n in (100, 5000, 70001, 3)]
    target = grads[2]
    index = {"first": 0, "middle": target.numel() // 2, "last": target.numel() - 1}[where]
    target[index] = bad
    expected, found, _ = reference(grads, 0.5)
    assert found
    found_inf = one(0.0, device)
    ops.unscale_and_check_(grads, found_inf, one(0.5, device))
    assert found_inf.item() == 1.0
    # Every other value is still unscaled (torch does the same: the step is skipped later, not here).
    for actual, want in zip(grads, expected):
        torch.testing.assert_close(actual, want, equal_nan=True, rtol=0, atol=0)
    # The flag is only ever raised: a clean call afterwards keeps it.
    ops.unscale_and_check_([torch.ones(4, device=device)], found_inf, one(1.0, device))
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads, inv", [
    ([torch.full((4,), 2e19)], 0.5),  # a scalar tail whose double sum passes fp32's range
    ([torch.full((20,), 2e19, dtype=torch.float64)], 1.0),
    ([torch.full((16,), 3.5e18), torch.full((16,), 3.5e18)], 1.0),  # finite per tensor, not in total
])
def test_sumsq_past_fp32_range_is_inf(device: str, grads: list[torch.Tensor], inv: float) -> None:
    """Finite gradients whose squares sum past FLT_MAX: the fp32 result is +inf (as the vectorised sums give it),
    not an error raised after the gradients were already written."""
    grads = [g.to(device) for g in grads]
    want = [g.double() * inv for g in grads]
    assert sum(float((w * w).sum()) for w in want) > torch.finfo(torch.float32).max
    found = torch.zeros(1, device=device)
    total = ops.unscale_and_check_sumsq_(grads, found, torch.full((1,), inv, device=device))
    assert total.dtype == torch.float32 and total.dim() == 0 and total.item() == math.inf
    assert found.item() == 0.0  # every gradient is finite
    assert all(torch.equal(g, w.to(g.dtype)) for g, w in zip(grads, want))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_views(device: str) -> None:
    base = torch.arange(600, dtype=torch.float32, device=device).reshape(30, 20)
    strided = base[:, 1::3]  # gaps: goes through a contiguous copy and is written back
    transposed = torch.arange(300, dtype=torch.float16, device=device).reshape(15, 20).t()  # dense, permuted
    channels_last = torch.randn(2, 3, 5, 7, device=device).to(memory_format=torch.channels_last)
    offset = torch.arange(50, dtype=torch.bfloat16, device=device)[3:40]  # storage offset
    before_base = base.clone()
    grads = [strided, transposed, channels_last, offset]
    expected, _, _ = reference(grads, 0.5)
    found_inf = one(0.0, device)
    ops.unscale_and_check_(grads, found_inf, one(0.5, device))
    for actual, want in zip(grads, expected):
        assert torch.equal(actual, want)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, 1::3] = False
    assert torch.equal(base[untouched], before_base[untouched])


def reference_amax(grads: list[torch.Tensor]) -> torch.Tensor:
    """max |g| per tensor in float64, NaN if any NaN, then rounded once to fp32 (0 for an empty tensor)."""
    out = []
    for g in grads:
        g64 = g.detach().to(torch.float64).abs().flatten()
        if g64.numel() == 0:
            out.append(0.0)
        elif torch.isnan(g64).any():
            out.append(math.nan)
        else:
            out.append(float(g64.max()))
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sumsq", [False, True])
def test_amax_per_tensor_matches_float64(device: str, sumsq: bool) -> None:
    """The optional per-tensor max |g| (of the values as read) for every dtype, empty, strided, misaligned and
    multi-chunk tensors, planted inf/NaN (NaN beats inf), fp64 beyond fp32's range, and accumulation into
    entries that were already larger."""
    torch.manual_seed(5)
    grads = [
        torch.randn(3, 5, device=device) * 7,
        (torch.randn(1001, device=device) * 300).half(),
        torch.randn(17, 33, 2, device=device, dtype=torch.bfloat16),
        torch.randn(9, device=device, dtype=torch.float64) * 1e300,    # |g| beyond fp32: inf
        torch.empty(0, 4, device=device, dtype=torch.float16),
        torch.randn(200001, device=device),                           # several 64K chunks
        torch.randn(40, 30, device=device)[:, 1::3],                  # gaps: a copy written back
        torch.randn(100, device=device, dtype=torch.bfloat16)[3:97],  # misaligned start
        torch.randn(70000, device=device),                            # inf planted late
        torch.randn(130000, device=device, dtype=torch.float16),      # inf and NaN in different chunks
        torch.randn(5, device=device) * 1e-30,                        # tiny
    ]
    grads[8][69999] = -math.inf
    grads[9][3] = math.inf
    grads[9][129000] = math.nan
    expected = reference_amax(grads)
    expected[10] = 1.0e6  # an entry already larger than the tensor's max stays as it was
    amax = torch.zeros(len(grads), device=device)
    amax[10] = 1.0e6
    found_inf = one(0.0, device)
    if sumsq:
        ops.unscale_and_check_sumsq_(grads, found_inf, one(0.25, device), amax)
    else:
        ops.unscale_and_check_(grads, found_inf, one(0.25, device), amax)
    torch.testing.assert_close(amax.cpu(), expected, equal_nan=True, rtol=0, atol=0)
    assert not torch.signbit(amax).any()  # NaN included: the contract is non-negative bits
    assert found_inf.item() == 1.0
    # The same call without the planted values: the flag stays clear, and only maxima grow.
    clean = [g.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) for g in grads[:3]]
    before = reference_amax(clean)
    small = torch.full((3,), 1e-3, device=device)
    f2 = one(0.0, device)
    ops.unscale_and_check_(clean, f2, one(1.0, device), small)
    assert f2.item() == 0.0
    torch.testing.assert_close(small.cpu(), torch.maximum(before, torch.tensor(1e-3)), rtol=0, atol=0)


def test_cpu_capabilities_agree_bitwise(tmp_path) -> None:
    """The DEFAULT and AVX2 builds of the CPU kernel give identical bits (forced via ATEN_CPU_CAPABILITY)."""
    torch.manual_seed(0)
    grads = [torch.randn(n, dtype=d) * 3 for n, d in [(1000003, torch.float32), (99999, torch.float16), (65539, torch.bfloat16)]]
    script = """
        grads = INPUTS
        clean = torch.zeros(1)
        s = mixprec.ops.unscale_and_check_sumsq_(grads, clean, torch.full((1,), 0.3))
        planted = grads[1].clone()
        planted[77] = float("nan")
        found = torch.zeros(1)
        amax = torch.zeros(1)
        mixprec.ops.unscale_and_check_([planted], found, torch.full((1,), 0.3), amax)
        assert clean.item() == 0.0
        amax_clean = torch.zeros(3)
        mixprec.ops.unscale_and_check_(grads, torch.zeros(1), torch.full((1,), 1.0), amax_clean)
        RESULT = {"grads": grads, "found": found, "sumsq": s, "amax": amax, "amax_clean": amax_clean}
    """
    a = run_with_cpu_capability("default", script, grads, tmp_path)
    b = run_with_cpu_capability(None, script, grads, tmp_path)
    for x, y in zip(a["grads"], b["grads"]):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)
    assert a["found"].item() == b["found"].item() == 1.0
    assert math.isnan(a["amax"].item()) and math.isnan(b["amax"].item())
    assert torch.equal(a["amax_clean"], b["amax_clean"])
    # Sums of squares may differ only by the order of fp32 lane additions.
    assert math.isclose(a["sumsq"].item(), b["sumsq"].item(), rel_tol=1e-5)


@requires_cuda
def test_cpu_and_cuda_agree() -> None:
    torch.manual_seed(4)
    grads = [torch.randn(n, dtype=d) * 100 for n, d in [(12345, torch.float32), (777, torch.float16), (65537, torch.bfloat16)]]
    cuda_grads = [g.cuda() for g in grads]
    f_cpu, f_cuda = one(0.0, "cpu"), one(0.0, "cuda")
    s_cpu = ops.unscale_and_check_sumsq_(grads, f_cpu, one(0.37, "cpu"))
    s_cuda = ops.unscale_and_check_sumsq_(cuda_grads, f_cuda, one(0.37, "cuda"))
    for a, b in zip(grads, cuda_grads):
        assert torch.equal(a, b.cpu())
    assert math.isclose(s_cpu.item(), s_cuda.item(), rel_tol=1e-5)
    # With an inf planted, and the per-tensor maxima
    grads[1][5] = math.inf
    cuda_grads[1][5] = math.inf
    a_cpu, a_cuda = torch.zeros(3), torch.zeros(3, device="cuda")
    s_cpu = ops.unscale_and_check_sumsq_(grads, f_cpu, one(0.37, "cpu"), a_cpu)
    s_cuda = ops.unscale_and_check_sumsq_(cuda_grads, f_cuda, one(0.37, "cuda"), a_cuda)
    for a, b in zip(grads, cuda_grads):
        assert torch.equal(a, b.cpu())
    assert torch.equal(a_cpu, a_cuda.cpu())
    assert math.isinf(s_cpu.item()) and math.isinf(s_cuda.item())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    def sample() -> tuple:
        grads = [torch.randn(5, 3, device=device), torch.randn(9, device=device, dtype=torch.bfloat16)]
        return grads, one(0.0, device), one(0.25, device)

    torch.library.opcheck(torch.ops.mixprec.unscale_and_check_.default, sample())
    torch.library.opcheck(torch.ops.mixprec.unscale_and_check_sumsq_.default, sample())
    torch.library.opcheck(torch.ops.mixprec.unscale_and_check_.default, (*sample(), torch.zeros(2, device=device)))
    torch.library.opcheck(torch.ops.mixprec.unscale_and_check_sumsq_.default, (*sample(), torch.zeros(2, device=device)))


@settings(max_examples=int(os.environ.get("MIXPREC_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=0, max_size=6),
    dtype_codes=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    exponent=st.integers(-30, 30),
    plant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_lists(sizes: list[int], dtype_codes: list[int], exponent: int, plant: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(n, generator=gen) * 50).to(FLOAT_DTYPES[dtype_codes[i]]) for i, n in enumerate(sizes)]
    nonempty = [g for g in grads if g.numel()]
    if plant and nonempty:
        nonempty[seed % len(nonempty)][seed % nonempty[seed % len(nonempty)].numel()] = math.nan
    inv = 2.0**exponent
    expected, found, expected_sumsq = reference(grads, inv)
    expected_amax = reference_amax(grads)
    found_inf = one(0.0, "cpu")
    amax = torch.zeros(len(grads))
    sumsq = ops.unscale_and_check_sumsq_(grads, found_inf, one(inv, "cpu"), amax)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(amax, expected_amax, equal_nan=True, rtol=0, atol=0)
    assert found_inf.item() == float(found)
    if not found and math.isfinite(expected_sumsq) and expected_sumsq < 3e38:
        assert math.isclose(sumsq.item(), expected_sumsq, rel_tol=1e-4, abs_tol=1e-30)
