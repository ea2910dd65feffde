"""Exports between namespaces (TESTPLAN A10, A11, B19; ISSUE 9 items 2-4 and 9, ISSUE 10 item 14).

Decisions these tests pin down:
- Who may read an export is decided by the input names stored with it (``ns/name:N``), deleted
  versions included: a token must cover every one (403 DENIED otherwise, naming none of them).
- A record's key names its inputs: identical bytes in another namespace get their own record,
  created done with the stored result's files (no second merge).
- A read token may export what it can read, with a bound on its queued and running jobs (429).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.merge import engine
from loreg.registry.merge.worker import ExportWorker
from tests import factories
from tests.security.conftest import error_of


@pytest.fixture(scope="module")
def other_adapter(tiny_llama: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return factories.make_adapter(tmp_path_factory.mktemp("other") / "a", "llama", base_dir=tiny_llama["base"], seed=7)


@pytest.fixture
def teams(bare_client: RegistryClient, tiny_llama: dict[str, Path], other_adapter: Path) -> RegistryClient:
    """team-a/x and team-b/x hold the same bytes; team-b/y is another adapter for the same base."""
    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
    bare_client.push(tiny_llama["adapter"], "team-b/x")
    bare_client.push(tiny_llama["adapter"], "team-a/x")
    bare_client.push(other_adapter, "team-b/y")
    return bare_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def run_jobs(registry: Any) -> list[str]:
    worker = ExportWorker(registry, device="cpu")
    ran = []
    while (job := worker.run_once()) is not None:
        ran.append(job)
    return ran


def count(registry: Any, table: str) -> int:
    with registry.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)


def test_export_of_a_deleted_version_stays_closed_to_other_namespaces(
    app: Any, api: TestClient, teams: RegistryClient, registry: Any, make_token: Any
) -> None:
    job = api.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]}).json()
    run_jobs(registry)
    assert api.delete("/v1/adapters/team-b/x/versions/1").status_code == 200
    with TestClient(app, raise_server_exceptions=False, headers=bearer(make_token("read", ["team-a/*"]))) as http:
        for resp in (http.get(f"/v1/exports/{job['id']}"), http.get(f"/v1/exports/{job['id']}/files/config.json")):
            err = error_of(resp, 403, "DENIED")
            assert "team-b" not in json.dumps(err)
    with TestClient(app, raise_server_exceptions=False, headers=bearer(make_token("read", ["team-b/*"]))) as http:
        seen = http.get(f"/v1/exports/{job['id']}")
        assert seen.status_code == 200
        assert [(a["name"], a["version"]) for a in seen.json()["adapters"]] == [("team-b/x", 1)]
        assert http.get(f"/v1/exports/{job['id']}/files/config.json").status_code == 200
    assert api.get(f"/v1/exports/{job['id']}").status_code == 200  # admin


def test_version_export_history_lists_only_exports_whose_every_input_the_token_reads(
    app: Any, api: TestClient, teams: RegistryClient, make_token: Any
) -> None:
    alone = api.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1"}]}).json()
    mixed_body = {"adapters": [{"ref": "team-a/x:1"}, {"ref": "team-b/y:1", "weight": 0.5}]}
    mixed = api.post("/v1/exports", json=mixed_body).json()
    with TestClient(app, raise_server_exceptions=False, headers=bearer(make_token("read", ["team-a/*"]))) as http:
        listed = http.get("/v1/adapters/team-a/x/versions/1/exports")
        assert [e["id"] for e in listed.json()["items"]] == [alone["id"]]
        assert "team-b" not in listed.text
    both = make_token("read", ["team-a/*", "team-b/*"])
    with TestClient(app, raise_server_exceptions=False, headers=bearer(both)) as http:
        listed = http.get("/v1/adapters/team-a/x/versions/1/exports").json()["items"]
        assert {e["id"] for e in listed} == {alone["id"], mixed["id"]}


def test_identical_bytes_in_another_namespace_get_their_own_record_and_reuse_the_stored_files(
    app: Any, api: TestClient, teams: RegistryClient, registry: Any, make_token: Any
) -> None:
    theirs = api.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]}).json()
    run_jobs(registry)
    theirs = api.get(f"/v1/exports/{theirs['id']}").json()
    assert theirs["state"] == "done"
    blobs_before = count(registry, "blobs")
    with TestClient(app, raise_server_exceptions=False, headers=bearer(make_token("write", ["team-a/*"]))) as http:
        resp = http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1"}]})
        assert resp.status_code == 200, resp.text  # answered at once: the same bytes were merged already
        ours = resp.json()
        assert ours["id"] != theirs["id"] and ours["state"] == "done"
        assert "team-b" not in resp.text
        assert [(a["name"], a["version"]) for a in ours["adapters"]] == [("team-a/x", 1)]
        assert ours["files"] == theirs["files"]  # the same blobs
        assert http.get(f"/v1/exports/{ours['id']}").json() == ours
        config = http.get(f"/v1/exports/{ours['id']}/files/config.json")
        assert config.status_code == 200 and config.headers["X-Loreg-Digest"] in {f["digest"] for f in ours["files"]}
        error_of(http.get(f"/v1/exports/{theirs['id']}"), 403, "DENIED")
        history = http.get("/v1/adapters/team-a/x/versions/1/exports").json()["items"]
        assert [e["id"] for e in history] == [ours["id"]]
    assert run_jobs(registry) == []  # nothing was queued: no second merge
    assert count(registry, "blobs") == blobs_before


def test_identical_bytes_queued_in_two_namespaces_are_merged_once(
    api: TestClient, teams: RegistryClient, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    merges = []
    real = engine.merge_to_dir

    def counting(*args: Any, **kwargs: Any) -> Any:
        merges.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merge_to_dir", counting)
    b = api.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]}).json()
    a = api.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1"}]}).json()
    assert a["id"] != b["id"] and a["state"] == b["state"] == "queued"
    assert sorted(run_jobs(registry)) == sorted([a["id"], b["id"]])
    assert len(merges) == 1
    done_a, done_b = (api.get(f"/v1/exports/{j['id']}").json() for j in (a, b))
    assert done_a["state"] == done_b["state"] == "done" and done_a["files"] == done_b["files"]
    assert [x["name"] for x in done_a["adapters"]] == ["team-a/x"]


def test_read_token_exports_what_it_reads_within_its_bound_of_queued_jobs(
    app: Any, api: TestClient, teams: RegistryClient, registry: Any, make_token: Any
) -> None:
    registry.settings.max_queued_exports_per_token = 2
    reader = make_token("read", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers=bearer(reader)) as http:
        first = http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": 0.5}]})
        assert first.status_code == 202, first.text
        assert http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": 0.25}]}).status_code == 202
        again = http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": 0.5}]})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]  # no new job: not refused
        before = count(registry, "exports")
        over = http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": 0.75}]})
        err = error_of(over, 429, "TOOMANYREQUESTS")
        assert over.headers["Retry-After"] and "LOREG_MAX_QUEUED_EXPORTS_PER_TOKEN" in err["detail"]["hint"]
        error_of(http.post("/v1/exports", json={"adapters": [{"ref": "team-b/y:1"}]}), 403, "DENIED")
        assert count(registry, "exports") == before
    other = make_token("read", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers=bearer(other)) as http:  # the bound is per token
        assert http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": 0.75}]}).status_code == 202
    writer = make_token("write", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers=bearer(writer)) as http:  # unchanged for write
        for w in (0.1, 0.2, 0.3):
            assert http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": w}]}).status_code == 202
    run_jobs(registry)
    with TestClient(app, raise_server_exceptions=False, headers=bearer(reader)) as http:
        later = http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": 0.9}]})
        assert later.status_code == 202, later.text


def test_export_weights_out_of_bounds_are_refused_and_nothing_is_queued(
    api: TestClient, teams: RegistryClient, registry: Any
) -> None:
    for weight in (1e300, 100.5, -1e6):
        err = error_of(api.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": weight}]}),
                       422, "MERGE_UNSUPPORTED")
        assert "outside [-100, 100]" in err["message"] and "LOREG_MAX_EXPORT_WEIGHT" in err["detail"]["hint"]
    for raw in ('{"adapters": [{"ref": "team-a/x:1", "weight": 1e400}]}',
                '{"adapters": [{"ref": "team-a/x:1", "weight": NaN}]}'):
        resp = api.post("/v1/exports", content=raw, headers={"Content-Type": "application/json"})
        error_of(resp, 422, "MERGE_UNSUPPORTED")
    assert count(registry, "exports") == 0
    negated = api.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1", "weight": -100.0}]})
    assert negated.status_code == 202  # task negation stays legal


def test_export_that_overflows_float16_fails_naming_the_tensor(
    api: TestClient, teams: RegistryClient, registry: Any
) -> None:
    registry.settings.max_export_weight = 1e7
    body = {"adapters": [{"ref": "team-a/x:1", "weight": 1e6}], "dtype": "float16"}
    job = api.post("/v1/exports", json=body).json()
    run_jobs(registry)
    failed = api.get(f"/v1/exports/{job['id']}").json()
    assert failed["state"] == "failed" and failed["files"] == []
    assert failed["error"]["code"] == "NONFINITE_VALUES"
    assert failed["error"]["detail"]["tensor"].endswith("_proj.weight")
    assert "overflows F16" in failed["error"]["message"]
    assert count(registry, "export_files") == 0
    assert isinstance(errors.error_from_envelope(500, {"errors": [failed["error"]]}), errors.NonFiniteValuesError)


def test_export_whose_input_name_was_lost_before_names_were_stored_needs_a_token_covering_all(
    app: Any, api: TestClient, teams: RegistryClient, registry: Any, make_token: Any
) -> None:
    """Rows migrated from before 0005 whose version was already deleted have no name: fail closed."""
    job = api.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]}).json()
    with registry.engine.begin() as conn:
        conn.execute(text("UPDATE export_inputs SET name = NULL, version_id = NULL WHERE export_id = :i"),
                     {"i": job["id"]})
    with TestClient(app, raise_server_exceptions=False, headers=bearer(make_token("read", ["team-b/*"]))) as http:
        error_of(http.get(f"/v1/exports/{job['id']}"), 403, "DENIED")
    with TestClient(app, raise_server_exceptions=False, headers=bearer(make_token("read"))) as http:
        assert http.get(f"/v1/exports/{job['id']}").json()["adapters"][0]["name"] is None


def test_anonymous_read_cannot_queue_merges(
    app: Any, teams: RegistryClient, registry: Any, anon: TestClient
) -> None:
    registry.settings.anonymous_read = True
    assert anon.get("/v1/adapters/team-a/x").status_code == 200  # reads are open
    error_of(anon.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1"}]}), 401, "UNAUTHORIZED")
    assert count(registry, "exports") == 0
