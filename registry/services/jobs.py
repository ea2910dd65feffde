"""Jobs: the one state machine of queued work (exports, and combinations: services/combinations.py).

    request --> queued --claim--> running --finish--> done
                  ^                  |  \\--fail----> failed
                  |                  |                  |
                  +------------------+-- retry ---------+   (an identical request retries a failed job)
                                     \\-- lease expired: the next claim takes it over (attempts + 1)

A kind of job is a table with the job columns (``JobRow``). ``JobQueue`` owns every transition:
``request`` runs the kind's request transaction (again after a lost race) and wakes the workers,
``claim`` takes the oldest queued job or a running one whose lease expired (``FOR UPDATE SKIP
LOCKED`` on Postgres, where several `loreg worker` processes claim; on SQLite BEGIN IMMEDIATE
serialises the claim), ``renew`` extends the lease (a heartbeat thread, ``Lease``), ``finish`` stores
the result's files, registers their blobs and writes the kind's rows in one transaction that checks
the worker still owns the lease, ``fail`` records the error, ``retry`` queues a failed job again.
A worker that lost its lease changes nothing. ``execute`` runs one claimed job from start to end
(heartbeat, work, finish or fail); a worker supplies only the work and the kind's rows.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from loreg.registry.db.retry import in_transaction
from loreg.registry.errors import InternalError, LoregError
from loreg.registry.services.blobs import register_blob
from loreg.registry.services.context import AppContext

log = logging.getLogger("loreg.worker")
R = TypeVar("R")


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobRow(Protocol):
    """The columns every kind of job has (an ORM class: ``Export``, ``Combination``)."""

    id: str
    state: str
    progress: dict[str, Any]
    error: dict[str, Any] | None
    device: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Claim:
    job_id: str
    owner: str


class LeaseLost(Exception):
    """Another worker took the job over (this one was too slow to renew its lease)."""


@dataclass(frozen=True)
class ResultFile:
    """A file of a job's result. ``local``: a file to store (its digest computed while it was written);
    None: bytes stored already (a base file an export copies as is)."""

    path: str
    size: int
    digest: str
    local: Path | None = None


@dataclass
class Lease:
    """What the work of a claimed job sees: its progress (sent with each renewal) and whether the lease was lost."""

    claim: Claim
    progress: dict[str, Any] = field(default_factory=dict)
    lost: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise LeaseLost once another worker took the job over: stop working on it."""
        if self.lost.is_set():
            raise LeaseLost(self.claim.job_id)


def mark_done(row: JobRow, *, progress: dict[str, Any], device: str | None, now: datetime) -> None:
    """The transition to done (from running, or straight from a request answered from a stored result)."""
    row.state, row.error = "done", None
    row.progress = dict(progress)
    row.device = device
    row.started_at = row.started_at or now
    row.finished_at = now
    row.lease_owner = row.lease_expires_at = None


def retry(row: JobRow) -> None:
    """The transition failed -> queued (an identical request retries a failed job)."""
    row.state, row.error, row.progress = "queued", None, {}
    row.lease_owner = row.lease_expires_at = None


class JobQueue:
    """The transitions of one kind of job, stored in ``model``'s table."""

    def __init__(self, registry: AppContext, model: type[Any], *, clock: Callable[[], datetime] = utcnow):
        self.registry = registry
        self.model = model
        self.clock = clock
        self.on_queued: list[Callable[[], None]] = []  # callbacks that wake in-process workers

    def request(self, work: Callable[[Session], tuple[R, str]], *, what: str) -> R:
        """Run a request's transaction ``work`` -> (result, the job's state), again after a lost race;
        wake the workers when it left the job queued.

        Raises:
            ConflictError: every attempt lost a race; whatever ``work`` raises.
        """
        result, state = in_transaction(self.registry.sessions, work, what=what)
        if state == "queued":
            for wake in self.on_queued:
                wake()
        return result

    def claim(self, owner: str, lease_s: float) -> Claim | None:
        """Take the oldest queued job, or a running one whose lease expired; None when there is none."""
        m = self.model
        now = self.clock()
        with self.registry.sessions.begin() as session:
            row = session.scalar(
                select(m)
                .where(or_(m.state == "queued", (m.state == "running") & (m.lease_expires_at < now)))
                .order_by(m.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if row is None:
                return None
            if row.state == "running":
                log.warning("job %s: lease of %s expired, taking over", row.id, row.lease_owner)
            row.state = "running"
            row.lease_owner = owner
            row.lease_expires_at = now + timedelta(seconds=lease_s)
            row.attempts += 1
            row.started_at = row.started_at or now
            return Claim(job_id=row.id, owner=owner)

    def renew(self, claim: Claim, lease_s: float, progress: dict[str, Any] | None = None) -> None:
        """Extend the lease (and store the progress). Raises LeaseLost when another worker owns the job."""
        m = self.model
        values: dict[str, Any] = {"lease_expires_at": self.clock() + timedelta(seconds=lease_s)}
        if progress is not None:
            values["progress"] = progress
        with self.registry.sessions.begin() as session:
            n = session.execute(
                update(m).where(m.id == claim.job_id, m.lease_owner == claim.owner, m.state == "running").values(**values)
            ).rowcount
        if n != 1:
            raise LeaseLost(claim.job_id)

    def owned(self, session: Session, claim: Claim) -> Any:
        """The claimed job's row, locked, while ``claim`` still owns it; else None."""
        row = session.scalar(select(self.model).where(self.model.id == claim.job_id).with_for_update())
        if row is None or row.lease_owner != claim.owner or row.state != "running":
            return None
        return row

    def settle(self, claim: Claim, answer: Callable[[Session, Any, datetime], bool]) -> bool:
        """Let ``answer(session, row, now)`` finish an owned job without running it (a stored result of
        the same content). Returns what it returned; False when the claim no longer owns the job."""
        with self.registry.sessions.begin() as session:
            row = self.owned(session, claim)
            return row is not None and answer(session, row, self.clock())

    def finish(
        self,
        claim: Claim,
        files: list[ResultFile],
        record: Callable[[Session, Any, list[ResultFile]], None],
        *,
        progress: dict[str, Any],
        device: str | None,
    ) -> None:
        """Store the result's files, then in one transaction that checks the lease: register their blobs,
        let ``record`` write the kind's rows, and mark the job done.

        Raises:
            LeaseLost, ConflictError (GC removed a blob meanwhile), storage errors
        """
        store = self.registry.store
        now = self.clock()
        for f in files:
            if f.local is not None:
                store.put_file(f.local, f.digest, f.size)
        with self.registry.sessions.begin() as session:
            row = self.owned(session, claim)
            if row is None:
                raise LeaseLost(claim.job_id)
            for f in files:
                register_blob(session, store, f.digest, f.size, now=now, what=f.path, again="request it again")
            record(session, row, files)
            # after the blobs are stored: the job's time includes storing them
            mark_done(row, progress=progress, device=device, now=self.clock())

    def fail(self, claim: Claim, err: LoregError) -> None:
        """Record ``err`` on the job, if the claim still owns it."""
        m = self.model
        with self.registry.sessions.begin() as session:
            session.execute(
                update(m)
                .where(m.id == claim.job_id, m.lease_owner == claim.owner)
                .values(state="failed", error=err.to_dict(), finished_at=self.clock(), lease_owner=None, lease_expires_at=None)
            )

    def execute(
        self,
        claim: Claim,
        lease_s: float,
        work: Callable[[Lease], tuple[list[ResultFile], str | None]],
        record: Callable[[Session, Any, list[ResultFile]], None],
    ) -> None:
        """Run a claimed job: renew its lease from a heartbeat thread while ``work(lease)`` makes the
        result's files (and names the device), then ``finish`` it; an error fails the job. A lost lease
        ends the job quietly: its new owner finishes it."""
        lease = Lease(claim)
        stop_beat = threading.Event()
        heart = threading.Thread(
            target=self._beat, args=(lease, lease_s, stop_beat), name=f"lease-{claim.job_id[:8]}", daemon=True
        )
        heart.start()
        try:
            try:
                files, device = work(lease)
            finally:
                stop_beat.set()
                heart.join()
            lease.check()
            self.finish(claim, files, record, progress=lease.progress, device=device)
        except LeaseLost:
            log.warning("job %s: lease lost; another worker finishes it", claim.job_id)
        except Exception as exc:  # noqa: BLE001 - recorded on the job for the client
            if not isinstance(exc, LoregError):
                log.exception("job %s failed", claim.job_id)
                exc = InternalError(f"merge failed: {type(exc).__name__}: {exc}")
            self.fail(claim, exc)

    def _beat(self, lease: Lease, lease_s: float, stop: threading.Event) -> None:
        interval = max(0.2, min(lease_s / 3, 2.0))
        while not stop.wait(interval):
            try:
                self.renew(lease.claim, lease_s, dict(lease.progress))
            except LeaseLost:
                lease.lost.set()
                return
            except Exception:  # noqa: BLE001 - a transient DB error: try again next beat
                log.warning("job %s: lease renewal failed", lease.claim.job_id, exc_info=True)


class Worker(Protocol):
    def run_once(self) -> str | None: ...


def work_loop(worker: Worker, stop: threading.Event, wake: threading.Event | None = None, poll_s: float = 2.0) -> None:
    """Run jobs until ``stop``; when the queue is empty, sleep until ``wake`` (or ``poll_s``).

    ``wake`` belongs to this loop alone and is cleared before each look at the queue, so a wake
    that arrives while the queue is being read is never lost (it ends the next sleep at once).
    """
    while not stop.is_set():
        if wake is not None:
            wake.clear()
        try:
            ran = worker.run_once()
        except Exception:  # noqa: BLE001 - a worker keeps going; the job records its own failure
            log.exception("worker: unexpected error")
            ran = None
        if ran is None:
            (wake or stop).wait(poll_s)


class QueueWorker:
    """A worker of one job kind: its queue, owner name and lease; subclasses supply ``run(claim)``."""

    model: Any  # the job table (Export, Combination)

    def __init__(
        self,
        registry: AppContext,
        *,
        owner: str | None = None,
        lease_s: float | None = None,
        clock: Callable[[], datetime] = utcnow,
        device: str | None = None,
    ):
        self.registry = registry
        self.jobs = JobQueue(registry, self.model, clock=clock)
        self.owner = owner or f"{os.uname().nodename[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s if lease_s is not None else registry.settings.export_lease_s
        self.device = device or registry.settings.export_device

    def claim(self) -> Claim | None:
        """Take the oldest queued job, or a running one whose lease expired."""
        return self.jobs.claim(self.owner, self.lease_s)

    def run_once(self) -> str | None:
        """Claim and run one job. Returns its id, or None when the queue is empty."""
        claim = self.claim()
        if claim is None:
            return None
        self.run(claim)
        return claim.job_id

    def run_forever(self, stop: threading.Event, wake: threading.Event | None = None, poll_s: float = 2.0) -> None:
        work_loop(self, stop, wake, poll_s)

    def run(self, claim: Claim) -> None:
        raise NotImplementedError


class WorkerPool:
    """In-process workers for `loreg serve` on the embedded default (threads), each with its own wake."""

    def __init__(self, make_worker: Callable[[], Worker], count: int, *, poll_s: float = 2.0):
        self.make_worker = make_worker
        self.count = max(1, count)
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.wakes: list[threading.Event] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.count):
            wake = threading.Event()
            t = threading.Thread(
                target=work_loop,
                args=(self.make_worker(), self.stop, wake, self.poll_s),
                name=f"job-worker-{n}",
                daemon=True,
            )
            self.wakes.append(wake)
            self.threads.append(t)
            t.start()

    def notify(self) -> None:
        for wake in self.wakes:
            wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
