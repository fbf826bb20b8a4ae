"""Dequantize-matmul for komt's int8 weights in Triton: y = x W^T with W = q * scales, never written out dense.

The format (QUANT_SPEC.md): q int8 [O, I], scales fp16 [O, I // g], W[o, i] = q[o, i] * scales[o, i // g];
g = I is one scale per output channel. For the rows x [M, I] of x [..., I]:

    y[m, o] = sum_i x[m, i] * q[o, i] * scales[o, i // g]            (fp32 accumulation; y in x's dtype)

Each program owns a [BLOCK_M, BLOCK_N] tile of y and one K split, which it walks in steps of BLOCK_K
inputs. BLOCK_K divides g, so a step sees one scale per output channel. Per step it loads q
[BLOCK_N, BLOCK_K] (a byte per weight, contiguous along I: 16-byte vector loads), dequantizes it in
registers into x's dtype, and multiplies on the tensor cores:

    w    = q * scales[:, k // g], rounded to x's dtype          [BLOCK_N, BLOCK_K]
    acc += x[:, k:k+BLOCK_K] @ w^T                              [BLOCK_M, BLOCK_N], fp32

Per channel the scale is constant along I: w is q itself (exact in bf16 and fp16, |q| <= 128 needs 8
bits of mantissa) and the scale multiplies acc once after the loop, so the per-channel product is exact
up to the order of the fp32 sum. With groups w is rounded to x's dtype once, as a bf16 model's own weight
is. fp32 x multiplies in fp32 (an IEEE dot, not tf32): a caller who chose fp32 activations gets fp32
arithmetic; the fast path is bf16/fp16.

One kernel, two tilings (decode: a GEMV over M <= 16 rows with K split across programs; prefill: a GEMM
with 128 x 128 tiles), chosen by M in `kernels._quant.launch_config` (that module's docstring says how).
Grid: (cdiv(M, BLOCK_M), cdiv(O, BLOCK_N), n_splits). Reference: `kernels.reference.int8_matmul_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import needs_grad
from kernels._quant import check_inputs, launch_tiled
from kernels.reference import check_int8_weight, dequantize_int8

K_CAPS = dict(decode=256, prefill=64, decode_fp32=64, prefill_fp32=32)  # largest BLOCK_K, in inputs (= bytes of q)


@triton.jit
def _int8_matmul_kernel(
    X,  # *x [M, I] fp16/bf16/fp32, row stride stride_xm, unit stride along I
    Q,  # *int8 q [O, I], row stride stride_qo, unit stride along I
    S,  # *fp16 scales [O, I // g], row stride stride_so
    Y,  # *y [n_splits, M, O], unit stride along O: x's dtype when unsplit, fp32 partials otherwise
    M,  # rows of x
    O,  # out_features
    I,  # in_features
    stride_xm,  # elements between rows of x
    stride_qo,  # bytes between rows of q
    stride_so,  # elements between rows of scales
    stride_ys,  # elements between the splits of y
    stride_ym,  # elements between rows of y
    group,  # g: inputs sharing one scale (a multiple of BLOCK_K; unused per channel)
    split_len,  # inputs per K split (a multiple of BLOCK_K)
    PER_CHANNEL: tl.constexpr,  # g == I: one scale per row of q, applied to acc after the loop
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0: no mask along K
    EXACT_DOT: tl.constexpr,  # multiply in fp32 IEEE (fp32 x; the interpreter)
    BLOCK_M: tl.constexpr,  # rows of x per program (>= 16, the smallest MMA tile)
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # inputs per step; divides g
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_in = offs_m < M
    n_in = offs_n < O
    k_start = pid_k * split_len
    k_end = tl.minimum(k_start + split_len, I)
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    q_ptrs = Q + offs_n[:, None] * stride_qo + (k_start + offs_k)[None, :]  # [BLOCK_N, BLOCK_K]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_in[:, None], other=0.0)
            q = tl.load(q_ptrs, mask=n_in[:, None], other=0)
        else:
            k_in = (k + offs_k) < I
            x = tl.load(x_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
            q = tl.load(q_ptrs, mask=n_in[:, None] & k_in[None, :], other=0)
        if PER_CHANNEL:
            w = q.to(tl.float32).to(X.dtype.element_ty)  # exact (via fp32: the interpreter botches int8 -> bf16)
        else:
            s = tl.load(S + offs_n * stride_so + k // group, mask=n_in, other=0.0).to(tl.float32)  # [BLOCK_N]
            w = (q.to(tl.float32) * s[:, None]).to(X.dtype.element_ty)
        if EXACT_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K

    if PER_CHANNEL:
        s = tl.load(S + offs_n * stride_so, mask=n_in, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc = acc * s[None, :]
    y_ptrs = Y + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


def int8_matmul_forward(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None,
    *, config: dict | None = None,
) -> torch.Tensor:
    """Launch the kernel: x [..., I] -> [..., O] in x's dtype (no autograd). `config` is for tests and tuning."""
    O, I, g = check_int8_weight(weight, scales, group_size)
    check_inputs("int8_matmul", x, I, weight=weight, scales=scales)
    per_channel = g == I
    if not per_channel and g % 16:
        raise ValueError(f"int8_matmul: the kernel needs group_size a multiple of 16 or per channel (= I = {I}), "
                         f"got {g}; use kernels.reference.int8_matmul_reference for this layout")

    def launch(x2, y, grid, split_len, exact_dot, cfg):
        _int8_matmul_kernel[grid](
            x2, weight, scales, y, x2.shape[0], O, I,
            x2.stride(0), weight.stride(0), scales.stride(0), y.stride(0), y.stride(1), g, split_len,
            PER_CHANNEL=per_channel, EVEN_K=I % cfg["BLOCK_K"] == 0, EXACT_DOT=exact_dot, **cfg,
        )

    return launch_tiled(launch, x, O, I, None if per_channel else g, K_CAPS, config)


class Int8MatmulFunction(torch.autograd.Function):
    """The kernel forward; the backward for x only (dx = dy W), through the dense weight in dy's dtype.

    The dense copy is an [O, I] temporary per call: fine for LoRA on a frozen int8 base, and a Triton
    kernel of the transposed product is the follow-up if that temporary shows in a training profile.
    """

    @staticmethod
    def forward(ctx, x, weight, scales, group_size):
        ctx.save_for_backward(weight, scales)
        ctx.group_size = group_size
        return int8_matmul_forward(x, weight, scales, group_size)

    @staticmethod
    def backward(ctx, dy):
        weight, scales = ctx.saved_tensors
        w = dequantize_int8(weight, scales, ctx.group_size).to(dy.dtype)  # (O, I)
        return dy @ w, None, None, None  # (..., O) @ (O, I) -> (..., I)


def int8_matmul_triton(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """y = x @ (q * scales)^T through the Triton kernel; differentiable in x."""
    if needs_grad(x):
        return Int8MatmulFunction.apply(x, weight, scales, group_size)
    return int8_matmul_forward(x, weight, scales, group_size)
