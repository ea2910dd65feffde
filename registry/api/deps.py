"""Annotated dependencies: the registry, its services, and the permission every route declares."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from loreg.registry.errors import RequestInvalidError, UnauthorizedError
from loreg.registry.services.adapters import AdapterService
from loreg.registry.services.blobs import BlobService
from loreg.registry.services.context import AppContext
from loreg.registry.services.tokens import ANONYMOUS, Principal, TokenService, parse_token


def get_registry(request: Request) -> AppContext:
    return request.app.state.registry


RegistryDep = Annotated[AppContext, Depends(get_registry)]


def get_adapters(request: Request) -> AdapterService:
    return request.app.state.adapters


def get_blobs(request: Request) -> BlobService:
    return request.app.state.blobs


AdaptersDep = Annotated[AdapterService, Depends(get_adapters)]
BlobsDep = Annotated[BlobService, Depends(get_blobs)]


# declares the bearer scheme in OpenAPI (/docs gets an Authorize button); Permission parses the
# header itself so that every malformed form gets loreg's own 401
BEARER = HTTPBearer(auto_error=False, description="A loreg token: loreg_<id>_<secret><checksum>")


class Permission:
    """A route's permission: a scope, checked against the namespace in the path when there is one.

    Every route but the public health checks depends on one; tests/security/test_auth.py walks the routes.
    """

    def __init__(self, scope: str):
        self.scope = scope

    async def __call__(
        self, request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None
    ) -> Principal:
        if "token" in request.query_params or "access_token" in request.query_params:
            raise RequestInvalidError("tokens in the URL are refused; send Authorization: Bearer <token>")
        registry: AppContext = request.app.state.registry
        headers = request.headers.getlist("authorization")
        if len(headers) > 1:
            raise RequestInvalidError("send one Authorization header", detail={"count": len(headers)})
        header = headers[0] if headers else None
        if header is None:
            if registry.settings.anonymous_read and self.scope == "read":
                principal = ANONYMOUS
            else:
                raise UnauthorizedError("authentication required", hint="run loreg login, or set LOREG_TOKEN")
        else:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise UnauthorizedError("use Authorization: Bearer <token>")
            limiter = request.app.state.auth_limiter
            client = client_address(request)
            token = token.strip()
            parsed = parse_token(token)
            token_id = parsed[0] if parsed else None
            limiter.check(client, token_id)
            tokens: TokenService = request.app.state.tokens
            try:
                principal = await run_in_threadpool(tokens.authenticate, token)
            except UnauthorizedError:
                limiter.failed(client, token_id)
                raise
        namespace = request.path_params.get("namespace")
        name = request.path_params.get("name")
        principal.require(self.scope, namespace, name)
        request.state.principal = principal
        return principal


def client_address(request: Request) -> str:
    """The address failed authentications are counted against (X-Forwarded-For only from a trusted proxy)."""
    peer = request.client.host if request.client else "unknown"
    return request.app.state.trusted_proxies.client(peer, request.headers.getlist("x-forwarded-for"))


READ = Permission("read")
WRITE = Permission("write")
ADMIN = Permission("admin")

ReadDep = Annotated[Principal, Depends(READ)]
WriteDep = Annotated[Principal, Depends(WRITE)]
AdminDep = Annotated[Principal, Depends(ADMIN)]
