"""The LLM judge: a Korean grading prompt, an OpenAI-compatible chat-completions client, a score parser.

komt judged its answers with ChatGPT and recorded the raw reply next to an integer 0-5. Any server that
speaks the OpenAI chat-completions protocol works here (OpenAI, vLLM, llama.cpp, `python -m komt.serve`).

HTTP is the standard library's urllib: one POST per answer needs no connection pool, and a dependency
(requests, httpx) would be installed for this one call. Transient failures (HTTP 429 and 5xx, timeouts,
refused or dropped connections) are retried with exponential back-off (1 s, 2 s, 4 s, ... capped at 60 s,
or the server's Retry-After); other HTTP errors (401, 404, ...) are a configuration problem and stop
at once with a one-line `JudgeError`.

Judges do not always follow the format asked for, so `parse_score` accepts the common shapes ("4",
"점수: 4", "Score: 4", "4/5", "**4**", "4점", JSON) and returns None for a reply that holds no score, such as
a judge that answered the question itself (komt's published files record 0 for those; see `grade`).
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from komt.errors import KomtError
from komt.jsonutil import is_int, parse_json

GRADING_SYSTEM = "당신은 한국어 AI 어시스턴트의 답변을 공정하고 엄격하게 채점하는 평가자입니다."

GRADING_PROMPT = """다음은 사용자의 질문과 AI 어시스턴트의 답변입니다. 답변이 질문에 얼마나 잘 답했는지 0부터 5까지의 정수 하나로 채점하세요.

채점 기준:
- 5: 정확하고 충분하며, 자연스러운 한국어로 질문의 모든 부분에 답했다.
- 4: 대체로 정확하고 유용하지만 사소한 누락이나 어색한 표현이 있다.
- 3: 부분적으로 맞지만 중요한 내용이 빠졌거나 오류가 일부 있다.
- 2: 질문과 관련은 있으나 부정확한 내용이 많거나 질문의 핵심을 놓쳤다.
- 1: 거의 도움이 되지 않거나 대부분 틀렸다.
- 0: 답변이 없거나, 질문과 무관하거나, 알아볼 수 없다.
답변의 길이가 아니라 정확성과 유용성을 보세요. 사실과 다른 내용은 크게 감점하세요.

[질문]
{instruction}

[답변]
{answer}

근거를 한두 문장으로 짧게 쓴 다음, 마지막 줄에 "점수: N" 형식으로 점수를 쓰세요. N은 0, 1, 2, 3, 4, 5 중 하나입니다."""

REASK = '점수를 찾을 수 없습니다. 다른 말 없이 "점수: N" 한 줄만 쓰세요 (N은 0~5의 정수).'

RETRY_STATUS = {408, 409, 429}  # plus every 5xx
MAX_BACKOFF_S = 60.0


class JudgeError(KomtError):
    """The judge endpoint is unreachable after retries, rejected the request, or answered in another protocol."""


def grading_messages(instruction: str, answer: str) -> list[dict]:
    """The chat messages that ask the judge to grade `answer` to `instruction`."""
    prompt = GRADING_PROMPT.format(instruction=instruction.strip(), answer=answer.strip() or "(빈 답변)")
    return [{"role": "system", "content": GRADING_SYSTEM}, {"role": "user", "content": prompt}]


# ---- reading a score out of a reply ----

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_JSON_KEYS = ("score", "점수", "rating", "grade")
_WHOLE = re.compile(r"^\s*([0-5])\s*(?:점|/\s*5|out of 5)?\s*[.!]?\s*$", re.IGNORECASE)
_LABELLED = re.compile(
    r"(?:점수|평점|score|rating|grade)\s*(?:는|은)?\s*[:：=]?\s*([0-5])(?!\d)(?![.,]\d)(?:\s*(?:점|/\s*5))?",
    re.IGNORECASE,
)
_SLASH = re.compile(r"(?<![\d.])([0-5])\s*/\s*5(?!\d)")
_POINTS = re.compile(r"(?<![\d.])([0-5])\s*점(?!\s*(?:만점|척도))")
_LEADING = re.compile(r"^\s*([0-5])\s*[:：]")


def parse_score(reply: str) -> int | None:
    """The integer 0-5 a judge's reply gives, or None if it gives none (or one out of range).

    Tried in order, most explicit first: a JSON object with a score key; a reply that is only the number
    ("4", "4점", "4/5"); the last labelled score ("점수: 4", "Score: 4"); the last "N/5"; the last "N점"
    that is not "N점 만점"; a reply that opens with "N:". Markdown emphasis is ignored.
    """
    text = reply.replace("*", "").replace("`", "").replace("#", "")
    for candidate in _JSON_OBJECT.findall(text):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        for key in _JSON_KEYS:
            value = obj.get(key)
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value.strip())
            if is_int(value):
                return value if 0 <= value <= 5 else None
    for pattern, take_last in ((_WHOLE, False), (_LABELLED, True), (_SLASH, True), (_POINTS, True), (_LEADING, False)):
        matches = pattern.findall(text)
        if matches:
            return int(matches[-1] if take_last else matches[0])
    return None


# ---- talking to the endpoint ----


@dataclass
class Judge:
    """An OpenAI-compatible chat-completions endpoint and model, with retry settings.

    `base_url` is the API root ("http://127.0.0.1:8000/v1"); requests go to `{base_url}/chat/completions`.
    `sleep` is injectable so tests need not wait out the back-off.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    retries: int = 5
    backoff_s: float = 1.0
    max_tokens: int = 256
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url):
            raise JudgeError(f"--judge-url must start with http:// or https://, got {self.base_url!r}")
        self.url = self.base_url.rstrip("/") + "/chat/completions"

    def chat(self, messages: list[dict]) -> str:
        """The content of the judge's reply to `messages` (temperature 0), retrying transient failures."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace").replace("\n", " ")
                if e.code not in RETRY_STATUS and e.code < 500:
                    hint = "; check the key (--api-key-env)" if e.code in (401, 403) else ""
                    raise JudgeError(f"judge {self.url} answered HTTP {e.code}: {detail}{hint}") from None
                reason, retry_after = f"HTTP {e.code}", e.headers.get("Retry-After")
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = str(getattr(e, "reason", e)) or type(e).__name__  # refused, reset, timed out
            if attempt == self.retries:
                raise JudgeError(f"judge {self.url} failed {attempt + 1} times, last: {reason}")
            delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
            if retry_after is not None and retry_after.strip().isdigit():
                delay = min(float(retry_after), MAX_BACKOFF_S)
            print(f"judge: {reason}; retry {attempt + 1}/{self.retries} in {delay:g} s", file=sys.stderr)
            self.sleep(delay)
        raise AssertionError("unreachable")

    def _content(self, payload: bytes) -> str:
        try:
            content = parse_json(payload, f"judge {self.url}", JudgeError)["choices"][0]["message"]["content"]
        except (JudgeError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeError(
                f"judge {self.url} answered something that is not a chat completion: {payload[:120]!r}"
            )
        return content


@dataclass(frozen=True)
class Grade:
    reply: str  # the raw reply that gave the score (komt's `chatgpt` field)
    score: int
    parsed: bool  # False: no reply held a score, and `score` is komt's 0 for that case


def grade(judge: Judge, instruction: str, answer: str, attempts: int = 3) -> Grade:
    """Ask `judge` to grade `answer`; while a reply holds no score, ask again for just the score.

    The follow-up goes in the same conversation (re-sending the prompt at temperature 0 would get the
    same reply back). The recorded reply is the one the score came from. A judge that never gives a score
    in `attempts` replies gets 0 with its last raw reply, as in komt's published files (their score-0
    records are exactly such replies), so a new row stays comparable with theirs.
    """
    messages = grading_messages(instruction, answer)
    reply = judge.chat(messages)
    for _ in range(max(attempts, 1) - 1):
        score = parse_score(reply)
        if score is not None:
            return Grade(reply, score, True)
        messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": REASK}]
        reply = judge.chat(messages)
    score = parse_score(reply)
    return Grade(reply, 0, False) if score is None else Grade(reply, score, True)
