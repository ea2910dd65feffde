"""The error envelope: every error, ours or the framework's, leaves as {"errors": [...]}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loreg.registry.errors import (
    ConflictError,
    DbUnavailableError,
    DeniedError,
    InternalError,
    LoregError,
    MethodNotAllowedError,
    NotFoundError,
    RequestInvalidError,
    RequestTimeoutError,
    TooLargeError,
    TooManyRequestsError,
    UnauthorizedError,
)
from loreg.registry.observability import REQUEST_ID, STORAGE_ERROR_CODES, metrics, request_id_from

log = logging.getLogger("loreg.api")

# statuses Starlette raises by itself that the table holds a generic code for
FRAMEWORK_STATUSES: dict[int, type[LoregError]] = {
    401: UnauthorizedError,
    403: DeniedError,
    408: RequestTimeoutError,
    409: ConflictError,
    429: TooManyRequestsError,
}


def error_response(err: LoregError) -> JSONResponse:
    """The envelope, with the request's id (ObservabilityMiddleware set it) for the user to quote."""
    headers = {}
    body = err.envelope()
    request_id = REQUEST_ID.get()
    if request_id is not None:
        body["request_id"] = request_id
        headers["X-Request-ID"] = request_id
    if err.code in STORAGE_ERROR_CODES:
        metrics().storage_errors.labels(kind=err.code).inc()
    if isinstance(err, UnauthorizedError):
        headers["WWW-Authenticate"] = 'Bearer realm="loreg"'
    if err.status in (429, 503):
        headers["Retry-After"] = str(err.detail.get("retry_after", 5))
    return JSONResponse(body, status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoregError)
    async def _loreg(_request: Request, exc: LoregError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "message": str(e.get("msg", ""))[:300], "type": e.get("type")}
            for e in exc.errors()[:20]
        ]
        first = problems[0] if problems else {"loc": [], "message": "invalid request"}
        where = ".".join(first["loc"][1:] if len(first["loc"]) > 1 else first["loc"])
        return error_response(RequestInvalidError(f"{where}: {first['message']}", detail={"problems": problems}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError("no such route"))
        carried = getattr(exc, "loreg_error", None)  # raised through the framework's body reader
        if isinstance(carried, LoregError):
            return error_response(carried)
        if exc.status_code == 413:
            return error_response(TooLargeError(str(exc.detail)))
        if exc.status_code == 405:
            resp = error_response(MethodNotAllowedError(f"{_request.method} is not allowed on this route"))
            if exc.headers and "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        # one code, one status: a framework status with no code of its own is a malformed request
        # (any 4xx) or our fault (any 5xx), answered with that code's status
        generic = FRAMEWORK_STATUSES.get(exc.status_code)
        if generic is None:
            generic = RequestInvalidError if exc.status_code < 500 else InternalError
        return error_response(generic(str(exc.detail)))

    @app.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
        return error_response(DbUnavailableError("the database is unavailable; retry shortly"))

    @app.exception_handler(IntegrityError)
    async def _conflict(_request: Request, exc: IntegrityError) -> JSONResponse:
        log.warning("integrity conflict: %s", str(exc.orig)[:200])
        return error_response(ConflictError("a concurrent change conflicted with this request; retry it"))

    @app.exception_handler(DBAPIError)
    async def _db_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(DbUnavailableError("the database connection was lost; retry shortly"))
        return _internal(exc)

    @app.exception_handler(Exception)
    async def _unknown(_request: Request, exc: Exception) -> JSONResponse:
        return _internal(exc)


def _internal(exc: Exception) -> JSONResponse:
    request_id = REQUEST_ID.get()
    if request_id is None:  # raised outside ObservabilityMiddleware (it is outermost but one)
        request_id = request_id_from(None)
        REQUEST_ID.set(request_id)
    log.error("unhandled error (request %s)", request_id, exc_info=exc)
    return error_response(InternalError("internal error", detail={"request_id": request_id}))
