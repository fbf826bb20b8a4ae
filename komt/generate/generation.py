"""The decoding loop: prefill the prompt into a KV cache, then one token per step.

    prompt ids -> prefill (one forward, or chunks of at most W for long prompts with a sliding window)
               -> logits of the last position -> sample -> decode_step -> sample -> ... until
                  EOS, a stop string, or max_new_tokens.

`prefill`, `decode_step` and `sample` are separate top-level functions (gpt-fast's layout) so each can be
read, timed and compiled on its own. One loop (`_decode`) drives one row or a batch, and what happens per
token (sampling, the repetition penalty's memory, detokenizing, stop strings, the finish reason) is the
request's `DecodingState` (komt.generate.decoding), the same one the server's engine uses.
`stream_generate` yields ids as they come; `generate` collects them; `generate_batch` runs several prompts
of different lengths together; `stream_text` yields text instead of ids.

`compile_mode` (e.g. "default", or "reduce-overhead" for CUDA graphs) runs each decode step through
`torch.compile` over a static cache (see komt.generate.cache): same tokens, fewer kernel launches. Prefill
stays eager: its shapes change with every prompt.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from komt.errors import GenerationError
from komt.generate.cache import KVCache
from komt.generate.context_length import check_context_length
from komt.generate.decoding import DecodingState, sample_next
from komt.generate.sampling import SamplingParams

# A static cache is sized in buckets so that a compiled decode step (whose shapes include the cache's)
# is reused across prompts of different lengths instead of recompiled for each. Powers of two from 256:
# a short answer attends over at most twice the slots it fills, and the whole 32k context needs only
# eight sizes (torch.compile recompiles a function at most 8 times before falling back to eager).
STATIC_CACHE_MIN_BUCKET = 256
# torch.compile modes that capture CUDA graphs (on a CUDA device).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class GenerationStats:
    """Timings of one generation, for the CLI's stats line and the benchmark."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    end: float | None = None
    # A compiled generation's first decode step, which compiles it (or finds it compiled): kept out of
    # the decode speed, so that the line shows the speed of the steps after it.
    first_step_s: float | None = None

    @property
    def time_to_first_token(self) -> float:
        return (self.first_token_at or self.start) - self.start

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.time_to_first_token, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, over the time after the first (the first comes from prefill)."""
        if self.end is None or self.first_token_at is None:
            return 0.0
        steps, elapsed = self.new_tokens - 1, self.end - self.first_token_at
        if self.first_step_s is not None:
            steps, elapsed = steps - 1, elapsed - self.first_step_s
        return steps / max(elapsed, 1e-9) if steps >= 1 else 0.0

    def summary(self) -> str:
        """One line for humans: prompt and new tokens, time to first token, prefill and decode speed."""
        return (f"prompt {self.prompt_tokens} tokens, {self.new_tokens} new tokens, "
                f"first token {self.time_to_first_token:.3f} s, prefill {self.prefill_tokens_per_s:.1f} tok/s, "
                f"decode {self.decode_tokens_per_s:.1f} tok/s"
                + (f", compiling {self.first_step_s:.1f} s" if (self.first_step_s or 0) >= 0.1 else ""))


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    weight = model.model.embed_tokens.weight
    return weight.device, weight.dtype


def new_cache(model, batch_size: int, prompt_len: int, max_new_tokens: int, static: bool = False) -> KVCache:
    """A cache sized for this generation: prompt + new tokens, or a rolling buffer of the window.

    A static cache (for a compiled decode step) prefills in chunks of the whole window and rounds its
    length up to a bucket, so its shape, and the compiled step, stay the same from prompt to prompt.
    """
    config = model.config
    window, context = config.sliding_window, config.max_position_embeddings
    max_positions = prompt_len + max_new_tokens
    if static:
        max_positions = min(max(STATIC_CACHE_MIN_BUCKET, 1 << (max_positions - 1).bit_length()), context)
        chunk = max_positions if window is None else window
    else:
        chunk = prompt_len if window is None else min(window, prompt_len)
    device, dtype = _model_device_dtype(model)
    return KVCache(config, batch_size, max_positions, max(chunk, 1), device, dtype, static=static)


@torch.inference_mode()
def prefill(model, cache: KVCache, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run prompt ids [B, T] (positions start..start+T-1) through the model, filling the cache.

    Long prompts with a sliding window go in chunks of the cache's prefill chunk (at most W), so the
    rolling buffer never drops a key that the chunk still needs. Returns the last position's logits [B, V].
    """
    B, T = ids.shape
    chunk = cache.prefill_chunk if cache.wraps else T
    logits = None
    for lo in range(0, T, chunk):
        part = ids[:, lo : lo + chunk]
        if cache.static:  # a static cache does not read positions back to the host: check them here
            cache.check(start + lo + part.shape[1] - 1, part.shape[1])
        positions = torch.arange(start + lo, start + lo + part.shape[1], device=ids.device).expand(B, -1)
        logits = model(part, positions=positions, cache=cache, last_only=True)
    return logits[:, -1]


def _decode_logits(model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model(tokens[:, None], positions=positions[:, None], cache=cache)[:, -1]


@torch.inference_mode()
def decode_step(model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One new token per row: tokens [B], positions [B] -> next-token logits [B, V]."""
    return _decode_logits(model, cache, tokens, positions)


@functools.lru_cache(maxsize=None)
def compiled_decode_step(mode: str = "default") -> Callable[..., torch.Tensor]:
    """`decode_step` under `torch.compile`, for a static cache (one compiled step per mode).

    "reduce-overhead" and "max-autotune" replay the step as a CUDA graph; the cache buffers must then have
    fixed addresses (`mark_static`). Those modes also turn on Inductor's coordinate-descent tuning (as
    gpt-fast does), passed per compile rather than set globally: it retunes the block sizes of the
    matrix-vector kernels a batch-1 decode is made of. Call the result inside `torch.inference_mode()`.
    """
    if mode == "default":
        return torch.compile(_decode_logits, dynamic=False)
    if mode not in CUDA_GRAPH_MODES:
        raise GenerationError(f"unknown compile mode {mode!r}; use default, {' or '.join(CUDA_GRAPH_MODES)}")
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "max_autotune": mode == "max-autotune"}
    compiled = torch.compile(_decode_logits, dynamic=False, options=options)

    def step(model, cache, tokens, positions):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed: reuse them
        return compiled(model, cache, tokens, positions)

    return step


def mark_static(cache: KVCache) -> None:
    """Tell torch.compile the cache buffers keep their addresses (required to capture CUDA graphs)."""
    for buffer in (*cache.k, *cache.v, cache.slot_positions):
        torch._dynamo.mark_static_address(buffer)


def _check_request(model, prompt_ids: Sequence[int], max_new_tokens: int) -> int:
    """Validate a prompt and its max_new_tokens, which must fit the context together (an error, not a
    silent cut: komt.generate.context_length, the CLI's and the server's rule too); return max_new_tokens."""
    if len(prompt_ids) == 0:
        raise GenerationError("the prompt is empty")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.config.vocab_size
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
    check_context_length(len(prompt_ids), max_new_tokens, model.config.max_position_embeddings)
    return max_new_tokens


def _states(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, tokenizer=None, stop=(),
            logprobs: int | None = None, seed: int | None = None, eos_id: int | Iterable[int] | None = None,
            **sampling) -> list[DecodingState]:
    """One decoding state per prompt, all with the same settings (validated here, before any forward).

    Rows of a batch share one seed: row b's generator is seeded with seed + b (the server's rule for the
    n choices of one request), so row 0 samples as a solo generation with the same seed.
    """
    params = SamplingParams(**sampling)
    limits = [_check_request(model, p, max_new_tokens) for p in prompts]
    device, _ = _model_device_dtype(model)
    return [DecodingState(p, max_new_tokens=limit, vocab_size=model.config.vocab_size, device=device, params=params,
                          seed=None if seed is None else seed + b, eos_id=eos_id, tokenizer=tokenizer, stop=stop,
                          logprobs=logprobs)
            for b, (p, limit) in enumerate(zip(prompts, limits))]


def _decode(model, states: list[DecodingState], stats: GenerationStats,
            compile_mode: str | None = None) -> Iterator[tuple[int, int | None, str]]:
    """The decoding loop over a contiguous cache, for one row or several: yields (row, token, text) for each
    accepted token (token None for the EOS that ended a row, whose text is what its decoder still held).

    Each prompt is prefilled into its own cache row (so no padding enters the math), then all rows decode
    together, each at its own position; a finished row idles until all are done. `compile_mode` compiles
    the decode step over a static cache (module docstring), for a batch as for one row.
    """
    device, _ = _model_device_dtype(model)
    stats.start, stats.prompt_tokens = time.perf_counter(), sum(len(s.prompt_ids) for s in states)
    try:
        if all(s.finished for s in states):
            return
        static = compile_mode is not None
        max_new = max(s.max_new_tokens for s in states)
        cache = new_cache(model, len(states), max(len(s.prompt_ids) for s in states), max_new, static=static)
        logits = torch.cat([
            prefill(model, cache.row(b) if len(states) > 1 else cache,
                    torch.tensor([s.prompt_ids], dtype=torch.long, device=device))  # (1, T) -> (1, V)
            for b, s in enumerate(states)])  # (B, V)
        positions = torch.tensor([len(s.prompt_ids) for s in states], device=device)  # (B,)
        step = decode_step
        for i in range(max_new):
            tokens, logprobs = sample_next(logits, states)
            if i == 0:
                stats.first_token_at = time.perf_counter()
            for b, state in enumerate(states):
                if state.finished:
                    continue
                text = state.accept(tokens[b], logprobs[b])
                kept = not (state.finished and state.finish_reason == "stop" and tokens[b] in state.stop_ids)
                stats.new_tokens += kept
                yield b, tokens[b] if kept else None, text
            if all(s.finished for s in states):
                break
            compiling = static and i == 0
            if compiling:  # set up here, after the first token: importing torch.compile takes ~1 s
                step_start = time.perf_counter()
                step = compiled_decode_step(compile_mode)
                if compile_mode in CUDA_GRAPH_MODES:
                    mark_static(cache)
            with torch.inference_mode():
                logits = step(model, cache, torch.tensor(tokens, device=device), positions)
            if compiling:
                stats.first_step_s = time.perf_counter() - step_start
            positions = positions + 1
    finally:  # also when the consumer stops early (a stop string) and closes this generator
        stats.end = time.perf_counter()


def stream_generate(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_id: int | Iterable[int] | None = None,
    stats: GenerationStats | None = None,
    token_logprobs: list[float] | None = None,
    compile_mode: str | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one (EOS is not yielded; generation ends there).

    `eos_id` is one id or several (a tokenizer's `stop_ids`: Llama-3-Instruct ends a turn with <|eot_id|>).

    `token_logprobs`, if given, receives the model's log-probability of each yielded token (before any
    sampling filter: what rescoring the output with a full forward gives). `compile_mode` compiles the
    decode step (see module docstring).
    """
    (state,) = _states(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed, eos_id=eos_id,
                       logprobs=None if token_logprobs is None else 0)
    stats = stats if stats is not None else GenerationStats()
    for _, token, _ in _decode(model, [state], stats, compile_mode):
        if token is not None:
            if token_logprobs is not None:
                token_logprobs.append(state.logprobs[-1].logprob)
            yield token


def generate(model, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The new token ids of one generation (see `stream_generate` for the arguments)."""
    return list(stream_generate(model, prompt_ids, **kwargs))


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_id: int | Iterable[int] | None = None,
    stats: GenerationStats | None = None,
    compile_mode: str | None = None,
) -> list[list[int]]:
    """Generate for several prompts of different lengths at once; row b equals a solo generation (greedy, or
    seeded with seed + b).

    `stats` counts all rows' tokens; its first token comes once every prompt is prefilled. `compile_mode`
    compiles the batched decode step as it does the solo one.
    """
    if not prompts:
        return []
    states = _states(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty, seed=seed, eos_id=eos_id)
    for _ in _decode(model, states, stats if stats is not None else GenerationStats(), compile_mode):
        pass
    return [s.output_ids for s in states]


def stream_text(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    stop: Iterable[str] = (),
    stats: GenerationStats | None = None,
    max_new_tokens: int = 256,
    compile_mode: str | None = None,
    **sampling,
) -> Iterator[str]:
    """Yield text pieces as soon as they are final, ending at EOS, a stop string (not emitted) or the limit."""
    sampling.setdefault("eos_id", tokenizer.stop_ids)
    (state,) = _states(model, [prompt_ids], max_new_tokens, tokenizer=tokenizer, stop=stop, **sampling)
    for _, _, text in _decode(model, [state], stats if stats is not None else GenerationStats(), compile_mode):
        if text:
            yield text
