"""bench/push_pull.py --link leaves no network namespace or veth behind: after a run, after a
SIGTERM in the middle of one, and after a run that was SIGKILLed (the next run removes its leftovers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import shaped_link
from tests.support.server import poll_until

ROOT = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, str(ROOT / "bench" / "push_pull.py"), "--link", "1gbit", "--size-gb", "0.002", "--repeat", "1"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root")


def leftovers(pid: int) -> list[str]:
    """The bench's namespaces and root-namespace veths that carry ``pid`` in their name."""
    names = shaped_link.namespaces() + shaped_link.root_links()
    return [n for n in names if shaped_link._owner(n) == pid]


def start_bench(tmp_path: Path) -> subprocess.Popen[str]:
    # its files go under tmp_path, so that a killed run's adapters are removed with it
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.Popen(BENCH, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_run_measures_over_the_link_and_leaves_nothing(tmp_path: Path) -> None:
    proc = start_bench(tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "ratio push/raw upload throughput" in out and "loreg serve CPU per GB" in out, out
    assert leftovers(proc.pid) == []


def test_sigterm_mid_run_removes_the_namespaces(tmp_path: Path) -> None:
    proc = start_bench(tmp_path)
    try:
        # the client namespace exists once the link is up; stop the bench while it is in use
        poll_until(lambda: len(leftovers(proc.pid)) == 2 or proc.poll() is not None, "the bench's namespaces")
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert leftovers(proc.pid) == []


def test_a_killed_runs_leftovers_are_removed_by_the_next_run(tmp_path: Path) -> None:
    proc = start_bench(tmp_path)
    try:
        poll_until(lambda: len(leftovers(proc.pid)) == 2 or proc.poll() is not None, "the bench's namespaces")
        assert proc.poll() is None, proc.communicate()[0]
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    stale = leftovers(proc.pid)
    assert stale, "a SIGKILLed run cannot clean up: this test needs its leftovers"
    removed = shaped_link.remove_stale()
    assert set(stale) <= set(removed)
    assert leftovers(proc.pid) == []
