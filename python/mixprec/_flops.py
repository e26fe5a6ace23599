"""FLOP formulas for mixprec's GEMM ops (torch.utils.flop_counter.FlopCounterMode): they count as torch's mm.

The ops' fake (meta) kernels, which FakeTensor, torch.compile and opcheck trace with, are C++ Meta kernels
(csrc/ops/meta.cpp), shared with LibTorch programs that run the ops on meta tensors.
"""

from __future__ import annotations

import torch

# Without them a converted model's backward, whose weight gradient is one of these ops, reports a third fewer
# FLOPs than the torch.nn.Linear model it replaces (MFU measurements under-report).


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    def gemm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    @register_flop_formula(torch.ops.mixprec.linear_wgrad)
    def _linear_wgrad_flop(grad_output_shape, input_shape, *args, **kwargs) -> int:
        # grad_output [..., out] and input [..., in] over the same leading dimensions.
        tokens = 1
        for d in grad_output_shape[:-1]:
            tokens *= d
        return gemm(grad_output_shape[-1], input_shape[-1], tokens)

    @register_flop_formula(torch.ops.mixprec.linear_wgrad_accum_)
    def _linear_wgrad_accum_flop(main_grad_shape, grad_output_shape, input_shape, *args, **kwargs) -> int:
        return _linear_wgrad_flop(grad_output_shape, input_shape)

    @register_flop_formula(torch.ops.mixprec.fp8_gemm)
    def _fp8_gemm_flop(a_shape, b_shape, *args, **kwargs) -> int:
        return gemm(a_shape[0], b_shape[0], a_shape[1])  # a [m, k], b [n, k]

    @register_flop_formula(torch.ops.mixprec.fp8_gemm_accum_)
    def _fp8_gemm_accum_flop(out_shape_, a_shape, b_shape, *args, **kwargs) -> int:
        return _fp8_gemm_flop(a_shape, b_shape)

    @register_flop_formula(torch.ops.mixprec.int8_mm)
    def _int8_mm_flop(a_shape, b_shape, *args, **kwargs) -> int:
        return gemm(a_shape[0], b_shape[1], a_shape[1])  # a [m, k], b [k, n]


_register_flop_formulas()
