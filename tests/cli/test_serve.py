"""`loreg serve` as a real subprocess: the embedded default needs no configuration; Postgres must be migrated.

Every `loreg` here is the installed console script run as a subprocess, with LOREG_* variables
removed from its environment except the ones each test sets.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from loreg.registry.db import migrate
from tests import factories
from tests.support.moto import free_port
from tests.support.server import LOREG, env_with, loreg, serving

pytestmark = pytest.mark.slow


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
