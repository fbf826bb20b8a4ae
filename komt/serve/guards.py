"""What every request passes before a route sees it, as plain ASGI middleware (outermost first):

    RequestCounter  counts each answer by route and status code (komt_http_requests_total)
    BearerAuth      with an API key, anything but the chat page without `Authorization: Bearer KEY` gets 401
    BodyLimit       a body over the limit gets 413, before any of it is parsed

The key is compared with `hmac.compare_digest`, whose time does not depend on where the strings differ,
so response timing cannot be used to guess the key byte by byte. The chat page itself (GET /) is public:
it is a static file with no data in it; the page sends the key the user types with every API call.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from komt.serve.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = ("/",)


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


class BearerAuth:
    """401 for any request but the public chat page without `Authorization: Bearer <api_key>`."""

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
    """Read the whole request body up front, refusing more than `max_bytes` with 413, then replay it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"the request body exceeds the server's limit of {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, too_big, "request_too_large")
        body, more = bytearray(), True
        while more:  # a chunked body has no content-length: count as it arrives
            message = await receive()
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
