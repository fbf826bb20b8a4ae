"""A KV cache in fixed-size blocks shared by many requests (PagedAttention: Kwon et al. 2023, vLLM).

Storage: per layer, k and v of shape [Hkv, n_blocks * block_size, D]; slot s = block * block_size + offset.
A request's block table (komt.serve.blocks) says where its sequence lives: logical block i, positions
i*bs .. i*bs + bs - 1, is physical block table[i]. Blocks come from one free list, so a request holds
only the blocks its tokens fill, and a block full of a shared prefix can sit in several tables at once.
Block 0 is the null block: never handed out; a table entry 0 means "not held" (a block that slid out of
the window), padding reads it (masked out), and the padding rows of a compiled decode step write it.

Each forward gets a `PagedBatch` built by the server's runner: for every query token the slot its key and
value go to, and for every row the slots attention reads with their positions (-1: nothing there). The
model talks to it exactly as to the contiguous `KVCache`: `attention_context` once, then `update` per
layer, which writes this forward's keys and gathers the row's slots into [B, Hkv, S, D]. The one
attention function then masks by position as always (the torch path: gather + mask).

Two layouts:
- rows: B requests, one query each (a decode step); row b reads only its own slots, S = the longest row.
- packed: one row holding every scheduled token of every request (prefill chunks and decode tokens in
  one forward), S = all their slots. Requests must not see each other, and the position rule does it:
  in the coordinates attention masks by, request r's queries and keys are shifted by r * stride, with
  stride > twice the longest sequence and the window clipped to stride / 2, so another request's key is
  either in the future or farther back than the window. RoPE still gets the true positions.

  Example: two requests, longest sequence 10, stride 22, no window (clipped: 11). Request 0 at
  positions 0..3 masks as 0..3; request 1 at 0..2 masks as 22..24. Query 22 sees keys 22 (same
  request) but not 0..3: 22 - 3 = 19 > 11, outside the clipped window; query 3 does not see 22..24:
  they are in its future.
"""

from __future__ import annotations

import torch

from komt.model.attention import AttentionContext
from komt.model.config import ModelConfig

NULL_BLOCK = 0


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes over all layers (keys and values)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


class PagedKVCache:
    """The block pool: per-layer key/value tensors [Hkv, n_blocks * block_size, D], allocated once."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.n_blocks, self.block_size = n_blocks, block_size
        shape = (config.num_key_value_heads, n_blocks * block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]

    def row_slots(self, blocks: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of a block table holding positions < `length`, and those positions ([n] each, on the CPU).

        Blocks not held (entry 0) are left out; slots of the last block past `length` get position -1.
        """
        bs = self.block_size
        held = [(i, b) for i, b in enumerate(blocks[: -(-length // bs)]) if b != NULL_BLOCK]
        if not held:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        logical, physical = torch.tensor(held, dtype=torch.long).unbind(1)  # (n_held,) each
        offsets = torch.arange(bs)
        slots = (physical[:, None] * bs + offsets).flatten()  # (n_held * bs,)
        positions = (logical[:, None] * bs + offsets).flatten()
        return slots, positions.masked_fill(positions >= length, -1)

    def write_slots(self, blocks: list[int], start: int, count: int) -> torch.Tensor:
        """The slots where positions start .. start + count - 1 of a block table go ([count], on the CPU)."""
        bs = self.block_size
        positions = torch.arange(start, start + count)
        table = torch.tensor(blocks[: -(-(start + count) // bs)], dtype=torch.long)
        return table[positions // bs] * bs + positions % bs


class PagedBatch:
    """One forward's view of a `PagedKVCache` (module docstring); all index tensors on the cache's device.

    write_slots [B, T]: where each query token's key/value goes. gather_slots / key_positions [B, S]:
    what row b attends to, and at which positions (-1: padding). query_offsets [B, T] / key_offsets
    [B, S] (packed layout only): the per-request shifts of the masking coordinates, with `mask_window`
    the window to mask with (the model's, clipped to stride / 2).
    """

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, gather_slots: torch.Tensor,
                 key_positions: torch.Tensor, query_offsets: torch.Tensor | None = None,
                 key_offsets: torch.Tensor | None = None, mask_window: int | None = None,
                 segments: tuple[tuple[int, int, int, int], ...] | None = None) -> None:
        self.cache = cache
        self.write_slots, self.gather_slots = write_slots, gather_slots
        self.key_positions = key_positions
        self.query_offsets, self.key_offsets = query_offsets, key_offsets
        self.mask_window = mask_window
        self.segments = segments  # packed layout: each request's query and key ranges (AttentionContext)

    def attention_context(self, positions: torch.Tensor, window: int | None, backend: str) -> AttentionContext:
        """Positions [B, T] of this forward's queries -> the context every layer's attention masks with."""
        if self.query_offsets is None:
            return AttentionContext.build(positions, self.key_positions, window, backend)
        keys = torch.where(self.key_positions >= 0, self.key_positions + self.key_offsets, -1)  # (B, S)
        return AttentionContext.build(positions + self.query_offsets, keys, self.mask_window, backend, self.segments)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values [B, Hkv, T, D] of `layer`; return each row's slots [B, Hkv, S, D]."""
        B, Hkv, T, D = k.shape
        S = self.gather_slots.shape[1]
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        where = self.write_slots.reshape(B * T)
        # (B, Hkv, T, D) -> (Hkv, B, T, D) -> (Hkv, B*T, D): one slot per query token
        k_pool.index_copy_(1, where, k.transpose(0, 1).reshape(Hkv, B * T, D).to(k_pool.dtype))
        v_pool.index_copy_(1, where, v.transpose(0, 1).reshape(Hkv, B * T, D).to(v_pool.dtype))
        read = self.gather_slots.reshape(B * S)
        # (Hkv, B*S, D) -> (Hkv, B, S, D) -> (B, Hkv, S, D)
        keys = k_pool.index_select(1, read).view(Hkv, B, S, D).transpose(0, 1)
        values = v_pool.index_select(1, read).view(Hkv, B, S, D).transpose(0, 1)
        return keys, values
