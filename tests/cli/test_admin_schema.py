"""Every command run on the server host refuses a database schema that is not this loreg's with one
message and one exit code (registry/admin.py), on SQLite and on Postgres."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from loreg.registry.db import migrate
from loreg.registry.db.session import make_engine
from tests.support.moto import free_port
from tests.support.server import env_with, loreg

pytestmark = pytest.mark.slow

OLD = "0004"  # a revision before the head: a database an older loreg left
TOKEN = ("token", "create", "--bootstrap", "--scope", "admin")


def _refusals(commands: list[tuple[str, ...]], env: dict[str, str], cwd: Path) -> set[tuple[int, str]]:
    seen = set()
    for args in commands:
        done = loreg(*args, env=env, cwd=cwd, check=False)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        seen.add((done.returncode, done.stderr))
    return seen


def _expected(current: str) -> str:
    return (
        f"error: the database schema is at {current}, this loreg needs {migrate.head_revision()} [DB_UNAVAILABLE]\n"
        "hint: run `loreg db upgrade` with the same LOREG_DATABASE_URL, then run this command again\n"
    )


def test_stale_sqlite_is_refused_alike_by_gc_fsck_and_token_bootstrap(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    engine = make_engine(f"sqlite:///{home / 'loreg.db'}")
    migrate.upgrade(engine, OLD)
    engine.dispose()
    env = env_with(LOREG_HOME=str(home))
    assert _refusals([("gc",), ("fsck",), TOKEN], env, tmp_path) == {(1, _expected(OLD))}
    # nothing was migrated or created by the refusals
    engine = make_engine(f"sqlite:///{home / 'loreg.db'}")
    try:
        assert migrate.current_revision(engine) == OLD
    finally:
        engine.dispose()


def test_worker_on_sqlite_is_a_settings_error(tmp_path: Path) -> None:
    done = loreg("worker", "--once", env=env_with(LOREG_HOME=str(tmp_path / "home")), cwd=tmp_path, check=False)
    assert done.returncode == 1
    assert "standalone workers need Postgres" in done.stderr and "[SETTINGS_INVALID]" in done.stderr


def test_stale_postgres_is_refused_alike_by_serve_worker_gc_fsck_and_token_bootstrap(
    tmp_path: Path, pg_server: Any
) -> None:
    name = f"stale_{uuid.uuid4().hex[:16]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    try:
        engine = make_engine(pg_server.url(name))
        migrate.upgrade(engine, OLD)
        engine.dispose()
        env = env_with(LOREG_HOME=str(tmp_path / "home"), LOREG_DATABASE_URL=pg_server.url(name))
        commands = [("serve", "--port", str(free_port())), ("worker", "--once"), ("gc",), ("fsck",), TOKEN]
        assert _refusals(commands, env, tmp_path) == {(1, _expected(OLD))}
        engine = make_engine(pg_server.url(name))
        try:
            assert migrate.current_revision(engine) == OLD  # serve never migrates a shared database
        finally:
            engine.dispose()
    finally:
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
