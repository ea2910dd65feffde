"""loreg's vLLM LoRA resolver, loaded by vLLM's own plugin loader from the installed entry point.

The real vLLM package (installed with --no-deps, see the README's test command) runs its loader;
the resolver talks HTTP to a registry served by uvicorn, as it would inside vLLM's process. Every
refusal returns None and logs one line; nothing is raised into vLLM.
"""

from __future__ import annotations

import asyncio
import filecmp
import importlib.metadata
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loreg.cli import Client
from tests import factories
from tests.support.server import env_with

# No warning filters: vLLM 0.34.0 raises none on the modules its plugin loader and LoRA resolver
# import here (checked with -W error -X dev); the suite keeps filterwarnings=error for them too.

LOGGER = "loreg.vllm"


@pytest.fixture
def bot(live_server: str, admin_token: str, adapter_dir: Path) -> dict[str, Any]:
    with Client(live_server, admin_token) as c:
        return c.push(adapter_dir, "org/bot", aliases=["prod"])


@pytest.fixture
def read_token(make_token: Any) -> str:
    return str(make_token("read", ["org/*"]))


@pytest.fixture
def vllm_env(live_server: str, read_token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What a vLLM process would be started with: loreg's URL, a read token, a cache folder."""
    cache = tmp_path / "vllm-cache"
    monkeypatch.setenv("LOREG_URL", live_server)
    monkeypatch.setenv("LOREG_TOKEN", read_token)
    monkeypatch.setenv("LOREG_VLLM_CACHE_DIR", str(cache))
    monkeypatch.delenv("LOREG_VLLM_MAX_LORA_RANK", raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv("VLLM_LORA_RESOLVER_CACHE_DIR", raising=False)
    return cache


@pytest.fixture
def resolver(vllm_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The resolver as vLLM registers it: its plugin loader run afresh in this process."""
    import vllm.plugins
    from vllm.lora.resolver import LoRAResolverRegistry

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    vllm.plugins.load_general_plugins()
    resolver = LoRAResolverRegistry.get_resolver("loreg")
    yield resolver
    resolver.core.close()


def resolve(resolver: Any, base: str | Path, lora_name: str) -> Any:
    return asyncio.run(resolver.resolve_lora(str(base), lora_name))


def refused(resolver: Any, base: str | Path, lora_name: str, caplog: pytest.LogCaptureFixture) -> str:
    """Resolve expecting None; returns the one line logged."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve(resolver, base, lora_name) is None
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    return lines[0]


def test_vllm_plugin_loader_registers_the_resolver_from_the_entry_point(resolver: Any) -> None:
    from vllm.lora.resolver import LoRAResolver

    [ep] = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "loreg"]
    assert ep.value == "loreg.cli.vllm_plugin:register" and ep.dist is not None and ep.dist.name == "loreg"
    assert isinstance(resolver, LoRAResolver)
    assert type(resolver).__module__ == "loreg.cli.vllm_plugin"


def test_plugin_module_imports_neither_vllm_nor_the_server() -> None:
    code = (
        "import sys, json, loreg.cli.vllm_plugin;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'fastapi', 'sqlalchemy')"
        " or m.startswith(('loreg.registry.api', 'loreg.registry.services', 'loreg.registry.db', 'loreg.registry.storage')))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env_with())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_every_reference_form_resolves_to_one_verified_folder(
    resolver: Any, bot: dict[str, Any], tiny_llama: dict[str, Path], adapter_dir: Path, vllm_env: Path
) -> None:
    from vllm.lora.request import LoRARequest

    base = factories.base_name("llama")
    refs = ["org/bot", "org/bot:1", "org/bot:prod", f"org/bot@{bot['digest']}"]
    got = {ref: resolve(resolver, base, ref) for ref in refs}
    folder = vllm_env / bot["digest"].removeprefix("sha256:")
    for ref, req in got.items():
        assert isinstance(req, LoRARequest)
        assert req.lora_name == ref and req.lora_int_id > 0 and req.base_model_name == base
        assert Path(req.lora_path) == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(f["path"] for f in bot["files"]), ".loreg.json"])
    marker = json.loads((folder / ".loreg.json").read_text())
    assert (marker["digest"], marker["version"], marker["name"]) == (bot["digest"], 1, "org/bot")
    for f in bot["files"]:
        assert filecmp.cmp(folder / f["path"], adapter_dir / f["path"], shallow=False)
    assert sorted(p.name for p in vllm_env.iterdir()) == [folder.name]  # no staging folder left


def test_the_folder_loads_in_peft_and_gives_the_pushed_adapters_outputs(
    resolver: Any, bot: dict[str, Any], tiny_llama: dict[str, Path], adapter_dir: Path
) -> None:
    import torch

    req = resolve(resolver, factories.base_name("llama"), "org/bot:prod")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        base_out = factories.load_base_model(tiny_llama["base"])(ids).logits
        served = factories.load_adapter_model(tiny_llama["base"], Path(req.lora_path))(ids).logits
        pushed = factories.load_adapter_model(tiny_llama["base"], adapter_dir)(ids).logits
    assert torch.equal(served, pushed)
    assert not torch.allclose(served, base_out)


def test_a_local_base_folder_is_checked_by_its_safetensors_layout(
    resolver: Any, bot: dict[str, Any], tiny_llama: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    req = resolve(resolver, tiny_llama["base"], "org/bot:prod")
    assert req is not None and Path(req.lora_path).is_dir()
    # other weights of the same layout: the adapter applies (same shapes, same names)
    same_layout = factories.make_base(tmp_path / "same-layout", "llama", seed=5)
    assert resolve(resolver, same_layout, "org/bot:1") is not None
    other = factories.make_base(tmp_path / "gpt2-base", "gpt2")
    assert "layout" in refused(resolver, other, "org/bot:prod", caplog)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    assert "safetensors" in refused(resolver, empty, "org/bot:prod", caplog)


def test_a_registered_base_name_must_be_the_adapters_base_or_share_its_layout(
    resolver: Any, bot: dict[str, Any], live_server: str, admin_token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(live_server, admin_token) as c:
        c.register_base(factories.make_base(tmp_path / "same", "llama", seed=5), "other/llama-finetune")
        c.register_base(factories.make_base(tmp_path / "gpt2", "gpt2"), "other/gpt2")
    assert resolve(resolver, factories.base_name("llama"), "org/bot:prod") is not None
    assert resolve(resolver, "other/llama-finetune", "org/bot:prod") is not None
    assert "does not share its layout" in refused(resolver, "other/gpt2", "org/bot:prod", caplog)
    assert "not registered" in refused(resolver, "nobody/unknown-model", "org/bot:prod", caplog)


def test_serving_facts_are_checked_against_what_vllm_loads(
    vllm_env: Path,
    resolver: Any,
    live_server: str,
    admin_token: str,
    tiny_llama: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loreg.cli import vllm_plugin

    base = factories.base_name("llama")
    with Client(live_server, admin_token) as c:
        c.push(factories.make_adapter(tmp_path / "r32", "llama", base_dir=tiny_llama["base"], r=32), "org/wide")
        c.push(factories.make_adapter(tmp_path / "dora", "llama", base_dir=tiny_llama["base"], use_dora=True), "org/dora")
        c.push(factories.make_adapter(tmp_path / "bias", "llama", base_dir=tiny_llama["base"], bias="all"), "org/bias")
    assert "rank 32 exceeds the max LoRA rank 16" in refused(resolver, base, "org/wide", caplog)
    assert "DoRA" in refused(resolver, base, "org/dora", caplog)
    assert "bias" in refused(resolver, base, "org/bias", caplog)
    assert list(vllm_env.glob("[0-9a-f]*")) == []  # nothing refused was downloaded
    monkeypatch.setenv("LOREG_VLLM_MAX_LORA_RANK", "32")  # vLLM started with --max-lora-rank 32
    wider = vllm_plugin.vllm_resolver()
    assert resolve(wider, base, "org/wide") is not None
    wider.core.close()


def test_unknown_names_a_revoked_token_and_an_unreachable_registry_return_none(
    resolver: Any,
    bot: dict[str, Any],
    read_token: str,
    registry: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loreg.cli import vllm_plugin
    from loreg.registry.services.tokens import TokenService, parse_token

    base = factories.base_name("llama")
    assert "ADAPTER_NOT_FOUND" in refused(resolver, base, "org/nobody", caplog)
    assert "VERSION_NOT_FOUND" in refused(resolver, base, "org/bot:9", caplog)
    assert "ALIAS_NOT_FOUND" in refused(resolver, base, "org/bot:staging", caplog)
    assert "INVALID" in refused(resolver, base, "Not a reference", caplog)
    parsed = parse_token(read_token)
    assert parsed is not None
    TokenService(registry).revoke(parsed[0])
    assert "UNAUTHORIZED" in refused(resolver, base, "org/bot:prod", caplog)
    monkeypatch.setenv("LOREG_URL", "http://127.0.0.1:9")
    elsewhere = vllm_plugin.vllm_resolver()
    assert "unreachable" in refused(elsewhere, base, "org/bot:prod", caplog)
    elsewhere.core.close()


CONCURRENT = """
import json, sys
from loreg.cli.vllm_plugin import AdapterResolver
print(json.dumps(str(AdapterResolver().resolve(sys.argv[1], sys.argv[2]))))
"""


def test_several_processes_resolve_into_one_cache_and_names_of_the_same_bytes_share_it(
    vllm_env: Path, bot: dict[str, Any], live_server: str, admin_token: str, read_token: str, adapter_dir: Path,
    tmp_path: Path, loreg_home: Path,
) -> None:
    from loreg.cli.vllm_plugin import AdapterResolver

    with Client(live_server, admin_token) as c:
        twin = c.push(adapter_dir, "org/twin")  # same bytes under another name: same manifest digest
    assert twin["digest"] == bot["digest"]
    env = env_with(
        LOREG_URL=live_server, LOREG_TOKEN=read_token, LOREG_VLLM_CACHE_DIR=str(vllm_env), LOREG_HOME=str(loreg_home)
    )
    base = factories.base_name("llama")
    refs = ["org/bot:prod", "org/twin", "org/bot:1", f"org/twin@{bot['digest']}"]
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, base, ref], env=env, stdout=subprocess.PIPE, text=True)
        for ref in refs
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(refs)
    folder = vllm_env / bot["digest"].removeprefix("sha256:")
    assert [json.loads(o) for o in outs] == [str(folder)] * len(refs)
    assert sorted(p.name for p in vllm_env.iterdir()) == [folder.name]
    for f in bot["files"]:
        assert filecmp.cmp(folder / f["path"], adapter_dir / f["path"], shallow=False)
    # a later process finds the folder ready: same folder, same files (inodes), nothing rewritten
    inodes = {p.name: p.stat().st_ino for p in folder.iterdir()}
    later = AdapterResolver()
    assert later.resolve(base, "org/twin:1") == folder
    later.close()
    assert {p.name: p.stat().st_ino for p in folder.iterdir()} == inodes


def test_a_damaged_published_folder_is_replaced_by_a_verified_one(
    resolver: Any, bot: dict[str, Any], adapter_dir: Path
) -> None:
    base = factories.base_name("llama")
    folder = Path(resolve(resolver, base, "org/bot:prod").lora_path)
    weights = folder / "adapter_model.safetensors"
    weights.unlink()  # not written through: the file may be a hard link into the shared cache
    weights.write_bytes(b"\0" * 64)
    assert Path(resolve(resolver, base, f"org/bot@{bot['digest']}").lora_path) == folder
    assert filecmp.cmp(weights, adapter_dir / "adapter_model.safetensors", shallow=False)


def test_a_failure_inside_the_resolver_is_logged_never_raised_into_vllm(
    resolver: Any, bot: dict[str, Any], vllm_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vllm_env.parent.mkdir(parents=True, exist_ok=True)
    vllm_env.write_text("a file where the cache folder should be")
    line = refused(resolver, factories.base_name("llama"), "org/bot:prod", caplog)
    assert "unexpected" in line and "org/bot:prod" in line


def test_register_never_raises_into_vllms_plugin_loader(
    vllm_env: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from loreg.cli import vllm_plugin

    def refuse(name: str, resolver: Any) -> None:
        raise RuntimeError("registry closed")

    # vLLM calls general plugins without a try, in every process it starts
    monkeypatch.setattr(LoRAResolverRegistry, "register_resolver", refuse)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        vllm_plugin.register()
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "loreg: the vLLM LoRA resolver was not registered: RuntimeError: registry closed"
    ]
