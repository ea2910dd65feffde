"""The wheel holds every package and data file: built, installed non-editable in a fresh venv, run there.

The fresh venv has no loreg but the wheel. Its runtime dependencies come from this test venv's
site-packages, added as a plain path (a .pth line): the editable-install hook of the checkout in
there is never run, and every command runs from a temporary folder, so the checkout itself cannot
be imported. Whatever the wheel lacks fails here.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from loreg.cli.main import COMMANDS
from loreg.registry.db import migrate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"registry": "loreg/registry", "cli": "loreg/cli", "migrations": "loreg/migrations"}
SKIP_DIRS = {"__pycache__", ".venv", ".venv-test", ".git", "build", "dist", "tests", "bench", ".tmp", ".pytest_cache", ".hypothesis"}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def source_files() -> set[str]:
    """Every .py and .mako file of the three packages and the web templates and assets, as paths inside the wheel."""
    out = set()
    for folder, prefix in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".mako", ".html", ".css", ".svg") and "__pycache__" not in path.parts:
                out.add(f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}")
    return out


def dependencies_only(folder: Path) -> Path:
    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.startswith(("loreg", "__editable__", "_loreg")):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build from a copy of the working tree (no build/ or egg-info left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")])
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)], cwd=tmp)
    [built] = (tmp / "dist").glob("loreg-*.whl")
    return built


def test_wheel_holds_every_package_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_files() - names)
    assert missing == [], f"not in the wheel: {missing}"
    assert "loreg/migrations/script.py.mako" in names
    versions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert len(versions) >= 2  # __init__.py and at least the first migration
    assert all(f"loreg/migrations/versions/{v}" in names for v in versions)
    assert not any(n.startswith("loreg/__init__") for n in names)  # loreg stays a namespace
    assert not any(n.startswith(("tests/", "registry/", "cli/", "migrations/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "loreg = loreg.cli.main:main" in declared
    assert "[vllm.general_plugins]\nloreg = loreg.cli.vllm_plugin:register" in declared


def test_installed_wheel_runs_help_and_db_upgrade_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         str(wheel)], cwd=tmp_path)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    # dependencies only: a folder of links to this venv's packages minus anything of loreg's (an editable
    # hook, or a leftover loreg/ folder from an earlier non-editable install), reached by a plain path line
    (site / "_loreg_test_deps.pth").write_text(f"{dependencies_only(tmp_path / 'deps')}\n")

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOREG_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(LOREG_HOME=str(tmp_path / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    where = json.loads(run([str(python), "-c", (
        "import json, loreg.cli.main, loreg.registry.app, loreg.migrations, importlib.metadata as m;"
        "print(json.dumps({'cli': loreg.cli.main.__file__, 'registry': loreg.registry.app.__file__,"
        "'migrations': loreg.migrations.__file__, 'loreg': list(__import__('loreg').__path__),"
        "'version': m.version('loreg')}))"
    )], cwd=work, env=env))
    for key in ("cli", "registry", "migrations"):
        assert where[key].startswith(str(site)), where
    assert where["loreg"] == [str(site / "loreg")], where

    # vLLM's plugin loader finds the resolver in the installed metadata; loading it imports no vLLM
    plugin = json.loads(run([str(python), "-c", (
        "import json, sys, importlib.metadata as m;"
        "[ep] = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'loreg'];"
        "f = ep.load(); print(json.dumps({'value': ep.value, 'module': f.__module__, 'dist': ep.dist.name,"
        "'vllm': sorted(n for n in sys.modules if n.split('.')[0] in ('vllm', 'torch', 'sqlalchemy', 'fastapi'))}))"
    )], cwd=work, env=env))
    assert plugin == {"value": "loreg.cli.vllm_plugin:register", "module": "loreg.cli.vllm_plugin", "dist": "loreg", "vllm": []}

    loreg = str(venv / "bin" / "loreg")
    help_text = run([loreg, "--help"], cwd=work, env=env)
    listed = set(re.findall(r"^  (\S+)", help_text.split("Commands:")[1], re.MULTILINE))
    assert listed == set(COMMANDS)

    upgraded = run([loreg, "db", "upgrade"], cwd=work, env=env)
    head = migrate.head_revision()
    assert head in upgraded
    with sqlite3.connect(tmp_path / "home" / "loreg.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"adapters", "versions", "blobs"} <= tables, tables
    assert f"current {head}, head {head}" in run([loreg, "db", "current"], cwd=work, env=env)

    # the web interface renders from the installed package's templates and serves its stylesheet
    page = json.loads(run([str(python), "-c", (
        "import json; from fastapi.testclient import TestClient; from loreg.registry.app import create_app;"
        "from loreg.registry.settings import Settings; import loreg.registry.web.install as w;"
        "c = TestClient(create_app(Settings(export_worker='external')));"
        "r = c.get('/ui/login'); css = c.get('/ui/static/ui.css');"
        "print(json.dumps({'status': r.status_code, 'form': 'name=\"token\"' in r.text, 'css': css.status_code,"
        "'csp': r.headers.get('content-security-policy', ''), 'from': w.__file__}))"
    )], cwd=work, env=env))
    assert page["status"] == 200 and page["form"] and page["css"] == 200, page
    assert page["csp"].startswith("default-src 'none'") and page["from"].startswith(str(site)), page
