"""Request limits, enforced before a route (or its authentication) runs: body size, and no NUL
character in the URL (Postgres text cannot hold U+0000, so a NUL in a query filter or path id
would otherwise end as a database error and a 500).

JSON bodies are held in memory whole by the framework, so they get ``max_json_body``; a base
model's tensor list is the one large JSON body (DeepSeek-V3 lists ~90k tensors, ~25 MB), so base
registration gets ``BASE_BODY_FACTOR`` times that. Blob uploads are streamed and capped by
``max_file_size`` in their route (GuardedStream), and a preflight validation body by the config
and header size limits in its route, so they pass through here untouched.

A declared Content-Length over the limit is answered at once, without reading a byte; a chunked
body is counted as it arrives and refused when it crosses the limit.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loreg.registry.api.errors import error_response
from loreg.registry.errors import RequestInvalidError, TooLargeError

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
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int | None]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            await error_response(RequestInvalidError("NUL characters are refused in URLs"))(scope, receive, send)
            return
        limit = self.limit_for(scope)
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(_too_large(limit))
            response.headers["Connection"] = "close"  # the unread body must not be parsed as a request
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(_too_large(limit))
            return message

        await self.app(scope, limited, send)


class BodyTooLarge(HTTPException):
    """Carries TOO_LARGE through the framework's body reader, which lets only HTTPException pass
    unchanged; the error handler answers with the carried error."""

    def __init__(self, error: TooLargeError):
        super().__init__(status_code=413, detail=error.message)
        self.loreg_error = error


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(f"request body is over the limit of {limit} bytes", detail={"limit": limit})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() and len(text) <= 18 else None
    return None
