"""The main job end to end (tiny settings) and the diagnostics against hand-computed cases."""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from mixprec import demo, diagnostics


def test_demo_runs_end_to_end(tmp_path) -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        results = demo.main(["--size", "tiny", "--steps", "40", "--out", str(tmp_path), "--no-progress",
                             "--policies", "mixed_bfloat16", "mixed_bfloat16+fp8"])
    text = buf.getvalue()
    assert [r.policy.split()[0] for r in results] == ["float32", "mixed_bfloat16", "mixed_bfloat16+fp8"]
    fp32, mixed, fp8 = results
    assert len(fp32.losses) == len(mixed.losses) == len(fp8.losses) == 40
    assert fp32.losses[-1] < fp32.losses[0] * 0.8, "fp32 did not train"
    # Same seed, same batches: the mixed runs (the MLPs in FP8 in the last) end within 3% of fp32's loss.
    assert abs(mixed.losses[-1] - fp32.losses[-1]) / fp32.losses[-1] < 0.03
    assert abs(fp8.losses[-1] - fp32.losses[-1]) / fp32.losses[-1] < 0.03
    header = next(line for line in text.splitlines() if line.strip().startswith("policy"))
    for column in demo.COLUMNS:
        assert column in header, column
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert (tmp_path / "results.json").exists()


def test_demo_with_loss_scaling_marks_skips(tmp_path) -> None:
    results = demo.main(["--size", "tiny", "--steps", "12", "--out", str(tmp_path), "--no-progress",
                         "--policies", "mixed_float16", "--growth-interval", "3"])
    fp16 = results[1]
    assert len(fp16.scales) == 12 and math.isfinite(fp16.losses[-1])
    # Every step the demo marks as skipped is one where the scale backed off, and every back-off is marked.
    before = [2.0**16] + fp16.scales[:-1]
    backoffs = [i for i, (b, a) in enumerate(zip(before, fp16.scales)) if a < b]
    assert backoffs == fp16.skipped_steps
    grew = [i for i, (b, a) in enumerate(zip(before, fp16.scales)) if a > b]
    assert grew, "with growth_interval 3 and few overflows the scale must have grown"
    assert all(fp16.scales[i] == 2 * before[i] for i in grew)


def test_underflow_report_counts_known_values() -> None:
    g = torch.tensor([0.0, 2.0**-30, 2.0**-20, 2.0**-10, 1.0, 70000.0])
    r = diagnostics.underflow_report([g], scale=1.0, fraction=1.0)
    assert (r.total, r.zero, r.flush_to_zero, r.subnormal, r.overflow) == (6, 1, 1, 1, 1)
    assert r.exponent_histogram == {-30: 1, -20: 1, -10: 1, 0: 1, 16: 1}
    # Lifting 2^-30 to 2^-24 needs 2^6, but 70000 overflows at any scale >= 1: the largest safe is 2^-1.
    assert r.recommended_scale == 0.5
    scaled = diagnostics.underflow_report([g], scale=2.0**10)
    assert (scaled.flush_to_zero, scaled.subnormal, scaled.overflow) == (0, 1, 1)
    small = diagnostics.underflow_report([torch.tensor([2.0**-30, 2.0**-28, 1.0])], fraction=1.0)
    assert small.recommended_scale == 2.0**6
    model = nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    assert diagnostics.underflow_report(model).total == 4


def test_compare_outputs_zero_for_identical_precision_and_small_for_bf16() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    same = diagnostics.compare_outputs(model, [x], "float32")
    assert len(same) == 1 and same[0].max_abs == 0.0 and same[0].mean_rel == 0.0
    bf16 = diagnostics.compare_outputs(model, [x], "mixed_bfloat16")
    assert 0.0 < bf16[0].max_abs < 0.1 and bf16[0].mean_rel < 0.1
    fn = diagnostics.compare_outputs(lambda a: (a @ a.t(), a.sum()), [x], "mixed_bfloat16")
    assert len(fn) == 2 and fn[0].max_abs > 0


def test_benchmark_precision_reports_each_dtype() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    out = diagnostics.benchmark_precision(model, [torch.randn(16, 32)], dtypes=(torch.float32, torch.bfloat16),
                                          repeats=2, warmup=1)
    assert [r.dtype for r in out] == [torch.float32, torch.bfloat16]
    assert out[0].speedup == 1.0 and all(r.seconds > 0 and r.peak_mib > 0 and math.isfinite(r.speedup) for r in out)
    # CPU memory: fp32 parameters and gradients (2632 floats each) plus what the forward saved: the input
    # (16 x 32) and the ReLU's output (16 x 64), which the second Linear saves too (one storage, counted once).
    state = 2 * 2632 * 4
    assert out[0].peak_mib * 2**20 == state + (16 * 32 + 16 * 64) * 4
    # Under bf16 autocast the saved activations are bf16 (and the weights' bf16 copies): not fp32's figure.
    assert out[1].peak_mib != out[0].peak_mib and out[1].peak_mib * 2**20 > state


def test_compare_outputs_casts_nested_inputs_and_draws_the_same_dropout_masks() -> None:
    """Input tensors inside dicts and tuples are cast like top-level ones (a bf16 one inside a dict made the
    fp32 run fail; an fp32 one stayed fp32 under the policy and hid its error), and both runs draw the same
    dropout masks, leaving the caller's random state as it was."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(16, 16), nn.Dropout(0.3)

        def forward(self, batch: dict) -> torch.Tensor:
            a, (b,) = batch["a"], batch["rest"]
            return self.drop(self.fc(a)) + b

    model = Net()
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    for policy in ("float32", "bf16-true"):
        direct = diagnostics.compare_outputs(lambda a, b: model({"a": a, "rest": (b,)}), [a, b], policy)
        nested = diagnostics.compare_outputs(model, [{"a": a.bfloat16(), "rest": (b,)}], policy)
        if policy == "float32":  # the same masks: nothing differs at all
            assert direct[0].max_abs == nested[0].max_abs == 0.0
        else:
            assert nested[0].mean_rel > 0.0
    before = torch.get_rng_state()
    diagnostics.compare_outputs(model, [{"a": a, "rest": (b,)}], "bf16-true")
    assert torch.equal(torch.get_rng_state(), before)


def test_compare_outputs_counts_equal_infinities_as_no_error() -> None:
    """Masked attention logits hold -inf in both runs: the same value, an error of 0 (not inf - inf)."""
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).masked_fill(torch.triu(torch.ones(4, 4, dtype=torch.bool), 1), -math.inf)

    torch.manual_seed(0)
    same = diagnostics.compare_outputs(Masked(), [torch.randn(4, 4)], "32-true")[0]
    assert (same.max_abs, same.max_rel, same.mean_rel) == (0.0, 0.0, 0.0)
    low = diagnostics.compare_outputs(Masked(), [torch.randn(4, 4)], "bf16-mixed")[0]
    assert 0 < low.max_abs < 0.05 and math.isfinite(low.max_rel) and math.isfinite(low.mean_rel)


@pytest.mark.parametrize("call, needle", [
    (lambda g: diagnostics.underflow_report(g, scale=-1024.0), "scale must be a finite number > 0"),
    (lambda g: diagnostics.underflow_report(g, scale=math.nan), "scale must be a finite number > 0"),
    (lambda g: diagnostics.underflow_report(g, fraction=1.5), r"fraction must be in \[0, 1\]"),
    (lambda g: diagnostics.benchmark_precision(nn.Linear(2, 2), [torch.ones(1, 2)], dtypes=(torch.int8,)), "dtypes"),
    (lambda g: diagnostics.benchmark_precision(nn.Linear(2, 2), [torch.ones(1, 2)], dtypes=()), "dtypes"),
    (lambda g: diagnostics.benchmark_precision(nn.Linear(2, 2), [torch.ones(1, 2)], repeats=0), "repeats"),
])
def test_diagnostics_refuse_meaningless_arguments_by_name(call, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        call([torch.ones(3)])
