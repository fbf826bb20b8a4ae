"""Runs one scheduled step: one forward over every scheduled token, then one batched sampling call.

    Step (komt.serve.scheduler) -> token ids, positions and a PagedBatch (komt.generate.paged_cache)
        -> one model forward (logits only where a request samples) -> sample_next (komt.generate.decoding)

Two shapes of forward, the same model and the same cache underneath:
- a decode step (every scheduled request has one token) runs as rows, B requests x 1 query, each row
  reading only its own blocks. A lone request is then a one-row decode, which on the CPU takes the
  split/fused GEMV layouts. With `compile_mode` this step is compiled: rows are padded to a ladder of
  batch sizes and the key slots to powers of two, so a handful of shapes (and, in "reduce-overhead"
  mode, one CUDA graph each) serve every batch;
- a step with a prefill chunk runs packed: one row with every scheduled token, prefill chunks and decode
  tokens together, so both share one pass over the weights.

The runner decides nothing: who runs, and how many tokens, is the scheduler's; what a token does to its
request is the request's `DecodingState`.
"""

from __future__ import annotations

import functools

import torch

from komt.generate.decoding import TokenLogprob, sample_next
from komt.generate.generation import CUDA_GRAPH_MODES, STATIC_CACHE_MIN_BUCKET
from komt.generate.paged_cache import NULL_BLOCK, PagedBatch, PagedKVCache
from komt.serve.scheduler import Request, Scheduled, Step

BATCH_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # padded batch sizes of a compiled decode step


def _decode_rows(model, batch: PagedBatch, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token per row: tokens [B], positions [B] -> next-token logits [B, V]."""
    return model(tokens[:, None], positions=positions[:, None], cache=batch)[:, -1]


@functools.lru_cache(maxsize=None)
def compiled_decode_rows(mode: str):
    """`_decode_rows` under torch.compile (shapes may vary: the ladder and the slot buckets bound them)."""
    if mode == "default":
        return torch.compile(_decode_rows)
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "max_autotune": mode == "max-autotune"}
    compiled = torch.compile(_decode_rows, options=options)

    def step(model, batch, tokens, positions):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed: reuse them
        return compiled(model, batch, tokens, positions)

    return step


def _bucket(n: int, cap: int) -> int:
    """n rounded up to a power of two (at least STATIC_CACHE_MIN_BUCKET), at most `cap` (but >= n)."""
    return max(n, min(max(STATIC_CACHE_MIN_BUCKET, 1 << (n - 1).bit_length()), cap))


class Runner:
    """Runs steps over `model` and its paged `cache` (module docstring)."""

    def __init__(self, model, cache: PagedKVCache, *, max_model_len: int, compile_mode: str | None = None) -> None:
        self.model, self.cache = model, cache
        self.device = model.model.embed_tokens.weight.device
        self.window = model.config.sliding_window
        # Packed layout: request r's masking coordinates are shifted by r * stride (komt.generate.paged_cache).
        self.stride = 2 * (max_model_len + 1)
        self.mask_window = self.stride // 2 if self.window is None else min(self.window, self.stride // 2)
        self.max_slots = -(-max_model_len // cache.block_size) * cache.block_size
        self.compile_mode = compile_mode
        self._step = _decode_rows
        if compile_mode is not None:
            self._step = compiled_decode_rows(compile_mode)
            if compile_mode in CUDA_GRAPH_MODES:  # the pool keeps its address: never copied into a graph
                for buffer in (*cache.k, *cache.v):
                    torch._dynamo.mark_static_address(buffer)

    def run(self, step: Step) -> list[tuple[Request, int, TokenLogprob | None]]:
        """Run the step's forward and sample for every request it completes: [(request, token, logprob)]."""
        sampling, logits = self.forward(step)
        if not sampling:
            return []
        tokens, logprobs = sample_next(logits, [s.request.state for s in sampling])
        return [(s.request, t, lp) for s, t, lp in zip(sampling, tokens, logprobs)]

    @torch.inference_mode()
    def forward(self, step: Step) -> tuple[list[Scheduled], torch.Tensor]:
        """The step's one forward: the scheduled entries that sample, and their next-token logits [n, V]."""
        scheduled = step.scheduled
        sampling = [s for s in scheduled if s.samples]
        if not sampling:  # nothing reaches its end (a prompt's middle chunks): the forward only fills the cache
            self._packed(scheduled)
            return [], torch.empty(0)
        if all(s.count == 1 for s in scheduled):
            logits = self._rows(scheduled)
            if len(sampling) < len(scheduled):
                logits = logits[[i for i, s in enumerate(scheduled) if s.samples]]
            return sampling, logits
        return sampling, self._packed(scheduled)

    def _rows(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """A decode step: row b = request b's one token, reading its own blocks. Returns logits [B, V]."""
        cache, B = self.cache, len(scheduled)
        rows = [cache.row_slots(s.request.table.blocks, s.start + 1) for s in scheduled]
        S = max(len(slots) for slots, _ in rows)
        B_pad = B
        if self.compile_mode is not None:
            B_pad = next((b for b in BATCH_LADDER if b >= B), B)
            S = _bucket(S, self.max_slots)
        tokens = torch.zeros(B_pad, dtype=torch.long)
        positions = torch.zeros(B_pad, dtype=torch.long)
        write = torch.full((B_pad, 1), NULL_BLOCK * cache.block_size, dtype=torch.long)  # padding rows: the null block
        gather = torch.full((B_pad, S), NULL_BLOCK * cache.block_size, dtype=torch.long)
        key_positions = torch.full((B_pad, S), -1, dtype=torch.long)
        key_positions[B:, 0] = 0  # a padding row sees its own key at position 0: no row without a visible key
        for b, (s, (slots, kpos)) in enumerate(zip(scheduled, rows)):
            tokens[b], positions[b] = s.request.tokens[s.start], s.start
            write[b] = cache.write_slots(s.request.table.blocks, s.start, 1)
            gather[b, : len(slots)], key_positions[b, : len(slots)] = slots, kpos
        to = functools.partial(torch.Tensor.to, device=self.device, non_blocking=True)
        batch = PagedBatch(cache, to(write), to(gather), to(key_positions))
        logits = self._step(self.model, batch, to(tokens), to(positions))  # (B_pad, V)
        return logits[:B]

    def _packed(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """A step with prefill chunks: every scheduled token in one row. Returns logits [n, V] of the n
        requests that sample, in order."""
        cache = self.cache
        ids, positions, write, gather, key_positions, query_offsets, key_offsets, sample_at = ([] for _ in range(8))
        segments = []  # (q_start, q_end, k_start, k_end) of each request in the packed row
        T = S = 0
        for r, s in enumerate(scheduled):
            req, end = s.request, s.start + s.count
            ids.append(torch.tensor(req.tokens[s.start : end], dtype=torch.long))
            positions.append(torch.arange(s.start, end))
            write.append(cache.write_slots(req.table.blocks, s.start, s.count))
            slots, kpos = cache.row_slots(req.table.blocks, end)
            gather.append(slots)
            key_positions.append(kpos)
            query_offsets.append(torch.full((s.count,), r * self.stride))
            key_offsets.append(torch.full((len(slots),), r * self.stride))
            segments.append((T, T + s.count, S, S + len(slots)))
            T, S = T + s.count, S + len(slots)
            if s.samples:
                sample_at.append(T - 1)
        to = functools.partial(torch.Tensor.to, device=self.device, non_blocking=True)
        batch = PagedBatch(cache, to(torch.cat(write))[None], to(torch.cat(gather))[None],
                           to(torch.cat(key_positions))[None], to(torch.cat(query_offsets))[None],
                           to(torch.cat(key_offsets))[None], self.mask_window, tuple(segments))
        logits = self.model(to(torch.cat(ids))[None], positions=to(torch.cat(positions))[None], cache=batch,
                            logits_at=to(torch.tensor(sample_at, dtype=torch.long)))  # (1, n, V)
        return logits[0]
