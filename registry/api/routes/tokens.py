"""Token management (admin), and who-am-I for any valid token."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import Field

from loreg.registry.api.deps import AdminDep, ReadDep
from loreg.registry.api.schemas import Response, StrictRequest
from loreg.registry.services.tokens import TokenService

router = APIRouter(tags=["tokens"])


class TokenCreate(StrictRequest):
    scope: str = Field(pattern=r"^(read|write|admin)$")
    namespaces: list[str] = Field(default_factory=list, max_length=32)
    description: str | None = Field(default=None, max_length=256)
    # JSON has no datetime type: an ISO 8601 string is the strict form here
    expires_at: datetime | None = Field(default=None, strict=False)


class TokenPublic(Response):
    id: str
    scope: str
    namespaces: list[str]
    description: str | None
    created_at: datetime | None = None
    expires_at: datetime | None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class TokenCreated(TokenPublic):
    token: str


class TokenList(Response):
    items: list[TokenPublic]


def _svc(request: Request) -> TokenService:
    return request.app.state.tokens


@router.post("/v1/tokens", response_model=TokenCreated, status_code=201)
def create_token(body: TokenCreate, request: Request, _p: AdminDep) -> TokenCreated:
    """Create a token; the response is the only place its secret appears."""
    row, plaintext = _svc(request).create(
        body.scope, body.namespaces, expires_at=body.expires_at, description=body.description
    )
    return TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=plaintext)


@router.get("/v1/tokens", response_model=TokenList)
def list_tokens(request: Request, _p: AdminDep) -> TokenList:
    return TokenList(items=[TokenPublic.model_validate(t) for t in _svc(request).list()])


@router.get("/v1/tokens/self", response_model=TokenPublic)
def token_self(request: Request, p: ReadDep) -> TokenPublic:
    """The token this request authenticated with."""
    return TokenPublic(id=p.token_id, scope=p.scope, namespaces=list(p.namespaces), description=None, expires_at=None)


@router.delete("/v1/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: str, request: Request, _p: AdminDep) -> TokenPublic:
    return TokenPublic.model_validate(_svc(request).revoke(token_id[:64]))
