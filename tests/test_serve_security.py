"""The server's defences, each pinned over real HTTP on 127.0.0.1: stalled and idle connections are closed and
a real request still gets through (also when the process runs out of file descriptors, with a short log);
cross-site `text/plain` POSTs and foreign Host headers (DNS rebinding) are refused; every answer says nosniff
and the chat page has a CSP; hostile bodies get OpenAI's 400, never a 500; /health is public."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from serving import (  # noqa: F401, F811 (checkpoint, model, tokenizer: fixtures)
    MODEL_NAME,
    checkpoint,
    httpx,
    model,
    scrape,
    serving,
    tokenizer,
    wait_for,
)

from komt.serve.connections import RateLimitFilter

REPO = Path(__file__).resolve().parents[1]
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(model, tokenizer):
    """A server with the CLI's default limits (2 MiB bodies), short connection timeouts."""
    with serving(model, tokenizer, server_kwargs={"header_timeout": 1.0, "keep_alive": 1.0}) as (url, _):
        yield url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def port_of(url):
    return int(url.rsplit(":", 1)[1])


def closed_by_server(sock, timeout):
    """True if the server closes `sock` within `timeout` seconds (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1024):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# ---- connections -----------------------------------------------------------------------------------------


def test_stalled_and_slow_connections_are_closed_while_a_real_request_succeeds(server, client):
    idle = [socket.create_connection(("127.0.0.1", port_of(server))) for _ in range(20)]
    slow = [socket.create_connection(("127.0.0.1", port_of(server))) for _ in range(4)]
    for s in slow:  # slowloris: a header that never ends, a byte at a time
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-")
    start = time.monotonic()
    assert client.post("/v1/chat/completions", json=HI).status_code == 200
    while time.monotonic() - start < 0.9:
        for s in slow:
            s.sendall(b"a")
        time.sleep(0.2)
    assert all(closed_by_server(s, 3.0) for s in idle + slow)  # the header deadline is 1 s
    for s in idle + slow:
        s.close()


def test_an_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", port_of(server))) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_by_server(s, 3.0)  # keep-alive 1 s


def test_beyond_max_connections_uvicorn_answers_503_until_the_stalled_ones_time_out(model, tokenizer):
    with serving(model, tokenizer, server_kwargs={"max_connections": 6, "header_timeout": 1.0}) as (url, _):
        stalled = [socket.create_connection(("127.0.0.1", port_of(url))) for _ in range(6)]
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").status_code == 503
            for s in stalled:
                assert closed_by_server(s, 3.0)
                s.close()
            assert c.post("/v1/chat/completions", json=HI).status_code == 200


def test_a_body_slower_than_the_read_timeout_gets_408(model, tokenizer):
    with serving(model, tokenizer, body_timeout=0.5) as (url, _):
        with socket.create_connection(("127.0.0.1", port_of(url))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 408")


@pytest.mark.slow
def test_out_of_file_descriptors_the_log_stays_short_and_the_server_recovers(checkpoint):
    """asyncio logs a traceback for every failed accept(): unfiltered, ~3 MB a second here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "komt.serve", "--model", str(checkpoint), "--port", str(port),
                                 "--device", "cpu", "--header-timeout", "1", "--log-level", "warning"],
                                env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        sockets = []
        try:
            def up():
                assert proc.poll() is None
                try:
                    return httpx.get(f"{url}/health", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, 60, "the server to start")
            open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[1]
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (open_fds + 20, hard))
            before = os.fstat(log.fileno()).st_size
            sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]  # 4x what it can accept
            time.sleep(3)
            assert os.fstat(log.fileno()).st_size - before < 20_000
            response = httpx.post(f"{url}/v1/chat/completions", json=HI, timeout=30)
            assert response.status_code == 200
        finally:
            for s in sockets:
                s.close()
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_rate_limit_filter_lets_one_line_through_per_interval():
    limiter = RateLimitFilter(("Too many open files",), interval=60)
    record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, (), None)  # noqa: E731
    assert limiter.filter(record("socket.accept(): [Errno 24] Too many open files"))
    assert not any(limiter.filter(record("[Errno 24] Too many open files")) for _ in range(1000))
    assert limiter.suppressed == 1000
    assert limiter.filter(record("something else"))  # other lines pass untouched


# ---- cross-site requests ---------------------------------------------------------------------------------


def test_a_text_plain_post_is_refused_before_anything_runs(server, client):
    before = scrape(server)["komt_generation_tokens_total"]
    for path, body in (("/v1/chat/completions", HI), ("/v1/completions", {"prompt": "hi", "max_tokens": 2})):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            response = client.post(path, content=json.dumps(body), headers=headers)
            assert response.status_code == 415, (path, content_type)
            assert response.json()["error"]["code"] == "unsupported_media_type"
    assert client.post("/v1/chat/completions", content=json.dumps(HI),
                       headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    assert scrape(server)["komt_generation_tokens_total"] == before + 2


@pytest.mark.parametrize("host, status", [("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("[::1]:{port}", 200),
                                          ("evil.example", 400), ("evil.example:{port}", 400), ("127.0.0.1.evil", 400),
                                          ("", 400)])
def test_the_host_header_must_name_this_server(server, host, status):
    response = httpx.get(f"{server}/v1/models", headers={"host": host.format(port=port_of(server))})
    assert response.status_code == status
    if status == 400:
        assert response.json()["error"]["code"] == "invalid_host"


def test_allowed_hosts_admit_a_deployment_name(model, tokenizer):
    with serving(model, tokenizer, allowed_hosts=("komt.example",)) as (url, _):
        assert httpx.get(f"{url}/v1/models", headers={"host": "komt.example"}).status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 400  # 127.0.0.1 was not listed
    with serving(model, tokenizer, allowed_hosts=None) as (url, _):
        assert httpx.get(f"{url}/v1/models", headers={"host": "anything.example"}).status_code == 200


def test_allowed_hosts_follow_the_bind_address():
    from komt.serve.cli import allowed_hosts

    assert allowed_hosts("127.0.0.1", None) == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts("10.0.0.5", None) == ("10.0.0.5", "127.0.0.1", "localhost", "::1")
    assert allowed_hosts("0.0.0.0", None) is None
    assert allowed_hosts("127.0.0.1", "a.example, b.example") == ("a.example", "b.example")
    assert allowed_hosts("127.0.0.1", "*") is None


def test_every_answer_says_nosniff_and_the_chat_page_has_a_csp(client):
    for response in (client.get("/health"), client.get("/v1/models"), client.get("/metrics"), client.get("/nope"),
                     client.post("/v1/chat/completions", json={"messages": []})):
        assert response.headers["x-content-type-options"] == "nosniff"
    policy = client.get("/").headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy


# ---- hostile bodies: 400 with OpenAI's error, never a 500 ------------------------------------------------

HOSTILE = [
    ("lone surrogate in content", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'),
    ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "\\udfff"}'),
    ("lone surrogate in a stop string", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}'),
    ("100k-deep JSON", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("repetition_penalty 1e-300", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-300}'),
    ("temperature 1e-300 is greedy, not NaN", None, None),
    ("echo true", "/v1/completions", b'{"prompt": "hi", "echo": true}'),
    ("best_of true", "/v1/completions", b'{"prompt": "hi", "best_of": true}'),
    ("n true", "/v1/completions", b'{"prompt": "hi", "n": true}'),
    ("max_tokens true", "/v1/completions", b'{"prompt": "hi", "max_tokens": true}'),
    ("logprobs true in a completion", "/v1/completions", b'{"prompt": "hi", "logprobs": true}'),
]


@pytest.mark.parametrize("path, body", [c[1:] for c in HOSTILE if c[1]], ids=[c[0] for c in HOSTILE if c[1]])
def test_hostile_bodies_get_openai_400s(client, path, body):
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.post("/v1/chat/completions", json=HI).status_code == 200  # still serving


def test_a_tiny_temperature_samples_greedily_instead_of_making_nans(client):
    greedy = client.post("/v1/chat/completions", json=HI | {"max_tokens": 8}).json()
    tiny = client.post("/v1/chat/completions", json=HI | {"max_tokens": 8, "temperature": 1e-300, "seed": 1})
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_a_huge_bad_message_is_not_echoed_back_whole(client):
    body = {"messages": [{"role": "robot", "content": "x" * 1_500_000}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert len(response.content) < 1000


def test_health_is_public_and_says_nothing_else(model, tokenizer):
    with serving(model, tokenizer, api_key="s3cret") as (url, _):
        response = httpx.get(f"{url}/health")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert MODEL_NAME not in response.text
