"""End-to-end tests of `komt.serve`: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx).

The model is a tiny random Mistral with the real 32000-token vocabulary and the real tokenizer, written to
a checkpoint folder as `python -m komt.serve` would load it. Every answer is checked against
`komt.generate.generate` on the same prompt, so batching, streaming and the wire format are tested by value.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from serving import (  # noqa: F401, F811 (checkpoint, model, tokenizer, server, client, slow_model: fixtures)
    MODEL_NAME,
    chat,
    chat_ids,
    checkpoint,
    client,
    httpx,
    model,
    reference,
    scrape,
    server,
    serving,
    slow_model,
    sse_events,
    stream_chat,
    tokenizer,
    wait_for,
)

from komt import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


# ---- the API ----------------------------------------------------------------------------------------------


def test_chat_completion_equals_generate(client, model, tokenizer):
    text = "안녕하세요, 자기소개 해 주세요."
    body = chat(client, text, max_tokens=20)
    expected, ids, reason = reference(model, tokenizer, chat_ids(tokenizer, text), 20)
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == reason
    assert body["usage"] == {"prompt_tokens": len(chat_ids(tokenizer, text)), "completion_tokens": len(ids),
                             "total_tokens": len(chat_ids(tokenizer, text)) + len(ids),
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_endpoint_encodes_raw_prompt_with_bos(client, model, tokenizer):
    prompt = "The capital of Korea is"
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    expected, _, reason = reference(model, tokenizer, tokenizer.encode(prompt, bos=True), 12)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == reason
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt, bos=True))
    # Token ids are a prompt too.
    by_ids = client.post("/v1/completions", json={"prompt": tokenizer.encode(prompt, bos=True), "max_tokens": 12,
                                                  "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == expected


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_streamed_chunks_reassemble_to_the_non_streamed_answer(client):
    text = "한국어로 대답해 주세요: 서울은 어떤 도시인가요?"
    full = chat(client, text, max_tokens=24)
    events = stream_chat(client, text, max_tokens=24, stream_options={"include_usage": True})
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(pieces) == full["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    last, usage_chunk = events[-2], events[-1]
    assert last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    # The same prompt a second time: its full KV blocks come from the prefix cache (16 tokens a block, the
    # last prompt token always recomputed).
    prompt_tokens = full["usage"]["prompt_tokens"]
    assert last["usage"] == {**full["usage"], "prompt_tokens_details": {"cached_tokens": (prompt_tokens - 1) // 16 * 16}}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == last["usage"]


def test_streamed_completion_reassembles(client):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_stop_string_cuts_the_answer(client, model, tokenizer):
    text = "Tell me a story about a cat."
    expected, ids, _ = reference(model, tokenizer, chat_ids(tokenizer, text), 24)
    stop = tokenizer.decode(ids[:8])[-6:]  # a stop string that spans tokens, from the middle of the answer
    assert stop in expected
    body = chat(client, text, max_tokens=24, stop=[stop])
    assert body["choices"][0]["message"]["content"] == expected[: expected.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    streamed = stream_chat(client, text, max_tokens=24, stop=stop)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed) == expected[: expected.find(stop)]


# ---- continuous batching ----------------------------------------------------------------------------------


PROMPTS = ["안녕하세요", "Tell me a story about a cat.", "hi", "김치찌개 만드는 법을 알려 주세요. 재료도요.",
           "What is 2+2?", "서울에서 부산까지 얼마나 걸려요?"]


def test_concurrent_greedy_requests_each_equal_their_solo_answer(server, model, tokenizer):
    before = scrape(server)
    expected = [reference(model, tokenizer, chat_ids(tokenizer, p), 32)[0] for p in PROMPTS]
    answers = [None] * len(PROMPTS)

    def ask(i):
        with httpx.Client(base_url=server, timeout=60) as c:
            answers[i] = chat(c, PROMPTS[i], max_tokens=32)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]  # 6 requests, 4 rows
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == expected
    after = scrape(server)
    steps = after["komt_decode_batch_size_count"] - before["komt_decode_batch_size_count"]
    solo_steps = after['komt_decode_batch_size_bucket{le="1"}'] - before['komt_decode_batch_size_bucket{le="1"}']
    assert solo_steps < steps  # some decode steps really carried several requests


def test_seeded_sampling_is_per_request_and_equals_generate(server, model, tokenizer):
    settings = [{"temperature": 0.9, "top_p": 0.95, "seed": 1}, {"temperature": 1.2, "top_k": 40, "seed": 2},
                {"temperature": 0.7, "seed": 3, "repetition_penalty": 1.3},
                {"temperature": 0, "repetition_penalty": 1.5}]
    prompts = PROMPTS[: len(settings)]
    expected = [reference(model, tokenizer, chat_ids(tokenizer, p), 24, **s)[0] for p, s in zip(prompts, settings)]
    answers = [None] * len(settings)

    def ask(i):
        with httpx.Client(base_url=server, timeout=60) as c:
            answers[i] = chat(c, prompts[i], max_tokens=24, **settings[i])["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == expected


def test_a_request_joins_the_running_batch_instead_of_waiting(slow_model, tokenizer):
    """B arrives while A decodes; with continuous batching B finishes long before A does."""
    long_text, short_text = "Tell me a story about a cat.", "hi"
    a_expected, a_ids, _ = reference(slow_model, tokenizer, chat_ids(tokenizer, long_text), 60)
    b_expected, _, _ = reference(slow_model, tokenizer, chat_ids(tokenizer, short_text), 4)
    assert len(a_ids) == 60  # precondition: A runs its whole length (no early EOS)
    with serving(slow_model, tokenizer, max_batch=2) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        done = {}
        body = {"messages": [{"role": "user", "content": long_text}], "temperature": 0, "max_tokens": 60,
                "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # A is decoding now (about 0.6 s to go)
            b = chat(c, short_text, max_tokens=4)
            done["b"] = time.monotonic()
            a_text = ""
            for line in lines:
                if line.startswith("data: {"):
                    a_text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            done["a"] = time.monotonic()
        assert done["b"] < done["a"] - 0.2
        assert b["choices"][0]["message"]["content"] == b_expected
        assert a_text == a_expected


def test_client_disconnect_frees_the_slot(slow_model, tokenizer):
    with serving(slow_model, tokenizer, max_batch=1) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2000, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        # 2000 tokens would take 20 s; the row must be freed within a step or two.
        wait_for(lambda: scrape(url).get('komt_generations_total{reason="cancelled"}') == 1, 5, "stream cancel")
        # A non-streamed request whose client goes away is dropped too.
        raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        payload = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}).encode()
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        wait_for(lambda: scrape(url)["komt_running_requests"] == 1, 5, "the request to start")
        raw.close()
        wait_for(lambda: scrape(url).get('komt_generations_total{reason="cancelled"}') == 2, 5, "non-stream cancel")
        assert scrape(url)["komt_running_requests"] == 0
        start = time.monotonic()
        assert chat(c, "hi", max_tokens=3)["usage"]["completion_tokens"] > 0
        assert time.monotonic() - start < 5


def test_queue_limit_answers_429(slow_model, tokenizer):
    with serving(slow_model, tokenizer, max_batch=1, max_queue=1) as (url, _), \
            httpx.Client(base_url=url, timeout=60) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as running:
            lines = running.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)
            wait_for(lambda: scrape(url)["komt_running_requests"] == 1, 5, "the first request to start")
            with c.stream("POST", "/v1/chat/completions", json=body) as waiting:
                wait_for(lambda: scrape(url)["komt_queue_depth"] == 1, 5, "the second request to queue")
                refused = c.post("/v1/chat/completions", json={**body, "stream": False})
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200
        wait_for(lambda: scrape(url)["komt_running_requests"] + scrape(url)["komt_queue_depth"] == 0, 5, "cleanup")
        assert chat(c, "hi", max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")


def test_request_timeout(slow_model, tokenizer):
    with serving(slow_model, tokenizer, timeout=0.3) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
        response = c.post("/v1/chat/completions", json=body)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            events = sse_events(streamed)
        assert events[-1]["error"]["code"] == "timeout"
        assert scrape(url)['komt_generations_total{reason="timeout"}'] == 2


def test_a_failing_forward_fails_only_its_request(checkpoint, tokenizer):
    """An exception inside the model (say, out of memory) answers 500 for that request; the server goes on."""
    model = load_model(checkpoint, device="cpu")
    failures = [RuntimeError("simulated out of memory")]

    def fail_once(*_):
        if failures:
            raise failures.pop()

    handle = model.register_forward_pre_hook(fail_once)
    with serving(model, tokenizer) as (url, engine), httpx.Client(base_url=url, timeout=60) as c:
        response = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
        assert response.status_code == 500
        assert "simulated out of memory" in response.json()["error"]["message"]
        expected, _, _ = reference(model, tokenizer, chat_ids(tokenizer, "hi"), 4)
        assert chat(c, "hi", max_tokens=4)["choices"][0]["message"]["content"] == expected
        assert engine.alive
    handle.remove()


def test_loadtest_counts_what_the_server_generated(server):
    from komt.serve.loadtest import report, run

    before = scrape(server)["komt_generation_tokens_total"]
    summary = run(server, 6, 3, max_tokens=8)
    assert summary["failed"] == 0 and summary["requests"] == 6
    assert summary["completion_tokens"] == scrape(server)["komt_generation_tokens_total"] - before > 0
    assert summary["tokens_per_s"] > 0 and summary["ttft_ms"][50] <= summary["latency_s"][50] * 1000
    assert report(summary).split()[:3] == ["3", "6", "0"]


# ---- streaming Korean byte by byte: a scripted model ------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Predicts a fixed token script whatever the input: the token after position p is script[p - start]."""

    def __init__(self, config, script, start):
        super().__init__()
        self.config = config
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(1, 1)  # where the engine reads the device and dtype
        self.script, self.start = torch.tensor(script), start

    def forward(self, input_ids, positions=None, cache=None, last_only=False, logits_at=None):
        tokens = self.script[(positions - self.start).clamp(0, len(self.script) - 1)]  # (B, T)
        logits = torch.zeros(*tokens.shape, self.config.vocab_size).scatter_(-1, tokens[..., None], 1.0)
        return logits[:, -1:] if last_only else logits if logits_at is None else logits[:, logits_at]


def test_korean_streams_whole_characters_from_byte_tokens(tokenizer, model):
    """Each syllable arrives as 3 byte-fallback tokens; the stream must carry whole characters only."""
    answer = "안녕하세요, 세계! 🌏"
    byte_ids = [3 + b for b in answer.encode("utf-8")]  # <0x00> is id 3 in this vocabulary
    assert [tokenizer.id_to_piece(i) for i in byte_ids[:3]] == ["<0xEC>", "<0x95>", "<0x88>"]
    prompt = chat_ids(tokenizer, "인사해 주세요")
    scripted = ScriptedModel(model.config, byte_ids + [tokenizer.eos_id], start=len(prompt) - 1)
    with serving(scripted, tokenizer) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        events = stream_chat(c, "인사해 주세요")
        pieces = [e["choices"][0]["delta"].get("content") for e in events[1:-1]]
        assert pieces == list(answer)  # one chunk per character, as soon as its last byte arrives
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert events[-1]["usage"]["completion_tokens"] == len(byte_ids)
        stopped = stream_chat(c, "인사해 주세요", stop="세계")
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in stopped) == "안녕하세요, "
        assert stopped[-1]["choices"][0]["finish_reason"] == "stop"


# ---- invalid requests, access ----------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]
INVALID = [
    ("not json", b"{bad", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("ends with assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages"),
    ("temperature a string", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"messages": MESSAGES, "temperature": 5}, 400, "temperature"),
    ("max_tokens past the context", {"messages": MESSAGES, "max_tokens": 5000}, 400, "max_tokens"),
    ("max_tokens zero", {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens a float", {"messages": MESSAGES, "max_tokens": 2.5}, 400, "max_tokens"),
    ("stream not a bool", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("empty stop", {"messages": MESSAGES, "stop": [""]}, 400, "stop"),
    ("seed a string", {"messages": MESSAGES, "seed": "7"}, 400, "seed"),
    ("seed past 64 bits", {"messages": MESSAGES, "seed": 2**70}, 400, "seed"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("content not text", {"messages": [{"role": "user", "content": 7}]}, 400, "messages"),
    ("frequency_penalty", {"messages": MESSAGES, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("top_p zero", {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ("n true", {"messages": MESSAGES, "n": True}, 400, "n"),
    ("n past the limit", {"messages": MESSAGES, "n": 17}, 400, "n"),
    ("repetition_penalty 1e-300", {"messages": MESSAGES, "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ("top_logprobs without logprobs", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs past 20", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logprobs not a bool", {"messages": MESSAGES, "logprobs": 1}, 400, "logprobs"),
    ("unknown model", {"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_chat_requests_get_openai_errors(client, body, status, param):
    if isinstance(body, bytes):
        response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert chat(client, "hi", max_tokens=2)["object"] == "chat.completion"  # still serving


def test_invalid_completion_prompt(client):
    for prompt in ("", [], [99999], ["a", "b"], None):
        response = client.post("/v1/completions", json={"prompt": prompt})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", prompt


def test_prompt_past_the_context_is_rejected(client):
    response = client.post("/v1/completions", json={"prompt": "가 " * 5000, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_oversized_bodies_get_413(client):
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}  # the fixture's limit is 64 KiB
    assert client.post("/v1/chat/completions", json=big).status_code == 413

    def chunks():  # no content-length: the limit is counted as the body arrives
        for _ in range(100):
            yield b"x" * 1024

    response = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_gets_an_openai_error(client):
    response = client.get("/v1/engines")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_api_key_is_required_when_set(model, tokenizer):
    with serving(model, tokenizer, api_key="s3cret") as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            response = c.get("/v1/models", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/v1/chat/completions", json={"messages": MESSAGES}).status_code == 401
        assert c.get("/metrics").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        response = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, headers=good)
        assert response.status_code == 200
        assert c.get("/").status_code == 200  # the static page is public; it sends the key the user types
        assert scrape(url, Authorization="Bearer s3cret")['komt_http_requests_total{path="/v1/models",status="401"}'] == 4


# ---- metrics ---------------------------------------------------------------------------------------------


def test_metrics_count_what_was_served(model, tokenizer):
    with serving(model, tokenizer) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        answers = [chat(c, p, max_tokens=10) for p in PROMPTS[:3]]
        events = stream_chat(c, PROMPTS[3], max_tokens=10)
        answers.append({"usage": events[-1]["usage"], "choices": [{"finish_reason": events[-1]["choices"][0]
                                                                   ["finish_reason"]}]})
        completion = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5}).json()
        answers.append(completion)
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        text = c.get("/metrics").text
    samples = scrape_text(text)
    assert samples['komt_http_requests_total{path="/v1/chat/completions",status="200"}'] == 4
    assert samples['komt_http_requests_total{path="/v1/chat/completions",status="400"}'] == 1
    assert samples['komt_http_requests_total{path="/v1/completions",status="200"}'] == 1
    assert samples["komt_prompt_tokens_total"] == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert samples["komt_generation_tokens_total"] == sum(a["usage"]["completion_tokens"] for a in answers)
    assert samples["komt_time_to_first_token_seconds_count"] == 5
    # Every sampled token after the first is timed; a generation ended by EOS sampled one more than it kept.
    sampled = sum(a["usage"]["completion_tokens"] + (a["choices"][0]["finish_reason"] == "stop") for a in answers)
    assert samples["komt_time_per_output_token_seconds_count"] == sampled - 5
    assert samples["komt_running_requests"] == 0 and samples["komt_queue_depth"] == 0
    for family in ("komt_http_requests_total", "komt_time_to_first_token_seconds", "komt_queue_depth"):
        assert f"# TYPE {family} " in text and f"# HELP {family} " in text
    buckets = [v for k, v in samples.items() if k.startswith("komt_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 5  # cumulative, +Inf = count


def scrape_text(text):
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


# ---- the command line ------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_reports_bad_input_as_one_error_line_and_bad_flags_as_argparse_does(tmp_path, capsys):
    from komt.serve.cli import main

    assert main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for flag, value, message in (("--max-batch", "0", "must be a positive integer, got '0'"),
                                 ("--timeout", "-1", "must be a number in [0, inf), got '-1'"),
                                 ("--port", "70000", "must be an integer in [0, 65535], got '70000'")):
        with pytest.raises(SystemExit) as exit_info:  # argparse's: its usage line, then the error
            main(["--model", str(tmp_path), flag, value])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {message}")


def test_missing_serve_extra_names_the_install_command(monkeypatch, tmp_path, capsys):
    from komt.serve.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: import raises ImportError
    assert main(["--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: the server needs fastapi and uvicorn (uvicorn is not installed): "
                                       "pip install 'komt[serve]'\n")


def test_cli_serves_a_checkpoint_with_the_key_from_the_environment(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(), "KOMT_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "komt.serve", "--model", str(checkpoint), "--port", str(port),
                             "--device", "cpu", "--model-name", "tiny-cli", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k3y"}
    try:
        def up():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(f"{url}/health", headers=auth, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60, "the CLI server to start")
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny-cli"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "serving tiny-cli" in proc.stderr.read()


# ---- the chat page, in headless Chromium -----------------------------------------------------------------


def _chromium():
    if shutil.which("bash") is None:
        return None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    separated by NUL on fds 3 and 4), so no websocket client and no driver package is needed."""

    def __init__(self, executable, profile):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chrome reads commands on fd 3 and writes replies on fd 4; bash moves our pipe ends there (copies
        # above 9 first, so the moves cannot overwrite each other) and then becomes Chromium.
        read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w))
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        wire = f'exec "$0" "$@" 3<&{read_end} 4>&{write_end} {read_end}<&- {write_end}>&-'
        self.proc = subprocess.Popen(["bash", "-c", wire, executable, *flags], pass_fds=(read_end, write_end),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read_end)
        os.close(write_end)
        self._buffer, self._id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                data = os.read(self._from_chrome, 1 << 16)
                assert data, "chromium closed the DevTools pipe"
                self._buffer += data
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def type_and_send(self, text):
        """Focus the message box, type `text` as keyboard input, press Enter."""
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", text=text)
        self.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13,
                  text="\r")
        self.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def close(self):
        try:
            self.session = None
            self.call("Browser.close")
            self.proc.wait(10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium and bash (apt-get install chromium)")
def test_chat_page_streams_answers_keeps_the_conversation_and_resets(server, client, tmp_path):
    browser = Browser(_chromium(), tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=server + "/")
        wait_for(lambda: browser.js("(document.getElementById('model') || {}).textContent") == MODEL_NAME, 20, "page load")
        # The page runs under its CSP: its own script works (the model name above), an injected one does not.
        assert browser.js("(() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                          " document.body.appendChild(s); return window.injected === undefined; })()")
        browser.js("document.getElementById('temperature').value = '0';"
                   "document.getElementById('max-tokens').value = '24'")

        def ask(text):
            browser.type_and_send(text)
            wait_for(lambda: browser.js("document.body.dataset.state") != "streaming", 30, "the answer")
            assert browser.js("document.body.dataset.state") == "ready"
            return browser.js("(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
                              " return [m.textContent, Number(m.dataset.chunks)]; })()")

        def api(messages):
            body = {"messages": messages, "temperature": 0, "max_tokens": 24}
            return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        first = "안녕하세요! 서울 날씨 어때요?"
        answer, chunks = ask(first)
        assert answer == api([{"role": "user", "content": first}]) and answer.strip()
        assert chunks > 1  # the answer arrived piece by piece
        second = "Tell me more."
        answer2, _ = ask(second)
        history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
                   {"role": "user", "content": second}]
        assert answer2 == api(history)  # the page sent the whole conversation
        browser.js("document.getElementById('reset').click()")
        assert browser.js("document.querySelectorAll('.msg').length") == 0
        answer3, _ = ask(second)
        assert answer3 == api([{"role": "user", "content": second}])  # a fresh conversation
    finally:
        browser.close()


# ---- the wire format with a checkpoint that ships a chat template (SmolLM2's tokenizer files) -------------


def test_chat_request_uses_the_checkpoints_chat_template():
    import json as json_module

    from komt.generate.prompt import prompt_format
    from komt.serve import protocol

    refs = json_module.loads((FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))
    smol = load_tokenizer(FIXTURES / "smollm2-tokenizer")
    messages = refs["conversations"]["korean"]
    spec = protocol.parse_chat_request({"messages": messages}, smol, context=8192, model_name="smol")
    assert spec.prompt_ids == prompt_format(smol).chat(messages) == refs["templates"]["smollm2/korean"]["ids"]["smollm2-tokenizer"]
    developer = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, messages[0]]
    spec = protocol.parse_chat_request({"messages": developer}, smol, context=8192, model_name="smol")
    assert spec.prompt_ids == prompt_format(smol).chat([{"role": "system", "content": "Be brief."}, messages[0]])
    completion = protocol.parse_completion_request({"prompt": "Hello"}, smol, context=8192, model_name="smol")
    assert completion.prompt_ids == smol.encode("Hello", bos=False)  # SmolLM2's config adds no BOS


def test_chat_request_the_template_rejects_is_a_400_naming_the_template(tmp_path):
    import shutil

    from komt.serve import protocol

    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", tmp_path)
    (tmp_path / "chat_template.jinja").write_text((FIXTURES / "chat_templates" / "chatml.jinja").read_text()
                                                  + "{{ raise_exception('no tools here') }}")
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(protocol.APIError) as err:
        protocol.parse_chat_request({"messages": [{"role": "user", "content": "hi"}]}, tokenizer, context=4096,
                                    model_name="m")
    assert err.value.status == 400 and err.value.param == "messages"
    assert "chat_template.jinja cannot render this conversation: no tools here" in str(err.value)
