"""Blob presence checks and streamed uploads."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import BlobsDep, WriteDep
from loreg.registry.api.schemas import BlobCheck, BlobCheckResult, BlobPublic
from loreg.registry.api.streaming import consume_body
from loreg.registry.errors import RequestInvalidError, TooLargeError
from loreg.registry.storage.base import check_digest

router = APIRouter(tags=["blobs"])


@router.post("/v1/blobs:check", response_model=BlobCheckResult)
async def check_blobs(body: BlobCheck, blobs: BlobsDep, _p: WriteDep) -> BlobCheckResult:
    """Which of these digests the store lacks (upload those, then commit)."""
    missing = await run_in_threadpool(blobs.missing, body.digests)
    return BlobCheckResult(missing=missing)


@router.put(
    "/v1/blobs/{digest}",
    response_model=BlobPublic,
    status_code=201,
    responses={200: {"model": BlobPublic}},
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "required": True}},
)
async def upload_blob(digest: str, request: Request, blobs: BlobsDep, _p: WriteDep) -> JSONResponse:
    """Upload one blob. The server hashes while it writes and keeps it only if the digest matches."""
    check_digest(digest)
    length = request.headers.get("content-length")
    size: int | None = None
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise RequestInvalidError("invalid Content-Length")
        size = int(length)
        limit = blobs.registry.settings.max_file_size
        if size > limit:
            raise TooLargeError(f"upload of {size} bytes is over the limit of {limit}", detail={"limit": limit})
    if await run_in_threadpool(blobs.exists, digest):
        stored, created = await run_in_threadpool(blobs.upload, digest, None, size)  # type: ignore[arg-type]
    else:
        stored, created = await consume_body(request, lambda stream: blobs.upload(digest, stream, size))
    body = BlobPublic(digest=digest, size=stored, created=created)
    return JSONResponse(body.model_dump(), status_code=201 if created else 200)
