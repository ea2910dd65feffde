"""The counters bench/server_cpu.py reads: a process's CPU seconds from /proc/<pid>/stat agree with
what the process reports of itself, and the bench runs end to end on a small adapter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.server_cpu import process_cpu, used

ROOT = Path(__file__).resolve().parents[2]

SPIN = """
import hashlib, os, sys
data = bytes(1 << 20)
for _ in range(int(sys.argv[1])):
    hashlib.sha256(data).digest()
t = os.times()
print(t.user, t.system, flush=True)
sys.stdin.readline()
"""


def test_process_cpu_agrees_with_the_process_own_count() -> None:
    with subprocess.Popen([sys.executable, "-c", SPIN, "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:
        assert child.stdout is not None and child.stdin is not None
        user, system = map(float, child.stdout.readline().split())
        seen = process_cpu(child.pid)  # the child waits on stdin: its counters stand still
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(60)
    tick = 0.02  # two clock ticks of rounding between the two readings
    assert abs(seen[0] - user) <= tick and abs(seen[1] - system) <= tick, (seen, user, system)
    assert seen[0] + seen[1] > 0.05  # 300 MiB hashed: the counter moved
    assert used((1.0, 0.5), (3.0, 0.75)) == (2.0, 0.25)


def test_the_bench_prints_each_path_cost_per_gb(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "server_cpu.py"), "--layers", "2", "--repeat", "1"],
                          cwd=ROOT, env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(\S.*?)\s+([0-9.]+) CPU-s/GB", done.stdout, re.M)}
    assert set(rows) == {"one sha256 pass", "push (API)", "push (presigned, adopt)", "pull (API)",
                         "bare uvicorn receive", "boto3 parts to S3"}, done.stdout
    assert all(value > 0 for value in rows.values()), rows
