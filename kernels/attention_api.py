"""`kernels.attention`: one entry point for prefill and decode, with a backward for training.

T == 1 (a decode step) runs flash-decoding (`kernels.flash_decoding`); any other T runs the
FlashAttention-2 prefill kernel (`kernels.flash_attention`). Both compute exactly
`kernels.reference.attention_reference`.

Gradients: when q, k or v require grad, the forward runs the prefill kernel (for any T, one row
included) and saves each row's log-sum-exp; the backward runs the Triton backward kernels
(`kernels.flash_attention_bwd`), which recompute the probabilities block by block, so training memory
stays O(T) per head, never O(T * S).
"""

from __future__ import annotations

import torch

from kernels._launch import needs_grad
from kernels.flash_attention import flash_attention
from kernels.flash_attention_bwd import flash_attention_backward
from kernels.flash_decoding import flash_decoding


def attention_forward(q, k, v, causal, window, scale, q_pos, k_pos) -> torch.Tensor:
    """Pick the kernel by T: flash-decoding for one query row, the prefill kernel otherwise."""
    run = flash_decoding if q.shape[2] == 1 else flash_attention
    return run(q, k, v, causal=causal, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos)


class AttentionFunction(torch.autograd.Function):
    """Triton forward that keeps each row's log-sum-exp, and the Triton backward that uses it."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, q_pos, k_pos):
        out, lse = flash_attention(
            q, k, v, causal=causal, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos, return_lse=True
        )
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.options = dict(causal=causal, window=window, scale=scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, q_pos=q_pos, k_pos=k_pos, **ctx.options)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None, None, None, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention through the Triton kernels; differentiable in q, k, v (see the module docstring)."""
    if needs_grad(q, k, v):
        return AttentionFunction.apply(q, k, v, causal, window, scale, q_pos, k_pos)
    return attention_forward(q, k, v, causal, window, scale, q_pos, k_pos)
