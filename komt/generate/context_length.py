"""The one context rule of every way to generate: the prompt plus the answer's token budget must fit.

A prompt that fills the context leaves no room for an answer; `max_new_tokens` past the room left is an
error before anything runs, never a silent cut, so the library's `generate`, the CLI and the server (as
`max_tokens`, OpenAI's name) answer the same request the same way, each naming its own flag.
"""

from __future__ import annotations

from typing import Callable

from komt.errors import GenerationError


def check_context_length(n_prompt: int, max_new_tokens: int, context: int, *, what: str = "the prompt",
                         limit: str = "max_new_tokens",
                         error: Callable[[str], Exception] = GenerationError) -> None:
    """Raise `error(message)` unless n_prompt < context and n_prompt + max_new_tokens <= context.

    `what` names the prompt ("the message" in a chat), `limit` the budget as the caller spells it
    (`--max-new-tokens`, `'max_tokens'`); `max_new_tokens` 0 checks the prompt alone.
    """
    if n_prompt >= context:
        raise error(f"{what} has {n_prompt} tokens; the model's context is {context} tokens (shorten it)")
    if n_prompt + max_new_tokens > context:
        raise error(f"{what} has {n_prompt} tokens and {limit} is {max_new_tokens}: together past the model's "
                    f"context of {context}; use {limit} {context - n_prompt} or less")
