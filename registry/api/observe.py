"""Every request gets an id (X-Request-ID), one JSON access-log line and its metrics.

Outermost of our middlewares, so it sees requests the limits refuse. Metric labels are route
templates (``/v1/adapters/{namespace}/{name}``), never raw paths: a client choosing names must not
be able to grow the number of series.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loreg.registry.observability import REQUEST_ID, metrics, request_id_from

access = logging.getLogger("loreg.access")
UNMATCHED = "<unmatched>"


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def token_id(scope: Scope) -> str | None:
    principal = scope.get("state", {}).get("principal")
    return getattr(principal, "token_id", None)


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id_from(header)
        REQUEST_ID.set(rid)  # the task's context: error envelopes built below read it
        scope.setdefault("state", {})["request_id"] = rid
        seen: dict[str, Any] = {"status": 500, "received": 0, "sent": 0}
        started = time.perf_counter()

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["received"] += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                seen["sent"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            self._record(scope, rid, seen, time.perf_counter() - started)

    @staticmethod
    def _record(scope: Scope, rid: str, seen: dict[str, Any], seconds: float) -> None:
        route, method, status = route_template(scope), scope["method"], seen["status"]
        m = metrics()
        m.requests.labels(method=method, route=route, status=str(status)).inc()
        m.latency.labels(method=method, route=route).observe(seconds)
        m.received.labels(route=route).inc(seen["received"])
        m.sent.labels(route=route).inc(seen["sent"])
        if access.isEnabledFor(logging.INFO):
            access.info(json.dumps({
                "request_id": rid, "method": method, "route": route, "status": status,
                "duration_ms": round(seconds * 1000, 2), "token_id": token_id(scope),
                "bytes_in": seen["received"], "bytes_out": seen["sent"],
            }, separators=(",", ":")))
