"""mixprec.nn.Linear under torch.distributed, 2 gloo ranks on the CPU: FSDP2 (fully_shard) trains a converted
model as it trains the plain one (FSDP2 owns the gradient dtype there); DistributedDataParallel trains it
as it trains torch.nn.Linear (16-bit weights get gradients in their own dtype there, as DDP needs)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import mixprec
from conftest import EXIT_NOW, SHARDED_MLP

FSDP_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    import mixprec
    rank, world, port, out, convert = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if convert == "1":
        mixprec.nn.convert(model)
    elif convert == "fp8":  # every layer a Float8Linear (current scaling: each rank scales its own shard of data)
        mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe(scaling="current"), filter=lambda name, m: True)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    # A power-of-two scale unscales exactly; the scaler unscales each rank's local shards (DTensor grads).
    scaler = mixprec.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    gen = torch.Generator().manual_seed(5)
    for i in range(4):
        opt.zero_grad()
        for micro in range(2):  # gradient accumulation: FSDP2 keeps the unsharded gradients in reduce_dtype
            model.set_requires_gradient_sync(micro == 1)
            x = torch.randn(2 * world, 8, generator=gen)
            scaler.scale(model(x.chunk(world)[rank]).float().pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    full = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()
    exit_now()
    """
)

DDP_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, warnings, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        for kind in ("torch", "mixprec", "fp8", "int8"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).to(dtype)
            if kind == "mixprec":
                mixprec.nn.convert(model)
            elif kind == "fp8":
                mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe(scaling="current"), filter=lambda name, m: True)
            elif kind == "int8":
                mixprec.nn.convert(model, int8=True, filter=lambda name, m: True)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gen = torch.Generator().manual_seed(5 + rank)  # each rank its own data
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(3):
                    opt.zero_grad(set_to_none=False)  # .grad kept: fp32 ones take the in-place GEMM
                    with ddp.no_sync():  # gradient accumulation: the first micro-batch is not reduced
                        ddp(torch.randn(4, 16, generator=gen).to(dtype)).float().pow(2).mean().backward()
                    ddp(torch.randn(4, 16, generator=gen).to(dtype)).float().pow(2).mean().backward()
                    opt.step()
            warned = sum("under DistributedDataParallel" in str(w.message) for w in caught)
            assert warned == (2 if kind != "torch" and dtype == torch.bfloat16 else 0), (kind, dtype, warned)
            assert all(p.grad.dtype == dtype for p in model.parameters()), (kind, dtype)
            state = [t.detach().clone() for p in model.parameters() for t in (p, p.grad)]
            for t in state:  # every rank holds the same: the gradients were reduced
                gathered = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(gathered, t)
                assert torch.equal(gathered[0], gathered[1]), (kind, dtype)
            results[(str(dtype), kind)] = state
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    exit_now()
    """
)


AMAX_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import copy, sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, reduce = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    ddp = len(sys.argv) > 5 and sys.argv[5] == "ddp"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    mixprec.nn.convert(original, fp8=mixprec.fp8.Recipe(scaling="delayed", amax_history_len=4),
                       filter=lambda name, m: True, amax_group=dist.group.WORLD if reduce else None)
    # A deep copy trains: it shares the original's group (as C++'s clone() does).
    model = copy.deepcopy(original)
    assert all(m.amax_group is original[0].amax_group for m in model if isinstance(m, mixprec.nn.Float8Linear))
    if ddp:  # DDP's default broadcast_buffers=True must not replace each rank's amaxes with rank 0's
        import warnings
        warnings.simplefilter("error")  # nor warn: convert marked the FP8 buffers for DDP to leave alone
        model = torch.nn.parallel.DistributedDataParallel(model)
        assert not any(b is model.module[0].fp8_forward_amax_history for b in model.modules_buffers)
    # Each rank its own data, rank 1's four times larger: the amaxes differ by rank.
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(world, 8, 16, generator=gen) * torch.tensor([1.0, 4.0])[:world, None, None] for _ in range(3)]
    for x in xs:
        model(x[rank]).pow(2).mean().backward()
    model(xs[0][rank])  # its forward reduces what the third step recorded, then updates the scales
    layer = model.module[0] if ddp else model[0]
    # Row 1 holds the third step's amaxes: the input's, then the weight's (the same on every rank).
    want_x = xs[2].abs().amax(dim=(1, 2))
    got = layer.fp8_forward_amax_history[1].clone()
    assert got[0].item() == (want_x.max() if reduce else want_x[rank]).item(), (rank, got, want_x)
    assert got[1].item() == layer.weight.abs().max().item()
    # Everything but the row the last forward just recorded (reduced by the next forward).
    state = torch.cat([layer.fp8_forward_amax_history[1:].reshape(-1)] +
                      [getattr(layer, n).reshape(-1) for n in mixprec.nn._FP8_BUFFERS[1:]])
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    assert torch.equal(states[0], states[1]) == reduce, (reduce, states)
    dist.destroy_process_group()
    exit_now()
    """
)


AMAX_CHECKPOINT_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        mixprec.nn.convert(model, fp8=mixprec.fp8.Recipe(scaling="delayed", amax_history_len=4),
                           filter=lambda name, m: True, amax_group=dist.group.WORLD)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def train(model, opt, seed, steps):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):  # each rank its own data, rank 1's larger: the amaxes differ by rank
            x = torch.randn(world, 8, 16, generator=gen) * torch.tensor([1.0, 4.0])[:, None, None]
            opt.zero_grad()
            model(x[rank]).pow(2).mean().backward()
            for p in model.parameters():  # the ranks' gradients averaged, as DDP would
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()

    model, opt = make()
    train(model, opt, 1, 3)
    mixprec.nn.reduce_amax_(model)  # on every rank, before one rank's state is saved
    saved = [None]
    if rank == 0:
        saved = [{k: v.clone() for k, v in model.state_dict().items()}]
    dist.broadcast_object_list(saved, src=0)  # every rank resumes from rank 0's checkpoint
    resumed, ropt = make()
    resumed.load_state_dict(saved[0])
    train(model, opt, 2, 3)
    train(resumed, ropt, 2, 3)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), (rank, k)
    dist.destroy_process_group()
    exit_now()
    """
)


def test_delayed_scaling_with_an_amax_group_resumes_exactly_from_one_ranks_checkpoint() -> None:
    """The amaxes of the last step are each rank's own until the next training forward reduces them; after
    mixprec.nn.reduce_amax_ every rank holds the same state, so resuming every rank from rank 0's checkpoint
    continues exactly (it did not: the other ranks' amaxes were lost)."""
    run_ranks(AMAX_CHECKPOINT_SCRIPT)


def test_delayed_scaling_amax_reduced_over_a_group() -> None:
    """amax_group: ranks that see different data end with the same delayed-scaling state (the amax window
    holds the MAX over ranks), in a deep copy of the converted model too; without it each rank keeps its
    own. Under DistributedDataParallel (broadcast_buffers=True, its default) alike: before, DDP's broadcast
    replaced every rank's amaxes with rank 0's first."""
    run_ranks(AMAX_SCRIPT, "1")
    run_ranks(AMAX_SCRIPT, "0")
    run_ranks(AMAX_SCRIPT, "1", "ddp")  # under DDP's default buffer broadcast too
    run_ranks(AMAX_SCRIPT, "0", "ddp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, *extra: str, timeout: int = 180) -> None:
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), "2", port, *extra]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=timeout) == 0


def test_fsdp2_trains_a_converted_model_like_the_plain_one(tmp_path) -> None:
    """Under FSDP2 the layer hands its fp32 GEMM result to FSDP2 in the unsharded parameter's dtype; FSDP2
    reduces and accumulates it in reduce_dtype. The result equals FSDP2 with torch.nn.Linear up to the
    rounding of the fp32 GEMM result to bf16, and both equal an unsharded run on the whole batch closely."""
    plain, converted = str(tmp_path / "plain.pt"), str(tmp_path / "converted.pt")
    run_ranks(FSDP_SCRIPT, plain, "0")
    run_ranks(FSDP_SCRIPT, converted, "1")
    a, b = torch.load(plain), torch.load(converted)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-3)
    # One process, the whole batch, bf16 compute under autocast, fp32 parameters: what FSDP2 computes.
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                               torch.nn.Linear(16, 4)).parameters()]
    for x, p, p0 in zip(b, single_process_run(fp8=False), initial):
        assert not torch.equal(x, p0)  # every parameter trained
        torch.testing.assert_close(x, p, rtol=2e-2, atol=2e-3)


def single_process_run(fp8: bool) -> list[torch.Tensor]:
    """What the FSDP2 script computes, in one process: the same initial model and batches, bf16 compute under
    autocast, each rank's chunk through the model separately (so current scaling sees what each rank sees)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if fp8:
        mixprec.nn.convert(ref, fp8=mixprec.fp8.Recipe(scaling="current"), filter=lambda name, m: True)
    opt = mixprec.optim.AdamW(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        opt.zero_grad()
        for _ in range(2):
            x = torch.randn(4, 8, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = sum(ref(c).float().pow(2).mean() for c in x.chunk(2)) / 2
            loss.backward()
        opt.step()
    return [p.detach() for p in ref.parameters()]


def test_fsdp2_trains_float8_layers(tmp_path) -> None:
    """Float8Linear under FSDP2: the layer sees the unsharded weight in forward and hands FSDP2 its fp32 FP8
    weight gradient; the result equals the same FP8 model trained in one process closely. FSDP2 rounds the
    gradient to bf16 before reducing it; where an FP8 gradient is near zero, Adam's normalised step turns
    that rounding into a visible difference, so a few values (at most 3%; 1.6% here) may differ by up to
    three quarters of the four steps' reach (3e-2); the rest agree as tightly as the plain layers do."""
    out = str(tmp_path / "fp8.pt")
    run_ranks(FSDP_SCRIPT, out, "fp8")
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                               torch.nn.Linear(16, 4)).parameters()]
    for x, p, p0 in zip(torch.load(out), single_process_run(fp8=True), initial):
        assert torch.isfinite(x).all() and not torch.equal(x, p0)  # every parameter trained
        diff = (x - p).abs()
        assert (diff <= 3e-2).all() and (diff > 2e-3 + 2e-2 * p.abs()).float().mean() <= 0.03, diff.max()


def test_ddp_trains_converted_layers_as_it_trains_torchs(tmp_path) -> None:
    """Under DistributedDataParallel (gradient accumulation with no_sync, .grad kept across steps) converted
    layers train as torch.nn.Linear does: 16-bit weights get gradients in their own dtype at the first forward
    (one warning per layer; Float8Linear and Int8Linear alike), which DDP buckets and reduces; fp32 weights keep fp32 gradients, added in place by
    the GEMM and reduced by DDP from .grad. Every rank ends with the same parameters and gradients."""
    out = str(tmp_path / "ddp.pt")
    run_ranks(DDP_SCRIPT, out)
    results = torch.load(out)
    # fp32: the same arithmetic up to the GEMMs' summation order.
    for a, b in zip(results[("torch.float32", "torch")], results[("torch.float32", "mixprec")]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # bf16: our gradient is the fp32 GEMM result rounded once to bf16, torch's bf16 GEMM rounds its fp32 sums
    # once too: the same bits, so the same steps.
    for a, b in zip(results[("torch.bfloat16", "torch")], results[("torch.bfloat16", "mixprec")]):
        assert torch.equal(a, b)
    # FP8 and INT8 layers train under DDP too (their own arithmetic: compared with torch's only loosely).
    for dtype in ("torch.bfloat16", "torch.float32"):
        for kind in ("fp8", "int8"):
            for a, b in zip(results[(dtype, "torch")][::2], results[(dtype, kind)][::2]):
                torch.testing.assert_close(b.float(), a.float(), rtol=0.1, atol=0.02)


def test_ddp_wrapping_another_module_than_the_converted_one_warns() -> None:
    """convert() marks the FP8 buffers of the module it converted for DDP to leave alone; a DDP wrapping a
    parent it never saw would broadcast rank 0's delayed-scaling state over every rank's: a warning says so,
    once per DDP. Wrapping the converted module itself is silent."""
    import warnings

    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = mixprec.nn.convert(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)),
                                   fp8=mixprec.fp8.Recipe(scaling="delayed"), filter=lambda name, m: True)
        assert "0.fp8_forward_amax_history" in inner._ddp_params_and_buffers_to_ignore
        x = torch.randn(4, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.nn.parallel.DistributedDataParallel(inner)(x).sum().backward()
        outer = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(inner))
        with pytest.warns(UserWarning, match="broadcasts this layer's delayed-scaling state from rank 0"):
            outer(x).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outer(x).sum().backward()  # once per DDP and layer
    finally:
        dist.destroy_process_group()


def test_reduce_amax_op_schema_and_errors() -> None:
    """fp8_reduce_amax_ under opcheck (one rank: MAX of one is the identity, so the histories keep their
    values), and histories that are not delayed scaling's refused before any collective."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        name = dist.group.WORLD.group_name
        forward, backward = torch.rand(4, 2), torch.rand(4, 1)
        before = forward.clone(), backward.clone()
        torch.library.opcheck(torch.ops.mixprec.fp8_reduce_amax_, (forward, backward, name))
        torch.ops.mixprec.fp8_reduce_amax_(forward, backward, name)
        assert torch.equal(forward, before[0]) and torch.equal(backward, before[1])
        with pytest.raises(ValueError, match=r"forward_amax_history must be delayed scaling's float32 \[history, 2\]"):
            torch.ops.mixprec.fp8_reduce_amax_(torch.rand(4, 3), backward, name)
        with pytest.raises(ValueError, match="backward_amax_history"):
            torch.ops.mixprec.fp8_reduce_amax_(forward, torch.rand(4, 1).double(), name)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharding_the_whole_model_with_16_bit_compute() -> None:
    """One FSDP2 group over every layer (fully_shard on the root only) with bf16 param_dtype: FSDP2 installs its
    unsharded parameters in the layers and reduce-scatters the group's gradients together, which needs one
    gradient dtype; the converted model's gradients equal the plain model's (one rank)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        grads = []
        for convert in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
            if convert:
                mixprec.nn.convert(model)
            fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).float().pow(2).mean().backward()
            grads.append([p.grad.full_tensor() for p in model.parameters()])
        for a, b in zip(*grads):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3)
    finally:
        dist.destroy_process_group()


SCALER_HOOK_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Checking(mixprec.GradScaler):  # checks the gradients itself, as a sharded scaler's _unscale_grads_ may
        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    for fused in (False, True):
        opt = mixprec.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
        scaler = Checking("cpu", init_scale=8.0, process_group=dist.group.WORLD)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(model(torch.ones(2, 4)).sum()).backward()
        if rank == 1:
            model.weight.grad[0, 0] = float("inf")  # one rank overflows: every rank must skip
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 4.0, (fused, scaler.get_scale())
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), fused
        opt.zero_grad()
    dist.destroy_process_group()
    exit_now()
    """
)


def test_a_scaler_subclass_with_its_own_checks_still_agrees_across_ranks(tmp_path) -> None:
    """A subclass that overrides _unscale_grads_ (the route torch's unscale_ and _check_inf_per_device take)
    still has its flags all-reduced over process_group: an overflow on one rank skips the step on both."""
    run_ranks(SCALER_HOOK_SCRIPT, str(tmp_path / "unused"))


FSDP2_SCALER_SCRIPT = EXIT_NOW + SHARDED_MLP + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Checking(mixprec.GradScaler):  # torch's route: the subclass's own _unscale_grads_ checks
        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)

    results = {}
    for scaler_cls in (torch.amp.GradScaler, mixprec.GradScaler, Checking):
        for opt_kind in ("mixprec", "mixprec-fused", "torch-fused"):
            for unscale_first in (False, True):
                model = sharded_mlp(4, 8, 2)
                if opt_kind == "torch-fused":
                    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
                else:
                    opt = mixprec.optim.AdamW(model.parameters(), lr=0.1, fused=opt_kind == "mixprec-fused")
                # No process_group: the gradients' DTensor sharding says which ranks must agree, as for torch's.
                scaler = scaler_cls("cpu", init_scale=8.0)
                trace = []
                for step in range(3):
                    opt.zero_grad()
                    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
                    if step != 1 and rank == 0:  # rank 0's shard alone overflows (steps 0 and 2)
                        model[0].weight.grad.to_local()[0, 0] = float("inf")
                    if unscale_first:
                        scaler.unscale_(opt)
                    scaler.step(opt)
                    scaler.update()
                    trace.append(scaler.get_scale())
                params = [p.full_tensor() for p in model.parameters()]
                gathered = [None] * world
                dist.all_gather_object(gathered, (trace, [p.tolist() for p in params]))
                assert gathered[0] == gathered[1], (scaler_cls, opt_kind, unscale_first, gathered)
                results[(scaler_cls.__name__, scaler_cls.__module__, opt_kind, unscale_first)] = (trace, params)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    exit_now()
    """
)


def test_fsdp2_overflow_on_one_rank_skips_on_every_rank_as_torchs_scaler(tmp_path) -> None:
    """Under FSDP2 each rank checks its own gradient shards; torch's scaler MAX-reduces the flag over the shards'
    mesh (DTensor's found_inf handler), so one rank's overflow skips the step everywhere. mixprec's does the same
    without a process_group (it was each rank for itself: ranks stepped and scaled differently), through
    unscale_, the fused optimizers' scaled step (which crashed) and a subclass's _unscale_grads_."""
    out = str(tmp_path / "results.pt")
    run_ranks(FSDP2_SCALER_SCRIPT, out)
    results = torch.load(out)
    for (name, module, opt_kind, unscale_first), (trace, params) in results.items():
        assert trace == [4.0, 4.0, 2.0], (name, module, opt_kind, unscale_first, trace)  # skip, step, skip
        ref_trace, ref_params = results[("GradScaler", "torch.amp.grad_scaler", opt_kind, unscale_first)]
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


FSDP2_MONITOR_SCRIPT = EXIT_NOW + SHARDED_MLP + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def reference(grads):  # float64, from the whole (gathered) gradients
        g = torch.cat([t.flatten() for t in grads])
        finite = g[g.isfinite()]
        nonzero = finite[finite != 0]
        exponent = torch.frexp(nonzero.abs())[1] - 1  # floor(log2 |g|), exactly
        return {"n": g.numel(), "zero": int((g == 0).sum()), "nonfinite": int((~g.isfinite()).sum()),
                "norm": float(g.pow(2).sum().sqrt()),
                "histogram": torch.bincount((exponent + 40).clamp(0, 63), minlength=64).tolist(),
                "amax": [float(t[t.isfinite()].abs().max()) for t in grads]}

    results = {}
    for fused in (False, True):
        model = sharded_mlp(6, 10, 3)
        opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        scaler = mixprec.GradScaler("cpu", init_scale=1024.0)
        monitor = mixprec.Monitor(model, scaler, every=1, sinks=())
        torch.manual_seed(1 + rank)
        trace = []
        for step in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.randn(4, 6)).pow(2).mean()).backward()
            if step == 1 and rank == 1:  # rank 1's shard of 2.weight alone
                model[2].weight.grad.to_local()[0, 0] = float("nan")
            scale = scaler.get_scale()
            truth = [p.grad.full_tensor().double() / scale for p in model.parameters()]  # a power of two: exact
            scaler.step(opt)
            scaler.update()
            record = monitor.step(torch.tensor(float(step)))
            for key in ("step_time", "tokens_per_second", "peak_memory"):  # each rank's own
                del record[key]
            rows = monitor.last_stats()
            trace.append((record, reference(truth), [float(rows[n][7]) for n, _ in model.named_parameters()],
                          str(scaler.last_overflow(model))))
        gathered = [None] * world
        dist.all_gather_object(gathered, trace)
        assert repr(gathered[0]) == repr(gathered[1])  # every rank logs the same, whole-gradient figures (NaN too)
        results[fused] = trace
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    exit_now()
    """
)


def test_fsdp2_monitor_and_overflow_sources_describe_the_whole_gradients(tmp_path) -> None:
    """Under FSDP2 each rank holds a shard of every gradient (a DTensor). The Monitor reads the local shards and
    sums its statistics over the shards' mesh (max |g|: the largest), and the scaler MAX-reduces each parameter's
    max |g| with the overflow flag: both ranks log the figures of the whole gradients (checked against float64
    from the gathered gradients) and name the parameter whose shard on the other rank overflowed. Before, the
    Monitor failed on DTensor gradients and last_overflow named nothing."""
    out = str(tmp_path / "results.pt")
    run_ranks(FSDP2_MONITOR_SCRIPT, out)
    for fused, trace in torch.load(out).items():
        for step, (record, ref, amax, report) in enumerate(trace):
            assert record["grad_elements"] == ref["n"] == 6 * 10 + 10 + 10 * 3 + 3
            assert round(record["zero_fraction"] * ref["n"]) == ref["zero"]
            assert round(record["nonfinite_fraction"] * ref["n"]) == ref["nonfinite"] == (step == 1)
            assert record["exponent_histogram"] == ref["histogram"], (fused, step)
            assert amax == ref["amax"], (fused, step)
            if step == 1:
                assert record["overflow"] == "step 2 (loss scale 1024): 2.weight: nan (1 of 4 tensors)", fused
                assert report == "step 1 (loss scale 1024): 2.weight: nan (1 of 4 tensors)", fused
            else:
                assert record["overflow"] == ""
                assert record["grad_norm"] == pytest.approx(ref["norm"], rel=1e-12), (fused, step)


FSDP2_DISAGREEING_RANKS_SCRIPT = EXIT_NOW + SHARDED_MLP + textwrap.dedent(
    """
    import datetime, sys, torch, torch.distributed as dist
    import mixprec
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a mismatch fails here instead of hanging
    results = {}
    for fused in (False, True):
        model = sharded_mlp(6, 10, 3)
        first = mixprec.optim.AdamW(model[0].parameters(), lr=1e-2, fused=fused)
        second = mixprec.optim.AdamW(model[2].parameters(), lr=1e-2, fused=fused)
        # Tracking on one rank only (as a logger built on rank 0 turns it on).
        scaler = mixprec.GradScaler("cpu", init_scale=1024.0, track_overflows=rank == 0)
        trace, reports = [], []
        for step in range(5):
            first.zero_grad()
            second.zero_grad()
            scaler.scale(model(torch.ones(4, 6)).pow(2).mean()).backward()
            if step == 1 and rank == 1:
                model[2].weight.grad.to_local()[0, 0] = float("nan")  # the other rank's shard
            if step == 2 and rank == 1:
                for p in model[0].parameters():  # no gradients for one optimizer on one rank
                    p.grad = None
            if step == 3:  # the tracking rank without gradients for an optimizer whose shard overflows elsewhere
                if rank == 0:
                    for p in model[2].parameters():
                        p.grad = None
                else:
                    model[2].bias.grad.to_local()[0] = float("nan")
            if step == 4 and rank == 1:  # another source alone: the last one must not linger
                model[2].weight.grad.to_local()[0, 0] = float("inf")
            scaler.step(first)
            scaler.step(second)
            scaler.update()
            trace.append(scaler.get_scale())
            report = scaler.last_overflow(model)
            reports.append(None if report is None else str(report))
        results[fused] = (trace, reports)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()
    exit_now()
    """
)


def test_fsdp2_ranks_that_disagree_on_tracking_or_gradients_make_matching_collectives(tmp_path) -> None:
    """The scaler's reduction over the shards has one shape on every rank: [flag, max |g| per parameter of the
    optimizer], zeros from a rank that does not track overflows. Before, a rank that tracked (a Monitor built on
    rank 0) sent a longer vector than one that did not (gloo aborted: 'Received data size doesn't match'), and a
    rank with no gradients for one optimizer skipped its reduction, so the ranks' collectives fell out of step
    (a hang with fused optimizers). The tracking rank names the parameter whose shard overflowed elsewhere."""
    out = str(tmp_path / "results.pt")
    run_ranks(FSDP2_DISAGREEING_RANKS_SCRIPT, out)
    ranks = torch.load(out)
    for fused in (False, True):
        (trace0, reports0), (trace1, reports1) = ranks[0][fused], ranks[1][fused]
        assert trace0 == trace1 == [1024.0, 512.0, 512.0, 256.0, 128.0], fused  # steps 1, 3 and 4 skipped on both
        assert reports0[1:] == [
            "step 1 (loss scale 1024): 2.weight: nan (1 of 4 tensors)",  # of both optimizers' gradients
            "step 1 (loss scale 1024): 2.weight: nan (1 of 4 tensors)",
            "step 3 (loss scale 512): 2.bias: nan (1 of 2 tensors)",  # rank 0 checked only the first's two
            "step 4 (loss scale 256): 2.weight: inf (1 of 4 tensors)",
        ], fused
        assert reports1 == [None] * 5  # rank 1 does not track


FSDP2_ROUNDING_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import mixprec
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.tensor import Replicate, distribute_tensor
    layer = torch.nn.Linear(64, 64, bias=False).bfloat16()
    torch.nn.init.ones_(layer.weight)
    fully_shard(layer)  # rows 0-31 on rank 0, 32-63 on rank 1: equal values, equal gradients
    # A replicated DTensor (tensor parallelism's norm weights) must round alike on every rank: in a group of its
    # own it does, and beside a sharded one too (one key per launch: the group then keys as unsharded).
    mesh = layer.weight.device_mesh
    replicated = [torch.nn.Parameter(distribute_tensor(torch.ones(64, dtype=torch.bfloat16), mesh, [Replicate()]))
                  for _ in range(2)]
    opt = mixprec.optim.AdamW([{"params": [layer.weight]}, {"params": [replicated[0]]},
                               {"params": [replicated[1], torch.nn.Parameter(layer.weight.detach().clone())]}],
                              lr=1e-3, weight_decay=0.0, master_weights="none", rounding="stochastic", seed=7)
    for _ in range(10):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p) * 1e-3
        opt.step()
    def gathered(t):
        local = t.to_local().float()
        out = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(out, local)
        return out
    shards = gathered(layer.weight)
    same = (shards[0] == shards[1]).double().mean().item()
    assert same < 0.5, same  # the shards drew alike: 1.0
    for r in replicated:
        copies = gathered(r)
        assert torch.equal(copies[0], copies[1])
        assert not torch.equal(copies[0], torch.ones_like(copies[0]))  # it moved
    dist.destroy_process_group()
    exit_now()
    """
)


def test_fsdp2_shards_of_a_parameter_draw_their_own_stochastic_rounding(tmp_path) -> None:
    """Each rank steps its shard with the group's seed; every launch numbers its elements from 0, so without the
    shard in the key equal rows on different ranks rounded alike."""
    run_ranks(FSDP2_ROUNDING_SCRIPT)


DDP_ROUNDING_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import mixprec
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def make():
        torch.manual_seed(0)  # one initial model (DDP broadcasts rank 0's anyway)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).bfloat16()
        torch.manual_seed(1337 + rank)  # nanoGPT's per-rank seeds (dropout, data): each rank's generator differs
        return model

    def loaded(opt, model):
        opt.load_state_dict(torch.optim.AdamW(model.parameters(), lr=1e-2).state_dict())
        assert opt.param_groups[0]["seed"] is None
        return opt

    def trained(build):
        model = make()
        ddp = DDP(model)
        opt = build(model)
        gen = torch.Generator().manual_seed(rank)  # each rank its own batches; DDP averages the gradients
        for _ in range(5):
            opt.zero_grad()
            ddp(torch.randn(8, 16, generator=gen).bfloat16()).float().pow(2).mean().backward()
            opt.step()
        assert all(g["seed"] == mixprec.optim.REPLICA_SEED for g in opt.param_groups if g["rounding"] == "stochastic")
        return [p.detach().float() for p in model.parameters()]

    builds = {
        "unseeded": lambda m: mixprec.optim.AdamW(m.parameters(), lr=1e-2, master_weights="none",
                                                  rounding="stochastic"),
        "policy": lambda m: mixprec.Policy("bf16-true").optimizer(m.parameters(), lr=1e-2),
        "group": lambda m: mixprec.optim.AdamW([{"params": m[0].parameters(), "rounding": "stochastic"},
                                                {"params": m[2].parameters()}], lr=1e-2, master_weights="none"),
        # A torch AdamW's state dict brings groups without a seed back: the step applies the rule.
        "loaded": lambda m: loaded(mixprec.optim.AdamW(m.parameters(), lr=1e-2, master_weights="none",
                                                       rounding="stochastic"), m),
    }
    for name, build in builds.items():
        params = trained(build)
        for p in params:
            copies = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(copies, p)
            assert torch.equal(copies[0], copies[1]), name  # the replicas rounded alike
    dist.destroy_process_group()
    exit_now()
    """
)


def test_ddp_replicas_with_their_own_torch_seeds_round_alike() -> None:
    """Stochastic rounding without a seed (an unseeded optimizer, Policy("bf16-true")'s, a group that asks for
    it, groups loaded from a torch AdamW state dict) under DDP, each rank with its own torch seed: the groups
    take mixprec.optim.REPLICA_SEED, so the replicas stay identical (each rank's generator made them drift
    apart silently)."""
    run_ranks(DDP_ROUNDING_SCRIPT)


CHECKPOINT_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, warnings, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    import mixprec
    rank, world, port, out, ckpt, masters = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
                                             sys.argv[6])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def make():
        torch.manual_seed(0)
        # bf16 parameters (fp32 masters or int16 remainders in the state); 18 rows: shards of 9 rows, and of 2 and
        # 1 for the bias.
        model = torch.nn.Sequential(torch.nn.Linear(8, 18), torch.nn.ReLU(), torch.nn.Linear(18, 3)).bfloat16()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, mixprec.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True, master_weights=masters)

    def train(model, opt, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            opt.zero_grad()
            # The same batch on every rank: FSDP2's averaged gradient is the whole-batch one, exactly.
            model(torch.randn(4, 8, generator=gen).bfloat16()).float().pow(2).mean().backward()
            opt.step()

    model, opt = make()
    train(model, opt, 1)
    state = opt.state[next(model.parameters())]
    kinds = {k: type(v).__name__ for k, v in state.items()}
    full_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {k: {n: t.clone() for n, t in v.items()} for k, v in full_sd.get("state", {}).items()}  # rank 0: not live
    # A full state dict loads back too, broadcast from rank 0 (what a FULL_STATE_DICT resume does).
    from_full, fopt = make()
    set_model_state_dict(from_full, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True)),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    set_optimizer_state_dict(from_full, fopt, full_sd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
        resumed, ropt = make()
        loaded = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, ropt)}
        dcp.load(loaded, checkpoint_id=ckpt)
    set_model_state_dict(resumed, loaded["model"])
    set_optimizer_state_dict(resumed, ropt, loaded["optim"])
    train(model, opt, 2)
    train(resumed, ropt, 2)
    train(from_full, fopt, 2)
    params = [p.full_tensor() for p in model.parameters()]
    same = all(torch.equal(a, b.full_tensor()) for a, b in zip(params, resumed.parameters()))
    same = same and all(torch.equal(a, b.full_tensor()) for a, b in zip(params, from_full.parameters()))
    if rank == 0:
        torch.save({"kinds": kinds, "full": full, "params": params, "resumed_equal": same}, out)
    dist.destroy_process_group()
    exit_now()
    """
)


@pytest.mark.parametrize("masters", ["auto", "remainder"])
def test_fsdp2_optimizer_state_is_sharded_like_torchs_and_checkpoints(tmp_path, masters: str) -> None:
    """Under FSDP2 the optimizer state of a sharded parameter is a DTensor sharded like it (torch.optim's is),
    so torch.distributed.checkpoint gathers every rank's part into a full state dict (equal to one process
    training the whole model), a sharded dcp.save / dcp.load resumes bit for bit on every rank, and so does the
    full state dict broadcast from rank 0. int16 remainders go into state dicts widened to int32 (gloo and NCCL
    move no int16: the full state dict failed with "Invalid scalar type") and load back as int16."""
    out = str(tmp_path / "result.pt")
    run_ranks(CHECKPOINT_SCRIPT, out, str(tmp_path / "ckpt"), masters)
    result = torch.load(out)
    kept = "remainder" if masters == "remainder" else "master"
    assert result["kinds"] == {"step": "Tensor", "exp_avg": "DTensor", "exp_avg_sq": "DTensor",
                               "max_exp_avg_sq": "DTensor", kept: "DTensor"}
    assert result["resumed_equal"]
    # The same training in one process, without sharding.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 18), torch.nn.ReLU(), torch.nn.Linear(18, 3)).bfloat16()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True, master_weights=masters)
    names = [name for name, _ in model.named_parameters()]
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8, generator=gen).bfloat16()).float().pow(2).mean().backward()
            opt.step()
        if seed == 1:
            for name, p in zip(names, model.parameters()):
                saved = result["full"][name]
                assert set(saved) == set(opt.state[p]), name
                for key, value in opt.state[p].items():
                    if key == "remainder":  # widened for the gather; the values are the int16 ones
                        assert value.dtype == torch.int16 and saved[key].dtype == torch.int32, name
                        value = value.to(torch.int32)
                    assert saved[key].shape == value.shape and torch.equal(saved[key], value), (name, key)
    for a, b in zip(result["params"], model.parameters()):
        assert torch.equal(a, b.detach())


FSDP2_QAT_SCRIPT = EXIT_NOW + textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from mixprec import qat
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    config = qat.QATConfig(learnable_scales=True, learnable_activation_scales=True)

    def build(device, calibrate=False):
        torch.manual_seed(0)
        with torch.device(device):
            model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), config)
        if calibrate:
            model(torch.randn(2, 8))  # sets the input steps, before sharding
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        return model

    def full(model):
        return {k: v.full_tensor() for k, v in model.state_dict().items()}

    # Unset input steps: the first forward under FSDP2 would set them in the unsharded copies, which resharding
    # discards (the steps then trained from 0): refused by name on every rank.
    try:
        build("cpu")(torch.randn(2, 8))
        raise AssertionError("a forward that would set an input step under FSDP2 ran")
    except RuntimeError as e:
        assert "learnable input step is not set" in str(e) and "before fully_shard" in str(e), e
    reference = build("cpu", calibrate=True)
    assert all(full(reference)[f"{i}.input_step"].item() > 0 for i in (0, 1))
    reference(torch.randn(2, 8)).sum().backward()  # set before sharding: runs
    # A plain checkpoint loaded into the sharded model restarts the steps (sharded DTensors) in place.
    plain = {k: v for k, v in reference.state_dict().items() if "step" not in k}
    reference.load_state_dict(plain, strict=False)
    restarted = full(reference)
    assert all(torch.equal(restarted[f"{i}.input_step"], torch.zeros(1)) for i in (0, 1))
    # Deferred initialisation of the sharded model: to_empty, reset_parameters, and the steps start from the new
    # (sharded) weights as prepare starts them: those of an unsharded model prepared over the same full weights.
    deferred = build("meta")
    deferred.to_empty(device="cpu")
    for m in deferred.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    got = full(deferred)
    weights = {k: v for k, v in got.items() if "step" not in k}
    want = qat.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), config)
    want.load_state_dict(weights, strict=False)  # a plain checkpoint: the steps start from its weights
    want = want.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    dist.destroy_process_group()
    exit_now()
    """
)


def test_fsdp2_qat_steps_restart_on_load_and_after_deferred_initialisation() -> None:
    """The learnable QAT steps are sharded DTensors under FSDP2: restarting them (a plain checkpoint loaded after
    prepare, reset_parameters after to_empty) works in place on the shards (the input step's copy_ of a plain
    tensor was refused by DTensor) and gives the steps of the model built eagerly. An input step still unset
    when the model is sharded is refused at the first forward (which set it in FSDP2's unsharded copy, lost at
    resharding: the step trained from 0, silently); one set by a forward before sharding runs."""
    run_ranks(FSDP2_QAT_SCRIPT)
