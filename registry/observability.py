"""Metrics and request ids shared by the API, the job queue and maintenance.

One set of metric objects per process (``metrics()``); with PROMETHEUS_MULTIPROC_DIR set before
prometheus_client is first imported (`loreg serve --workers N` does that) every process writes its
values to that folder and a scrape of any process sums them all. Gauges of queued, running and
failed jobs are read from the database at scrape time: the database is the one truth across API
processes and `loreg worker` hosts, which no process-local counter could be.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("loreg_request_id", default=None)
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# the error codes that mean the blob store failed (not the client's request)
STORAGE_ERROR_CODES = frozenset({"STORAGE_UNAVAILABLE", "STORAGE_TIMEOUT", "INSUFFICIENT_STORAGE", "BLOB_MISSING"})


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is a sane token (it ends up in logs), else a new one."""
    if header is not None and SANE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@dataclass(frozen=True)
class Metrics:
    requests: Any
    latency: Any
    received: Any
    sent: Any
    storage_errors: Any
    gc_deleted: Any
    gc_bytes_freed: Any
    gc_last_run: Any
    fsck_checked: Any
    fsck_bad: Any
    fsck_last_run: Any
    registry: Any

    def record_gc(self, deleted: int, bytes_freed: int, when: float) -> None:
        self.gc_deleted.inc(deleted)
        self.gc_bytes_freed.inc(bytes_freed)
        self.gc_last_run.set(when)

    def record_fsck(self, checked: int, corrupt: int, missing: int, when: float) -> None:
        self.fsck_checked.set(checked)
        self.fsck_bad.labels(kind="corrupt").set(corrupt)
        self.fsck_bad.labels(kind="missing").set(missing)
        self.fsck_last_run.set(when)


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry(auto_describe=True)
    latest: dict[str, Any] = {"multiprocess_mode": "mostrecent"}
    return Metrics(
        requests=Counter("loreg_http_requests", "HTTP requests by route template and status",
                         ["method", "route", "status"], registry=reg),
        latency=Histogram("loreg_http_request_duration_seconds", "Time from request to the end of the response",
                          ["method", "route"], buckets=LATENCY_BUCKETS, registry=reg),
        received=Counter("loreg_http_received_bytes", "Request body bytes received", ["route"], registry=reg),
        sent=Counter("loreg_http_sent_bytes", "Response body bytes sent", ["route"], registry=reg),
        storage_errors=Counter("loreg_blob_store_errors", "Blob store failures answered, by error code",
                               ["kind"], registry=reg),
        gc_deleted=Counter("loreg_gc_deleted_blobs", "Blobs deleted by gc", registry=reg),
        gc_bytes_freed=Counter("loreg_gc_freed_bytes", "Bytes freed by gc", registry=reg),
        gc_last_run=Gauge("loreg_gc_last_run_timestamp_seconds", "When gc last finished", registry=reg, **latest),
        fsck_checked=Gauge("loreg_fsck_checked_blobs", "Blobs the last fsck hashed", registry=reg, **latest),
        fsck_bad=Gauge("loreg_fsck_bad_blobs", "Corrupt or missing blobs the last fsck found", ["kind"],
                       registry=reg, **latest),
        fsck_last_run=Gauge("loreg_fsck_last_run_timestamp_seconds", "When fsck last finished", registry=reg,
                            **latest),
        registry=reg,
    )


def render(engine: Any) -> bytes:
    """The exposition text: this process's metrics (or every process's) and the job gauges."""
    from prometheus_client import CollectorRegistry, generate_latest

    if multiprocess():
        from prometheus_client.multiprocess import MultiProcessCollector

        metrics()  # the metric objects exist (and their files) even before the first request
        process = CollectorRegistry()
        MultiProcessCollector(process)
    else:
        process = metrics().registry
    jobs = CollectorRegistry()
    jobs.register(JobCollector(engine))
    return generate_latest(process) + generate_latest(jobs)


class JobCollector:
    """Export jobs as the database holds them, whichever process queued or ran them."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
        from sqlalchemy import func, select

        from loreg.registry.db.models import Export

        with self.engine.connect() as conn:
            counts = dict(conn.execute(select(Export.state, func.count()).group_by(Export.state)).all())
            spans = conn.execute(
                select(Export.state, Export.started_at, Export.finished_at).where(
                    Export.state.in_(("done", "failed")), Export.started_at.is_not(None), Export.finished_at.is_not(None)
                )
            ).all()
        states = GaugeMetricFamily("loreg_export_jobs", "Export jobs by state (queued is the queue depth)",
                                   labels=["state"])
        for state in ("queued", "running", "done", "failed"):
            states.add_metric([state], int(counts.get(state, 0)))
        yield states
        durations = HistogramMetricFamily("loreg_export_job_duration_seconds",
                                          "Run time of finished export jobs (claim to finish)", labels=["outcome"])
        for outcome in ("done", "failed"):
            seconds = [(f - s).total_seconds() for state, s, f in spans if state == outcome]
            buckets = [(str(b), sum(1 for x in seconds if x <= b)) for b in JOB_BUCKETS]
            buckets.append(("+Inf", len(seconds)))
            durations.add_metric([outcome], buckets, sum(seconds))
        yield durations
