"""L6: slow clients cannot hold the server (request-receipt deadline), and merges are bounded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.moto import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def slow_deadline_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOREG_")}
    env.update({"LOREG_HOME": str(tmp_path / "home"), "LOREG_HEADER_TIMEOUT_S": "1"})
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loreg.cli.main", "serve", "--port", str(port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=log_file,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "loreg serve did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_slow_header_senders_are_cut_off_while_normal_clients_are_served(slow_deadline_server: str) -> None:
    port = int(slow_deadline_server.rsplit(":", 1)[1])
    slow = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
    # the slow clients keep trickling header bytes; the server must close them all after ~1 s
    closed: set[int] = set()
    latencies = []
    deadline = time.monotonic() + 30  # generous: the deadline is 1 s
    with httpx.Client(timeout=10) as normal:
        while len(closed) < len(slow):
            assert time.monotonic() < deadline, f"{len(slow) - len(closed)} slow connections still open"
            t0 = time.monotonic()
            assert normal.get(f"{slow_deadline_server}/v1/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            for i, s in enumerate(slow):
                if i in closed:
                    continue
                try:
                    s.sendall(b"a")
                    s.settimeout(0.001)
                    if s.recv(1) == b"":
                        closed.add(i)
                except (BlockingIOError, TimeoutError):
                    pass
                except OSError:
                    closed.add(i)
            time.sleep(0.2)
    for s in slow:
        s.close()
    assert latencies and max(latencies) < 10  # served meanwhile (a bound against hangs, not a benchmark)


def test_a_complete_request_is_not_cut_by_the_header_deadline(slow_deadline_server: str) -> None:
    # keep-alive: several requests on one connection, with pauses shorter than the deadline
    with httpx.Client(timeout=10) as c:
        for _ in range(3):
            assert c.get(f"{slow_deadline_server}/v1/health").status_code == 200
            time.sleep(0.3)


def test_exports_run_at_most_the_concurrency_bound_and_queue_the_rest(
    settings: Any, admin_token: str, tiny_llama: dict[str, Path], loreg_home: Path
) -> None:
    from fastapi.testclient import TestClient

    from loreg.cli.client import RegistryClient
    from loreg.registry.app import create_app
    from loreg.registry.services.context import open_registry
    from tests import factories

    settings.export_worker = "inprocess"
    settings.export_concurrency = 2
    reg = open_registry(settings)
    try:
        with TestClient(create_app(registry=reg), base_url="http://testserver") as http:
            c = RegistryClient("http://testserver", admin_token, http=http)
            c.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
            c.push(tiny_llama["adapter"], "org/a")
            jobs = [c.request("POST", "/v1/exports", json={"adapters": [{"ref": "org/a", "weight": w}]}).json()
                    for w in (0.25, 0.5, 0.75, 1.0)]
            assert all(j["state"] == "queued" for j in jobs)
            deadline = time.monotonic() + 120
            states = ["queued"]
            while any(s in ("queued", "running") for s in states):
                assert time.monotonic() < deadline, "exports did not finish"
                done = [c.get_json(f"/v1/exports/{j['id']}") for j in jobs]
                states = [d["state"] for d in done]
                time.sleep(0.02)
            assert states == ["done"] * 4
            # the jobs' [started_at, finished_at] intervals never overlap more than the bound
            events = sorted(
                [(d["started_at"], 1) for d in done] + [(d["finished_at"], -1) for d in done], key=lambda e: (e[0], e[1])
            )
            running = most_running = 0
            for _, step in events:
                running += step
                most_running = max(most_running, running)
            assert 1 <= most_running <= 2
            # the same request merged again (a fresh registry entry) gives bit-identical files
            first = {f["path"]: f["digest"] for f in c.get_json(f"/v1/exports/{jobs[3]['id']}")["files"]}
    finally:
        reg.close()
    from loreg.registry.merge import engine
    from loreg.registry.formats import peft, safetensors, validate

    base = tiny_llama["base"]
    shard = base / "model.safetensors"
    header = safetensors.read_header_from_file(shard)
    cfg = peft.parse_adapter_config((tiny_llama["adapter"] / "adapter_config.json").read_bytes())
    ah = safetensors.read_header_from_file(tiny_llama["adapter"] / "adapter_model.safetensors")
    import json

    layout = validate.base_layout_from_headers([header], json.loads((base / "config.json").read_text()))
    report = validate.validate_adapter(cfg, ah, layout)
    out = engine.merge_to_dir(
        [engine.BaseShard(name=shard.name, path=shard, header=header)],
        [engine.AdapterInput(config=cfg, header=ah, path=tiny_llama["adapter"] / "adapter_model.safetensors", report=report)],
        loreg_home / "again", device="cpu",
    )
    assert {o.name: o.digest for o in out}["model.safetensors"] == first["model.safetensors"]
