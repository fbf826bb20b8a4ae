"""Continuous batching: one thread owns the model, a scheduler and a runner; HTTP only submits, cancels,
and receives events.

    HTTP handlers --submit()--> inbox (QueueFull beyond max_batch running + max_queue waiting)
    engine thread, each step:
        new requests join the scheduler; cancelled and expired ones leave it
        scheduler.schedule()   who prefills (a chunk) and who decodes, under the token budget
        runner.run(step)       one forward over the scheduled tokens, one batched sampling call
        scheduler.advance()    those tokens are in the KV cache; full blocks join the prefix cache
        each sampled token -> its request's DecodingState -> a Delta event; a finished request frees its blocks

Three small parts with one job each (nano-vllm's split): `Scheduler` (komt.serve.scheduler) decides,
`Runner` (komt.serve.runner) computes, `BlockManager` (komt.serve.blocks) owns the paged KV cache's
blocks and the prefix cache. This module is the loop between them and the way back to the clients.

Why batching cannot change greedy tokens: each request has its own positions and blocks, and attention
masks every other request out; requests share only the weight GEMMs, which compute each row from that
row alone. tests/test_serve.py checks greedy and seeded outputs under concurrency against `generate`.

A request asking for n choices is n requests seeded seed, seed + 1, ... (mod 2^64); the later ones wait
until the first has prefilled the prompt, then take its blocks from the prefix cache. Events go back
through the submission's `deliver` callable (the HTTP layer passes one that hops onto its event loop):
Delta pieces as soon as text is final, then exactly one Finished or Failed per choice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from komt.errors import ConfigError, GenerationError, KomtError
from komt.generate.context_length import check_context_length
from komt.generate.decoding import DecodingState, TokenLogprob
from komt.generate.paged_cache import PagedKVCache
from komt.generate.sampling import SamplingParams
from komt.serve.blocks import BlockManager
from komt.serve.budget import kv_cache_blocks, request_blocks
from komt.serve.metrics import ServerMetrics
from komt.serve.runner import Runner
from komt.serve.scheduler import Request, Scheduler

log = logging.getLogger("komt.serve")

# Tokens per step. Small on the CPU, where a step's prefill chunk costs about its length in compute and
# every running stream waits for it; on a GPU a chunk of 2048 (vLLM's default) shares the weight reads.
# Measured on the 2-core VM, SmolLM2-135M, 4 streams decoding while 4 prompts of 2,000 tokens arrive
# (docs/benchmarks.md): streams' p99 token gap 3.96x / 7.71x / 11.5x their median with 32 / 64 / 128 tokens
# a step; the long prompts' median time to first token 21.7 / 18.6 / 14.0 s. Smooth streams win by default.
DEFAULT_BATCHED_TOKENS = {"cuda": 2048, "cpu": 32}


class QueueFull(KomtError):
    """Every batch row is busy and the waiting queue is full (HTTP 429)."""


@dataclass(frozen=True)
class Delta:
    """Text one sampled token made final (may be ""), and that token's log-probabilities when asked for."""

    choice: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of a choice that ran to its end."""

    choice: int
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass(frozen=True)
class Failed:
    """The last event of a choice that could not finish."""

    choice: int
    reason: str  # "timeout", "error", "shutdown" or "cancelled"
    message: str


Event = Delta | Finished | Failed


class Job:
    """One submission as the HTTP side holds it: its n requests, and its way back."""

    def __init__(self, deliver: Callable[[Event], None], deadline: float | None) -> None:
        self.deliver = deliver
        self.deadline = deadline
        self.requests: list[Request] = []
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this submission (its client left); its blocks are freed before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class Engine:
    """The batching loop over one model (module docstring). `start()` it, `submit()` to it, `stop()` it.

    max_batch: requests running at once; max_queue: requests waiting beyond those; max_num_batched_tokens:
    tokens per step (default 2048 on CUDA, 32 on the CPU); block_size: tokens per KV block;
    kv_cache_tokens / kv_cache_fraction: the cache budget (komt.serve.budget); max_model_len: the longest
    prompt + answer served (default: the model's context); compile_mode: compile the decode step.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        kv_cache_fraction: float | None = None,
        max_model_len: int | None = None,
        prefix_caching: bool = True,
        compile_mode: str | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        config = model.config
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        context = config.max_position_embeddings
        self.context = context if max_model_len is None else max_model_len
        chunk = max_num_batched_tokens or DEFAULT_BATCHED_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]
        if max_batch < 1 or max_queue < 0 or block_size < 1 or not 1 <= self.context <= context:
            raise ConfigError(f"need --max-batch >= 1, --max-queue >= 0, --block-size >= 1 and --max-model-len in "
                              f"[1, {context}]; got {max_batch}, {max_queue}, {block_size}, {self.context}")
        if chunk < max_batch:
            raise ConfigError(f"--max-num-batched-tokens {chunk} must be >= --max-batch {max_batch} "
                              "(every running request decodes a token each step)")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.block_size, self.chunk = max_batch, max_queue, block_size, chunk
        self.metrics = metrics or ServerMetrics()
        n_blocks = kv_cache_blocks(config, weight.dtype, self.device, block_size=block_size,
                                   max_model_len=self.context, max_batch=max_batch, chunk=chunk,
                                   tokens=kv_cache_tokens, fraction=kv_cache_fraction)
        if getattr(model, "kernels", "torch") == "triton" and max_batch * 2 * (self.context + 1) >= 2**31:
            # the packed layout's shifted positions (komt.generate.paged_cache) are int32 in the Triton kernels
            raise ConfigError(f"--max-batch {max_batch} x --max-model-len {self.context} is too large for the Triton "
                              "kernels' int32 positions; lower either")
        self.cache = PagedKVCache(config, n_blocks, block_size, self.device, weight.dtype)
        self.blocks = BlockManager(n_blocks, block_size, config.sliding_window, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_batch, max_num_batched_tokens=chunk)
        self.runner = Runner(model, self.cache, max_model_len=self.context, compile_mode=compile_mode)
        self._inbox: list[Job] = []
        self._in_flight = 0  # requests submitted and not yet ended: running + waiting
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the HTTP side -------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        params: SamplingParams,
        deliver: Callable[[Event], None],
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
        n: int = 1,
        logprobs: int | None = None,
        cache_salt: str | None = None,
    ) -> Job:
        """Queue a generation of `n` choices; their events arrive through `deliver` (called from the engine thread)."""
        if not prompt_ids or max_tokens < 1 or n < 1:
            raise GenerationError(f"a request needs a prompt, max_tokens >= 1 and n >= 1; got {len(prompt_ids)} "
                                  f"prompt tokens, max_tokens {max_tokens}, n {n}")
        check_context_length(len(prompt_ids), max_tokens, self.context, limit="max_tokens")
        need = request_blocks(len(prompt_ids) + max_tokens, self.block_size, self.model.config.sliding_window,
                              self.chunk)
        if need > self.blocks.capacity:
            raise GenerationError(f"a prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} needs {need} "
                                  f"KV blocks; the cache holds {self.blocks.capacity}: lower max_tokens")
        job = Job(deliver, time.perf_counter() + timeout if timeout is not None else None)
        for i in range(n):
            state = DecodingState(prompt_ids, max_new_tokens=max_tokens, vocab_size=self.model.config.vocab_size,
                                  device=self.device, params=params,
                                  seed=None if seed is None else (seed + i) % 2**64 if seed >= 0 else seed + i,
                                  eos_id=self.tokenizer.stop_ids, tokenizer=self.tokenizer, stop=stop,
                                  logprobs=logprobs)
            leader = job.requests[0] if job.requests else None
            job.requests.append(Request(state, cache_salt=cache_salt, leader=leader, owner=(job, i)))
        with self._cond:
            if self._stopping or self._thread is None:
                raise GenerationError("the engine is not running")
            if self._in_flight + n > self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {self._in_flight} requests in flight (max batch {self.max_batch} "
                                f"+ max queue {self.max_queue}); retry later")
            self._in_flight += n
            self._inbox.append(job)
            self._cond.notify()
        return job

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="komt-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the current step, fail every request still queued or running, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not len(self.scheduler):
                    self._cond.wait()
                if self._stopping:
                    break
                arrived, self._inbox = self._inbox, []
            for job in arrived:
                for request in job.requests:
                    self.scheduler.add(request)
            self._drop_lost()
            try:
                if not self._step():
                    with self._cond:  # nothing could run (waiting for blocks or for a leader): do not spin
                        self._cond.wait(0.005)
            except Exception as err:  # a bug here must not strand every client: fail what runs, go on
                log.exception("engine step failed")
                for request in list(self.scheduler.running):
                    self._end(request, Failed(request.owner[1], "error", f"engine step failed: {err}"))
            self._set_gauges()
        with self._cond:
            leftover = [r for job in self._inbox for r in job.requests]
            self._inbox = []
        for request in leftover + list(self.scheduler.waiting) + list(self.scheduler.running):
            self._end(request, Failed(request.owner[1], "shutdown", "the server is shutting down"))
        self._set_gauges()

    def _step(self) -> bool:
        """Schedule, run, advance, and hand every sampled token to its request; False if nothing was scheduled."""
        step = self.scheduler.schedule()
        for request in step.admitted:
            self.metrics.prompt_tokens.inc(amount=len(request.state.prompt_ids))
            self.metrics.prefix_cache_queries.inc(amount=len(request.state.prompt_ids))
            self.metrics.prefix_cache_hits.inc(amount=request.cached_tokens)
        self.metrics.preemptions.inc(amount=len(step.preempted))
        if not step.scheduled:
            return False
        try:
            sampled = self.runner.run(step)
        except Exception as err:  # a failing forward (e.g. out of memory) ends this step's requests, not the server
            log.exception("forward failed")
            for s in step.scheduled:
                self._end(s.request, Failed(s.request.owner[1], "error", f"forward failed: {err}"))
            return True
        self.scheduler.advance(step)
        self.metrics.scheduled_tokens.observe(step.tokens)
        decoding = sum(1 for s in step.scheduled if s.count == 1 and s.samples)
        if decoding:
            self.metrics.decode_batch_size.observe(decoding)
        for request, token, logprob in sampled:
            try:
                self._accept(request, token, logprob)
            except Exception as err:  # e.g. a sampled id past the tokenizer's vocabulary (a padded lm_head)
                log.exception("handling a sampled token failed")
                self._end(request, Failed(request.owner[1], "error", f"cannot decode token {token}: {err}"))
        return True

    def _drop_lost(self) -> None:
        """End the requests whose client left or whose deadline passed, wherever they are."""
        now = time.perf_counter()
        for request in list(self.scheduler.waiting) + list(self.scheduler.running):
            job, choice = request.owner
            if job.cancelled:
                self._end(request, Failed(choice, "cancelled", "the client disconnected"))
            elif job.expired(now):
                done = len(request.state.output_ids)
                self._end(request, Failed(choice, "timeout", f"the request timed out after {done} tokens"))

    def _accept(self, request: Request, token: int, logprob: TokenLogprob | None) -> None:
        """One sampled token: stream its text, and end the request at EOS, a stop string or max_tokens."""
        job, choice = request.owner
        state = request.state
        now = time.perf_counter()
        if request.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - request.arrived)
        else:
            self.metrics.time_per_token.observe(now - request.last_token_at)
        request.last_token_at = now
        text = state.accept(token, logprob)
        kept = token not in state.stop_ids
        if kept:
            self.metrics.generation_tokens.inc()
        if text or (kept and state.logprobs is not None):
            self._send(job, Delta(choice, text, logprob if kept and state.logprobs is not None else None))
        if state.finished:
            self._end(request, Finished(choice, state.finish_reason, len(state.prompt_ids), len(state.output_ids),
                                        request.cached_tokens or 0))

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.deliver(event)
        except Exception:  # noqa: BLE001 - whatever `deliver` raised, the client's loop is gone: nobody listens
            job.cancel()

    def _end(self, request: Request, event: Finished | Failed) -> None:
        """Free the request's blocks and deliver its last event."""
        self.scheduler.finish(request)
        self.metrics.finished.inc(event.reason)
        with self._cond:
            self._in_flight -= 1
        self._send(request.owner[0], event)

    def _set_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(len(self.scheduler.waiting))
        m.running.set(len(self.scheduler.running))
        m.kv_blocks_used.set(self.blocks.n_used)
        m.kv_blocks_free.set(self.blocks.n_free)
        queries = m.prefix_cache_queries.value()
        m.prefix_cache_hit_rate.set(m.prefix_cache_hits.value() / queries if queries else 0.0)
