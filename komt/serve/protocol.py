"""The OpenAI wire format, requests: validate request bodies into a `GenerationSpec` (responses: komt.serve.responses).

Validation happens here, once, at the edge: every bad field becomes an `APIError` whose body is OpenAI's
`{"error": {"message", "type", "param", "code"}}` and whose message names the field and the value. The
engine then trusts what it gets.

Defaults are OpenAI's (temperature 1, top_p 1, max_tokens: the rest of the context). Fields beyond
OpenAI's, as vLLM accepts them: `top_k` and `repetition_penalty` (the model card's sampler), and
`cache_salt` (requests with different salts never share prefix-cache blocks).

`n` choices are seeded seed, seed + 1, ... (mod 2^64), so choice i is reproducible alone: the same request
with n = 1 and seed + i gives it. Log-probabilities (`logprobs`/`top_logprobs` in chat, `logprobs: k` in
completions) are the model's raw ones, before penalty, temperature and filters: what rescoring the
answer with a full forward gives. Error messages are capped at MAX_MESSAGE characters (a bad 1.5 MB
message is not echoed back whole).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from komt.errors import GenerationError, KomtError
from komt.generate.context_length import check_context_length
from komt.generate.prompt import prompt_format
from komt.generate.sampling import PENALTY_RANGE, SamplingParams
from komt.generate.tokenizer import Tokenizer
from komt.jsonutil import is_int

MAX_STOP_STRINGS = 16
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_MESSAGE = 500  # characters of an error message


class APIError(KomtError):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 20] + f"... ({len(message)} characters)"
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
    n: int = 1
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    cache_salt: str | None = None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not.

    The standard parser, not komt.jsonutil's strict one: a `NaN` must reach the field's own check, so that
    the 400 names the field (`param`) as OpenAI's does."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise APIError("the request body nests JSON too deeply") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:  # "\ud800" parses to a lone surrogate, which no tokenizer can encode: refuse it here, once
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(f"the request body holds a lone UTF-16 surrogate ({err.object[err.start:err.end]!r}); "
                       "send valid Unicode text") from None
    except RecursionError:
        raise APIError("the request body nests JSON too deeply") from None
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
    logprobs = None
    if _boolean(body, "logprobs", False):
        logprobs = _integer(body, "top_logprobs", 0, lo=0, hi=MAX_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return _spec(body, prompt_ids, context, prompt_param="messages", logprobs=logprobs)


def parse_completion_request(body: dict[str, Any], tokenizer: Tokenizer, *, context: int,
                             model_name: str) -> GenerationSpec:
    """POST /v1/completions: a raw prompt (text, one-element list of text, or token ids), BOS per the tokenizer."""
    _check_model(body, model_name)
    if _boolean(body, "echo", False):
        raise APIError("'echo' is not supported by this server", param="echo")
    if body.get("suffix") is not None:
        raise APIError("'suffix' is not supported by this server", param="suffix")
    best_of = _integer(body, "best_of", None, lo=1)
    if best_of is not None and best_of != _integer(body, "n", 1, lo=1):
        raise APIError(f"'best_of' must equal 'n' (every choice is returned), got {best_of}", param="best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        prompt_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(is_int(i) and 0 <= i < tokenizer.vocab_size for i in prompt):
        prompt_ids = list(prompt)
    else:
        raise APIError(f"'prompt' must be a non-empty string or a list of token ids below {tokenizer.vocab_size} "
                       f"(one prompt per request), got {_show(prompt)}", param="prompt")
    logprobs = _integer(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    return _spec(body, prompt_ids, context, prompt_param="prompt", logprobs=logprobs)


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


def _spec(body: dict[str, Any], prompt_ids: list[int], context: int, prompt_param: str,
          logprobs: int | None) -> GenerationSpec:
    """The fields both endpoints share: sampling, length, stop strings, streaming, choices."""
    n = _integer(body, "n", 1, lo=1, hi=MAX_N)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError(f"'cache_salt' must be a non-empty string, got {_show(salt)}", param="cache_salt")
    for field in ("frequency_penalty", "presence_penalty"):
        if body.get(field) not in (None, 0):
            raise APIError(f"'{field}' is not supported; use 'repetition_penalty' (> 1 discourages repeats)",
                           param=field)
    check_context_length(len(prompt_ids), 0, context,
                         error=partial(APIError, param=prompt_param, code="context_length_exceeded"))
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field, context - len(prompt_ids), lo=1)  # default: the rest of the context
    check_context_length(len(prompt_ids), max_tokens, context, limit=f"'{field}'",
                         error=partial(APIError, param=field, code="context_length_exceeded"))
    temperature = _number(body, "temperature", 1.0, lo=0.0, hi=2.0)
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise APIError("'top_p' must be in (0, 1], got 0", param="top_p")
    top_k = _integer(body, "top_k", 0, lo=0)  # vLLM's extension; 0 = off (vLLM's -1 also means off)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, *PENALTY_RANGE)  # 1e-300 would make NaNs
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
        n=n,
        logprobs=logprobs,
        cache_salt=salt,
    )


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


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int | None = None,
             hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):  # true is not 1
        raise APIError(f"'{name}' must be an integer, got {_show(value)}", param=name)
    if lo is not None and value < lo:
        raise APIError(f"'{name}' must be >= {lo}, got {value}", param=name)
    if hi is not None and value > hi:
        raise APIError(f"'{name}' must be <= {hi}, got {value}", param=name)
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


def failure_error(reason: str, message: str) -> APIError:
    """The HTTP error for a generation that failed in the engine."""
    if reason == "timeout":
        return APIError(message, status=504, type="timeout_error", code="timeout")
    if reason == "shutdown":
        return APIError(message, status=503, type="server_error", code="shutting_down")
    return APIError(message, status=500, type="server_error", code=reason)

