"""Continuous batching: one thread owns the model and a KV cache of `max_batch` rows; requests join the
running batch between decode steps and leave it the moment they finish (iteration-level scheduling, as in
Orca, Yu et al. 2022, and vLLM's engine loop).

    HTTP handlers --submit()--> waiting queue (QueueFull beyond max_batch running + max_queue waiting)
    engine thread, forever:
        admit   for each waiting request and free row b: clear row b, prefill the prompt into
                cache.row(b), sample its first token: the request has joined the batch
        decode  one forward over rows 0..hi-1 (hi = highest busy row + 1), every row at its own position;
                each busy row samples with its own SamplingParams and torch.Generator
        retire  a row whose request met EOS, a stop string, max_tokens or its deadline, or whose client
                left, is freed at once for the next waiting request

A free row below hi rides along in the decode forward (token 0 at position 0, written into its own row and
never read): cheaper than compacting the cache, and admission takes the lowest free row so busy rows stay
packed at the front.

Why batching cannot change greedy tokens: each row has its own positions, cache slots and visibility mask;
rows share only the weight GEMMs, which compute each row from that row alone. tests/test_serve.py checks
greedy and seeded outputs under concurrency against `komt.generate.generate`.

Events go back to each request through its `deliver` callable (the HTTP layer passes one that hops onto
its event loop): text pieces as soon as they are final, then exactly one `Finished` or `Failed`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from komt.errors import GenerationError, KomtError
from komt.generate.cache import KVCache
from komt.generate.generation import decode_step, prefill
from komt.generate.sampling import SamplingParams, sample
from komt.generate.stream import StopMatcher, StreamDecoder
from komt.serve.metrics import ServerMetrics

log = logging.getLogger("komt.serve")


class QueueFull(KomtError):
    """Every batch row is busy and the waiting queue is full (HTTP 429)."""


@dataclass(frozen=True)
class Finished:
    """The last event of a generation that ran to its end."""

    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The last event of a generation that could not finish."""

    reason: str  # "timeout", "error", "shutdown" or "cancelled"
    message: str


Event = str | Finished | Failed  # a text piece, or the end


class Job:
    """One generation as the engine sees it: the request, its decoding state, and its way back."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        generator: torch.Generator,
        decoder: StreamDecoder,
        matcher: StopMatcher,
        eos_id: int,
        deadline: float | None,
        deliver: Callable[[Event], None],
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.params = params
        self.generator = generator
        self.decoder, self.matcher = decoder, matcher
        self.eos_id = eos_id
        self.deadline = deadline
        self.deliver = deliver
        self.arrived = time.perf_counter()
        self.seen: torch.Tensor | None = None  # (1, V) tokens so far, for the repetition penalty
        self.row: int | None = None
        self.position = 0  # where the last sampled token goes in the next decode step
        self.last_token = 0
        self.completion_tokens = 0
        self.last_token_at: float | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request (its client left); it frees the row before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class Engine:
    """The batching loop over one model (see module docstring). `start()` it, `submit()` to it, `stop()` it."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise GenerationError(f"need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1; got "
                                  f"{max_batch}, {max_queue}, {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or ServerMetrics()
        config = model.config
        self.context = config.max_position_embeddings
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        if config.sliding_window is not None:
            prefill_chunk = min(prefill_chunk, config.sliding_window)
        # A rolling buffer of W + chunk - 1 slots per row with a window, the whole context without one.
        self.cache = KVCache(config, max_batch, self.context, prefill_chunk, self.device, weight.dtype)
        self._rows: list[Job | None] = [None] * max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._in_flight = 0  # submitted and not yet finished: running + waiting
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
    ) -> Job:
        """Queue a generation; its events arrive through `deliver` (called from the engine thread)."""
        if not prompt_ids or max_tokens < 1 or len(prompt_ids) + max_tokens > self.context:
            raise GenerationError(f"a prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} must fit "
                                  f"the context of {self.context} tokens")
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        deadline = time.perf_counter() + timeout if timeout is not None else None
        job = Job(prompt_ids, max_tokens, params, generator, StreamDecoder(self.tokenizer), StopMatcher(stop),
                  self.tokenizer.eos_id, deadline, deliver)
        if params.repetition_penalty != 1.0:
            job.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            job.seen[0, job.prompt_ids] = True
        with self._cond:
            if self._stopping or self._thread is None:
                raise GenerationError("the engine is not running")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {self._in_flight} requests in flight (max batch {self.max_batch} "
                                f"+ max queue {self.max_queue}); retry later")
            self._in_flight += 1
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
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
                while not self._stopping and not self._waiting and not self._busy():
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
            try:
                for job in admitted:
                    self._admit(job)
                self._retire_lost()
                if self._busy():
                    self._decode()
            except Exception as err:  # a bug here must not strand every client: fail the running batch, go on
                log.exception("engine step failed")
                for job in self._busy():
                    self._end(job, Failed("error", f"engine step failed: {err}"))
            self._set_gauges()
        with self._cond:
            leftover = list(self._waiting) + self._busy()
            self._waiting.clear()
        for job in leftover:
            self._end(job, Failed("shutdown", "the server is shutting down"))
        self._set_gauges()

    def _busy(self) -> list[Job]:
        return [job for job in self._rows if job is not None]

    def _take_admissible(self) -> list[Job]:
        """Pop waiting jobs for the free rows (called under the lock); drop the cancelled and expired ones."""
        now, free, taken, keep = time.perf_counter(), self._rows.count(None), [], collections.deque()
        for job in self._waiting:
            if job.cancelled or job.expired(now):
                taken.append(job)  # _admit ends it without touching the model
            elif free:
                free -= 1
                taken.append(job)
            else:
                keep.append(job)
        self._waiting = keep
        self.metrics.queue_depth.set(len(keep))
        return taken

    def _admit(self, job: Job) -> None:
        """Prefill the job's prompt into the lowest free row and sample its first token."""
        if job.cancelled:
            return self._end(job, Failed("cancelled", "the client disconnected"))
        if job.expired(time.perf_counter()):
            return self._end(job, Failed("timeout", "the request timed out waiting for a free batch row"))
        b = self._rows.index(None)
        self._rows[b], job.row, job.position = job, b, len(job.prompt_ids)
        self.cache.clear(b)
        try:
            ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
            logits = prefill(self.model, self.cache.row(b), ids)  # (1, V)
            token = int(sample(logits, job.params, job.generator, job.seen))
        except Exception as err:  # a failing forward (e.g. out of memory) ends this request, not the server
            log.exception("prefill failed")
            return self._end(job, Failed("error", f"prefill failed: {err}"))
        self.metrics.prompt_tokens.inc(amount=len(job.prompt_ids))
        self._accept_or_fail(job, token)

    def _retire_lost(self) -> None:
        """Free the rows of requests whose client left or whose deadline passed."""
        now = time.perf_counter()
        for job in self._busy():
            if job.cancelled:
                self._end(job, Failed("cancelled", "the client disconnected"))
            elif job.expired(now):
                self._end(job, Failed("timeout", f"the request timed out after {job.completion_tokens} tokens"))

    def _decode(self) -> None:
        """One batched decode step over rows 0..hi-1; each busy row samples its next token."""
        busy = [b for b, job in enumerate(self._rows) if job is not None]
        hi = busy[-1] + 1
        tokens, positions = [0] * hi, [0] * hi  # free rows: token 0 at position 0, in their own row
        for b in busy:
            tokens[b], positions[b] = self._rows[b].last_token, self._rows[b].position
        try:
            logits = decode_step(
                self.model,
                self.cache.rows(0, hi),
                torch.tensor(tokens, dtype=torch.long, device=self.device),  # (hi,)
                torch.tensor(positions, dtype=torch.long, device=self.device),  # (hi,)
            )  # (hi, V)
            sampled = torch.cat([
                sample(logits[b : b + 1], job.params, job.generator, job.seen)
                for b, job in ((b, self._rows[b]) for b in busy)
            ]).tolist()  # one device sync per step
        except Exception as err:
            log.exception("decode step failed")
            for b in busy:
                self._end(self._rows[b], Failed("error", f"decode failed: {err}"))
            return
        self.metrics.decode_batch_size.observe(len(busy))
        for b, token in zip(busy, sampled):
            job = self._rows[b]
            job.position += 1
            self._accept_or_fail(job, token)

    def _accept_or_fail(self, job: Job, token: int) -> None:
        try:
            self._accept(job, token)
        except Exception as err:  # e.g. a sampled id past the tokenizer's vocabulary (a padded lm_head)
            log.exception("handling a sampled token failed")
            self._end(job, Failed("error", f"cannot decode token {token}: {err}"))

    def _accept(self, job: Job, token: int) -> None:
        """Record one sampled token: stream its text, and end the job at EOS, a stop string or max_tokens."""
        now = time.perf_counter()
        if job.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - job.arrived)
        else:
            self.metrics.time_per_token.observe(now - job.last_token_at)
        job.last_token_at, job.last_token = now, token
        if token == job.eos_id:
            self._send(job, self._flush(job))
            return self._end(job, Finished("stop", len(job.prompt_ids), job.completion_tokens))
        job.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        if job.seen is not None:
            job.seen[0, token] = True
        text, stopped = job.matcher.push(job.decoder.push(token))
        if stopped:
            self._send(job, text)
            return self._end(job, Finished("stop", len(job.prompt_ids), job.completion_tokens))
        if job.completion_tokens >= job.max_tokens:
            self._send(job, text + self._flush(job))
            return self._end(job, Finished("length", len(job.prompt_ids), job.completion_tokens))
        self._send(job, text)

    @staticmethod
    def _flush(job: Job) -> str:
        """Text still held by the decoder (an unfinished character) and the stop matcher, at the end."""
        text, stopped = job.matcher.push(job.decoder.flush())
        return text if stopped else text + job.matcher.flush()

    def _send(self, job: Job, event: Event) -> None:
        if event == "":
            return
        try:
            job.deliver(event)
        except Exception:  # noqa: BLE001 - whatever `deliver` raised, the client's loop is gone: nobody listens
            job.cancel()

    def _end(self, job: Job, event: Finished | Failed) -> None:
        """Free the job's row and deliver its last event."""
        if job.row is not None and self._rows[job.row] is job:
            self._rows[job.row] = None
            self.cache.clear(job.row)
        self.metrics.finished.inc(event.reason)
        with self._cond:
            self._in_flight -= 1
        self._send(job, event)

    def _set_gauges(self) -> None:
        with self._cond:
            self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._busy()))
