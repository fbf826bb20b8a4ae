"""Causal / sliding-window grouped-query attention in Triton, FlashAttention-2 style.

For one query row i and the keys j it may see (see `kernels.reference.attention_mask`):

    o_i = sum_j softmax_j(q_i . k_j * scale) v_j

computed without materialising the scores: each program owns BLOCK_M query rows of one (batch, query
head), walks the key blocks of BLOCK_N slots that can be visible to them, and keeps for every row a
running maximum m, a running denominator l and an unnormalised accumulator acc (fp32), rescaling them by
exp(m_old - m_new) when the maximum grows (Dao, "FlashAttention-2", 2023; the Triton tutorial
06-fused-attention). Exponentials are exp2 with log2(e) folded into the scale.

Grouped-query attention: query head h reads key/value head h // (Hq // Hkv) directly; K/V are never
copied per query head. Consecutive programs share a head, so its K/V stay hot in L2.

Which key blocks a program visits (no explicit positions): its rows sit at absolute positions
[first, last] with first = S - T + BLOCK_M * pid_m. Causal attention needs keys < last + 1; a window W
needs keys > first - W. Blocks outside [lo, hi) are never loaded (loop bounds, not masking), so
sliding-window work grows with T * W. Inside, blocks that every row sees in full,
[last - W + 1, first], run without a mask; only the edge blocks pay for masking.
With explicit positions (q_pos [B, T], k_pos [B, S]; a rolling KV cache) slots are unordered, so every
block is visited and masked by position.

Grid: (cdiv(T, BLOCK_M), B * Hq). T == 1 goes to `kernels.flash_decoding` instead (see there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import cdiv, check_device, interpreting
from kernels.reference import check_attention_shapes, check_positions, check_window

LOG2E = 1.4426950408889634


@triton.jit
def _attend_blocks(
    acc, l_i, m_i,  # running state of the BLOCK_M rows: fp32 [BLOCK_M, D], [BLOCK_M], [BLOCK_M]
    q,  # [BLOCK_M, D] queries (fp32 when EXACT_DOT)
    K_head, V_head,  # *k, *v at this (batch, kv head)
    KPOS_row,  # *k_pos at this batch row (used when HAS_POS)
    q_p,  # [BLOCK_M] int: absolute positions of the rows
    start, end,  # visit key blocks starting at start, start + BLOCK_N, ... < end
    S,  # key slots (loads past S are masked when MASKED)
    stride_ks, stride_vs, stride_kps,  # slot strides of K, V and k_pos
    qk_scale,  # scale * log2(e)
    window,  # sliding window W (used when HAS_WINDOW)
    D: tl.constexpr,  # head dim (power of two)
    BLOCK_N: tl.constexpr,  # key slots per block
    MASKED: tl.constexpr,  # False only for blocks every row sees in full
    CAUSAL: tl.constexpr,  # key visible only if its position <= the query's
    HAS_WINDOW: tl.constexpr,  # key visible only if its position > the query's - W
    HAS_POS: tl.constexpr,  # positions come from k_pos (else slot j is position j)
    EXACT_DOT: tl.constexpr,  # multiply in fp32 IEEE (fp32 inputs; the interpreter)
):
    offs_d = tl.arange(0, D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K_head + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V_head + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if EXACT_DOT:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASKED:
            visible = offs_n[None, :] < S
            if HAS_POS:
                k_p = tl.load(KPOS_row + offs_n * stride_kps, mask=offs_n < S, other=-1)
                visible = visible & (k_p[None, :] >= 0)
            else:
                k_p = offs_n
            if CAUSAL:
                visible = visible & (k_p[None, :] <= q_p[:, None])
            if HAS_WINDOW:
                visible = visible & (k_p[None, :] > q_p[:, None] - window)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        if MASKED:  # a row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.exp2(qk - m_new_safe[:, None])
        alpha = tl.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if EXACT_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attention_kernel(
    Q, K, V, O,  # *q [B, Hq, T, D], *k / *v [B, Hkv, S, D], *o [B, Hq, T, D]; unit stride along D
    LSE,  # *fp32 [B, Hq, T]: each row's log2-sum-exp2 of its scores, for the backward (when STORE_LSE)
    QPOS, KPOS,  # *int32 q_pos [B, T], k_pos [B, S] (dummies unless HAS_POS)
    stride_qb, stride_qh, stride_qt,  # strides of q
    stride_kb, stride_kh, stride_ks,  # strides of k
    stride_vb, stride_vh, stride_vs,  # strides of v
    stride_ob, stride_oh, stride_ot,  # strides of o
    stride_qpb, stride_qpt, stride_kpb, stride_kps,  # strides of q_pos and k_pos
    T, S,  # query rows, key slots
    n_heads,  # Hq
    group,  # Hq // Hkv: query heads per key/value head
    qk_scale,  # scale * log2(e)
    window,  # sliding window W (used when HAS_WINDOW)
    D: tl.constexpr,  # head dim (power of two)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key slots per inner step
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_POS: tl.constexpr,
    EXACT_DOT: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    # Heaviest query blocks (the last rows see the most keys) start first: a shorter tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    if EXACT_DOT:
        q = q.to(tl.float32)
    K_head = K + b * stride_kb + h_kv * stride_kh
    V_head = V + b * stride_vb + h_kv * stride_vh
    KPOS_row = KPOS + b * stride_kpb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    if HAS_POS:
        q_p = tl.load(QPOS + b * stride_qpb + offs_m * stride_qpt, mask=offs_m < T, other=0)
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, K_head, V_head, KPOS_row, q_p, 0, S, S, stride_ks, stride_vs, stride_kps,
            qk_scale, window, D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_POS, EXACT_DOT,
        )
    else:
        q_p = offs_m + (S - T)  # query t sits at absolute position S - T + t
        first = pid_m * BLOCK_M + (S - T)  # position of this block's first row
        last = tl.minimum(first + BLOCK_M, S) - 1  # ... and of its last real row
        # [lo, hi): every key any row may see; [full_lo, full_hi): keys every row sees.
        lo = 0
        full_lo = 0
        hi = S
        full_hi = S
        if HAS_WINDOW:
            lo = tl.maximum(first - window + 1, 0)
            full_lo = tl.maximum(last - window + 1, 0)
        if CAUSAL:
            hi = tl.minimum(last + 1, S)
            full_hi = tl.minimum(first + 1, S)
        lo = (lo // BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)  # first unmasked block
        mid_hi = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, mid_lo), hi)  # end of unmasked blocks
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, K_head, V_head, KPOS_row, q_p, lo, mid_lo, S, stride_ks, stride_vs, stride_kps,
            qk_scale, window, D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_POS, EXACT_DOT,
        )
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, K_head, V_head, KPOS_row, q_p, mid_lo, mid_hi, S, stride_ks, stride_vs, stride_kps,
            qk_scale, window, D, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_POS, EXACT_DOT,
        )
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, K_head, V_head, KPOS_row, q_p, mid_hi, hi, S, stride_ks, stride_vs, stride_kps,
            qk_scale, window, D, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_POS, EXACT_DOT,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no visible key: acc is 0, output 0
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # -inf: the row saw no key
        tl.store(LSE + (b * n_heads + h) * T + offs_m, lse, mask=offs_m < T)


def launch_config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes and launch options, chosen per head dim and dtype (tuned on an H100; see RESULTS.md)."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)  # interpreter: exercise ragged edges
    if dtype == torch.float32:  # IEEE fp32 dots: correctness first, smaller tiles
        return dict(BLOCK_M=64 if D <= 128 else 32, BLOCK_N=32, num_warps=4, num_stages=2)
    if D >= 256:  # the [BLOCK_M, D] fp32 accumulator must stay in registers
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def check_attention_inputs(q, k, v, window, q_pos, k_pos, kernel: str) -> torch.device:
    """Shape, dtype, device and position checks shared by the prefill and decode wrappers."""
    B, Hq, T, D = check_attention_shapes(q, k, v)
    check_window(window)
    device = check_device(kernel, q=q, k=k, v=v)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{kernel}: q, k, v must share one of fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"{kernel}: head dim must be a power of two in 16..256, got D={D} (q {tuple(q.shape)})")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"{kernel}: q, k, v need unit stride along D (call .contiguous())")
    if (q_pos is None) != (k_pos is None):
        raise ValueError(f"{kernel}: q_pos and k_pos must be given together")
    if q_pos is not None:
        check_positions(q_pos, k_pos, T, k.shape[2])
        if q_pos.shape[0] != B:
            raise ValueError(f"{kernel}: q_pos {tuple(q_pos.shape)} and q {tuple(q.shape)} disagree on B")
        check_device(kernel, q=q, q_pos=q_pos, k_pos=k_pos)
    return device


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    config: dict | None = None,
    return_lse: bool = False,
):
    """Run the prefill kernel for any T: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D] in q's dtype.

    `config` overrides `launch_config` (BLOCK_M, BLOCK_N, num_warps, num_stages); the benchmark tunes with it.
    With `return_lse`, returns (out, lse): lse [B, Hq, T] fp32, each row's log2-sum-exp2 of its scores
    times scale * log2(e) (-inf for a row with no visible key), which the backward kernels need.
    """
    device = check_attention_inputs(q, k, v, window, q_pos, k_pos, "flash_attention")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=torch.float32, device=device) if return_lse else out
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    if q_pos is not None:
        qp, kp = q_pos.to(torch.int32), k_pos.to(torch.int32)
    else:
        qp = kp = q  # never read (HAS_POS is False); any pointer will do
    cfg = dict(config or launch_config(D, q.dtype, device))
    block_m = cfg.pop("BLOCK_M")
    grid = (cdiv(T, block_m), B * Hq)
    _flash_attention_kernel[grid](
        q, k, v, out, lse, qp, kp,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qp.stride(0), qp.stride(-1), kp.stride(0), kp.stride(-1),
        T, S, Hq, Hq // Hkv, scale * LOG2E, window or 0,
        D=D, BLOCK_M=block_m, CAUSAL=causal, HAS_WINDOW=window is not None, HAS_POS=q_pos is not None,
        EXACT_DOT=q.dtype == torch.float32 or interpreting(), STORE_LSE=return_lse, **cfg,
    )
    return (out, lse) if return_lse else out
