"""Export workers: claim a queued export, merge it, hand the result's files to the job queue.

Every transition of the job (claim, lease renewal, finish, fail) is ``services/jobs.JobQueue``'s;
this module knows only how an export's result is made: the base's and adapters' files fetched
(or mmapped from the local store), the merge engine, the files of the merged model.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loreg.registry.db.models import BaseModelRow
from loreg.registry.db.models import Export, ExportFile, ExportInput, Version, VersionFile
from loreg.registry.errors import InternalError, MergeUnsupportedError
from loreg.registry.faults import pause_point
from loreg.registry.formats import peft, safetensors, validate
from loreg.registry.services.context import AppContext
from loreg.registry.services.exports import adopt_stored_result
from loreg.registry.services.jobs import Claim, Lease, QueueWorker, ResultFile, work_loop

log = logging.getLogger("loreg.worker")
COPY_CHUNK = 8 << 20


class ExportWorker(QueueWorker):
    """Runs export jobs: the merge and its result's files; the job's transitions are the queue's (services/jobs.py)."""

    model = Export

    def run(self, claim: Claim) -> None:
        # requests of identical bytes queued before either finished meet here: no second merge
        if self.jobs.settle(claim, adopt_stored_result):
            log.info("export %s: answered from a stored result of the same content", claim.job_id)
            return
        scratch = Path(tempfile.mkdtemp(prefix="loreg-export-", dir=self.registry.settings.work_dir))
        try:
            self.jobs.execute(claim, self.lease_s, lambda lease: self._merge(claim, scratch, lease), _record_files)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _local(self, digest: str, size: int, scratch: Path, name: str) -> Path:
        return local_blob(self.registry, digest, size, scratch, name)

    def _merge(self, claim: Claim, scratch: Path, lease: Lease) -> tuple[list[ResultFile], str]:
        from loreg.registry.merge import engine

        lease.progress.update(tensors_done=0, tensors_total=0, bytes_done=0, bytes_total=0)

        with self.registry.sessions.begin() as session:
            job = session.get_one(Export, claim.job_id)
            base = session.get_one(BaseModelRow, job.base_model_id)
            base_files = {f["path"]: dict(f) for f in base.files}
            base_config = dict(base.config)
            base_tensors = [list(t) for t in base.tensors]
            inputs = []
            for i in session.scalars(select(ExportInput).where(ExportInput.export_id == job.id).order_by(ExportInput.position)):
                if i.version_id is None or session.get(Version, i.version_id) is None:
                    raise MergeUnsupportedError(f"adapter version {i.name or i.manifest_digest} was deleted")
                vfiles = {
                    f.path: {"size": f.size, "digest": f.digest}
                    for f in session.scalars(select(VersionFile).where(VersionFile.version_id == i.version_id))
                }
                inputs.append((vfiles, i.weight, i.name or i.manifest_digest))
            dtype = job.dtype
            combination = (job.request or {}).get("combine")
        shard_names = list(dict.fromkeys(t[3] for t in base_tensors))
        shards = []
        headers = []
        for name in shard_names:
            f = base_files[name]
            path = self._local(f["digest"], f["size"], scratch, name)
            header = safetensors.read_header_from_file(path)
            headers.append(header)
            shards.append(engine.BaseShard(name=name, path=path, header=header))
        layout = validate.base_layout_from_headers(headers, base_config)
        adapters = self._adapters(inputs, layout, scratch, combination)
        out_dir = scratch / "out"
        out_dir.mkdir()

        def on_progress(t_done: int, t_total: int, b_done: int, b_total: int) -> None:
            lease.progress.update(tensors_done=t_done, tensors_total=t_total, bytes_done=b_done, bytes_total=b_total)
            lease.check()
            if t_done >= 1:
                pause_point("mid_merge")  # testing hook (registry/faults.py)

        out_dtype = None if dtype == "auto" else dtype
        device = resolve_device(self.device)
        outputs = engine.merge_to_dir(shards, adapters, out_dir, dtype=out_dtype, device=device, progress=on_progress)
        files = [ResultFile(o.name, o.size, o.digest, out_dir / o.name) for o in outputs]
        if "model.safetensors.index.json" in base_files:
            src = self._local(
                base_files["model.safetensors.index.json"]["digest"],
                base_files["model.safetensors.index.json"]["size"],
                scratch,
                "model.safetensors.index.json",
            )
            index = engine.write_index(out_dir, outputs, Path(src).read_bytes())
            files.append(ResultFile(index.name, index.size, index.digest, out_dir / index.name))
        for name, f in base_files.items():
            if name in shard_names or name == "model.safetensors.index.json":
                continue
            if name == "config.json" and out_dtype is not None:
                cfg = dict(base_config)
                torch_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dtype]
                if "torch_dtype" in cfg or "dtype" not in cfg:
                    cfg["torch_dtype"] = torch_name
                if "dtype" in cfg:
                    cfg["dtype"] = torch_name
                path = out_dir / "config.json"
                path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
                files.append(_file_entry(path))
            else:
                files.append(ResultFile(name, f["size"], f["digest"]))
        return files, device


    def _adapters(self, inputs: list[Any], layout: Any, scratch: Path, combination: dict[str, Any] | None) -> list[Any]:
        """The engine's adapter inputs: the versions with their weights, or their combination (weight 1)."""
        from loreg.registry.merge import combine, engine

        store = self.registry.store
        folders = []
        for n, (vfiles, weight, name) in enumerate(inputs):
            cfg_entry, st_entry = vfiles["adapter_config.json"], vfiles["adapter_model.safetensors"]
            config = peft.parse_adapter_config(store.read_range(cfg_entry["digest"], 0, cfg_entry["size"]))
            st_path = self._local(st_entry["digest"], st_entry["size"], scratch, f"adapter-{n}.safetensors")
            folders.append((config, st_path, weight, name))
        if combination is not None:  # combined first, then merged as one adapter of weight 1
            combined = []
            for n, (config, st_path, _, name) in enumerate(folders):
                folder = scratch / f"combine-in-{n}"
                folder.mkdir()
                (folder / combine.ADAPTER_FILE).symlink_to(st_path)
                combined.append(combine.CombineInput(name=name, folder=folder, config=config))
            params = combine.CombineParams(combination["method"], tuple(w for _, _, w, _ in folders),
                                           **combination["params"])
            out = scratch / "combined"
            combine.combine_to_dir(combined, params, out, device=resolve_device(self.device))
            config = peft.parse_adapter_config((out / combine.CONFIG_FILE).read_bytes())
            folders = [(config, out / combine.ADAPTER_FILE, 1.0, "combination")]
        adapters = []
        for config, st_path, weight, _ in folders:
            header = safetensors.read_header_from_file(st_path)
            report = validate.validate_adapter(config, header, layout)
            adapters.append(engine.AdapterInput(config=config, header=header, path=st_path, report=report, weight=weight))
        return adapters


def local_blob(registry: AppContext, digest: str, size: int, scratch: Path, name: str) -> Path:
    """A local path to a blob: the store's own file when it has one, else a verified download."""
    store = registry.store
    local = store.local_path(digest)
    if local is not None:
        return Path(local)
    dest = scratch / "in" / digest.removeprefix("sha256:")[:16] / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with store.open(digest) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, COPY_CHUNK)
    if dest.stat().st_size != size:
        raise InternalError(f"download of {name} is short")
    return dest


class JobWorker:
    """One worker for every kind of job (exports, combinations): each look at the queues starts with
    the kind after the one that ran last, so neither kind waits behind a stream of the other."""

    def __init__(self, registry: AppContext, *, device: str | None = None, **kw: Any):
        from loreg.registry.merge.combine_worker import CombinationWorker

        self.kinds: list[Any] = [ExportWorker(registry, device=device, **kw), CombinationWorker(registry, device=device, **kw)]
        self.owner = self.kinds[0].owner
        self.next = 0

    def run_once(self) -> str | None:
        for k in range(len(self.kinds)):
            n = (self.next + k) % len(self.kinds)
            ran = self.kinds[n].run_once()
            if ran is not None:
                self.next = n + 1
                return ran
        return None

    def run_forever(self, stop: threading.Event, wake: threading.Event | None = None, poll_s: float = 2.0) -> None:
        work_loop(self, stop, wake, poll_s)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _record_files(session: Session, job: Export, files: list[ResultFile]) -> None:
    session.add_all(ExportFile(export_id=job.id, path=f.path, size=f.size, digest=f.digest) for f in files)


def _file_entry(path: Path) -> ResultFile:
    import hashlib

    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return ResultFile(path.name, size, "sha256:" + h.hexdigest(), path)
