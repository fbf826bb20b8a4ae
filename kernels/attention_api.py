"""`kernels.attention`: one entry point for prefill and decode, with a backward for training.

T == 1 (a decode step) runs flash-decoding (`kernels.flash_decoding`); any other T runs the
FlashAttention-2 prefill kernel (`kernels.flash_attention`). Both compute exactly
`kernels.reference.attention_reference`.

Gradients: the Triton kernels are forward-only. When q, k or v require grad, the forward still runs in
Triton and the backward recomputes the attention with the reference math under autograd. That is exact
but takes O(B * Hq * T * S) memory in the backward, fine for LoRA fine-tuning at a few thousand tokens;
a fused backward kernel is future work.
"""

from __future__ import annotations

import torch

from kernels.flash_attention import flash_attention
from kernels.flash_decoding import flash_decoding
from kernels.reference import attention_reference


def attention_forward(q, k, v, causal, window, scale, q_pos, k_pos) -> torch.Tensor:
    """Pick the kernel by T: flash-decoding for one query row, the prefill kernel otherwise."""
    run = flash_decoding if q.shape[2] == 1 else flash_attention
    return run(q, k, v, causal=causal, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos)


class AttentionFunction(torch.autograd.Function):
    """Triton forward; the backward differentiates `attention_reference` on the saved inputs."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, q_pos, k_pos):
        ctx.save_for_backward(q, k, v)
        ctx.options = dict(causal=causal, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos)
        return attention_forward(q, k, v, causal, window, scale, q_pos, k_pos)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            out = attention_reference(*inputs, **ctx.options)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        dq, dk, dv = (next(grads) if t.requires_grad else None for t in inputs)
        return dq, dk, dv, None, None, None, None, None


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
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return AttentionFunction.apply(q, k, v, causal, window, scale, q_pos, k_pos)
    return attention_forward(q, k, v, causal, window, scale, q_pos, k_pos)
