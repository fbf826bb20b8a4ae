"""Bounds on connections, set through uvicorn's own settings: how many, how long idle, how big a header.

    limit_concurrency              beyond this many open connections (or running requests) uvicorn answers 503
    timeout_keep_alive             an idle keep-alive connection closes after this many seconds
    h11_max_incomplete_event_size  a request line + headers larger than this is a 400 (h11 stops buffering)

uvicorn arms its keep-alive timer only after a response, and every byte received disarms it, so a client
that connects and sends nothing, or trickles a header byte at a time (slowloris), holds its socket and a
file descriptor forever; enough of them and `accept()` fails with "Too many open files" while asyncio
logs that, with a traceback, again and again. `RequestDeadlineProtocol` is uvicorn's h11 protocol with
one addition: a request's headers must be complete within `header_timeout` seconds of the connection
opening or of the previous response, or uvicorn's own close runs. (The body has its own deadline in
komt.serve.guards.BodyLimit; a streamed answer is never cut.) `RateLimitFilter` lets one such log line
through per interval and counts the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_KEEP_ALIVE_S = 5
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0  # komt.serve.guards.BodyLimit's, set by create_app
MAX_HEADER_BYTES = 16 * 1024  # h11's default, stated: a request line and headers past it get 400


def _protocol_class(header_timeout: float):
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestDeadlineProtocol(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose request headers are not complete in time."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            self._arm_header_deadline()  # the next request on this connection has the same deadline
            super().on_response_complete()  # (which parses a pipelined next request at once, disarming it)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_header_deadline()  # a request arrived whole: its headers are in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            if not self.transport.is_closing():
                self._header_deadline = self.loop.call_later(header_timeout, self.timeout_keep_alive_handler)

        def _disarm_header_deadline(self) -> None:
            deadline = getattr(self, "_header_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._header_deadline = None

    return RequestDeadlineProtocol


class RateLimitFilter(logging.Filter):
    """Let a record whose message contains one of `needles` through once per `interval` seconds; count the rest.

    The next record let through says how many were dropped since the last one.
    """

    def __init__(self, needles: tuple[str, ...], interval: float = 10.0) -> None:
        super().__init__()
        self.needles, self.interval = needles, interval
        self.suppressed = 0
        self._last = -float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
        if not any(n in text for n in self.needles):
            return True
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} similar messages suppressed in the last {self.interval:g} s)"
            self.suppressed = 0
        return True


# What asyncio logs when accept() fails for lack of file descriptors (EMFILE / ENFILE).
OUT_OF_FILES = ("Too many open files", "out of system resource")


def install_log_limits(interval: float = 10.0) -> RateLimitFilter:
    """Rate-limit the out-of-file-descriptors lines on the loggers that print them (once per process)."""
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        for existing in logger.filters:
            if isinstance(existing, RateLimitFilter):
                return existing
    limiter = RateLimitFilter(OUT_OF_FILES, interval)
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(limiter)
    return limiter


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    keep_alive: float = DEFAULT_KEEP_ALIVE_S,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    **kwargs: Any,
) -> Any:
    """A `uvicorn.Config` for `app` with the connection bounds of the module docstring."""
    import uvicorn

    install_log_limits()
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=_protocol_class(header_timeout),
        limit_concurrency=max_connections, timeout_keep_alive=keep_alive,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=kwargs.pop("graceful", 5),
        **kwargs,
    )
