"""L6: slow clients cannot hold the server (request-receipt deadline), and merges are bounded."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import env_with, poll_until, serving

pytestmark = pytest.mark.slow


@pytest.fixture
def slow_deadline_server(tmp_path: Path) -> Iterator[str]:
    """`loreg serve` (embedded default) with a 1 s request-receipt deadline."""
    env = env_with(LOREG_HOME=str(tmp_path / "home"), LOREG_HEADER_TIMEOUT_S="1")
    with serving(env, tmp_path) as (url, _proc):
        yield url


def test_slow_header_senders_are_cut_off_while_normal_clients_are_served(slow_deadline_server: str) -> None:
    port = int(slow_deadline_server.rsplit(":", 1)[1])
    slow = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
    closed: set[int] = set()
    latencies: list[float] = []

    with httpx.Client(timeout=10) as normal:

        def all_slow_cut_off() -> bool:
            # a normal client is served meanwhile; the slow ones keep trickling header bytes
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
            return len(closed) == len(slow)

        # generous: the deadline is 1 s
        poll_until(all_slow_cut_off, "the server to close every slow connection", deadline_s=30)
    for s in slow:
        s.close()
    assert latencies and max(latencies) < 10  # served meanwhile (a bound against hangs, not a benchmark)


def test_a_complete_request_is_not_cut_by_the_header_deadline(slow_deadline_server: str) -> None:
    # keep-alive: the deadline is re-armed after each response and disarmed by complete headers
    with httpx.Client(timeout=10) as c:
        for _ in range(5):
            assert c.get(f"{slow_deadline_server}/v1/health").status_code == 200


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

            def finished() -> list[dict[str, Any]] | None:
                now = [c.get_json(f"/v1/exports/{j['id']}") for j in jobs]
                return None if any(d["state"] in ("queued", "running") for d in now) else now

            done = poll_until(finished, "the exports to finish", deadline_s=120)
            assert [d["state"] for d in done] == ["done"] * 4
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
