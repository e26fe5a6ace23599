"""mixprec inside the trainers users run, on the CPU with tiny models: Hugging Face Trainer, PyTorch Lightning
and Accelerate drive mixprec.optim.AdamW over models converted with mixprec.nn.convert (16-bit weights with
fp32 gradients). Each framework zeroes, clips and checkpoints in its own way; these tests check that its
clipping covers the fp32 weight gradients, that its zeroing starts every step afresh, that a resumed run
equals the straight one, and that skipped steps are visible where the docs say they are."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import mixprec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def total_norm(params) -> float:
    """The 2-norm over every gradient, in float64 (an independent reference for the clipping checks)."""
    grads = [p.grad.double() for p in params if p.grad is not None]
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def converted_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, mixprec.nn.Linear)]


# ---- Hugging Face Trainer -------------------------------------------------------------------------------------


def _hf_run(tmp_path, max_steps: int, resume: str | None = None, save_steps: int | None = None) -> tuple:
    transformers = pytest.importorskip("transformers")
    fresh_accelerate()

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    mixprec.nn.convert(model)
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):
        ids = torch.randint(0, 64, (16,), generator=gen)
        data.append({"input_ids": ids, "labels": ids})
    max_norm = 1e-2
    seen: dict = {"grad_at_step_begin": [], "norm_after_clip": []}

    class Watch(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen["grad_at_step_begin"].append([w.grad for w in converted_weights(model)])

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["norm_after_clip"].append(total_norm(model.parameters()))
            seen.setdefault("grad_dtypes", set()).update(w.grad.dtype for w in converted_weights(model))

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps,
        max_grad_norm=max_norm, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[Watch()])
    trainer.train(resume_from_checkpoint=resume)
    norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    return model, seen, norms, max_norm


def test_hf_trainer_zeroes_clips_and_resumes(tmp_path) -> None:
    model, seen, norms, max_norm = _hf_run(tmp_path / "straight", max_steps=6, save_steps=3)
    weights = converted_weights(model)
    assert weights and all(w.dtype == torch.bfloat16 for w in weights) and seen["grad_dtypes"] == {torch.float32}
    # The Trainer zeroes with model.zero_grad(): every step starts without a weight gradient (no stale
    # accumulation from the step before).
    assert len(seen["grad_at_step_begin"]) == 6
    assert all(g is None for step in seen["grad_at_step_begin"] for g in step)
    # Its clipping (accelerate -> torch.nn.utils.clip_grad_norm_) covers the fp32 weight gradients: after it,
    # the norm over every gradient is max_norm, and the norm it reported before clipping is far above it.
    assert all(n > 10 * max_norm for n in norms)
    assert all(n == pytest.approx(max_norm, rel=2e-2) for n in seen["norm_after_clip"])

    resumed, _, _, _ = _hf_run(tmp_path / "resumed", max_steps=6, resume=str(tmp_path / "straight" / "checkpoint-3"))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- PyTorch Lightning ----------------------------------------------------------------------------------------


def _lightning_module(pl, opt_kwargs: dict, record: list):
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = mixprec.nn.convert(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)))
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            return mixprec.optim.AdamW(self.parameters(), lr=1e-2, **opt_kwargs)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            record.append(total_norm(self.parameters()))

    return Tiny()


def _lightning_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen) * 10
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4] * 3), batch_size=8)


@pytest.mark.parametrize("precision, scaler", [("bf16-mixed", None), ("16-mixed", "torch"), ("16-mixed", "mixprec")])
def test_lightning_clips_and_resumes(tmp_path, precision: str, scaler: str | None) -> None:
    """gradient_clip_val with mixprec.optim.AdamW: accepted (torch's AdamW is; mixprec's no longer claims to
    unscale internally unless fused=True), applied to the fp32 weight gradients too, and a run resumed from a
    checkpoint (optimizer, scaler) ends where the straight one ends. fp16 runs through an explicit scaler,
    torch's or mixprec's, since Lightning gives the CPU none."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision

    def trainer(callbacks: list):
        plugins = []
        if scaler is not None:
            made = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler == "torch" else \
                mixprec.GradScaler("cpu", init_scale=256.0)
            plugins = [MixedPrecision(precision, "cpu", scaler=made)]
        return pl.Trainer(accelerator="cpu", max_epochs=2, gradient_clip_val=0.05, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                          precision=None if plugins else precision, plugins=plugins, callbacks=callbacks)

    from lightning.pytorch.callbacks import ModelCheckpoint

    clipped: list = []
    straight = _lightning_module(pl, {}, clipped)
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1,
                                  save_on_train_epoch_end=True, filename="{epoch}")
    trainer([every_epoch]).fit(straight, _lightning_data())
    assert len(clipped) == 16 and all(n == pytest.approx(0.05, rel=1e-3) for n in clipped)

    resumed = _lightning_module(pl, {}, [])
    trainer([]).fit(resumed, _lightning_data(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lightning_still_refuses_clipping_for_fused_optimizers() -> None:
    """fused=True declares that the step unscales internally, exactly as torch's fused AdamW does; Lightning
    then refuses clipping for both alike."""
    pl = pytest.importorskip("lightning.pytorch")
    module = _lightning_module(pl, {"fused": True}, [])
    t = pl.Trainer(accelerator="cpu", max_steps=1, gradient_clip_val=0.05, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, precision="bf16-mixed")
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        t.fit(module, _lightning_data())


# ---- Accelerate -----------------------------------------------------------------------------------------------


def fresh_accelerate():
    """Accelerate keeps one process-wide state (the HF Trainer made one too): start from none."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return accelerate


def _accelerate_run(tmp_path, steps: int, save_at: int | None = None, load: bool = False) -> nn.Module:
    accelerate = fresh_accelerate()
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = mixprec.nn.convert(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).to(torch.bfloat16))
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4 * 2 * steps, 8, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4]), batch_size=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if load:
        accelerator.load_state(str(tmp_path / "state"))
    for i, (xb, yb) in enumerate(loader):
        if load and i < 2 * save_at:
            continue  # the batches the checkpointed run had already seen
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(xb.bfloat16()).float(), yb)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                before = total_norm(model.parameters())
                reported = accelerator.clip_grad_norm_(model.parameters(), 0.05)
                assert float(reported) == pytest.approx(before, rel=2e-2)  # the weights are in the norm
                assert total_norm(model.parameters()) == pytest.approx(min(before, 0.05), rel=2e-2)
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            assert all(w.grad is None or not w.grad.any() for w in converted_weights(model))
        if save_at is not None and not load and i + 1 == 2 * save_at:
            accelerator.save_state(str(tmp_path / "state"))
    return model


def test_accelerate_accumulates_clips_and_resumes(tmp_path) -> None:
    straight = _accelerate_run(tmp_path, steps=6, save_at=3)
    resumed = _accelerate_run(tmp_path, steps=6, save_at=3, load=True)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scaler, visible", [("torch", True), ("mixprec-host-skip", True), ("mixprec", False)])
def test_accelerate_sees_skipped_steps_where_the_docs_say(scaler: str, visible: bool) -> None:
    """Accelerate learns of a skipped step when the scaler does not call optimizer.step(). torch's scaler skips
    a mixprec optimizer (fused=None) on the host, as any plain optimizer, and so does mixprec's with
    host_skip=True; mixprec's default skips on the device, so the call happens (and writes nothing)."""
    accelerator = fresh_accelerate().Accelerator(cpu=True)
    accelerator.scaler = {"torch": lambda: torch.amp.GradScaler("cpu"),
                          "mixprec-host-skip": lambda: mixprec.GradScaler("cpu", host_skip=True),
                          "mixprec": lambda: mixprec.GradScaler("cpu")}[scaler]()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    before = model.weight.detach().clone()
    accelerator.scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    model.weight.grad[0, 0] = math.inf
    opt.step()
    assert torch.equal(model.weight.detach(), before)  # skipped either way
    assert accelerator.optimizer_step_was_skipped is visible


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("converted", [False, True])
def test_distributed_checkpoint_state_dicts_save_load_and_resume(tmp_path, full: bool, converted: bool) -> None:
    """torch.distributed.checkpoint's state-dict API (what FSDP2 trainers such as torchtitan save with) takes a
    mixprec optimizer's state dict, full and CPU-offloaded too (its utilities accept no torch.dtype values,
    so the state dict names moment_dtype), saves it with dcp.save, and a fresh optimizer loaded through
    dcp.load and set_state_dict resumes bit for bit: bf16 remainders, bf16 moments and the seeded stochastic
    rounding's position included. A converted model (fp32 gradients of bf16 weights, whose grad_dtype refused
    the bf16 zeros torch's helper gives a fresh optimizer) takes the same path and keeps its grad_dtype."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)).bfloat16()
        if converted:
            mixprec.nn.convert(model)
        return model, mixprec.optim.AdamW(model.parameters(), lr=0.01, moment_dtype=torch.bfloat16,
                                          master_weights="remainder", rounding="stochastic", seed=3)

    def train(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 4, generator=gen).bfloat16()).float().pow(2).sum().backward()
            opt.step()

    model, opt = make()
    train(model, opt, 1)
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    assert optim_sd["param_groups"][0]["moment_dtype"] == "torch.bfloat16"
    assert opt.param_groups[0]["moment_dtype"] is torch.bfloat16  # the live group keeps the dtype
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    resumed, resumed_opt = make()
    fresh_model_sd, fresh_optim_sd = get_state_dict(resumed, resumed_opt)
    assert all(p.grad is None for p in resumed.parameters())
    if converted:
        assert resumed[0].weight.grad_dtype == torch.float32
    loaded = {"model": fresh_model_sd, "optim": fresh_optim_sd}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert resumed_opt.param_groups[0]["moment_dtype"] is torch.bfloat16
    assert resumed_opt.param_groups[0]["rng_calls"] == opt.param_groups[0]["rng_calls"] == 3
    train(model, opt, 2)
    train(resumed, resumed_opt, 2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key


# ---- Accelerate: big-model loading into a converted model ----------------------------------------------------


@pytest.mark.parametrize("conversion", ["fp8-delayed", "fp8-current", "int8"])
def test_accelerate_loads_a_checkpoint_into_a_model_converted_with_empty_weights(tmp_path, conversion: str) -> None:
    """init_empty_weights (meta weights, real buffers), convert, load_checkpoint_and_dispatch of a plain model's
    checkpoint: the loaded model equals one converted after loading (the scaling state starts real and initial,
    since no checkpoint of the plain model holds it)."""
    accelerate = pytest.importorskip("accelerate")

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))

    def convert(model: nn.Module) -> nn.Module:
        kind, _, scaling = conversion.partition("-")
        kwargs = dict(fp8=mixprec.fp8.Recipe(scaling=scaling)) if kind == "fp8" else dict(int8=True)
        return mixprec.nn.convert(model, filter=lambda name, m: True, **kwargs)

    path = tmp_path / "model.bin"
    torch.save(build().state_dict(), path)
    with accelerate.init_empty_weights():
        empty = build()
    loaded = accelerate.load_checkpoint_and_dispatch(convert(empty), str(path), device_map={"": "cpu"})
    reference = convert(build())
    for (k, a), b in zip(loaded.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(8, 32)
    for m in (loaded, reference):
        m(x).pow(2).mean().backward()
    for a, b in zip(loaded.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)
