"""Grouped-query self-attention with RoPE and an optional sliding window.

One attention function serves training, prefill and decode; what it sees is decided by the caller:

- no cache: keys are the T query positions themselves, visibility is causal (+ window);
- with a KV cache: the cache hands back its whole buffer of S slots and the absolute position of every
  slot (`key_positions`, -1 for an empty slot). A slot is visible to a query iff it is filled, not in the
  future, and inside the window. This one rule covers a rolling buffer whose slots are out of order,
  chunked prefill on top of a cache, and batch rows of different lengths.

Shapes: B batch, T query positions, S key slots, H query heads, Hkv key/value heads, D head dim.

Two backends compute the same thing (`kernels`):
- "torch": PyTorch's `scaled_dot_product_attention` with a boolean mask (fast on the CPU; the mask is
  built once per forward by `AttentionContext`, not per layer);
- "triton": komt's hand-written Triton kernels (`kernels.attention`), used on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from komt.model.config import ModelConfig
from komt.model.linear import project
from komt.model.rope import apply_rope

KERNEL_BACKENDS = ("torch", "triton")


def visibility_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: True where query t may attend to key slot s.

    Visible iff the slot is filled (position >= 0), not after the query (causal) and, with a sliding
    window W, less than W positions back: i - W < j <= i.
    """
    q = query_positions[:, None, :, None]  # (B, T) -> (B, 1, T, 1)
    k = key_positions[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k > q - window
    return mask


@dataclass
class AttentionContext:
    """What every layer's attention needs to know about positions, computed once per forward.

    `key_positions` is None when there is no cache: keys are the queries' own positions, in order.
    The SDPA mask is built on first use and then shared by every layer: the torch backend always uses it,
    the Triton backend only when it falls back to SDPA (autograd), and either way it carries the sliding
    window and the cache's slot positions (a mask-less fallback would silently run plain causal attention).
    """

    query_positions: torch.Tensor  # (B, T)
    key_positions: torch.Tensor | None  # (B, S) or None
    window: int | None
    backend: str
    # Several sequences packed into one row (the server's prefill steps): ((q_start, q_end, k_start, k_end),
    # ...), queries [q_start, q_end) seeing only keys [k_start, k_end). The mask already says so; the
    # segments let SDPA skip the other sequences' keys instead of computing scores it then masks away.
    segments: tuple[tuple[int, int, int, int], ...] | None = None
    _mask: torch.Tensor | None = None
    _mask_built: bool = False

    @classmethod
    def build(
        cls,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor | None,
        window: int | None,
        backend: str,
        segments: tuple[tuple[int, int, int, int], ...] | None = None,
    ) -> "AttentionContext":
        ctx = cls(query_positions, key_positions, window, backend, segments)
        if backend == "torch":
            ctx.sdpa_mask()  # once here, not inside the first layer (keeps compiled graphs simple)
        return ctx

    def sdpa_mask(self) -> torch.Tensor | None:
        """The boolean mask [B, 1, T, S] for SDPA, or None when plain causal attention (`is_causal`) is exact."""
        if not self._mask_built:
            T = self.query_positions.shape[1]
            if self.key_positions is None and (self.window is None or self.window >= T):
                self._mask = None  # causal over the same T positions: is_causal says it
            else:
                keys = self.query_positions if self.key_positions is None else self.key_positions
                self._mask = visibility_mask(self.query_positions, keys, self.window)
            self._mask_built = True
        return self._mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the visible keys: q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D].

    When gradients are needed (LoRA training) attention takes PyTorch's SDPA, whose fused CUDA backward
    is measured; the Triton kernels' own backward (`kernels.flash_attention_bwd`) is tested but not yet
    timed on a GPU, so it is not the training path.
    """
    if ctx.backend == "triton" and not (torch.is_grad_enabled() and q.requires_grad):
        import kernels  # only on this path: komt runs without triton installed

        if ctx.key_positions is None:
            return kernels.attention(q, k, v, causal=True, window=ctx.window)
        return kernels.attention(
            q, k, v, causal=True, window=ctx.window, q_pos=ctx.query_positions, k_pos=ctx.key_positions
        )
    mask = ctx.sdpa_mask()
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if ctx.segments is not None:
        return _attend_segments(q, k, v, mask, ctx.segments)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     segments: tuple[tuple[int, int, int, int], ...]) -> torch.Tensor:
    """`attend` of packed sequences, one SDPA per sequence over its own keys (AttentionContext.segments).

    Packed whole, every query would score every sequence's keys: with four streams of 500 tokens beside a
    2,000-token prompt, a 128-token chunk spent as long in attention as in all of SmolLM2's weights
    (measured: 166 of 386 ms). Per sequence the work is what each query can see.
    """
    out = torch.empty_like(q)  # (B, H, T, D)
    for q0, q1, k0, k1 in segments:
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask[:, :, q0:q1, k0:k1], enable_gqa=True)
    return out


class Attention(nn.Module):
    """q/k/v projections -> RoPE -> (cache) -> grouped-query attention -> o projection."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        ctx: AttentionContext,
        cache=None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)  # (B, T, H*D), (B, T, Hkv*D) x 2
        # (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D)
        q = q.view(B, T, self.n_heads, D).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, D).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, D).transpose(1, 2)
        q = apply_rope(q, cos, signed_sin)
        k = apply_rope(k, cos, signed_sin)
        if cache is not None:
            # The cache stores the rotated keys and returns its whole buffer: (B, Hkv, S, D).
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, ctx)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.o_proj(out)
