"""The OpenAI wire format: validate request bodies into a `GenerationSpec`, build response and chunk bodies.

Validation happens here, once, at the edge: every bad field becomes an `APIError` whose body is OpenAI's
`{"error": {"message", "type", "param", "code"}}` and whose message names the field and the value. The
engine then trusts what it gets.

Defaults are OpenAI's (temperature 1, top_p 1, max_tokens: the rest of the context). Two fields beyond
OpenAI's, as vLLM accepts them: `top_k` and `repetition_penalty` (the model card's sampler).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from komt.errors import GenerationError, KomtError
from komt.generate.prompt import prompt_format
from komt.generate.sampling import SamplingParams
from komt.generate.tokenizer import Tokenizer

MAX_STOP_STRINGS = 16


class APIError(KomtError):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request: the prompt ids, how to sample, and how to answer."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage and no choices


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat_request(body: dict[str, Any], tokenizer: Tokenizer, *, context: int, model_name: str) -> GenerationSpec:
    """POST /v1/chat/completions: messages in the checkpoint's prompt format (komt.generate.prompt, `auto`)."""
    _check_model(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(f"'messages' must be a non-empty list of {{role, content}} objects, got {_show(messages)}",
                       param="messages")
    try:
        prompt_ids = prompt_format(tokenizer).chat([_message(m, i) for i, m in enumerate(messages)])
    except GenerationError as err:
        raise APIError(str(err), param="messages") from None
    return _spec(body, prompt_ids, context, prompt_param="messages")


def parse_completion_request(body: dict[str, Any], tokenizer: Tokenizer, *, context: int,
                             model_name: str) -> GenerationSpec:
    """POST /v1/completions: a raw prompt (text, one-element list of text, or token ids), BOS per the tokenizer."""
    _check_model(body, model_name)
    for field in ("echo", "suffix", "best_of"):
        if body.get(field) not in (None, False, 1):
            raise APIError(f"'{field}' is not supported by this server", param=field)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        prompt_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(i) and 0 <= i < tokenizer.vocab_size for i in prompt):
        prompt_ids = list(prompt)
    else:
        raise APIError(f"'prompt' must be a non-empty string or a list of token ids below {tokenizer.vocab_size} "
                       f"(one prompt per request), got {_show(prompt)}", param="prompt")
    return _spec(body, prompt_ids, context, prompt_param="prompt")


def _check_model(body: dict[str, Any], model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(f"the model {_show(model)} does not exist; this server serves {model_name!r}", status=404,
                       param="model", code="model_not_found")


def _message(message: Any, i: int) -> Any:
    """A message with its content as one string (OpenAI also sends a list of {type: text} parts)."""
    if not isinstance(message, dict):
        return message  # the prompt format names what is wrong with it
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(f"message {i}: only text content parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    role = "system" if message.get("role") == "developer" else message.get("role")  # OpenAI's newer name
    return {"role": role, "content": content}


def _spec(body: dict[str, Any], prompt_ids: list[int], context: int, prompt_param: str) -> GenerationSpec:
    """The fields both endpoints share: sampling, length, stop strings, streaming."""
    if body.get("n") not in (None, 1):
        raise APIError(f"'n' must be 1 (one choice per request), got {_show(body.get('n'))}", param="n")
    if body.get("logprobs") not in (None, False, 0):
        raise APIError("'logprobs' is not supported by this server", param="logprobs")
    for field in ("frequency_penalty", "presence_penalty"):
        if body.get(field) not in (None, 0):
            raise APIError(f"'{field}' is not supported; use 'repetition_penalty' (> 1 discourages repeats)",
                           param=field)
    if len(prompt_ids) >= context:
        raise APIError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context} tokens",
                       param=prompt_param, code="context_length_exceeded")
    room = context - len(prompt_ids)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field, room, lo=1)
    if max_tokens > room:
        raise APIError(f"'{field}' is {max_tokens} but the prompt's {len(prompt_ids)} tokens leave room for {room} "
                       f"in the model's context of {context} tokens", param=field, code="context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, lo=0.0, hi=2.0)
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise APIError("'top_p' must be in (0, 1], got 0", param="top_p")
    top_k = _integer(body, "top_k", 0, lo=0)  # vLLM's extension; 0 = off (vLLM's -1 also means off)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, lo=0.0)
    if repetition_penalty == 0:
        raise APIError("'repetition_penalty' must be > 0, got 0", param="repetition_penalty")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(f"'stream_options' must be an object, got {_show(options)}", param="stream_options")
    return GenerationSpec(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        params=SamplingParams(temperature, top_k or None, top_p, repetition_penalty),
        seed=_seed(body),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=stream and _boolean(options or {}, "include_usage", False),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(body: dict[str, Any], name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise APIError(f"'{name}' must be a finite number, got {_show(value)}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise APIError(f"'{name}' must be an integer, got {_show(value)}", param=name)
    if lo is not None and value < lo:
        raise APIError(f"'{name}' must be >= {lo}, got {value}", param=name)
    return value


def _seed(body: dict[str, Any]) -> int | None:
    """OpenAI's `seed`: any integer torch.Generator.manual_seed accepts, [-2^63, 2^64)."""
    seed = _integer(body, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(f"'seed' must be in [-2^63, 2^64), got {seed}", param="seed")
    return seed


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{name}' must be true or false, got {_show(value)}", param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    """OpenAI's `stop`: null, one string, or a list of strings; every one non-empty."""
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty "
                       f"strings, got {_show(value)}", param="stop")
    return tuple(stops)


# ---- responses -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares: its id, creation time, model name, and chat or completion."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def _envelope(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False,
              usage_: dict[str, int] | None = None) -> dict[str, Any]:
        """One streamed chunk; the first chat chunk carries the role, the last the finish reason and usage."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """OpenAI's `stream_options.include_usage` chunk: no choices, only usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_list(model_name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "komt"}]}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (UTF-8; Korean stays readable, not \\u-escaped)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def failure_error(reason: str, message: str) -> APIError:
    """The HTTP error for a generation that failed in the engine."""
    if reason == "timeout":
        return APIError(message, status=504, type="timeout_error", code="timeout")
    if reason == "shutdown":
        return APIError(message, status=503, type="server_error", code="shutting_down")
    return APIError(message, status=500, type="server_error", code=reason)

