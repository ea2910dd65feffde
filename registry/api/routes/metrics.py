"""GET /metrics: the Prometheus text format, for the admin token or (LOREG_METRICS_PUBLIC) anyone."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import BEARER, Permission
from loreg.registry.observability import render
from loreg.registry.services.tokens import ANONYMOUS, Principal

router = APIRouter(tags=["metrics"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsPermission(Permission):
    """Admin, unless LOREG_METRICS_PUBLIC lets a scraper on a private network in without a token."""

    def __init__(self) -> None:
        super().__init__("admin")

    async def __call__(
        self, request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None
    ) -> Principal:
        if request.app.state.settings.metrics_public and "authorization" not in request.headers:
            return ANONYMOUS
        return await super().__call__(request, _declared)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def scrape(request: Request, _principal: Annotated[Principal, Depends(MetricsPermission())]) -> Response:
    body = await run_in_threadpool(render, request.app.state.registry.engine)
    return Response(body, media_type=CONTENT_TYPE)
