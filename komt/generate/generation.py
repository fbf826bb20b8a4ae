"""The decoding loop: prefill the prompt into a KV cache, then one token per step.

    prompt ids -> prefill (one forward, or chunks of at most W for long prompts with a sliding window)
               -> logits of the last position -> sample -> decode_step -> sample -> ... until
                  EOS, a stop string, or max_new_tokens.

`prefill`, `decode_step` and `sample` are separate top-level functions (gpt-fast's layout) so each can be
read, timed and compiled on its own. `stream_generate` yields ids as they come; `generate` collects them;
`generate_batch` runs several prompts of different lengths together; `stream_text` adds the streaming
detokenizer and stop strings.

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
from komt.generate.sampling import SamplingParams, sample

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
    silent cut: the CLI and the server apply the same rule); return max_new_tokens."""
    if len(prompt_ids) == 0:
        raise GenerationError("the prompt is empty")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.config.vocab_size
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
    context = model.config.max_position_embeddings
    if len(prompt_ids) >= context:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    if len(prompt_ids) + max_new_tokens > context:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens and max_new_tokens is {max_new_tokens}: "
                              f"together past the model's context of {context}; use max_new_tokens "
                              f"{context - len(prompt_ids)} or less")
    return max_new_tokens


def _stop_ids(eos_id: int | Iterable[int] | None) -> frozenset[int]:
    """The ids that end a generation: none, one, or several."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, (list, tuple, set, frozenset)):
        return frozenset(int(i) for i in eos_id)
    return frozenset([int(eos_id)])


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


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
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    max_new_tokens = _check_request(model, prompt_ids, max_new_tokens)
    if max_new_tokens == 0:
        return
    stop_ids = _stop_ids(eos_id)
    device, _ = _model_device_dtype(model)
    stats = stats if stats is not None else GenerationStats()
    stats.start, stats.prompt_tokens = time.perf_counter(), len(prompt_ids)
    generator = _make_generator(device, seed)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[0, ids[0]] = True
    static = compile_mode is not None
    cache = new_cache(model, 1, len(prompt_ids), max_new_tokens, static=static)
    step = decode_step
    try:
        logits = prefill(model, cache, ids)
        position = len(prompt_ids)
        for i in range(max_new_tokens):
            token = sample(logits, params, generator, seen)  # (1,)
            token_id = int(token)
            if i == 0:
                stats.first_token_at = time.perf_counter()
            if token_id in stop_ids:
                break
            stats.new_tokens += 1
            if token_logprobs is not None:
                token_logprobs.append(float(logits[0].float().log_softmax(-1)[token_id]))
            yield token_id
            if i == max_new_tokens - 1:
                break
            if seen is not None:
                seen[0, token_id] = True
            compiling = static and i == 0
            if compiling:  # set up here, after the first token: importing torch.compile takes ~1 s
                step_start = time.perf_counter()
                step = compiled_decode_step(compile_mode)
                if compile_mode in CUDA_GRAPH_MODES:
                    mark_static(cache)
            with torch.inference_mode():
                logits = step(model, cache, token, torch.tensor([position], device=device))
            if compiling:
                stats.first_step_s = time.perf_counter() - step_start
            position += 1
    finally:  # also when the consumer stops early (a stop string) and closes this generator
        stats.end = time.perf_counter()


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
) -> list[list[int]]:
    """Generate for several prompts of different lengths at once; row b equals a solo generation greedily.

    Each prompt is prefilled into its own cache row (so no padding enters the math), then all rows
    decode together, each at its own position; a row that reached EOS idles until all are done.
    `stats` counts all rows' tokens; its first token comes once every prompt is prefilled.
    """
    if not prompts:
        return []
    stop_ids = _stop_ids(eos_id)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    limits = [_check_request(model, p, max_new_tokens) for p in prompts]
    max_new = max(limits)
    device, _ = _model_device_dtype(model)
    B, V = len(prompts), model.config.vocab_size
    stats = stats if stats is not None else GenerationStats()
    stats.start, stats.prompt_tokens = time.perf_counter(), sum(len(p) for p in prompts)
    generator = _make_generator(device, seed)
    cache = new_cache(model, B, max(len(p) for p in prompts), max_new)
    seen = torch.zeros(B, V, dtype=torch.bool, device=device) if repetition_penalty != 1.0 else None
    last_logits = []
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        last_logits.append(prefill(model, cache.row(b), ids))
        if seen is not None:
            seen[b, ids[0]] = True
    logits = torch.cat(last_logits)  # (B, V)
    positions = torch.tensor([len(p) for p in prompts], device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [limit == 0 for limit in limits]
    for i in range(max_new):
        tokens = sample(logits, params, generator, seen)  # (B,)
        if i == 0:
            stats.first_token_at = time.perf_counter()
        for b, token_id in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if token_id in stop_ids:
                done[b] = True
                continue
            outputs[b].append(token_id)
            stats.new_tokens += 1
            done[b] = len(outputs[b]) >= limits[b]
        if all(done):
            break
        if seen is not None:
            seen[torch.arange(B, device=device), tokens] = True
        logits = decode_step(model, cache, tokens, positions)
        positions = positions + 1
    stats.end = time.perf_counter()
    return outputs


def stream_text(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    stop: Iterable[str] = (),
    stats: GenerationStats | None = None,
    **sampling,
) -> Iterator[str]:
    """Yield text pieces as soon as they are final, ending at EOS, a stop string (not emitted) or the limit."""
    from komt.generate.stream import StopMatcher, StreamDecoder

    decoder = StreamDecoder(tokenizer)
    matcher = StopMatcher(stop)
    sampling.setdefault("eos_id", tokenizer.stop_ids)
    for token_id in stream_generate(model, prompt_ids, stats=stats, **sampling):
        text, stopped = matcher.push(decoder.push(token_id))
        if text:
            yield text
        if stopped:
            return
    text, stopped = matcher.push(decoder.flush())
    if text:
        yield text
    if not stopped:
        tail = matcher.flush()
        if tail:
            yield tail
