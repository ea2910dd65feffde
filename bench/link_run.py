"""`bench/push_pull.py --link RATE`: push and pull against raw boto3 over a shaped link (see push_pull.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.push_pull import base_tensors, process_cpu, write_adapter
from bench.shaped_link import SERVER_ADDR, ShapedLink, shaped_link

LOREG = str(Path(sys.executable).with_name("loreg"))
MOTO_PORT, LOREG_PORT = 9000, 8080
START_DEADLINE_S = 60.0
RUN_DEADLINE_S = 1800
BYTES_PER_LAYER_RANK = 78080 * 4  # float32 A and B of the 7 llama-like modules of one layer, per unit of r

RAW_UP = """
import sys, boto3
endpoint, path, key = sys.argv[1:4]
boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").upload_file(path, "bench", key)
"""
RAW_DOWN = """
import sys, boto3
endpoint, key, target = sys.argv[1:4]
body = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").get_object(Bucket="bench", Key=key)["Body"]
with open(target, "wb") as f:
    for chunk in body.iter_chunks(1 << 20):
        f.write(chunk)
"""


def adapter_shape(size_gb: float) -> tuple[int, int]:
    """(layers, r) of a llama-like float32 adapter of about ``size_gb``: 32 layers with r grown to
    fit, or fewer layers at r=1 for a tiny one."""
    units = max(1, round(size_gb * 1e9 / BYTES_PER_LAYER_RANK))
    if units <= 32:
        return units, 1
    return 32, max(1, round(units / 32))


def _poll(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer within {START_DEADLINE_S:.0f} s: {log.read_text()[-3000:]}")


def _start(argv: list[str], env: dict[str, str], cwd: Path, name: str, health: str) -> subprocess.Popen[bytes]:
    log = cwd / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    _poll(health, proc, name, log)
    return proc


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def _sha256_cpu(path: Path) -> float:
    """CPU seconds of one sha256 pass over ``path`` (in the page cache) in this process."""
    h = hashlib.sha256()
    c0 = time.process_time()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return time.process_time() - c0


class LinkBench:
    """Servers on the far side of ``link``, the timed commands on the client side."""

    def __init__(self, link: ShapedLink, work: Path, env: dict[str, str]) -> None:
        self.link, self.work, self.env = link, work, env
        self.endpoint = f"http://{SERVER_ADDR}:{MOTO_PORT}"
        self.url = f"http://{SERVER_ADDR}:{LOREG_PORT}"
        self.moto: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.client_env: dict[str, str] = {}
        self.times: dict[str, list[float]] = {}
        self.profile_dir: Path | None = None
        self.server_cpu: dict[str, list[float]] = {}

    def start(self, layers: int) -> None:
        from loreg.cli.client import RegistryClient
        from tests.support.moto import s3_client

        self.moto = _start([sys.executable, "-m", "moto.server", "-H", SERVER_ADDR, "-p", str(MOTO_PORT)],
                           self.env, self.work, "moto", f"{self.endpoint}/moto-api/")
        s3_client(self.endpoint).create_bucket(Bucket="bench")
        server_env = {**self.env, "LOREG_HOME": str(self.work / "server"), "LOREG_STORAGE_URL": "s3://bench/registry",
                      "LOREG_S3_ENDPOINT_URL": self.endpoint, "LOREG_S3_REGION": "us-east-1",
                      "LOREG_EXPORT_WORKER": "external"}
        serve = [LOREG, "serve", "--host", SERVER_ADDR, "--port", str(LOREG_PORT), "--log-level", "warning"]
        self.server = _start(serve, server_env, self.work, "serve", f"{self.url}/v1/health")
        token = str(json.loads((self.work / "server" / "credentials.json").read_text())[self.url])
        self.client_env = {**self.env, "LOREG_HOME": str(self.work / "client"), "LOREG_URL": self.url,
                           "LOREG_TOKEN": token}
        with RegistryClient(self.url, token) as client:
            client.request("POST", "/v1/base-models", json={
                "name": "bench/llama-like", "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                "tensors": base_tensors(layers),
                "files": [{"path": "model.safetensors", "size": 1, "digest": "sha256:" + "0" * 64}]})

    def stop(self) -> None:
        _stop(self.server)
        _stop(self.moto)

    def timed(self, key: str, argv: list[str], env: dict[str, str]) -> str:
        """Run ``argv`` in the client namespace; keep its wall time and `loreg serve`'s CPU meanwhile."""
        pid = self.server.pid if self.server else None
        c0 = process_cpu(pid)
        t0 = time.perf_counter()
        done = subprocess.run(self.link.client_cmd(*argv), env=env, cwd=self.work, capture_output=True, text=True,
                              timeout=RUN_DEADLINE_S)
        self.times.setdefault(key, []).append(time.perf_counter() - t0)
        self.server_cpu.setdefault(key, []).append(process_cpu(pid) - c0)
        print(f"  {key:8s} {self.times[key][-1]:7.2f} s, loreg serve cpu {self.server_cpu[key][-1]:.2f} s",
              file=sys.stderr, flush=True)
        if done.returncode:
            raise RuntimeError(f"{key}: {' '.join(argv[:3])} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def loreg(self, key: str, i: int, *args: str) -> list[str]:
        """The `loreg` command, under cProfile (one file per run in --profile DIR) when asked."""
        if self.profile_dir is None:
            return [LOREG, *args]
        return [sys.executable, "-m", "cProfile", "-o", str(self.profile_dir / f"{key}-{i}.prof"), LOREG, *args]

    def round(self, i: int, folder: Path, size: int) -> None:
        """One interleaved round: raw upload, loreg push, raw download, loreg pull."""
        st = folder / "adapter_model.safetensors"
        py = sys.executable
        self.timed("raw_up", [py, "-c", RAW_UP, self.endpoint, str(st), f"raw/{i}"], self.env)
        pushed = json.loads(self.timed("push", self.loreg("push", i, "push", str(folder), "bench/adapter", "--json"),
                                       self.client_env))
        assert pushed["version"] == i + 1 and pushed["bytes_uploaded"] >= size, pushed
        target, pulled = self.work / "raw-download", self.work / "pulled"
        # each download writes into memory freed just before it (see push_pull.py's docstring)
        _fresh(target)
        self.timed("raw_down", [py, "-c", RAW_DOWN, self.endpoint, f"raw/{i}", str(target)], self.env)
        if target.stat().st_size != st.stat().st_size:
            raise RuntimeError("raw download is short")
        _fresh(target, pulled, self.work / "client" / "cache")
        out = json.loads(self.timed("pull", self.loreg("pull", i, "pull", f"bench/adapter:{i + 1}", "-o", str(pulled),
                                                       "--json"), self.client_env))
        assert out["bytes_downloaded"] >= size, out
        _fresh(pulled, self.work / "client" / "cache")


def _fresh(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_link(rate: str, size_gb: float, repeat: int, delay_ms: float, profile: Path | None = None) -> None:
    from tests.support.moto import FAKE_AWS_ENV, UNSET_AWS_ENV

    if os.geteuid() != 0:
        raise SystemExit("--link needs root (it creates network namespaces)")
    layers, r = adapter_shape(size_gb)
    work = Path(tempfile.mkdtemp(prefix="loreg-bench-link-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOREG_") and k not in UNSET_AWS_ENV}
    env.update(FAKE_AWS_ENV, HF_HUB_OFFLINE="1")
    try:
        adapters = [work / f"adapter-{i}" for i in range(repeat)]
        for i, folder in enumerate(adapters):
            write_adapter(folder, layers, r=r, seed=i)
        size = (adapters[0] / "adapter_model.safetensors").stat().st_size
        sha_cpu = statistics.median(_sha256_cpu(f / "adapter_model.safetensors") for f in adapters)
        with shaped_link(rate, delay_ms) as link:
            link.enter_server_side()
            bench = LinkBench(link, work, env)
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                bench.profile_dir = profile.resolve()
            try:
                bench.start(layers)
                for i, folder in enumerate(adapters):
                    bench.round(i, folder, size)
            finally:
                bench.stop()
        report(rate, link.delay_note, layers, r, size, repeat, bench, sha_cpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    rate: str, delay: str, layers: int, r: int, size: int, repeat: int, bench: LinkBench, sha_cpu: float
) -> None:
    m = {k: statistics.median(v) for k, v in bench.times.items()}
    gb, mb = size / 1e9, size / 1e6
    print(f"link: {rate} veth between two network namespaces (tc tbf), {delay}; client in its own namespace, "
          f"loreg serve + moto S3 on the far side; {os.cpu_count()} cpus")
    print(f"adapter: {mb:.0f} MB ({layers} layers x 7 modules, r={r}, float32); medians of {repeat} interleaved runs; "
          f"each side a command started in the client namespace (process start included)")
    for label, key in (("raw boto3 upload_file", "raw_up"), ("loreg push", "push"),
                       ("raw get_object stream", "raw_down"), ("loreg pull (via API)", "pull")):
        runs = " ".join(f"{t:.2f}" for t in bench.times[key])
        cpu = statistics.median(bench.server_cpu[key])
        print(f"{label:24s} {m[key]:7.2f} s {mb / m[key]:7.1f} MB/s   (runs: {runs}; loreg serve cpu {cpu:.2f} s)")
    print(f"ratio push/raw upload throughput:   {m['raw_up'] / m['push']:.2f}   (goal >= 0.9 at 1gbit)")
    print(f"ratio pull/raw download throughput: {m['raw_down'] / m['pull']:.2f}   (goal >= 0.9 at 1gbit)")
    push_cpu = statistics.median(bench.server_cpu["push"]) / gb
    pull_cpu = statistics.median(bench.server_cpu["pull"]) / gb
    sha = sha_cpu / gb
    print(f"loreg serve CPU per GB: pushed {push_cpu:.2f} s (goal <= 1.5), pulled {pull_cpu:.2f} s "
          f"= {pull_cpu / sha:.2f}x one sha256 pass ({sha:.2f} s per GB here; goal <= 1.3x)")
