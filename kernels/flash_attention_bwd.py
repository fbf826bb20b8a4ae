"""The backward pass of `kernels.flash_attention` in Triton, FlashAttention-2 style.

For one (batch, query head), with s_ij = q_i . k_j * scale over the visible pairs and P = softmax(s):

    dV_j = sum_i P_ij dO_i                       dP_ij = dO_i . v_j
    dS_ij = P_ij (dP_ij - delta_i)               delta_i = dO_i . O_i  (= sum_j P_ij dP_ij)
    dQ_i = scale * sum_j dS_ij k_j               dK_j = scale * sum_i dS_ij q_i

Nothing of size T x S is stored: the forward saves each row's log-sum-exp (log2 domain, `lse`), and the
backward recomputes P_ij = 2^(s_ij * log2(e) - lse_i) block by block (Dao, "FlashAttention-2", 2023;
the Triton tutorial 06-fused-attention). Two kernels, so that no two programs add into one output:

- `_dkdv_kernel`, grid (cdiv(S, BLOCK_N), B * Hkv): a program owns BLOCK_N key slots of one key/value
  head and walks the query blocks of every query head that reads that head (grouped-query attention:
  dK and dV sum over the Hq // Hkv heads of the group);
- `_dq_kernel`, grid (cdiv(T, BLOCK_M), B * Hq): a program owns BLOCK_M query rows and walks the key
  blocks they may see.

Visibility is the forward's rule (see `kernels.reference.attention_mask`). Without explicit positions,
blocks outside the causal / window band are skipped by the loop bounds, as in the forward, so the work
grows with T * W; with positions every block is visited and masked. All blocks are masked here (the
forward's unmasked fast path is not repeated): the backward is written for clarity first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import cdiv, interpreting
from kernels.flash_attention import LOG2E


@triton.jit
def _visible(q_p, k_p, in_range, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, window):
    """[rows, cols] mask of the pairs that attend: in range, key filled, causal, inside the window."""
    visible = in_range & (k_p >= 0)
    if CAUSAL:
        visible = visible & (k_p <= q_p)
    if HAS_WINDOW:
        visible = visible & (k_p > q_p - window)
    return visible


@triton.jit
def _dot(a, b, EXACT_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE fp32 products when EXACT_DOT (fp32 inputs, the interpreter)."""
    if EXACT_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,  # *q/*do [B, Hq, T, D], *k/*v [B, Hkv, S, D], *lse/*delta fp32 [B, Hq, T]
    DK, DV,  # *dk / *dv [B, Hkv, S, D], contiguous
    QPOS, KPOS,  # *int32 q_pos [B, T], k_pos [B, S] (dummies unless HAS_POS)
    stride_qb, stride_qh, stride_qt,  # strides of q (do shares them: it is made contiguous like q)
    stride_kb, stride_kh, stride_ks,  # strides of k
    stride_vb, stride_vh, stride_vs,  # strides of v
    stride_qpb, stride_qpt, stride_kpb, stride_kps,  # strides of q_pos and k_pos
    T, S, n_heads, n_kv_heads, group,
    qk_scale,  # scale * log2(e)
    scale,
    window,
    D: tl.constexpr,  # head dim
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # key slots owned by the program
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_POS: tl.constexpr,
    EXACT_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h_kv = pid_bh % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_real = offs_n < S
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_real[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_real[:, None], other=0.0)
    if HAS_POS:
        k_p = tl.load(KPOS + b * stride_kpb + offs_n * stride_kps, mask=n_real, other=-1)
        t_lo = 0
        t_hi = T
    else:
        k_p = offs_n
        # Queries (query t at position S - T + t) that may see a key in [first_key, last_key]:
        first_key = pid_n * BLOCK_N
        last_key = tl.minimum(first_key + BLOCK_N, S) - 1
        t_lo = 0
        t_hi = T
        if CAUSAL:
            t_lo = tl.maximum(first_key - (S - T), 0)
        if HAS_WINDOW:
            t_hi = tl.minimum(last_key + window - (S - T), T)
        t_lo = (t_lo // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for h in range(h_kv * group, h_kv * group + group):  # the query heads that read this key/value head
        row0 = (b * n_heads + h) * T  # index of (b, h, t = 0) in lse / delta
        for start_m in range(t_lo, t_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_real = offs_m < T
            # q^T and dO^T as [D, BLOCK_M] tiles, loaded transposed through the pointers.
            q_t = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None], mask=m_real[None, :], other=0.0)
            do = tl.load(DO + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_real[:, None], other=0.0)
            lse = tl.load(LSE + row0 + offs_m, mask=m_real, other=float("-inf"))
            delta = tl.load(DELTA + row0 + offs_m, mask=m_real, other=0.0)
            if HAS_POS:
                q_p = tl.load(QPOS + b * stride_qpb + offs_m * stride_qpt, mask=m_real, other=0)
            else:
                q_p = offs_m + (S - T)
            s_t = _dot(k, q_t, EXACT_DOT) * qk_scale  # [BLOCK_N, BLOCK_M]: scores^T, log2 domain
            visible = _visible(q_p[None, :], k_p[:, None], n_real[:, None] & m_real[None, :], CAUSAL, HAS_WINDOW, window)
            lse_safe = tl.where(lse == float("-inf"), 0.0, lse)  # a row that saw nothing: P is 0 there
            p_t = tl.where(visible, tl.exp2(s_t - lse_safe[None, :]), 0.0)  # P^T
            dv += _dot(p_t.to(do.dtype), do, EXACT_DOT)
            dp_t = _dot(v, tl.trans(do), EXACT_DOT)  # (dO V^T)^T = V dO^T: [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), EXACT_DOT)
    out = (b * n_kv_heads + h_kv) * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=n_real[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=n_real[:, None])


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA,  # as in _dkdv_kernel
    DQ,  # *dq [B, Hq, T, D], contiguous
    QPOS, KPOS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_qpb, stride_qpt, stride_kpb, stride_kps,
    T, S, n_heads, group,
    qk_scale,
    scale,
    window,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by the program
    BLOCK_N: tl.constexpr,  # key slots per inner step
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_POS: tl.constexpr,
    EXACT_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_real = offs_m < T
    q_ptrs = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=m_real[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=m_real[:, None], other=0.0)
    row0 = (b * n_heads + h) * T
    lse = tl.load(LSE + row0 + offs_m, mask=m_real, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + row0 + offs_m, mask=m_real, other=0.0)
    if HAS_POS:
        q_p = tl.load(QPOS + b * stride_qpb + offs_m * stride_qpt, mask=m_real, other=0)
        lo = 0
        hi = S
    else:
        q_p = offs_m + (S - T)
        first = pid_m * BLOCK_M + (S - T)  # the forward's key range for this block of rows
        last = tl.minimum(first + BLOCK_M, S) - 1
        lo = 0
        hi = S
        if HAS_WINDOW:
            lo = tl.maximum(first - window + 1, 0)
        if CAUSAL:
            hi = tl.minimum(last + 1, S)
        lo = (lo // BLOCK_N) * BLOCK_N

    K_head = K + b * stride_kb + h_kv * stride_kh
    V_head = V + b * stride_vb + h_kv * stride_vh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_real = offs_n < S
        k = tl.load(K_head + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_real[:, None], other=0.0)
        v = tl.load(V_head + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_real[:, None], other=0.0)
        if HAS_POS:
            k_p = tl.load(KPOS + b * stride_kpb + offs_n * stride_kps, mask=n_real, other=-1)
        else:
            k_p = offs_n
        s = _dot(q, tl.trans(k), EXACT_DOT) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = _visible(q_p[:, None], k_p[None, :], m_real[:, None] & n_real[None, :], CAUSAL, HAS_WINDOW, window)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), EXACT_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, EXACT_DOT)
    out = (b * n_heads + h) * T * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=m_real[:, None])


def launch_config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes of both backward kernels (a starting point: not yet tuned on a GPU)."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)  # interpreter: ragged edges
    if dtype == torch.float32 or D > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float | None,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_attention(q, k, v, ...)`, given its output `out` and `lse` [B, Hq, T] fp32.

    The inputs are the forward's (already checked there); dq/dk/dv come back contiguous in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    q = q.contiguous()
    do = do.contiguous()  # the kernels read q and dO with the same strides
    delta = (do.float() * out.float()).sum(-1)  # (B, Hq, T): dO_i . O_i, one value per row
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if q_pos is not None:
        qp, kp = q_pos.to(torch.int32), k_pos.to(torch.int32)
    else:
        qp = kp = lse  # never read (HAS_POS is False)
    cfg = dict(config or launch_config(D, q.dtype, q.device))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    common = dict(D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_WINDOW=window is not None,
                  HAS_POS=q_pos is not None, EXACT_DOT=q.dtype == torch.float32 or interpreting(), **cfg)
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        qp.stride(0), qp.stride(-1), kp.stride(0), kp.stride(-1),
    )
    lse = lse.contiguous()
    _dkdv_kernel[(cdiv(S, block_n), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, qp, kp, *strides,
        T, S, Hq, Hkv, Hq // Hkv, scale * LOG2E, scale, window or 0, **common,
    )
    _dq_kernel[(cdiv(T, block_m), B * Hq)](
        q, k, v, do, lse, delta, dq, qp, kp, *strides,
        T, S, Hq, Hq // Hkv, scale * LOG2E, scale, window or 0, **common,
    )
    return dq, dk, dv
