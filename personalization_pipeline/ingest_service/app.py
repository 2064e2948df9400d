"""The webhook ingest service: an ASGI app that lands authenticated events durably.

Endpoints:

- ``POST /v1/batch`` -- track batches, HTTP Basic auth with a write key as user name.
- ``POST /webhooks/shopify`` -- Shopify-shaped webhooks, HMAC-SHA256 over the raw body.
- ``POST /webhooks/mailchimp/{secret}`` -- Mailchimp webhooks (form-encoded); ``GET``
  answers 200 so Mailchimp can validate the URL.
- ``GET /health`` -- JSON: landing dir writable, counters. ``GET /metrics`` -- the same
  counters in Prometheus text format.

A request is answered 2xx only after its events are fsynced in the landing zone (see
``landing.py``). Every line written there is one envelope::

    {"v": 1, "delivery_id": ..., "transport": "track"|"shopify"|"mailchimp",
     "topic": ..., "received_at": "2026-11-28T10:00:00.123456Z",
     "headers": {...non-secret transport headers...}, "payload": {...}}

Bad input gets a 4xx with ``{"error": "<reason>"}`` and never echoes a secret; the
Mailchimp secret in the URL is also kept out of the access log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .config import IngestConfig
from .landing import LandingClosedError, LandingWriter, encode_lines
from .s3_upload import S3Uploader

log = logging.getLogger(__name__)
access_log = logging.getLogger("personalization_pipeline.ingest_service.access")

ENVELOPE_VERSION = 1
SHOPIFY_TOPICS = frozenset(
    {"orders/create", "orders/cancelled", "checkouts/create", "customers/update", "customers/redact"}
)
"""Topics the pipeline maps. Other authentic topics are still landed (and rejected with a
reason by ``core.events``), so a new subscription is visible rather than bounced."""
MAILCHIMP_TYPES = frozenset({"subscribe", "unsubscribe", "cleaned", "profile", "upemail"})
_MAX_FORM_FIELDS = 1000


class ApiError(Exception):
    """A client error answered with ``{"error": reason}``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


_second_cache: tuple[int, str] = (-1, "")


def format_received_at(epoch: float) -> str:
    """Epoch seconds -> ISO 8601 UTC with microseconds, e.g. 2026-11-28T10:00:00.000000Z."""
    global _second_cache
    second = math.floor(epoch)
    micros = int((epoch - second) * 1_000_000)
    cached_second, prefix = _second_cache
    if second != cached_second:  # strftime per request showed in profiles
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, prefix)
    return f"{prefix}.{micros:06d}Z"


def _head_json(fields: dict[str, Any]) -> bytes:
    """An envelope without its payload, as JSON text missing the closing brace."""
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":"))[:-1].encode("ascii")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _secret_matches(candidate: bytes, digests: tuple[bytes, ...]) -> bool:
    """Constant-time membership: compares fixed-length digests, never stops early."""
    got = _digest(candidate)
    ok = False
    for expected in digests:
        ok |= hmac.compare_digest(got, expected)
    return ok


def _headers(request: Request) -> dict[str, str]:
    """The request headers as a plain dict (lower-case names; the first of repeats wins).
    Starlette's ``Headers`` scans a list on every lookup, which shows at 2k requests/s."""
    out: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        key = name.decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


def _media_type(headers: dict[str, str]) -> tuple[str, str | None]:
    raw = headers.get("content-type", "")
    parts = [p.strip() for p in raw.split(";")]
    media = parts[0].lower()
    charset = None
    for p in parts[1:]:
        name, _, value = p.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media, charset


def _require_media_type(headers: dict[str, str], expected: str) -> None:
    media, charset = _media_type(headers)
    if media != expected:
        raise ApiError(415, f"Content-Type must be {expected}")
    if charset not in (None, "utf-8", "utf8"):
        raise ApiError(415, "charset must be utf-8")


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_json(body: bytes | str) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many int digits
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid UTF-8 JSON"
        raise ApiError(400, f"malformed JSON body: {reason}") from None


def _parse_triggered_at(value: str) -> float | None:
    try:
        when = datetime.fromisoformat(value.strip())
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    except (ValueError, OverflowError):
        return None


def parse_form(body: str) -> dict[str, Any]:
    """A PHP-style form body (``data[merges][FNAME]=Ann``) -> nested dicts.

    Repeated keys become lists; ``a=1&a[b]=2`` (a value that is both a scalar and a
    mapping) raises ``ValueError``.
    """
    result: dict[str, Any] = {}
    pairs = parse_qsl(
        body, keep_blank_values=True, strict_parsing=False, max_num_fields=_MAX_FORM_FIELDS
    )
    for key, value in pairs:
        head, bracket, rest = key.partition("[")
        path = [head]
        if bracket:
            if not rest.endswith("]"):
                path = [key]
            else:
                path.extend(rest[:-1].split("]["))
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"form field {key!r} conflicts with a scalar field")
            node = child
        leaf = path[-1]
        if leaf in node:
            existing = node[leaf]
            if isinstance(existing, dict):
                raise ValueError(f"form field {key!r} conflicts with a nested field")
            if isinstance(existing, list):
                existing.append(value)
            else:
                node[leaf] = [existing, value]
        else:
            node[leaf] = value
    return result


class _Counters:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.events_accepted: dict[str, int] = {"track": 0, "shopify": 0, "mailchimp": 0}
        self.rejected: dict[tuple[str, int, str], int] = {}
        self.bytes_received = 0
        self.started_at = time.time()

    def count_rejected(self, route: str, status: int, reason: str) -> None:
        # The reason without request-specific details (indexes, sizes), so labels stay few.
        label = re.sub(r"\[\d+\]|\b\d+\b", "N", reason.split(":")[0])[:80]
        key = (route, status, label)
        self.rejected[key] = self.rejected.get(key, 0) + 1

    def count_request(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), n in sorted(self.requests.items()):
            by_route.setdefault(route, {})[str(status)] = n
        return {"requests": by_route, "events_accepted": dict(self.events_accepted)}


def _route_label(path: str) -> str:
    if path.startswith("/webhooks/mailchimp/") or path == "/webhooks/mailchimp":
        return "/webhooks/mailchimp"
    if path in ("/v1/batch", "/webhooks/shopify", "/health", "/metrics"):
        return path
    return "other"


class _AccessLog:
    """Counts every response by route and status and logs it with secrets redacted."""

    def __init__(self, app: Any, counters: _Counters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_label(scope.get("path", ""))
            self.counters.count_request(route, status_holder[0])
            if access_log.isEnabledFor(logging.INFO):
                shown = route if route != "other" else "<other>"
                access_log.info(
                    "%s %s %d %.1fms",
                    scope.get("method"),
                    shown,
                    status_holder[0],
                    (time.perf_counter() - started) * 1000,
                )


def create_app(
    config: IngestConfig,
    *,
    clock: Callable[[], float] = time.time,
    writer: LandingWriter | None = None,
) -> Starlette:
    """Build the ingest ASGI app. The landing writer starts and stops with the lifespan.

    ``clock`` (epoch seconds) stamps ``received_at`` and checks the replay window.
    """
    uploader = (
        S3Uploader(
            config.landing_dir, config.s3_bucket, config.s3_prefix, endpoint_url=config.s3_endpoint_url
        )
        if config.s3_bucket
        else None
    )
    writer = writer or LandingWriter(
        config.landing_dir,
        rotate_bytes=config.rotate_bytes,
        rotate_seconds=config.rotate_seconds,
        on_publish=uploader.submit if uploader is not None else None,
    )
    counters = _Counters()
    write_key_digests = tuple(_digest(k.encode("utf-8")) for k in sorted(config.write_keys))
    mailchimp_digests = (_digest(config.mailchimp_webhook_secret.encode("utf-8")),)
    shopify_key = config.shopify_secret.encode("utf-8")
    limit = config.max_body_bytes
    window = config.replay_window_seconds

    async def read_body(request: Request, headers: dict[str, str]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
            if n < 0:
                raise ApiError(400, "invalid Content-Length header")
            if n > limit:
                raise ApiError(413, f"body larger than {limit} bytes")
        chunks = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "client disconnected before the body was complete") from None
        request.state.body_read = True
        counters.bytes_received += size
        return b"".join(chunks)

    def encode(envelopes: list[dict[str, Any]]) -> bytes:
        try:
            return encode_lines(envelopes)
        except (ValueError, RecursionError):
            raise ApiError(
                400, "body cannot be stored as JSON (a number out of range, or nested too deeply)"
            ) from None

    async def land(data: bytes, count: int, transport: str) -> Response:
        try:
            await writer.append_bytes_async(data)
        except (LandingClosedError, OSError) as exc:
            log.error("landing failed, answering 503: %s", exc)
            return _error(503, "landing zone unavailable", {"Retry-After": "1"})
        counters.events_accepted[transport] += count
        return Response(b'{"accepted":%d}' % count, media_type="application/json")

    def handle_errors(endpoint: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ApiError as exc:
                counters.count_rejected(_route_label(request.url.path), exc.status, exc.reason)
                headers = dict(exc.headers or {})
                if not getattr(request.state, "body_read", False):
                    # The rest of the body is still on the wire: do not read it (it may be
                    # huge) and do not keep the connection in an unknown state.
                    headers["Connection"] = "close"
                return _error(exc.status, exc.reason, headers)

        wrapped.__name__ = endpoint.__name__
        wrapped.__doc__ = endpoint.__doc__
        return wrapped

    @handle_errors
    async def track_batch(request: Request) -> Response:
        """Track batches: one envelope per message, all fsynced before the 200."""
        h = _headers(request)
        key = _basic_user(h.get("authorization"))
        if key is None or not _secret_matches(key.encode("utf-8"), write_key_digests):
            raise ApiError(
                401, "invalid or missing write key", {"WWW-Authenticate": 'Basic realm="ingest"'}
            )
        _require_media_type(h, "application/json")
        body = await read_body(request, h)
        doc = _parse_json(body)
        if not isinstance(doc, dict):
            raise ApiError(400, "body must be a JSON object with a 'batch' list")
        batch = doc.get("batch")
        if not isinstance(batch, list):
            raise ApiError(400, "'batch' must be a list of messages")
        for i, message in enumerate(batch):
            if not isinstance(message, dict):
                raise ApiError(400, f"batch[{i}] is not a JSON object")
        received_at = format_received_at(clock())
        headers: dict[str, Any] = {}
        if doc.get("sentAt") is not None:
            headers["batch_sent_at"] = doc["sentAt"]
        envelopes = [
            {
                "v": ENVELOPE_VERSION,
                "delivery_id": _delivery_id(m.get("messageId")),
                "transport": "track",
                "topic": "track",
                "received_at": received_at,
                "headers": headers,
                "payload": m,
            }
            for m in batch
        ]
        return await land(encode(envelopes), len(envelopes), "track")

    @handle_errors
    async def shopify_webhook(request: Request) -> Response:
        """Shopify-shaped webhooks: HMAC over the raw body, then headers and freshness."""
        h = _headers(request)
        signature = h.get("x-shopify-hmac-sha256")
        if not signature:
            raise ApiError(401, "missing X-Shopify-Hmac-Sha256 signature")
        _require_media_type(h, "application/json")
        body = await read_body(request, h)
        expected = base64.b64encode(hmac.new(shopify_key, body, hashlib.sha256).digest())
        if not hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace")):
            raise ApiError(401, "invalid X-Shopify-Hmac-Sha256 signature")
        required = {}
        for name in (
            "X-Shopify-Topic",
            "X-Shopify-Webhook-Id",
            "X-Shopify-Triggered-At",
            "X-Shopify-Shop-Domain",
        ):
            value = h.get(name.lower(), "").strip()
            if not value:
                raise ApiError(400, f"missing required header {name}")
            required[name] = value
        triggered = _parse_triggered_at(required["X-Shopify-Triggered-At"])
        if triggered is None:
            raise ApiError(400, "X-Shopify-Triggered-At is not an ISO 8601 time")
        now = clock()
        if abs(now - triggered) > window:
            raise ApiError(401, "X-Shopify-Triggered-At is outside the replay window")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "malformed JSON body: not valid UTF-8") from None
        doc = _parse_json(text)
        if not isinstance(doc, dict):
            raise ApiError(400, "body must be a JSON object")
        headers = {
            "shop_domain": required["X-Shopify-Shop-Domain"],
            "triggered_at": required["X-Shopify-Triggered-At"],
        }
        for name, key in (
            ("X-Shopify-API-Version", "api_version"),
            ("X-Shopify-Event-Id", "event_id"),
        ):
            if h.get(name.lower()):
                headers[key] = h[name.lower()]
        head = _head_json(
            {
                "v": ENVELOPE_VERSION,
                "delivery_id": required["X-Shopify-Webhook-Id"],
                "transport": "shopify",
                "topic": required["X-Shopify-Topic"],
                "received_at": format_received_at(now),
                "headers": headers,
            }
        )
        # The payload is the body exactly as signed, not a re-encoding: it parsed as
        # strict JSON, so raw CR/LF can only be whitespace between tokens and removing
        # them keeps one envelope per line without changing a single value.
        payload = body.replace(b"\n", b"").replace(b"\r", b"")
        return await land(head + b',"payload":' + payload + b"}\n", 1, "shopify")

    @handle_errors
    async def mailchimp_webhook(request: Request) -> Response:
        """Mailchimp webhooks: secret in the URL; GET is Mailchimp's URL validation."""
        secret = request.path_params.get("secret", "")
        if not _secret_matches(secret.encode("utf-8", "replace"), mailchimp_digests):
            raise ApiError(401, "invalid webhook secret")
        if request.method in ("GET", "HEAD"):
            return JSONResponse({"ok": True})
        h = _headers(request)
        _require_media_type(h, "application/x-www-form-urlencoded")
        body = await read_body(request, h)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "form body is not valid UTF-8") from None
        try:
            form = parse_form(text)
        except ValueError as exc:
            raise ApiError(400, f"malformed form body: {exc}") from None
        kind = form.get("type")
        if not isinstance(kind, str) or not kind.strip():
            raise ApiError(400, "missing form field 'type'")
        envelope = {
            "v": ENVELOPE_VERSION,
            "delivery_id": hashlib.sha256(body).hexdigest(),
            "transport": "mailchimp",
            "topic": kind.strip(),
            "received_at": format_received_at(clock()),
            "headers": {},
            "payload": form,
        }
        return await land(encode([envelope]), 1, "mailchimp")

    async def health(request: Request) -> Response:
        writable = writer.writable()
        body = {
            "status": "ok" if writable else "degraded",
            "landing_dir": str(config.landing_dir),
            "landing_dir_writable": writable,
            "uptime_seconds": round(time.time() - counters.started_at, 3),
            "counters": {**counters.snapshot(), "landing": writer.snapshot()},
        }
        if uploader is not None:
            body["s3_upload"] = uploader.snapshot()
        return JSONResponse(body, status_code=200 if writable else 503)

    async def metrics(request: Request) -> Response:
        lines = [
            "# TYPE ingest_requests_total counter",
            *(
                f'ingest_requests_total{{route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(counters.requests.items())
            ),
            "# TYPE ingest_events_accepted_total counter",
            *(
                f'ingest_events_accepted_total{{transport="{t}"}} {n}'
                for t, n in sorted(counters.events_accepted.items())
            ),
        ]
        lines += ["# TYPE ingest_rejected_total counter"]
        lines += [
            f'ingest_rejected_total{{route="{route}",status="{status}",reason="{reason}"}} {n}'
            for (route, status, reason), n in sorted(counters.rejected.items())
        ]
        lines += ["# TYPE ingest_received_bytes_total counter", f"ingest_received_bytes_total {counters.bytes_received}"]
        for name, value in writer.snapshot().items():
            if name in ("open_file_age_seconds", "fsync_seconds_max"):
                lines += [f"# TYPE ingest_landing_{name} gauge", f"ingest_landing_{name} {value}"]
            elif name == "fsync_seconds_sum":
                lines += [f"# TYPE ingest_landing_{name} counter", f"ingest_landing_{name} {value}"]
            elif isinstance(value, int):
                kind = "gauge" if name in ("open_file_bytes", "pending_appends") else "counter"
                suffix = "" if kind == "gauge" else "_total"
                lines += [
                    f"# TYPE ingest_landing_{name}{suffix} {kind}",
                    f"ingest_landing_{name}{suffix} {value}",
                ]
        lines.append(f"ingest_landing_writable {int(writer.writable())}")
        if uploader is not None:
            up = uploader.snapshot()
            lines += [
                "# TYPE ingest_s3_uploaded_total counter",
                f"ingest_s3_uploaded_total {up['uploaded']}",
                "# TYPE ingest_s3_upload_errors_total counter",
                f"ingest_s3_upload_errors_total {up['upload_errors']}",
                "# TYPE ingest_s3_pending_uploads gauge",
                f"ingest_s3_pending_uploads {up['pending_uploads']}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        reason = {404: "not found", 405: "method not allowed"}.get(exc.status_code)
        return _error(exc.status_code, reason or str(exc.detail), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s: %r", _route_label(request.url.path), exc)
        return _error(500, "internal error")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        if uploader is not None:
            uploader.start()  # first: queues what an earlier run published but never uploaded
        published = writer.start()
        if published:
            log.info("published %d leftover landing file(s) from %s", len(published), "open/")
        try:
            yield
        finally:
            writer.close()
            if uploader is not None:
                uploader.close()

    app = Starlette(
        routes=[
            Route("/v1/batch", track_batch, methods=["POST"]),
            Route("/webhooks/shopify", shopify_webhook, methods=["POST"]),
            Route("/webhooks/mailchimp/{secret}", mailchimp_webhook, methods=["GET", "POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.writer = writer
    app.state.uploader = uploader
    app.state.counters = counters
    app.add_middleware(_AccessLog, counters=counters)
    return app


def _basic_user(header: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (the write key), or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user = decoded.partition(":")[0]
    return user or None


def _delivery_id(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; raises ``OSError`` (e.g. EADDRINUSE) on failure."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections queue from now on, even during start-up
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class IngestServiceHandle:
    """A running ingest service (uvicorn in a background thread)."""

    def __init__(self, app: Starlette, server: Any, thread: threading.Thread, host: str, port: int):
        self.app = app
        self.server = server
        self.thread = thread
        self.host = host
        self.port = port
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{port}"

    @property
    def writer(self) -> LandingWriter:
        return self.app.state.writer

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish in-flight requests, publish the open landing file."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("ingest service did not stop in time")

    def __enter__(self) -> "IngestServiceHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_ingest_service(
    config: IngestConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    clock: Callable[[], float] = time.time,
    log_level: str = "warning",
    startup_timeout: float = 15.0,
) -> IngestServiceHandle:
    """Serve ``create_app(config)`` with uvicorn in a daemon thread and wait until it listens.

    ``port=0`` picks a free port; the handle's ``url`` names it. Use as a context manager
    or call ``stop()``, which also publishes the open landing file.
    """
    import uvicorn

    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    app = create_app(config, clock=clock)
    uv_config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,  # uvicorn's access log would print the Mailchimp secret path
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # nothing here reads the client address
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"ingest-{actual_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("ingest service failed to start (see the log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("ingest service did not start in time")
        time.sleep(0.01)
    return IngestServiceHandle(app, server, thread, host, actual_port)
