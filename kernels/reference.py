"""The math of every kernel in `kernels/`, written as plain, readable PyTorch.

These functions are the specification: the Triton kernels are tested against them, and a model's CPU
path can call them directly. They favour clarity over speed (an explicit [B, 1, T, S] mask, K/V
repeated per query head, softmax over a materialised score matrix), so they use O(T * S) memory.

Shape key: B batch, Hq query heads, Hkv key/value heads, T query positions, S key slots, D head dim.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as Hugging Face's `LlamaRMSNorm` / `MistralRMSNorm` compute it, in x's dtype.

    y = weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)

    The statistics are taken in fp32 (bf16 sums lose about three digits over 4096 elements), the
    normalised x is rounded back to x's dtype *before* the multiply by weight (as Hugging Face does),
    and the product is rounded to x's dtype (Hugging Face would promote to fp32 when weight is fp32 and
    x is not; we always return x's dtype).
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * (xf * rstd).to(x.dtype)).to(x.dtype)


def attention_mask(
    T: int,
    S: int,
    *,
    causal: bool = True,
    window: int | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean visibility mask [B, 1, T, S]: True where query t may attend to key slot s.

    Without positions the T queries are the last T of the S key positions (query t sits at absolute
    position S - T + t, key s at position s), which covers prefill (T == S), prefill on top of a cache
    (T < S) and decode (T == 1); the mask then has B == 1 and broadcasts over the batch.
    With positions (q_pos [B, T] and k_pos [B, S], integer) every slot's absolute position is given, as a
    rolling-buffer KV cache produces them; k_pos < 0 marks an empty slot. `device` is used only without
    positions (with them, the mask lives on their device).

    A key at position j is visible to a query at position i iff
        j >= 0  and  (not causal or j <= i)  and  (window is None or j > i - window).
    A row with no visible key is all False (the attention functions return zeros for it).
    """
    check_window(window)
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos must be given together (got only one of them)")
    if q_pos is None:
        device = device if device is not None else "cpu"
        qp = torch.arange(S - T, S, device=device)[None, :]  # (1, T): query t at position S - T + t
        kp = torch.arange(S, device=device)[None, :]  # (1, S)
    else:
        check_positions(q_pos, k_pos, T, S)
        qp, kp = q_pos.long(), k_pos.long()
    qi = qp[:, None, :, None]  # (B, T) -> (B, 1, T, 1)
    kj = kp[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    mask = (kj >= 0).expand(-1, -1, T, -1)  # (B, 1, 1, S) -> (B, 1, T, S)
    if causal:
        mask = mask & (kj <= qi)
    if window is not None:
        mask = mask & (kj > qi - window)
    return mask


def attention_reference(
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
    """softmax(q k^T * scale + mask) v with grouped-query heads, in fp32, returned in q's dtype.

    q [B, Hq, T, D], k and v [B, Hkv, S, D] with Hq a multiple of Hkv: query head h reads key/value head
    h // (Hq // Hkv). `scale` defaults to D ** -0.5. Visibility is `attention_mask(...)`; a query row
    with no visible key returns zeros (not NaN), and its gradients are zeros too.
    """
    B, Hq, T, D = check_attention_shapes(q, k, v)
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = Hq // k.shape[1]
    if q_pos is not None and k_pos is not None:
        check_positions(q_pos, k_pos, T, S)
        if q_pos.shape[0] != B:
            raise ValueError(f"q_pos {tuple(q_pos.shape)} has a different batch size than q {tuple(q.shape)}")
    mask = attention_mask(T, S, causal=causal, window=window, q_pos=q_pos, k_pos=k_pos, device=q.device)
    kf = k.float().repeat_interleave(group, dim=1)  # (B, Hkv, S, D) -> (B, Hq, S, D)
    vf = v.float().repeat_interleave(group, dim=1)  # (B, Hkv, S, D) -> (B, Hq, S, D)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale  # (B, Hq, T, S)
    has_key = mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1): rows with nothing visible get zeros
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    return (probs @ vf).to(q.dtype)  # (B, Hq, T, D)


def paged_attention_reference(
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
    """Attention of one query per row over a block-paged KV cache, by gathering each row's keys.

    q [N, Hq, D]; k_pool, v_pool [Hkv, n_slots, D], slot s of block b at b * block_size + s; tables
    [R, max_blocks] the physical block of each logical block of a sequence (0: not held); rows [N] the
    table row of each query; q_pos [N] its position. The key at position j of query n's sequence sits at
    slot tables[rows[n], j // block_size] * block_size + j % block_size and is visible iff its block is
    held, j <= q_pos[n], and j > q_pos[n] - window. Returns [N, Hq, D] in q's dtype.
    """
    N = q.shape[0]
    M = tables.shape[1]
    logical = torch.arange(M * block_size, device=q.device)  # (S,) every position a table row can address
    table = tables.long()[rows.long()]  # (N, M)
    blocks = table[:, logical // block_size]  # (N, S)
    slots = blocks * block_size + logical % block_size  # (N, S)
    k_pos = torch.where(blocks != 0, logical, -1)  # (N, S)
    # (Hkv, N*S, D) -> (Hkv, N, S, D) -> (N, Hkv, S, D)
    k = k_pool[:, slots.flatten()].view(k_pool.shape[0], N, -1, k_pool.shape[2]).transpose(0, 1)
    v = v_pool[:, slots.flatten()].view(v_pool.shape[0], N, -1, v_pool.shape[2]).transpose(0, 1)
    out = attention_reference(q[:, :, None], k, v, causal=True, window=window, scale=scale,
                              q_pos=q_pos.long()[:, None], k_pos=k_pos)  # (N, Hq, 1, D)
    return out[:, :, 0]


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate q [B, Hq, T, D], k/v [B, Hkv, S, D] (Hq % Hkv == 0) and return (B, Hq, T, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention wants q [B, Hq, T, D] and k, v [B, Hkv, S, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(
            f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need k and v the same shape, the same B and D as q, Hq a multiple of Hkv)"
        )
    return B, Hq, T, D


def check_window(window: int | None) -> None:
    """A window is None (no window) or a positive int number of positions."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")


def check_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, T: int, S: int) -> None:
    """q_pos must be an integer [B, T] tensor and k_pos an integer [B, S] tensor with the same B."""
    for name, pos in (("q_pos", q_pos), ("k_pos", k_pos)):
        if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {pos.dtype}")
    if q_pos.dim() != 2 or k_pos.dim() != 2 or q_pos.shape[1] != T or k_pos.shape[1] != S:
        raise ValueError(
            f"q_pos must be [B, T={T}] and k_pos [B, S={S}]; got q_pos {tuple(q_pos.shape)}, "
            f"k_pos {tuple(k_pos.shape)}"
        )
    if q_pos.shape[0] != k_pos.shape[0]:
        raise ValueError(f"q_pos {tuple(q_pos.shape)} and k_pos {tuple(k_pos.shape)} disagree on B")
