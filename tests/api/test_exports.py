"""Exports end to end: queue, worker, result blobs, download; dedupe; lease take-over; lineage."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.merge.worker import ExportWorker
from tests import factories
from tests.support.races import LosesEveryInsertRace, count_rows
from tests.support.server import poll_until


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-llama")
    base = factories.make_base(root / "base", "llama", max_shard_size="20KB")
    return {
        "base": base,
        "a": factories.make_adapter(root / "a", "llama", base_dir=base, seed=11),
        "b": factories.make_adapter(root / "b", "llama", base_dir=base, seed=12, target_modules=["q_proj", "k_proj"], r=4),
    }


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def run_jobs(registry: Any) -> None:
    worker = ExportWorker(registry, device="cpu")
    while worker.run_once():
        pass


@pytest.fixture
def with_base(bare_client: RegistryClient, sharded: dict[str, Path]) -> RegistryClient:
    bare_client.register_base(sharded["base"], factories.base_name("llama"), upload_weights=True)
    bare_client.push(sharded["a"], "org/a")
    bare_client.push(sharded["b"], "org/b")
    return bare_client


def test_export_merges_like_peft_and_untouched_shards_dedupe(
    with_base: RegistryClient, api: Any, registry: Any, sharded: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    first = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}]})
    assert first.status_code == 202 and first.json()["state"] == "queued"
    run_jobs(registry)
    out = with_base.export(["org/a:1"], tmp_path / "merged")
    assert out["state"] == "done" and out["id"] == first.json()["id"]
    merged = tmp_path / "merged"
    base_shards = sorted(p.name for p in sharded["base"].glob("*.safetensors"))
    assert len(base_shards) >= 3
    assert sorted(p.name for p in merged.glob("*.safetensors")) == base_shards
    assert json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"] == json.loads(
        (sharded["base"] / "model.safetensors.index.json").read_text()
    )["weight_map"]
    touched = {p for p in base_shards if sha(merged / p) != sha(sharded["base"] / p)}
    assert touched and touched != set(base_shards), "untouched shards must be byte-identical to the base's"
    base_digests = {f["path"]: f["digest"] for f in with_base.base(factories.base_name("llama"))["files"]}
    for f in out["files"]:
        if f["path"] in base_shards and f["path"] not in touched:
            assert f["digest"] == base_digests[f["path"]]  # deduplicated: the same blob

    ids = torch.arange(16).reshape(1, 16) % 100
    with torch.no_grad():
        peft_merged = factories.load_adapter_model(sharded["base"], sharded["a"]).merge_and_unload()
        expected = peft_merged(input_ids=ids).logits
        ours = factories.load_base_model(merged)(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_identical_request_is_answered_from_the_stored_result(with_base: RegistryClient, api: Any, registry: Any) -> None:
    body = {"adapters": [{"ref": "org/a:1", "weight": 1.0}]}
    first = api.post("/v1/exports", json=body)
    assert first.status_code == 202
    again = api.post("/v1/exports", json=body)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    run_jobs(registry)
    done = api.post("/v1/exports", json={"adapters": [{"ref": "org/a"}]})  # same version via latest
    assert done.status_code == 200 and done.json()["id"] == first.json()["id"]
    assert done.json()["state"] == "done" and done.json()["files"]
    assert ExportWorker(registry, device="cpu").run_once() is None  # nothing new was queued


def test_two_adapter_weighted_export_is_the_weighted_sum_of_deltas(
    with_base: RegistryClient, registry: Any, sharded: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    job = with_base.request("POST", "/v1/exports", json={"adapters": [{"ref": "org/a", "weight": 0.7}, {"ref": "org/b", "weight": -0.3}]}).json()
    run_jobs(registry)
    out = with_base.export(["org/a", "org/b"], tmp_path / "m", weights=[0.7, -0.3])
    assert out["id"] == job["id"] and [a["weight"] for a in out["adapters"]] == [0.7, -0.3]

    def load_dir(d: Path) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for p in d.glob("*.safetensors"):
            t.update(load_file(p))
        return t

    base, merged = load_dir(sharded["base"]), load_dir(tmp_path / "m")
    expected = {k: v.clone() for k, v in base.items()}
    for folder, weight in ((sharded["a"], 0.7), (sharded["b"], -0.3)):
        cfg, tensors = factories.read_adapter(folder)
        scale = cfg["lora_alpha"] / cfg["r"]
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            expected[f"{module}.weight"] += weight * scale * (b.double() @ a.double()).float()
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)


def test_a_job_whose_worker_died_is_taken_over_and_finishes(with_base: RegistryClient, api: Any, registry: Any) -> None:
    job = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}]}).json()
    dead = ExportWorker(registry, lease_s=30, device="cpu")
    assert dead.claim() is not None  # claims the job, then "dies" without renewing its lease
    assert api.get(f"/v1/exports/{job['id']}").json()["state"] == "running"
    alive_now = ExportWorker(registry, lease_s=30, device="cpu")
    assert alive_now.claim() is None  # the lease still holds
    later = ExportWorker(registry, lease_s=30, device="cpu", clock=lambda: datetime.now(UTC) + timedelta(seconds=31))
    assert later.run_once() == job["id"]
    final = api.get(f"/v1/exports/{job['id']}").json()
    assert final["state"] == "done" and final["attempts"] == 2


def test_lineage_is_recorded_and_listed_on_each_version(with_base: RegistryClient, api: Any, registry: Any) -> None:
    job = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1", "weight": 0.5}], "dtype": "bfloat16"}).json()
    run_jobs(registry)
    done = api.get(f"/v1/exports/{job['id']}").json()
    a = with_base.version("org/a:1")
    assert done["adapters"] == [{"name": "org/a", "version": 1, "digest": a["digest"], "weight": 0.5}]
    assert done["base"]["weights_digest"] == a["base"]["weights_digest"]
    assert done["dtype"] == "bfloat16" and done["loreg_version"]
    listed = api.get("/v1/adapters/org/a/versions/1/exports").json()["items"]
    assert [e["id"] for e in listed] == [job["id"]]
    assert api.get("/v1/adapters/org/b/versions/1/exports").json()["items"] == []


def test_dtype_change_updates_config_and_loads(with_base: RegistryClient, registry: Any, tmp_path: Path) -> None:
    import torch

    with_base.request("POST", "/v1/exports", json={"adapters": [{"ref": "org/a"}], "dtype": "bfloat16"})
    run_jobs(registry)
    out = with_base.export(["org/a"], tmp_path / "bf16", dtype="bfloat16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    model = factories.load_base_model(tmp_path / "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert out["state"] == "done"


def test_base_without_stored_weights_cannot_be_exported(bare_client: RegistryClient, api: Any, sharded: dict[str, Path]) -> None:
    bare_client.register_base(sharded["base"], factories.base_name("llama"))
    bare_client.push(sharded["a"], "org/a")
    resp = api.post("/v1/exports", json={"adapters": [{"ref": "org/a"}]})
    assert resp.status_code == 422
    err = resp.json()["errors"][0]
    assert err["code"] == "MERGE_UNSUPPORTED" and "--upload-weights" in err["detail"]["hint"]


def test_server_without_torch_answers_with_a_clear_error(
    with_base: RegistryClient, api: Any, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    registry.settings.export_worker = "inprocess"
    resp = api.post("/v1/exports", json={"adapters": [{"ref": "org/a"}]})
    assert resp.status_code == 501
    assert resp.json()["errors"][0]["code"] == "MERGE_UNAVAILABLE"


def test_in_process_worker_of_serve_runs_queued_exports(settings: Any, admin_token: str, sharded: dict[str, Path], loreg_home: Path) -> None:
    from fastapi.testclient import TestClient

    from loreg.registry.app import create_app
    from loreg.registry.services.context import open_registry

    settings.export_worker = "inprocess"
    reg = open_registry(settings)
    try:
        app = create_app(registry=reg)
        with TestClient(app, base_url="http://testserver") as http:
            c = RegistryClient("http://testserver", admin_token, http=http)
            c.register_base(sharded["base"], factories.base_name("llama"), upload_weights=True)
            c.push(sharded["a"], "org/a")
            job = c.request("POST", "/v1/exports", json={"adapters": [{"ref": "org/a"}]}).json()
            state = poll_until(
                lambda: (st := c.get_json(f"/v1/exports/{job['id']}")["state"]) not in ("queued", "running") and st,
                "the in-process worker to finish the export",
                deadline_s=120,
            )
            assert state == "done"
    finally:
        reg.close()


def test_export_of_unknown_version_is_404(with_base: RegistryClient) -> None:
    with pytest.raises(errors.VersionNotFoundError):
        with_base.export(["org/a:7"], "/nonexistent-never-written")


@pytest.mark.slow
def test_standalone_worker_process_claims_jobs_from_postgres(
    with_base: RegistryClient, api: Any, settings: Any, backend: str
) -> None:
    import os
    import subprocess
    import sys

    if backend != "postgres":
        # standalone workers need Postgres: on SQLite the command refuses with a clear message
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOREG_")}
        env["LOREG_HOME"] = str(settings.home)
        run = subprocess.run([sys.executable, "-m", "loreg.cli.main", "worker", "--once"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "Postgres" in run.stderr
        return
    job = api.post("/v1/exports", json={"adapters": [{"ref": "org/a"}]}).json()
    env = dict(os.environ)
    env.update({
        "LOREG_DATABASE_URL": settings.database_url,
        "LOREG_STORAGE_URL": settings.storage_url,
        "LOREG_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "LOREG_S3_REGION": settings.s3_region,
        "LOREG_EXPORT_DEVICE": "cpu",
    })
    run = subprocess.run([sys.executable, "-m", "loreg.cli.main", "worker", "--once"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"ran {job['id']}" in run.stderr
    done = api.get(f"/v1/exports/{job['id']}").json()
    assert done["state"] == "done" and done["device"] == "cpu" and done["files"]


def test_export_whose_merge_overflows_float16_fails_and_the_client_names_the_tensor(
    settings: Any, admin_token: str, sharded: dict[str, Path], tmp_path: Path
) -> None:
    """What `loreg export` runs, with the in-process worker of `loreg serve` (TESTPLAN B19)."""
    from fastapi.testclient import TestClient

    from loreg.registry.app import create_app
    from loreg.registry.services.context import open_registry

    settings.export_worker = "inprocess"
    settings.max_export_weight = 1e7  # past the request check: the engine's own check must catch it
    reg = open_registry(settings)
    try:
        with TestClient(create_app(registry=reg), base_url="http://testserver") as http:
            c = RegistryClient("http://testserver", admin_token, http=http)
            c.register_base(sharded["base"], factories.base_name("llama"), upload_weights=True)
            c.push(sharded["a"], "org/a")
            with pytest.raises(errors.NonFiniteValuesError, match=r"overflows F16") as err:
                c.export(["org/a"], tmp_path / "out", weights=[1e6], dtype="float16", poll_s=0.05, timeout_s=120)
            assert err.value.detail["tensor"].endswith("_proj.weight")
            assert not (tmp_path / "out").exists()
    finally:
        reg.close()


def test_export_request_that_keeps_losing_the_insert_race_is_a_conflict_and_stores_nothing(
    with_base: RegistryClient, api: Any, registry: Any
) -> None:
    from loreg.registry.db import retry
    from loreg.registry.db.models import Export, ExportInput

    with LosesEveryInsertRace(registry, Export) as race:
        resp = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}]})
    assert resp.status_code == 409, resp.text
    assert resp.json()["errors"][0]["code"] == "CONFLICT"
    assert race.attempts == retry.ATTEMPTS
    assert count_rows(registry, Export) == 0 and count_rows(registry, ExportInput) == 0
    assert ExportWorker(registry, device="cpu").run_once() is None
    # the rule retries, it does not give up early: a race lost once is answered as usual
    assert api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}]}).status_code == 202



def _export_count(registry: Any) -> int:
    from sqlalchemy import func, select

    from loreg.registry.db.models import Export

    with registry.sessions.begin() as session:
        return session.scalar(select(func.count()).select_from(Export))


def test_weights_that_do_not_pair_with_the_references_are_a_request_error(
    with_base: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    with pytest.raises(errors.RequestInvalidError) as info:
        with_base.export(["org/a:1", "org/b:1"], tmp_path / "out", weights=[1.0])
    assert "one --weight per adapter reference" in (info.value.hint or "")
    assert _export_count(registry) == 0 and not (tmp_path / "out").exists()


def test_a_wait_that_runs_out_is_an_export_timeout_not_a_connection_failure(
    with_base: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    with pytest.raises(errors.ExportTimeoutError) as info:  # no worker runs: the job stays queued
        with_base.export(["org/a:1"], tmp_path / "out", timeout_s=0, poll_s=0.01)
    assert info.value.hint == "loreg export resumes it" and "still queued" in info.value.message
    assert not (tmp_path / "out").exists()
    run_jobs(registry)
    assert with_base.export(["org/a:1"], tmp_path / "out")["state"] == "done"  # resumed: the same request


def test_a_file_the_export_does_not_hold_is_file_not_found(with_base: RegistryClient, api: Any, registry: Any) -> None:
    job = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}]}).json()
    run_jobs(registry)
    resp = api.get(f"/v1/exports/{job['id']}/files/no-such-file.safetensors")
    assert resp.status_code == 404 and resp.json()["errors"][0]["code"] == "FILE_NOT_FOUND"
