"""Adapters, versions, files, aliases and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from loreg.registry.api.deps import AdaptersDep, ReadDep, RegistryDep, WriteDep
from loreg.registry.api.schemas import (
    ErrorItem,
    AdapterDeletedPublic,
    AdapterPublic,
    AliasPublic,
    AliasSet,
    DeletedPublic,
    DiffPublic,
    MetricsAdd,
    Page,
    ResolveAnswer,
    ResolvedItem,
    ResolveRequest,
    VersionCreate,
    VersionPublic,
    VersionSummary,
    VersionValidation,
)
from loreg.registry.api.streaming import UNSATISFIABLE, byte_range, verified_download
from loreg.registry.errors import DeniedError, LoregError, TooLargeError
from loreg.registry.formats import names, preflight
from loreg.registry.formats.fingerprint import canonical_json, sha256_digest
from loreg.registry.services.adapters import LookupFilters, PushRequest
from loreg.registry.services.diff import diff_versions
from loreg.registry.services.views import StoredFile

router = APIRouter(tags=["adapters"])
STREAM_CHUNK = 1 << 20


@router.get("/v1/adapters", response_model=Page[VersionSummary])
async def list_adapters(
    adapters: AdaptersDep,
    principal: ReadDep,
    namespace: Annotated[str | None, Query(max_length=64)] = None,
    base: Annotated[str | None, Query(max_length=300, description="base model name, name@revision or weights digest")] = None,
    target: Annotated[str | None, Query(max_length=128)] = None,
    min_rank: Annotated[int | None, Query(ge=0, le=1 << 20)] = None,
    max_rank: Annotated[int | None, Query(ge=0, le=1 << 20)] = None,
    dora: bool | None = None,
    task_type: Annotated[str | None, Query(max_length=64)] = None,
    metric: Annotated[str | None, Query(max_length=128, description="sort by this metric's latest value")] = None,
    metric_min: Annotated[float | None, Query(description="only with metric: lower bound")] = None,
    metric_max: Annotated[float | None, Query(description="only with metric: upper bound")] = None,
    order: Annotated[
        Literal["asc", "desc"] | None,
        Query(description="default: asc by a metric whose name contains 'loss', else desc; no metric: newest first"),
    ] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    all_versions: bool = False,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[VersionSummary]:
    """Find adapter versions: by namespace, base model, rank, target module, DoRA, task, metrics, text.

    Each adapter contributes its newest matching version unless ``all_versions``. Sorted by a
    metric, versions without it come last (in either direction); bounds need ``metric``.
    """
    if namespace is not None:
        principal.require("read", namespace)
    filters = LookupFilters(
        namespace=namespace,
        base=base,
        target=target,
        min_rank=min_rank,
        max_rank=max_rank,
        dora=dora,
        task_type=task_type,
        metric=metric,
        metric_min=metric_min,
        metric_max=metric_max,
        order=order,
        q=q,
        latest_only=not all_versions,
        allowed=tuple(principal.namespaces) or None,
    )
    page = await run_in_threadpool(adapters.lookup, filters, cursor=cursor, limit=limit)
    return Page[VersionSummary].model_validate(page)


@router.get("/v1/adapters/{namespace}/{name}", response_model=AdapterPublic)
def get_adapter(namespace: str, name: str, adapters: AdaptersDep, _p: ReadDep) -> AdapterPublic:
    return AdapterPublic.model_validate(adapters.adapter(namespace, name))


@router.get("/v1/adapters/{namespace}/{name}/versions", response_model=Page[VersionSummary])
def list_versions(
    namespace: str,
    name: str,
    adapters: AdaptersDep,
    _p: ReadDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[VersionSummary]:
    """An adapter's versions, newest first, paginated (``next_cursor``)."""
    return Page[VersionSummary].model_validate(adapters.versions(namespace, name, cursor=cursor, limit=limit))


@router.delete("/v1/adapters/{namespace}/{name}", response_model=AdapterDeletedPublic)
def delete_adapter(namespace: str, name: str, adapters: AdaptersDep, _p: WriteDep) -> AdapterDeletedPublic:
    """Delete every version and alias of an adapter; its version numbers are never given again."""
    full, numbers = adapters.delete_adapter(namespace, name)
    return AdapterDeletedPublic(name=full, versions=numbers)


@router.post(
    "/v1/adapters/{namespace}/{name}/versions",
    response_model=VersionPublic,
    status_code=201,
    responses={200: {"model": VersionPublic, "description": "identical files: the existing version"}},
)
def push_version(namespace: str, name: str, body: VersionCreate, adapters: AdaptersDep, p: WriteDep) -> JSONResponse:
    """Commit a version from uploaded blobs: validated, numbered, immutable."""
    request = PushRequest(
        files=[StoredFile(path=f.path, size=f.size, digest=f.digest) for f in body.files],
        message=body.message,
        metrics=dict(body.metrics),
        aliases=list(body.aliases),
        base=body.base,
        base_source=body.base_source,
    )
    pushed = adapters.push(namespace, name, request, actor=p.token_id)
    out = VersionPublic.model_validate(pushed.version).model_copy(update={"created": pushed.created})
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if pushed.created else 200)


@router.post(
    "/v1/adapters/{namespace}/{name}/versions:validate",
    response_model=VersionValidation,
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "required": True}},
)
async def validate_version(
    namespace: str,
    name: str,
    request: Request,
    adapters: AdaptersDep,
    _p: WriteDep,
    size: Annotated[int, Query(ge=0, le=1 << 62, description="size of adapter_model.safetensors in bytes")],
    base: Annotated[str | None, Query(max_length=300)] = None,
) -> VersionValidation:
    """Validate before uploading: the body is adapter_config.json and the safetensors length prefix
    and header (``u64 LE config length | config | 8-byte N | N header bytes``). Answers with the
    refusal the commit would give from those bytes, or the base and warnings; stores nothing."""
    settings = adapters.registry.settings
    limit = preflight.max_body(settings.max_config_size, settings.max_header_size)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            # the config length leads the body: an over-size config gets the commit's own error
            preflight.config_length(bytes(body[:8]), max_config_size=settings.max_config_size)
            raise TooLargeError(f"a preflight body is at most {limit} bytes", detail={"limit": limit})
    config, prefix = preflight.unpack(
        bytes(body), max_config_size=settings.max_config_size, max_header_size=settings.max_header_size
    )
    verdict = await run_in_threadpool(adapters.validate, namespace, name, config, prefix, size, base)
    return VersionValidation.model_validate(verdict)


@router.get(
    "/v1/adapters/{namespace}/{name}/versions/{tag}",
    response_model=VersionPublic,
    responses={304: {"description": "unchanged since the ETag given in If-None-Match"}},
)
def get_version(namespace: str, name: str, tag: str, request: Request, adapters: AdaptersDep, _p: ReadDep) -> Response:
    """A version by number, alias, ``latest`` or manifest digest.

    The ETag covers the whole answer (which version an alias names, its metrics and aliases), so a
    client following an alias asks again with If-None-Match and gets 304 while nothing moved.
    """
    return _conditional(request, VersionPublic.model_validate(adapters.get(namespace, name, tag)).model_dump(mode="json"))


@router.post(
    "/v1/resolve",
    response_model=ResolveAnswer,
    responses={304: {"description": "unchanged since the ETag given in If-None-Match"}},
)
def resolve_many(body: ResolveRequest, request: Request, adapters: AdaptersDep, principal: ReadDep) -> Response:
    """Pin up to 1000 references at once: each item holds the version or the error a GET of it alone
    would answer. One ETag covers the whole answer, so a follower of many aliases (``loreg sync
    --watch``) makes one conditional request per round, answered 304 while nothing moved.

    A reference the token does not cover answers DENIED whether or not it exists (no existence leaks).
    """
    items: dict[int, ResolvedItem] = {}
    wanted: list[tuple[int, names.Reference]] = []
    for i, ref in enumerate(body.refs):
        try:
            r = names.parse_reference(ref)
            if not principal.covers(r.namespace, r.name):
                label = f"{r.namespace}/{r.name}"
                raise DeniedError(f"this token does not cover {label}", detail={"name": label})
        except LoregError as exc:
            items[i] = _failed(ref, exc)
            continue
        wanted.append((i, r))
    for (i, _), found in zip(wanted, adapters.get_many([r for _, r in wanted]), strict=True):
        ref = body.refs[i]
        if isinstance(found, LoregError):
            items[i] = _failed(ref, found)
        else:
            items[i] = ResolvedItem(ref=ref, version=VersionPublic.model_validate(found))
    return _conditional(request, ResolveAnswer(items=[items[i] for i in range(len(body.refs))]).model_dump(mode="json"))


def _failed(ref: str, exc: LoregError) -> ResolvedItem:
    return ResolvedItem(ref=ref, error=ErrorItem(**exc.to_dict()))


def _conditional(request: Request, body: dict[str, Any]) -> Response:
    """``body`` with a weak ETag over all of it, or 304 when If-None-Match names that ETag."""
    etag = 'W/"' + sha256_digest(canonical_json(body)).removeprefix("sha256:") + '"'
    wanted = _etags(request.headers.get("if-none-match", ""))
    if etag in wanted or "*" in wanted:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse(body, headers={"ETag": etag})


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header, compared weakly (RFC 9110 13.1.2)."""
    tags = {t.strip() for t in header[:2048].split(",") if t.strip()}
    return tags | {f"W/{t}" for t in tags if not t.startswith("W/")}


@router.delete("/v1/adapters/{namespace}/{name}/versions/{tag}", response_model=DeletedPublic)
def delete_version(namespace: str, name: str, tag: str, adapters: AdaptersDep, _p: WriteDep) -> DeletedPublic:
    """Delete a version: it stops resolving, its aliases go, its number is never reused."""
    full, number = adapters.delete_version(namespace, name, tag)
    return DeletedPublic(name=full, version=number)


@router.get(
    "/v1/adapters/{namespace}/{name}/versions/{tag}/files/{path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"content": {"application/octet-stream": {}}}},
)
def download_file(
    namespace: str, name: str, tag: str, path: str, request: Request, adapters: AdaptersDep, registry: RegistryDep, _p: ReadDep
) -> StreamingResponse:
    """A file of a version. Whole-file reads are verified while sent: a corrupt blob aborts the
    connection at the end (the status is already out), so the client never accepts bad bytes."""
    entry = adapters.file_entry(namespace, name, tag, path)
    store = registry.store
    headers = {"ETag": f'"{entry.digest}"', "Accept-Ranges": "bytes", "X-Loreg-Digest": entry.digest}
    span = byte_range(request.headers.get("range"), entry.size)
    if span is not None:
        if span == UNSATISFIABLE:
            return StreamingResponse(iter(()), status_code=416, headers={"Content-Range": f"bytes */{entry.size}"})
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        headers["Content-Length"] = str(end - start)

        def ranged() -> Iterator[bytes]:
            with store.open(entry.digest, start, end) as f:
                while chunk := f.read(STREAM_CHUNK):
                    yield chunk

        return StreamingResponse(ranged(), status_code=206, media_type="application/octet-stream", headers=headers)

    if request.headers.get("x-loreg-direct") == "1" and registry.settings.s3_presign_downloads:
        url = store.presign_get(entry.digest, registry.settings.s3_presign_expires_s)
        if url:
            # the client fetches the bytes from S3 itself and verifies the digest in X-Loreg-Digest
            return RedirectResponse(url, status_code=307, headers={"X-Loreg-Digest": entry.digest})  # type: ignore[return-value]
    headers["Content-Length"] = str(entry.size)
    return StreamingResponse(
        verified_download(store.open(entry.digest), entry.digest), media_type="application/octet-stream", headers=headers
    )


@router.put("/v1/adapters/{namespace}/{name}/aliases/{alias}", response_model=AliasPublic)
def set_alias(namespace: str, name: str, alias: str, body: AliasSet, adapters: AdaptersDep, p: WriteDep) -> AliasPublic:
    """Point an alias at a version (number, another alias or digest); the move is recorded."""
    return AliasPublic.model_validate(adapters.set_alias(namespace, name, alias, str(body.version), actor=p.token_id))


@router.get("/v1/adapters/{namespace}/{name}/aliases/{alias}", response_model=AliasPublic)
def get_alias(namespace: str, name: str, alias: str, adapters: AdaptersDep, _p: ReadDep) -> AliasPublic:
    """An alias, with its history of moves."""
    return AliasPublic.model_validate(adapters.get_alias(namespace, name, alias))


@router.delete("/v1/adapters/{namespace}/{name}/aliases/{alias}", response_model=AliasPublic)
def remove_alias(namespace: str, name: str, alias: str, adapters: AdaptersDep, p: WriteDep) -> AliasPublic:
    return AliasPublic.model_validate(adapters.remove_alias(namespace, name, alias, actor=p.token_id))


@router.post("/v1/adapters/{namespace}/{name}/versions/{tag}/metrics", response_model=VersionPublic)
def add_metrics(namespace: str, name: str, tag: str, body: MetricsAdd, adapters: AdaptersDep, _p: WriteDep) -> VersionPublic:
    """Append evaluations to a version (the version itself never changes)."""
    return VersionPublic.model_validate(adapters.add_metrics(namespace, name, tag, body.metrics))


@router.get("/v1/adapters/{namespace}/{name}/versions/{tag}/inspect")
def inspect_version(namespace: str, name: str, tag: str, request: Request, _p: ReadDep) -> dict[str, Any]:
    """Per adapted module: ||scale·B·A||_F, effective ranks, and ||ΔW||/||W|| when base weights are stored.

    Most-changed modules first; computed from the r x r factors, never the full matrix.
    """
    return request.app.state.inspect.inspect(namespace, name, tag)


@router.get("/v1/adapters/{namespace}/{name}/versions/{tag}/diff/{other:path}", response_model=DiffPublic)
def diff_version(namespace: str, name: str, tag: str, other: str, adapters: AdaptersDep, principal: ReadDep) -> DiffPublic:
    """Compare this version with ``other`` (a full reference: ``ns/name:N``, ``ns/name:ALIAS``, ``ns/name@sha256:…``).

    Per module adapted in both: ||ΔW2 − ΔW1||/||ΔW1||, the cosine of the two ΔW and the normalized
    subspace similarity of their singular directions (input and output side), computed from the
    factors; modules in one version only are listed as added/removed. The token must read both; the
    versions must share a base model (same weights or same layout), else 422 BASE_MISMATCH.
    """
    names.check_name(namespace, name)
    first = names.Reference(namespace, name, names.check_tag(tag))
    second = names.parse_reference(other)
    return DiffPublic.model_validate(diff_versions(adapters, principal, first, second))
