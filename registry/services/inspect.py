"""What an adapter changes, per module: ||scale·B·A||_F and its effective rank, from the r x r factors.

With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), scale·B·A = Q_b (scale·R_b R_aᵀ) Q_aᵀ, so its singular
values are those of the r x r core: nothing of size out x in is ever formed. With the base weights
stored, ||ΔW||_F / ||W||_F is added (W streamed once from the store, in chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from loreg.registry.db.models import Adapter, Version, VersionFile
from loreg.registry.db.models import BaseModelRow
from loreg.registry.errors import MergeUnsupportedError
from loreg.registry.formats import lora, peft, safetensors
from loreg.registry.services import resolve
from loreg.registry.services.context import AppContext

MAX_FACTOR_BYTES = 512 << 20  # one A or B read at a time; adapters are small next to this
NORM_CHUNK = 8 << 20


def to_float32(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "F32":
        arr = np.frombuffer(raw, dtype="<f4")
    elif dtype == "F16":
        arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif dtype == "F64":
        arr = np.frombuffer(raw, dtype="<f8").astype(np.float32)
    elif dtype == "BF16":
        arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise MergeUnsupportedError(f"cannot read {dtype} tensors as numbers")
    return arr.reshape(shape) if shape else arr


def core_singular_values(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of scale·B·A for A [r, in], B [out, r] (float64, descending)."""
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    r_b = np.linalg.qr(b64, mode="r")
    r_a = np.linalg.qr(a64.T, mode="r")
    return np.linalg.svd(scale * (r_b @ r_a.T), compute_uv=False)


def effective_ranks(sv: np.ndarray) -> tuple[int, float]:
    if sv.size == 0 or sv[0] <= 0:
        return 0, 0.0
    count = int((sv > 0.01 * sv[0]).sum())
    p = sv / sv.sum()
    p = p[p > 0]
    entropy = float(-(p * np.log(p)).sum())
    return count, math.exp(entropy)


@dataclass(frozen=True)
class StoredFactors:
    """The LoRA factors of one stored adapter file, flattened: A [r, in·k], B [out, r] per module."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    dora: set[str]  # modules with a DoRA magnitude
    skipped: list[str]  # modules whose factors exceed MAX_FACTOR_BYTES (not read)


def read_factors(store: Any, digest: str, size: int, *, max_header_size: int) -> StoredFactors:
    """Read every module's A and B of the adapter file ``digest`` (header-bounded reads, one factor
    at a time). Keys that are not LoRA factors were validated at push and are passed over here."""

    def read(start: int, end: int) -> bytes:
        return store.read_range(digest, start, end)

    header = safetensors.read_header(read, size, max_header_size=max_header_size)
    infos: dict[str, dict[str, Any]] = {}
    dora: set[str] = set()
    for key, info in header.tensors.items():
        try:
            tk = lora.parse_tensor_key(key)
        except lora.TensorKeyError:
            continue
        if tk.kind in (lora.LORA_A, lora.EMBEDDING_A):
            infos.setdefault(tk.module, {})["A"] = info
        elif tk.kind in (lora.LORA_B, lora.EMBEDDING_B):
            infos.setdefault(tk.module, {})["B"] = info
        elif tk.kind == lora.MAGNITUDE:
            dora.add(tk.module)
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: list[str] = []
    off = header.data_offset
    for module, pair in sorted(infos.items()):
        if "A" not in pair or "B" not in pair:
            continue
        a_info, b_info = pair["A"], pair["B"]
        if max(a_info.nbytes, b_info.nbytes) > MAX_FACTOR_BYTES:
            skipped.append(module)
            continue
        a = to_float32(read(off + a_info.start, off + a_info.end), a_info.dtype, a_info.shape)
        b = to_float32(read(off + b_info.start, off + b_info.end), b_info.dtype, b_info.shape)
        pairs[module] = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    return StoredFactors(pairs, dora, skipped)


class InspectService:
    def __init__(self, registry: AppContext):
        self.registry = registry

    def inspect(self, namespace: str, name: str, tag: str) -> dict[str, Any]:
        """Per adapted module: delta norm, effective ranks (and relative change when weights are stored)."""
        with self.registry.sessions.begin() as session:
            version = resolve.version(session, namespace, name, tag)
            adapter = session.get_one(Adapter, version.adapter_id)
            files = {f.path: f for f in session.scalars(select(VersionFile).where(VersionFile.version_id == version.id))}
            config_raw = dict(version.config)
            mapping = dict((version.base_mapping or {}).get("modules", {}))
            layer_types = dict((version.base_mapping or {}).get("layer_types", {}))
            base = session.get(BaseModelRow, version.base_model_id) if version.base_model_id else None
            base_info = None
            if base is not None and base.weights_uploaded:
                by_path = {f["path"]: f for f in base.files}
                base_info = {t[0]: (t[1], tuple(t[2]), by_path[t[3]]) for t in base.tensors if t[3] in by_path}
            number, full = version.number, adapter.full_name
        import json

        config = peft.parse_adapter_config(json.dumps(config_raw).encode(), max_size=1 << 22)
        st = files["adapter_model.safetensors"]
        stored = read_factors(
            self.registry.store, st.digest, st.size, max_header_size=self.registry.settings.max_header_size
        )
        modules = []
        for module, (a2, b2) in stored.pairs.items():
            r = a2.shape[0]
            scale = config.scaling_for(module)
            sv = core_singular_values(a2, b2, scale)
            norm = float(np.sqrt((sv**2).sum()))
            count, entropy_rank = effective_ranks(sv)
            entry: dict[str, Any] = {
                "module": module,
                "layer_type": layer_types.get(module),
                "rank": int(r),
                "scale": scale,
                "delta_norm": norm,
                "effective_rank": count,
                "entropy_rank": entropy_rank,
                "singular_values": [float(x) for x in sv[:64]],
            }
            target = mapping.get(module)
            if base_info is not None and target in base_info:
                w_norm = self._base_norm(*base_info[target], tensor=target)
                entry["base_tensor"] = target
                entry["base_norm"] = w_norm
                entry["relative_change"] = norm / w_norm if w_norm > 0 else None
            modules.append(entry)
        modules.sort(key=lambda m: m["delta_norm"], reverse=True)
        return {"name": full, "version": number, "modules": modules, "base_weights": base_info is not None}

    def _base_norm(self, dtype: str, shape: tuple[int, ...], file: dict[str, Any], *, tensor: str) -> float:
        store = self.registry.store
        digest, size = file["digest"], file["size"]
        header = safetensors.read_header(lambda s, e: store.read_range(digest, s, e), size)
        info = header.tensors[tensor]
        total = 0.0
        item = safetensors.DTYPE_SIZES[dtype]
        chunk = NORM_CHUNK - NORM_CHUNK % item
        start = header.data_offset + info.start
        end = header.data_offset + info.end
        while start < end:
            stop = min(end, start + chunk)
            values = to_float32(store.read_range(digest, start, stop), dtype, ()).astype(np.float64)
            total += float((values * values).sum())
            start = stop
        return math.sqrt(total)


__all__ = ["InspectService", "core_singular_values", "effective_ranks", "Version"]
