"""The HTTP application: OpenAI's routes over one `Engine`, the chat page, health and metrics.

    POST /v1/chat/completions   messages -> Mistral instruct prompt -> engine -> JSON, or SSE chunks
    POST /v1/completions        raw prompt -> engine -> JSON, or SSE chunks
    GET  /v1/models, /health, /metrics (Prometheus text), /  (the chat page)

Handlers never touch the model: they validate (komt.serve.protocol), submit to the engine thread and await
its events on an asyncio queue. A streamed answer ends with `data: [DONE]`; if the client disconnects,
Starlette cancels the stream and its `finally` cancels the job, whose KV blocks the engine frees before
its next step. A non-streamed request watches for the disconnect itself. `n` choices come back as one
body (or interleaved chunks, each with its `index`); usage counts the prompt once.

FastAPI is an optional dependency (the `serve` extra): it is imported inside `create_app`. (No
`from __future__ import annotations` here: FastAPI reads the handlers' annotations, `Request` included.)
"""

import asyncio
import base64
import hashlib
import importlib.resources
import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from komt.errors import KomtError
from komt.serve import protocol, responses
from komt.serve.connections import DEFAULT_BODY_TIMEOUT_S
from komt.serve.engine import Delta, Engine, Failed, Finished, Job, QueueFull
from komt.serve.guards import BearerAuth, BodyLimit, HostCheck, JSONOnly, RequestCounter, SecurityHeaders
from komt.serve.protocol import APIError, GenerationSpec
from komt.serve.responses import ChoiceResult, Reply

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # ~100k tokens of JSON-escaped Korean; far past any context
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def require_serve_dependencies() -> None:
    """Fail with the install command when the `serve` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise KomtError(f"the server needs fastapi and uvicorn ({err.name} is not installed): "
                        "pip install 'komt[serve]'") from None


def page_policy(page: str) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style (by hash), calls to this
    origin, nothing else (no other script, frame, form target or plugin)."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    timeout: float | None = 600.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT_S,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
) -> Any:
    """A FastAPI app serving `engine`; the app's lifespan starts and stops the engine thread.

    `allowed_hosts`: the Host names requests may carry (default: the loopback names; None: any).
    """
    require_serve_dependencies()
    from fastapi import FastAPI, Request
    from fastapi.responses import (
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
        StreamingResponse,
    )
    from starlette.exceptions import HTTPException

    page = importlib.resources.files("komt.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": page_policy(page), "Referrer-Policy": "no-referrer"}
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="komt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    app.add_middleware(JSONOnly)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestCounter, metrics=engine.metrics, routes=ROUTES)  # outermost: counts 400/401/413 too

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(KomtError)
    async def komt_error(_request: Request, err: KomtError) -> JSONResponse:  # bad input found past the protocol
        return JSONResponse(APIError(str(err)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(str(err.detail), err.status_code, code=code).body(), status_code=err.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health() -> JSONResponse:  # public (komt.serve.guards): says nothing but ok
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return responses.models_list(model_name, started)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = protocol.parse_json_body(await request.body())
        spec = protocol.parse_chat_request(body, engine.tokenizer, context=engine.context, model_name=model_name)
        return await answer(request, spec, Reply.new(chat=True, model=model_name, tokenizer=engine.tokenizer))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = protocol.parse_json_body(await request.body())
        spec = protocol.parse_completion_request(body, engine.tokenizer, context=engine.context, model_name=model_name)
        return await answer(request, spec, Reply.new(chat=False, model=model_name, tokenizer=engine.tokenizer))

    async def answer(request: Request, spec: GenerationSpec, reply: Reply) -> Response:
        """Submit to the engine; stream its events as SSE or gather them into one JSON body."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event: Any) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            job = engine.submit(spec.prompt_ids, max_tokens=spec.max_tokens, params=spec.params, deliver=deliver,
                                seed=spec.seed, stop=spec.stop, timeout=timeout, n=spec.n, logprobs=spec.logprobs,
                                cache_salt=spec.cache_salt)
        except QueueFull as err:
            raise APIError(str(err), status=429, type="rate_limit_error", code="queue_full") from None
        if spec.stream:
            return StreamingResponse(stream(job, events, spec, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gathering = asyncio.ensure_future(gather(events, spec.n))
        watching = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({gathering, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not gathering.done():
                gathering.cancel()
                job.cancel()
        if not gathering.done() or gathering.cancelled():
            return Response(status_code=499)  # nginx's "client closed request": nobody reads this
        choices = gathering.result()
        failed = next((end for _, _, end in choices if isinstance(end, Failed)), None)
        if failed is not None:
            job.cancel()
            raise protocol.failure_error(failed.reason, failed.message)
        results = [ChoiceResult(text, end.reason, entries if spec.logprobs is not None else None)
                   for text, entries, end in choices]
        ends = [end for _, _, end in choices]
        return JSONResponse(reply.full(results, ends[0].prompt_tokens, sum(e.completion_tokens for e in ends),
                                       ends[0].cached_tokens))

    return app


async def gather(events: asyncio.Queue, n: int) -> list[tuple[str, list, Finished | Failed]]:
    """Every choice's text, log-probability entries and last event, by choice index (stops at a failure)."""
    texts: list[list[str]] = [[] for _ in range(n)]
    entries: list[list] = [[] for _ in range(n)]
    ends: list[Finished | Failed | None] = [None] * n
    while any(end is None for end in ends):
        event = await events.get()
        if isinstance(event, Delta):
            texts[event.choice].append(event.text)
            if event.logprob is not None:
                entries[event.choice].append(event.logprob)
        else:
            ends[event.choice] = event
            if isinstance(event, Failed):
                break
    return [("".join(t), e, end) for t, e, end in zip(texts, entries, ends)]


async def client_gone(request: Any) -> None:
    """Return when the client disconnects (the body was already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(job: Job, events: asyncio.Queue, spec: GenerationSpec, reply: Reply) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format: role, text pieces, finish reason + usage, [DONE]."""
    try:
        if reply.chat:
            for index in range(spec.n):
                yield responses.sse(reply.chunk("", first=True, index=index))
        offsets = [0] * spec.n  # completions' text_offset of each choice's next token
        ended, completion_tokens = 0, 0
        while ended < spec.n:
            event = await events.get()
            if isinstance(event, Delta):
                logprobs = [event.logprob] if event.logprob is not None else None
                yield responses.sse(reply.chunk(event.text, index=event.choice, logprobs=logprobs,
                                               text_offset=offsets[event.choice]))
                if logprobs is not None:
                    offsets[event.choice] += len(responses.token_string(reply.tokenizer, event.logprob.token)[0])
                continue
            if isinstance(event, Failed):  # the status line is long gone, so the error travels as an event
                yield responses.sse(protocol.failure_error(event.reason, event.message).body())
                break
            ended += 1
            completion_tokens += event.completion_tokens
            usage = None
            if ended == spec.n:
                usage = responses.usage(event.prompt_tokens, completion_tokens, event.cached_tokens)
            yield responses.sse(reply.chunk(None, event.reason, index=event.choice, usage_=usage))
            if ended == spec.n and spec.include_usage:
                yield responses.sse(reply.usage_chunk(event.prompt_tokens, completion_tokens, event.cached_tokens))
        yield responses.sse("[DONE]")
    finally:
        job.cancel()  # a no-op after the end; frees the blocks at once when the client left mid-stream
