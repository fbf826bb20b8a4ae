"""Tests of komt/eval/judge.py: the score parser and the chat-completions client, against a real HTTP
server on 127.0.0.1 that answers from a script (also used by test_eval_run.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from komt.eval.judge import REASK, Judge, JudgeError, grade, grading_messages, parse_score
from komt.eval.questions import RESULTS_DIR, load_questions
from komt.eval.results import read_results

# ---- the scripted judge server ----


def reply(content: str) -> tuple:
    return ("reply", content)


def status(code: int, text: str = "error", headers: dict | None = None) -> tuple:
    return ("status", code, text, headers or {})


DROP = ("drop",)  # close the connection without answering


def slow(seconds: float, content: str) -> tuple:
    return ("slow", seconds, content)


class ScriptedJudge:
    """An OpenAI-style chat-completions server whose answers come from `script(request_body) -> action`."""

    def __init__(self, script: Callable[[dict], tuple]) -> None:
        self.script = script
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, dict(self.headers), body))
                action = judge.script(body)
                if action[0] == "drop":
                    self.close_connection = True
                    return
                if action[0] == "status":
                    _, code, text, headers = action
                    self._send(code, text.encode(), headers)
                    return
                if action[0] == "raw":
                    self._send(200, action[1], {})
                    return
                if action[0] == "slow":
                    time.sleep(action[1])
                content = action[-1]
                payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}]}
                self._send(200, json.dumps(payload, ensure_ascii=False).encode(), {})

            def _send(self, code: int, data: bytes, headers: dict) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> ScriptedJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def in_order(*actions: tuple) -> Callable[[dict], tuple]:
    """A script that plays `actions` one per request, then repeats the last."""
    queue = list(actions)
    return lambda body: queue.pop(0) if len(queue) > 1 else queue[0]


def make_judge(server: ScriptedJudge, **kwargs) -> tuple[Judge, list[float]]:
    sleeps: list[float] = []
    return Judge(server.url, "judge-model", api_key="k-123", sleep=sleeps.append, **kwargs), sleeps


# ---- parsing ----


@pytest.mark.parametrize("text, score", [
    ("4", 4), ("Score: 4", 4), ("점수: 4", 4), ("점수：2", 2), ("4/5", 4), ("4 / 5", 4), ("**4**", 4), ("4점", 4),
    ("0", 0), ("5.", 5), ('{"score": 3}', 3), ('```json\n{"점수": "2"}\n```', 2), ("평점 = 1", 1),
    ("정확하지만 일부 누락이 있습니다.\n\n점수: 3", 3), ("**점수:** 5", 5), ("## 점수: 1점", 1),
    ("5점 만점에 4점을 줍니다.", 4), ("4점 (5점 만점)", 4), ("Score: 4/5", 4),
    ("초안에서는 점수: 2 였으나 다시 보니\n점수: 3", 3),  # the last labelled score wins
    ("3: It means the answer is helpful", 3),
])
def test_parse_score_reads_common_formats(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text", [
    "", "I'm sorry, but I don't", "The student records are typically kept for 5 years", "점수: 7", "점수: 10",
    "점수: 4.5", "2.5/5", '{"score": 9}', "1. 먼저 살펴보면", "유통기한과 소",
])
def test_parse_score_returns_none_without_a_score_in_range(text):
    assert parse_score(text) is None


def test_parse_score_agrees_with_every_published_score():
    """komt recorded 0 for replies its scorer could not read; all its other scores must parse the same."""
    questions = load_questions()
    readable_zeros = set()
    for path in sorted(RESULTS_DIR.glob("*.jsonl")):
        for record in read_results(path, questions).values():
            parsed = parse_score(record["chatgpt"])
            if record["score"] > 0:
                assert parsed == record["score"], (path.name, record["id"], record["chatgpt"])
            elif parsed is not None:
                readable_zeros.add((path.name, record["id"], parsed))
    # The only disagreements: three replies that open with "N:", which komt's scorer zeroed.
    assert readable_zeros == {
        ("score_result_Llama-2-7b-chat-hf.jsonl", 16, 3),
        ("score_result_nlpai-lab-kullm-polyglot-12.8b-v2.jsonl", 13, 1),
        ("score_result_nlpai-lab-kullm-polyglot-12.8b-v2.jsonl", 17, 2),
    }


# ---- the client ----


def test_request_carries_model_key_and_grading_prompt():
    with ScriptedJudge(in_order(reply("점수: 4"))) as server:
        judge, _ = make_judge(server)
        assert judge.chat(grading_messages("고추는 왜 맵나요?", "캡사이신 때문입니다.")) == "점수: 4"
    (path, headers, body), = server.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer k-123"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert "고추는 왜 맵나요?" in user["content"] and "캡사이신 때문입니다." in user["content"]
    assert "0부터 5까지의 정수" in user["content"]


def test_transient_failures_are_retried_with_exponential_backoff():
    script = in_order(status(500), DROP, status(503), reply("4/5"))
    with ScriptedJudge(script) as server:
        judge, sleeps = make_judge(server, backoff_s=0.5)
        assert judge.chat([{"role": "user", "content": "q"}]) == "4/5"
    assert len(server.requests) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_retry_after_header_sets_the_wait():
    with ScriptedJudge(in_order(status(429, "slow down", {"Retry-After": "7"}), reply("1"))) as server:
        judge, sleeps = make_judge(server)
        assert judge.chat([{"role": "user", "content": "q"}]) == "1"
    assert sleeps == [7.0]


def test_timeouts_are_retried():
    with ScriptedJudge(in_order(slow(1.0, "2"), reply("3"))) as server:
        judge, sleeps = make_judge(server, timeout_s=0.2)
        assert judge.chat([{"role": "user", "content": "q"}]) == "3"
    assert sleeps == [1.0]


def test_gives_up_after_the_retries():
    with ScriptedJudge(in_order(status(502))) as server:
        judge, sleeps = make_judge(server, retries=2)
        with pytest.raises(JudgeError, match=r"failed 3 times, last: HTTP 502"):
            judge.chat([{"role": "user", "content": "q"}])
    assert sleeps == [1.0, 2.0] and len(server.requests) == 3


def test_refused_connection_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    sleeps: list[float] = []
    judge = Judge(f"http://127.0.0.1:{port}/v1", "m", retries=1, sleep=sleeps.append)
    with pytest.raises(JudgeError, match=r"failed 2 times"):
        judge.chat([{"role": "user", "content": "q"}])
    assert sleeps == [1.0]


def test_client_errors_stop_at_once():
    with ScriptedJudge(in_order(status(401, '{"error": "invalid api key"}'))) as server:
        judge, sleeps = make_judge(server)
        with pytest.raises(JudgeError, match=r"HTTP 401: .*invalid api key.*--api-key-env"):
            judge.chat([{"role": "user", "content": "q"}])
    assert len(server.requests) == 1 and sleeps == []


def test_a_body_that_is_not_a_chat_completion_is_an_error():
    with ScriptedJudge(in_order(("raw", b"<html>proxy login</html>"))) as server:
        judge, _ = make_judge(server)
        with pytest.raises(JudgeError, match=r"not a chat completion: b'<html>"):
            judge.chat([{"role": "user", "content": "q"}])


def test_url_must_be_http():
    with pytest.raises(JudgeError, match="--judge-url must start with http"):
        Judge("127.0.0.1:8000/v1", "m")


# ---- grading ----


def test_grade_asks_again_in_the_same_conversation_when_a_reply_has_no_score():
    with ScriptedJudge(in_order(reply("I'm sorry, but I don't"), reply("**3**"))) as server:
        judge, _ = make_judge(server)
        result = grade(judge, "질문", "답변")
    assert (result.reply, result.score, result.parsed) == ("**3**", 3, True)
    first, second = (body["messages"] for _, _, body in server.requests)
    assert second == first + [{"role": "assistant", "content": "I'm sorry, but I don't"},
                              {"role": "user", "content": REASK}]


def test_grade_records_zero_and_the_raw_reply_when_no_reply_has_a_score():
    with ScriptedJudge(in_order(reply("The answer is about lakes."))) as server:
        judge, _ = make_judge(server)
        result = grade(judge, "질문", "답변", attempts=2)
    assert (result.reply, result.score, result.parsed) == ("The answer is about lakes.", 0, False)
    assert len(server.requests) == 2
