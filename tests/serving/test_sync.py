"""`loreg sync`: a folder per reference in the layout vLLM's filesystem resolver reads, swapped atomically,
following aliases with conditional requests (the version route answers If-None-Match with 304)."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
from pathlib import Path
from typing import Any

import pytest

from loreg.cli import Client
from loreg.cli.sync import Syncer
from tests import factories
from tests.cli.test_cli import invoke


@pytest.fixture
def bot(live_server: str, admin_token: str, adapter_dir: Path) -> dict[str, Any]:
    with Client(live_server, admin_token) as c:
        return c.push(adapter_dir, "org/bot", aliases=["prod"])


@pytest.fixture
def c(live_server: str, admin_token: str) -> Any:
    with Client(live_server, admin_token) as client:
        yield client


def sync_cli(live_server: str, token: str, home: Path, *args: str | Path) -> Any:
    return invoke(["sync", *map(str, args)], {"LOREG_URL": live_server, "LOREG_TOKEN": token, "LOREG_HOME": str(home)})


def test_version_route_answers_its_etag_with_304_until_the_alias_moves(
    api: Any, client: Any, adapter_dir: Path, tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    client.push(adapter_dir, "org/bot", aliases=["prod"])
    url = "/v1/adapters/org/bot/versions/prod"
    first = api.get(url)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('W/"')
    again = api.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert api.get(url, headers={"If-None-Match": etag.removeprefix("W/")}).status_code == 304  # weak comparison
    assert api.get(url, headers={"If-None-Match": '"other", ' + etag}).status_code == 304
    assert api.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    client.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
    client.set_alias("org/bot:2", "prod")
    moved = api.get(url, headers={"If-None-Match": etag})
    assert moved.status_code == 200 and moved.json()["version"] == 2 and moved.headers["etag"] != etag


def test_client_resolve_changed_is_a_conditional_get(
    client: Any, adapter_dir: Path, tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    client.push(adapter_dir, "org/bot", aliases=["prod"])
    v1, etag = client.resolve_changed("org/bot:prod")
    assert v1 is not None and v1.number == 1 and etag
    assert client.resolve_changed("org/bot:prod", etag) == (None, etag)
    client.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
    client.set_alias("org/bot:2", "prod")
    v2, etag2 = client.resolve_changed("org/bot:prod", etag)
    assert v2 is not None and v2.number == 2 and etag2 != etag


def test_sync_keeps_a_link_per_reference_to_a_verified_folder(
    live_server: str, admin_token: str, bot: dict[str, Any], adapter_dir: Path, tmp_path: Path, loreg_home: Path
) -> None:
    out = tmp_path / "served"
    refs = ["org/bot:prod", "org/bot:1", "org/bot", f"org/bot@{bot['digest']}"]
    run = sync_cli(live_server, admin_token, loreg_home, out, *refs, "--json")
    assert run.code == 0, run.stderr
    results = run.json()
    assert [r["ref"] for r in results] == refs and {r["status"] for r in results} == {"updated"}
    folder = out / ".loreg" / "versions" / bot["digest"].removeprefix("sha256:")
    for ref in refs:
        link = out / ref
        assert link.is_symlink() and link.resolve() == folder.resolve()
    for f in bot["files"]:
        assert filecmp.cmp(folder / f["path"], adapter_dir / f["path"], shallow=False)
    marker = json.loads((folder / ".loreg.json").read_text())
    assert (marker["name"], marker["version"], marker["digest"]) == ("org/bot", 1, bot["digest"])
    again = sync_cli(live_server, admin_token, loreg_home, out, *refs, "--json")
    assert {r["status"] for r in again.json()} == {"not-modified"}  # a restart asks with the kept ETags


def test_sync_swaps_the_link_when_the_alias_moves_and_leaves_the_old_folder_whole(
    c: Any, bot: dict[str, Any], adapter_dir: Path, tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "served"
    syncer = Syncer(c, out, ["org/bot:prod"])
    assert [r["status"] for r in syncer.sync_once()] == ["updated"]
    old = (out / "org" / "bot:prod").resolve()
    v2_dir = factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7)
    v2 = c.push(v2_dir, "org/bot")
    c.set_alias("org/bot:2", "prod")
    [result] = syncer.sync_once()
    assert (result["status"], result["version"], result["digest"]) == ("updated", 2, v2["digest"])
    new = (out / "org" / "bot:prod").resolve()
    assert new != old
    # a reader that opened the old folder before the swap still finds every file of version 1
    for f in bot["files"]:
        assert filecmp.cmp(old / f["path"], adapter_dir / f["path"], shallow=False)
        assert filecmp.cmp(new / f["path"], v2_dir / f["path"], shallow=False)
    assert [p.name for p in (out / "org").iterdir()] == ["bot:prod"]  # no temporary link left


def test_watch_follows_an_alias_with_conditional_requests(
    c: Any, bot: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "served"
    rounds: list[list[dict[str, Any]]] = []

    def after(results: list[dict[str, Any]]) -> None:
        rounds.append(results)
        if len(rounds) == 2:  # between the second and third rounds, the alias moves
            c.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
            c.set_alias("org/bot:2", "prod")

    Syncer(c, out, ["org/bot:prod"]).watch(0.0, rounds=4, on_round=after)
    assert [(r[0]["status"], r[0]["version"]) for r in rounds] == [
        ("updated", 1), ("not-modified", 1), ("updated", 2), ("not-modified", 2)
    ]
    assert json.loads(((out / "org" / "bot:prod") / ".loreg.json").read_text())["version"] == 2


def test_sync_for_vllm_is_read_by_vllms_filesystem_resolver(
    live_server: str, admin_token: str, bot: dict[str, Any], tiny_llama: dict[str, Path], adapter_dir: Path,
    tmp_path: Path, loreg_home: Path,
) -> None:
    import torch
    from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

    out = tmp_path / "served"
    base = str(tiny_llama["base"])  # vLLM started with a local folder as --model
    run = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:prod", "--engine", "vllm", "--base-name", base)
    assert run.code == 0, run.stderr
    req = asyncio.run(FilesystemResolver(str(out)).resolve_lora(base, "org/bot:prod"))
    assert req is not None and Path(req.lora_path) == out / "org" / "bot:prod"
    config = json.loads((out / "org" / "bot:prod" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        served = factories.load_adapter_model(tiny_llama["base"], Path(req.lora_path))(ids).logits
        pushed = factories.load_adapter_model(tiny_llama["base"], adapter_dir)(ids).logits
    assert torch.equal(served, pushed)
    # the plain engine keeps the files as pushed, in a folder of their own
    plain = sync_cli(live_server, admin_token, loreg_home, tmp_path / "plain", "org/bot:prod")
    assert plain.code == 0, plain.stderr
    assert filecmp.cmp(tmp_path / "plain" / "org" / "bot:prod" / "adapter_config.json", adapter_dir / "adapter_config.json", shallow=False)


def test_sync_for_vllm_refuses_what_vllm_cannot_load_and_keeps_the_old_link(
    live_server: str, admin_token: str, c: Any, bot: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path,
    loreg_home: Path,
) -> None:
    out = tmp_path / "served"
    assert sync_cli(live_server, admin_token, loreg_home, out, "org/bot:prod", "--engine", "vllm").code == 0
    before = os.readlink(out / "org" / "bot:prod")
    c.push(factories.make_adapter(tmp_path / "wide", "llama", base_dir=tiny_llama["base"], r=32), "org/bot")
    c.set_alias("org/bot:2", "prod")
    run = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:prod", "--engine", "vllm")
    assert run.code == 1 and "rank 32" in run.stderr
    assert os.readlink(out / "org" / "bot:prod") == before
    wrong = factories.make_base(tmp_path / "gpt2", "gpt2")
    run = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:1", "--engine", "vllm", "--base-name", wrong)
    assert run.code == 1 and "layout" in run.stderr and not (out / "org" / "bot:1").exists()
    ok = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:prod", "--engine", "vllm", "--max-lora-rank", "32")
    assert ok.code == 0, ok.stderr
    assert os.readlink(out / "org" / "bot:prod") != before


def test_sync_leaves_a_folder_it_did_not_make_and_reports_a_conflict(
    live_server: str, admin_token: str, bot: dict[str, Any], tmp_path: Path, loreg_home: Path
) -> None:
    out = tmp_path / "served"
    theirs = out / "org" / "bot:prod"
    theirs.mkdir(parents=True)
    (theirs / "mine.txt").write_text("mine")
    run = sync_cli(live_server, admin_token, loreg_home, out, "org/bot:prod", "--json")
    [result] = run.json()
    assert result["status"] == "failed" and result["code"] == "CONFLICT", result  # the path is taken, not a bad name
    assert not theirs.is_symlink() and (theirs / "mine.txt").read_text() == "mine"


def test_sync_refuses_malformed_references_before_any_work(
    live_server: str, admin_token: str, tmp_path: Path, loreg_home: Path
) -> None:
    out = tmp_path / "served"
    for bad in ("../etc/passwd", "org/../x", "org/bot:..", "org/bot/../../x"):
        run = sync_cli(live_server, admin_token, loreg_home, out, "org/ok", bad)
        assert run.code == 1 and "INVALID" in run.stderr, (bad, run.stderr)
    assert not out.exists()


def test_sync_watch_command_reports_each_move_of_the_alias(
    live_server: str, admin_token: str, c: Any, bot: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path,
    loreg_home: Path,
) -> None:
    import subprocess

    from tests.support.server import LOREG, env_with

    out = tmp_path / "served"
    env = env_with(LOREG_URL=live_server, LOREG_TOKEN=admin_token, LOREG_HOME=str(loreg_home))
    proc = subprocess.Popen(
        [LOREG, "sync", str(out), "org/bot:prod", "--watch", "--interval", "0.1", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert [(r["status"], r["version"]) for r in first] == [("updated", 1)]
        v2 = c.push(factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7), "org/bot")
        c.set_alias("org/bot:2", "prod")
        for _ in range(1200):  # one JSON document per round (0.1 s apart); before the move: 304s
            round_ = json.loads(proc.stdout.readline())
            # a round between the push and the move may see the adapter changed (a new ETag) with
            # prod still at 1: "unchanged", which is right; only the move itself is an update
            if round_[0]["status"] not in ("not-modified", "unchanged"):
                break
            assert round_[0]["version"] == 1
        else:
            raise AssertionError("the move of the alias was not seen within 1200 rounds")
        assert (round_[0]["status"], round_[0]["version"], round_[0]["digest"]) == ("updated", 2, v2["digest"])
        assert (out / "org" / "bot:prod").resolve().name == v2["digest"].removeprefix("sha256:")
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
