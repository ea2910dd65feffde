"""Liveness and readiness: the public routes of the API (besides its description, api/docs.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import RegistryDep
from loreg.registry.api.schemas import Health, UploadUsage
from loreg.registry.version import loreg_version

router = APIRouter(tags=["health"])
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/ready"})


@router.get("/v1/health", response_model=Health)
async def health() -> Health:
    return Health(status="ok", version=loreg_version())


@router.get("/v1/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(registry: RegistryDep, request: Request) -> JSONResponse:
    """503 when the database or storage is unreachable. Busy upload slots are reported in the body
    with a 200: behind a load balancer, one slow client must not take a whole server out."""
    def probe() -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            with registry.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
            checks["database"] = f"unavailable: {type(exc).__name__}"
        try:
            registry.store.exists("sha256:" + "0" * 64)
            checks["storage"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["storage"] = f"unavailable: {type(exc).__name__}"
        return checks

    checks = await run_in_threadpool(probe)
    ok = all(v == "ok" for v in checks.values())
    uploads = UploadUsage(**request.app.state.upload_slots.usage())
    body = Health(status="ok" if ok else "unavailable", version=loreg_version(), checks=checks, uploads=uploads)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
