"""What a new user meets in the first hour: help texts that say what options do, the README's
claims, one unit system on progress bars, metrics and grace periods written like elsewhere, a
clear error for a folder that is not an adapter. CLI tests run on both backends."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from sqlalchemy import update

from loreg.cli import output
from loreg.cli.client import RegistryClient
from loreg.cli.main import COMMANDS, cli
from tests.cli.test_cli import Loreg, invoke, loreg, ok, rest  # noqa: F401  (fixtures)
from tests.support.adapters import variant

README = Path(__file__).resolve().parents[2] / "README.md"


# --- ls: sorting keeps adapters without the metric; ! explained ---------------------------------


def test_ls_sort_by_a_metric_keeps_adapters_without_it_last(loreg: Loreg, rest: httpx.Client, adapter_dir: Path,
                                                            tmp_path: Path) -> None:
    ok(loreg("push", adapter_dir, "org/a", "--metric", "eval_loss=1.5"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "b", seed=2), "org/b"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "c", seed=3), "org/c", "--metric", "eval_loss=0.9"))
    ok(loreg("push", variant(adapter_dir, tmp_path / "d", seed=4), "org/d"))

    default = [i["name"] for i in ok(loreg("ls", "--sort-by", "eval_loss", "--json")).json()["items"]]
    assert default == ["org/c", "org/a", "org/b", "org/d"]  # ascending; ties and the rest by push order
    # the REST default is the CLI's
    assert [i["name"] for i in rest.get("/v1/adapters", params={"metric": "eval_loss"}).json()["items"]] == default
    desc = [i["name"] for i in ok(loreg("ls", "--sort-by", "eval_loss", "--desc", "--json")).json()["items"]]
    assert desc == ["org/a", "org/c", "org/d", "org/b"]
    text = ok(loreg("ls", "--sort-by", "eval_loss")).stdout.splitlines()
    assert [line.split()[0] for line in text[1:]] == default


def test_ls_explains_the_warning_mark(loreg: Loreg, adapter_dir: Path) -> None:
    from safetensors.numpy import load_file, save_file

    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in tensors.items()}, weights)  # stored with a warning
    pushed = ok(loreg("push", adapter_dir, "org/warned", "--json")).json()
    assert pushed["warnings"]
    listed = ok(loreg("ls"))
    assert re.search(r"^org/warned\s+1 !", listed.stdout, re.MULTILINE)
    assert "! stored with warnings" in listed.stderr and "loreg show" in listed.stderr
    assert "! stored with warnings" not in ok(loreg("ls", "--json")).stderr


# --- help texts and README claims (no server) ----------------------------------------------------


def help_of(*args: str, tmp_path: Path) -> str:
    result = invoke([*args, "--help"], {"LOREG_HOME": str(tmp_path)})
    assert result.code == 0, result
    return " ".join(result.stdout.split())  # unwrap click's line breaks


def test_ls_help_documents_every_filter_the_order_and_the_mark(tmp_path: Path) -> None:
    text = help_of("ls", tmp_path=tmp_path)
    assert "--min-rank R Only adapters whose every rank is at least R." in text
    assert "--task-type TYPE Only adapters with this PEFT task_type" in text
    assert "ascending when METRIC's name contains 'loss', else descending" in text
    assert "without it come last" in text
    assert "A `!` after the version number marks a version stored with warnings" in text


def test_gc_pull_export_and_metrics_help_say_what_they_take(tmp_path: Path) -> None:
    assert "30m, 24h, 2d" in help_of("gc", tmp_path=tmp_path)
    assert "--link" in help_of("pull", tmp_path=tmp_path) and "--link" in help_of("export", tmp_path=tmp_path)
    assert "--metric KEY=VALUE" in help_of("metrics", "add", tmp_path=tmp_path)


def _leaf_commands() -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    ctx = click.Context(cli)
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def test_readme_lists_exactly_the_commands_without_json() -> None:
    without = {path.split()[0] for path, cmd in _leaf_commands().items() if not any(p.name == "as_json" for p in cmd.params)}
    sentence = re.search(r"Every command takes `--json` except ([^.]+)\.", " ".join(README.read_text().split()))
    assert sentence, "README must say which commands take --json"
    assert set(re.findall(r"`loreg (\w+)`", sentence.group(1))) == without
    assert without == {"serve", "login", "db", "worker"}


def test_readme_tour_says_how_the_base_is_found() -> None:
    text = " ".join(README.read_text().split())
    assert "`base_model_name_or_path` must equal a registered base name" in text
    assert "--base NAME" in text and "BASE_UNKNOWN" in text


# --- metrics add takes --metric like push ---------------------------------------------------------


def test_metrics_add_takes_metric_options_like_push(loreg: Loreg, adapter_dir: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot", "--metric", "eval_loss=1.5"))
    out = ok(loreg("metrics", "add", "org/bot:1", "--metric", "eval_loss=1.2", "--metric", "bleu=30", "--json")).json()
    assert out["metrics"] == {"eval_loss": 1.2, "bleu": 30.0}
    both = ok(loreg("metrics", "add", "org/bot", "--metric", "bleu=31", "eval_loss=1.1", "--json")).json()
    assert both["metrics"] == {"eval_loss": 1.1, "bleu": 31.0}
    none = loreg("metrics", "add", "org/bot")
    assert none.code == 2 and "--metric" in none.stderr
    bad = loreg("metrics", "add", "org/bot", "--metric", "eval_loss")
    assert bad.code == 2 and "KEY=VALUE" in bad.stderr
    history = ok(loreg("show", "org/bot", "--json")).json()["metrics_history"]
    assert len(history) == 5  # the refused calls appended nothing


# --- gc --grace takes a unit ----------------------------------------------------------------------


def test_gc_grace_takes_a_duration_with_a_unit(settings: Any, registry: Any, bare_client: RegistryClient,
                                               tmp_path: Path) -> None:
    from loreg.registry.db.models import Blob

    data = b"an upload no version references"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / "orphan"
    path.write_bytes(data)
    bare_client.upload_blob(path, digest, len(data))
    with registry.sessions.begin() as session:
        session.execute(update(Blob).where(Blob.digest == digest).values(last_seen_at=datetime.now(UTC) - timedelta(minutes=45)))
    env = {"LOREG_HOME": str(settings.home), "LOREG_DATABASE_URL": settings.database_url,
           "LOREG_STORAGE_URL": settings.storage_url, "LOREG_S3_ENDPOINT_URL": settings.s3_endpoint_url,
           "LOREG_S3_REGION": settings.s3_region}

    def gc(*args: str) -> Any:
        result = invoke(["gc", "--dry-run", "--json", *args], env)
        assert result.code == 0, result
        return result.json()

    assert gc("--grace", "1h")["deleted"] == [] and gc("--grace", "2d")["deleted"] == []
    assert gc("--grace", "30m")["deleted"] == [digest]
    assert gc("--grace", "2700s")["deleted"] == [digest]
    assert gc("--grace", "0")["deleted"] == [digest]
    for bare in ("1", "0.5", "24hours", "-1h"):
        refused = invoke(["gc", "--grace", bare], env)
        assert refused.code == 2 and "30m, 24h or 2d" in refused.stderr, bare
    with registry.sessions.begin() as session:
        assert session.get(Blob, digest) is not None  # dry runs and refusals deleted nothing


# --- a folder that is not an adapter --------------------------------------------------------------


def test_an_empty_folder_is_a_folder_error_not_a_name_error(loreg: Loreg, rest: httpx.Client, tmp_path: Path,
                                                            adapter_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("push", "check"):
        args = [command, empty, "org/bot"] if command == "push" else [command, empty]
        text = loreg(*args)
        assert text.code == 1
        assert f"no adapter_config.json in {empty}" in text.stderr and "[FOLDER_INVALID]" in text.stderr
        as_json = loreg(*args, "--json")
        assert as_json.code == 1 and as_json.json()["errors"][0]["code"] == "FOLDER_INVALID"

    # a trainer's output folder: the adapters are one level down, and the hint says where
    trainer = tmp_path / "out"
    (trainer / "checkpoint-500").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (trainer / "checkpoint-500" / name).write_bytes((adapter_dir / name).read_bytes())
    hinted = loreg("push", trainer, "org/bot")
    assert hinted.code == 1 and str(trainer / "checkpoint-500") in hinted.stderr
    assert rest.get("/v1/adapters").json()["items"] == []


def test_a_folder_without_config_json_is_a_folder_error_for_base_register(loreg: Loreg, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    result = loreg("base", "register", tmp_path / "nothing", "--name", "Org/X", "--json")
    assert result.code == 1 and result.json()["errors"][0]["code"] == "FOLDER_INVALID"
    assert "no config.json in" in result.json()["errors"][0]["message"]


# --- progress: totals and binary units -------------------------------------------------------------


def test_hashing_progress_reports_the_total_it_counts_to(bare_client: RegistryClient, tiny_llama: dict[str, Path]) -> None:
    calls: list[tuple[str, int, int]] = []
    bare_client.register_base(tiny_llama["base"], "Org/Progress", progress=lambda *a: calls.append(a))
    hashing = [c for c in calls if c[0] == "hashing"]
    weights = sum(p.stat().st_size for p in tiny_llama["base"].glob("*.safetensors"))
    assert hashing and {total for _, _, total in hashing} == {weights}
    assert sum(n for _, n, _ in hashing) == weights


def test_human_size_counts_in_binary_units() -> None:
    assert output.human_size(0) == "0 B"
    assert output.human_size(1023) == "1023 B"
    assert output.human_size(1024) == "1.0 KiB"
    assert output.human_size(181_688_512) == "173.3 MiB"
    assert output.human_size(3 * 1024**3) == "3.0 GiB"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_transfer_bar_shows_done_and_total_in_the_summaries_units(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with output.transfer_progress(True) as advance:
        assert advance is not None
        advance("hashing", 90_844_256, 181_688_512)
        advance("hashing", 90_844_256, 181_688_512)
    drawn = screen.getvalue()
    assert "173.3 MiB/173.3 MiB" in drawn
    assert not re.search(r"\d MB\b|/0 bytes", drawn)

    from rich.progress import Progress

    columns = output.transfer_columns()
    bar = Progress(*columns)
    tid = bar.add_task("x", total=2 * 1024**2, completed=1024**2)
    task = next(t for t in bar.tasks if t.id == tid)
    assert str(columns[2].render(task)) == "1.0 MiB/2.0 MiB"
    assert str(columns[3].render(task)) == "?"  # no speed measured yet
