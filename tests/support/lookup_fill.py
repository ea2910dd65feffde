"""Many adapters, versions, targets, metrics and aliases in a Postgres database through SQL alone
(INSERT ... SELECT generate_series): bench/lookup.py at a million versions, the lookup plan test at a
few thousand."""

from __future__ import annotations


def fill_sql(adapters: int, per: int, *, step: int = 1, first: int = 1) -> list[str]:
    """The fill: adapter a (first, first + step, ... : ``adapters`` of them) is team-(a % 13)/adapter-a
    on base (a % 100) + 1 (the limited token sees 2/13 of every base's adapters); version
    (a-1)*per + n is its number n, with the message "run n". With ``step=100, first=5`` the adapters are
    those the full fill puts on base-6, so a smaller fill answers a question about base-6 with the
    same rows."""
    v = f"(a - 1) * {per} + n"
    ids = f"generate_series({first}, {first + step * (adapters - 1)}, {step}) a"
    return [
        "INSERT INTO base_models (id, weights_digest, layout_digest, model_type, architectures, config, tensors,"
        " files, weights_uploaded, parameter_count, created_at) SELECT i,"
        " 'sha256:' || encode(sha256(('w' || i)::bytea), 'hex'), 'sha256:' || encode(sha256(('l' || i)::bytea), 'hex'),"
        " 'llama', '[]', '{}', '[]', '[]', true, 0, now() FROM generate_series(1, 100) i",
        "INSERT INTO base_names (id, name, revision, base_model_id, created_at)"
        " SELECT i, 'base-' || i, '', i, now() FROM generate_series(1, 100) i",
        f"INSERT INTO adapters (id, namespace, name, last_number, search_name, created_at) SELECT a, 'team-' || (a % 13),"
        f" 'adapter-' || a, {per}, 'team-' || (a % 13) || '/adapter-' || a, now() FROM {ids}",
        # a GIN index grows row by row far slower than it is built once over the rows
        "DROP INDEX ix_versions_search_text_trgm",
        "DROP INDEX ix_adapters_search_name_trgm",
        "INSERT INTO versions (id, adapter_id, number, manifest_digest, message, size, config, facts, warnings,"
        " rank_min, rank_max, use_dora, task_type, base_model_id, search_text, created_at)"
        f" SELECT {v}, a, n, 'sha256:' || encode(sha256(('v' || ({v}))::bytea), 'hex'), 'run ' || n, 1000,"
        " '{}', '{\"lora_alpha\": 16, \"targets\": [\"q_proj\", \"v_proj\"]}', '[]',"
        f" (4 << ((a + n) % 5)), (4 << ((a + n) % 5)), false, 'CAUSAL_LM', (a % 100) + 1,"
        " 'run ' || n, now()"
        f" FROM {ids}, generate_series(1, {per}) n",
        "INSERT INTO adapter_bases (base_model_id, adapter_id) SELECT DISTINCT base_model_id, adapter_id FROM versions",
        "INSERT INTO version_targets (version_id, target) SELECT id, t FROM versions, (VALUES ('q_proj'), ('v_proj')) x(t)",
        "INSERT INTO metrics (version_id, key, value, created_at)"
        " SELECT id, 'eval_loss', ((id::bigint * 7919) % 1000) / 1000.0, now() FROM versions ORDER BY id",
        "INSERT INTO metrics (version_id, key, value, created_at)"
        " SELECT id, 'eval_loss', ((id::bigint * 104729) % 1000) / 1000.0, now() FROM versions WHERE id % 10 = 0 ORDER BY id",
        "INSERT INTO version_metrics_latest (version_id, key, value, metric_id)"
        " SELECT DISTINCT ON (version_id, key) version_id, key, value, id FROM metrics ORDER BY version_id, key, id DESC",
        "INSERT INTO aliases (id, adapter_id, name, version_id, updated_at)"
        f" SELECT a, a, 'prod', (a - 1) * {per} + ({per} + 1) / 2, now() FROM {ids}",
        *(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT max(id) FROM {t}))"
          for t in ("base_models", "base_names", "adapters", "versions", "metrics", "aliases")),
        "CREATE INDEX ix_versions_search_text_trgm ON versions USING gin (search_text gin_trgm_ops)",
        "CREATE INDEX ix_adapters_search_name_trgm ON adapters USING gin (search_name gin_trgm_ops)",
        "ANALYZE",
    ]
