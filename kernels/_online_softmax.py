"""The running-softmax step of FlashAttention-2, as the decode kernels take it: fold one block of scores in.

For each query row, with m the running maximum, l the running denominator and acc the unnormalised
output (all fp32), a block of scores x [rows, N] (log2 domain; -inf where a key is not visible) and its
values v [N, D] update them to

    m' = max(m, max_j x_j),   l' = l 2^(m - m') + sum_j 2^(x_j - m'),   acc' = acc 2^(m - m') + 2^(x - m') v

(Dao, "FlashAttention-2", 2023). A row that has seen no visible key yet keeps m = -inf; it is shifted by
0 instead, so the exponentials give 0, not NaN. Used by `kernels.flash_decoding` and
`kernels.paged_decoding`; the prefill kernel (`kernels.flash_attention._attend_blocks`) writes the same
step inline around its own loads (it reads V only after the exponentials, and skips the -inf guard on
the blocks every row sees in full).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(
    acc, l_i, m_i,  # running state: fp32 [rows, D], [rows], [rows]
    qk,  # fp32 [rows, N] scores of this block, log2 domain, -inf where not visible
    v,  # [N, D] values of this block
    EXACT_DOT: tl.constexpr,  # multiply in fp32 IEEE (fp32 inputs; the interpreter)
):
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2 gives 0, not NaN
    p = tl.exp2(qk - m_new_safe[:, None])
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EXACT_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new
