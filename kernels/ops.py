"""The kernels as PyTorch custom ops, for code running under `torch.compile`.

`torch.compile` traces Python. It cannot trace Triton's CPU interpreter at all, and on CUDA it would have
to trace the launchers' Python (argument checks, block-size choices, device queries). Registered as
custom ops, the kernels are opaque calls in the compiled graph instead: Inductor leaves them as they are
and CUDA graphs capture their launches. `kernels.attention` and `kernels.rms_norm` switch to these ops
only while compiling; eager code calls the launchers directly and skips the custom-op dispatch (a few
microseconds a call, which a decode step with two kernels per layer would feel).

Forward only: compiled code that needs gradients through the kernels takes the autograd path.
(No `from __future__ import annotations` here: `custom_op` reads the schema from the annotations.)
"""

from typing import Optional

import torch


@torch.library.custom_op("kernels::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    window: Optional[int],
    scale: Optional[float],
    q_pos: Optional[torch.Tensor],
    k_pos: Optional[torch.Tensor],
) -> torch.Tensor:
    """`kernels.attention` without autograd: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D]."""
    from kernels.attention_api import attention_forward

    return attention_forward(q, k, v, causal, window, scale, q_pos, k_pos)


@attention_op.register_fake
def _(q, k, v, causal, window, scale, q_pos, k_pos):
    return q.new_empty(q.shape)  # both kernels write a new contiguous tensor of q's shape and dtype


@torch.library.custom_op("kernels::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`kernels.rms_norm` without autograd: x [..., D], weight [D] -> [..., D] in x's dtype."""
    from kernels.fused_rms_norm import rms_norm_forward

    return rms_norm_forward(x, weight, eps)[0]


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)
