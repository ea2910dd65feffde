"""Exports: merge adapters into a stored base on demand; poll; download the merged model."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loreg.registry.api.deps import ReadDep
from loreg.registry.api.schemas import ExportCreate, ExportList, ExportPublic
from loreg.registry.api.streaming import verified_download
from loreg.registry.errors import CombinationInvalidError
from loreg.registry.formats import names
from loreg.registry.merge.combine import CombineParams
from loreg.registry.services.exports import ExportService, WeightedRef

router = APIRouter(tags=["exports"])


def _svc(request: Request) -> ExportService:
    return request.app.state.exports


@router.post("/v1/exports", response_model=ExportPublic, status_code=202, responses={200: {"model": ExportPublic}})
def create_export(body: ExportCreate, request: Request, principal: ReadDep) -> JSONResponse:
    """Queue a merge of versions the token can read (202 with the job), or answer it from a stored result (200).

    A read-scoped token may have a bounded number of jobs queued or running (429 past it).
    """
    for a in body.adapters:
        ref = names.parse_reference(a.ref)
        principal.require("read", ref.namespace, ref.name)
    combination = None
    if body.method != "linear_delta":
        combination = CombineParams(
            method=body.method, weights=tuple(a.weight for a in body.adapters), density=body.density,
            majority_sign_method=body.majority_sign_method, svd_rank=body.svd_rank, svd_clamp=body.svd_clamp,
            seed=body.seed,
        )
    elif any(v is not None for v in (body.density, body.majority_sign_method, body.svd_rank, body.svd_clamp, body.seed)):
        raise CombinationInvalidError(
            "combination parameters need a method", detail={"parameter": "method"},
            hint="name a method (e.g. ties), or drop the parameters for the weighted sum",
        )
    answer = _svc(request).request(
        [WeightedRef(ref=a.ref, weight=a.weight) for a in body.adapters], principal, base=body.base, dtype=body.dtype,
        combination=combination,
    )
    out = ExportPublic.model_validate(answer.export)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.state == "done" else 202)


@router.get("/v1/exports/{export_id}", response_model=ExportPublic)
def get_export(export_id: str, request: Request, principal: ReadDep) -> ExportPublic:
    """State (queued, running, done, failed with the reason), progress, and the result's files."""
    svc = _svc(request)
    svc.authorize(export_id, principal)
    return ExportPublic.model_validate(svc.get(export_id))


@router.get(
    "/v1/exports/{export_id}/files/{path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_export_file(export_id: str, path: str, request: Request, principal: ReadDep) -> StreamingResponse:
    """A file of a finished export, verified while sent (a corrupt blob aborts the connection)."""
    svc = _svc(request)
    svc.authorize(export_id, principal)
    entry = svc.file_entry(export_id, path)
    headers = {"Content-Length": str(entry.size), "ETag": f'"{entry.digest}"', "X-Loreg-Digest": entry.digest}
    stream = request.app.state.registry.store.open(entry.digest)
    return StreamingResponse(verified_download(stream, entry.digest), media_type="application/octet-stream", headers=headers)


@router.get("/v1/adapters/{namespace}/{name}/versions/{tag}/exports", response_model=ExportList)
def version_exports(namespace: str, name: str, tag: str, request: Request, principal: ReadDep) -> ExportList:
    """Exports that used this version (lineage): only those whose every input the token can read."""
    views = _svc(request).for_version(namespace, name, tag, principal)
    return ExportList(items=[ExportPublic.model_validate(v) for v in views])
