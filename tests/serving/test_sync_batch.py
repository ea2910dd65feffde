"""`loreg sync` asks for every reference in one request (POST /v1/resolve, one ETag, 304 while nothing
moved), downloads references in parallel, drops the link of a reference the registry stopped serving,
locks its folder, refuses hostile answers and writes each engine's layout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from loreg.cli import Client
from loreg.cli.sync import Syncer
from loreg.registry import errors
from tests import factories
from tests.serving.test_sync import sync_cli


@pytest.fixture
def bot(live_server: str, admin_token: str, adapter_dir: Path) -> dict[str, Any]:
    with Client(live_server, admin_token) as c:
        return c.push(adapter_dir, "org/bot", aliases=["prod", "canary"])


class Counted:
    """A client over real HTTP that records every request it sends (method, path, status)."""

    def __init__(self, url: str, token: str):
        self.seen: list[tuple[str, str, int]] = []

        def record(resp: httpx.Response) -> None:
            self.seen.append((resp.request.method, resp.request.url.path, resp.status_code))

        self.http = httpx.Client(base_url=url, event_hooks={"response": [record]})
        self.client = Client(url, token, http=self.http)

    def take(self) -> list[tuple[str, str, int]]:
        out, self.seen = self.seen, []
        return out


@pytest.fixture
def counted(live_server: str, admin_token: str) -> Any:
    c = Counted(live_server, admin_token)
    yield c
    c.client.close()


# --- the route ----------------------------------------------------------------------------------


def test_resolve_route_answers_each_reference_under_one_etag_and_304(
    api: Any, client: Any, adapter_dir: Path, tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    v1 = client.push(adapter_dir, "org/bot", aliases=["prod"])
    refs = ["org/bot:prod", "org/bot:1", "org/ghost", "org/bot:nope", "org/bot:7", "Not A/Ref"]
    first = api.post("/v1/resolve", json={"refs": refs})
    assert first.status_code == 200, first.text
    items = first.json()["items"]
    assert [i["ref"] for i in items] == refs
    assert [i["version"]["digest"] for i in items[:2]] == [v1["digest"], v1["digest"]]
    assert [i["error"]["code"] for i in items[2:]] == ["ADAPTER_NOT_FOUND", "ALIAS_NOT_FOUND", "VERSION_NOT_FOUND", "NAME_INVALID"]
    # each item answers what a GET of the reference alone answers
    assert items[0]["version"] == api.get("/v1/adapters/org/bot/versions/prod").json()
    etag = first.headers["etag"]
    again = api.post("/v1/resolve", json={"refs": refs}, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    # another set of references is another answer
    assert api.post("/v1/resolve", json={"refs": refs[:2]}, headers={"If-None-Match": etag}).status_code == 200
    client.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
    client.set_alias("org/bot:2", "prod")
    moved = api.post("/v1/resolve", json={"refs": refs}, headers={"If-None-Match": etag})
    assert moved.status_code == 200 and moved.headers["etag"] != etag
    assert moved.json()["items"][0]["version"]["version"] == 2


@pytest.mark.parametrize("body", [{"refs": []}, {"refs": ["org/bot"] * 1001}, {"refs": ["x" * 513]}, {"refs": "org/bot"}])
def test_resolve_route_bounds_its_body(api: Any, body: dict[str, Any]) -> None:
    resp = api.post("/v1/resolve", json=body)
    assert resp.status_code in (400, 422) and resp.json()["errors"][0]["code"] == "REQUEST_INVALID", resp.text


def test_resolve_route_denies_uncovered_references_alike_whether_they_exist_or_not(
    app: Any, client: Any, adapter_dir: Path, make_token: Any
) -> None:
    from fastapi.testclient import TestClient

    for name in ("team-a/x", "team-b/x"):
        client.push(adapter_dir, name, aliases=["prod"])
    team_a = make_token("read", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {team_a}"}) as http:
        resp = http.post("/v1/resolve", json={"refs": ["team-a/x:prod", "team-b/x:prod", "team-b/ghost:prod"]})
    assert resp.status_code == 200, resp.text
    ok, real, ghost = resp.json()["items"]
    assert ok["version"]["name"] == "team-a/x"
    assert real["version"] is None and ghost["version"] is None
    assert real["error"]["code"] == ghost["error"]["code"] == "DENIED"
    assert json.dumps(real["error"]).replace("team-b/x", "N") == json.dumps(ghost["error"]).replace("team-b/ghost", "N")


def test_client_resolve_many_maps_each_reference_and_answers_304(client: Any, adapter_dir: Path) -> None:
    v1 = client.push(adapter_dir, "org/bot", aliases=["prod"])
    found, etag = client.resolve_many(["org/bot:prod", "org/bot:gone"])
    assert found["org/bot:prod"].digest == v1["digest"] and etag
    assert isinstance(found["org/bot:gone"], errors.AliasNotFoundError)
    assert client.resolve_many(["org/bot:prod", "org/bot:gone"], etag) == (None, etag)


# --- one request per round -----------------------------------------------------------------------


def test_watch_makes_one_request_per_round_whatever_the_number_of_references(
    counted: Counted, bot: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    c = counted.client
    refs = ["org/bot:prod", "org/bot:canary", "org/bot:1", "org/bot", f"org/bot@{bot['digest']}"]
    rounds: list[list[tuple[str, str, int]]] = []
    statuses: list[list[str]] = []

    def after(results: list[dict[str, Any]]) -> None:
        rounds.append(counted.take())
        statuses.append([r["status"] for r in results])
        if len(rounds) == 3:  # the alias moves between rounds 3 and 4
            with Client(c.url, c.token) as admin:
                admin.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
                admin.set_alias("org/bot:2", "prod")

    Syncer(c, tmp_path / "served", refs).watch(0.0, rounds=5, on_round=after)
    assert statuses[0] == ["updated"] * 5
    for idle in (rounds[1], rounds[2], rounds[4]):
        assert idle == [("POST", "/v1/resolve", 304)]
    assert statuses[1] == statuses[2] == statuses[4] == ["not-modified"] * 5
    # the round that sees the move: one question for all five, then only the moved one's download
    assert rounds[3][0] == ("POST", "/v1/resolve", 200)
    assert [p for _, p, _ in rounds[3][1:]] and all("/v1/resolve" != p for _, p, _ in rounds[3][1:])
    assert statuses[3] == ["updated", "unchanged", "unchanged", "updated", "unchanged"]


def test_a_reference_the_registry_stops_serving_loses_its_link_and_is_reported(
    live_server: str, admin_token: str, bot: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path,
    loreg_home: Path,
) -> None:
    out = tmp_path / "served"
    with Client(live_server, admin_token) as c:
        c.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
        refs = ["org/bot:prod", "org/bot:canary", "org/bot:2"]
        assert sync_cli(live_server, admin_token, loreg_home, out, *refs).code == 0
        v2_folder = (out / "org" / "bot:2").resolve()
        c.remove_alias("org/bot", "canary")
        c.delete("org/bot:2")
    run = sync_cli(live_server, admin_token, loreg_home, out, *refs, "--json")
    assert run.code == 1
    got = {r["ref"]: (r["status"], r.get("code")) for r in run.json()}
    assert got == {
        "org/bot:prod": ("unchanged", None),
        "org/bot:canary": ("removed", "ALIAS_NOT_FOUND"),
        "org/bot:2": ("removed", "VERSION_NOT_FOUND"),
    }
    assert not os.path.lexists(out / "org" / "bot:canary") and not os.path.lexists(out / "org" / "bot:2")
    assert (out / "org" / "bot:prod" / "adapter_config.json").is_file()
    assert v2_folder.is_dir()  # a reader that opened it before keeps its files
    again = sync_cli(live_server, admin_token, loreg_home, out, *refs, "--json")
    assert again.code == 1  # still not served: reported again (from the 304), never silently fine
    assert {r["ref"]: r.get("code") for r in again.json()}["org/bot:2"] == "VERSION_NOT_FOUND"
    assert not os.path.lexists(out / "org" / "bot:2")


def test_sync_downloads_references_in_parallel_through_the_shared_cache(
    live_server: str, admin_token: str, tiny_llama: dict[str, Path], tmp_path: Path, loreg_home: Path
) -> None:
    refs = []
    with Client(live_server, admin_token) as c:
        for i in range(6):
            c.push(factories.make_adapter(tmp_path / f"a{i}", "llama", base_dir=tiny_llama["base"], seed=i), f"org/a{i}")
            refs.append(f"org/a{i}")
    run = sync_cli(live_server, admin_token, loreg_home, tmp_path / "served", *refs, "--jobs", "4", "--json")
    assert run.code == 0, run.stderr
    assert [r["status"] for r in run.json()] == ["updated"] * 6
    for i, ref in enumerate(refs):
        marker = json.loads((tmp_path / "served" / ref / ".loreg.json").read_text())
        assert marker["name"] == ref
        src = tmp_path / f"a{i}" / "adapter_model.safetensors"
        assert (tmp_path / "served" / ref / "adapter_model.safetensors").read_bytes() == src.read_bytes()


# --- one sync per folder --------------------------------------------------------------------------


def test_a_second_sync_on_the_same_folder_is_refused_while_the_first_runs(
    live_server: str, admin_token: str, bot: dict[str, Any], tmp_path: Path, loreg_home: Path
) -> None:
    out = tmp_path / "served"
    seen: list[Any] = []

    def during(results: list[dict[str, Any]]) -> None:
        seen.append(sync_cli(live_server, admin_token, loreg_home, out, "org/bot:1"))

    with Client(live_server, admin_token) as c:
        Syncer(c, out, ["org/bot:prod"]).watch(0.0, rounds=1, on_round=during)
    [second] = seen
    assert second.code == 1 and "CONFLICT" in second.stderr and "another loreg sync" in second.stderr
    assert not os.path.lexists(out / "org" / "bot:1")
    after = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:1")
    assert after.code == 0, after.stderr  # the lock went with the first
    assert (out / "org" / "bot:1").resolve() == (out / "org" / "bot:prod").resolve()


# --- a hostile registry ---------------------------------------------------------------------------


def _hostile(path: str, data: bytes, digest: str, name: str = "org/x") -> httpx.MockTransport:
    version = {
        "name": name, "version": 1, "digest": "sha256:" + "2" * 64, "config": {}, "facts": {},
        "files": [{"path": path, "size": len(data), "digest": digest}],
    }
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/resolve":
            return httpx.Response(200, json={"items": [{"ref": "org/x:prod", "version": version}]}, headers={"ETag": 'W/"e"'})
        if "/files/" in request.url.path:
            return httpx.Response(200, content=data)
        return httpx.Response(200, json=version)

    transport = httpx.MockTransport(handle)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


@pytest.mark.parametrize(
    "path, digest, name",
    [
        ("../../evil", None, "org/x"),
        ("/tmp/evil", None, "org/x"),
        ("sub/evil", None, "org/x"),
        ("adapter_config.json", None, "org/other"),  # an answer for another adapter
        ("adapter_config.json", "sha256:" + "3" * 64, "org/x"),  # the bytes do not hash to it
        ("adapter_config.json", "sha256:../../x", "org/x"),
    ],
)
def test_sync_refuses_a_hostile_answer_and_publishes_nothing(
    tmp_path: Path, loreg_home: Path, path: str, digest: str | None, name: str
) -> None:
    data = b'{"r": 8}'
    transport = _hostile(path, data, digest or "sha256:" + hashlib.sha256(data).hexdigest(), name)
    out = tmp_path / "work" / "served"
    http = httpx.Client(base_url="http://registry.test", transport=transport)
    with Client("http://registry.test", "loreg_x", http=http) as c:
        syncer = Syncer(c, out, ["org/x:prod"])
        [result] = syncer.sync_once()
    assert result["status"] == "failed" and result["code"] in ("NAME_INVALID", "REFUSED", "DIGEST_MISMATCH"), result
    assert set(result) == {"ref", "status", "error", "code"}
    # a failed download is asked for in full next round (no ETag: never a 304 over it); a refused answer is not
    assert syncer.etag == (None if result["code"] == "DIGEST_MISMATCH" else 'W/"e"')
    assert not os.path.lexists(out / "org" / "x:prod")
    assert not (out / ".loreg" / "versions").exists() or list((out / ".loreg" / "versions").iterdir()) == []
    outside = {p for p in tmp_path.rglob("*") if not p.is_dir()} - set((out / ".loreg").rglob("*")) - set(loreg_home.rglob("*"))
    assert outside == set()
    if digest is None:  # a name that could leave the folder is refused before any download
        assert not any("/files/" in p for p in transport.seen)  # type: ignore[attr-defined]


# --- engine layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine, where, line",
    [
        ("sglang", ("org", "bot:prod"), "--lora-paths org/bot:prod={path}"),
        ("lorax", ("org", "bot:prod"), '"adapter_id": "{path}", "adapter_source": "local"'),
        ("nim", ("org--bot:prod",), "export NIM_PEFT_SOURCE={root}"),
        ("vllm", ("org", "bot:prod"), "export VLLM_LORA_RESOLVER_CACHE_DIR={root}"),
    ],
)
def test_each_engine_gets_its_layout_its_base_name_and_its_arguments(
    live_server: str, admin_token: str, bot: dict[str, Any], tiny_llama: dict[str, Path], adapter_dir: Path,
    tmp_path: Path, loreg_home: Path, engine: str, where: tuple[str, ...], line: str,
) -> None:
    import torch

    out = tmp_path / "served"
    served = str(tiny_llama["base"])  # the served model's name: --model given a local folder
    run = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:prod", "--engine", engine, "--base-name", served)
    assert run.code == 0, run.stderr
    folder = out.joinpath(*where)
    assert folder.is_symlink() and (folder / ".loreg.json").is_file()
    assert [p.name for p in out.iterdir() if p.name != ".loreg"] == [where[0]]
    assert line.format(path=folder.absolute(), root=out.absolute()) in run.stdout, run.stdout
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == served
    with Client(live_server, admin_token) as c:  # the registry's copy is unchanged
        assert c.version("org/bot:prod")["config"]["base_model_name_or_path"] != served
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        got = factories.load_adapter_model(tiny_llama["base"], folder)(ids).logits
        want = factories.load_adapter_model(tiny_llama["base"], adapter_dir)(ids).logits
    assert torch.equal(got, want)
    if engine == "vllm":  # the real resolver finds it under the served name
        import asyncio

        from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

        req = asyncio.run(FilesystemResolver(str(out)).resolve_lora(served, "org/bot:prod"))
        assert req is not None and Path(req.lora_path) == folder


def test_plain_engine_refuses_a_base_name(live_server: str, admin_token: str, tmp_path: Path, loreg_home: Path) -> None:
    run = sync_cli(live_server, admin_token, loreg_home, tmp_path / "served", "org/bot:prod", "--base-name", "x")
    assert run.code == 1 and "REQUEST_INVALID" in run.stderr
    assert not (tmp_path / "served").exists()


# --- a kill during a sync -------------------------------------------------------------------------


class StallingProxy:
    """Forwards to the registry; once ``stall`` is set, a file download sends half its body and hangs."""

    def __init__(self, upstream: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.stall, self.reached, self.release = threading.Event(), threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                resp = httpx.request(self.command, upstream + self.path, headers=headers, content=body, timeout=60)
                data = resp.content
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if proxy.stall.is_set() and "/files/" in self.path:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    proxy.reached.set()
                    proxy.release.wait(120)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_sync_killed_mid_download_leaves_the_previous_version_and_the_next_sync_completes(
    live_server: str, admin_token: str, bot: dict[str, Any], adapter_dir: Path, tiny_llama: dict[str, Path],
    tmp_path: Path, loreg_home: Path,
) -> None:
    import filecmp
    import signal
    import subprocess

    from tests.support.server import LOREG, env_with, poll_until

    out = tmp_path / "served"
    link = out / "org" / "bot:prod"
    proxy = StallingProxy(live_server)
    try:
        assert sync_cli(proxy.url, admin_token, loreg_home, out, "org/bot:prod").code == 0
        old = link.resolve()
        with Client(live_server, admin_token) as c:
            v2_dir = factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7)
            v2 = c.push(v2_dir, "org/bot")
            c.set_alias("org/bot:2", "prod")
        proxy.stall.set()
        env = env_with(LOREG_URL=proxy.url, LOREG_TOKEN=admin_token, LOREG_HOME=str(loreg_home))
        proc = subprocess.Popen([LOREG, "sync", str(out), "org/bot:prod"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            poll_until(proxy.reached.is_set, "the sync to be mid-download")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert link.resolve() == old  # the previous version, whole
        for f in bot["files"]:
            assert filecmp.cmp(link / f["path"], adapter_dir / f["path"], shallow=False)
        assert not (out / ".loreg" / "versions" / v2["digest"].removeprefix("sha256:")).exists()
        proxy.stall.clear()
        proxy.release.set()
        again = sync_cli(proxy.url, admin_token, loreg_home, out, "org/bot:prod", "--json")
        assert again.code == 0, again.stderr  # the killed process's lock went with it
        assert [(r["status"], r["version"]) for r in again.json()] == [("updated", 2)]
        for f in v2["files"]:
            assert filecmp.cmp(link / f["path"], v2_dir / f["path"], shallow=False)
    finally:
        proxy.close()
