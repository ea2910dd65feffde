"""The `loreg` command end to end: the console-script entry point against a live server, both backends.

Each call runs ``loreg.cli.main:main`` (what the installed ``loreg`` script runs: the click group plus
its error presentation and exit codes) inside click's CliRunner isolation, with LOREG_URL,
LOREG_TOKEN and LOREG_HOME set the way a user would.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from loreg.cli.main import COMMANDS, main
from tests import factories
from tests.support.adapters import pickle_looking, variant

BASE = factories.base_name("llama")
STORED = ("README.md", "adapter_config.json", "adapter_model.safetensors")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)  # the whole of stdout must be one JSON document


Loreg = Callable[..., Run]


def invoke(args: list[str], env: dict[str, str | None], input: str | None = None) -> Run:
    runner = CliRunner()
    with runner.isolation(input=input, env=env) as (out, err, _):
        saved = sys.argv
        sys.argv = ["loreg", *args]
        code: int = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = saved
            sys.stdout.flush()
            sys.stderr.flush()
        return Run(code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture
def loreg(live_server: str, admin_token: str, loreg_home: Path) -> Loreg:
    """Run `loreg ARGS...`; keyword ``token=None`` runs with no token at all."""

    def run(*args: str | Path, input: str | None = None, token: str | None = admin_token) -> Run:
        env = {"LOREG_URL": live_server, "LOREG_TOKEN": token, "LOREG_HOME": str(loreg_home)}
        return invoke([str(a) for a in args], env, input)

    return run


@pytest.fixture
def rest(live_server: str, admin_token: str) -> Any:
    with httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        yield http


def ok(result: Run) -> Run:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def stored_tree(folder: Path) -> dict[str, str]:
    return {k: v for k, v in tree(folder).items() if k in STORED}


# --- push / pull -------------------------------------------------------------------------------


def test_push_json_prints_one_document_and_repush_uploads_nothing(loreg: Loreg, adapter_dir: Path) -> None:
    first = ok(loreg("push", adapter_dir, "org/support-bot", "--metric", "eval_loss=1.21", "--metric", "bleu=30",
                     "--alias", "staging", "--message", "first fine-tune", "--json"))
    doc = first.json()
    assert (doc["name"], doc["version"]) == ("org/support-bot", 1)
    assert doc["digest"].startswith("sha256:") and len(doc["digest"]) == 71
    assert doc["bytes_uploaded"] == sum((adapter_dir / f).stat().st_size for f in STORED)
    assert doc["metrics"] == {"eval_loss": 1.21, "bleu": 30.0}
    assert doc["aliases"] == ["staging"]
    assert doc["message"] == "first fine-tune"

    again = ok(loreg("push", adapter_dir, "org/support-bot", "--json")).json()
    assert again["bytes_uploaded"] == 0
    assert (again["version"], again["digest"]) == (1, doc["digest"])
    assert again["created"] is False


def test_push_text_reports_version_and_skipped_files(loreg: Loreg, adapter_dir: Path) -> None:
    (adapter_dir / "training_args.bin").write_bytes(b"\x80\x04junk")
    (adapter_dir / "checkpoint-500").mkdir()
    out = ok(loreg("push", adapter_dir, "org/bot"))
    assert "pushed org/bot:1" in out.stdout
    assert "training_args.bin" in out.stderr and "checkpoint-500/" in out.stderr


def test_pull_json_writes_byte_identical_folder(loreg: Loreg, adapter_dir: Path, tmp_path: Path) -> None:
    pushed = ok(loreg("push", adapter_dir, "org/bot", "--alias", "prod", "--json")).json()
    refs = ("org/bot", "org/bot:1", "org/bot:prod", f"org/bot@{pushed['digest']}")
    for i, ref in enumerate(refs):
        dest = tmp_path / f"pulled-{i}"
        doc = ok(loreg("pull", ref, "-o", dest, "--json")).json()
        assert (doc["name"], doc["version"], doc["digest"]) == ("org/bot", 1, pushed["digest"])
        assert doc["bytes_downloaded"] == (pushed["size"] if i == 0 else 0)  # then the local cache serves
        assert tree(dest) == stored_tree(adapter_dir)
    text = ok(loreg("pull", "org/bot:prod", "-o", tmp_path / "text"))
    assert "pulled org/bot:1" in text.stdout
    assert tree(tmp_path / "text") == stored_tree(adapter_dir)


# --- show / ls ---------------------------------------------------------------------------------


def test_show_json_is_the_rest_resource(loreg: Loreg, rest: httpx.Client, adapter_dir: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot", "--metric", "eval_loss=1.5", "--alias", "prod", "-m", "hello"))
    resource = rest.get("/v1/adapters/org/bot/versions/1")
    assert resource.status_code == 200
    for ref in ("org/bot", "org/bot:1", "org/bot:prod"):
        shown = ok(loreg("show", ref, "--json")).json()
        use = shown.pop("use")
        assert shown == resource.json()
        # plus how to serve it: the pinned and alias references, and each engine's arguments
        digest = resource.json()["digest"]
        assert (use["pinned"], use["aliases"], use["ref"]) == (f"org/bot@{digest}", ["org/bot:prod"], "org/bot:prod")
        assert use["engines"]["sglang"]["args"] == ["--lora-paths", "org/bot:prod=DIR/org/bot:prod"]
        assert use["engines"]["vllm"]["env"]["VLLM_LORA_RESOLVER_CACHE_DIR"] == "DIR"
        assert use["engines"]["nim"]["model"] == {"org/bot:prod": "org--bot:prod"}
        assert use["engines"]["lorax"]["request"]["org/bot:prod"] == {"adapter_id": "DIR/org/bot:prod", "adapter_source": "local"}

    text = ok(loreg("show", "org/bot:prod")).stdout
    doc = resource.json()
    for needle in (f"org/bot:1  {doc['digest']}", "message   hello", "aliases   prod", "r=8", "eval_loss=1.5",
                   *(f["digest"] for f in doc["files"]), f"use       org/bot@{doc['digest']}",
                   "serve     sglang  loreg sync DIR org/bot:prod --engine sglang", "--lora-paths org/bot:prod=DIR/org/bot:prod",
                   "export NIM_PEFT_SOURCE=DIR"):
        assert needle in text


def test_ls_lists_filters_and_sorts(loreg: Loreg, adapter_dir: Path, tmp_path: Path) -> None:
    ok(loreg("push", adapter_dir, "org/a", "--metric", "eval_loss=1.5"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "b", seed=2), "org/b", "--metric", "eval_loss=0.9"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "c", seed=3), "other/c", "--metric", "eval_loss=1.2"))

    everything = ok(loreg("ls", "--json")).json()["items"]
    assert sorted(i["name"] for i in everything) == ["org/a", "org/b", "other/c"]
    assert sorted(i["name"] for i in ok(loreg("ls", "org", "--json")).json()["items"]) == ["org/a", "org/b"]
    assert [i["name"] for i in ok(loreg("ls", "other", "--json")).json()["items"]] == ["other/c"]

    by_base = ok(loreg("ls", "--base", BASE, "--json")).json()["items"]
    assert sorted(i["name"] for i in by_base) == ["org/a", "org/b", "other/c"]
    assert all(BASE in i["base"]["names"] for i in by_base)
    digest = by_base[0]["base"]["weights_digest"]
    assert len(ok(loreg("ls", "--base", digest, "--json")).json()["items"]) == 3

    ascending = [i["name"] for i in ok(loreg("ls", "--sort-by", "eval_loss", "--json")).json()["items"]]
    assert ascending == ["org/b", "other/c", "org/a"]  # a loss sorts ascending by default
    descending = [i["name"] for i in ok(loreg("ls", "--sort-by", "eval_loss", "--desc", "--json")).json()["items"]]
    assert descending == ["org/a", "other/c", "org/b"]

    text = ok(loreg("ls")).stdout.splitlines()
    assert text[0].split()[:3] == ["NAME", "VERSION", "RANK"]
    assert sorted(line.split()[0] for line in text[1:]) == ["org/a", "org/b", "other/c"]


def test_ls_on_empty_registry_prints_empty_json(loreg: Loreg) -> None:
    assert ok(loreg("ls", "--json")).json() == {"items": []}
    assert ok(loreg("ls", "nobody", "--json")).json() == {"items": []}


# --- alias / metrics / rm ----------------------------------------------------------------------


def test_alias_set_show_rm(loreg: Loreg, adapter_dir: Path, tmp_path: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "v2", seed=2), "org/bot"))

    assert ok(loreg("alias", "set", "org/bot:1", "prod", "--json")).json()["version"] == 1
    moved = ok(loreg("alias", "set", "org/bot:2", "prod"))
    assert "org/bot:prod -> 2" in moved.stdout
    shown = ok(loreg("alias", "show", "org/bot", "prod", "--json")).json()
    assert shown["version"] == 2
    assert [e["version"] for e in shown["history"]] == [2, 1]
    assert ok(loreg("show", "org/bot:prod", "--json")).json()["version"] == 2

    removed = ok(loreg("alias", "rm", "org/bot", "prod", "--json")).json()
    assert removed["version"] is None
    gone = loreg("show", "org/bot:prod")
    assert gone.code == 1 and "[ALIAS_NOT_FOUND]" in gone.stderr
    assert "(removed)" in ok(loreg("alias", "show", "org/bot", "prod")).stdout


def test_metrics_add_appends_and_version_is_unchanged(loreg: Loreg, adapter_dir: Path) -> None:
    pushed = ok(loreg("push", adapter_dir, "org/bot", "--metric", "eval_loss=1.5", "--json")).json()
    out = ok(loreg("metrics", "add", "org/bot:1", "eval_loss=1.2", "bleu=30", "--json")).json()
    assert out["metrics"] == {"eval_loss": 1.2, "bleu": 30.0}
    assert [(m["key"], m["value"]) for m in out["metrics_history"]] == [("eval_loss", 1.5), ("eval_loss", 1.2), ("bleu", 30.0)]
    assert out["digest"] == pushed["digest"]
    assert ok(loreg("show", "org/bot", "--json")).json()["metrics"] == {"eval_loss": 1.2, "bleu": 30.0}
    assert "eval_loss=1.1" in ok(loreg("metrics", "add", "org/bot", "eval_loss=1.1")).stdout


def test_rm_deletes_version_and_its_number_is_never_reused(loreg: Loreg, adapter_dir: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot", "--alias", "prod"))

    declined = loreg("rm", "org/bot:1", input="n\n")
    assert declined.code != 0
    assert ok(loreg("show", "org/bot:1", "--json")).json()["version"] == 1  # still there

    assert "deleted org/bot:1" in ok(loreg("rm", "org/bot:1", "--yes")).stdout
    gone = loreg("show", "org/bot:1", "--json")
    assert gone.code == 1 and gone.json()["errors"][0]["code"] == "VERSION_NOT_FOUND"
    assert loreg("show", "org/bot:prod").code == 1

    again = ok(loreg("push", adapter_dir, "org/bot", "--json")).json()
    assert (again["version"], again["created"]) == (2, True)


def test_rm_without_a_version_is_a_usage_error_and_deletes_nothing(loreg: Loreg, adapter_dir: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot"))
    for args in (("rm", "org/bot", "--yes"), ("rm", "org/bot", "--yes", "--json"), ("rm", "org/bot:1", "--all", "--yes")):
        result = loreg(*args)
        assert result.code == 2, (args, result)
        assert "Error:" in result.stderr and "--all" in result.stderr
        assert result.stdout == ""
    assert ok(loreg("show", "org/bot:1", "--json")).json()["version"] == 1


def test_rm_declined_exits_1_and_keeps_the_version(loreg: Loreg, adapter_dir: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot"))
    declined = loreg("rm", "org/bot:1", input="n\n")
    assert declined.code == 1
    assert "nothing deleted" in declined.stderr
    assert ok(loreg("show", "org/bot:1", "--json")).json()["version"] == 1


def test_rm_all_asks_then_deletes_every_version_and_numbers_continue(
    loreg: Loreg, adapter_dir: Path, tmp_path: Path
) -> None:
    ok(loreg("push", adapter_dir, "org/bot", "--alias", "prod"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "v2", seed=2), "org/bot"))

    declined = loreg("rm", "org/bot", "--all", input="n\n")
    assert declined.code == 1
    assert "all 2 versions of org/bot (1, 2)" in declined.stderr and "prod" in declined.stderr
    assert ok(loreg("show", "org/bot:prod", "--json")).json()["version"] == 1

    done = ok(loreg("rm", "org/bot", "--all", input="y\n"))
    assert "deleted org/bot: versions 1, 2" in done.stdout
    for ref in ("org/bot", "org/bot:1", "org/bot:2", "org/bot:prod"):
        assert loreg("show", ref).code == 1, ref
    assert ok(loreg("ls", "--json")).json()["items"] == []

    again = ok(loreg("push", adapter_dir, "org/bot", "--json")).json()
    assert (again["version"], again["created"]) == (3, True)
    assert ok(loreg("rm", "org/bot", "--all", "--yes", "--json")).json() == {
        "name": "org/bot", "versions": [3], "deleted": True,
    }


# --- base models, check, inspect ---------------------------------------------------------------


def test_base_register_ls_show_json(loreg: Loreg, rest: httpx.Client, tiny_llama: dict[str, Path]) -> None:
    # the live server has the tiny llama registered as BASE already: same content, one more name
    out = ok(loreg("base", "register", tiny_llama["base"], "--name", "Org/Tiny-Llama-0.1B", "--json")).json()
    assert out["created"] is False
    assert sorted(out["names"]) == sorted([BASE, "Org/Tiny-Llama-0.1B"])
    assert out["weights_digest"].startswith("sha256:") and out["layout_digest"].startswith("sha256:")

    items = ok(loreg("base", "ls", "--json")).json()["items"]
    assert [i["weights_digest"] for i in items] == [out["weights_digest"]]
    for ref in ("Org/Tiny-Llama-0.1B", BASE, out["weights_digest"]):
        shown = ok(loreg("base", "show", ref, "--json")).json()
        assert shown == rest.get(f"/v1/base-models/{ref}").json()
        assert shown["weights_digest"] == out["weights_digest"]
    assert "Org/Tiny-Llama-0.1B" in ok(loreg("base", "ls")).stdout
    assert out["weights_digest"] in ok(loreg("base", "show", BASE)).stdout

    missing = loreg("base", "show", "Org/Unknown", "--json")
    assert missing.code == 1 and missing.json()["errors"][0]["code"] == "BASE_NOT_FOUND"


def test_check_validates_locally_and_uploads_nothing(loreg: Loreg, adapter_dir: Path, rest: httpx.Client) -> None:
    text = ok(loreg("check", adapter_dir))
    assert text.stdout.startswith("ok: 4 modules")
    doc = ok(loreg("check", adapter_dir, "--json")).json()
    assert doc["valid"] is True
    assert doc["base"]["ref"] == BASE
    assert sorted(doc["facts"]["targets"]) == ["q_proj", "v_proj"]

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["r"] = 4  # the tensors have rank 8
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    bad = loreg("check", adapter_dir)
    assert bad.code == 1
    assert bad.stderr.startswith("error: ")
    assert "lora_A.weight" in bad.stderr  # names the offending keys
    assert rest.get("/v1/adapters").json()["items"] == []


def test_push_and_check_say_the_same_about_a_base_folder(
    loreg: Loreg, adapter_dir: Path, tiny_llama: dict[str, Path], tmp_path: Path, rest: httpx.Client
) -> None:
    gone = factories.edit_adapter(adapter_dir, tmp_path / "gone", config={"base_model_name_or_path": "/data/models/llama"})
    checked, pushed = loreg("check", gone), loreg("push", gone, "org/bot")
    assert checked.code == pushed.code == 1
    assert checked.stderr == pushed.stderr
    assert "[BASE_UNKNOWN]" in checked.stderr and "--base" in checked.stderr
    assert rest.get("/v1/adapters").json()["items"] == []

    local = factories.edit_adapter(adapter_dir, tmp_path / "local", config={"base_model_name_or_path": str(tiny_llama["base"])})
    line = f"base: {BASE} (matched by weights from {tiny_llama['base']})"
    assert line in ok(loreg("check", local)).stdout.splitlines()
    assert line in ok(loreg("push", local, "org/bot")).stdout.splitlines()


def test_shape_mismatch_prints_each_key_once_with_a_hint(loreg: Loreg, tmp_path: Path, rest: httpx.Client) -> None:
    wide = factories.make_base(tmp_path / "wide", "llama", hidden=64)
    adapter = factories.make_adapter(tmp_path / "adapter", "llama", base_dir=wide, target_modules=["q_proj", "o_proj"])
    from loreg.registry.formats.safetensors import read_header_from_file

    keys = sorted(read_header_from_file(adapter / "adapter_model.safetensors").tensors)
    result = loreg("push", adapter, "org/bot")
    assert result.code == 1
    *lines, quoted = result.stderr.splitlines()
    assert re.fullmatch(r"request id: [0-9a-f]{32} \(quote it to the server's operator\)", quoted)
    assert lines[0] == f"error: {len(keys)} adapter tensors do not fit the base's shapes [SHAPE_MISMATCH]"
    assert sorted(lines[1:-1]) == sorted(
        f"  - {k}: expected {[8, 32] if 'lora_A' in k else [32, 8]}, found {[8, 64] if 'lora_A' in k else [64, 8]}"
        for k in keys
    )
    assert lines[-1] == "hint: every mismatch is hidden size 32 vs 64: trained for another base? pass --base"
    assert rest.get("/v1/adapters").json()["items"] == []


@pytest.mark.parametrize("target, named", [
    (["k_proj"], "model.layers.0.self_attn.k_proj"),
    ("(?=.*q_proj).*", "lookaround"),
    ("(a{1000}){1000}", "repetition"),
])
def test_check_and_push_refuse_a_config_peft_would_load_differently(
    loreg: Loreg, adapter_dir: Path, rest: httpx.Client, target: Any, named: str
) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = target
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    checked = loreg("check", adapter_dir, "--json")
    pushed = loreg("push", adapter_dir, "org/bot", "--json")
    assert checked.code == pushed.code == 1
    assert checked.json()["errors"][0]["code"] == pushed.json()["errors"][0]["code"]
    assert named in checked.json()["errors"][0]["message"]
    assert named in pushed.json()["errors"][0]["message"]
    assert rest.get("/v1/adapters").json()["items"] == []


@pytest.mark.parametrize("plus", [0, 65536])
def test_check_and_push_agree_on_a_header_length_that_starts_like_pickle(
    loreg: Loreg, adapter_dir: Path, plus: int
) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(pickle_looking(weights.read_bytes(), plus=plus))
    ok(loreg("check", adapter_dir))
    pushed = ok(loreg("push", adapter_dir, "org/bot", "--json")).json()
    assert pushed["version"] == 1


def test_inspect_json_lists_every_adapted_module(loreg: Loreg, adapter_dir: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot"))
    doc = ok(loreg("inspect", "org/bot:1", "--json")).json()
    assert (doc["name"], doc["version"]) == ("org/bot", 1)
    modules = doc["modules"]
    assert len(modules) == 4  # 2 layers x (q_proj, v_proj)
    assert all(m["rank"] == 8 and m["delta_norm"] > 0 for m in modules)
    assert [m["delta_norm"] for m in modules] == sorted((m["delta_norm"] for m in modules), reverse=True)
    assert doc["base_weights"] is False  # registered from headers only: no ||dW||/||W||
    assert all(m.get("relative_change") is None for m in modules)
    text = ok(loreg("inspect", "org/bot")).stdout
    assert "4 modules" in text


# --- errors ------------------------------------------------------------------------------------


def test_unknown_adapter_exits_1_with_code_on_stderr_or_envelope_on_stdout(loreg: Loreg, tmp_path: Path) -> None:
    text = loreg("show", "org/nope")
    assert text.code == 1
    assert text.stdout == ""
    assert text.stderr.startswith("error: ") and "[ADAPTER_NOT_FOUND]" in text.stderr

    for args in (("show", "org/nope", "--json"), ("pull", "org/nope", "-o", str(tmp_path / "x"), "--json")):
        as_json = loreg(*args)
        assert as_json.code == 1
        envelope = as_json.json()
        assert envelope["errors"][0]["code"] == "ADAPTER_NOT_FOUND"
        assert envelope["errors"][0]["message"]
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_bad_usage_exits_2(loreg: Loreg, adapter_dir: Path) -> None:
    for args in (
        ("push", str(adapter_dir)),  # NAME missing
        ("push", str(adapter_dir), "org/bot", "--metric", "eval_loss", "--json"),
        ("push", str(adapter_dir.parent / "no-such-folder"), "org/bot"),
        ("ls", "--min-rank", "abc"),
        ("show",),
        ("no-such-command",),
    ):
        result = loreg(*args)
        assert result.code == 2, (args, result)
        assert "Error:" in result.stderr
        assert result.stdout == ""  # with --json too: nothing but a JSON document ever goes to stdout
    assert ok(loreg("ls", "--json")).json()["items"] == []


def test_invalid_name_exits_1_and_stores_nothing(loreg: Loreg, adapter_dir: Path, rest: httpx.Client) -> None:
    text = loreg("push", adapter_dir, "Org/X")
    assert text.code == 1 and "[NAME_INVALID]" in text.stderr
    as_json = loreg("push", adapter_dir, "Org/X", "--json")
    assert as_json.code == 1 and as_json.json()["errors"][0]["code"] == "NAME_INVALID"
    assert rest.get("/v1/adapters").json()["items"] == []
    digests = ["sha256:" + hashlib.sha256((adapter_dir / f).read_bytes()).hexdigest() for f in STORED]
    assert sorted(rest.post("/v1/base-models/blobs:check", json={"digests": digests}).json()["missing"]) == sorted(digests)


def test_missing_token_is_unauthorized_with_hint(loreg: Loreg, adapter_dir: Path) -> None:
    text = loreg("ls", token=None)
    assert text.code == 1
    assert "[UNAUTHORIZED]" in text.stderr
    assert "hint:" in text.stderr and "LOREG_TOKEN" in text.stderr
    as_json = loreg("push", adapter_dir, "org/bot", "--json", token=None)
    assert as_json.code == 1
    error = as_json.json()["errors"][0]
    assert error["code"] == "UNAUTHORIZED" and error["detail"]["hint"]
    wrong = loreg("ls", token="loreg_not_a_real_token")
    assert wrong.code == 1 and "[UNAUTHORIZED]" in wrong.stderr


# --- help and import discipline (no server needed) ---------------------------------------------


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = invoke(["--help"], {"LOREG_HOME": str(tmp_path)})
    assert result.code == 0
    listed = set(re.findall(r"^  (\S+)", result.stdout.split("Commands:")[1], re.MULTILINE))
    assert listed == set(COMMANDS)
    assert {"push", "pull", "ls", "show", "alias", "metrics", "rm", "serve", "db", "base", "check", "inspect"} <= listed
    for name in sorted(COMMANDS):
        assert invoke([name, "--help"], {"LOREG_HOME": str(tmp_path)}).code == 0, name


IMPORT_CHECK = """
import sys
from click.testing import CliRunner
from loreg.cli.main import cli
args = sys.argv[1:]
result = CliRunner().invoke(cli, args)
assert result.exit_code == 0, result.output
assert "Usage:" in result.output
heavy = sorted(m for m in ("torch", "sqlalchemy", "fastapi", "uvicorn", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
server = sorted(m for m in sys.modules if m.startswith("loreg.registry.") and m.split(".")[2] not in ("errors", "formats", "api"))
assert not server, server
print("clean")
"""


@pytest.mark.parametrize("args", [["--help"], ["push", "--help"], ["pull", "--help"], ["serve", "--help"], ["db", "--help"]])
def test_help_imports_no_server_code(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


# --- tokens and login -----------------------------------------------------------------------------


def test_token_create_ls_revoke_and_login(loreg: Loreg, live_server: str, loreg_home: Path, adapter_dir: Path) -> None:
    created = ok(loreg("token", "create", "--scope", "write", "--namespace", "team-a/*", "--expires", "30d",
                       "--description", "ci", "--json")).json()
    secret = created["token"]
    assert secret.startswith("loreg_") and created["scope"] == "write" and created["namespaces"] == ["team-a/*"]
    listed = ok(loreg("token", "ls", "--json")).json()["items"]
    assert any(t["id"] == created["id"] for t in listed)
    assert secret not in json.dumps(listed)  # shown once, never again

    # login keeps the token in LOREG_HOME/credentials.json (0600); the CLI then needs no LOREG_TOKEN
    done = ok(loreg("login", live_server, "--token", secret, token=None))
    assert created["id"] in done.stdout
    creds = loreg_home / "credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    assert json.loads(creds.read_text())[live_server] == secret
    denied = loreg("push", adapter_dir, "team-b/bot", token=None)
    assert denied.code == 1 and "[DENIED]" in denied.stderr

    ok(loreg("token", "revoke", created["id"], "--json"))
    refused = loreg("ls", token=None)
    assert refused.code == 1 and "[UNAUTHORIZED]" in refused.stderr


def test_login_with_a_bad_token_keeps_nothing(loreg: Loreg, live_server: str, loreg_home: Path) -> None:
    bad = loreg("login", live_server, "--token", "loreg_nope", token=None)
    assert bad.code == 1 and "[UNAUTHORIZED]" in bad.stderr
    assert not (loreg_home / "credentials.json").exists()
