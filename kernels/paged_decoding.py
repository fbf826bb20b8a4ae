"""Paged decode attention: one query token per row over a KV cache stored in fixed-size blocks (PagedAttention,
Kwon et al. 2023; vLLM's paged_attention v1 kernel), reading the blocks through a block table, with no gather.

The cache is a pool of slots, k_pool / v_pool [Hkv, n_slots, D], cut into blocks of BLOCK_SIZE slots. Query n
(at absolute position q_pos[n]) belongs to a sequence whose block table row is tables[rows[n]]: logical block
i of that sequence, positions i*BLOCK_SIZE .. (i+1)*BLOCK_SIZE - 1, lives in physical block tables[rows[n], i]
(0: not held, e.g. a block a sliding window has passed). So the key at position j is at slot
tables[row, j // BLOCK_SIZE] * BLOCK_SIZE + j % BLOCK_SIZE, and is visible iff

    j <= q_pos[n]  and  j > q_pos[n] - W (with a window)  and  its block is held (entry != 0).

Several queries may share a table row (the tokens of one prefill chunk, each at its own position), and
several rows may name the same physical block (a shared prefix). For one query and KV head, over the
visible keys x_j = q . k_j * scale * log2(e), the online softmax of FlashAttention:

    m = max_j x_j,   l = sum_j 2^(x_j - m),   o = sum_j 2^(x_j - m) v_j / l        (zeros if nothing visible)

Grouped-query attention: one program serves all Hq // Hkv query heads of a KV head (a [BLOCK_G, D] block
of queries against each [BLOCK_SIZE, D] block of keys), so each K/V byte is read once per query token.
Only the blocks that can be visible are visited: from the window's first block to the query's own.

Grid: (N, Hkv). No split over the keys (vLLM's v2 / flash-decoding): a long context with few rows leaves
the GPU idle; that split is the next step (kernels/flash_decoding.py shows it for a contiguous cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_device, interpreting, next_power_of_2
from kernels._online_softmax import online_softmax_step
from kernels.flash_attention import LOG2E


@triton.jit
def _paged_decode_kernel(
    Q,  # *q [N, Hq, D]; unit stride along D
    K_POOL, V_POOL,  # *k / *v [Hkv, n_slots, D]; unit stride along D
    O,  # *o [N, Hq, D]
    TABLES,  # *int32 [R, max_blocks]: physical block of each logical block (0: not held)
    ROWS,  # *int32 [N]: the table row of each query
    QPOS,  # *int32 [N]: the absolute position of each query
    stride_qn, stride_qh,  # strides of q
    stride_kh, stride_ks,  # strides of k_pool
    stride_vh, stride_vs,  # strides of v_pool
    stride_on, stride_oh,  # strides of o
    stride_tr,  # stride of a table row
    max_blocks,  # logical blocks per table row
    group,  # Hq // Hkv: query heads served by this program
    qk_scale,  # scale * log2(e)
    window,  # sliding window W (used when HAS_WINDOW)
    D: tl.constexpr,  # head dim (power of two)
    BLOCK_SIZE: tl.constexpr,  # slots per KV block: the key tile (power of two >= 16, for tl.dot)
    BLOCK_G: tl.constexpr,  # power of two >= max(group, 16): query heads per program, padded for tl.dot
    HAS_WINDOW: tl.constexpr,
    EXACT_DOT: tl.constexpr,  # multiply in fp32 IEEE (fp32 inputs; the interpreter)
):
    n = tl.program_id(0)
    h_kv = tl.program_id(1)
    row = tl.load(ROWS + n)
    q_p = tl.load(QPOS + n)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_SIZE)
    heads = h_kv * group + offs_g  # the query heads that read this kv head
    real = offs_g < group
    q = tl.load(Q + n * stride_qn + heads[:, None] * stride_qh + offs_d[None, :], mask=real[:, None], other=0.0)
    if EXACT_DOT:
        q = q.to(tl.float32)

    first = 0
    if HAS_WINDOW:
        first = tl.maximum(q_p - window + 1, 0) // BLOCK_SIZE
    last = tl.minimum(q_p // BLOCK_SIZE, max_blocks - 1)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    K_head = K_POOL + h_kv.to(tl.int64) * stride_kh  # int64: a pool of GBs overflows int32 offsets
    V_head = V_POOL + h_kv.to(tl.int64) * stride_vh
    for i in range(first, last + 1):
        block = tl.load(TABLES + row * stride_tr + i).to(tl.int64)
        slots = block * BLOCK_SIZE + offs_s  # [BLOCK_SIZE]
        k = tl.load(K_head + slots[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(V_head + slots[:, None] * stride_vs + offs_d[None, :])
        if EXACT_DOT:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # [BLOCK_G, BLOCK_SIZE], log2 domain
        k_p = i * BLOCK_SIZE + offs_s
        visible = (k_p <= q_p) & (block != 0)
        if HAS_WINDOW:
            visible = visible & (k_p > q_p - window)
        qk = tl.where(visible[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, EXACT_DOT)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(O + n * stride_on + heads[:, None] * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=real[:, None])


def launch_config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch options (not tuned on a GPU yet: num_warps by head dim, as the contiguous decode kernel uses)."""
    if device.type != "cuda":
        return dict(num_warps=1, num_stages=1)
    return dict(num_warps=4 if D <= 128 else 8, num_stages=2)


def check_paged_inputs(q, k_pool, v_pool, tables, rows, q_pos, block_size: int, window: int | None) -> None:
    """Shapes, dtypes and devices of a paged attention call (ValueError naming the tensor)."""
    if q.dim() != 3 or k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
        raise ValueError(f"paged attention wants q [N, Hq, D] and k_pool = v_pool [Hkv, n_slots, D]; got q "
                         f"{tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)}")
    N, Hq, D = q.shape
    Hkv, n_slots, Dk = k_pool.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"paged attention: q {tuple(q.shape)} and k_pool {tuple(k_pool.shape)} disagree on D or Hq "
                         "is not a multiple of Hkv")
    if block_size < 1 or n_slots % block_size:
        raise ValueError(f"paged attention: {n_slots} slots are not whole blocks of {block_size}")
    if tables.dim() != 2 or rows.shape != (N,) or q_pos.shape != (N,):
        raise ValueError(f"paged attention: want tables [R, max_blocks], rows [N], q_pos [N] for N={N}; got "
                         f"{tuple(tables.shape)}, {tuple(rows.shape)}, {tuple(q_pos.shape)}")
    for name, t in (("tables", tables), ("rows", rows), ("q_pos", q_pos)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"paged attention: {name} must be an integer tensor, got {t.dtype}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")


def paged_decode_attention(
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
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of queries q [N, Hq, D] over a paged cache (module docstring) -> [N, Hq, D] in q's dtype.

    k_pool / v_pool [Hkv, n_slots, D], tables [R, max_blocks], rows [N], q_pos [N]. Reference:
    `kernels.reference.paged_attention_reference`.
    """
    check_paged_inputs(q, k_pool, v_pool, tables, rows, q_pos, block_size, window)
    device = check_device("paged_decode_attention", q=q, k_pool=k_pool, v_pool=v_pool, tables=tables)
    N, Hq, D = q.shape
    Hkv = k_pool.shape[0]
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k_pool.dtype != q.dtype:
        raise ValueError(f"paged_decode_attention: q and the pools must share fp32/bf16/fp16; got {q.dtype}, "
                         f"{k_pool.dtype}")
    if D < 16 or D > 256 or D & (D - 1) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention: head dim and block size must be powers of two >= 16 (D <= 256); "
                         f"got D={D}, block_size={block_size}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("paged_decode_attention: q and the pools need unit stride along D (call .contiguous())")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if N == 0:
        return out
    scale = D**-0.5 if scale is None else float(scale)
    tables32, rows32, pos32 = tables.to(torch.int32), rows.to(torch.int32), q_pos.to(torch.int32)
    group = Hq // Hkv
    _paged_decode_kernel[(N, Hkv)](
        q, k_pool, v_pool, out, tables32, rows32, pos32,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1),
        tables32.stride(0), tables32.shape[1], group, scale * LOG2E, window or 0,
        D=D, BLOCK_SIZE=block_size, BLOCK_G=max(16, next_power_of_2(group)), HAS_WINDOW=window is not None,
        EXACT_DOT=q.dtype == torch.float32 or interpreting(), **(config or launch_config(D, q.dtype, device)),
    )
    return out
