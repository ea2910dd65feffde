"""`loreg combine` end to end: the console-script entry point against a live server and a job worker, both backends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from tests.cli.test_cli import Loreg, loreg, ok  # noqa: F401 - the fixture `loreg`

pytest.importorskip("torch")


@pytest.fixture
def worker(registry: Any) -> Iterator[None]:
    """A job worker thread (what `loreg worker` or `loreg serve` runs)."""
    from loreg.registry.merge.worker import JobWorker

    stop = threading.Event()
    thread = threading.Thread(target=JobWorker(registry, device="cpu").run_forever, args=(stop, None, 0.05), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)


@pytest.fixture
def inputs(loreg: Loreg, tiny_llama: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    base = tiny_llama["base"]
    folders = {
        "a": factories.make_adapter(tmp_path / "a", "llama", base_dir=base, seed=21, target_modules=["q_proj", "v_proj"]),
        "b": factories.make_adapter(tmp_path / "b", "llama", base_dir=base, seed=22, target_modules=["q_proj", "o_proj"]),
        "r4": factories.make_adapter(tmp_path / "r4", "llama", base_dir=base, seed=23, target_modules=["q_proj"], r=4),
    }
    for name, folder in folders.items():
        ok(loreg("push", folder, f"org/{name}", "--json"))


def test_combine_pushes_a_version_with_lineage_shown_by_show(loreg: Loreg, inputs: None, worker: None) -> None:  # noqa: F811
    run = ok(loreg("combine", "org/a", "org/b:1", "--method", "ties", "--density", "0.5", "--majority-sign", "frequency",
                   "--weight", "0.7", "--weight", "-0.4", "--to", "org/mix", "--alias", "prod", "--json"))
    job = run.json()
    assert job["state"] == "done" and job["version"] == 1 and job["pushed"]["aliases"] == ["prod"]
    shown = ok(loreg("show", "org/mix:prod", "--json")).json()
    made_by = shown["made_by"]
    assert made_by["id"] == job["id"] and made_by["method"] == "ties"
    assert made_by["params"]["density"] == 0.5 and made_by["params"]["majority_sign_method"] == "frequency"
    assert [(i["name"], i["weight"]) for i in made_by["inputs"]] == [("org/a:1", 0.7), ("org/b:1", -0.4)]
    text = ok(loreg("show", "org/mix:1")).stdout
    assert "made by   combination" in text and "ties (density=0.5, majority_sign_method=frequency)" in text
    assert "0.7 x org/a:1" in text and "PEFT issue #3004" in text

    again = ok(loreg("combine", "org/a:1", "org/b", "--method", "ties", "--density", "0.5", "--majority-sign",
                     "frequency", "--weight", "0.7", "--weight", "-0.4", "--to", "org/mix", "--alias", "prod"))
    assert again.stdout.strip().startswith("combined org/a:1 + org/b with ties into org/mix:1 ")  # the stored job


def test_svd_combination_says_nothing_about_issue_3004(loreg: Loreg, inputs: None, worker: None) -> None:  # noqa: F811
    ok(loreg("combine", "org/a", "org/b", "--method", "svd", "--svd-rank", "4", "--to", "org/mix"))
    text = ok(loreg("show", "org/mix")).stdout
    assert "svd (svd_rank=4)" in text and "#3004" not in text


def test_unequal_ranks_exit_1_naming_the_input(loreg: Loreg, inputs: None) -> None:  # noqa: F811
    run = loreg("combine", "org/a", "org/r4", "--method", "linear", "--to", "org/mix")
    assert run.code == 1 and "RANK_MISMATCH" in run.stderr and "org/r4:1" in run.stderr
    assert loreg("show", "org/mix").code == 1  # nothing pushed


def test_mismatched_weights_are_a_usage_error(loreg: Loreg, inputs: None) -> None:  # noqa: F811
    run = loreg("combine", "org/a", "org/b", "--method", "cat", "--weight", "1", "--to", "org/mix")
    assert run.code == 2 and "--weight" in run.stderr


def test_export_passes_the_method_and_its_parameters(loreg: Loreg, inputs: None, tmp_path: Path) -> None:  # noqa: F811
    run = loreg("export", "org/a", "--density", "0.5", "-o", tmp_path / "out")
    assert run.code == 1 and "COMBINATION_INVALID" in run.stderr  # parameters without a method
    run = loreg("export", "org/a", "org/b", "--method", "nope", "-o", tmp_path / "out")
    assert run.code == 1 and "COMBINATION_INVALID" in run.stderr and "'nope'" in run.stderr
