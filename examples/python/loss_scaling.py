"""Dynamic loss scaling and master-weight AdamW with mixprec's fused ops (CPU or CUDA).

A two-layer MLP with bf16 parameters learns a noisy nonlinear regression. Every step scales the loss,
unscales all gradients, checks them for inf/NaN and measures their global norm in ONE fused pass
(mixprec.ops.unscale_and_check_sumsq_), clips on the device, and hands the overflow flag to
mixprec.optim.AdamW, whose fused step updates fp32 master weights and writes the bf16 parameters back,
or writes nothing on an overflow; the loss scale moves on the device (mixprec.ops.update_scale_). No
step reads anything back to the host except the progress lines. Every 40th step an inf is planted in
one gradient, as an fp16 overflow would leave it, to show the step being skipped and the scale backing
off and growing back.

    python examples/python/loss_scaling.py [--steps 200] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import mixprec
from mixprec import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--growth-interval", type=int, default=25)
    parser.add_argument("--max-norm", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    x = torch.randn(4096, 32, device=device)
    w_true = torch.randn(32, 1, device=device)
    y = torch.sin(x @ w_true) + 0.05 * torch.randn(4096, 1, device=device)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    model = model.to(device=device, dtype=torch.bfloat16)
    optimizer = mixprec.optim.AdamW(model.parameters(), lr=3e-3)  # fp32 masters for the bf16 params
    params = [p for p in model.parameters()]

    scale = torch.full((1,), 2.0**16, device=device)
    growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)
    hysteresis_tracker = torch.ones(1, dtype=torch.int32, device=device)
    found_inf = torch.zeros(1, device=device)
    skipped = torch.zeros(1, device=device)

    print(f"mixprec {mixprec.__version__} on {device} (CUDA kernels built: {mixprec.built_with_cuda()})")
    print(f"{'step':>5} {'loss':>10} {'grad norm':>10} {'scale':>10} {'skipped':>8}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, x.shape[0], (256,), device=device)
        loss = torch.nn.functional.mse_loss(model(x[batch].bfloat16()).float(), y[batch])
        optimizer.zero_grad(set_to_none=False)
        (loss * scale).backward()
        grads = [p.grad for p in params]
        if step % 40 == 0:
            grads[step // 40 % len(grads)].view(-1)[0] = math.inf  # an fp16-style overflow

        found_inf.zero_()
        sumsq = ops.unscale_and_check_sumsq_(grads, found_inf, scale.double().reciprocal().float())
        clip = (args.max_norm / (sumsq.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, clip.to(grads[0].dtype))
        optimizer.found_inf = found_inf  # the fused step skips itself on device
        optimizer.step()
        skipped += found_inf
        ops.update_scale_(scale, growth_tracker, hysteresis_tracker, found_inf, 2.0, 0.5, args.growth_interval)
        if step % 10 == 0 or step == 1 or step % 40 == 0:
            overflow = bool(found_inf.item())  # only for the progress line
            norm = float("nan") if overflow else sumsq.sqrt().item()
            print(f"{step:>5} {loss.item():>10.5f} {norm:>10.4f} {scale.item():>10.0f} {'yes' if overflow else '':>8}")
    elapsed = time.perf_counter() - start
    print(f"final loss {loss.item():.5f}, {int(skipped.item())} skipped steps, final scale {scale.item():.0f}, "
          f"{args.steps / elapsed:.0f} steps/s")


if __name__ == "__main__":
    main()
