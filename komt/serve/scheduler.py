"""Who runs this step: each step the scheduler picks which requests prefill (in chunks) and which decode,
under a token budget, the way nano-vllm's `Scheduler.schedule()` and vLLM's V1 scheduler do.

A request is its decoding state plus how far the model has read it: `tokens` (prompt, then every token
sampled so far) and `num_computed` (how many of them the KV cache holds). Prefill and decode are the same
move: schedule the next `n` pending tokens; when they reach the end of `tokens`, the forward's last logits
sample the next token. A decoding request has exactly one pending token (the one it just sampled).

The rule, each step, with a budget of `max_num_batched_tokens` scheduled tokens:

1. every running request that decodes gets its one token, oldest first;
2. running requests still prefilling get the rest of the budget, oldest first, a chunk each;
3. waiting requests are admitted in arrival order while budget, `max_num_seqs` and free blocks last: a
   prefix-cache lookup first (their cached prompt blocks are not recomputed), then their first chunk.

So a running stream never waits for a prompt: a 2,000-token prompt is prefilled a chunk per step beside
the decode tokens, not in one step that stalls them. When a running request needs a block and none is
free, the newest running request not yet scheduled in this step is preempted (possibly itself): its
blocks go back (its full ones stay in the prefix cache) and it goes to the front of the queue, to be
recomputed from its prompt and output so far when blocks free up. Nothing is lost: its decoding state,
generator included, carries on where it was. No request is admitted in a step that preempted.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from komt.generate.decoding import DecodingState
from komt.serve.blocks import BlockManager, BlockTable, salt_key


class Request:
    """A generation as the scheduler sees it (module docstring). `owner` is whatever the engine attaches."""

    def __init__(self, state: DecodingState, *, cache_salt: str | None = None, leader: Request | None = None,
                 owner: Any = None) -> None:
        self.state = state
        self.table = BlockTable(salt=salt_key(cache_salt))
        self.num_computed = 0
        self.leader = leader  # another choice of the same prompt: wait until it has prefilled, then share its blocks
        self.owner = owner
        self.arrived = time.perf_counter()
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
        self.preemptions = 0
        self.last_token_at: float | None = None  # for the engine's inter-token latency

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens

    @property
    def pending(self) -> int:
        return len(self.state.prompt_ids) + len(self.state.output_ids) - self.num_computed

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.state.prompt_ids)


@dataclass(frozen=True)
class Scheduled:
    """`count` tokens of `request` from position `start` go into this step's forward."""

    request: Request
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so its last logits sample a token."""
        return self.start + self.count == len(self.request.state.prompt_ids) + len(self.request.state.output_ids)


@dataclass
class Step:
    scheduled: list[Scheduled]
    preempted: list[Request]
    admitted: list[Request]

    @property
    def tokens(self) -> int:
        return sum(s.count for s in self.scheduled)


class Scheduler:
    """Waiting and running requests over one `BlockManager`; `schedule()` decides a step, `advance()` records it."""

    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last is the newest

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> Step:
        """Decide the next step (module docstring)."""
        budget = self.max_num_batched_tokens
        step = Step([], [], [])
        taken: set[int] = set()
        decoding = [r for r in self.running if r.pending == 1]
        prefilling = [r for r in self.running if r.pending > 1]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request not in self.running:
                continue  # preempted for an older request in this step
            count = self._fit(request, min(request.pending, budget), step, taken)
            if count:
                step.scheduled.append(Scheduled(request, request.num_computed, count))
                taken.add(id(request))
                budget -= count
        while self.waiting and budget > 0 and not step.preempted and len(self.running) < self.max_num_seqs:
            request = self._next_admissible()
            if request is None:
                break
            hit = self.blocks.lookup(request.tokens, request.table.salt)
            start = hit.tokens
            count = min(len(request.tokens) - start, budget, self.blocks.admit_room(hit))
            if count <= 0 or not self.blocks.admit(request.table, hit, start + count):
                break  # not enough free blocks yet: it stays first in line
            self.waiting.remove(request)
            request.num_computed = start
            if request.cached_tokens is None:
                request.cached_tokens = start
                step.admitted.append(request)
            self.running.append(request)
            step.scheduled.append(Scheduled(request, start, count))
            taken.add(id(request))
            budget -= count
        return step

    def _fit(self, request: Request, count: int, step: Step, taken: set[int]) -> int:
        """Get `request` the blocks for its next `count` tokens, shrinking a prefill chunk to the free blocks
        and preempting the newest unscheduled request when not even one token fits. Returns the count (0:
        the request itself was preempted)."""
        self.blocks.release_before(request.table, request.num_computed)
        start = request.num_computed
        while True:
            fits = min(count, self.blocks.room(request.table, start))
            if fits > 0 and self.blocks.allocate(request.table, start + fits):
                return fits
            victim = next(r for r in reversed(self.running) if id(r) not in taken)
            self.preempt(victim)
            step.preempted.append(victim)
            if victim is request:
                return 0

    def _next_admissible(self) -> Request | None:
        """The first waiting request not waiting for its leader (a choice of the same prompt still prefilling)."""
        for request in self.waiting:
            leader = request.leader
            if leader is None or not self.blocks.prefix_caching or not leader.prefilling or not self._holds(leader):
                return request
        return None

    def _holds(self, request: Request) -> bool:
        return request in self.running or request in self.waiting

    def preempt(self, request: Request) -> None:
        """Take `request` off the running batch: free its blocks, queue it first to be recomputed later."""
        self.running.remove(request)
        self.blocks.free_table(request.table)
        request.num_computed = 0
        request.preemptions += 1
        self.waiting.appendleft(request)

    def advance(self, step: Step) -> None:
        """Record that the step's forward ran: its tokens are computed, and the blocks they filled keyed."""
        for s in step.scheduled:
            s.request.num_computed = s.start + s.count
            self.blocks.commit(s.request.table, s.request.tokens, s.request.num_computed)

    def finish(self, request: Request) -> None:
        """Drop a finished, cancelled or failed request, wherever it is, and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free_table(request.table)
