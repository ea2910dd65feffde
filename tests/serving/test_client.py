"""The public Python client, `from loreg.cli import Client`, against a registry served over real HTTP.

It is configured like the CLI (LOREG_URL, LOREG_TOKEN, the credentials file), pins references to
immutable versions, and raises the typed errors of the one table. Several processes may pull into
one LOREG_HOME at once (threads or `loreg pull` processes): the content-addressed cache takes a
lock per digest.
"""

from __future__ import annotations

import filecmp
import threading
from pathlib import Path
from typing import Any

import pytest

from loreg.cli import Client
from loreg.cli.client import BlobCache, RegistryClient, ResolvedVersion
from loreg.cli import config
from loreg.registry import errors
from tests import factories


@pytest.fixture
def pushed(live_server: str, admin_token: str, adapter_dir: Path) -> dict[str, Any]:
    with Client(live_server, admin_token) as c:
        v1 = c.push(adapter_dir, "org/bot", aliases=["prod"])
    return v1


def test_client_is_the_registry_client_under_its_public_name() -> None:
    import loreg.cli

    assert Client is RegistryClient
    assert {"Client", "LoregError"} <= set(loreg.cli.__all__)
    from loreg.cli import NotFoundError, VersionNotFoundError

    assert NotFoundError is errors.NotFoundError and VersionNotFoundError is errors.VersionNotFoundError


def test_client_reads_url_and_token_from_the_environment(
    live_server: str, admin_token: str, pushed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOREG_URL", live_server)
    monkeypatch.setenv("LOREG_TOKEN", admin_token)
    with Client() as c:
        assert c.resolve("org/bot:prod").number == pushed["version"]


def test_client_takes_the_token_kept_in_the_credentials_file(
    live_server: str, admin_token: str, pushed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOREG_URL", live_server)
    monkeypatch.delenv("LOREG_TOKEN", raising=False)
    with Client() as c, pytest.raises(errors.UnauthorizedError):
        c.resolve("org/bot")
    config.write_credential(live_server, admin_token)
    with Client() as c:
        assert c.resolve("org/bot").digest == pushed["digest"]


def test_resolve_pins_every_reference_form_to_the_same_immutable_version(
    live_server: str, admin_token: str, pushed: dict[str, Any], tiny_llama: dict[str, Path]
) -> None:
    with Client(live_server, admin_token) as c:
        got = {ref: c.resolve(ref) for ref in ("org/bot", "org/bot:1", "org/bot:prod", f"org/bot@{pushed['digest']}")}
        base = c.base(factories.base_name("llama"))
    first = got["org/bot"]
    assert isinstance(first, ResolvedVersion)
    assert all(v == first for v in got.values())
    assert first.name == "org/bot" and first.number == 1 and first.digest == pushed["digest"]
    assert first.ref == f"org/bot@{pushed['digest']}"
    assert first.base_weights_digest == base["weights_digest"]
    assert first.base_layout_digest == base["layout_digest"]
    assert sorted(f.path for f in first.files) == sorted(f["path"] for f in pushed["files"])
    assert {(f.path, f.size, f.digest) for f in first.files} == {(f["path"], f["size"], f["digest"]) for f in pushed["files"]}
    assert first.facts["r"] == 8 and first.config["peft_type"] == "LORA"


def test_a_resolved_digest_keeps_naming_its_bytes_after_the_alias_moves(
    live_server: str, admin_token: str, pushed: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    other = factories.make_adapter(tmp_path / "v2", "llama", base_dir=tiny_llama["base"], seed=7)
    with Client(live_server, admin_token) as c:
        pinned = c.resolve("org/bot:prod")
        v2 = c.push(other, "org/bot")
        c.set_alias("org/bot:2", "prod")
        assert c.resolve("org/bot:prod").digest == v2["digest"] != pinned.digest
        pulled = c.pull(pinned.ref, tmp_path / "pinned")
    assert pulled["version"] == 1
    assert filecmp.cmp(
        tmp_path / "pinned" / "adapter_model.safetensors", tiny_llama["adapter"] / "adapter_model.safetensors", shallow=False
    )


def test_versions_lists_live_versions_newest_first(
    live_server: str, admin_token: str, pushed: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    with Client(live_server, admin_token) as c:
        for seed in (7, 8):
            c.push(factories.make_adapter(tmp_path / f"s{seed}", "llama", base_dir=tiny_llama["base"], seed=seed), "org/bot")
        c.delete("org/bot:2")
        listed = c.versions("org/bot")
        with pytest.raises(errors.AdapterNotFoundError):
            c.versions("org/nobody")
    assert [v["version"] for v in listed] == [3, 1]
    assert listed[1]["digest"] == pushed["digest"] and listed[1]["aliases"] == ["prod"]


def test_lookup_filters_by_base_rank_target_and_dora(
    live_server: str, admin_token: str, pushed: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path
) -> None:
    wide = factories.make_adapter(tmp_path / "wide", "llama", base_dir=tiny_llama["base"], r=32, target_modules=["q_proj"])
    base = factories.base_name("llama")
    with Client(live_server, admin_token) as c:
        c.push(wide, "org/wide")
        assert {v["name"] for v in c.lookup(base=base)} == {"org/bot", "org/wide"}
        assert [v["name"] for v in c.lookup(base=base, max_rank=16)] == ["org/bot"]
        assert [v["name"] for v in c.lookup(min_rank=17)] == ["org/wide"]
        assert [v["name"] for v in c.lookup(target="v_proj")] == ["org/bot"]
        assert c.lookup(dora=True) == []
        with pytest.raises(errors.BaseNotFoundError):
            c.lookup(base="nobody/unknown-model")


def test_client_errors_are_the_typed_errors_of_the_table(
    live_server: str, admin_token: str, pushed: dict[str, Any], make_token: Any
) -> None:
    with Client(live_server, admin_token) as c:
        with pytest.raises(errors.VersionNotFoundError):
            c.resolve("org/bot:9")
        with pytest.raises(errors.AliasNotFoundError):
            c.resolve("org/bot:staging")
        with pytest.raises(errors.AdapterNotFoundError):
            c.resolve("org/nobody")
        with pytest.raises(errors.ReferenceInvalidError):
            c.resolve("org/bot@sha256:nothex")
    with Client(live_server, make_token("read", ["team-b/*"])) as c, pytest.raises(errors.DeniedError):
        c.resolve("org/bot")
    with Client(live_server, "loreg_not_a_token") as c, pytest.raises(errors.UnauthorizedError):
        c.resolve("org/bot")
    with Client("http://127.0.0.1:9", admin_token) as c, pytest.raises(errors.ConnectionFailedError) as info:
        c.resolve("org/bot")
    assert info.value.hint


def test_concurrent_pulls_into_one_home_download_each_file_once(
    live_server: str, admin_token: str, tiny_llama: dict[str, Path], tmp_path: Path, loreg_home: Path
) -> None:
    # a few MiB, so the pulls overlap: each would otherwise write the same partial file at once
    big = factories.make_adapter(
        tmp_path / "big", "llama", base_dir=tiny_llama["base"], r=1024, lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with Client(live_server, admin_token) as c:
        version = c.push(big, "org/big")
    weights = next(f for f in version["files"] if f["path"] == "adapter_model.safetensors")
    assert weights["size"] > 4 << 20
    pullers = 4
    start = threading.Barrier(pullers)
    results: list[dict[str, Any]] = []
    failures: list[BaseException] = []

    def pull(i: int) -> None:
        try:
            with Client(live_server, admin_token) as c:
                start.wait()
                results.append(c.pull("org/big:1", tmp_path / f"out{i}"))
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(pullers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    total = sum(f["size"] for f in version["files"])
    assert sum(r["bytes_downloaded"] for r in results) == total
    for i in range(pullers):
        for f in version["files"]:
            assert filecmp.cmp(tmp_path / f"out{i}" / f["path"], big / f["path"], shallow=False)
    cache = BlobCache(config.cache_dir())
    assert cache.get(weights["digest"], weights["size"]) is not None
    assert not list(cache.root.rglob("*.partial"))


def test_the_readme_client_example_runs(
    live_server: str, admin_token: str, adapter_dir: Path, tiny_llama: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### The Python client", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    with Client(live_server, admin_token) as c:
        c.register_base(tiny_llama["base"], "meta-llama/Llama-3.1-8B")  # the README's base name, another alias
        first = c.push(adapter_dir, "org/support-bot", aliases=["prod"])
    factories.make_adapter(tmp_path / "out", "llama", base_dir=tiny_llama["base"], seed=9)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOREG_URL", live_server)
    monkeypatch.setenv("LOREG_TOKEN", admin_token)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert first["digest"] in printed and "org/support-bot 1" in printed
    assert filecmp.cmp(tmp_path / "adapter" / "adapter_model.safetensors", adapter_dir / "adapter_model.safetensors", shallow=False)
    with Client(live_server, admin_token) as c:
        assert [v["aliases"] for v in c.versions("org/support-bot")] == [["staging"], ["prod"]]


def test_two_pull_processes_into_one_home_download_each_file_once(
    live_server: str, admin_token: str, tiny_llama: dict[str, Path], tmp_path: Path, loreg_home: Path
) -> None:
    """Two `loreg pull` processes at once into one LOREG_HOME: the per-digest file lock lets one download."""
    import json
    import subprocess

    from tests.support.server import LOREG, env_with

    big = factories.make_adapter(
        tmp_path / "big", "llama", base_dir=tiny_llama["base"], r=1024, lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with Client(live_server, admin_token) as c:
        version = c.push(big, "org/big")
    assert max(f["size"] for f in version["files"]) > 4 << 20
    env = env_with(LOREG_URL=live_server, LOREG_TOKEN=admin_token, LOREG_HOME=str(loreg_home))
    procs = [
        subprocess.Popen([LOREG, "pull", "org/big:1", "-o", str(tmp_path / f"out{i}"), "--json"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    downloaded = [json.loads(out)["bytes_downloaded"] for out, _ in outs]
    assert sum(downloaded) == sum(f["size"] for f in version["files"])
    for i in range(2):
        for f in version["files"]:
            assert filecmp.cmp(tmp_path / f"out{i}" / f["path"], big / f["path"], shallow=False)
    assert not list(BlobCache(config.cache_dir()).root.rglob("*.partial"))


def test_a_malformed_base_digest_is_a_digest_error_before_any_request() -> None:
    with Client("http://127.0.0.1:9", "loreg_x") as c:  # nothing listens: a request would be CONNECTION_FAILED
        for call in (c.base, c.base_layout):
            with pytest.raises(errors.DigestInvalidError):
                call("sha256:not-hex")
