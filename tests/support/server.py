"""Servers for tests that need real HTTP: `loreg serve` as a subprocess (to SIGKILL it, crash it,
or measure its memory), and an app served by uvicorn in a thread of the test process.

Everything waits by polling with a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support.moto import free_port

LOREG = str(Path(sys.executable).with_name("loreg"))
START_DEADLINE_S = 60.0
DEADLINE_S = 60.0


def env_with(**values: str) -> dict[str, str]:
    """This process's environment without any LOREG_* variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOREG_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(values)
    return env


def loreg(*args: str | Path, env: dict[str, str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `loreg` CLI to completion (120 s at most)."""
    done = subprocess.run([LOREG, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"loreg {args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def poll_until(condition: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Call ``condition`` until it returns something true (returned), failing after ``deadline_s``.

    The one place tests wait: a short pause between checks of a condition, never a sleep that hopes
    something has happened by then."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(0.02)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serving(env: dict[str, str], cwd: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`loreg serve` on a free port with ``env``; yields (url, process) once /v1/health answers.

    The process is always ended on exit (terminate, then kill); its output goes to
    ``cwd/serve-<port>.log``, quoted when it dies before answering. ``args``: more `loreg serve` options.
    """
    port = free_port()
    log_path = cwd / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([LOREG, "serve", "--port", str(port), "--log-level", "warning", *args], env=env, cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"loreg serve exited {proc.returncode}: {log_path.read_text()[-3000:]}")
        return _answers(url)

    try:
        poll_until(up, "loreg serve to answer", START_DEADLINE_S)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(timeout=30)


def token_for(home: Path, url: str) -> str:
    """The admin token `loreg serve` (embedded default) wrote for its URL into LOREG_HOME."""
    return str(json.loads((home / "credentials.json").read_text())[url])


def minor_faults(pid: int) -> int:
    """Page faults a process has taken that needed no disk read (a fresh page zeroed, mostly)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextmanager
def serve_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 in a daemon thread of this process; yields its URL."""
    import uvicorn

    port = free_port()
    options: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "warning", "lifespan": "off"}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        return bool(server.started)

    poll_until(started, "uvicorn to start", START_DEADLINE_S)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
