"""Lookup latency at scale through `loreg serve`, against the same queries as raw SQL (the floor).

Starts a throwaway Postgres (tests/support/postgres.py) unless --database-url names a server, then for
each size (--versions, then 1,000) fills a fresh database through SQL (INSERT ... SELECT
generate_series: 100 base models, adapters of --versions/100 versions each up to 10,000 adapters,
2 targets per version, an eval_loss for each version and a second, later one for every tenth, an
alias `prod` per adapter) and prints how long the fill took. Then, with an admin token and with one
limited to `team-6/*` and `team-7/*`, it measures p50/p99 over --repeat rounds of:
  lookup p1..p3  base=base-6 min_rank=16 metric=eval_loss metric_max=0.5, 3 pages by cursor
  alias          one version by alias (…/versions/prod)
  digest         one version by manifest digest
  search         q=adapter-1234 (a name search)
through a real `loreg serve` over HTTP, and the same SQL through a bare FastAPI route (one query
per request, no ORM: the floor). At the large size it prints EXPLAIN ANALYZE of every statement
the lookup service runs for each query, and whether any scans versions sequentially.

Goals: p99 <= 1.5x the floor; p99 at the large size <= 1.2x p99 at 1,000 versions.

    python bench/lookup.py [--versions 1000000] [--quick] [--repeat 200] [--database-url postgresql://…]
                           [--keep DIR]

--keep DIR keeps the throwaway cluster in DIR (created on first use) and reuses each size's database
when a previous run filled it (the schema is still upgraded, so a new migration applies): a 1M fill
takes minutes, a rerun after a code change none. Delete DIR to fill again.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.lookup_fill import fill_sql  # noqa: E402
from tests.support.postgres import start_postgres  # noqa: E402
from tests.support.server import env_with, serve_in_thread, serving  # noqa: E402

BASES = 100
LIMITED = ("team-6/*", "team-7/*")


def fill(url: str, versions: int) -> float | None:
    """Create the schema and the rows; returns the seconds the rows took, None when a previous run
    (--keep) filled this database already."""
    from sqlalchemy import text

    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine

    engine = make_engine(url)
    migrate.upgrade(engine)
    adapters = min(10_000, max(1, versions // 100))
    per = max(1, versions // adapters)
    with engine.connect() as conn:
        if conn.execute(text("SELECT count(*) FROM versions")).scalar() == adapters * per:
            engine.dispose()
            return None
    start = time.perf_counter()
    with engine.begin() as conn:
        for sql in fill_sql(adapters, per):
            conn.execute(text(sql))
    # what autovacuum does soon after a bulk load: the visibility map lets index-only scans skip the rows
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - start


# --- the floor: the same questions as hand-written SQL behind a bare FastAPI route -------------

FLOOR_SQL = {
    "lookup": """
        SELECT r.vid, r.mv FROM (
          SELECT v.id AS vid, m.value AS mv, row_number() OVER (PARTITION BY v.adapter_id ORDER BY v.number DESC) AS rn
          FROM versions v JOIN adapters a ON a.id = v.adapter_id,
          LATERAL (SELECT l.value FROM version_metrics_latest l WHERE l.version_id = v.id AND l.key = 'eval_loss') m
          WHERE v.base_model_id = :base AND v.rank_min >= 16 AND m.value <= 0.5 {vis}) r
        WHERE r.rn = 1 AND (r.mv > :mv OR (r.mv = :mv AND r.vid > :vid))
        ORDER BY r.mv ASC NULLS LAST, r.vid ASC LIMIT 51""",
    "alias": """
        SELECT v.id, v.number, v.manifest_digest, v.facts FROM adapters a JOIN aliases s ON s.adapter_id = a.id
        JOIN versions v ON v.id = s.version_id WHERE a.namespace = :ns AND a.name = :name AND s.name = 'prod'""",
    "digest": """
        SELECT v.id, v.number, v.manifest_digest, v.facts FROM adapters a JOIN versions v ON v.adapter_id = a.id
        WHERE a.namespace = :ns AND a.name = :name AND v.manifest_digest = :digest""",
    "search": """
        SELECT r.vid FROM (
          SELECT v.id AS vid, row_number() OVER (PARTITION BY v.adapter_id ORDER BY v.number DESC) AS rn
          FROM versions v JOIN adapters a ON a.id = v.adapter_id
          WHERE v.search_text LIKE :q {vis}) r
        WHERE r.rn = 1 ORDER BY r.vid DESC LIMIT 51""",
}


def floor_app(url: str) -> Any:
    from fastapi import FastAPI
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql+psycopg", "postgresql+psycopg"), pool_size=8)
    app = FastAPI()

    @app.get("/q/{which}")
    def query(which: str, limited: bool = False, ns: str = "", name: str = "", digest: str = "", q: str = "",
              base: int = 0, mv: float = -1.0, vid: int = 0) -> list[list[Any]]:
        vis = "AND a.namespace IN ('team-6', 'team-7')" if limited else ""
        params = {"ns": ns, "name": name, "digest": digest, "q": f"%{q}%", "base": base, "mv": mv, "vid": vid}
        with engine.connect() as conn:
            rows = conn.execute(text(FLOOR_SQL[which].format(vis=vis)), params).all()
        return [[str(x) for x in r] for r in rows]

    return app


# --- measuring ---------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000


def loreg_calls(client: httpx.Client, target: dict[str, str]) -> dict[str, Callable[[], Any]]:
    def page(n: int) -> Callable[[], Any]:
        def go() -> Any:
            cursor = None
            for _ in range(n):
                params = {"base": "base-6", "min_rank": 16, "metric": "eval_loss", "metric_max": 0.5, "limit": 50}
                if cursor:
                    params["cursor"] = cursor
                r = client.get("/v1/adapters", params=params)
                r.raise_for_status()
                cursor = r.json()["next_cursor"]
            return r
        return go

    ns, name, digest = target["ns"], target["name"], target["digest"]
    return {
        "lookup p1": page(1),
        "lookup p1-p3": page(3),
        "alias": lambda: client.get(f"/v1/adapters/{ns}/{name}/versions/prod").raise_for_status(),
        "digest": lambda: client.get(f"/v1/adapters/{ns}/{name}/versions/{digest}").raise_for_status(),
        "search": lambda: client.get("/v1/adapters", params={"q": "adapter-1234"}).raise_for_status(),
    }


def floor_calls(client: httpx.Client, target: dict[str, str], limited: bool) -> dict[str, Callable[[], Any]]:
    def page(n: int) -> Callable[[], Any]:
        def go() -> Any:
            mv, vid = -1.0, 0
            for _ in range(n):
                rows = client.get("/q/lookup", params={"base": 6, "mv": mv, "vid": vid, "limited": limited}).json()
                if len(rows) > 50:
                    vid, mv = int(rows[49][0]), float(rows[49][1])
        return go

    common = {"ns": target["ns"], "name": target["name"], "limited": limited}
    return {
        "lookup p1": page(1),
        "lookup p1-p3": page(3),
        "alias": lambda: client.get("/q/alias", params=common).raise_for_status(),
        "digest": lambda: client.get("/q/digest", params={**common, "digest": target["digest"]}).raise_for_status(),
        "search": lambda: client.get("/q/search", params={"q": "adapter-1234", "limited": limited}).raise_for_status(),
    }


def target_of(url: str) -> dict[str, str]:
    """A version the limited token may read: an adapter of team-6."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT a.namespace, a.name, v.manifest_digest FROM adapters a JOIN versions v ON v.adapter_id = a.id"
            " WHERE a.namespace = 'team-6' ORDER BY a.id, v.number LIMIT 1")).one()
    engine.dispose()
    return {"ns": row[0], "name": row[1], "digest": row[2]}


def tokens(url: str) -> dict[str, str]:
    from loreg.registry.services.context import open_registry
    from loreg.registry.services.tokens import TokenService
    from loreg.registry.settings import Settings

    registry = open_registry(Settings(database_url=url, storage_url=f"file://{tempfile.mkdtemp()}"))
    try:
        service = TokenService(registry)
        return {"admin": service.create("admin")[1], "limited": service.create("read", list(LIMITED))[1]}
    finally:
        registry.close()


def measure(url: str, repeat: int) -> dict[tuple[str, str, str], list[float]]:
    """{(token, side, query): seconds}: side "loreg" or "floor"."""
    target, secrets = target_of(url), tokens(url)
    out: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as home:
        env = env_with(LOREG_DATABASE_URL=url, LOREG_STORAGE_URL=f"file://{home}/blobs", LOREG_HOME=home)
        with serving(env, Path(home)) as (base_url, _proc), serve_in_thread(floor_app(url)) as floor_url:
            for who, secret in secrets.items():
                with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as c:
                    for q, fn in loreg_calls(c, target).items():
                        out[(who, "loreg", q)] = timed(fn, repeat)
                with httpx.Client(base_url=floor_url, timeout=60) as c:
                    for q, fn in floor_calls(c, target, who == "limited").items():
                        out[(who, "floor", q)] = timed(fn, repeat)
    return out


def explain(url: str) -> bool:
    """EXPLAIN ANALYZE of each statement the service runs for the bench's questions; True when no
    plan scans versions sequentially."""
    from sqlalchemy import event, text

    from loreg.registry.services.adapters import AdapterService, LookupFilters
    from loreg.registry.services.context import open_registry
    from loreg.registry.settings import Settings

    registry = open_registry(Settings(database_url=url, storage_url=f"file://{tempfile.mkdtemp()}"))
    target = target_of(url)
    seen: list[tuple[str, Any]] = []
    event.listen(registry.engine, "before_cursor_execute", lambda c, cur, s, p, ctx, many: seen.append((s, p)))
    service = AdapterService(registry)
    base_ids = (6,)
    clean = True
    for who, allowed in (("admin", None), ("limited", LIMITED)):
        f = LookupFilters(base_ids=base_ids, min_rank=16, metric="eval_loss", metric_max=0.5, allowed=allowed)
        questions: dict[str, Callable[[], Any]] = {
            "lookup p2": lambda f=f: service.lookup(f, cursor=service.lookup(f).next_cursor),
            "alias": lambda: service.get(target["ns"], target["name"], "prod"),
            "digest": lambda: service.get(target["ns"], target["name"], target["digest"]),
            "search": lambda allowed=allowed: service.lookup(LookupFilters(q="adapter-1234", allowed=allowed)),
        }
        for q, fn in questions.items():
            seen.clear()
            fn()
            statements = list(seen)
            with registry.engine.connect() as conn:
                for sql, params in statements:
                    plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN ANALYZE " + sql, params))
                    seq = "Seq Scan on versions" in plan
                    clean = clean and not seq
                    print(f"--- {who} {q}{'  SEQUENTIAL SCAN OF VERSIONS' if seq else ''}\n{sql.strip()}\n{plan}\n")
    registry.close()
    return clean


def report(big: int, at_big: dict[Any, list[float]], at_small: dict[Any, list[float]]) -> None:
    print(f"\n{'token':8} {'query':13} {'p50':>7} {'p99':>7} {'floor p99':>9} {'x floor':>7} {'p99@1K':>7} {'x 1K':>6}")
    for (who, side, q), xs in at_big.items():
        if side != "loreg":
            continue
        floor, small = at_big[(who, "floor", q)], at_small[(who, "loreg", q)]
        r1, r2 = p(xs, 0.99) / p(floor, 0.99), p(xs, 0.99) / p(small, 0.99)
        print(f"{who:8} {q:13} {p(xs, .5):7.2f} {p(xs, .99):7.2f} {p(floor, .99):9.2f} {r1:6.2f}{'*' if r1 > 1.5 else ' '}"
              f" {p(small, .99):7.2f} {r2:5.2f}{'*' if r2 > 1.2 else ' '}")
    print(f"(ms; at {big:,} versions; * misses its goal: 1.5x the floor, 1.2x the p99 at 1,000 versions)")


@contextlib.contextmanager
def kept_postgres(root: Path) -> Iterator[Any]:
    """A cluster in ``root`` that outlives the run (--keep)."""
    import os
    import shutil
    import subprocess

    from tests.support.moto import free_port
    from tests.support.postgres import PgServer, _as_postgres

    root.mkdir(parents=True, exist_ok=True)
    datadir, sockdir = root / "data", root / "sock"
    sockdir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
        shutil.chown(sockdir, "postgres")
    server = PgServer(datadir=datadir, sockdir=sockdir, port=free_port(), logfile=root / "postgres.log")
    if not datadir.exists():
        subprocess.run(_as_postgres(["initdb", "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                     "--no-sync"]), check=True, stdout=subprocess.DEVNULL)
    server.stop()  # one an interrupted run left running
    server.start()
    try:
        yield server
    finally:
        server.stop("fast")


@contextlib.contextmanager
def databases(given: str | None, keep: Path | None = None) -> Iterator[Callable[[str], str]]:
    if keep is not None:
        with kept_postgres(keep) as pg:
            def make_kept(name: str) -> str:
                from sqlalchemy import create_engine, text

                admin = create_engine(pg.url("postgres"), isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is None:
                        conn.execute(text(f"CREATE DATABASE {name}"))
                admin.dispose()
                return pg.url(name)

            yield make_kept
        return
    if given:
        from sqlalchemy import create_engine, text

        admin = create_engine(given, isolation_level="AUTOCOMMIT")

        def make(name: str) -> str:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                conn.execute(text(f"CREATE DATABASE {name}"))
            return given.rsplit("/", 1)[0] + "/" + name

        yield make
        return
    with start_postgres() as pg:
        def make_local(name: str) -> str:
            pg.execute(f"CREATE DATABASE {name}")
            return pg.url(name)

        yield make_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100,000 versions, 50 rounds")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--database-url", help="a Postgres server (postgresql+psycopg://…/postgres) to create databases on")
    ap.add_argument("--keep", type=Path, help="keep the cluster in this folder and reuse filled databases")
    args = ap.parse_args()
    big, repeat = (100_000, 50) if args.quick else (args.versions, args.repeat)
    with databases(args.database_url, args.keep) as make:
        results = {}
        for size in (big, 1000):
            url = make(f"bench_lookup_{size}")
            took = fill(url, size)
            print(f"fill {size:,} versions: " + (f"{took:.1f} s" if took is not None else "reused"), flush=True)
            if size == big:
                print("plans without a sequential scan of versions:", explain(url), flush=True)
            results[size] = measure(url, repeat)
        report(big, results[big], results[1000])


if __name__ == "__main__":
    main()
