"""Base models: register (admin), list, show, layout, and the adapters that fit one."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import AdminDep, ReadDep
from loreg.registry.api.schemas import BaseCreate, BaseLayoutPublic, BaseList, BasePublic, Page, VersionSummary
from loreg.registry.errors import DeniedError
from loreg.registry.services.adapters import LookupFilters
from loreg.registry.services.bases import BaseRegistration, BaseService, TensorEntry
from loreg.registry.services.views import StoredFile

router = APIRouter(tags=["base-models"])


def _svc(request: Request) -> BaseService:
    return request.app.state.bases


@router.post("/v1/base-models", response_model=BasePublic, status_code=201, responses={200: {"model": BasePublic}})
def register_base(body: BaseCreate, request: Request, p: AdminDep) -> JSONResponse:
    """Register a base model by content (headers, tensor digests; optionally its uploaded weights)."""
    if body.weights_uploaded and p.namespaces:
        # weights name stored blobs: only an admin of every namespace may vouch for them (exports
        # copy base bytes into merged models)
        raise DeniedError(
            "registering uploaded weights needs an admin token for every namespace",
            hint="use an admin token created without --namespace",
        )
    registration = BaseRegistration(
        name=body.name,
        revision=body.revision,
        config=body.config,
        tensors=[TensorEntry(t.name, t.dtype, list(t.shape), t.file, t.digest) for t in body.tensors],
        files=[StoredFile(path=f.path, size=f.size, digest=f.digest) for f in body.files],
        weights_uploaded=body.weights_uploaded,
    )
    registered = _svc(request).register(registration)
    out = BasePublic.model_validate(registered.base).model_copy(update={"created": registered.created})
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if registered.created else 200)


@router.get("/v1/base-models", response_model=BaseList)
def list_bases(
    request: Request,
    _p: ReadDep,
    layout_digest: Annotated[str | None, Query(max_length=71, description="only bases of this tensor layout")] = None,
) -> BaseList:
    """Every base model; with ``layout_digest`` those that share that layout (a base and its fine-tunes)."""
    return BaseList(items=[BasePublic.model_validate(b) for b in _svc(request).list(layout_digest)])


# the /adapters and /layout routes come first: {ref:path} would swallow their suffix
@router.get("/v1/base-models/{ref:path}/adapters", response_model=Page[VersionSummary])
async def base_adapters(
    ref: str,
    request: Request,
    principal: ReadDep,
    target: Annotated[str | None, Query(max_length=128)] = None,
    max_rank: Annotated[int | None, Query(ge=0, le=1 << 20)] = None,
    order: Literal["asc", "desc"] = "desc",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[VersionSummary]:
    """Adapters validated against this base, then those of other bases with the same layout."""
    validated, layout = await run_in_threadpool(_svc(request).lookup_ids, ref)
    filters = LookupFilters(
        base_ids=validated,
        layout_base_ids=layout,
        target=target,
        max_rank=max_rank,
        order=order,
        allowed=tuple(principal.namespaces) or None,
    )
    page = await run_in_threadpool(request.app.state.adapters.lookup, filters, cursor=cursor, limit=limit)
    return Page[VersionSummary].model_validate(page)


@router.get("/v1/base-models/{ref:path}/layout", response_model=BaseLayoutPublic)
def base_layout(ref: str, request: Request, _p: ReadDep) -> BaseLayoutPublic:
    """The tensor layout (names, dtypes, shapes) and config facts, for client-side validation."""
    return BaseLayoutPublic.model_validate(_svc(request).layout(ref))


@router.get("/v1/base-models/{ref:path}", response_model=BasePublic)
def get_base(ref: str, request: Request, _p: ReadDep) -> BasePublic:
    """A base model by name, name@revision or weights digest."""
    return BasePublic.model_validate(_svc(request).get(ref))
