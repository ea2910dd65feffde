"""Lookup latency at scale through `loreg serve`, against the same queries as raw SQL (the floor).

Starts a throwaway Postgres (tests/support/postgres.py) unless --database-url names a server, then
fills a fresh database through SQL (INSERT ... SELECT generate_series) for each size and prints how
long the fill took. The large size (--versions): 100 base models, adapters of --versions/100
versions each up to 10,000 adapters, 2 targets per version, an eval_loss for each version and a
second, later one for every tenth, an alias `prod` per adapter. The small size, 1,000 versions: the
same 100 adapters the large fill puts on base-6 (names, namespaces, bases), 10 versions each, so
that every question below has the same answer at both sizes and the ratio measures growth with the
data, not with the answer (the printed row counts show it). Then, with an admin token and with one
limited to `team-6/*` and `team-7/*`, it measures p50/p99 over --repeat rounds of:
  lookup p1..p3  base=base-6 min_rank=16 metric=eval_loss metric_max=0.5, 3 pages by cursor
  alias          one version by alias (…/versions/prod)
  digest         one version by manifest digest
  search         q=adapter-1205 (a name search: one adapter, at both sizes)
Goals: p99 <= 1.5x the floor; p99 at the large size <= 1.2x p99 at 1,000 versions.

    python bench/lookup.py [--versions 1000000] [--quick] [--repeat 200] [--database-url postgresql://…]
                           [--keep DIR] [--shared-buffers 2GB]

--keep DIR keeps the throwaway cluster in DIR (created on first use) and reuses each size's database
when a previous run filled it (the schema is still upgraded, so a new migration applies): a 1M fill
takes minutes, a rerun after a code change none. Delete DIR to fill again.
"""

from __future__ import annotations

import argparse
import contextlib
import random
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
SMALL = 1000  # the second size
SEARCH = "adapter-1205"  # one adapter on base-6, at both sizes


def fill(url: str, versions: int) -> float | None:
    """Create the schema and the rows; returns the seconds the rows took, None when a previous run
    (--keep) filled this database already."""
    from sqlalchemy import text

    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine

    engine = make_engine(url)
    migrate.upgrade(engine)
    if versions <= SMALL:
        # the large fill's base-6 adapters, fewer versions each: every question has the same answer
        adapters, per, shape = 100, max(1, versions // 100), {"step": 100, "first": 5}
    else:
        adapters = min(10_000, max(1, versions // 100))
        per, shape = max(1, versions // adapters), {}
    with engine.connect() as conn:
        reused = conn.execute(text("SELECT count(*) FROM versions")).scalar() == adapters * per
    start = time.perf_counter()
    if not reused:
        with engine.begin() as conn:
            for sql in fill_sql(adapters, per, **shape):
                conn.execute(text(sql))
    # what autovacuum does soon after a bulk load or a migration that rewrote rows: the visibility
    # map lets index-only scans skip the rows, and index entries of the old rows go
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return None if reused else time.perf_counter() - start


# --- the floors: the same questions as hand-written SQL behind a bare FastAPI route --------------
#
# "floor" is what a minimal correct implementation of the API must do: check the bearer token (one
# primary-key statement), then one statement that answers everything the API's answer holds (base
# name resolved, the version's columns, adapter name, base digests and names, files, metrics and
# aliases aggregated as JSON). "bare" is the one statement alone, answering ids and a few columns
# (the floor of the previous rounds), kept to show what the token check and the full answer cost.

_SUMMARY = """
    SELECT v.id, v.number, v.manifest_digest, v.size, v.created_at, v.rank_max, v.facts, v.task_type, v.use_dora,
      v.warnings, a.namespace, a.name, b.weights_digest, b.layout_digest,
      (SELECT json_agg(json_build_array(m.key, m.value, m.created_at) ORDER BY m.id) FROM metrics m WHERE m.version_id = v.id),
      (SELECT json_agg(s.name ORDER BY s.name) FROM aliases s WHERE s.version_id = v.id),
      (SELECT json_agg(json_build_array(n.name, n.revision) ORDER BY n.id) FROM base_names n WHERE n.base_model_id = v.base_model_id)
      {more}
    FROM {source} JOIN adapters a ON a.id = v.adapter_id LEFT JOIN base_models b ON b.id = v.base_model_id"""

_LOOKUP_PAGE = """
    SELECT r.vid, r.mv FROM (
      SELECT v.id AS vid, m.value AS mv, row_number() OVER (PARTITION BY v.adapter_id ORDER BY v.number DESC) AS rn
      FROM versions v JOIN adapters a ON a.id = v.adapter_id,
      LATERAL (SELECT l.value FROM version_metrics_latest l WHERE l.version_id = v.id AND l.key = 'eval_loss') m
      WHERE v.base_model_id IN ({bases}) AND v.rank_min >= 16 AND m.value <= 0.5 {{vis}}) r
    WHERE r.rn = 1 AND (r.mv > :mv OR (r.mv = :mv AND r.vid > :vid))
    ORDER BY r.mv ASC NULLS LAST, r.vid ASC LIMIT 51"""

_SEARCH_PAGE = """
    SELECT p.vid FROM (
      SELECT (SELECT v.id FROM versions v WHERE v.adapter_id = a.id AND (a.search_name LIKE :q OR v.search_text LIKE :q)
              ORDER BY v.number DESC LIMIT 1) AS vid
      FROM adapters a WHERE a.id IN (SELECT n.id FROM adapters n WHERE n.search_name LIKE :q
                                     UNION SELECT m.adapter_id FROM versions m WHERE m.search_text LIKE :q) {vis}
      OFFSET 0) p
    WHERE p.vid IS NOT NULL ORDER BY p.vid DESC LIMIT 51"""

# every base sharing a layout with one the name names (the API's ?base= meaning)
_BASES = """SELECT b.id FROM base_models b WHERE b.layout_digest IN (SELECT l.layout_digest FROM base_models l
    WHERE l.id IN (SELECT n.base_model_id FROM base_names n WHERE n.name = :base))"""

_FULL = """, v.message, v.config,
      (SELECT json_agg(json_build_array(f.path, f.size, f.digest) ORDER BY f.path) FROM version_files f WHERE f.version_id = v.id),
      EXISTS (SELECT 1 FROM combinations c WHERE c.version_id = v.id)"""

FLOOR_SQL = {
    "lookup": _SUMMARY.format(more=", p.mv", source=f"({_LOOKUP_PAGE.format(bases=_BASES)}) p JOIN versions v ON v.id = p.vid")
    + " ORDER BY p.mv ASC NULLS LAST, p.vid ASC",
    "alias": _SUMMARY.format(more=_FULL, source="aliases s0 JOIN versions v ON v.id = s0.version_id")
    + " WHERE a.namespace = :ns AND a.name = :name AND s0.adapter_id = a.id AND s0.name = 'prod'",
    "digest": _SUMMARY.format(more=_FULL, source="versions v")
    + " WHERE a.namespace = :ns AND a.name = :name AND v.manifest_digest = :digest",
    "search": _SUMMARY.format(more="", source=f"({_SEARCH_PAGE}) p JOIN versions v ON v.id = p.vid") + " ORDER BY p.vid DESC",
}

BARE_SQL = {
    "lookup": _LOOKUP_PAGE.format(bases=":base_id"),
    "alias": """
        SELECT v.id, v.number, v.manifest_digest, v.facts FROM adapters a JOIN aliases s ON s.adapter_id = a.id
        JOIN versions v ON v.id = s.version_id WHERE a.namespace = :ns AND a.name = :name AND s.name = 'prod'""",
    "digest": """
        SELECT v.id, v.number, v.manifest_digest, v.facts FROM adapters a JOIN versions v ON v.adapter_id = a.id
        WHERE a.namespace = :ns AND a.name = :name AND v.manifest_digest = :digest""",
    "search": _SEARCH_PAGE,
}


def floor_app(url: str) -> Any:
    import hashlib
    import hmac

    from fastapi import FastAPI, Header, HTTPException
    from sqlalchemy import create_engine, text

    from loreg.registry.services.tokens import parse_token

    engine = create_engine(url, pool_size=8)
    app = FastAPI()

    @app.get("/{kind}/{which}")
    def query(kind: str, which: str, limited: bool = False, ns: str = "", name: str = "", digest: str = "", q: str = "",
              mv: float = -1.0, vid: int = 0, authorization: str = Header("")) -> list[list[Any]]:
        vis = "AND a.namespace IN ('team-6', 'team-7')" if limited else ""
        params = {"ns": ns, "name": name, "digest": digest, "q": f"%{q}%", "base": "base-6", "base_id": 6, "mv": mv,
                  "vid": vid}
        with engine.connect() as conn:
            if kind == "floor":
                parsed = parse_token(authorization.removeprefix("Bearer "))
                row = parsed and conn.execute(text(
                    "SELECT secret_hash, revoked_at, expires_at, namespaces FROM tokens WHERE id = :id"), {"id": parsed[0]}
                ).first()
                if not row or not hmac.compare_digest(row[0], hashlib.sha256(parsed[1].encode()).hexdigest()) or row[1]:
                    raise HTTPException(401)
            sql = (FLOOR_SQL if kind == "floor" else BARE_SQL)[which]
            rows = conn.execute(text(sql.format(vis=vis)), params).all()
        return [[str(x) for x in r] for r in rows]

    return app


# --- measuring ---------------------------------------------------------------------------------


def timed(calls: dict[Any, Callable[[], Any]], repeat: int) -> dict[Any, list[float]]:
    """Seconds per call of each of ``calls``, round-robin: every round runs each once, so a burst of
    load on a shared machine falls on all of them alike and the ratios stay fair; in a new order each
    round, so none always follows the same heavy call (the floor's window over 10,000 versions)."""
    for fn in calls.values():
        fn()  # warm
    out: dict[Any, list[float]] = {k: [] for k in calls}
    order, shuffle = list(calls), random.Random(16).shuffle
    for _ in range(repeat):
        shuffle(order)
        for key in order:
            t = time.perf_counter()
            calls[key]()
            out[key].append(time.perf_counter() - t)
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
        "search": lambda: client.get("/v1/adapters", params={"q": SEARCH}).raise_for_status(),
    }


def answers(client: httpx.Client) -> str:
    """How many rows each question's answer holds (the lookup's pages, the search)."""
    rows, cursor = [], None
    for _ in range(3):
        params: dict[str, Any] = {"base": "base-6", "min_rank": 16, "metric": "eval_loss", "metric_max": 0.5}
        body = client.get("/v1/adapters", params={**params, **({"cursor": cursor} if cursor else {})}).json()
        rows.append(len(body["items"]))
        cursor = body["next_cursor"]
        if not cursor:
            break
    search = len(client.get("/v1/adapters", params={"q": SEARCH}).json()["items"])
    return f"lookup pages {'+'.join(map(str, rows))} rows, search {search}"


def floor_calls(client: httpx.Client, target: dict[str, str], limited: bool, kind: str) -> dict[str, Callable[[], Any]]:
    def page(n: int) -> Callable[[], Any]:
        def go() -> Any:
            mv, vid = -1.0, 0
            for _ in range(n):
                r = client.get(f"/{kind}/lookup", params={"mv": mv, "vid": vid, "limited": limited})
                r.raise_for_status()
                rows = r.json()
                if len(rows) > 50:
                    vid, mv = int(rows[49][0]), float(rows[49][-1] if kind == "floor" else rows[49][1])
        return go

    common = {"ns": target["ns"], "name": target["name"], "limited": limited}
    return {
        "lookup p1": page(1),
        "lookup p1-p3": page(3),
        "alias": lambda: client.get(f"/{kind}/alias", params=common).raise_for_status(),
        "digest": lambda: client.get(f"/{kind}/digest", params={**common, "digest": target["digest"]}).raise_for_status(),
        "search": lambda: client.get(f"/{kind}/search", params={"q": SEARCH, "limited": limited}).raise_for_status(),
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


def measure(urls: dict[int, str], repeat: int) -> dict[tuple[int, str, str, str], list[float]]:
    """{(size, token, side, query): seconds}, side "loreg", "floor" or "bare"; every size's servers
    run at once and are asked in turn (timed()), so the 1,000-version figures share the load too."""
    calls: dict[tuple[int, str, str, str], Callable[[], Any]] = {}
    with contextlib.ExitStack() as stack:
        for size, url in urls.items():
            target, secrets = target_of(url), tokens(url)
            home = stack.enter_context(tempfile.TemporaryDirectory())
            env = env_with(LOREG_DATABASE_URL=url, LOREG_STORAGE_URL=f"file://{home}/blobs", LOREG_HOME=home)
            base_url, _proc = stack.enter_context(serving(env, Path(home)))
            floor_url = stack.enter_context(serve_in_thread(floor_app(url)))
            for who, secret in secrets.items():
                auth = {"Authorization": f"Bearer {secret}"}
                c = stack.enter_context(httpx.Client(base_url=base_url, headers=auth, timeout=60))
                print(f"answers at {size:,} versions, {who} token: {answers(c)}", flush=True)
                for q, fn in loreg_calls(c, target).items():
                    calls[(size, who, "loreg", q)] = fn
                f = stack.enter_context(httpx.Client(base_url=floor_url, headers=auth, timeout=60))
                for kind in ("floor", "bare"):
                    for q, fn in floor_calls(f, target, who == "limited", kind).items():
                        calls[(size, who, kind, q)] = fn
        return timed(calls, repeat)


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
            "search": lambda allowed=allowed: service.lookup(LookupFilters(q=SEARCH, allowed=allowed)),
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


def report(big: int, at: dict[Any, list[float]]) -> None:
    print(f"\n{'token':8} {'query':13} {'p50':>7} {'p99':>7} {'floor p99':>9} {'x floor':>7} {'p99@1K':>7} {'x 1K':>6}"
          f" {'bare p99':>8} {'x bare':>6} | p50: x floor, x 1K, floor's x 1K")
    for (size, who, side, q), xs in at.items():
        if side != "loreg" or size != big:
            continue
        floor, small, bare = at[(big, who, "floor", q)], at[(SMALL, who, "loreg", q)], at[(big, who, "bare", q)]
        r1, r2, r3 = p(xs, 0.99) / p(floor, 0.99), p(xs, 0.99) / p(small, 0.99), p(xs, 0.99) / p(bare, 0.99)
        print(f"{who:8} {q:13} {p(xs, .5):7.2f} {p(xs, .99):7.2f} {p(floor, .99):9.2f} {r1:6.2f}{'*' if r1 > 1.5 else ' '}"
              f" {p(small, .99):7.2f} {r2:5.2f}{'*' if r2 > 1.2 else ' '} {p(bare, .99):8.2f} {r3:6.2f}"
              f" | {p(xs, .5) / p(floor, .5):5.2f} {p(xs, .5) / p(small, .5):5.2f}"
              f" {p(floor, .5) / p(at[(SMALL, who, 'floor', q)], .5):5.2f}")
    print(f"(ms; at {big:,} versions; * misses its goal: 1.5x the floor, 1.2x the p99 at 1,000 versions;"
          " bare: the page's statement alone; the last three compare medians, the floor's at both sizes too:"
          " both sizes answer with the same rows)")


@contextlib.contextmanager
def kept_postgres(root: Path, settings: tuple[str, ...] = ()) -> Iterator[Any]:
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
    server = PgServer(datadir=datadir, sockdir=sockdir, port=free_port(), logfile=root / "postgres.log",
                      settings=settings)
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
def databases(given: str | None, keep: Path | None = None, settings: tuple[str, ...] = ()) -> Iterator[Callable[[str], str]]:
    if keep is not None:
        with kept_postgres(keep, settings) as pg:
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
    with start_postgres(settings) as pg:
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
    ap.add_argument("--no-explain", action="store_true", help="skip the EXPLAIN ANALYZE output")
    ap.add_argument("--keep", type=Path, help="keep the cluster in this folder and reuse filled databases")
    ap.add_argument("--shared-buffers", default="2GB",
                    help="the throwaway cluster's shared_buffers (Postgres' default, 128MB, is for a laptop; the"
                         " million-version database is 1.8 GB, and a server for it is sized to hold it)")
    args = ap.parse_args()
    big, repeat = (100_000, 50) if args.quick else (args.versions, args.repeat)
    with databases(args.database_url, args.keep, (f"shared_buffers={args.shared_buffers}",)) as make:
        urls = {}
        for size in (big, SMALL):
            urls[size] = url = make(f"bench_lookup_{size}")
            took = fill(url, size)
            print(f"fill {size:,} versions: " + (f"{took:.1f} s" if took is not None else "reused"), flush=True)
            if size == big and not args.no_explain:
                print("plans without a sequential scan of versions:", explain(url), flush=True)
        report(big, measure(urls, repeat))


if __name__ == "__main__":
    main()
