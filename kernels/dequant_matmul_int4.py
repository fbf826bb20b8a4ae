"""Dequantize-matmul for komt's int4 weights in Triton: y = x W^T with W = q * scales + offsets, never dense.

The format (QUANT_SPEC.md): packed uint8 [O, I // 2], two 4-bit values q per byte (element 2j of a row in
the low nibble of byte j, element 2j + 1 in the high nibble), scales and offsets fp16 [O, I // g], and
W[o, i] = q[o, i] * scales[o, i // g] + offsets[o, i // g]. For the rows x [M, I] of x [..., I]:

    y[m, o] = sum_i x[m, i] * (q[o, i] * scales[o, i // g] + offsets[o, i // g])   (fp32 acc; y in x's dtype)

The kernel works in bytes along K: a step loads BLOCK_KB bytes of each of BLOCK_N rows (2 * BLOCK_KB
inputs, contiguous: 16-byte vector loads) and BLOCK_KB divides g // 2, so a step sees one scale and one
offset per output channel. The low nibbles are the even inputs and the high nibbles the odd ones, so
instead of interleaving them back into input order the step splits x the same way and makes two dots:

    w_even = (byte & 15) * s + z,  w_odd = (byte >> 4) * s + z, rounded to x's dtype   [BLOCK_N, BLOCK_KB]
    acc   += x[:, 2j] @ w_even^T + x[:, 2j + 1] @ w_odd^T                            [BLOCK_M, BLOCK_N]

The dequantized weight is rounded to x's dtype once, as a bf16 model's own weight is; fp32 x multiplies
in fp32 (an IEEE dot, not tf32). One kernel, two tilings (decode GEMV for M <= 16 with K split across
programs, prefill GEMM with 128 x 128 tiles), chosen by M in `kernels._quant.launch_config`.
Grid: (cdiv(M, BLOCK_M), cdiv(O, BLOCK_N), n_splits). Reference: `kernels.reference.int4_matmul_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import needs_grad
from kernels._quant import check_inputs, launch_tiled
from kernels.reference import check_int4_weight, dequantize_int4

K_CAPS = dict(decode=128, prefill=32, decode_fp32=32, prefill_fp32=16)  # largest BLOCK_K, in bytes (2 inputs)


@triton.jit
def _int4_matmul_kernel(
    X,  # *x [M, I] fp16/bf16/fp32, row stride stride_xm, unit stride along I
    P,  # *uint8 packed q [O, I // 2], row stride stride_po, unit stride along the bytes
    S,  # *fp16 scales [O, I // g], row stride stride_so
    Z,  # *fp16 offsets [O, I // g], row stride stride_zo
    Y,  # *y [n_splits, M, O], unit stride along O: x's dtype when unsplit, fp32 partials otherwise
    M,  # rows of x
    O,  # out_features
    IB,  # bytes per row of P: I // 2
    stride_xm,  # elements between rows of x
    stride_po,  # bytes between rows of P
    stride_so,  # elements between rows of scales
    stride_zo,  # elements between rows of offsets
    stride_ys,  # elements between the splits of y
    stride_ym,  # elements between rows of y
    group_bytes,  # g // 2: bytes sharing one scale and offset (a multiple of BLOCK_KB)
    split_len,  # bytes per K split (a multiple of BLOCK_KB)
    EXACT_DOT: tl.constexpr,  # multiply in fp32 IEEE (fp32 x; the interpreter)
    BLOCK_M: tl.constexpr,  # rows of x per program (>= 16, the smallest MMA tile)
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # bytes per step (2 * BLOCK_K inputs); divides g // 2
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    m_in = offs_m < M
    n_in = offs_n < O
    k_start = pid_k * split_len
    k_end = tl.minimum(k_start + split_len, IB)  # I % g == 0 and BLOCK_K | g // 2: steps never run past IB
    x_ptrs = X + offs_m[:, None] * stride_xm + 2 * (k_start + offs_kb)[None, :]  # even inputs [BLOCK_M, BLOCK_K]
    p_ptrs = P + offs_n[:, None] * stride_po + (k_start + offs_kb)[None, :]  # [BLOCK_N, BLOCK_K] bytes

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(k_start, k_end, BLOCK_K):
        x_even = tl.load(x_ptrs, mask=m_in[:, None], other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=m_in[:, None], other=0.0)
        packed = tl.load(p_ptrs, mask=n_in[:, None], other=0).to(tl.int32)  # zero-extended bytes
        group = kb // group_bytes
        s = tl.load(S + offs_n * stride_so + group, mask=n_in, other=0.0).to(tl.float32)[:, None]  # [BLOCK_N, 1]
        z = tl.load(Z + offs_n * stride_zo + group, mask=n_in, other=0.0).to(tl.float32)[:, None]
        w_even = ((packed & 15).to(tl.float32) * s + z).to(X.dtype.element_ty)  # low nibbles: inputs 2j
        w_odd = ((packed >> 4).to(tl.float32) * s + z).to(X.dtype.element_ty)  # high nibbles: inputs 2j + 1
        if EXACT_DOT:
            acc += tl.dot(x_even.to(tl.float32), tl.trans(w_even.to(tl.float32)), input_precision="ieee")
            acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_odd.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(w_even))
            acc += tl.dot(x_odd, tl.trans(w_odd))
        x_ptrs += 2 * BLOCK_K
        p_ptrs += BLOCK_K

    y_ptrs = Y + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


def int4_matmul_forward(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
    *, config: dict | None = None,
) -> torch.Tensor:
    """Launch the kernel: x [..., I] -> [..., O] in x's dtype (no autograd). `config` is for tests and tuning
    (its BLOCK_K counts bytes)."""
    O, I, g = check_int4_weight(weight, scales, offsets, group_size)
    check_inputs("int4_matmul", x, I, weight=weight, scales=scales, offsets=offsets)
    if g % 32:
        raise ValueError(f"int4_matmul: the kernel needs group_size a multiple of 32 (komt uses 32, 64, 128), "
                         f"got {g}; use kernels.reference.int4_matmul_reference for this layout")

    def launch(x2, y, grid, split_len, exact_dot, cfg):
        _int4_matmul_kernel[grid](
            x2, weight, scales, offsets, y, x2.shape[0], O, I // 2,
            x2.stride(0), weight.stride(0), scales.stride(0), offsets.stride(0), y.stride(0), y.stride(1),
            g // 2, split_len, EXACT_DOT=exact_dot, **cfg,
        )

    return launch_tiled(launch, x, O, I // 2, g // 2, K_CAPS, config)


class Int4MatmulFunction(torch.autograd.Function):
    """The kernel forward; the backward for x only (dx = dy W), through the dense weight in dy's dtype
    (an [O, I] temporary per call, as for int8)."""

    @staticmethod
    def forward(ctx, x, weight, scales, offsets, group_size):
        ctx.save_for_backward(weight, scales, offsets)
        ctx.group_size = group_size
        return int4_matmul_forward(x, weight, scales, offsets, group_size)

    @staticmethod
    def backward(ctx, dy):
        weight, scales, offsets = ctx.saved_tensors
        w = dequantize_int4(weight, scales, offsets, ctx.group_size).to(dy.dtype)  # (O, I)
        return dy @ w, None, None, None, None  # (..., O) @ (O, I) -> (..., I)


def int4_matmul_triton(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
) -> torch.Tensor:
    """y = x @ (q * scales + offsets)^T through the Triton kernel; differentiable in x."""
    if needs_grad(x):
        return Int4MatmulFunction.apply(x, weight, scales, offsets, group_size)
    return int4_matmul_forward(x, weight, scales, offsets, group_size)
