"""create_app(settings) -> FastAPI. Nothing is built at import time (asgi.py holds the one app)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from loreg.registry.api.docs import install_docs
from loreg.registry.api.errors import install_error_handlers
from loreg.registry.api.limits import RequestLimitsMiddleware, body_limit_for
from loreg.registry.api.ratelimit import FailureLimiter, TrustedProxies
from loreg.registry.api.observe import ObservabilityMiddleware
from loreg.registry.api.routes import adapters, bases, blobs, combinations, exports, health, metrics, tokens
from loreg.registry.api.streaming import UploadSlots
from loreg.registry.services.adapters import AdapterService
from loreg.registry.services.bases import BaseService
from loreg.registry.services.blobs import BlobService
from loreg.registry.services.browse import BrowseService
from loreg.registry.services.combinations import CombinationService
from loreg.registry.services.exports import ExportService
from loreg.registry.services.inspect import InspectService
from loreg.registry.services.context import AppContext, open_registry
from loreg.registry.services.tokens import TokenService
from loreg.registry.settings import Settings
from loreg.registry.version import loreg_version
from loreg.registry.web.install import install_ui

log = logging.getLogger("loreg")


def create_app(settings: Settings | None = None, *, registry: AppContext | None = None) -> FastAPI:
    """Build the API over ``registry`` (or one opened from ``settings``; its schema must be current)."""
    settings = settings or (registry.settings if registry else Settings())
    owned = registry is None
    reg = registry or open_registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = None
        if settings.export_worker == "inprocess" and importlib.util.find_spec("torch") is not None:
            from loreg.registry.merge.worker import JobWorker
            from loreg.registry.services.jobs import WorkerPool

            pool = WorkerPool(lambda: JobWorker(reg), settings.export_concurrency)
            pool.start()
            app.state.exports.jobs.on_queued.append(pool.notify)
            app.state.combinations.jobs.on_queued.append(pool.notify)
        try:
            yield
        finally:
            if pool is not None:
                pool.shutdown()
            if owned:
                reg.close()

    app = FastAPI(
        title="loreg",
        summary="A registry and versioning service for LoRA adapters",
        version=loreg_version(),
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,
        redoc_url=None,
        # a slash redirect would be built from the Host header; /v1/adapters/ is a 404 instead
        redirect_slashes=False,
    )
    app.state.registry = reg
    app.state.settings = settings
    app.state.blobs = BlobService(reg)
    app.state.tokens = TokenService(reg)
    app.state.auth_limiter = FailureLimiter(settings.auth_max_failures, settings.auth_failure_window_s)
    app.state.trusted_proxies = TrustedProxies(settings.trusted_proxies)
    app.state.upload_slots = UploadSlots(settings.upload_concurrency, wait_s=settings.body_idle_timeout_s)
    app.state.bases = BaseService(reg)
    app.state.adapters = AdapterService(reg, validator=app.state.bases.validate_push)
    app.state.inspect = InspectService(reg)
    app.state.exports = ExportService(reg, app.state.adapters, app.state.bases)
    app.state.combinations = CombinationService(reg)
    app.state.browse = BrowseService(reg, app.state.adapters, app.state.exports)
    install_error_handlers(app)
    app.add_middleware(
        RequestLimitsMiddleware, limit_for=body_limit_for(settings.max_json_body), idle_timeout_s=settings.body_idle_timeout_s
    )
    app.add_middleware(ObservabilityMiddleware)  # added last: outermost, it sees refused requests too
    install_docs(app)
    for module in (health, blobs, adapters, bases, exports, combinations, tokens, metrics):
        app.include_router(module.router)
    install_ui(app)
    return app


def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every APIRoute the app serves. FastAPI >= 0.160 keeps included routers nested in app.routes."""
    from fastapi import routing

    iterate = getattr(routing, "iter_route_contexts", None)
    if iterate is None:
        return [r for r in app.routes if isinstance(r, APIRoute)]
    return [c.original_route for c in iterate(app.routes) if isinstance(c.original_route, APIRoute)]
