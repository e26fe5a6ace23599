"""Bad input to the ops: a clear error naming the argument, and nothing written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda

import mixprec
from mixprec import ops


def fresh() -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.ones(4), torch.ones(3, dtype=torch.float16)], torch.zeros(1)


def f32(*shape: int) -> torch.Tensor:
    return torch.ones(*shape)


UNSCALE_CASES = [
    ("inv_scale has 2 elements", lambda g, f: ops.unscale_and_check_(g, f, f32(2)), "inv_scale"),
    ("inv_scale is fp64", lambda g, f: ops.unscale_and_check_(g, f, torch.ones(1, dtype=torch.float64)), "inv_scale"),
    ("found_inf is fp16", lambda g, f: ops.unscale_and_check_(g, torch.zeros(1, dtype=torch.float16), f32(1)), "found_inf"),
    ("found_inf has no elements", lambda g, f: ops.unscale_and_check_(g, torch.zeros(0), f32(1)), "found_inf"),
    ("integer grad", lambda g, f: ops.unscale_and_check_(g + [torch.ones(2, dtype=torch.int32)], f, f32(1) * 2), r"grads\[2\]"),
    ("bool grad", lambda g, f: ops.unscale_and_check_(g + [torch.ones(2, dtype=torch.bool)], f, f32(1) * 2), r"grads\[2\]"),
    ("sparse grad", lambda g, f: ops.unscale_and_check_(g + [torch.ones(3).to_sparse()], f, f32(1) * 2), "sparse"),
    ("sparse grad, sumsq", lambda g, f: ops.unscale_and_check_sumsq_(g + [torch.ones(3).to_sparse()], f, f32(1) * 2), r"grads\[2\]"),
]


@pytest.mark.parametrize("case", UNSCALE_CASES, ids=[c[0] for c in UNSCALE_CASES])
def test_unscale_bad_input(case) -> None:
    _, call, needle = case
    grads, found_inf = fresh()
    with pytest.raises(RuntimeError, match=needle):
        call(grads, found_inf)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads), "a gradient was written before the error"
    assert found_inf.item() == 0.0


def state() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.full((1,), 8.0), torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), torch.ones(1)


UPDATE_CASES = [
    ("growth_factor 0", dict(growth_factor=0.0), "growth_factor"),
    ("growth_factor nan", dict(growth_factor=float("nan")), "growth_factor"),
    ("backoff_factor negative", dict(backoff_factor=-0.5), "backoff_factor"),
    ("growth_interval 0", dict(growth_interval=0), "growth_interval"),
    ("hysteresis 0", dict(hysteresis=0), "hysteresis"),
    ("min_scale negative", dict(min_scale=-1.0), "min_scale"),
    ("min above max", dict(min_scale=10.0, max_scale=5.0), "min_scale"),
    ("max_scale 0", dict(max_scale=0.0), "max_scale"),
]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES])
def test_update_scale_bad_settings(case) -> None:
    _, overrides, needle = case
    scale, growth, hyst, found = state()
    kwargs = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=10) | overrides
    with pytest.raises(RuntimeError, match=needle):
        ops.update_scale_(scale, growth, hyst, found, **kwargs)
    assert scale.item() == 8.0 and growth.item() == 0 and hyst.item() == 1


@pytest.mark.parametrize(
    "position, bad, needle",
    [
        (0, torch.full((1,), 8.0, dtype=torch.float64), "scale"),
        (0, torch.full((2,), 8.0), "scale"),
        (1, torch.zeros(1, dtype=torch.int64), "growth_tracker"),
        (2, torch.ones(1), "hysteresis_tracker"),
        (3, torch.ones(1, dtype=torch.int32), "found_inf"),
    ],
)
def test_update_scale_bad_tensors(position: int, bad: torch.Tensor, needle: str) -> None:
    args = list(state())
    originals = [a.clone() for a in args]
    args[position] = bad
    with pytest.raises(RuntimeError, match=needle):
        ops.update_scale_(*args, 2.0, 0.5, 10)
    assert all(torch.equal(a, o) for a, o in zip(args, originals) if a is not bad)


@requires_cuda
def test_mixed_devices_are_rejected() -> None:
    grads, found_inf = fresh()
    cuda_grads = [grads[0].cuda(), grads[1]]
    with pytest.raises(RuntimeError, match=r"grads\[1\]"):
        ops.unscale_and_check_(cuda_grads, found_inf.cuda(), f32(1).cuda())
    with pytest.raises(RuntimeError, match="inv_scale"):
        ops.unscale_and_check_([grads[0].cuda()], found_inf.cuda(), f32(1))
    assert torch.equal(cuda_grads[0].cpu(), torch.ones(4))
    scale, growth, hyst, found = state()
    with pytest.raises(RuntimeError, match="growth_tracker"):
        ops.update_scale_(scale.cuda(), growth, hyst.cuda(), found.cuda(), 2.0, 0.5, 10)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_libmixprec_uses_the_shared_libstdcxx() -> None:
    """One C++ runtime per process: a libstdc++ linked statically into libmixprec (as a GCC 13 toolchain
    without the libstdc++.so link did) crashes while formatting the first error message."""
    lib = sorted(Path(mixprec.__file__).parent.glob("lib/libmixprec.so*"))
    assert lib, "libmixprec is not installed inside the package"
    dynamic = subprocess.run(["readelf", "-d", str(lib[0])], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("libstdc++.so.6" in line for line in needed), needed


def _adam(params, grads, **kw):  # type: ignore[no-untyped-def]
    n = len(params)
    ops.adam_step_(params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
                   [torch.zeros(()) for _ in range(n)], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                   **kw)


def test_memory_written_twice_is_refused_before_anything_is_written() -> None:
    """Written lists whose elements share memory: an expanded tensor (the write-back failed after the other
    tensors were already written, with torch's message naming no argument) or the same tensor twice /
    overlapping views (two chunks wrote the same memory at once: results changed from run to run). Each is
    refused by name with everything left as it was; views of one buffer that do not overlap still work."""
    torch.set_num_threads(2)
    big = torch.ones(1 << 17)
    first = torch.ones(8)
    for grads, needle in (([first, torch.ones(1).expand(8)], r"grads\[1\] has elements that share memory"),
                          ([first, big, big], r"grads\[1\] and grads\[2\] share memory"),
                          ([first, big[:100], big[50:150]], r"grads\[1\] and grads\[2\] share memory")):
        found_inf = torch.zeros(())
        with pytest.raises(RuntimeError, match=needle):
            ops.unscale_and_check_(grads, found_inf, torch.full((), 0.5))
        assert torch.equal(first, torch.ones(8)) and torch.equal(big, torch.ones(1 << 17))
    buffer = torch.ones(300)
    views = [buffer[:100], buffer[100:250], buffer[250:].view(5, 10)]
    ops.unscale_and_check_(views, torch.zeros(()), torch.full((), 0.5))
    assert torch.equal(buffer, torch.full((300,), 0.5))

    p = torch.ones(8)
    with pytest.raises(RuntimeError, match=r"params\[1\] and params\[2\] share memory"):
        _adam([p, big, big], [torch.ones(8), torch.ones(1 << 17), torch.ones(1 << 17)])
    with pytest.raises(RuntimeError, match=r"params\[1\] has elements that share memory"):
        _adam([p, torch.ones(1).expand(8)], [torch.ones(8), torch.ones(8)])
    with pytest.raises(RuntimeError, match=r"grads\[1\] has elements that share memory"):
        _adam([p, torch.ones(8)], [torch.ones(8), torch.ones(1).expand(8)], grad_scale=torch.full((), 2.0))
    assert torch.equal(p, torch.ones(8))
    _adam([p, torch.ones(8)], [torch.ones(8), torch.ones(1).expand(8)])  # read only without grad_scale: fine

    dst = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"dst\[1\] has elements that share memory"):
        ops.cast_([dst, torch.zeros(1, dtype=torch.bfloat16).expand(8)], [torch.ones(8), torch.ones(8)])
    assert torch.equal(dst, torch.zeros(8, dtype=torch.bfloat16))

    x = torch.randn(16, 16)
    with pytest.raises(RuntimeError, match="main_grad shares memory with input"):
        ops.linear_wgrad_accum_(x, torch.randn(4, 16), x[:4])
    scale = torch.ones(2)
    with pytest.raises(RuntimeError, match="scale shares memory with scale_inv"):
        mixprec.fp8.update_scales_(torch.zeros(3, 2), scale, scale, torch.float8_e4m3fn)
    s = torch.full((), 8.0)
    with pytest.raises(RuntimeError, match="scale shares memory with found_inf"):
        ops.update_scale_(s, torch.zeros((), dtype=torch.int32), torch.ones((), dtype=torch.int32), s,
                          growth_factor=2.0, backoff_factor=0.5, growth_interval=10)
    assert s.item() == 8.0


def test_linear_wgrad_takes_operands_that_require_grad() -> None:
    """A direct call with operands that require grad (as inside a create_graph backward) failed in torch's
    out= GEMM with a message naming neither the op nor an argument."""
    go, x = torch.randn(7, 3, requires_grad=True), torch.randn(7, 5, requires_grad=True)
    out = ops.linear_wgrad(go, x)
    torch.testing.assert_close(out, go.detach().double().t().mm(x.detach().double()).float(), rtol=1e-6, atol=1e-6)


def test_the_native_handles_take_only_their_own_objects_and_keep_error_types() -> None:
    """mixprec._C binds the scaler's and the optimizer's per-step calls on the C++ objects behind their
    torch.classes handles. A handle refuses any other object by name; errors from its calls reach Python with the
    types the torch.classes path raises (ValueError for a bad option, TypeError for a list of non-tensors), and a
    refused call leaves the state as it was."""
    from mixprec import _C

    scaler = mixprec.GradScaler("cpu", init_scale=4.0)
    opt = mixprec.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    for handle, wrong, name in ((_C.GradScalerHandle, opt._core, "GradScaler"),
                                (_C.AdamCoreHandle, scaler._impl, "AdamCore")):
        with pytest.raises(TypeError, match=f"expected a torch.classes.mixprec.{name}"):
            handle(wrong)
        with pytest.raises(TypeError, match="incompatible constructor arguments"):
            handle(3)
    scaler.scale(torch.ones(()))
    with pytest.raises(TypeError, match=r"params\[1\] must be a Tensor, got int"):
        scaler._fast.unscale_params_(id(opt), [torch.ones(1), 2])
    assert not scaler._fast.is_unscaled(id(opt))  # nothing recorded: unscale_ still runs
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones(3)
    opt.param_groups[0]["rounding"] = "sometimes"  # what a typo in a config puts in a group
    with pytest.raises(ValueError, match="rounding"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]
    opt.param_groups[0]["rounding"] = "nearest"
    scaler.unscale_(opt)
    scaler.step(opt)
    assert opt.state[p]["step"].item() == 1.0 and not torch.equal(p, torch.ones(3))
