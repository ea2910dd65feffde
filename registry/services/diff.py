"""How two versions of adapters on one base differ, per module, from the thin factors alone.

For each module, ΔW = s·B·A (A [r, in], B [out, r]; conv kernels flattened to [r, in·kh·kw]). Nothing of
size out x in is formed:
- norms and the inner product come from r x r Gram matrices: <B1A1, B2A2> = tr((B1ᵀB2)(A2A1ᵀ));
- ||ΔW2 − ΔW1|| is the norm of the small core of the stacked factors [s2B2, −s1B1]·[A2; A1] (after QR of
  both), which stays exact when the two deltas nearly cancel (the Gram form would lose half the digits);
- singular vectors: B = Q_b R_b, Aᵀ = Q_a R_a, svd(s·R_b R_aᵀ) = U_c S V_cᵀ, so ΔW's left singular vectors
  are Q_b U_c (output side, span of B's columns) and its right ones Q_a V_c (input side, span of A's rows).
Conv1D (fan_in_fan_out) and embedding layers store ΔW transposed (PEFT_FORMAT.md §4.2-4.3), but A still
acts on the layer's input and B on its output, and norms and inner products do not change when both
deltas are transposed: one formula serves every layer type. DoRA: only the LoRA delta s·B·A is compared
(the magnitude vectors are not); such modules say ``dora``. lora_B biases are not compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select

from loreg.registry.db.models import Adapter, VersionFile
from loreg.registry.db.models import BaseModelRow
from loreg.registry.errors import BaseMismatchError, ShapeMismatchError
from loreg.registry.formats import names, peft
from loreg.registry.services import resolve
from loreg.registry.services.adapters import AdapterService
from loreg.registry.services.inspect import read_factors
from loreg.registry.services.tokens import Principal


@dataclass(frozen=True)
class DiffSide:
    """One of the two versions compared."""

    name: str
    version: int
    digest: str
    base_digest: str | None
    layout_digest: str | None


@dataclass(frozen=True)
class ModuleDiff:
    """One module present in both versions. Similarities are φ(i) = ||U1_iᵀ U2_i||²_F / i (Hu et al. §7.2)."""

    module: str
    layer_type: str | None
    rank_a: int
    rank_b: int
    norm_a: float  # ||ΔW1||_F
    norm_b: float
    relative_change: float | None  # ||ΔW2 − ΔW1||_F / ||ΔW1||_F; None when ΔW1 = 0
    cosine: float | None  # <ΔW1, ΔW2> / (||ΔW1|| ||ΔW2||); None when either is 0
    similarity_in: float | None  # φ at i = min(r1, r2), right singular vectors (rows of lora_A)
    similarity_out: float | None  # the same, left singular vectors (columns of lora_B)
    curve_in: list[float] = field(default_factory=list)  # φ(i) for i = 1..min(r1, r2)
    curve_out: list[float] = field(default_factory=list)
    dora: bool = False


@dataclass(frozen=True)
class VersionDiff:
    first: DiffSide
    second: DiffSide
    base_match: str  # "weights": same base weights; "layout": same tensor names, dtypes and shapes only
    modules: list[ModuleDiff]
    added: list[str]  # adapted in the second version only
    removed: list[str]  # adapted in the first version only
    skipped: list[str]  # a factor over MAX_FACTOR_BYTES: not read
    dora: bool  # either version uses DoRA (magnitudes not compared)


@dataclass
class _Loaded:
    side: DiffSide
    base_id: int | None
    factors: dict[str, tuple[np.ndarray, np.ndarray, float, bool]]  # module -> (A, B, scale, dora)
    layer_types: dict[str, str]
    skipped: list[str]
    dora: bool

    @property
    def modules(self) -> set[str]:
        return set(self.factors) | set(self.skipped)


@dataclass(frozen=True)
class _Thin:
    a: np.ndarray  # [r, in], float64
    b: np.ndarray  # [out, r], float64
    scale: float
    sv: np.ndarray  # singular values of s·B·A, descending
    left: np.ndarray  # [out, k] left singular vectors
    right: np.ndarray  # [in, k] right singular vectors

    @property
    def norm(self) -> float:
        return float(np.sqrt((self.sv**2).sum()))


def thin(a: np.ndarray, b: np.ndarray, scale: float) -> _Thin:
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    q_b, r_b = np.linalg.qr(b64)
    q_a, r_a = np.linalg.qr(a64.T)
    u, sv, vt = np.linalg.svd(scale * (r_b @ r_a.T))
    return _Thin(a64, b64, scale, sv, q_b @ u, q_a @ vt.T)


def _core_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||B·A||_F via the small core of the thin QRs of B and Aᵀ."""
    r_b = np.linalg.qr(b, mode="r")
    r_a = np.linalg.qr(a.T, mode="r")
    return float(np.linalg.norm(r_b @ r_a.T))


def subspace_curve(u1: np.ndarray, u2: np.ndarray, n: int) -> list[float]:
    """φ(i) = ||U1[:, :i]ᵀ U2[:, :i]||²_F / i for i = 1..n."""
    m = u1[:, :n].T @ u2[:, :n]
    sq = m * m
    return [float(sq[:i, :i].sum() / i) for i in range(1, n + 1)]


def compare_module(module: str, one: _Thin, two: _Thin, *, layer_type: str | None = None, dora: bool = False) -> ModuleDiff:
    """The numbers of one module present in both versions (the shapes of ΔW must agree)."""
    if one.a.shape[1] != two.a.shape[1] or one.b.shape[0] != two.b.shape[0]:
        raise ShapeMismatchError(
            f"{module}: ΔW is {one.b.shape[0]}x{one.a.shape[1]} in one version and {two.b.shape[0]}x{two.a.shape[1]} "
            "in the other",
            detail={"module": module},
        )
    n1, n2 = one.norm, two.norm
    inner = one.scale * two.scale * float(np.trace((one.b.T @ two.b) @ (two.a @ one.a.T)))
    diff = _core_norm(np.vstack([two.a, one.a]), np.hstack([two.scale * two.b, -one.scale * one.b]))
    n = min(len(one.sv), len(two.sv))
    curve_in = subspace_curve(one.right, two.right, n) if n1 > 0 and n2 > 0 else []
    curve_out = subspace_curve(one.left, two.left, n) if n1 > 0 and n2 > 0 else []
    return ModuleDiff(
        module=module,
        layer_type=layer_type,
        rank_a=int(one.a.shape[0]),
        rank_b=int(two.a.shape[0]),
        norm_a=n1,
        norm_b=n2,
        relative_change=diff / n1 if n1 > 0 else None,
        cosine=max(-1.0, min(1.0, inner / (n1 * n2))) if n1 > 0 and n2 > 0 else None,
        similarity_in=curve_in[-1] if curve_in else None,
        similarity_out=curve_out[-1] if curve_out else None,
        curve_in=curve_in,
        curve_out=curve_out,
        dora=dora,
    )


def diff_versions(
    adapters: AdapterService, principal: Principal, first: names.Reference | str, second: names.Reference | str
) -> VersionDiff:
    """Compare two adapter versions on one base model, module by module.

    Args:
        adapters: the registry's AdapterService (resolves references as every read does).
        principal: the caller; it must be able to read both adapters.
        first, second: references (``ns/name:3``, ``ns/name:prod``, ``ns/name@sha256:…``, ``ns/name``).

    Returns:
        A VersionDiff: per module present in both, relative change, cosine and subspace similarities;
        modules adapted in only one version as ``added`` / ``removed``.

    Raises:
        ReferenceInvalidError, DeniedError, AdapterNotFoundError, VersionNotFoundError, AliasNotFoundError;
        BaseMismatchError: the versions were validated against bases with different layouts (or none).
    """
    refs = [names.parse_reference(r) if isinstance(r, str) else r for r in (first, second)]
    for ref in refs:
        principal.require("read", ref.namespace, ref.name)
    one, two = (_load(adapters, ref) for ref in refs)
    base_match = _base_match(one, two)
    common = sorted(set(one.factors) & set(two.factors))
    modules = []
    for module in common:
        a1, b1, s1, d1 = one.factors[module]
        a2, b2, s2, d2 = two.factors[module]
        layer = one.layer_types.get(module) or two.layer_types.get(module)
        modules.append(compare_module(module, thin(a1, b1, s1), thin(a2, b2, s2), layer_type=layer, dora=d1 or d2))
    return VersionDiff(
        first=one.side,
        second=two.side,
        base_match=base_match,
        modules=modules,
        added=sorted(two.modules - one.modules),
        removed=sorted(one.modules - two.modules),
        skipped=sorted(set(one.skipped) | set(two.skipped)),
        dora=one.dora or two.dora,
    )


def _load(adapters: AdapterService, ref: names.Reference) -> _Loaded:
    """Resolve one version and read its LoRA factors (header-bounded reads, one factor at a time)."""
    registry = adapters.registry
    with registry.sessions.begin() as session:
        version = resolve.version(session, ref.namespace, ref.name, ref.tag)
        adapter = session.get_one(Adapter, version.adapter_id)
        st = session.scalar(
            select(VersionFile).where(VersionFile.version_id == version.id, VersionFile.path == "adapter_model.safetensors")
        )
        base = session.get(BaseModelRow, version.base_model_id) if version.base_model_id else None
        side = DiffSide(
            name=adapter.full_name,
            version=version.number,
            digest=version.manifest_digest,
            base_digest=base.weights_digest if base else None,
            layout_digest=base.layout_digest if base else None,
        )
        config_raw = dict(version.config)
        layer_types = dict((version.base_mapping or {}).get("layer_types", {}))
        base_id, digest, size = version.base_model_id, st.digest, st.size
    config = peft.parse_adapter_config(json.dumps(config_raw).encode(), max_size=1 << 22)
    stored = read_factors(registry.store, digest, size, max_header_size=registry.settings.max_header_size)
    factors = {
        module: (a, b, config.scaling_for(module), module in stored.dora) for module, (a, b) in stored.pairs.items()
    }
    dora = bool(config.raw.get("use_dora")) or bool(stored.dora)
    return _Loaded(side, base_id, factors, layer_types, stored.skipped, dora)


def _base_match(one: _Loaded, two: _Loaded) -> str:
    if one.base_id is not None and one.base_id == two.base_id:
        return "weights"
    if one.side.layout_digest is not None and one.side.layout_digest == two.side.layout_digest:
        return "layout"
    a, b = one.side, two.side
    raise BaseMismatchError(
        f"{a.name}:{a.version} and {b.name}:{b.version} are not on the same base model",
        detail={"first": {"name": a.name, "version": a.version, "base": a.base_digest, "layout": a.layout_digest},
                "second": {"name": b.name, "version": b.version, "base": b.base_digest, "layout": b.layout_digest}},
        hint="diff compares versions validated against one base (same weights or the same layout); "
        "`loreg show REF` names each version's base",
    )
