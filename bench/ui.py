"""Server time of the web pages against the JSON API answering the same query, in the same run.

Fills Postgres by bulk SQL (generate_series) with --adapters adapters of --versions-per-adapter
versions each (default 10,000 x 10 = 100,000 versions, one eval_loss metric and two targets per
version, alias prod on each adapter's newest), all on one base registered through the API; then
serves it with `loreg serve` and times, interleaved, each page and its API twin:
  base page      GET /ui/bases/{base}                      vs GET /v1/adapters?base={base}
  adapter page   GET /ui/adapters/{ns}/{name}              vs GET /v1/adapters/{ns}/{name}/versions
  search         GET /ui/search?{filters}                  vs GET /v1/adapters?{filters}
and prints p50 / p99 of each (client-measured on 127.0.0.1: the same HTTP overhead on both sides),
the ratio page/API (goal: p99 <= 1.5x) and each page's size (goal: < 200 KB).

    python bench/ui.py [--adapters 10000] [--versions-per-adapter 10] [--requests 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.push_pull import base_tensors  # noqa: E402

BASE = "bench/llama-like"
FILL = [
    """INSERT INTO adapters (id, namespace, name, last_number, created_at)
       SELECT g, 'team-' || (g % 100), 'adapter-' || g, :per, now() FROM generate_series(1, :adapters) g""",
    """INSERT INTO versions (id, adapter_id, number, manifest_digest, message, size, config, facts, warnings,
                             rank_min, rank_max, use_dora, task_type, base_model_id, base_mapping, search_text,
                             created_at)
       SELECT v, (v - 1) / :per + 1, (v - 1) % :per + 1, 'sha256:' || encode(sha256(v::text::bytea), 'hex'),
              'run ' || v, 2500000, '{}'::json,
              json_build_object('r', r, 'lora_alpha', 2 * r, 'ranks', json_build_array(r),
                                'targets', json_build_array('q_proj', 'v_proj'), 'use_dora', v % 7 = 0,
                                'use_rslora', false, 'dtype', 'F32', 'parameter_count', 100000 * r),
              '[]'::json, r, r, v % 7 = 0, 'CAUSAL_LM', :base_id, NULL,
              'team-' || (((v - 1) / :per + 1) % 100) || '/adapter-' || ((v - 1) / :per + 1) || ' run ' || v,
              now() - ((:total - v) * interval '1 second')
       FROM (SELECT v, (ARRAY[4, 8, 16, 32])[v % 4 + 1] AS r FROM generate_series(1, :total) v) s""",
    """INSERT INTO version_targets (version_id, target)
       SELECT v, t FROM generate_series(1, :total) v, (VALUES ('q_proj'), ('v_proj')) AS x(t)""",
    """INSERT INTO metrics (version_id, key, value, created_at)
       SELECT v, 'eval_loss', 0.5 + (hashtext(v::text) & 65535) / 65536.0, now() FROM generate_series(1, :total) v""",
    """INSERT INTO version_metrics_latest (version_id, key, value, metric_id)
       SELECT version_id, key, value, id FROM metrics""",
    """INSERT INTO aliases (adapter_id, name, version_id, updated_at)
       SELECT a, 'prod', a * :per, now() FROM generate_series(1, :adapters) a""",
]


def fill(url: str, adapters: int, per: int) -> float:
    """Bulk rows straight into the database (the API would take hours); returns seconds taken."""
    from sqlalchemy import create_engine, text

    start = time.perf_counter()
    engine = create_engine(url)
    with engine.begin() as conn:
        base_id = conn.execute(text("SELECT id FROM base_models LIMIT 1")).scalar_one()
        values = {"adapters": adapters, "per": per, "total": adapters * per, "base_id": base_id}
        for sql in FILL:
            conn.execute(text(sql), {k: v for k, v in values.items() if f":{k}" in sql})
        for table in ("adapters", "versions", "metrics", "aliases"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(http: httpx.Client, path: str) -> tuple[float, int]:
    start = time.perf_counter()
    resp = http.get(path)
    elapsed = time.perf_counter() - start
    assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    return elapsed, len(resp.content)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--versions-per-adapter", type=int, default=10)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()

    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine
    from loreg.registry.services.context import open_registry
    from loreg.registry.services.tokens import TokenService
    from loreg.registry.settings import Settings
    from tests.support.postgres import start_postgres
    from tests.support.server import env_with, serving

    work = Path(tempfile.mkdtemp(prefix="loreg-bench-ui-"))
    with start_postgres() as pg:
        pg.execute("CREATE DATABASE bench")
        url = pg.url("bench")
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        settings = Settings(home=work / "home", database_url=url, storage_url=(work / "store").as_uri())
        registry = open_registry(settings)
        token = TokenService(registry).create("admin")[1]
        registry.close()
        env = env_with(LOREG_HOME=str(work / "home"), LOREG_DATABASE_URL=url, LOREG_STORAGE_URL=settings.effective_storage_url,
                       LOREG_EXPORT_WORKER="external")
        with serving(env, work) as (server, _):
            with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {token}"}, timeout=120) as api:
                api.post("/v1/base-models", json={
                    "name": BASE, "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                             "num_hidden_layers": 32, "hidden_size": 4096, "torch_dtype": "bfloat16"},
                    "tensors": base_tensors(32),
                    "files": [{"path": "model.safetensors", "size": 1, "digest": "sha256:" + "0" * 64}]}).raise_for_status()
                took = fill(url, args.adapters, args.versions_per_adapter)
                total = args.adapters * args.versions_per_adapter
                print(f"filled {args.adapters} adapters / {total} versions in {took:.1f} s (bulk SQL)")
                middle = args.adapters // 2
                filters = "min_rank=8&max_rank=16&target=q_proj&metric=eval_loss&metric_max=0.9&dora=false"
                pairs = [
                    ("base page", f"/ui/bases/{BASE}", f"/v1/adapters?base={BASE}"),
                    ("adapter page", f"/ui/adapters/team-{middle % 100}/adapter-{middle}",
                     f"/v1/adapters/team-{middle % 100}/adapter-{middle}/versions"),
                    ("search", f"/ui/search?{filters}", f"/v1/adapters?{filters}"),
                ]
                with httpx.Client(base_url=server, cookies={"loreg_ui_token": token}, timeout=120) as ui:
                    report(pairs, ui, api, args.requests)
    os.system(f"rm -rf {work}")


def report(pairs: list[tuple[str, str, str]], ui: httpx.Client, api: httpx.Client, n: int) -> None:
    print(f"{'query':<14}{'page p50':>10}{'page p99':>10}{'API p50':>10}{'API p99':>10}{'p50 x':>8}{'p99 x':>8}{'page KB':>9}")
    for label, page, twin in pairs:
        for _ in range(5):  # warm both paths (connections, caches, templates)
            timed(ui, page)
            timed(api, twin)
        page_t, api_t, size = [], [], 0
        for _ in range(n):
            t, size = timed(ui, page)
            page_t.append(t)
            api_t.append(timed(api, twin)[0])
        p50, p99 = percentile(page_t, 0.5), percentile(page_t, 0.99)
        a50, a99 = percentile(api_t, 0.5), percentile(api_t, 0.99)
        print(f"{label:<14}{p50 * 1e3:>8.1f}ms{p99 * 1e3:>8.1f}ms{a50 * 1e3:>8.1f}ms{a99 * 1e3:>8.1f}ms"
              f"{p50 / a50:>8.2f}{p99 / a99:>8.2f}{size / 1024:>9.1f}")


if __name__ == "__main__":
    main()
