"""Fault injection for the vendor sandboxes, and the ASGI plumbing they share.

`POST /_admin/faults` on a vendor app queues a fault for the next `count` requests whose
path starts with `path_prefix` (and whose method is `method`, when given):

| kind                 | what the matching request gets                                        |
|----------------------|-----------------------------------------------------------------------|
| http_429             | 429 in the vendor's shape with `Retry-After: <retry_after>`            |
| http_500 / http_503  | 500 / 503 in the vendor's shape (503 carries Retry-After)              |
| timeout              | the normal answer, after sleeping `delay_seconds` (default 5)          |
| drop_connection      | the socket is aborted: no status line, no body                         |
| malformed_json       | 200 with the real body cut in half (Content-Length matches the cut)     |
| expire_token         | every issued OAuth access token is invalidated; this request gets 401  |
| mutate_during_paging | the normal answer; then `records` (default 3) records inside the       |
|                      | searched window are edited, so their modified time moves to "now"      |

`/_admin/*` paths are never faulted. `GET /_admin/faults` lists pending faults and the
log of applied ones; `DELETE /_admin/faults` clears both.

`RequestStats` (outermost middleware) counts requests by method, path shape and status,
served at `GET /_admin/stats`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FAULT_KINDS = (
    "http_429",
    "http_500",
    "http_503",
    "timeout",
    "drop_connection",
    "malformed_json",
    "expire_token",
    "mutate_during_paging",
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None,
                  media_type: str = "application/json") -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(body, status_code=status, headers=headers, media_type=media_type)


async def read_json(request: Request) -> Any:
    """The body as JSON; raises ValueError with a readable message."""
    raw = await request.body()
    if not raw.strip():
        raise ValueError("the request body is empty; a JSON body is required")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


@dataclass
class Fault:
    id: int
    kind: str
    count: int
    remaining: int
    path_prefix: str = "/"
    method: str | None = None
    retry_after: float = 1
    delay_seconds: float = 5
    records: int = 3

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(self.path_prefix) and (self.method is None or self.method == method)


class FaultInjector:
    """The queue of pending faults; thread-safe (tests add faults from their own thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []
        self._applied: deque[dict[str, Any]] = deque(maxlen=1000)
        self._next_id = 1

    def add(self, spec: dict[str, Any]) -> Fault:
        if not isinstance(spec, dict):
            raise ValueError("a fault is a JSON object")
        kind = spec.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}; got {kind!r}")
        count = spec.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("count must be a positive integer")
        prefix = spec.get("path_prefix") or "/"
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError("path_prefix must be a path starting with '/'")
        method = spec.get("method")
        if method is not None and not isinstance(method, str):
            raise ValueError("method must be a string such as 'POST'")
        numbers = {}
        for name, default in (("retry_after", 1), ("delay_seconds", 5), ("records", 3)):
            value = spec.get(name, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative number")
            numbers[name] = value
        with self._lock:
            fault = Fault(
                id=self._next_id,
                kind=kind,
                count=count,
                remaining=count,
                path_prefix=prefix,
                method=method.upper() if method else None,
                retry_after=numbers["retry_after"],
                delay_seconds=numbers["delay_seconds"],
                records=int(numbers["records"]),
            )
            self._next_id += 1
            self._pending.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._pending:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._pending.remove(fault)
                    self._applied.append(
                        {"id": fault.id, "kind": fault.kind, "method": method, "path": path, "at": time.time()}
                    )
                    return fault
        return None

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(f) for f in self._pending]

    def applied(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._applied)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self._applied.clear()


class VendorHooks(Protocol):
    """What the fault middleware needs from a vendor app."""

    def fault_error(self, status: int, path: str, retry_after: float) -> Response: ...

    def unauthorized(self) -> Response: ...

    def expire_tokens(self) -> None: ...

    def mutate_during_paging(self, method: str, path: str, query: str, body: bytes, records: int) -> None: ...


async def _send_response(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    await response(scope, receive, send)


class FaultMiddleware:
    """Applies queued faults to matching requests (never to /_admin)."""

    def __init__(self, app: Callable, injector: FaultInjector, hooks: VendorHooks) -> None:
        self.app = app
        self.injector = injector
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_admin"):
            await self.app(scope, receive, send)
            return
        fault = self.injector.take(scope["method"], scope["path"])
        if fault is None:
            await self.app(scope, receive, send)
            return
        kind = fault.kind
        if kind in ("http_429", "http_500", "http_503"):
            status = int(kind[-3:])
            await _send_response(self.hooks.fault_error(status, scope["path"], fault.retry_after), scope, receive, send)
        elif kind == "timeout":
            await asyncio.sleep(fault.delay_seconds)
            await self.app(scope, receive, send)
        elif kind == "drop_connection":
            await self._drop(scope)
        elif kind == "malformed_json":
            await self._truncate(scope, receive, send)
        elif kind == "expire_token":
            self.hooks.expire_tokens()
            await _send_response(self.hooks.unauthorized(), scope, receive, send)
        elif kind == "mutate_during_paging":
            chunks: list[bytes] = []

            async def recording_receive() -> dict[str, Any]:
                message = await receive()
                if message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                return message

            await self.app(scope, recording_receive, send)
            query = scope.get("query_string", b"").decode("latin-1")
            self.hooks.mutate_during_paging(scope["method"], scope["path"], query, b"".join(chunks), fault.records)

    @staticmethod
    async def _drop(scope: Scope) -> None:
        """Abort the TCP connection under uvicorn: the client sees a reset, no response."""
        raw_send = scope.get("sandbox.raw_send")
        cycle = getattr(raw_send, "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is None:
            raise RuntimeError("drop_connection needs uvicorn's transport; not available")
        transport.abort()
        # Tell uvicorn the peer is gone so it does not try to send a 500 afterwards.
        cycle.disconnected = True
        await asyncio.sleep(0)

    async def _truncate(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        cut = bytes(body[: max(1, len(body) // 2)])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(cut)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": cut, "more_body": False})


_ID_SEGMENT = re.compile(r"^(?:[0-9a-f]{32}|[0-9]+|[0-9a-f]{10})$")


def path_shape(path: str) -> str:
    """`/3.0/lists/5f1a3c9e2b/members/<md5>` -> `/3.0/lists/{id}/members/{id}`."""
    return "/".join("{id}" if _ID_SEGMENT.match(part) and part != "3.0" else part for part in path.split("/"))


class RequestStats:
    """Outermost middleware: counts requests, and keeps uvicorn's own `send` in the scope
    (`sandbox.raw_send`) for the drop_connection fault."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["sandbox.raw_send"] = send
        status_box = {"status": 0}

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not scope["path"].startswith("/_admin"):
                key = f"{scope['method']} {path_shape(scope['path'])}"
                status = str(status_box["status"] or "dropped")
                with self._lock:
                    by_status = self.counts.setdefault(key, {})
                    by_status[status] = by_status.get(status, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = {k: dict(v) for k, v in self.counts.items()}
        total = sum(sum(v.values()) for v in counts.values())
        return {"requests": total, "by_endpoint": counts}

    def clear(self) -> None:
        with self._lock:
            self.counts.clear()


def admin_routes(injector: FaultInjector, stats_box: dict[str, RequestStats]) -> list[Route]:
    """`/_admin/faults` (POST, GET, DELETE) and `/_admin/stats` (GET, DELETE)."""

    async def add_faults(request: Request) -> Response:
        try:
            spec = await read_json(request)
            specs = spec if isinstance(spec, list) else [spec]
            faults = [injector.add(s) for s in specs]
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        payload = [asdict(f) for f in faults]
        return json_response(payload if isinstance(spec, list) else payload[0], 201)

    async def list_faults(request: Request) -> Response:
        return json_response({"faults": injector.pending(), "applied": injector.applied()})

    async def clear_faults(request: Request) -> Response:
        injector.clear()
        return Response(status_code=204)

    async def get_stats(request: Request) -> Response:
        stats = stats_box.get("stats")
        return json_response(stats.snapshot() if stats else {"requests": 0, "by_endpoint": {}})

    async def clear_stats(request: Request) -> Response:
        stats = stats_box.get("stats")
        if stats:
            stats.clear()
        return Response(status_code=204)

    return [
        Route("/_admin/faults", add_faults, methods=["POST"]),
        Route("/_admin/faults", list_faults, methods=["GET"]),
        Route("/_admin/faults", clear_faults, methods=["DELETE"]),
        Route("/_admin/stats", get_stats, methods=["GET"]),
        Route("/_admin/stats", clear_stats, methods=["DELETE"]),
    ]


@dataclass
class BuiltApp:
    """A vendor app: the ASGI callable to serve plus its parts."""

    asgi: Callable
    stats: RequestStats
    faults: FaultInjector
    extras: dict[str, Any] = field(default_factory=dict)
