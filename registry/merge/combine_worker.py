"""Combination workers: claim a queued combination, combine its inputs (merge/combine.py), push the result.

Every transition of the job is ``services/jobs.JobQueue``'s. The result goes through the push service
like any push (blobs registered and linked to the target, the same validation against the base), so a
retried job whose first attempt pushed already finds the same files and the same version.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loreg.registry.db.models import BaseModelRow, Combination, Version, VersionFile
from loreg.registry.errors import MergeUnsupportedError
from loreg.registry.formats import peft
from loreg.registry.merge.worker import _file_entry, local_blob, resolve_device
from loreg.registry.services.adapters import AdapterService, PushRequest
from loreg.registry.services.bases import BaseService
from loreg.registry.services.blobs import register_blob
from loreg.registry.services.context import AppContext
from loreg.registry.services.jobs import Claim, Lease, QueueWorker, ResultFile, utcnow
from loreg.registry.services.views import StoredFile

log = logging.getLogger("loreg.worker")


class CombinationWorker(QueueWorker):
    """Runs combination jobs: the combination and its push; the job's transitions are the queue's."""

    model = Combination

    def __init__(self, registry: AppContext, **kw: Any):
        super().__init__(registry, **kw)
        self.adapters = AdapterService(registry, validator=BaseService(registry).validate_push)

    def run(self, claim: Claim) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="loreg-combine-", dir=self.registry.settings.work_dir))
        pushed: dict[str, Any] = {}
        try:
            self.jobs.execute(
                claim, self.lease_s, lambda lease: self._combine(claim, scratch, lease, pushed),
                lambda session, row, files: _record_version(session, row, pushed),
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _load(self, claim: Claim) -> dict[str, Any]:
        """The job's request and its inputs' stored files, read in one transaction."""
        with self.registry.sessions.begin() as session:
            job = session.get_one(Combination, claim.job_id)
            inputs = []
            for i in job.inputs:
                if i.version_id is None or session.get(Version, i.version_id) is None:
                    raise MergeUnsupportedError(f"adapter version {i.name} was deleted", detail={"input": i.name})
                vfiles = {
                    f.path: (f.digest, f.size)
                    for f in session.scalars(select(VersionFile).where(VersionFile.version_id == i.version_id))
                }
                inputs.append((i.name, i.weight, vfiles))
            base = session.get_one(BaseModelRow, job.base_model_id)
            return {
                "inputs": inputs, "method": job.method, "params": dict(job.params), "to": job.target,
                "aliases": list(job.aliases), "base": base.weights_digest, "actor": job.requested_by,
            }

    def _combine(self, claim: Claim, scratch: Path, lease: Lease, pushed: dict[str, Any]) -> tuple[list[ResultFile], str]:
        from loreg.registry.merge import combine

        job = self._load(claim)
        lease.progress.update(step="combine")
        inputs = []
        for n, (name, _, vfiles) in enumerate(job["inputs"]):
            cfg_digest, cfg_size = vfiles[combine.CONFIG_FILE]
            config = peft.parse_adapter_config(self.registry.store.read_range(cfg_digest, 0, cfg_size))
            folder = scratch / f"in-{n}"
            folder.mkdir()
            st_digest, st_size = vfiles[combine.ADAPTER_FILE]
            (folder / combine.ADAPTER_FILE).symlink_to(local_blob(self.registry, st_digest, st_size, scratch, f"adapter-{n}"))
            inputs.append(combine.CombineInput(name=name, folder=folder, config=config))
        params = combine.CombineParams(method=job["method"], weights=tuple(w for _, w, _ in job["inputs"]), **job["params"])
        device = resolve_device(self.device)
        out = scratch / "out"
        result = combine.combine_to_dir(inputs, params, out, device=device)
        lease.check()
        lease.progress.update(step="push", rank=result.rank, modules=result.modules)
        pushed["version"] = self._push(job, [_file_entry(out / combine.ADAPTER_FILE), _file_entry(out / combine.CONFIG_FILE)])
        return [], device

    def _push(self, job: dict[str, Any], files: list[ResultFile]) -> tuple[int, str]:
        """Store the result's blobs linked to the target, then push them like any push. Returns (version id, ns/name:N)."""
        namespace, _, name = job["to"].partition("/")
        store = self.registry.store
        for f in files:
            assert f.local is not None
            store.put_file(f.local, f.digest, f.size)
        with self.registry.sessions.begin() as session:
            for f in files:
                register_blob(session, store, f.digest, f.size, now=utcnow(), link=(namespace, name), what=f.path,
                              again="request it again")
        inputs = ", ".join(name for name, _, _ in job["inputs"])
        request = PushRequest(
            files=[StoredFile(path=f.path, size=f.size, digest=f.digest) for f in files],
            message=f"combination ({job['method']}) of {inputs}"[:1000],
            aliases=job["aliases"],
            base=job["base"],
            base_source="explicit",
        )
        pushed = self.adapters.push(namespace, name, request, actor=job["actor"])
        return _version_id(self.registry, namespace, name, pushed.version.version), f"{pushed.version.name}:{pushed.version.version}"


def _version_id(registry: AppContext, namespace: str, name: str, number: int) -> int:
    from loreg.registry.services import resolve

    with registry.sessions.begin() as session:
        return resolve.version(session, namespace, name, str(number)).id


def _record_version(session: Session, row: Combination, pushed: dict[str, Any]) -> None:
    row.version_id, row.result_name = pushed["version"]
