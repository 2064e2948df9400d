"""A JSON webhook sink for alerts: `POST /alerts` (or any path under it) records the JSON
body; `GET /_admin/alerts` returns what arrived, oldest first; `DELETE /_admin/alerts`
forgets it. A body that is not JSON gets 400 and is not recorded."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from personalization_pipeline.sandbox.faults import BuiltApp, FaultInjector, RequestStats, json_response


class AlertSink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alerts: list[dict[str, Any]] = []

    def record(self, path: str, body: Any, headers: dict[str, str]) -> dict[str, Any]:
        entry = {
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
            "path": path,
            "body": body,
            "headers": headers,
        }
        with self._lock:
            self._alerts.append(entry)
        return entry

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._alerts)

    def clear(self) -> None:
        with self._lock:
            self._alerts.clear()


def build_alerts_app(sink: AlertSink) -> BuiltApp:
    async def receive_alert(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return json_response({"ok": False, "error": "the body must be JSON"}, 400)
        headers = {k: v for k, v in request.headers.items() if k in ("content-type", "user-agent")}
        sink.record(request.url.path, body, headers)
        return json_response({"ok": True})

    async def list_alerts(request: Request) -> Response:
        alerts = sink.all()
        return json_response({"total": len(alerts), "alerts": alerts})

    async def clear_alerts(request: Request) -> Response:
        sink.clear()
        return Response(status_code=204)

    routes = [
        Route("/alerts", receive_alert, methods=["POST"]),
        Route("/alerts/{rest:path}", receive_alert, methods=["POST"]),
        Route("/_admin/alerts", list_alerts, methods=["GET"]),
        Route("/_admin/alerts", clear_alerts, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes)
    stats = RequestStats(app)
    return BuiltApp(asgi=stats, stats=stats, faults=FaultInjector())
