"""Who is looking at a page: the token kept in an HttpOnly cookie, checked like a bearer token.

The cookie holds the token itself (the server keeps no sessions); it is HttpOnly, SameSite=Strict,
scoped to /ui and Secure over https, so no script and no other site can read or send it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import Permission, client_address
from loreg.registry.errors import DeniedError, RequestInvalidError, UnauthorizedError
from loreg.registry.services.tokens import ANONYMOUS, Principal, TokenService, parse_token

COOKIE = "loreg_ui_token"
PREFIX = "/ui"
MAX_FORM = 4096
# where a login may send the browser back to: a page of this interface, never another host
NEXT_RE = re.compile(r"/ui(?:/[A-Za-z0-9._~:@%/+=,-]*)?(?:\?[A-Za-z0-9._~:@%/+=,&-]*)?")


class LoginRequired(Exception):
    """No usable token: the page answers with a redirect to the login page."""

    def __init__(self, next_path: str, reason: str | None = None):
        super().__init__(reason or "login required")
        self.next_path = next_path
        self.reason = reason


class UiPermission(Permission):
    """A page's permission (tests/security/test_auth.py walks every route for one).

    ``scope=None`` marks the public pages (login, logout): they answer with or without a token.
    """

    def __init__(self, scope: str | None):
        super().__init__(scope or "read")
        self.public = scope is None

    async def __call__(self, request: Request) -> Principal | None:  # type: ignore[override]
        if "token" in request.query_params or "access_token" in request.query_params:
            raise RequestInvalidError("tokens in the URL are refused; log in on /ui/login")
        token = request.cookies.get(COOKIE)
        if self.public:
            return None
        registry = request.app.state.registry
        here = here_path(request)
        if not token:
            if not (registry.settings.anonymous_read and self.scope == "read"):
                raise LoginRequired(here)
            principal = ANONYMOUS
        else:
            principal = await authenticate(request, token, here)
        principal.require(self.scope, request.path_params.get("namespace"), request.path_params.get("name"))
        request.state.principal = principal
        return principal


async def authenticate(request: Request, token: str, here: str) -> Principal:
    """The token's principal, failures counted as the API counts them (a bad cookie is a failed login)."""
    limiter = request.app.state.auth_limiter
    client = client_address(request)
    parsed = parse_token(token)
    token_id = parsed[0] if parsed else None
    limiter.check(client, token_id)
    tokens: TokenService = request.app.state.tokens
    try:
        return await run_in_threadpool(tokens.authenticate, token)
    except UnauthorizedError as exc:
        limiter.failed(client, token_id)
        raise LoginRequired(here, exc.message) from None


def here_path(request: Request) -> str:
    path = request.url.path
    return path + (f"?{request.url.query}" if request.url.query else "")


def safe_next(value: str | None) -> str:
    """``value`` when it names a page of this interface, else the home page (no open redirect)."""
    if value and len(value) <= 1000 and NEXT_RE.fullmatch(value) and "//" not in value and ".." not in value:
        return value
    return PREFIX


def same_origin(request: Request) -> None:
    """Refuse a form posted from another site (login CSRF): browsers send Origin on every POST."""
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site")
    if site not in (None, "same-origin", "none"):
        raise DeniedError("forms of this interface are only accepted from its own pages")
    if origin is not None:
        parts = urlsplit(origin)
        if (parts.scheme, parts.netloc) != (request.url.scheme, request.url.netloc):
            raise DeniedError("forms of this interface are only accepted from its own pages")


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the login form), bounded; the first value of each field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise RequestInvalidError("send the login form as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise RequestInvalidError(f"a form is at most {MAX_FORM} bytes")
    fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=8)
    return {k: v[0] for k, v in fields.items() if v}
