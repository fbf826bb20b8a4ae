"""komt's Triton kernels, their plain-PyTorch references, and a benchmark (`python -m kernels.bench`).

This package knows nothing of komt and imports triton only inside the functions that launch a kernel,
so `import kernels` (and `kernels.reference`) works where triton is not installed.

    kernels.rms_norm(x, weight, eps)                   fused RMSNorm, forward + backward
    kernels.attention(q, k, v, *, causal, window, scale, q_pos, k_pos)
                                                       FlashAttention-2 prefill / flash-decoding (T == 1)
    kernels.paged_attention(q, k_pool, v_pool, tables, rows, q_pos, *, block_size, window, scale)
                                                       decode over a block-paged KV cache (block tables)
    kernels.int8_matmul(x, weight, scales, group_size=None)
    kernels.int4_matmul(x, weight, scales, offsets, group_size)
                                                       dequantize-GEMV (decode) / -GEMM (prefill) on
                                                       komt's int8 / int4 weights (QUANT_SPEC.md)
    kernels.reference                                  the same math in PyTorch (+ attention_mask,
                                                       dequantize_int8 / dequantize_int4)
    kernels.ops                                        the kernels as custom ops, for torch.compile
    kernels.triton_available()                         can the kernels run on CUDA tensors here?

The kernels take CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, as the tests do) and raise
ValueError for anything else; choose `kernels.reference` yourself on the CPU.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels import ops  # the kernels as custom ops, each registered on first use (nothing at import)
from kernels._launch import needs_grad
from kernels.reference import (
    attention_mask,
    attention_reference,
    dequantize_int4,
    dequantize_int8,
    int4_matmul_reference,
    int8_matmul_reference,
    paged_attention_reference,
    rms_norm_reference,
)

__all__ = [
    "attention",
    "attention_mask",
    "attention_reference",
    "dequantize_int4",
    "dequantize_int8",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "paged_attention",
    "paged_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "triton_available",
]


def triton_available() -> bool:
    """True when the triton package is installed and PyTorch sees a CUDA GPU to run the kernels on.

    (The kernels also run on CPU tensors under TRITON_INTERPRET=1, Triton's slow test interpreter; this
    function does not count that.)
    """
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), in x's dtype.

    x [..., D] fp32/bf16/fp16, weight [D]. Statistics in fp32; the normalised x is rounded to x's dtype
    before the multiply by weight (Hugging Face's LlamaRMSNorm), and the product rounded to x's dtype.
    Differentiable in x and weight (Triton backward). Reference: `kernels.reference.rms_norm_reference`.
    """
    if torch.compiler.is_compiling() and not needs_grad(x, weight):
        return ops.rms_norm_op(x, weight, eps)  # opaque to torch.compile (see kernels.ops)
    from kernels.fused_rms_norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


def attention(
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
    """Grouped-query attention: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D] in q's dtype.

    Without positions the queries are the last T of the S key positions (query t at S - T + t): prefill,
    prefill on a cache, and decode. With q_pos [B, T] and k_pos [B, S] (integer; k_pos < 0 = empty slot)
    positions are explicit. Key j is visible to query i iff j >= 0, j <= i (causal) and j > i - window.
    scale defaults to D ** -0.5; a row with no visible key returns zeros. T == 1 uses flash-decoding.
    Head dims: powers of two 16..256. Differentiable: a Triton backward (`kernels.flash_attention_bwd`)
    that recomputes the probabilities from each row's saved log-sum-exp. Reference:
    `kernels.reference.attention_reference`.
    """
    if torch.compiler.is_compiling() and not needs_grad(q, k, v):
        return ops.attention_op(q, k, v, causal, window, scale, q_pos, k_pos)  # opaque (see kernels.ops)
    from kernels.attention_api import attention_triton

    return attention_triton(q, k, v, causal=causal, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos)


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """y = x W^T for komt's int8 weight, W[o, i] = weight[o, i] * scales[o, i // g]: x [..., I] -> [..., O].

    weight int8 [O, I], scales fp16 [O, I // g]; group_size None is per channel (g = I), otherwise a
    multiple of 16 dividing I. x fp16/bf16/fp32; the result is in x's dtype, accumulated in fp32. M <= 16
    rows (decode) run a dequantize-GEMV, more rows a dequantize-GEMM (`kernels._quant`). Differentiable in
    x. Reference: `kernels.reference.int8_matmul_reference`.
    """
    if torch.compiler.is_compiling() and not needs_grad(x):
        return ops.int8_matmul_op(x, weight, scales, group_size)  # opaque to torch.compile (see kernels.ops)
    from kernels.dequant_matmul_int8 import int8_matmul_triton

    return int8_matmul_triton(x, weight, scales, group_size)


def int4_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
) -> torch.Tensor:
    """y = x W^T for komt's int4 weight, W[o, i] = q[o, i] * scales[o, i // g] + offsets[o, i // g].

    weight uint8 [O, I // 2] (element 2j of a row in the low nibble of byte j, 2j + 1 in the high one),
    scales and offsets fp16 [O, I // g], g a multiple of 32 (komt: 32, 64, 128). x fp16/bf16/fp32
    [..., I] -> [..., O] in x's dtype, fp32 accumulation; GEMV for M <= 16 rows, GEMM beyond.
    Differentiable in x. Reference: `kernels.reference.int4_matmul_reference`.
    """
    if torch.compiler.is_compiling() and not needs_grad(x):
        return ops.int4_matmul_op(x, weight, scales, offsets, group_size)  # opaque to torch.compile
    from kernels.dequant_matmul_int4 import int4_matmul_triton

    return int4_matmul_triton(x, weight, scales, offsets, group_size)


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    rows: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    block_size: int,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One query per row, q [N, Hq, D], over a block-paged KV cache k_pool / v_pool [Hkv, n_slots, D] read through
    block tables [R, max_blocks] (rows [N]: each query's table row; q_pos [N]: its position) -> [N, Hq, D].

    Forward only. Reference: `kernels.reference.paged_attention_reference` (see kernels/paged_decoding.py).
    """
    from kernels.paged_decoding import paged_decode_attention

    return paged_decode_attention(q, k_pool, v_pool, tables, rows, q_pos, block_size=block_size, window=window,
                                  scale=scale)
