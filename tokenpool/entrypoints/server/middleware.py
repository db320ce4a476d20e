"""One pure-ASGI middleware in front of the routes: API key, body size limit, concurrency limit, metrics.

(Pure ASGI rather than Starlette's BaseHTTPMiddleware: it adds microseconds, not a task per request.)
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tokenpool.entrypoints.server.errors import error_body
from tokenpool.entrypoints.server.metrics import ServerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Routes open without an API key.
PUBLIC_PATHS = frozenset({"/health"})


class _BodyTooLarge(Exception):
    pass


LOAD_KEY = "tokenpool.load"  # scope key: {"submitted": bool} of a model request


class Load:
    """Model requests in flight (`active`) and those of them that have queued their work in the engine
    (`submitted`; `mark_submitted` from the route, undone by the middleware when the answer is sent).
    Their difference, the requests still being read or tokenized, is the engine's hint of what is coming."""

    __slots__ = ("active", "submitted")

    def __init__(self) -> None:
        self.active = 0
        self.submitted = 0

    def expected(self) -> int:
        return self.active - self.submitted

    def mark_submitted(self, scope: Scope) -> None:
        mark = scope.get(LOAD_KEY)
        if mark is not None and not mark["submitted"]:
            mark["submitted"] = True
            self.submitted += 1


class GuardMiddleware:
    """Checks, in order: API key (401), declared body size (413), concurrency (429); counts bytes as the
    body streams in (413 past the limit); records per-route metrics for every answer.

    limited_paths: the routes that do model work; only they count against `max_concurrent_requests` (and
        in `load.active`).
    known_paths: route labels for metrics (anything else is labelled "other").
    """

    def __init__(self, app: Callable, *, metrics: ServerMetrics, load: Load, known_paths: frozenset[str],
                 limited_paths: frozenset[str], api_key: str | None = None,
                 max_body_bytes: int | None = None, max_concurrent: int | None = None):
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths
        self.limited_paths = limited_paths
        self.expected_auth = ("Bearer " + api_key).encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = path if path in self.known_paths else "other"
        start = time.perf_counter()
        state = {"status": 500, "started": False, "too_large": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["too_large"]:  # the app answered a body it could not read: say why
                    state["status"] = 413
                    state["started"] = True
                    await _send_error(send, 413, self._too_large_message())
                    return
                state["status"] = message["status"]
                state["started"] = True
            elif state["too_large"]:
                return
            await send(message)

        limited = path in self.limited_paths
        counted = False
        mark: dict = {}
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            if self.expected_auth is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
                state["status"] = 401
                await _send_error(send, 401, "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                                  {"www-authenticate": "Bearer"})
                return
            if self.max_body_bytes is not None:
                declared = _content_length(scope)
                if declared is not None and declared > self.max_body_bytes:
                    state["status"] = 413
                    await _send_error(send, 413, self._too_large_message(declared))
                    return
                receive = self._limited_receive(receive, state)
            if limited:
                if self.max_concurrent is not None and self.load.active >= self.max_concurrent:
                    state["status"] = 429
                    await _send_error(send, 429, f"Too many concurrent requests: this server serves at most "
                                                 f"{self.max_concurrent} at once. Retry later.",
                                      {"retry-after": "1"})
                    return
                self.load.active += 1
                counted = True
                scope[LOAD_KEY] = mark = {"submitted": False}  # set by the route once it has queued its work
            try:
                await self.app(scope, receive, send_wrapper)
            except _BodyTooLarge:
                if not state["started"]:
                    state["status"] = 413
                    await _send_error(send, 413, self._too_large_message())
        finally:
            if counted:
                self.load.active -= 1
                if mark["submitted"]:
                    self.load.submitted -= 1
            metrics.in_flight.dec()
            metrics.requests.labels(route, method, str(state["status"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected_auth)
        return False

    def _limited_receive(self, receive: Receive, state: dict) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    state["too_large"] = True
                    raise _BodyTooLarge()
            return message

        return wrapped

    def _too_large_message(self, declared: int | None = None) -> str:
        size = f" ({declared} bytes)" if declared is not None else ""
        return (f"Request body too large{size}: this server accepts at most {self.max_body_bytes} bytes "
                "(--max-request-body-bytes).")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = error_body(status, message)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
