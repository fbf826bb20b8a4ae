"""Shared by the server tests: a tiny checkpoint, a real uvicorn server on 127.0.0.1, and HTTP helpers.

The model is a tiny random Mistral with the real 32000-token vocabulary and the real tokenizer, written to
a checkpoint folder as `python -m komt.serve` would load it; the server is configured as the CLI
configures it (komt.serve.server_config). Not a test module: test files import what they use.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install 'komt[test]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve tests need uvicorn (pip install 'komt[serve]')")
pytest.importorskip("fastapi", reason="the serve tests need fastapi (pip install 'komt[serve]')")

from komt import load_model, load_tokenizer  # noqa: E402
from komt.generate import generate  # noqa: E402
from komt.generate.prompt import format_chat  # noqa: E402
from komt.model import Transformer, preset  # noqa: E402
from komt.serve import Engine, create_app, server_config  # noqa: E402

MODEL_NAME = "tiny"


# ---- fixtures: a checkpoint, a model, servers --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mistral-32k")
    config = preset("tiny-mistral-32k")
    torch.manual_seed(0)
    model = Transformer(config)
    write_checkpoint(model, folder, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@contextmanager
def serving(model, tokenizer, *, max_batch=4, max_queue=16, engine_kwargs=None, server_kwargs=None, **app_kwargs):
    """A uvicorn server in a thread, on a free port of 127.0.0.1, over a fresh Engine; yields (url, engine).

    The server is configured as `python -m komt.serve` configures it (komt.serve.server_config)."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, **(engine_kwargs or {}))
    app = create_app(engine, model_name=MODEL_NAME, **app_kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, log_level="warning", lifespan="on", graceful=2,
                                          **(server_kwargs or {})))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(model, tokenizer, max_batch=4, max_body_bytes=64 * 1024) as (url, _engine):
        yield url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@contextmanager
def slowed(model, seconds_per_forward: float):
    """Make every forward of `model` take at least this long, so a generation stays in flight while we look."""
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(seconds_per_forward))
    try:
        yield model
    finally:
        handle.remove()


@pytest.fixture()
def slow_model(checkpoint):
    """A separate model instance (the module's shared one stays fast), 10 ms per forward."""
    model = load_model(checkpoint, device="cpu")
    with slowed(model, 0.01):
        yield model


# ---- helpers ----------------------------------------------------------------------------------------------


def chat_ids(tokenizer, text):
    return format_chat(tokenizer, [{"role": "user", "content": text}])


def reference(model, tokenizer, prompt_ids, max_tokens, **sampling):
    """What `komt.generate` produces for the prompt: (text, new ids, finish reason)."""
    sampling.setdefault("temperature", 0.0)
    ids = generate(model, prompt_ids, max_new_tokens=max_tokens, eos_id=tokenizer.eos_id, **sampling)
    return tokenizer.decode(ids), ids, "length" if len(ids) == max_tokens else "stop"


def chat(client, text, **fields):
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(response):
    """The JSON payloads of an SSE response, each event's bytes decoded as strict UTF-8, until [DONE]."""
    buffer, events = b"", []
    for data in response.iter_bytes():
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            line = event.decode("utf-8")  # strict: an event never carries half a character
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[len("data: "):]))
    raise AssertionError(f"stream ended without data: [DONE] after {len(events)} events")


def stream_chat(client, text, **fields):
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "stream": True, **fields}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


def scrape(url, **headers):
    """/metrics as {'name{labels}': value}."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
