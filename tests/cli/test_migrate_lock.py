"""`loreg db upgrade` started on several hosts at once: the Postgres advisory lock lets one migrate
and the others wait, then find the schema at head."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from loreg.registry.db import migrate
from tests.support.server import LOREG, env_with, poll_until

pytestmark = pytest.mark.slow


def test_concurrent_db_upgrades_wait_for_the_lock_and_both_succeed(tmp_path: Path, pg_server: Any) -> None:
    import psycopg

    name = f"lock_{uuid.uuid4().hex[:16]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.admin_dsn.replace("dbname=postgres", f"dbname={name}")
    env = env_with(LOREG_HOME=str(tmp_path / "home"), LOREG_DATABASE_URL=pg_server.url(name))
    procs: list[subprocess.Popen[str]] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as holder:
            # the test holds the lock: both upgrades must queue behind it, neither may touch the schema
            holder.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK_KEY,))
            procs = [subprocess.Popen([LOREG, "db", "upgrade"], env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]

            def waiting() -> bool:
                rows = holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = %s",
                    (migrate.MIGRATION_LOCK_KEY & 0xFFFFFFFF,),
                ).fetchone()
                return rows is not None and rows[0] == 2

            poll_until(waiting, "both upgrades to wait for the migration lock")
            tables = holder.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
            assert tables == (0,)
            holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK_KEY,))
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrate.head_revision(),)]
        # one of them migrated from empty, the other found the schema at head
        assert sorted("was empty" in out for out, _err in outs) == [False, True], outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
