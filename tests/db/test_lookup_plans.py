"""Every statement a lookup runs on Postgres can be served by an index: with sequential scans
priced out (enable_seqscan off) no plan still reads all of versions, metrics or
version_metrics_latest, neither sequentially nor as a whole index walked without a condition.
The shape bench/lookup.py measures at a million versions, checked here on a few thousand."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from loreg.registry.services.adapters import AdapterService, LookupFilters
from loreg.registry.services.context import AppContext, open_registry
from loreg.registry.settings import Settings
from tests.conftest import TEMPLATE_DB
from tests.support.lookup_fill import fill_sql

BIG_TABLES = ("versions", "metrics", "version_metrics_latest")


@pytest.fixture
def filled(pg_server: Any, tmp_path: Path) -> Iterator[AppContext]:
    name = f"plan_{uuid.uuid4().hex[:16]}"
    pg_server.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    registry = open_registry(Settings(database_url=pg_server.url(name), storage_url=f"file://{tmp_path / 'blobs'}"))
    with registry.engine.begin() as conn:
        for sql in fill_sql(adapters=300, per=100):
            conn.execute(text(sql))
    yield registry
    registry.close()
    pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def statements(registry: AppContext, run: Callable[[], Any]) -> list[tuple[str, Any]]:
    """Each statement ``run`` sends, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        seen.append((statement, params))

    event.listen(registry.engine, "before_cursor_execute", record)
    try:
        run()
    finally:
        event.remove(registry.engine, "before_cursor_execute", record)
    return seen


def plans(registry: AppContext, run: Callable[[], Any]) -> list[dict[str, Any]]:
    """The plan (EXPLAIN FORMAT JSON) of each statement ``run`` sends, sequential scans priced out."""
    seen = statements(registry, run)
    out = []
    with registry.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, params in seen:
            out.append(conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, params).scalar()[0]["Plan"])
    return out


def full_reads(node: dict[str, Any]) -> list[str]:
    """Nodes that read a big table whole: a sequential scan, or an index scan without an index condition."""
    out = []
    if node.get("Relation Name") in BIG_TABLES:
        kind = node["Node Type"]
        if kind == "Seq Scan" or (kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node):
            out.append(f"{kind} on {node['Relation Name']}")
    for child in node.get("Plans", []):
        out.extend(full_reads(child))
    return out


@pytest.mark.parametrize("allowed", [None, ("team-6/*", "team-7")], ids=["admin", "limited"])
def test_lookups_scan_no_big_table_sequentially(filled: AppContext, allowed: tuple[str, ...] | None) -> None:
    service = AdapterService(filled)
    by_metric = LookupFilters(base_ids=(6,), min_rank=16, metric="eval_loss", metric_max=0.5, allowed=allowed)
    questions = {
        "by metric, page 2": lambda: service.lookup(by_metric, cursor=service.lookup(by_metric, limit=5).next_cursor, limit=5),
        "search": lambda: service.lookup(LookupFilters(q="adapter-123", allowed=allowed)),
        "alias": lambda: service.get("team-6", "adapter-6", "prod"),
    }
    for what, run in questions.items():
        found = plans(filled, run)
        assert found, what
        for plan in found:
            assert not full_reads(plan), f"{what}: {full_reads(plan)}\n{plan}"
    page = service.lookup(LookupFilters(q="adapter-123", allowed=allowed))
    assert [i.name for i in page.items] == ["team-6/adapter-123"]


def test_a_lookup_page_and_a_version_take_a_few_statements_whatever_they_hold(filled: AppContext) -> None:
    """Round trips, not rows, are what a lookup's latency is made of: the base resolved, the page with
    its columns, and one statement for what its rows show (metrics, aliases, base names), however
    many rows and bases the page holds; a version read by alias is its row and then its rows."""
    service = AdapterService(filled)
    filters = LookupFilters(base="base-6", min_rank=16, metric="eval_loss", metric_max=0.5)
    for limit in (1, 50):
        seen = statements(filled, lambda limit=limit: service.lookup(filters, limit=limit))
        assert len(seen) == 3, [s for s, _ in seen]
    page = service.lookup(filters, limit=2)
    assert len(page.items) == 2 and all(i.base and i.base.names == ["base-6"] and i.metrics for i in page.items)
    seen = statements(filled, lambda: service.get("team-6", "adapter-6", "prod"))
    assert len(seen) == 2, [s for s, _ in seen]


def test_reads_on_postgres_send_no_begin_or_commit(filled: AppContext) -> None:
    """Under READ COMMITTED a transaction around a read's statements adds nothing but BEGIN and
    COMMIT (two round trips): the token check, a version read and a lookup run in autocommit."""
    from loreg.registry.services.tokens import TokenService

    tokens = TokenService(filled)
    _row, secret = tokens.create("read", ["team-6/*"])
    tokens.authenticate(secret)  # the first use records last_used_at (a write); later ones only read
    service = AdapterService(filled)
    modes: list[bool] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        modes.append(conn.connection.dbapi_connection.autocommit)

    event.listen(filled.engine, "before_cursor_execute", record)
    try:
        tokens.authenticate(secret)
        service.get("team-6", "adapter-6", "prod")
        service.lookup(LookupFilters(base="base-6", metric="eval_loss", allowed=("team-6/*",)))
    finally:
        event.remove(filled.engine, "before_cursor_execute", record)
    assert modes and all(modes), modes
