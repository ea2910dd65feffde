"""Combination requests: combine stored adapter versions into the next version of a target adapter.

A job of the same queue as exports (services/jobs.py): keyed by the digest of its canonical request
(inputs by ``ns/name:N`` and manifest digest, the method and every parameter as ``check_params``
canonicalizes them, the target and its aliases), so an identical request is answered from the
stored record. Every refusal the combination math can give from headers and configs (different
bases, unequal ranks for the factor-wise methods, DoRA, bad parameters) is given at request time,
before anything is stored. The worker (merge/combine_worker.py) pushes the result through the
push service like any push; the record is the version's lineage (``made_by``).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loreg.registry.db.models import Adapter, BaseModelRow, Combination, CombinationInput, Version, VersionFile
from loreg.registry.errors import CombinationNotFoundError, DeniedError, MergeUnsupportedError, UnauthorizedError
from loreg.registry.formats import fingerprint, names, peft, safetensors
from loreg.registry.merge import combine
from loreg.registry.services import jobs, resolve
from loreg.registry.services.context import AppContext
from loreg.registry.services.exports import WeightedRef, can_read_inputs
from loreg.registry.services.tokens import ANONYMOUS, Principal
from loreg.registry.services.views import BaseRefView, base_ref
from loreg.registry.version import loreg_version

# the canonical request's form: bumped when the same request would give other bytes
COMBINATION_FORMAT = 1
PARAM_FIELDS = ("density", "majority_sign_method", "svd_rank", "svd_clamp", "seed")


@dataclass(frozen=True)
class CombinationInputView:
    name: str  # ``ns/name``
    version: int
    digest: str
    weight: float


@dataclass(frozen=True)
class CombinationView:
    id: str
    state: str
    request_digest: str
    method: str
    params: dict[str, Any]
    inputs: list[CombinationInputView]
    to: str
    aliases: list[str]
    base: BaseRefView | None
    version: int | None  # the pushed version of ``to`` once done
    progress: dict[str, Any]
    error: dict[str, Any] | None
    device: str | None
    attempts: int
    loreg_version: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class CombinationRequested:
    combination: CombinationView
    created: bool


@dataclass(frozen=True)
class _Resolved:
    base_id: int
    inputs: list[tuple[int, str, str, float]]  # (version id, ns/name:N, manifest digest, weight)
    params: combine.CombineParams
    canonical: dict[str, Any]
    digest: str


def lineage(row: Combination) -> dict[str, Any]:
    """What a version made by a combination shows as ``made_by``."""
    return {
        "kind": "combination",
        "id": row.id,
        "method": row.method,
        "params": dict(row.params),
        "inputs": [{"name": i.name, "digest": i.manifest_digest, "weight": i.weight} for i in row.inputs],
    }


def plan_stored(
    registry: AppContext, labels: list[str], files: list[tuple[str, int, str, int]], params: combine.CombineParams
) -> None:
    """Run the combination's planning on stored versions' headers and configs (``files``: config digest and
    size, safetensors digest and size, per input): every refusal before anything is stored."""
    store, settings = registry.store, registry.settings
    inputs, headers = [], []
    for label, (cfg_digest, cfg_size, st_digest, st_size) in zip(labels, files):
        config = peft.parse_adapter_config(store.read_range(cfg_digest, 0, cfg_size), max_size=settings.max_config_size)
        headers.append(safetensors.read_header(
            lambda s, e, d=st_digest: store.read_range(d, s, e), st_size, max_header_size=settings.max_header_size
        ))
        inputs.append(combine.CombineInput(name=label, folder=None, config=config))  # type: ignore[arg-type]
    combine.plan_combination(inputs, params, headers)


def split_name(name: str) -> tuple[str, int]:
    full, _, number = name.rpartition(":")
    return full, int(number)


class CombinationService:
    """Queue combinations and read them; the job queue owns every transition."""

    def __init__(self, registry: AppContext):
        self.registry = registry
        self.jobs = jobs.JobQueue(registry, Combination)

    def request(
        self,
        inputs: Sequence[WeightedRef],
        params: combine.CombineParams,
        to: str,
        aliases: Sequence[str],
        principal: Principal,
    ) -> CombinationRequested:
        """Queue a combination of ``inputs`` into the next version of ``to`` (``ns/name``), or answer an
        identical request's record. The caller checked read on every input and write on ``to``.

        Raises:
            VersionNotFoundError, NameInvalidError, CombinationInvalidError, RankMismatchError,
            MergeUnsupportedError (different bases, DoRA, what the method cannot combine), ConflictError
        """
        if principal is ANONYMOUS:
            raise UnauthorizedError("combinations need a token", hint="run loreg login, or set LOREG_TOKEN")
        namespace, _, name = to.partition("/")
        names.check_name(namespace, name)
        clean_aliases = sorted(names.check_alias(a) for a in dict.fromkeys(aliases))
        resolved = self._resolve(inputs, params, f"{namespace}/{name}", clean_aliases)
        return self.jobs.request(
            lambda session: self._record(session, resolved, f"{namespace}/{name}", clean_aliases, principal),
            what="combination request",
        )

    def _resolve(
        self, inputs: Sequence[WeightedRef], params: combine.CombineParams, to: str, aliases: list[str]
    ) -> _Resolved:
        checked = combine.check_params(dataclasses.replace(params, weights=tuple(a.weight for a in inputs)), len(inputs))
        refs = [names.parse_reference(a.ref) for a in inputs]
        with self.registry.sessions.begin() as session:
            versions = [resolve.version(session, r.namespace, r.name, r.tag) for r in refs]
            labels = [f"{session.get_one(Adapter, v.adapter_id).full_name}:{v.number}" for v in versions]
            base = self._common_base(session, versions, labels)
            files = [
                {f.path: f for f in session.scalars(select(VersionFile).where(VersionFile.version_id == v.id))}
                for v in versions
            ]
            rows = [(v.id, label, v.manifest_digest) for v, label in zip(versions, labels)]
            file_refs = [(f["adapter_config.json"], f["adapter_model.safetensors"]) for f in files]
            base_id, weights_digest = base.id, base.weights_digest
        plan_stored(self.registry, labels, [(c.digest, c.size, st.digest, st.size) for c, st in file_refs], checked)
        out = [(vid, label, md, w) for (vid, label, md), w in zip(rows, checked.weights)]
        canonical = {
            "format": COMBINATION_FORMAT,
            "base": weights_digest,
            "inputs": [[label, md, w] for _, label, md, w in out],
            "method": checked.method,
            "params": {k: getattr(checked, k) for k in PARAM_FIELDS},
            "to": to,
            "aliases": aliases,
        }
        digest = fingerprint.sha256_digest(fingerprint.canonical_json(canonical))
        return _Resolved(base_id, out, checked, canonical, digest)

    @staticmethod
    def _common_base(session: Session, versions: list[Version], labels: list[str]) -> BaseModelRow:
        """The one base every input was validated against; refusals name the inputs."""
        bases = [session.get(BaseModelRow, v.base_model_id) if v.base_model_id else None for v in versions]
        for label, b in zip(labels, bases):
            if b is None:
                raise MergeUnsupportedError(
                    f"{label} was not validated against a base model: cannot check it combines with the others",
                    detail={"input": label}, hint="push it again with --base",
                )
        first = bases[0]
        assert first is not None
        for label, b in zip(labels[1:], bases[1:]):
            assert b is not None
            if b.weights_digest != first.weights_digest or b.layout_digest != first.layout_digest:
                what = "layout" if b.layout_digest != first.layout_digest else "weights"
                raise MergeUnsupportedError(
                    f"{labels[0]} and {label} were validated against different bases (their {what} differ: "
                    f"{first.weights_digest[:19]}… and {b.weights_digest[:19]}…)",
                    detail={"inputs": [labels[0], label], "differs": what},
                    hint="combine adapters trained on the same base model",
                )
        return first

    def _record(
        self, session: Session, r: _Resolved, to: str, aliases: list[str], principal: Principal
    ) -> tuple[CombinationRequested, str]:
        """The request's transaction: a new queued record, or the record of an identical request (retried if failed)."""
        row = session.scalar(select(Combination).where(Combination.request_digest == r.digest).with_for_update())
        created = row is None
        if row is None:
            row = Combination(
                id=uuid.uuid4().hex,
                request_digest=r.digest,
                requested_by=principal.token_id,
                base_model_id=r.base_id,
                target=to,
                aliases=aliases,
                method=r.params.method,
                params=r.canonical["params"],
                request=r.canonical,
                state="queued",
                progress={},
                attempts=0,
                loreg_version=loreg_version(),
            )
            session.add(row)
            session.flush()
            session.add_all(
                CombinationInput(combination_id=row.id, position=i, version_id=vid, name=n, manifest_digest=md, weight=w)
                for i, (vid, n, md, w) in enumerate(r.inputs)
            )
        elif row.state == "failed":
            jobs.retry(row)
            row.requested_by = principal.token_id
        session.flush()
        session.refresh(row)
        return CombinationRequested(self._view(session, row), created), row.state

    def get(self, combination_id: str, principal: Principal) -> CombinationView:
        """A combination, if ``principal`` may read every input and the target.

        Raises:
            CombinationNotFoundError, DeniedError
        """
        with self.registry.sessions.begin() as session:
            row = self._row(session, combination_id)
            namespace, _, name = row.target.partition("/")
            if not can_read_inputs(principal, [i.name for i in row.inputs]) or not principal.covers(namespace, name):
                raise DeniedError(
                    f"this token cannot read every adapter combination {combination_id} names",
                    hint="a token must be able to read each input of a combination and its target",
                )
            return self._view(session, row)

    def _row(self, session: Session, combination_id: str) -> Combination:
        if len(combination_id) != 32 or not all(c in "0123456789abcdef" for c in combination_id):
            raise CombinationNotFoundError(f"no combination {combination_id[:40]!r}")
        row = session.get(Combination, combination_id)
        if row is None:
            raise CombinationNotFoundError(f"no combination {combination_id}")
        return row

    def _view(self, session: Session, row: Combination) -> CombinationView:
        inputs = []
        for i in row.inputs:
            full, number = split_name(i.name)
            inputs.append(CombinationInputView(name=full, version=number, digest=i.manifest_digest, weight=i.weight))
        return CombinationView(
            id=row.id,
            state=row.state,
            request_digest=row.request_digest,
            method=row.method,
            params=dict(row.params),
            inputs=inputs,
            to=row.target,
            aliases=list(row.aliases),
            base=base_ref(session.get(BaseModelRow, row.base_model_id)),
            version=split_name(row.result_name)[1] if row.result_name else None,
            progress=row.progress or {},
            error=row.error,
            device=row.device,
            attempts=row.attempts,
            loreg_version=row.loreg_version,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
