"""The OpenAI wire format, responses: response, chunk and usage bodies, log-probabilities, server-sent events.

Chat and completions differ in their object names and in how they spell a choice (`message` / `delta` vs
`text`) and its log-probabilities (chat's `content` list of {token, logprob, bytes, top_logprobs}; the
completions' parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists). A token is
named by its own text, or `bytes:\\xNN` when it is a byte that is not a whole character (vLLM's spelling).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from komt.generate.decoding import TokenLogprob
from komt.generate.stream import token_bytes


@dataclass(frozen=True)
class ChoiceResult:
    """One choice of a finished non-streamed answer."""

    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares: its id, creation time, model name, chat or completion, and
    the tokenizer that names the tokens of log-probabilities."""

    chat: bool
    model: str
    id: str
    created: int
    tokenizer: Any = None

    @classmethod
    def new(cls, chat: bool, model: str, tokenizer: Any = None) -> Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), tokenizer)

    def _envelope(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    def full(self, choices: list[ChoiceResult], prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0) -> dict[str, Any]:
        """The non-streamed response."""
        bodies = []
        for index, c in enumerate(choices):
            lp = None if c.logprobs is None else self.logprobs(c.logprobs)
            if self.chat:
                bodies.append({"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                               "finish_reason": c.finish_reason})
            else:
                bodies.append({"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        body = self._envelope("chat.completion" if self.chat else "text_completion", bodies)
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False, index: int = 0,
              logprobs: list[TokenLogprob] | None = None, text_offset: int = 0,
              usage_: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk; the first chat chunk carries the role, the last the finish reason (and usage)."""
        lp = None if logprobs is None else self.logprobs(logprobs, text_offset)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        """OpenAI's `stream_options.include_usage` chunk: no choices, only usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body

    def logprobs(self, entries: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
        """OpenAI's logprobs object: chat's `content` list, or the completions' parallel lists."""
        if self.chat:
            content = []
            for e in entries:
                token, raw = token_string(self.tokenizer, e.token)
                top = [dict(zip(("token", "bytes"), token_string(self.tokenizer, i)), logprob=v) for i, v in e.top]
                content.append({"token": token, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        tokens, offsets = [], []
        for e in entries:
            token, _ = token_string(self.tokenizer, e.token)
            tokens.append(token)
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_string(self.tokenizer, i)[0]: v for i, v in e.top} for e in entries],
                "text_offset": offsets}


def token_string(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token as logprobs name it: its text, or `bytes:\\xNN` for a byte that is not a whole character, and its bytes."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage: prompt tokens once per request, completion tokens of every choice, cached prompt tokens."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def models_list(model_name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "komt"}]}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (UTF-8; Korean stays readable, not \\u-escaped)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
