"""Several processes, one truth (DESIGN.md section 7): two `loreg serve` and two `loreg worker`
processes on one Postgres and one S3 server, with clients alternating between the two APIs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from loreg.cli.client import RegistryClient
from tests import factories
from tests.faults.conftest import POSTGRES_ONLY, versions
from tests.support.server import LOREG, env_with, poll_until, serving

pytestmark = [pytest.mark.slow, POSTGRES_ONLY]
LEASE_S = "3"


def fleet_env(settings: Any, tmp_path: Path, **extra: str) -> dict[str, str]:
    return env_with(LOREG_HOME=str(tmp_path / "home"), LOREG_DATABASE_URL=settings.database_url,
                    LOREG_STORAGE_URL=settings.storage_url, LOREG_S3_ENDPOINT_URL=settings.s3_endpoint_url,
                    LOREG_S3_REGION=settings.s3_region, LOREG_EXPORT_WORKER="external",
                    LOREG_EXPORT_LEASE_S=LEASE_S, LOREG_EXPORT_DEVICE="cpu", **extra)


@contextmanager
def worker(env: dict[str, str], cwd: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(cwd / f"worker-{name}.log", "wb") as log:
        proc = subprocess.Popen([LOREG, "worker"], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def job(registry: Any, export_id: str) -> dict[str, Any]:
    with registry.engine.connect() as conn:
        row = conn.execute(text("SELECT state, attempts, progress, lease_owner FROM exports WHERE id = :i"),
                           {"i": export_id}).mappings().one()
    return dict(row)


def wait_done(client: RegistryClient, export_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get_json(f"/v1/exports/{export_id}")
        assert body["state"] != "failed", body
        return body if body["state"] == "done" else None

    return poll_until(done, f"export {export_id} to finish")


def test_two_apis_and_two_workers_share_one_truth(
    tmp_path: Path, settings: Any, registry: Any, make_token: Any, tiny_llama: dict[str, Path]
) -> None:
    token = make_token("admin")
    env = fleet_env(settings, tmp_path)
    with ExitStack() as stack:
        # the worker that will be killed starts first (its torch import overlaps the pushes), alone:
        # it claims the first export and stops mid-merge
        paused = stack.enter_context(worker(fleet_env(settings, tmp_path, LOREG_FAULT="mid_merge"), tmp_path, "paused"))
        urls = [stack.enter_context(serving(env, tmp_path))[0] for _ in range(2)]
        apis = [stack.enter_context(RegistryClient(url, token)) for url in urls]
        apis[0].register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
        pushes_land_once_each(apis, tiny_llama["adapter"], tmp_path)
        aliases_moved_through_one_api_are_seen_by_the_other(apis)
        a_killed_worker_s_export_is_finished_by_the_other(apis, registry, paused, env, tmp_path, stack)
        # two live workers from here on ("second" took the job over): both poll for the next job
        stack.enter_context(worker(env, tmp_path, "third"))
        poll_until(lambda: b"started" in (tmp_path / "worker-third.log").read_bytes(), "the third worker to start")
        one_merge_for_the_same_export_through_both_apis(apis, registry)


def pushes_land_once_each(apis: list[RegistryClient], adapter: Path, tmp_path: Path) -> None:
    folders = []
    for i in range(50):
        folder = shutil.copytree(adapter, tmp_path / f"push-{i}")
        (folder / "README.md").write_text(f"push {i}\n")  # new bytes: each push is a new version
        folders.append(folder)
    with ThreadPoolExecutor(max_workers=8) as pool:
        pushed = list(pool.map(lambda i: apis[i % 2].push(folders[i], "org/fleet"), range(50)))
    assert sorted(p["version"] for p in pushed) == list(range(1, 51))
    assert versions_of(apis[1], "org/fleet") == list(range(1, 51))


def versions_of(api: RegistryClient, name: str) -> list[int]:
    return sorted(v["version"] for v in api.versions(name))


def aliases_moved_through_one_api_are_seen_by_the_other(apis: list[RegistryClient]) -> None:
    for n in (3, 17, 4, 50, 1):
        apis[n % 2].set_alias(f"org/fleet:{n}", "prod")
        # no wait: the other process answers from the database, no per-process cache
        assert apis[(n + 1) % 2].resolve("org/fleet:prod").number == n


def one_merge_for_the_same_export_through_both_apis(apis: list[RegistryClient], registry: Any) -> None:
    body = {"adapters": [{"ref": "org/fleet:1"}]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda api: api.request("POST", "/v1/exports", json=body).json(), apis))
    assert answers[0]["id"] == answers[1]["id"]
    results = [wait_done(api, answers[0]["id"]) for api in apis]
    assert results[0]["files"] == results[1]["files"] and results[0]["files"]
    with registry.engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM export_inputs WHERE name = 'org/fleet:1'")).scalar()
    assert rows == 1  # one job for both requests
    assert job(registry, answers[0]["id"])["attempts"] == 1  # and one merge ran, though two workers poll


def a_killed_worker_s_export_is_finished_by_the_other(
    apis: list[RegistryClient], registry: Any, paused: subprocess.Popen[bytes], env: dict[str, str], tmp_path: Path,
    stack: ExitStack,
) -> None:
    export_id = apis[0].request("POST", "/v1/exports", json={"adapters": [{"ref": "org/fleet:2"}]}).json()["id"]
    poll_until(lambda: (j := job(registry, export_id))["state"] == "running" and j["progress"].get("tensors_done", 0) >= 1,
               "the paused worker to be mid-merge")
    os.kill(paused.pid, signal.SIGKILL)
    paused.wait(timeout=30)
    stack.enter_context(worker(env, tmp_path, "second"))
    taken_over = wait_done(apis[1], export_id)
    assert job(registry, export_id)["attempts"] == 2  # claimed twice: the second after the lease ran out
    # the same request merged again from scratch, uninterrupted: the same bytes
    with registry.engine.begin() as conn:
        conn.execute(text("DELETE FROM exports WHERE id = :i"), {"i": export_id})
    again = apis[1].request("POST", "/v1/exports", json={"adapters": [{"ref": "org/fleet:2"}]}).json()["id"]
    assert again != export_id
    fresh = wait_done(apis[0], again)
    assert job(registry, again)["attempts"] == 1
    assert sorted((f["path"], f["digest"]) for f in fresh["files"]) == sorted(
        (f["path"], f["digest"]) for f in taken_over["files"])
