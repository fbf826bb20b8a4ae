"""The kernels as PyTorch custom ops, for code running under `torch.compile`.

`torch.compile` traces Python. It cannot trace Triton's CPU interpreter at all, and on CUDA it would have
to trace the launchers' Python (argument checks, block-size choices, device queries). Registered as
custom ops, the kernels are opaque calls in the compiled graph instead: Inductor leaves them as they are
and CUDA graphs capture their launches. `kernels.attention` and `kernels.rms_norm` switch to these ops
only while compiling; eager code calls the launchers directly and skips the custom-op dispatch (a few
microseconds a call, which a decode step with two kernels per layer would feel).

Forward only: compiled code that needs gradients through the kernels takes the autograd path.
(No `from __future__ import annotations` here: `custom_op` reads the schema from the annotations.)

Registration: nothing registers when `kernels` is imported (komt imports `kernels.reference` on every
machine). Each op is a module attribute made on first access (PEP 562 `__getattr__` at the end of this
file), which registers its group (attention + RMSNorm, or the two dequantize-matmuls) with torch.
torch.compile resolves a module attribute by calling getattr while it traces, outside the graph, so the
first compiled call registers them too, without a graph break (checked with fullgraph=True in
tests/test_kernels_quant.py).
"""

from typing import Optional

import torch


def _define_kernel_ops() -> dict:
    """Register kernels::attention and kernels::rms_norm with torch; return them by attribute name."""

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

    return {"attention_op": attention_op, "rms_norm_op": rms_norm_op}


def _define_quant_ops() -> dict:
    """Register kernels::int8_matmul and kernels::int4_matmul with torch; return them by attribute name."""

    @torch.library.custom_op("kernels::int8_matmul", mutates_args=())
    def int8_matmul_op(
        x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: Optional[int]
    ) -> torch.Tensor:
        """`kernels.int8_matmul` without autograd: x [..., I], q int8 [O, I], scales [O, I // g] -> [..., O]."""
        from kernels.dequant_matmul_int8 import int8_matmul_forward

        return int8_matmul_forward(x, weight, scales, group_size)

    @int8_matmul_op.register_fake
    def _(x, weight, scales, group_size):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op("kernels::int4_matmul", mutates_args=())
    def int4_matmul_op(
        x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        """`kernels.int4_matmul` without autograd: x [..., I], packed uint8 [O, I // 2] -> [..., O]."""
        from kernels.dequant_matmul_int4 import int4_matmul_forward

        return int4_matmul_forward(x, weight, scales, offsets, group_size)

    @int4_matmul_op.register_fake
    def _(x, weight, scales, offsets, group_size):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return {"int8_matmul_op": int8_matmul_op, "int4_matmul_op": int4_matmul_op}


_DEFINERS = {"attention_op": _define_kernel_ops, "rms_norm_op": _define_kernel_ops,
             "int8_matmul_op": _define_quant_ops, "int4_matmul_op": _define_quant_ops}
_OPS: dict = {}  # filled on the first access to each group of ops


def __getattr__(name: str):
    """`ops.attention_op`, `ops.rms_norm_op`, `ops.int8_matmul_op`, `ops.int4_matmul_op`: each group is
    registered with torch on the first access to one of its ops (see the module docstring)."""
    if name not in _DEFINERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _OPS:
        _OPS.update(_DEFINERS[name]())
    return _OPS[name]
