"""One generation's decoding state: everything a request carries from one sampled token to the next.

    logits of the request's last position -> sample_next (one batched call for every row of a step)
        -> DecodingState.accept(token) -> the text that became final, and whether generation ended

Whoever runs the forward (the solo loop of `komt.generate.generation` over a contiguous cache, or the
server's runner over a paged one), the per-token logic lives here once: sampling settings and the
seeded generator, the tokens the repetition penalty covers (prompt and output), the streaming
detokenizer and stop strings, the finish reason, and the log-probabilities a caller asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from komt.errors import GenerationError
from komt.generate.sampling import SamplingParams, sample_batch, token_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, log-probability), most likely first


def stop_ids_of(eos_id: int | Iterable[int] | None) -> frozenset[int]:
    """The ids that end a generation: none, one, or several (a tokenizer's `stop_ids`)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, (list, tuple, set, frozenset)):
        return frozenset(int(i) for i in eos_id)
    return frozenset([int(eos_id)])


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator seeded with `seed`, or from fresh entropy when it is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class DecodingState:
    """One request's decoding state (module docstring). `accept` each sampled token until `finished`.

    `eos_id`: the id, or ids, that end generation (not kept). `tokenizer` (optional) turns tokens into
    streamed text and enables `stop` strings; without it `accept` returns "". `logprobs` None records no log-probabilities; k >= 0 records each output token's and the
    k most likely at its position.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        vocab_size: int,
        device: torch.device | str,
        params: SamplingParams | None = None,
        seed: int | None = None,
        eos_id: int | Iterable[int] | None = None,
        tokenizer=None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
    ) -> None:
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.max_new_tokens = max_new_tokens
        self.params = params or SamplingParams()
        self.generator = make_generator(device, seed)
        self.stop_ids = stop_ids_of(eos_id)  # EOS, or each of a tokenizer's stop ids
        self.output_ids: list[int] = []
        self.finish_reason: str | None = "length" if max_new_tokens <= 0 else None  # "stop" or "length"
        self.logprobs: list[TokenLogprob] | None = None if logprobs is None else []
        self.top_logprobs = logprobs or 0
        # Tokens the repetition penalty divides: the prompt's and, as they come, the output's.
        self.seen: torch.Tensor | None = None  # (V,) bool
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(self.prompt_ids, device=device)] = True
        self.decoder = self.matcher = None
        if tokenizer is not None:
            from komt.generate.stream import StopMatcher, StreamDecoder

            self.decoder, self.matcher = StreamDecoder(tokenizer), StopMatcher(stop)
        elif stop:
            raise GenerationError("stop strings need a tokenizer to match against")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        """Prompt and output so far: what a forward must have seen to sample the next token."""
        return self.prompt_ids + self.output_ids

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Take the sampled `token`; return the text that became final. EOS ends generation and is not kept."""
        if self.finished:
            raise GenerationError("accept() after the generation finished")
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._flush()
        self.output_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        text = ""
        if self.decoder is not None:
            text, stopped = self.matcher.push(self.decoder.push(token))
            if stopped:
                self.finish_reason = "stop"
                return text
        if len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
            return text + self._flush()
        return text

    def _flush(self) -> str:
        """Text still held by the decoder (an unfinished character) and the stop matcher, at the end."""
        if self.decoder is None:
            return ""
        text, stopped = self.matcher.push(self.decoder.flush())
        if stopped:
            self.finish_reason = "stop"
            return text
        return text + self.matcher.flush()


def sample_next(logits: torch.Tensor, states: Sequence[DecodingState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample every row's next token from logits [B, V] (row b belongs to states[b]) in one batched call.

    Returns the token ids and, for the states that record log-probabilities, their `TokenLogprob`.
    """
    seen = None
    if any(s.seen is not None for s in states):
        V = logits.shape[-1]
        seen = torch.stack([s.seen if s.seen is not None else torch.zeros(V, dtype=torch.bool, device=logits.device)
                            for s in states])  # (B, V)
    tokens = sample_batch(logits, [s.params for s in states], [s.generator for s in states], seen)  # (B,)
    token_ids = tokens.tolist()  # the step's one device sync
    logprobs: list[TokenLogprob | None] = [None] * len(states)
    wanted = [b for b, s in enumerate(states) if s.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        top = max(states[b].top_logprobs for b in wanted)
        chosen, values, ids = token_logprobs(logits[rows], tokens[rows], top)
        chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
        for i, b in enumerate(wanted):
            k = states[b].top_logprobs
            logprobs[b] = TokenLogprob(token_ids[b], chosen[i], tuple(zip(ids[i][:k], values[i][:k])))
    return token_ids, logprobs
