"""Request limits, enforced before a route (or its authentication) runs: body size, and no NUL
character in the URL (Postgres text cannot hold U+0000, so a NUL in a query filter or path id
would otherwise end as a database error and a 500).

JSON bodies are held in memory whole by the framework, so they get ``max_json_body``; a base
model's tensor list is the one large JSON body (DeepSeek-V3 lists ~90k tensors, ~25 MB), so base
registration gets ``BASE_BODY_FACTOR`` times that. Blob uploads are streamed and capped by
``max_file_size`` in their route (services/blobs.py CheckedStream), and a preflight validation body by the config
and header size limits in its route, so here they only get the idle timeout.

A declared Content-Length over the limit is answered at once, without reading a byte; a chunked
body is counted as it arrives and refused when it crosses the limit.

Every body, streamed upload or JSON, authenticated or not, is cut with 408 (and the connection
closed) when no chunk arrives for ``idle_timeout_s``: a client that stops sending must not hold a
connection, an upload slot or a worker thread forever. JSON bodies are read here whole (the
framework would hold them whole anyway) and refused when an object repeats a key: Python's json
keeps the last value, so ``{"scope": "read", "scope": "admin"}`` would mean what no reader of the
request sees first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loreg.registry.api.errors import error_response
from loreg.registry.errors import (
    DuplicateKeyError,
    LoregError,
    RequestInvalidError,
    RequestTimeoutError,
    TooLargeError,
)

BASE_BODY_FACTOR = 64


def body_limit_for(max_json_body: int) -> Callable[[Scope], int | None]:
    def limit(scope: Scope) -> int | None:
        method, path = scope["method"], scope["path"]
        if method == "PUT" and "/blobs/" in path:
            return None
        if method == "POST" and path.endswith("/versions:validate"):
            return None  # bounded in its route by the config and header size limits
        if method == "POST" and path == "/v1/base-models":
            return max_json_body * BASE_BODY_FACTOR
        return max_json_body

    return limit


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int | None], idle_timeout_s: float = 30.0):
        self.app = app
        self.limit_for = limit_for
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            await error_response(RequestInvalidError("NUL characters are refused in URLs"))(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if limit is not None and declared is not None and declared > limit:
            await _refuse(_too_large(limit), scope, receive, send)
            return
        received = 0
        body_done = False
        timed_out = False

        async def guarded() -> Message:
            nonlocal received, body_done, timed_out
            if body_done:  # later calls wait for a disconnect, which may take as long as the response
                return await receive()
            try:
                async with asyncio.timeout(self.idle_timeout_s):  # a timer, not a task per chunk
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise BodyCut(_timed_out(self.idle_timeout_s)) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request" and limit is not None:
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyCut(_too_large(limit))
            return message

        async def closing(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                # the rest of a stalled body must not be parsed as the next request
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        if limit is not None and _has_body(scope) and _is_json(scope):
            try:
                body = await _read_all(guarded)
            except BodyCut as cut:
                await _refuse(cut.loreg_error, scope, receive, send)
                return
            if body is None:  # the client went away
                return
            duplicate = _duplicate_key(body)
            if duplicate is not None:
                await error_response(duplicate)(scope, receive, send)
                return
            await self.app(scope, _replay(body, receive), send)
            return
        await self.app(scope, guarded, closing)


async def _refuse(error: LoregError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(error)
    response.headers["Connection"] = "close"  # the unread body must not be parsed as a request
    await response(scope, receive, send)


async def _read_all(receive: Callable[[], Any]) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def _duplicate_key(body: bytes) -> DuplicateKeyError | None:
    """The duplicate-key refusal, if an object in ``body`` repeats a key. A body that is not JSON
    passes: the route's own parser answers it as it always has."""
    try:
        json.loads(body, object_pairs_hook=_unique_pairs)
    except _Duplicate as dup:
        return DuplicateKeyError(
            f"the JSON body repeats the key {dup.key[:100]!r}", detail={"key": dup.key[:200]},
            hint="send each key once per object",
        )
    except (ValueError, RecursionError):
        pass
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: Scope) -> bool:
    return _header(scope, b"transfer-encoding") is not None or (_content_length(scope) or 0) > 0


def _is_json(scope: Scope) -> bool:
    # the framework's rule: no Content-Type, application/json or application/*+json is parsed as JSON
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return not content_type or content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


class BodyCut(HTTPException):
    """Carries TOO_LARGE or REQUEST_TIMEOUT through the framework's body reader, which lets only
    HTTPException pass unchanged; the error handler answers with the carried error."""

    def __init__(self, error: LoregError):
        super().__init__(status_code=error.status, detail=error.message)
        self.loreg_error = error


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(f"request body is over the limit of {limit} bytes", detail={"limit": limit})


def _timed_out(seconds: float) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"the request body stopped arriving: nothing for {seconds:g} s", detail={"idle_timeout_s": seconds},
        hint="the connection was closed; send the request again",
    )


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() and len(text) <= 18 else None
    return None
