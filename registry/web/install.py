"""Mount the web interface on the API app: pages, static assets, security headers, HTML error pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loreg.registry.errors import LoregError
from loreg.registry.web import charts
from loreg.registry.web.auth import COOKIE, PREFIX, LoginRequired

HERE = Path(__file__).resolve().parent
STATIC = f"{PREFIX}/static"
# no script at all, styles and images from this server only, no framing, forms post only here
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class PageHeaders:
    """Adds the interface's security headers (CSP first) to every answer under /ui and to /."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/" or path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
                if not path.startswith(STATIC):
                    message["headers"].append((b"cache-control", b"no-store"))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    env.filters["fmt"] = charts.fmt
    env.filters["short"] = lambda d: (d or "")[:19] if str(d).startswith("sha256:") else d
    env.filters["bytes"] = human_bytes
    env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M UTC") if isinstance(t, datetime) else "–"
    return env


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _is_page(request: Request) -> bool:
    path = request.url.path
    return path == PREFIX or path.startswith(PREFIX + "/")


def install_ui(app: FastAPI) -> None:
    """Serve the interface from ``app`` (after the API's error handlers are installed)."""
    from loreg.registry.web import pages

    app.state.ui_templates = templates()
    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(pages.router)
    app.add_middleware(PageHeaders)

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        query = {"next": exc.next_path, **({"reason": exc.reason} if exc.reason else {})}
        resp = RedirectResponse(f"{PREFIX}/login?{urlencode(query)}", status_code=303)
        if exc.reason:  # the cookie's token no longer works: drop it
            resp.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return resp

    app.add_exception_handler(LoginRequired, login_required)
    for kind in (LoregError, RequestValidationError, StarletteHTTPException, Exception):
        api_handler = app.exception_handlers[kind]
        app.add_exception_handler(kind, _page_or(api_handler))


def _page_or(api_handler: Callable[[Request, Any], Awaitable[Response] | Response]) -> Any:
    """An error handler that answers pages with an HTML page and everything else as the API does."""

    async def handle(request: Request, exc: Exception) -> Response:
        answer = api_handler(request, exc)
        resp = await answer if isinstance(answer, Awaitable) else answer
        if not _is_page(request):
            return resp
        from loreg.registry.web.pages import render

        error = getattr(exc, "message", None) if isinstance(exc, LoregError) else None
        code = exc.code if isinstance(exc, LoregError) else None
        if error is None:
            error = {404: "no such page", 405: "method not allowed"}.get(resp.status_code, "the request failed")
        hint = exc.hint if isinstance(exc, LoregError) else None
        page = render(request, "error.html", status=resp.status_code, status_code=resp.status_code, code=code,
                      message=error, hint=hint)
        for name in ("retry-after", "allow"):
            if name in resp.headers:
                page.headers[name] = resp.headers[name]
        return page

    return handle
