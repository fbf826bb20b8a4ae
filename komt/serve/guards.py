"""What every request passes before a route sees it, as plain ASGI middleware (outermost first):

    RequestCounter   counts each answer by route and status code (komt_http_requests_total)
    SecurityHeaders  every answer says `X-Content-Type-Options: nosniff` (the chat page adds its own CSP)
    HostCheck        a Host header that is not an allowed name of this server gets 400 (DNS rebinding)
    BearerAuth       with an API key, anything but the public paths without `Authorization: Bearer KEY` gets 401
    JSONOnly         a POST whose Content-Type is not application/json gets 415
    BodyLimit        a body over the limit gets 413, one slower than the read timeout 408, before any parsing

Why the Host and Content-Type checks: bound to 127.0.0.1 without an API key (the default), the server
trusts whoever can reach it, and any web page the user visits can reach it. A `text/plain` POST is a
"simple" request that browsers send cross-origin without a CORS preflight; requiring application/json
forces the preflight, which this server never answers. A page on a domain the attacker re-points at
127.0.0.1 (DNS rebinding) is same-origin to the browser but sends its own name as Host: only the names
this server was bound as are allowed (`--allowed-hosts` for deployments behind another name).

The key is compared with `hmac.compare_digest`, whose time does not depend on where the strings differ,
so response timing cannot be used to guess the key byte by byte. Public paths: the chat page (GET /),
a static file with no data in it that sends the key the user types with every API call, and the health
check (GET /health), which load balancers and probes call without credentials and which says only
"ok" or 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from komt.serve.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = ("/", "/health")


async def send_error(send: Send, status: int, message: str, code: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with OpenAI's error body, from middleware that runs before the app's exception handlers."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class RequestCounter:
    """Count every HTTP answer by (route, status) when its status line is sent."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Iterable[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.requests.inc(path, str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.requests.inc(path, "500")
            raise


class SecurityHeaders:
    """Add `X-Content-Type-Options: nosniff` to every answer: a browser never guesses a type (JSON as HTML)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, with_headers)


def host_name(host: bytes) -> str:
    """The name of a Host header without its port, lower case: "[::1]:8000" -> "::1", "Example:80" -> "example"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class HostCheck:
    """400 for a request whose Host is not one of `allowed` (names without ports; None: any host)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed is None else frozenset(h.lower().strip("[]") for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            name = host_name(_header(scope, b"host") or b"")
            if name not in self.allowed:
                return await send_error(send, 400, f"the Host header {name[:80]!r} is not a name of this server; "
                                        "start it with --allowed-hosts to allow it", "invalid_host")
        await self.app(scope, receive, send)


class JSONOnly:
    """415 for a POST/PUT/PATCH whose Content-Type is not application/json (parameters such as charset allowed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            media = (_header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
            if media != b"application/json":
                return await send_error(send, 415, "send the request body as JSON with 'Content-Type: "
                                        "application/json'", "unsupported_media_type")
        await self.app(scope, receive, send)


class BearerAuth:
    """401 for any request but the public paths (GET / and /health) without `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("BearerAuth needs a non-empty API key")
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (scope["method"] in ("GET", "HEAD") and scope["path"] in PUBLIC_PATHS):
            scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
            # compare_digest on every request, also for a missing header: no early exit to time.
            if not hmac.compare_digest(token.strip(), self.key) or scheme.lower() != b"bearer":
                return await send_error(send, 401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                        "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyLimit:
    """Read the whole request body up front, refusing more than `max_bytes` with 413 and a body that takes
    longer than `timeout` seconds with 408 (a client trickling a byte at a time holds no task for long),
    then replay it."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = None) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"the request body exceeds the server's limit of {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, too_big, "request_too_large")
        body, more = bytearray(), True
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while more:  # a chunked body has no content-length: count as it arrives
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                                        "request_timeout", [(b"connection", b"close")])
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await send_error(send, 413, too_big, "request_too_large")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the disconnect notice, when it comes

        await self.app(scope, replay, send)
