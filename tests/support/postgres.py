"""A throwaway Postgres 15 cluster for tests: initdb in a temp folder, a free port on 127.0.0.1.

Postgres refuses to run as root, so as root the cluster is created and run as the `postgres` user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.support.moto import free_port
from tests.support.server import poll_until

START_DEADLINE_S = 60.0


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@dataclass
class PgServer:
    datadir: Path
    sockdir: Path
    port: int
    logfile: Path
    # more server settings ("shared_buffers=1GB"), each passed as -c
    settings: tuple[str, ...] = ()

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql)

    def start(self) -> None:
        subprocess.run(
            _as_postgres(
                ["pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "-o",
                 f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
                 + "".join(f" -c {x}" for x in self.settings), "start"]
            ),
            check=True, stdout=subprocess.DEVNULL,
        )
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop"]),
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def wait_ready(self) -> None:
        def accepts() -> bool:
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                return False

        try:
            poll_until(accepts, "postgres to accept connections", START_DEADLINE_S)
        except AssertionError:
            raise RuntimeError(f"postgres did not start; log: {self.logfile.read_text()[-2000:]}") from None


@contextmanager
def start_postgres(settings: tuple[str, ...] = ()) -> Iterator[PgServer]:
    root = Path(tempfile.mkdtemp(prefix="loreg-pg-"))
    os.chmod(root, 0o755)
    datadir, sockdir = root / "data", root / "sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockdir, "postgres")
    server = PgServer(datadir=datadir, sockdir=sockdir, port=free_port(), logfile=root / "postgres.log",
                      settings=settings)
    subprocess.run(_as_postgres(["initdb", "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                 "--no-sync"]), check=True, stdout=subprocess.DEVNULL)
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
