"""Fused RMSNorm in Triton: one read of x, one write of y, statistics in fp32.

Forward, for one row x of D elements (after Hugging Face's `LlamaRMSNorm`):

    rstd = 1 / sqrt(mean(x^2) + eps)          (fp32)
    xhat = x * rstd, rounded to x's dtype      (as Hugging Face does before the weight)
    y    = weight * xhat, rounded to x's dtype

Backward, with g = dy * weight and xhat = x * rstd in fp32 (the rounding of xhat is treated as the
identity, as autograd does for a dtype cast):

    dx      = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat       (xhat rounded to x's dtype, as in the forward)

Each forward program normalises one row held entirely in registers (BLOCK_D >= D). Each backward
program walks a contiguous run of rows and keeps its partial dweight in registers; the partials
[n_programs, D] are summed by PyTorch afterwards (no atomics, deterministic).
The plain-PyTorch statement of the same math is `kernels.reference.rms_norm_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import cdiv, check_device, needs_grad, next_power_of_2, sm_count

MAX_FUSED_BYTES = 65536  # a row must fit one program's registers (the Triton layer-norm tutorial's limit)


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # *x: input rows [M, D], row stride stride_x, unit column stride
    W,  # *weight: [D]
    Y,  # *y: output rows [M, D] in x's dtype, row stride stride_y
    RSTD,  # *fp32 [M]: 1 / rms of each row, saved for the backward
    stride_x,  # elements between consecutive rows of X
    stride_y,  # elements between consecutive rows of Y
    D,  # row length
    eps,  # added to the mean square before the square root
    BLOCK_D: tl.constexpr,  # power of two >= D: one program holds one whole row
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    xhat = (x * rstd).to(Y.dtype.element_ty)  # rounded to x's dtype before the weight, as Hugging Face
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    y = xhat.to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # *dy: upstream gradient [M, D], row stride stride_dy
    X,  # *x: the forward's input [M, D], row stride stride_x
    W,  # *weight: [D]
    RSTD,  # *fp32 [M]: saved by the forward
    DX,  # *dx: output [M, D] in x's dtype, row stride stride_dx
    DW_PARTIAL,  # *fp32 [n_programs, D]: this program's sum of dy * xhat over its rows
    stride_dy,  # elements between rows of DY
    stride_x,  # elements between rows of X
    stride_dx,  # elements between rows of DX
    M,  # number of rows
    D,  # row length
    rows_per_program,  # each program handles rows [pid * rows_per_program, (pid + 1) * rows_per_program)
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=in_row)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=in_row)


def _row_launch(D: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D elements: the whole row in one program."""
    block_d = next_power_of_2(D)
    if block_d * element_size > MAX_FUSED_BYTES:
        raise ValueError(f"rms_norm: rows of {D} elements exceed the fused kernel's {MAX_FUSED_BYTES} bytes")
    num_warps = min(max(block_d * element_size // 2048, 1), 16)  # 4 warps for 4096 bf16: best on an H100
    return block_d, num_warps


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_device("rms_norm", x=x, weight=weight)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"rms_norm: x must be fp32, bf16 or fp16, got {x.dtype}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"rms_norm: weight must be a floating-point tensor, got {weight.dtype}")
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: want x [..., D] and weight [D]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: x [..., D] -> (y [..., D] in x's dtype, rstd [M] fp32). Grid: (M,)."""
    _check_inputs(x, weight)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # (..., D) -> (M, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M > 0:
        block_d, num_warps = _row_launch(D, x.element_size())
        _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps, BLOCK_D=block_d, num_warps=num_warps)
    return y.view(x.shape), rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dx like x, dweight like weight). Grid: (min(M, 4 * SMs),)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # (..., D) -> (M, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dy2 = dy.reshape(-1, D).contiguous()  # (..., D) -> (M, D)
    M = x2.shape[0]
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    n_programs = max(1, min(M, 4 * sm_count(x.device)))
    rows_per_program = cdiv(M, n_programs) if M > 0 else 0
    n_programs = cdiv(M, rows_per_program) if M > 0 else 1
    dw_partial = torch.zeros((n_programs, D), dtype=torch.float32, device=x.device)
    if M > 0:
        block_d, num_warps = _row_launch(D, 4)  # the backward holds several fp32 rows
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), M, D,
            rows_per_program, BLOCK_D=block_d, num_warps=num_warps,
        )
    return dx.view(x.shape), dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernel saves rstd per row; the backward kernel reuses it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(dy, x, weight.contiguous(), rstd)
        return (dx if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), differentiable in x and weight."""
    if needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_forward(x, weight, eps)[0]
