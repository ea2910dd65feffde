"""Wire models: the REST contract that the server and the CLI share.

Requests are strict (``"r": "8"`` is an error, unknown fields are refused, no NaN or infinity).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

T = TypeVar("T")

Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", max_length=71)]
PartChecksum = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
MetricKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")]


class StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _refuse_nul(cls, data: Any) -> Any:
        # Postgres text cannot hold U+0000: refused here, it would fail the insert with a 500
        if _holds_nul(data):
            raise ValueError("strings may not contain NUL (\\u0000) characters")
        return data


def _holds_nul(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- errors -----------------------------------------------------------------------------------


class ErrorItem(Response):
    code: str
    message: str
    detail: dict[str, Any] = {}


# --- health -----------------------------------------------------------------------------------


class UploadUsage(Response):
    in_use: int
    limit: int
    waiting: int
    exhausted: bool


class Health(Response):
    status: Literal["ok", "unavailable"]
    version: str
    checks: dict[str, str] = {}
    uploads: UploadUsage | None = None  # /v1/ready: upload slots (exhaustion is reported, not a 503)


# --- blobs ------------------------------------------------------------------------------------


class BlobCheck(StrictRequest):
    digests: list[Digest] = Field(max_length=1000)


class BlobCheckResult(Response):
    missing: list[str]
    # the server hands out presigned upload URLs (blobs:stage, then blobs:adopt)
    direct_upload: bool = False


class BlobStage(StrictRequest):
    """With ``part_sha256`` (the base64 sha256 of each ``part_size`` part, as S3 writes it), every
    part URL is signed with its checksum: the part is PUT with ``x-amz-checksum-sha256`` (and
    ``x-amz-sdk-checksum-algorithm: SHA256``), and S3 refuses a part whose bytes differ."""

    digest: Digest
    size: int = Field(ge=0)
    part_size: int | None = Field(default=None, ge=5 << 20, le=5 << 30)
    part_sha256: list[PartChecksum] | None = Field(default=None, min_length=1, max_length=10_000)


class BlobStaged(Response):
    """Upload part ``i + 1`` (``part_size`` bytes, the last one shorter) with a PUT to ``urls[i]``,
    then adopt with ``nonce`` and ``upload_id``."""

    nonce: str
    upload_id: str
    part_size: int
    urls: list[str]


class BlobAdopt(StrictRequest):
    digest: Digest
    size: int = Field(ge=0)
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    upload_id: str = Field(min_length=1, max_length=1024)


class BlobPublic(Response):
    digest: str
    size: int
    created: bool


class BlobMount(StrictRequest):
    """Link a blob another adapter holds (OCI's cross-repository mount); the token must read it."""

    digest: Digest
    from_: str = Field(alias="from", min_length=3, max_length=257)


# --- adapters and versions --------------------------------------------------------------------


class FileEntry(StrictRequest):
    path: str = Field(min_length=1, max_length=128)
    size: int = Field(ge=0)
    digest: Digest


class VersionCreate(StrictRequest):
    files: list[FileEntry] = Field(min_length=1, max_length=256)
    message: str | None = Field(default=None, max_length=4096)
    metrics: dict[MetricKey, float] = Field(default_factory=dict, max_length=256)
    aliases: list[str] = Field(default_factory=list, max_length=32)
    base: str | None = Field(default=None, max_length=300)
    # how the client chose ``base``: named by the user, or matched by content to a local base
    # folder that base_model_name_or_path names (recorded in facts; no base-name warning then)
    base_source: Literal["explicit", "weights", "layout"] | None = None


class FilePublic(Response):
    path: str
    size: int
    digest: str


class MetricPublic(Response):
    key: str
    value: float
    created_at: datetime


class BaseRef(Response):
    weights_digest: str
    layout_digest: str
    names: list[str] = []


class VersionValidation(Response):
    """A preflight's verdict: what the commit would find from these headers (no value checks)."""

    base: BaseRef | None = None
    facts: dict[str, Any]
    warnings: list[Any]


class VersionPublic(Response):
    name: str
    version: int
    digest: str
    size: int
    message: str | None
    created_at: datetime
    files: list[FilePublic]
    config: dict[str, Any]
    facts: dict[str, Any]
    warnings: list[dict[str, Any]]
    metrics: dict[str, float]
    metrics_history: list[MetricPublic]
    aliases: list[str]
    base: BaseRef | None
    made_by: dict[str, Any] | None = None  # lineage: {"kind": "combination", id, method, params, inputs}
    created: bool = False


class ResolveRequest(StrictRequest):
    """References to pin in one request (``loreg sync --watch`` asks for all of its references at once)."""

    refs: list[Annotated[str, Field(max_length=512)]] = Field(min_length=1, max_length=1000)


class ResolvedItem(Response):
    """One reference of a batch: its version, or the error a single request for it would answer."""

    ref: str
    version: VersionPublic | None = None
    error: ErrorItem | None = None


class ResolveAnswer(Response):
    items: list[ResolvedItem]


class VersionSummary(Response):
    name: str
    version: int
    digest: str
    size: int
    created_at: datetime
    rank: int
    lora_alpha: float | None
    target_modules: list[str]
    task_type: str | None
    use_dora: bool
    base: BaseRef | None
    metrics: dict[str, float]
    aliases: list[str]
    warnings: list[dict[str, Any]]
    match: Literal["validated", "layout"] | None = None


class AdapterPublic(Response):
    name: str
    created_at: datetime
    latest: int | None
    aliases: dict[str, int]
    versions: list[VersionSummary]


class Page(Response, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class AliasSet(StrictRequest):
    version: int | str


class AliasEventPublic(Response):
    version: int | None
    actor: str | None
    created_at: datetime


class AliasPublic(Response):
    name: str
    alias: str
    version: int | None
    history: list[AliasEventPublic] = []


class MetricsAdd(StrictRequest):
    metrics: dict[MetricKey, float] = Field(min_length=1, max_length=256)


class DeletedPublic(Response):
    name: str
    version: int
    deleted: bool = True


class AdapterDeletedPublic(Response):
    name: str
    versions: list[int]  # the numbers deleted; none of them is given again
    deleted: bool = True


# --- base models ------------------------------------------------------------------------------


class BaseTensor(StrictRequest):
    name: str = Field(min_length=1, max_length=512)
    dtype: str = Field(min_length=1, max_length=16)
    shape: list[Annotated[int, Field(ge=0, le=1 << 48)]] = Field(max_length=32)
    file: str = Field(min_length=1, max_length=128)
    digest: Digest


class BaseCreate(StrictRequest):
    name: str = Field(min_length=1, max_length=200)
    revision: str | None = Field(default=None, max_length=128)
    config: dict[str, Any] = Field(default_factory=dict)
    tensors: list[BaseTensor] = Field(min_length=1, max_length=200_000)
    files: list[FileEntry] = Field(min_length=1, max_length=4096)
    weights_uploaded: bool = False


class BasePublic(Response):
    weights_digest: str
    layout_digest: str
    names: list[str]
    model_type: str | None
    architectures: list[str]
    tensor_count: int
    parameter_count: int
    weights_uploaded: bool
    files: list[dict[str, Any]]
    created_at: datetime
    created: bool = False


class BaseLayoutPublic(Response):
    weights_digest: str
    layout_digest: str
    model_type: str | None
    architectures: list[str]
    config: dict[str, Any]
    tensors: list[list[Any]]


class BaseList(Response):
    items: list[BasePublic]


# --- exports ----------------------------------------------------------------------------------


class ExportAdapter(StrictRequest):
    ref: str = Field(min_length=3, max_length=300)
    # inf and NaN pass here (1e400 parses as inf) so that the server refuses every bad weight the same way:
    # 422 with the bound (LOREG_MAX_EXPORT_WEIGHT)
    weight: float = Field(default=1.0, allow_inf_nan=True)


class ExportCreate(StrictRequest):
    adapters: list[ExportAdapter] = Field(min_length=1, max_length=16)
    base: str | None = Field(default=None, max_length=300)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # a combination method (POST /v1/combinations' methods) applied before the merge; "linear_delta" (the
    # default): the weighted sum of the adapters' changes
    method: str = Field(default="linear_delta", max_length=32)
    density: float | None = None
    majority_sign_method: str | None = Field(default=None, max_length=16)
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None


class ExportInputPublic(Response):
    name: str | None
    version: int | None
    digest: str
    weight: float


class ExportPublic(Response):
    id: str
    state: Literal["queued", "running", "done", "failed"]
    request_digest: str
    base: BaseRef
    adapters: list[ExportInputPublic]
    dtype: str
    combination: dict[str, Any] | None = None  # {method, params} when the adapters were combined first
    progress: dict[str, Any]
    error: dict[str, Any] | None
    files: list[FilePublic]
    device: str | None
    attempts: int
    loreg_version: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExportList(Response):
    items: list[ExportPublic]


class CombinationInputCreate(StrictRequest):
    ref: str = Field(min_length=3, max_length=300)
    # inf and NaN pass here so that every bad weight gets the combination's own refusal (COMBINATION_INVALID)
    weight: float = Field(default=1.0, allow_inf_nan=True)


class CombinationCreate(StrictRequest):
    inputs: list[CombinationInputCreate] = Field(min_length=1, max_length=16)
    method: str = Field(max_length=32)
    density: float | None = None
    majority_sign_method: str | None = Field(default=None, max_length=16)
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None
    to: str = Field(min_length=3, max_length=160)
    aliases: list[Annotated[str, Field(max_length=64)]] = Field(default=[], max_length=16)


class CombinationInputPublic(Response):
    name: str
    version: int
    digest: str
    weight: float


class CombinationPublic(Response):
    id: str
    state: Literal["queued", "running", "done", "failed"]
    request_digest: str
    method: str
    params: dict[str, Any]
    inputs: list[CombinationInputPublic]
    to: str
    aliases: list[str]
    base: BaseRef | None
    version: int | None
    progress: dict[str, Any]
    error: dict[str, Any] | None
    device: str | None
    attempts: int
    loreg_version: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# --- diff ---------------------------------------------------------------------------------------


class DiffSidePublic(Response):
    name: str
    version: int
    digest: str
    base_digest: str | None
    layout_digest: str | None


class ModuleDiffPublic(Response):
    """One module adapted in both versions; φ(i) = ||U1_iᵀ U2_i||²_F / i (Hu et al. 2021, §7.2)."""

    module: str
    layer_type: str | None
    rank_a: int
    rank_b: int
    norm_a: float = Field(description="||ΔW1||_F (scaling included)")
    norm_b: float
    relative_change: float | None = Field(description="||ΔW2 − ΔW1||_F / ||ΔW1||_F; null when ΔW1 = 0")
    cosine: float | None = Field(description="<ΔW1, ΔW2> / (||ΔW1|| ||ΔW2||); null when either is 0")
    similarity_in: float | None = Field(description="φ at i = min(r1, r2), right singular vectors (lora_A rows)")
    similarity_out: float | None = Field(description="φ at i = min(r1, r2), left singular vectors (lora_B columns)")
    curve_in: list[float] = Field(description="φ(i) for i = 1..min(r1, r2), input side")
    curve_out: list[float] = Field(description="φ(i) for i = 1..min(r1, r2), output side")
    dora: bool = Field(description="DoRA module: the LoRA delta is compared, the magnitudes are not")


class DiffPublic(Response):
    first: DiffSidePublic
    second: DiffSidePublic
    base_match: Literal["weights", "layout"]
    modules: list[ModuleDiffPublic]
    added: list[str] = Field(description="modules adapted in the second version only")
    removed: list[str] = Field(description="modules adapted in the first version only")
    skipped: list[str] = Field(description="modules whose factors are too large to read here")
    dora: bool
