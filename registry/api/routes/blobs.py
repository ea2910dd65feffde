"""Blob uploads, presence checks and mounts, each for one adapter (an OCI repository), plus the
admin-only uploads of base weights, which belong to no adapter.

Knowing a digest grants nothing: an upload is read and verified unless the adapter already holds
the blob, a check answers for that adapter only, and a mount needs read access to the source.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import AdminDep, BlobsDep, WriteDep
from loreg.registry.api.schemas import (
    BlobAdopt,
    BlobCheck,
    BlobCheckResult,
    BlobMount,
    BlobPublic,
    BlobStage,
    BlobStaged,
)
from loreg.registry.api.streaming import consume_body
from loreg.registry.errors import DeniedError, RequestInvalidError, TooLargeError
from loreg.registry.formats import names
from loreg.registry.services.blobs import BlobService
from loreg.registry.services.direct_uploads import DirectUploadService
from loreg.registry.services.tokens import Principal
from loreg.registry.storage.protocol import check_digest

router = APIRouter(tags=["blobs"])

OCTET_BODY = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "required": True}}


@router.post("/v1/adapters/{namespace}/{name}/blobs:check", response_model=BlobCheckResult)
async def check_blobs(namespace: str, name: str, body: BlobCheck, blobs: BlobsDep, _p: WriteDep) -> BlobCheckResult:
    """Which of these digests this adapter does not hold (upload or mount those, then commit).
    Blobs other adapters hold count as missing: the answer reveals nothing about them."""
    names.check_name(namespace, name)
    missing = await run_in_threadpool(blobs.missing, body.digests, link=(namespace, name))
    return BlobCheckResult(missing=missing, direct_upload=DirectUploadService(blobs.registry).available)


@router.post("/v1/adapters/{namespace}/{name}/blobs:stage", response_model=BlobStaged)
async def stage_blob(namespace: str, name: str, body: BlobStage, blobs: BlobsDep, principal: WriteDep) -> BlobStaged:
    """Presigned part URLs to upload one file straight to storage (when the server offers direct
    uploads: see ``direct_upload`` in blobs:check). Nothing is a blob until it is adopted."""
    names.check_name(namespace, name)
    direct = DirectUploadService(blobs.registry)
    staged = await run_in_threadpool(
        direct.stage, principal.token_id, (namespace, name), body.digest, body.size,
        part_size=body.part_size, part_sha256=body.part_sha256,
    )
    return BlobStaged(nonce=staged.nonce, upload_id=staged.upload_id, part_size=staged.part_size, urls=staged.urls)


@router.post(
    "/v1/adapters/{namespace}/{name}/blobs:adopt",
    response_model=BlobPublic,
    status_code=201,
    responses={200: {"model": BlobPublic}},
)
async def adopt_blob(namespace: str, name: str, body: BlobAdopt, blobs: BlobsDep, principal: WriteDep) -> JSONResponse:
    """Verify a file this token staged (read once: digest, size, format, values), store it as the
    blob and link it to this adapter; a staged file that fails is deleted."""
    names.check_name(namespace, name)
    direct = DirectUploadService(blobs.registry)
    size, _ = await run_in_threadpool(
        direct.adopt, principal.token_id, (namespace, name), body.digest, body.size, body.nonce, body.upload_id
    )
    return _blob_response(body.digest, size, created=True)


@router.put(
    "/v1/adapters/{namespace}/{name}/blobs/{digest}",
    response_model=BlobPublic,
    status_code=201,
    responses={200: {"model": BlobPublic}},
    openapi_extra=OCTET_BODY,
)
async def upload_blob(namespace: str, name: str, digest: str, request: Request, blobs: BlobsDep, _p: WriteDep) -> JSONResponse:
    """Upload one file for this adapter. The server reads the whole body and hashes it; the blob is
    linked to the adapter only if the digest and size match (storage keeps one copy of any bytes).
    A blob the adapter already holds is answered at once (200)."""
    names.check_name(namespace, name)
    check_digest(digest)
    size = _declared_size(request, blobs)
    if await run_in_threadpool(blobs.linked, namespace, name, digest):
        stat = await run_in_threadpool(blobs.registry.store.stat, digest)
        return _blob_response(digest, stat.size, created=False)
    stored, _ = await consume_body(request, lambda stream: blobs.upload(digest, stream, size, link=(namespace, name)))
    # 201: the adapter holds the blob now (whether storage already had the bytes is not said)
    return _blob_response(digest, stored, created=True)


@router.post("/v1/adapters/{namespace}/{name}/blobs:mount", response_model=BlobPublic, status_code=201)
async def mount_blob(
    namespace: str, name: str, body: BlobMount, blobs: BlobsDep, principal: WriteDep
) -> JSONResponse:
    """Link a blob that another adapter holds, without sending its bytes. The token must be able to
    read that adapter, and that adapter must hold the blob."""
    names.check_name(namespace, name)
    source = names.split_name(body.from_)
    principal.require("read", *source)
    if await run_in_threadpool(blobs.linked, namespace, name, body.digest):
        stat = await run_in_threadpool(blobs.registry.store.stat, body.digest)
        return _blob_response(body.digest, stat.size, created=False)
    size = await run_in_threadpool(blobs.mount, namespace, name, body.digest, source)
    return _blob_response(body.digest, size, created=True)


@router.post("/v1/base-models/blobs:check", response_model=BlobCheckResult)
async def check_base_blobs(body: BlobCheck, blobs: BlobsDep, principal: AdminDep) -> BlobCheckResult:
    """Which of these digests storage lacks, for a base model's weights (an admin of every namespace)."""
    _require_global_admin(principal)
    missing = await run_in_threadpool(blobs.missing, body.digests)
    return BlobCheckResult(missing=missing)


@router.put(
    "/v1/base-models/blobs/{digest}",
    response_model=BlobPublic,
    status_code=201,
    responses={200: {"model": BlobPublic}},
    openapi_extra=OCTET_BODY,
)
async def upload_base_blob(digest: str, request: Request, blobs: BlobsDep, principal: AdminDep) -> JSONResponse:
    """Upload one file of a base model's weights. The body is always read and verified."""
    _require_global_admin(principal)
    check_digest(digest)
    size = _declared_size(request, blobs)
    stored, created = await consume_body(request, lambda stream: blobs.upload(digest, stream, size))
    return _blob_response(digest, stored, created=created)


def _require_global_admin(principal: Principal) -> None:
    # base weights are shared by every namespace (exports copy them into merged models): only an
    # admin who can read every namespace may vouch for stored bytes as a base's
    if principal.namespaces:
        raise DeniedError(
            "base model weights need an admin token for every namespace",
            hint="use an admin token created without --namespace",
        )


def _declared_size(request: Request, blobs: BlobService) -> int | None:
    length = request.headers.get("content-length")
    if length is None:
        return None
    if not length.isdigit() or len(length) > 18:
        raise RequestInvalidError("invalid Content-Length")
    size = int(length)
    limit = blobs.registry.settings.max_file_size
    if size > limit:
        raise TooLargeError(f"upload of {size} bytes is over the limit of {limit}", detail={"limit": limit})
    return size


def _blob_response(digest: str, size: int, *, created: bool) -> JSONResponse:
    return JSONResponse(BlobPublic(digest=digest, size=size, created=created).model_dump(), status_code=201 if created else 200)
