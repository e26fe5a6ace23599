"""Issue 14: seeing what precision does. Overflow attribution (GradScaler(track_overflows=True) and the
per-tensor amax of the unscale pass) with torch's optimizers and mixprec's, the grad_stats op against
float64, and mixprec.Monitor (records, JSON lines, TensorBoard events, no host reads between logs)."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec


def named_model() -> nn.Module:
    torch.manual_seed(0)
    block = lambda: nn.Sequential(OrderedDict(fc1=nn.Linear(6, 12), act=nn.ReLU(), fc2=nn.Linear(12, 6)))  # noqa: E731
    return nn.Sequential(OrderedDict(embed=nn.Linear(4, 6), blocks=nn.Sequential(block(), block(), block()),
                                     head=nn.Linear(6, 2)))


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value back to the host: on CUDA each is a device synchronisation.
    Dispatched reads (``item()``, ``float(t)``, ``if t``, ``torch.equal``; mixprec's C++ calls included) are
    seen as ops; ``tolist()`` and ``numpy()``, which read CPU memory without an op, by wrapping them; and
    copies to the CPU from another device (``.cpu()``, ``.to("cpu")``, ``copy_``) as ops too."""

    _UNDISPATCHED = ("tolist", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self):  # type: ignore[no-untyped-def]
        for name in self._UNDISPATCHED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(t, *args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                self.reads.append(f"Tensor.{_name}")
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            self.reads.append(str(func))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device") or src.device
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.reads.append(str(func))
        return func(*args, **kwargs)


def test_host_reads_sees_each_kind_of_read() -> None:
    """The checker itself can fail: every kind of read it claims to see is recorded."""
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: float(t[0]), lambda: bool(t[0]), lambda: torch.equal(t, t),
                 lambda: t.tolist(), lambda: t.numpy()):
        watch = HostReads()
        with watch:
            read()
        assert len(watch.reads) == 1, watch.reads
    originals = (torch.Tensor.tolist, torch.Tensor.numpy)
    watch = HostReads()
    with watch:
        t.add_(1).mul_(2)  # no read
    assert watch.reads == []
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == originals  # the wrappers are gone again


PLANTS = {1: ("blocks.1.fc1.weight", math.inf), 2: None, 4: ("head.bias", math.nan), 5: None}


def train(optimizer: str, track: bool = True, steps: int = 6, plants=PLANTS, watch: HostReads | None = None):
    model = named_model()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        opt = mixprec.optim.AdamW(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu", growth_interval=1000, track_overflows=track)
    params = dict(model.named_parameters())
    reports = []
    for i in range(steps):
        opt.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).pow(2).mean()).backward()
        if plants.get(i):
            name, value = plants[i]
            params[name].grad.view(-1)[-1] = value
        if watch is not None:
            with watch:
                scaler.step(opt)
                scaler.update()
        else:
            scaler.step(opt)
            scaler.update()
        reports.append(scaler.last_overflow(model))
    return model, scaler, reports


@pytest.mark.parametrize("optimizer", ["sgd", "mixprec"])
def test_planted_overflow_is_named(optimizer: str) -> None:
    model, scaler, reports = train(optimizer)
    assert reports[0] is None  # nothing overflowed yet
    n = len(list(model.parameters()))
    for i in (1, 2, 3):  # the step-1 overflow stays the answer until the next one
        r = reports[i]
        assert (r.step, r.scale, r.num_tensors) == (1, 65536.0, n)
        assert r.sources == [("blocks.1.fc1.weight", math.inf)]
        assert str(r) == f"step 1 (loss scale 65536): blocks.1.fc1.weight: inf (1 of {n} tensors)"
    r = reports[5]
    assert (r.step, r.scale) == (4, 32768.0)  # backed off once after step 1
    assert len(r.sources) == 1 and r.sources[0][0] == "head.bias" and math.isnan(r.sources[0][1])
    assert str(r).endswith(f"head.bias: nan (1 of {n} tensors)")
    # Without a module the parameters are named by their position among the optimizer's parameters.
    assert str(scaler.last_overflow()).startswith(f"step 4 (loss scale 32768): param[{n - 1}]: nan")


class OldProtocolSGD(torch.optim.SGD):
    """An optimizer of torch's older scaler protocol (apex, timm): it checks and unscales through the scaler."""

    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):  # noqa: ANN001, ANN201
        if sum(v.item() for v in grad_scaler._check_inf_per_device(self).values()):
            return None
        inv = 1.0 / grad_scaler._get_scale_async()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv)
        return super().step(closure)


def test_the_older_protocols_check_names_the_overflow_too() -> None:
    """The check such an optimizer asks for (_check_inf_per_device) records which parameter overflowed, as the
    scaler's own check does."""
    model = named_model()
    opt = OldProtocolSGD(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu", track_overflows=True)
    scaler.scale(model(torch.randn(3, 4)).pow(2).mean()).backward()
    dict(model.named_parameters())["head.bias"].grad[0] = math.inf
    with pytest.warns(FutureWarning):
        scaler.step(opt)
    scaler.update()
    report = scaler.last_overflow(model)
    assert report is not None and report.sources == [("head.bias", math.inf)]


def test_monitor_and_underflow_report_take_sparse_gradients_and_copy_the_loss(tmp_path) -> None:
    """nn.Embedding(sparse=True) gradients (which the scaler checks) count as their values; a loss tensor the
    caller reuses in place is averaged as the values it held at each step."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(emb=nn.Embedding(10, 4, sparse=True), head=nn.Linear(4, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu", init_scale=8.0)
    monitor = mixprec.Monitor(model, scaler, every=4, sinks=())
    loss_buffer = torch.zeros(())
    record = None
    for i, value in enumerate((1.0, 2.0, 3.0, 10.0)):
        opt.zero_grad()
        out = model(torch.tensor([[1, 2, 2]])).sum()
        scaler.scale(out).backward()
        scaler.step(opt)
        scaler.update()
        loss_buffer.fill_(value)  # an accumulation buffer, refilled each step
        record = monitor.step(loss_buffer)
    assert record is not None and record["loss"] == pytest.approx(4.0)
    emb_grad = model.emb.weight.grad.coalesce().values()
    report = mixprec.diagnostics.underflow_report(model)
    assert report.total == emb_grad.numel() + sum(p.grad.numel() for p in model.head.parameters())


def test_monitor_takes_numpy_integers_and_a_refused_one_changes_nothing(tmp_path) -> None:
    """Integers from a config (NumPy's) are integers; a monitor refused for a log_dir it cannot write leaves the
    scaler's overflow tracking as it was."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("tensorboard")
    model = named_model()
    scaler = mixprec.GradScaler("cpu")
    assert mixprec.Monitor(model, None, every=np.int64(10), keep=np.int32(5), sinks=())._keep == 5
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(Exception):
        mixprec.Monitor(model, scaler, log_dir=str(blocked), sinks=("tensorboard",))
    assert not scaler._impl.track_overflows()


def test_a_monitor_the_cpp_constructor_refuses_closes_its_event_writer(tmp_path) -> None:
    """The TensorBoard writer is made before the C++ monitor checks its arguments; a refusal there closes it, so
    no event-writer thread is left running per failed attempt (a config sweep retrying in one process)."""
    import threading

    pytest.importorskip("tensorboard")
    model = named_model()
    scaler = mixprec.GradScaler("cpu")
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(Exception, match="num_bins"):
            mixprec.Monitor(model, scaler, log_dir=str(tmp_path), sinks=("tensorboard",), num_bins=0)
    assert threading.active_count() == before
    assert not scaler._impl.track_overflows()


def test_a_monitors_overflow_tracking_travels_with_the_scalers_pickle() -> None:
    """A monitor turns its scaler's overflow attribution on; a checkpointed (pickled or deep-copied) scaler
    keeps it on, so a resumed run's monitor still names the overflowing parameters."""
    import copy

    model = named_model()
    scaler = mixprec.GradScaler("cpu")
    mixprec.Monitor(model, scaler, sinks=())
    for twin in (pickle.loads(pickle.dumps(scaler)), copy.deepcopy(scaler)):
        assert twin._impl.track_overflows()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        opt.zero_grad()
        twin.scale(model(torch.randn(3, 4)).sum()).backward()
        model.head.bias.grad[1] = math.inf
        twin.step(opt)
        twin.update()
        report = twin.last_overflow(model)
        assert report is not None and [name for name, _ in report.sources] == ["head.bias"]


def test_a_nan_that_spread_is_listed_with_every_source() -> None:
    model = named_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu", track_overflows=True)
    scaler.scale(model(torch.randn(3, 4)).pow(2).mean() * math.nan).backward()  # NaN reaches every gradient
    scaler.step(opt)
    scaler.update()
    r = scaler.last_overflow(model)
    names = [name for name, _ in model.named_parameters()]
    assert [s[0] for s in r.sources] == names and all(math.isnan(v) for _, v in r.sources)
    assert str(r).endswith(f", ... {len(names) - 8} more ({len(names)} of {len(names)} tensors)")


def test_tracking_changes_nothing_else_and_is_off_by_default() -> None:
    a_model, a_scaler, a_reports = train("mixprec", track=False)
    b_model, b_scaler, _ = train("mixprec", track=True)
    assert all(r is None for r in a_reports)
    for x, y in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(x, y)
    assert a_scaler.state_dict() == b_scaler.state_dict()
    # The option survives pickling; switching it off drops the record.
    copy = pickle.loads(pickle.dumps(b_scaler))
    assert copy._impl.track_overflows()
    b_scaler.set_track_overflows(False)
    assert b_scaler.last_overflow() is None


@pytest.mark.parametrize("optimizer", ["sgd", "mixprec"])
def test_tracking_reads_nothing_back_to_the_host(optimizer: str) -> None:
    """The structural form of CUDA's sync-debug check: with a mixprec optimizer, a tracked step and update
    read no tensor value back to the host (torch's own plain-optimizer rule reads the flag once a step)."""
    watch = HostReads()
    _, scaler, _ = train(optimizer, steps=3, watch=watch)
    reads_per_step = 0 if optimizer == "mixprec" else 1
    assert len(watch.reads) == 3 * reads_per_step, watch.reads


# ---- grad_stats: the gradient statistics behind the monitor and underflow_report -------------------------------

def reference_stats(grads: list[torch.Tensor], scale: float, min_exponent: int, num_bins: int) -> torch.Tensor:
    """The op's rows computed independently: the fp16 categories from what torch's own cast to fp16 makes
    of the float64 product g * scale (zero, subnormal, inf), frexp for the exponents (m * 2^e with m in
    [0.5, 1): floor(log2 |g|) = e - 1), sums and maxima in float64."""
    rows = []
    for g in grads:
        x = g.detach().to(torch.float64).flatten().cpu()
        finite = torch.isfinite(x)
        nz = finite & (x != 0)
        a = x.abs()
        h = (a * scale).to(torch.float16).abs()
        _, e = torch.frexp(a[nz])
        bins = (e.to(torch.int64) - 1 - min_exponent).clamp(0, num_bins - 1)
        hist = torch.bincount(bins, minlength=num_bins).to(torch.float64)
        row = [x.numel(), int((x == 0).sum()), int((nz & (h == 0)).sum()),
               int((nz & (h > 0) & (h < 2.0**-14)).sum()), int((nz & torch.isinf(h)).sum()), int((~finite).sum()),
               float((x * x).sum()), float(a[finite].max()) if finite.any() else 0.0]
        rows.append(torch.cat([torch.tensor(row, dtype=torch.float64), hist]))
    return torch.stack(rows) if rows else torch.zeros(0, 8 + num_bins, dtype=torch.float64)


def stats_inputs(device: str) -> list[torch.Tensor]:
    torch.manual_seed(7)
    spread = lambda n: torch.randn(n, dtype=torch.float64) * torch.exp2(torch.randint(-60, 30, (n,)).double())  # noqa: E731
    grads = [
        spread(1000).float(),
        spread(70001).half(),                            # fp16: many flush/overflow at any scale; two chunks
        spread(3001).bfloat16(),
        spread(500) * 1e200,                              # fp64 beyond fp32's range
        torch.zeros(0, 3),
        spread(6000).float().reshape(60, 100)[:, ::3],    # strided
        spread(300).bfloat16()[1:],                       # misaligned
        torch.zeros(77),
        torch.tensor([1e-45, -3e-44, 2.0**-126, 1.0, -0.0]),  # fp32 subnormals, a negative zero
        # fp16's rounding boundaries (at scale 1; the other scales are powers of two, so the products are
        # exact): ties at 2^-25 (to zero), at the top of the subnormals (up to 2^-14) and at 65520 (to inf)
        torch.tensor([2.0**-25, 2.0**-25 + 2.0**-40, 2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-24, 65504.0, 65519.99,
                      65520.0, -65520.0, 2.0**-24, 3 * 2.0**-26]),
    ]
    grads[0][::97] = 0.0
    grads[1][5] = math.inf
    grads[2][7] = math.nan
    grads[3][0] = -math.inf
    return [g.to(device) for g in grads]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("scale,min_exponent,num_bins", [(1.0, -40, 64), (2.0**16, -150, 300), (2.0**-5, 0, 1)])
def test_grad_stats_match_float64(device: str, scale: float, min_exponent: int, num_bins: int) -> None:
    grads = stats_inputs(device)
    out = mixprec.ops.grad_stats(grads, torch.full((1,), scale, device=device), min_exponent, num_bins)
    expected = reference_stats(grads, scale, min_exponent, num_bins)
    assert out.dtype == torch.float64 and out.shape == expected.shape and out.device.type == device
    counts = [c for c in range(out.shape[1]) if c not in (6, 7)]
    assert torch.equal(out[:, counts].cpu(), expected[:, counts])  # counts are exact
    torch.testing.assert_close(out[:, 6].cpu(), expected[:, 6], rtol=1e-12, atol=0, equal_nan=True)  # order only
    assert torch.equal(out[:, 7].cpu(), expected[:, 7])  # a max is exact


def test_grad_stats_empty_list_opcheck_and_bad_input() -> None:
    assert mixprec.ops.grad_stats([], torch.ones(1)).shape == (0, 72)
    sample = (stats_inputs("cpu")[:2], torch.full((1,), 8.0), -30, 40)  # no NaN: opcheck compares with ==
    torch.library.opcheck(torch.ops.mixprec.grad_stats.default, sample)
    for args, needle in [(([torch.ones(2)], torch.ones(1, dtype=torch.float64)), "scale"),
                         (([torch.ones(2, dtype=torch.int32)], torch.ones(1)), r"grads\[0\]"),
                         (([torch.ones(2)], torch.ones(1), -40, 0), "num_bins"),
                         (([torch.ones(2)], torch.ones(1), -2000, 8), "min_exponent")]:
        with pytest.raises(RuntimeError, match=needle):
            mixprec.ops.grad_stats(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_grad_stats_cpu_and_cuda_agree() -> None:
    grads = stats_inputs("cpu")
    a = mixprec.ops.grad_stats(grads, torch.full((1,), 1024.0), -60, 100)
    b = mixprec.ops.grad_stats([g.cuda() for g in grads], torch.full((1,), 1024.0, device="cuda"), -60, 100).cpu()
    counts = [c for c in range(a.shape[1]) if c != 6]
    assert torch.equal(a[:, counts], b[:, counts])
    torch.testing.assert_close(a[:, 6], b[:, 6], rtol=1e-12, atol=0, equal_nan=True)


def test_underflow_report_reads_the_same_counts() -> None:
    """underflow_report is built on grad_stats: its counts are the op's column sums at the same scale."""
    grads = [g for g in stats_inputs("cpu") if g.dtype != torch.float64]
    report = mixprec.diagnostics.underflow_report(grads, scale=2.0**10)
    ref = reference_stats(grads, 2.0**10, -1075, 2100).sum(0)
    assert (report.total, report.zero, report.flush_to_zero, report.subnormal) == tuple(int(v) for v in ref[:4])
    assert report.overflow == int(ref[4] + ref[5])
    assert sum(report.exponent_histogram.values()) == int(ref[8:].sum())
    # The recommended scale from the histogram equals the one from sorting the magnitudes (the old way).
    mags = torch.cat([g.double().abs().flatten() for g in grads])
    nonzero = torch.sort(mags[torch.isfinite(mags) & (mags > 0)]).values
    for fraction in (0.5, 0.9, 0.999, 1.0):
        k = max(0, min(nonzero.numel() - 1, int(math.floor((1.0 - fraction) * nonzero.numel()))))
        needed = math.ceil(math.log2(2.0**-24 / float(nonzero[k])))
        ceiling = math.floor(math.log2(65504.0 / float(nonzero.max())))
        got = mixprec.diagnostics.underflow_report(grads, scale=2.0**10, fraction=fraction).recommended_scale
        assert got == 2.0 ** min(needed, ceiling), fraction


# ---- Monitor ------------------------------------------------------------------------------------------------


def test_complex_gradients_count_as_pairs_of_reals(tmp_path) -> None:
    """A complex gradient is counted as its real and imaginary parts (as the scaler unscales it), by the
    Monitor and by underflow_report alike: the norm is sqrt(sum |g|^2), torch's clip_grad_norm_ norm."""
    torch.manual_seed(8)
    model = nn.Sequential(OrderedDict(lin=nn.Linear(3, 2)))
    model.register_parameter("z", nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu", init_scale=4.0)
    monitor = mixprec.Monitor(model, scaler, every=1, log_dir=str(tmp_path), sinks=("jsonl",), min_exponent=-30,
                              num_bins=40)
    x = torch.randn(5, 3)
    loss = model(x).pow(2).mean() + torch.view_as_real(model.z * 1e-6).pow(2).sum()
    scaler.scale(loss).backward()
    grads = [torch.view_as_real(p.grad) if p.is_complex() else p.grad for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    record = monitor.step(loss)
    monitor.close()
    ref = reference_stats(grads, scaler.get_scale(), -30, 40).sum(0)
    assert record["grad_elements"] == 2 * 12 + 6 + 2 == int(ref[0])
    assert record["grad_norm"] == pytest.approx(
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item(), rel=1e-6)
    assert record["exponent_histogram"] == ref[8:].tolist()
    report = mixprec.diagnostics.underflow_report(model, scale=scaler.get_scale())
    assert (report.total, report.zero, report.flush_to_zero, report.subnormal) == tuple(int(v) for v in ref[:4])

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a file whose writes fail: ENOSPC)")
def test_a_jsonl_write_that_fails_warns_and_the_run_goes_on(tmp_path) -> None:
    """A full disk under the jsonl sink: each logged step warns that its record is missing from the file (it
    used to fail silently, and a failed stream dropped every later record), returns its record and keeps it."""
    os.symlink("/dev/full", tmp_path / "metrics.jsonl")
    model = nn.Sequential(OrderedDict(lin=nn.Linear(3, 2)))
    monitor = mixprec.Monitor(model, None, every=1, log_dir=str(tmp_path), sinks=("jsonl",))
    for step in (1, 2):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        with pytest.warns(UserWarning, match=f"record of step {step} .* failed"):
            record = monitor.step(torch.tensor(1.0))
        assert record["step"] == step
    assert [r["step"] for r in monitor.records] == [1, 2]
    monitor.close()


def test_the_jsonl_file_holds_whole_lines_after_writes_fail_and_work_again(tmp_path) -> None:
    """Writes fail for a while (a file size limit, as a full disk would), then work again: the file holds only
    whole records, those of the steps whose writes succeeded (a failed write is cut back, and the stream's
    buffer of it dropped rather than written later)."""
    script = textwrap.dedent(
        """
        import json, resource, signal, sys, warnings, torch, mixprec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        log_dir = sys.argv[1]
        model = torch.nn.Linear(3, 2)
        monitor = mixprec.Monitor(model, None, every=1, log_dir=log_dir, sinks=("jsonl",))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        warned = []
        for step in range(1, 6):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            if step == 2:  # room for part of one more record only
                size = len(open(log_dir + "/metrics.jsonl").read())
                resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
            if step == 4:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                monitor.step(torch.tensor(float(step)))
            warned += [step for w in caught if "failed" in str(w.message)]
        monitor.close()
        lines = open(log_dir + "/metrics.jsonl").read().splitlines()
        print(json.dumps({"warned": warned, "steps": [json.loads(line)["step"] for line in lines]}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"warned": [2, 3], "steps": [1, 4, 5]}


def monitored_run(tmp_path, steps: int = 6, every: int = 3, sinks=("jsonl", "tensorboard"), plant_at: int = 4,
                  fused: bool = False, per_tensor: bool = False, keep: int | None = 1000, start_step: int = 0):
    model = named_model()
    opt = mixprec.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
    scaler = mixprec.GradScaler("cpu", growth_interval=1000)
    monitor = mixprec.Monitor(model, scaler, every=every, log_dir=str(tmp_path), sinks=sinks, min_exponent=-30,
                              num_bins=40, per_tensor=per_tensor, keep=keep, start_step=start_step)
    assert monitor.last_stats() == {}  # nothing logged yet
    records, losses = [], []
    for i in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(3, 4)).pow(2).mean()
        losses.append(loss.item())
        scaler.scale(loss).backward()
        if i == plant_at:
            model.blocks[2].fc2.bias.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()
        records.append(monitor.step(loss, tokens=12))
    monitor.close()
    return model, scaler, monitor, records, losses


def test_monitor_records_every_n_steps_and_matches_float64(tmp_path) -> None:
    model, scaler, monitor, records, losses = monitored_run(tmp_path)
    assert [r is not None for r in records] == [False, False, True, False, False, True]
    first, second = records[2], records[5]
    assert (first["step"], first["interval"], second["step"]) == (3, 3, 6)
    assert first["loss"] == pytest.approx(sum(losses[:3]) / 3, rel=1e-12)
    assert second["loss"] == pytest.approx(sum(losses[3:]) / 3, rel=1e-12)
    assert (first["skipped_steps"], second["skipped_steps"], second["skipped_total"]) == (0, 1, 1)
    assert first["overflow"] == ""
    # The overflow at the 5th step (index 4), in the monitor's step numbering.
    assert second["overflow"] == f"step 5 (loss scale 65536): blocks.2.fc2.bias: inf (1 of {len(list(model.parameters()))} tensors)"
    assert second["loss_scale"] == 32768.0
    # The statistics are of the gradients as they stand at step 6, at the scale after its update.
    grads = [p.grad for p in model.parameters()]
    ref = reference_stats(grads, 32768.0, -30, 40).sum(0)
    n = ref[0].item()
    assert second["grad_elements"] == int(n)
    for key, col in [("zero_fraction", 1), ("flush_fraction", 2), ("subnormal_fraction", 3), ("overflow_fraction", 4),
                     ("nonfinite_fraction", 5)]:
        assert second[key] == ref[col].item() / n
    assert second["grad_norm"] == pytest.approx(math.sqrt(ref[6].item()), rel=1e-12)
    assert second["exponent_histogram"] == ref[8:].tolist()
    assert second["tokens_per_second"] > 0 and second["step_time"] > 0 and second["peak_memory"] > 0
    per_tensor = monitor.last_stats()
    assert list(per_tensor) == [name for name, _ in model.named_parameters()]
    # The JSON-lines sink holds the same records.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, second]
    assert list(monitor.records) == [first, second]


def test_progress_line_shows_the_scale_as_a_number(tmp_path, capsys) -> None:
    """The progress line printed "scale 3.277e+04" for 32768 (the loss's precision leaked into it)."""
    monitored_run(tmp_path, sinks=("progress",))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    assert "| scale 65536 |" in lines[0] and "| scale 32768 |" in lines[1]
    assert lines[0].startswith("step 3 | loss ") and " ms/step" in lines[0]


@pytest.mark.parametrize("keep", [0, 1, None])
def test_monitor_keeps_the_latest_records_the_sinks_keep_all(tmp_path, keep) -> None:
    _, _, monitor, records, _ = monitored_run(tmp_path, steps=9, every=2, sinks=("jsonl",), keep=keep)
    logged = [r for r in records if r is not None]
    assert len(logged) == 4
    assert list(monitor.records) == (logged if keep is None else logged[len(logged) - keep:])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == logged


def test_monitor_on_a_skipped_step_judges_the_true_gradients(tmp_path) -> None:
    """With fused=True mixprec's AdamW takes the scale itself (torch's protocol): on an overflowing step it
    skips before unscaling, so .grad still holds g * 65536 when the step is logged. The record must
    describe g (at the scale after the backoff), not the scaled values."""
    model, scaler, _, records, _ = monitored_run(tmp_path, sinks=("jsonl",), plant_at=5, fused=True)
    r = records[5]
    assert r["skipped_steps"] == 1 and r["loss_scale"] == 32768.0
    true_grads = [p.grad.double() / 65536.0 for p in model.parameters()]
    ref = reference_stats(true_grads, 32768.0, -30, 40).sum(0)
    n = ref[0].item()
    for key, col in [("flush_fraction", 2), ("subnormal_fraction", 3), ("overflow_fraction", 4), ("nonfinite_fraction", 5)]:
        assert r[key] == ref[col].item() / n, key
    assert r["exponent_histogram"] == ref[8:].tolist()
    assert math.isinf(r["grad_norm"])


@pytest.mark.parametrize("torch_optimizer", [False, True])
def test_monitor_judges_each_fused_optimizers_gradients_by_its_own_skip(tmp_path, torch_optimizer: bool) -> None:
    """Two optimizers that take the scale themselves (mixprec's AdamW with fused=True, or torch's fused AdamW),
    one scaler, an overflow in only the second's gradients (a GAN's discriminator, say): the second skips and
    leaves g * 65536 in .grad, the first divides. Each must be judged as its true gradients, and the per-tensor
    rows come back in the model's order describing the true gradients too."""
    model = named_model()
    params = list(model.parameters())
    half = len(params) // 2
    make = (lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True)) if torch_optimizer else (
        lambda ps: mixprec.optim.AdamW(ps, lr=0.01, fused=True))
    first, second = make(params[:half]), make(params[half:])
    scaler = mixprec.GradScaler("cpu", growth_interval=1000)
    monitor = mixprec.Monitor(model, scaler, every=2, sinks=(), min_exponent=-30, num_bins=40)
    for i in range(2):
        first.zero_grad()
        second.zero_grad()
        loss = model(torch.randn(3, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        if i == 1:
            params[-1].grad[0] = math.inf
        scaler.step(first)
        scaler.step(second)
        scaler.update()
        record = monitor.step(loss)
    assert record is not None and record["skipped_steps"] == 1 and record["loss_scale"] == 32768.0
    true_grads = [p.grad.double() / (65536.0 if k >= half else 1.0) for k, p in enumerate(params)]
    ref = reference_stats(true_grads, 32768.0, -30, 40)
    total = ref.sum(0)
    n = total[0].item()
    for key, col in [("zero_fraction", 1), ("flush_fraction", 2), ("subnormal_fraction", 3),
                     ("overflow_fraction", 4), ("nonfinite_fraction", 5)]:
        assert record[key] == total[col].item() / n, key
    assert record["exponent_histogram"] == total[8:].tolist()
    assert math.isinf(record["grad_norm"])
    rows = monitor.last_stats()
    assert list(rows) == [name for name, _ in model.named_parameters()]
    stacked = torch.stack(list(rows.values()))
    finite = ref[:, 6].isfinite()
    torch.testing.assert_close(stacked[finite][:, 6:8], ref[finite][:, 6:8], rtol=1e-12, atol=0)
    assert torch.equal(stacked[:, :6], ref[:, :6]) and torch.equal(stacked[:, 8:], ref[:, 8:])


def test_monitor_tensorboard_events_read_back(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _, monitor, records, _ = monitored_run(tmp_path, sinks=("tensorboard",), per_tensor=True)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for key in ("loss", "loss_scale", "skipped_steps", "flush_fraction", "overflow_fraction", "grad_norm",
                "tokens_per_second", "step_time", "peak_memory"):
        assert f"mixprec/{key}" in scalars, key
        events = acc.Scalars(f"mixprec/{key}")
        assert [e.step for e in events] == [3, 6]
        assert [e.value for e in events] == pytest.approx([records[2][key], records[5][key]], rel=1e-6)
    # The overflow's sources as text, at the logged step that saw it (step 6 holds step 5's overflow) only.
    acc_text = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc_text.Reload()
    texts = acc_text.Tensors("mixprec/overflow/text_summary")
    assert [t.step for t in texts] == [6]
    assert texts[0].tensor_proto.string_val[0].decode() == records[5]["overflow"]
    assert "blocks.2.fc2.bias: inf" in records[5]["overflow"]
    hist = acc.Histograms("mixprec/grad_log2_magnitude")
    assert [h.step for h in hist] == [3, 6]
    assert hist[-1].histogram_value.num == sum(records[5]["exponent_histogram"])
    assert list(hist[-1].histogram_value.bucket) == records[5]["exponent_histogram"]
    # per_tensor: each parameter's own histogram, from the same rows as monitor.last_stats()
    for name, row in monitor.last_stats().items():
        counts = row[8:].tolist()
        if sum(counts):
            h = acc.Histograms(f"mixprec/grad_log2_magnitude/{name}")[-1]
            assert h.step == 6 and list(h.histogram_value.bucket) == counts


def test_a_resumed_monitor_continues_the_runs_step_numbers(tmp_path) -> None:
    """A run that logged steps 3 and 6 and crashed, resumed from its checkpoint at step 3 with start_step=3:
    records, the every grid, metrics.jsonl and TensorBoard follow the run's steps, and TensorBoard no longer
    shows what the crashed run logged after step 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, crashed, _ = monitored_run(tmp_path, steps=6, every=3, plant_at=-1)
    assert [r["step"] for r in crashed if r] == [3, 6]
    _, _, _, resumed, _ = monitored_run(tmp_path, steps=4, every=3, plant_at=-1, start_step=3)
    assert [r is not None for r in resumed] == [False, False, True, False]
    assert resumed[2]["step"] == 6 and resumed[2]["interval"] == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 6]  # appended: the file keeps both runs' records
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("mixprec/loss")
    assert [e.step for e in events] == [3, 6]
    assert [e.value for e in events] == pytest.approx([crashed[2]["loss"], resumed[2]["loss"]], rel=1e-6)
    with pytest.raises(ValueError, match="start_step must be a non-negative int"):
        mixprec.Monitor(named_model(), start_step=-1)


def test_monitor_reads_nothing_back_between_logged_steps(tmp_path) -> None:
    model = named_model()
    opt = mixprec.optim.AdamW(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu")
    monitor = mixprec.Monitor(model, scaler, every=4, sinks=())
    watch = HostReads()
    for i in range(3):
        opt.zero_grad()
        loss = model(torch.randn(3, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        with watch:
            scaler.step(opt)
            scaler.update()
            assert monitor.step(loss, tokens=5) is None
    assert watch.reads == []


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(sinks=("wandb",)), ValueError, r"unknown sink.*accepted"),
    (dict(every=0), ValueError, "every must be a positive int"),
    (dict(every=-5), ValueError, "every must be a positive int"),
    (dict(sinks=("jsonl",)), ValueError, "need a log_dir"),
    (dict(scaler=torch.amp.GradScaler("cpu")), TypeError, "mixprec.GradScaler"),
    (dict(num_bins=0), ValueError, "num_bins"),
    (dict(min_exponent=-5000), ValueError, "min_exponent"),
    (dict(keep=-1), ValueError, "keep must be a non-negative int or None"),
    (dict(keep=2.5), ValueError, "keep must be a non-negative int or None"),
])
def test_monitor_bad_input(kwargs, error, needle) -> None:
    with pytest.raises(error, match=needle):
        mixprec.Monitor(named_model(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the sync check needs a GPU")
def test_monitor_no_host_sync_between_logged_steps_on_cuda() -> None:
    """torch.cuda.set_sync_debug_mode('error') turns every host synchronisation into an error: tracked steps
    and the monitor's per-step bookkeeping must not synchronise; the logged step (one read) may."""
    torch.manual_seed(0)
    model = named_model().cuda().half()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = mixprec.GradScaler("cuda")
    monitor = mixprec.Monitor(model, scaler, every=4, sinks=())
    x = torch.randn(3, 4, device="cuda").half()

    def one_step(i: int) -> None:
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        if i == 1:
            model.blocks[0].fc1.weight.grad[0, 0].fill_(math.inf)
        scaler.step(opt)
        scaler.update()
        monitor.step(loss, tokens=3)

    for i in range(4):  # warm-up, ending with a logged step
        one_step(i)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            one_step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    one_step(3)
    record = monitor.records[-1]
    assert record["skipped_steps"] == 1 and "blocks.0.fc1.weight: inf" in record["overflow"]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_record_overflow_op(device: str) -> None:
    """The scaler's per-step bookkeeping op: on an overflow the record takes [step, scale, checked, amax...];
    amax is zeroed either way; count follows the flag."""
    kw = dict(device=device)
    record = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64, **kw)
    amax = torch.tensor([1.5, math.inf, math.nan], **kw)
    count = torch.zeros((), dtype=torch.int64, **kw)
    clean, over, scale = torch.zeros(1, **kw), torch.full((1,), 2.0, **kw), torch.full((1,), 1024.0, **kw)
    mixprec.ops.record_overflow_(record, amax, clean, scale, 4, 3, count)
    assert record.tolist() == [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and amax.tolist() == [0.0] * 3
    assert count.item() == 0
    amax.copy_(torch.tensor([1.5, math.inf, math.nan]))
    mixprec.ops.record_overflow_(record, amax, over, scale, 5, 3, count)
    r = record.tolist()
    assert r[:5] == [5.0, 1024.0, 3.0, 1.5, math.inf] and math.isnan(r[5])
    assert amax.tolist() == [0.0] * 3 and count.item() == 1
    torch.library.opcheck(torch.ops.mixprec.record_overflow_.default,
                          (record.clone(), torch.ones(3, **kw), over, scale, 6, 3, count.clone()))
    before = record.clone()
    with pytest.raises(RuntimeError, match=r"record must be a contiguous float64 vector of 3 \+ len\(amax\) = 6"):
        mixprec.ops.record_overflow_(record[:5], amax, over, scale, 1, 3)
    with pytest.raises(RuntimeError, match="step must be >= 0"):
        mixprec.ops.record_overflow_(record, amax, over, scale, -1, 3)
    with pytest.raises(RuntimeError, match="count must be a one-element Long"):
        mixprec.ops.record_overflow_(record, amax, over, scale, 1, 3, count.float())
    torch.testing.assert_close(record, before, equal_nan=True, rtol=0, atol=0)


def test_overflow_record_survives_a_changing_gradient_set_and_a_deleted_model() -> None:
    """Parameters without gradients on some steps (an unused branch) grow the record instead of resetting
    it; a model that is gone leaves positional names, not a kept-alive model."""
    import gc
    import weakref

    model = named_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = mixprec.GradScaler("cpu", track_overflows=True)
    n = len(list(model.parameters()))
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(3, 4)
        # steps 0 and 2 skip blocks.2 (no gradients there); step 1 uses everything and overflows in it
        h = model.embed(x)
        for k, block in enumerate(model.blocks):
            if k < 2 or i % 2 == 1:
                h = block(h)
        scaler.scale(model.head(h).pow(2).mean()).backward()
        if i == 1:
            model.blocks[2].fc2.weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
    r = scaler.last_overflow(model)
    assert (r.step, r.num_tensors) == (1, n) and r.sources == [("blocks.2.fc2.weight", math.inf)]
    # Tracking switched off and on in the middle of an iteration: update() still works, the record restarts.
    opt.zero_grad()
    scaler.scale(model(torch.randn(3, 4)).pow(2).mean()).backward()
    scaler.unscale_(opt)
    scaler.set_track_overflows(False)
    scaler.set_track_overflows(True)
    scaler.step(opt)
    scaler.update()
    assert scaler.last_overflow(model) is None
    # The record holds its parameters weakly.
    opt.zero_grad()
    scaler.scale(model(torch.randn(3, 4)).pow(2).mean()).backward()
    model.head.bias.grad[0] = math.nan
    scaler.step(opt)
    scaler.update()
    alive = weakref.ref(model.head.bias)
    del model, opt
    gc.collect()
    assert alive() is None
    report = scaler.last_overflow()
    assert report.sources[0][0].startswith("param[") and math.isnan(report.sources[0][1])


def test_a_resumed_monitor_names_the_overflow_by_the_runs_step(tmp_path) -> None:
    _, _, _, records, _ = monitored_run(tmp_path, steps=4, every=2, sinks=("jsonl",), plant_at=1, start_step=6)
    assert records[1]["step"] == 8 and records[1]["overflow"].startswith("step 8 (loss scale")
    resumed = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [8, 10]


def test_close_ends_every_sink_and_refuses_later_steps(tmp_path) -> None:
    model = named_model()
    with mixprec.Monitor(model, None, every=1, log_dir=str(tmp_path), sinks="jsonl") as monitor:  # one sink by name
        assert monitor.sinks == ("jsonl",)
        monitor.step(torch.tensor(1.0), tokens=3)
    with pytest.raises(RuntimeError, match="the monitor is closed"):
        monitor.step(torch.tensor(1.0))
    monitor.close()  # again: nothing
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("kwargs, needle", [
    (dict(min_exponent="-40"), "min_exponent must be an int"), (dict(num_bins=True), "num_bins must be an int"),
    (dict(num_bins=64.9), "num_bins must be an int"), (dict(per_tensor="no"), "per_tensor must be a bool"),
])
def test_monitor_settings_are_not_coerced(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        mixprec.Monitor(named_model(), None, **kwargs)
    with pytest.raises(ValueError, match="tokens must be a whole number"):
        mixprec.Monitor(named_model(), None, sinks=()).step(torch.tensor(1.0), tokens=2.7)
    mixprec.Monitor(named_model(), None, sinks=()).step(torch.tensor(1.0), tokens=2048.0)  # mask.sum().item()


def test_a_monitor_built_before_the_parameters_were_replaced_warns_once() -> None:
    """fully_shard replaces a model's parameters with DTensors; a monitor built before it measured the old ones
    and logged zeros silently. A logged step compares the model's first parameter with the one it watches."""
    model = nn.Linear(4, 2)
    monitor = mixprec.Monitor(model, every=1, sinks=())
    model(torch.ones(3, 4)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.step(torch.tensor(1.0))["grad_elements"] == 10
    model.zero_grad(set_to_none=True)
    model.weight = nn.Parameter(model.weight.detach().clone())  # as fully_shard does to every parameter
    model.bias = nn.Parameter(model.bias.detach().clone())
    model(torch.ones(3, 4)).sum().backward()  # into the new parameters only
    with pytest.warns(UserWarning, match="parameters were replaced after the monitor was built"):
        monitor.step(torch.tensor(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.step(torch.tensor(1.0))  # once
    # Replaced while the watched parameters still get gradients (FSDP2 registers its unsharded parameters
    # between steps with reshard_after_backward=False): nothing to warn about.
    model = nn.Linear(4, 2)
    monitor = mixprec.Monitor(model, every=1, sinks=())
    watched = model.weight
    model.weight = nn.Parameter(model.weight.detach().clone())
    watched.grad = torch.ones_like(watched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.step(torch.tensor(1.0))
