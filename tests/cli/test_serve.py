"""`loreg serve` as a real subprocess: the embedded default needs no configuration; Postgres must be migrated.

Every `loreg` here is the installed console script run as a subprocess, with LOREG_* variables
removed from its environment except the ones each test sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from loreg.registry.db import migrate
from tests import factories
from tests.support.moto import free_port

pytestmark = pytest.mark.slow

LOREG = str(Path(sys.executable).with_name("loreg"))
START_DEADLINE_S = 60.0


def env_with(**values: str) -> dict[str, str]:
    """This process's environment without any LOREG_* variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOREG_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(values)
    return env


def loreg(*args: str | Path, env: dict[str, str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([LOREG, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"loreg {args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@contextmanager
def serving(env: dict[str, str], cwd: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`loreg serve` on a free port; yields once /v1/health answers; always ends the process."""
    port = free_port()
    log = open(cwd / f"serve-{port}.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([LOREG, "serve", "--port", str(port), "--log-level", "warning"], env=env, cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"loreg serve exited {proc.returncode}: {(cwd / log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"loreg serve did not answer in {START_DEADLINE_S}s")
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        log.close()


def tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_embedded_default_needs_no_configuration(tmp_path: Path, tiny_llama: dict[str, Path]) -> None:
    home = tmp_path / "home"  # does not exist yet: serve creates it
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, _proc):
        # SQLite under LOREG_HOME, migrated to the newest schema
        with sqlite3.connect(home / "loreg.db") as db:
            assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrate.head_revision(),)]
        # an admin token for its own URL, in a file only the user can read
        creds_path = home / "credentials.json"
        assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
        creds = json.loads(creds_path.read_text())
        assert list(creds) == [url]
        assert httpx.get(f"{url}/v1/adapters").status_code == 401
        assert httpx.get(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {creds[url]}"}).status_code == 200

        # the CLI with the same LOREG_HOME finds server and token without LOREG_TOKEN
        env = env_with(LOREG_HOME=str(home), LOREG_URL=url)
        base = json.loads(loreg("base", "register", tiny_llama["base"], "--name", factories.base_name("llama"), "--json",
                                env=env, cwd=tmp_path).stdout)
        assert base["created"] is True
        pushed = json.loads(loreg("push", tiny_llama["adapter"], "org/bot", "--metric", "eval_loss=1.2", "--json",
                                  env=env, cwd=tmp_path).stdout)
        assert (pushed["name"], pushed["version"]) == ("org/bot", 1)
        assert pushed["bytes_uploaded"] > 0
        for f in pushed["files"]:  # stored as blobs in the folder under LOREG_HOME
            [blob] = (home / "store").rglob(f["digest"].removeprefix("sha256:"))
            assert blob.stat().st_size == f["size"]

        pulled = loreg("pull", "org/bot:1", "-o", tmp_path / "pulled", env=env, cwd=tmp_path)
        assert "pulled org/bot:1" in pulled.stdout
        expected = {k: v for k, v in tree(tiny_llama["adapter"]).items() if k in {f["path"] for f in pushed["files"]}}
        assert tree(tmp_path / "pulled") == expected

        listed = json.loads(loreg("ls", "--json", env=env, cwd=tmp_path).stdout)["items"]
        assert [(i["name"], i["version"], i["metrics"]) for i in listed] == [("org/bot", 1, {"eval_loss": 1.2})]
        assert "org/bot" in loreg("ls", env=env, cwd=tmp_path).stdout


def test_serve_refuses_unmigrated_postgres_until_db_upgrade(tmp_path: Path, pg_server: Any) -> None:
    name = f"serve_{uuid.uuid4().hex[:16]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    try:
        env = env_with(LOREG_HOME=str(tmp_path / "home"), LOREG_DATABASE_URL=pg_server.url(name))
        refused = subprocess.run([LOREG, "serve", "--port", str(free_port())], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "loreg db upgrade" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert _tables(pg_server, name) == []  # serve never migrates a shared database

        upgraded = loreg("db", "upgrade", env=env, cwd=tmp_path)
        assert migrate.head_revision() in upgraded.stdout
        assert "alembic_version" in _tables(pg_server, name)

        with serving(env, tmp_path) as (url, _proc):
            assert httpx.get(f"{url}/v1/ready", timeout=10).status_code == 200
            assert not (tmp_path / "home" / "credentials.json").exists()  # no token made on Postgres
            assert httpx.get(f"{url}/v1/adapters").status_code == 401
            token = json.loads(loreg("token", "create", "--bootstrap", "--scope", "admin", "--json",
                                     env=env, cwd=tmp_path).stdout)["token"]
            listed = loreg("ls", "--json", env={**env, "LOREG_URL": url, "LOREG_TOKEN": token}, cwd=tmp_path)
            assert json.loads(listed.stdout) == {"items": []}
    finally:
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _tables(pg_server: Any, dbname: str) -> list[str]:
    import psycopg

    dsn = pg_server.admin_dsn.replace("dbname=postgres", f"dbname={dbname}")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
    return [r[0] for r in rows]
