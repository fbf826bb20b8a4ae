"""The KV cache: key/value buffers allocated once per generation, written at `position % size`.

For a model with a sliding window W, a query at position i only sees keys i - W < j <= i, so the cache
never needs more than the last W positions: it is a rolling buffer (mistral-inference's design) and
memory stays bounded however long the output grows. A prefill chunk of C tokens writes all C keys before
attending, so the buffer holds W + C - 1 slots: then no key a query in the chunk still needs is
overwritten by a later key of the same chunk.

A numeric walk-through, W = 4, prefill chunk C = 3, so size = 6 slots:

    prompt positions 0 1 2      -> slots 0 1 2           slot positions [ 0  1  2 -1 -1 -1]
    prompt positions 3 4 5      -> slots 3 4 5           slot positions [ 0  1  2  3  4  5]
      query 3 sees keys 0..3; query 5 sees 2..5 (window): both still in the buffer
    decode position 6           -> slot 0 (6 % 6)        slot positions [ 6  1  2  3  4  5]
      query 6 sees 3..6; slots holding 1, 2 are masked out by the window, not by the buffer
    decode position 7           -> slot 1                slot positions [ 6  7  2  3  4  5]

The cache records each slot's absolute position (-1 = empty) and the attention masks by it, so slots
need not be in order and each batch row can be at its own position. Without a window (Llama), the same
buffer simply never wraps: size is the whole context and positions past it are an error.

Two modes, same math:
- dynamic (default): attention sees only the slots filled so far (`S` grows with a plain buffer), and
  every forward checks its positions against the buffer (one host read of the largest position);
- static: attention always sees all `size` slots, empty ones masked, and nothing is read back to the
  host. Every decode step then has the same shapes and no host sync, which is what `torch.compile` and
  CUDA graphs need (gpt-fast's static cache); the caller checks positions before calling.

Buffers: k and v, one [B, Hkv, size, D] tensor per layer; slot_positions [B, size]. Separate tensors per
layer, not one [n_layers, ...] tensor, because `torch.compile` treats an in-place write into a slice of a
larger input as a write of the whole tensor: with one stacked buffer, every layer's one-slot update
became a copy of every layer's cache (measured on the CPU: 59 ms a compiled decode step instead of ~25).
"""

from __future__ import annotations

import torch

from komt.errors import GenerationError
from komt.model.attention import AttentionContext
from komt.model.config import ModelConfig


def cache_size(config: ModelConfig, max_positions: int, prefill_chunk: int) -> int:
    """Slots needed to generate up to `max_positions` positions, prefilling at most `prefill_chunk` at once."""
    if config.sliding_window is None:
        return max_positions
    return min(max_positions, config.sliding_window + prefill_chunk - 1)


class KVCache:
    """Preallocated per-layer key/value buffers for B rows (see module docstring)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_positions: int,
        prefill_chunk: int,
        device: torch.device | str,
        dtype: torch.dtype,
        static: bool = False,
    ) -> None:
        if batch_size < 1 or max_positions < 1 or prefill_chunk < 1:
            raise GenerationError(
                f"a KV cache needs batch_size, max_positions and prefill_chunk >= 1, got "
                f"{batch_size}, {max_positions}, {prefill_chunk}"
            )
        self.window = config.sliding_window
        self.size = cache_size(config, max_positions, prefill_chunk)
        self.prefill_chunk = prefill_chunk
        # A rolling buffer reuses slots; a plain one must not overflow. A rolling buffer smaller than the
        # window (a short generation) never wraps either: it then behaves exactly like a plain one.
        self.wraps = self.window is not None and self.size < max_positions
        self.static = static
        shape = (batch_size, config.num_key_value_heads, self.size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slot_positions = torch.full((batch_size, self.size), -1, dtype=torch.long, device=device)
        self._slots: torch.Tensor | None = None  # (B, T): where this forward's keys go
        self._filled = self.size if static else 0  # slots attention sees, from the front

    @property
    def batch_size(self) -> int:
        return self.slot_positions.shape[0]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A view of rows lo..hi-1 sharing this cache's memory (a batch that uses only some rows)."""
        view = object.__new__(KVCache)
        view.window, view.size, view.prefill_chunk = self.window, self.size, self.prefill_chunk
        view.wraps, view.static = self.wraps, self.static
        view.k = [k[lo:hi] for k in self.k]  # per layer (B, Hkv, S, D) -> (hi-lo, Hkv, S, D)
        view.v = [v[lo:hi] for v in self.v]
        view.slot_positions = self.slot_positions[lo:hi]  # (B, S) -> (hi-lo, S)
        view._slots = None
        view._filled = self.size if self.static else 0
        return view

    def row(self, b: int) -> "KVCache":
        """A one-row view sharing this cache's memory: prefill a single prompt into row b."""
        return self.rows(b, b + 1)

    def clear(self, b: int | None = None) -> None:
        """Forget everything (or row b): its slots become empty; the memory is reused."""
        if b is None:
            self.slot_positions.fill_(-1)
            self._filled = self.size if self.static else 0
        else:
            self.slot_positions[b].fill_(-1)

    def check(self, highest: int, chunk: int) -> None:
        """Raise if a forward of `chunk` positions reaching position `highest` does not fit this cache."""
        if self.wraps and chunk > self.prefill_chunk:
            raise GenerationError(
                f"a chunk of {chunk} positions exceeds the cache's prefill chunk of {self.prefill_chunk}"
            )
        if not self.wraps and highest >= self.size:
            raise GenerationError(f"position {highest} is past the cache's {self.size} positions (context full)")

    def attention_context(self, positions: torch.Tensor, window: int | None, backend: str) -> AttentionContext:
        """What the model's attention sees this forward: every slot of the buffer, masked by position."""
        return AttentionContext.build(positions, self.prepare(positions), window, backend)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        """Record where the keys of `positions` [B, T] go; return the positions of the slots attention
        sees [B, S] after the write.

        Called once per forward (by `attention_context`), before the layers run; `update` then writes each layer.
        """
        if not self.static:
            highest = int(positions.max())  # one host sync; static mode leaves the check to the caller
            self.check(highest, positions.shape[1])
            self._filled = max(self._filled, min(highest + 1, self.size))
        slots = positions % self.size  # (B, T)
        self._slots = slots
        self.slot_positions.scatter_(1, slots, positions)
        return self.slot_positions[:, : self._filled]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values [B, Hkv, T, D] of `layer`; return the buffer [B, Hkv, S, D]."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        slots = self._slots
        if slots.shape[0] == 1:
            k_buf.index_copy_(2, slots[0], k.to(k_buf.dtype))
            v_buf.index_copy_(2, slots[0], v.to(v_buf.dtype))
        else:
            rows = torch.arange(slots.shape[0], device=slots.device)[:, None]  # (B, 1)
            # buf[rows, :, slots] addresses (B, T, Hkv, D); k is (B, Hkv, T, D) -> (B, T, Hkv, D)
            k_buf[rows, :, slots] = k.transpose(1, 2).to(k_buf.dtype)
            v_buf[rows, :, slots] = v.transpose(1, 2).to(v_buf.dtype)
        n = self._filled
        return k_buf[:, :, :n], v_buf[:, :, :n]
