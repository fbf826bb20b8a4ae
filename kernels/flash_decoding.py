"""Flash-decoding: attention of one new query token over a long KV cache, split across the GPU.

With T == 1 a FlashAttention program per (batch, head) would leave most of the GPU idle while it walks
the whole cache alone. Flash-decoding (Dao, Haziza, Massa, Sizov, 2023) splits the S key slots into
n_splits ranges; each program reduces one range to a partial result, and a second small kernel merges
the partials. For one query row and split s, over the visible keys j of that split:

    m_s   = max_j x_j,  with x_j = q . k_j * scale * log2(e)
    l_s   = sum_j 2^(x_j - m_s)
    o_s   = sum_j 2^(x_j - m_s) v_j / l_s
    lse_s = m_s + log2(l_s)                       (-inf when the split sees no key)

and the merge is o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) with M = max_s lse_s (zeros when
every lse_s is -inf: no visible key at all).

Grouped-query attention: one program serves all Hq // Hkv query heads of a key/value head at once (a
[BLOCK_G, D] block of queries against each [BLOCK_N, D] block of keys), so each K/V byte is read once,
not once per query head.

Without explicit positions the query sits at position S - 1: only keys in [max(0, S - W), S) can be
visible, so only that range is split (a window of 4096 over a cache of 16k reads 4096 slots). With
positions (a rolling buffer, rows of different lengths) all S slots are split and masked by position.

Grids: partial (n_splits, B * Hkv); merge (B * Hq,), one program loading all n_splits partials of a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import cdiv, interpreting, next_power_of_2, sm_count
from kernels._online_softmax import online_softmax_step
from kernels.flash_attention import LOG2E, check_attention_inputs

MAX_SPLITS = 128  # the merge kernel holds [n_splits, D] partials of a row in registers


@triton.jit
def _decode_partial_kernel(
    Q, K, V,  # *q [B, Hq, 1, D], *k / *v [B, Hkv, S, D]; unit stride along D
    O_PART,  # *fp32 [B, Hq, n_splits, D]: each split's normalised output
    LSE_PART,  # *fp32 [B, Hq, n_splits]: each split's log2-sum-exp2 (-inf if it saw nothing)
    QPOS, KPOS,  # *int32 q_pos [B, 1], k_pos [B, S] (dummies unless HAS_POS)
    stride_qb, stride_qh,  # strides of q
    stride_kb, stride_kh, stride_ks,  # strides of k
    stride_vb, stride_vh, stride_vs,  # strides of v
    stride_qpb, stride_kpb, stride_kps,  # strides of q_pos and k_pos
    S,  # key slots
    n_kv_heads,  # Hkv
    group,  # Hq // Hkv: query heads served by this program
    key_lo,  # first key slot that may be visible
    split_len,  # key slots per split (a multiple of BLOCK_N)
    n_splits,  # splits per (batch, kv head)
    qk_scale,  # scale * log2(e)
    window,  # sliding window W (used when HAS_WINDOW)
    D: tl.constexpr,  # head dim (power of two)
    BLOCK_G: tl.constexpr,  # power of two >= max(group, 16): query heads per program, padded for tl.dot
    BLOCK_N: tl.constexpr,  # key slots per inner step
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_POS: tl.constexpr,
    EXACT_DOT: tl.constexpr,  # multiply in fp32 IEEE (fp32 inputs; the interpreter)
):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h_kv = pid_bh % n_kv_heads

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = h_kv * group + offs_g  # the query heads that read this kv head
    real = offs_g < group
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=real[:, None], other=0.0)
    if EXACT_DOT:
        q = q.to(tl.float32)
    if HAS_POS:
        q_p = tl.load(QPOS + b * stride_qpb)
    else:
        q_p = S - 1  # the query is the newest position

    K_head = K + b * stride_kb + h_kv * stride_kh
    V_head = V + b * stride_vb + h_kv * stride_vh
    start = key_lo + split * split_len
    end = tl.minimum(start + split_len, S)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_split = offs_n < end
        k = tl.load(K_head + offs_n[:, None] * stride_ks + offs_d[None, :], mask=in_split[:, None], other=0.0)
        v = tl.load(V_head + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_split[:, None], other=0.0)
        if EXACT_DOT:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # [BLOCK_G, BLOCK_N], log2 domain
        visible = in_split
        if HAS_POS:
            k_p = tl.load(KPOS + b * stride_kpb + offs_n * stride_kps, mask=in_split, other=-1)
            visible = visible & (k_p >= 0)
        else:
            k_p = offs_n
        if CAUSAL:
            visible = visible & (k_p <= q_p)
        if HAS_WINDOW:
            visible = visible & (k_p > q_p - window)
        qk = tl.where(visible[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, EXACT_DOT)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = (b * n_kv_heads * group + heads) * n_splits + split  # index into [B, Hq, n_splits]
    tl.store(O_PART + row[:, None] * D + offs_d[None, :], out, mask=real[:, None])
    tl.store(LSE_PART + row, lse, mask=real)


@triton.jit
def _decode_merge_kernel(
    O_PART,  # *fp32 [B * Hq, n_splits, D]
    LSE_PART,  # *fp32 [B * Hq, n_splits]
    O,  # *o [B, Hq, 1, D] in q's dtype
    stride_ob, stride_oh,  # strides of o
    n_heads,  # Hq
    n_splits,  # partial results per row
    D: tl.constexpr,  # head dim
    BLOCK_S: tl.constexpr,  # power of two >= n_splits: all partials of a row are loaded at once
):
    row = tl.program_id(0)  # b * Hq + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    real = offs_s < n_splits
    lse = tl.load(LSE_PART + row * n_splits + offs_s, mask=real, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: every weight is 0, output 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    o_s = tl.load(O_PART + (row * n_splits + offs_s[:, None]) * D + offs_d[None, :], mask=real[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o_s, axis=0) / tl.where(total > 0.0, total, 1.0)  # [D]
    b = row // n_heads
    h = row % n_heads
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


def launch_config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """BLOCK_N and launch options of the partial kernel (tuned on an H100; see RESULTS.md)."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)  # interpreter: several blocks and splits
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=128 if D <= 128 else 64, num_warps=4, num_stages=3)


def flash_decoding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    n_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, 1, D] over k/v [B, Hkv, S, D] -> [B, Hq, 1, D] in q's dtype.

    `n_splits` (default: about two programs per multiprocessor, at most MAX_SPLITS) and `config`
    (BLOCK_N, num_warps, num_stages) are for tests and tuning.
    """
    device = check_attention_inputs(q, k, v, window, q_pos, k_pos, "flash_decoding")
    B, Hq, T, D = q.shape
    if T != 1:
        raise ValueError(f"flash_decoding: wants one query position, got q {tuple(q.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    cfg = dict(config or launch_config(D, q.dtype, device))
    block_n = cfg.pop("BLOCK_N")

    if q_pos is None:
        qp = kp = q  # never read (HAS_POS is False); any pointer will do
        key_lo = max(0, S - window) if window is not None else 0  # keys before S - W are out of the window
    else:
        qp, kp = q_pos.to(torch.int32), k_pos.to(torch.int32)
        key_lo = 0
    n_keys = max(S - key_lo, 0)
    n_blocks = max(cdiv(n_keys, block_n), 1)
    if n_splits is None:
        n_splits = cdiv(2 * sm_count(device), B * Hkv)
    n_splits = max(1, min(n_splits, n_blocks, MAX_SPLITS))
    split_len = cdiv(n_blocks, n_splits) * block_n
    n_splits = max(cdiv(n_keys, split_len), 1)

    o_part = torch.empty((B, Hq, n_splits, D), dtype=torch.float32, device=device)
    lse_part = torch.empty((B, Hq, n_splits), dtype=torch.float32, device=device)
    _decode_partial_kernel[(n_splits, B * Hkv)](
        q, k, v, o_part, lse_part, qp, kp,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        qp.stride(0), kp.stride(0), kp.stride(-1),
        S, Hkv, group, key_lo, split_len, n_splits, scale * LOG2E, window or 0,
        D=D, BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n, CAUSAL=causal,
        HAS_WINDOW=window is not None, HAS_POS=q_pos is not None,
        EXACT_DOT=q.dtype == torch.float32 or interpreting(), **cfg,
    )
    block_s = max(next_power_of_2(n_splits), 2)
    _decode_merge_kernel[(B * Hq,)](
        o_part, lse_part, out, out.stride(0), out.stride(1), Hq, n_splits, D=D,
        BLOCK_S=block_s, num_warps=4 if block_s * D <= 8192 else 8,
    )
    return out
