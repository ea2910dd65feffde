"""The CPU seconds `loreg serve` spends per GB pushed and pulled, against one sha256 pass over the
same bytes measured in the same run (issue 15, section 2).

Starts moto's S3 server and `loreg serve` (SQLite + that bucket) in their own processes on
127.0.0.1, writes --repeat synthetic r=16 adapters (--layers 40: ~200 MB float32 each), and reads
the server's CPU (user + system, /proc/<pid>/stat) around each of:
  push (API)        the bytes through the API: sha256 + value scan + parts to S3
  push (presigned)  LOREG_S3_PRESIGN_UPLOADS: parts straight to S3; the server reads the staged
                    object once (sha256 + value scan) and copies it inside S3
  pull (API)        the bytes through the API, verified again as they are sent (TESTPLAN F10)
Loopback is fine: this counts CPU, not the link. Goals: <= 1.5 CPU-s per GB pushed; per GB
pulled <= 1.3x one sha256 pass. Two floors of a push are printed beside them: a bare ASGI app on
uvicorn receiving the same bytes, and raw boto3 part uploads of them to the same S3 server.

    python bench/server_cpu.py [--layers 40] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.push_pull import base_tensors, write_adapter  # noqa: E402


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def used(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


def sha256_cpu(path: Path) -> float:
    """CPU seconds of one sha256 pass over the file's bytes (already in memory: hashing only)."""
    data = path.read_bytes()
    t0 = time.process_time()
    hashlib.sha256(data).digest()
    return time.process_time() - t0


# A bare ASGI app on uvicorn, configured as `loreg serve` configures it (h11, the allocator tuned),
# that only reads a body: what receiving the bytes costs before loreg does anything with them. It
# answers with its own CPU seconds so far (clock_gettime: nanoseconds, where /proc/<pid>/stat counts
# 10 ms ticks, too coarse for the few MB of a small run).
BARE_RECEIVER = """
import sys, time, uvicorn
from loreg.registry.allocator import tune_for_streaming
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = repr(time.process_time()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
tune_for_streaming()
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http="h11")
"""


def receive_floor(path: Path) -> float:
    """CPU seconds a bare uvicorn app spends receiving the file's bytes over HTTP (as it counts them)."""
    import httpx

    from tests.support.moto import free_port
    from tests.support.server import poll_until

    port = free_port()
    with subprocess.Popen([sys.executable, "-c", BARE_RECEIVER, str(port)]) as proc:
        try:
            poll_until(lambda: _answers(port), "the bare receiver")
            c0 = float(httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text)
            with open(path, "rb") as body:
                c1 = float(httpx.put(f"http://127.0.0.1:{port}/", content=iter(lambda: body.read(1 << 20), b""),
                                     headers={"content-length": str(path.stat().st_size)}, timeout=300).text)
            return c1 - c0
        finally:
            proc.terminate()


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def s3_send_floor(endpoint_url: str, path: Path) -> float:
    """CPU seconds this process spends sending the file to S3 as 8 MiB parts from one reused buffer
    with the store's client settings (boto3 upload_part): what handing the bytes on costs."""
    from loreg.registry.storage.s3 import S3BlobStore, _PartBody

    with S3BlobStore("bench-floor", endpoint_url=endpoint_url, region="us-east-1") as store:
        client, part = store._client, bytearray(store.part_size)
        upload = client.create_multipart_upload(Bucket="bench-floor", Key="floor")["UploadId"]
        parts, t0 = [], time.process_time()
        with open(path, "rb") as f:
            while n := f.readinto(part):
                answer = client.upload_part(Bucket="bench-floor", Key="floor", UploadId=upload,
                                            PartNumber=len(parts) + 1, Body=_PartBody(part, n))
                parts.append({"ETag": answer["ETag"], "PartNumber": len(parts) + 1})
        spent = time.process_time() - t0
        client.complete_multipart_upload(Bucket="bench-floor", Key="floor", UploadId=upload,
                                         MultipartUpload={"Parts": parts})
    return spent


def measure(
    env: dict[str, str], work: Path, adapters: list[Path], layers: int, pull: bool
) -> dict[str, list[tuple[float, float]]]:
    """Server (user, system) CPU seconds per push (and per pull) of each adapter, with one fresh server."""
    from loreg.cli.client import RegistryClient
    from tests.support.server import serving, token_for

    out: dict[str, list[tuple[float, float]]] = {"push": [], "pull": []}
    shutil.rmtree(work / "server", ignore_errors=True)
    with serving(env, work) as (url, proc):
        client = RegistryClient(url, token_for(work / "server", url))
        client.request("POST", "/v1/base-models", json={
            "name": "bench/llama-like", "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            "tensors": base_tensors(layers),
            "files": [{"path": "model.safetensors", "size": 1, "digest": "sha256:" + "0" * 64}]})
        for i, folder in enumerate(adapters):
            c0 = process_cpu(proc.pid)
            client.push(folder, "bench/adapter")
            out["push"].append(used(c0, process_cpu(proc.pid)))
            if pull:
                target = work / "pulled"
                shutil.rmtree(target, ignore_errors=True)
                shutil.rmtree(work / "client" / "cache", ignore_errors=True)
                c0 = process_cpu(proc.pid)
                client.pull(f"bench/adapter:{i + 1}", target)
                out["pull"].append(used(c0, process_cpu(proc.pid)))
        client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from tests.support.moto import fake_aws_env, make_bucket, start_moto
    from tests.support.server import env_with

    work = Path(tempfile.mkdtemp(prefix="loreg-bench-cpu-"))
    os.environ["LOREG_HOME"] = str(work / "client")
    adapters = [work / f"adapter-{i}" for i in range(args.repeat)]
    for i, folder in enumerate(adapters):
        write_adapter(folder, args.layers, seed=i)
    size = sum(p.stat().st_size for p in adapters[0].iterdir())
    gb = size / 1e9
    with fake_aws_env(), start_moto() as moto:
        results = {}
        for label, presign in (("api", False), ("presigned", True)):
            make_bucket(moto.endpoint_url, f"bench-{label}")
            env = env_with(LOREG_HOME=str(work / "server"), LOREG_STORAGE_URL=f"s3://bench-{label}/registry",
                           LOREG_S3_ENDPOINT_URL=moto.endpoint_url, LOREG_S3_REGION="us-east-1",
                           LOREG_EXPORT_WORKER="external", LOREG_S3_PRESIGN_UPLOADS=str(presign).lower())
            results[label] = measure(env, work, adapters, args.layers, pull=not presign)
        make_bucket(moto.endpoint_url, "bench-floor")
        weights = [a / "adapter_model.safetensors" for a in adapters]
        receiving = statistics.median(receive_floor(w) for w in weights) / gb
        sending = statistics.median(s3_send_floor(moto.endpoint_url, w) for w in weights) / gb
    sha = statistics.median(sha256_cpu(a / "adapter_model.safetensors") for a in adapters) / gb

    def per_gb(runs: list[tuple[float, float]]) -> tuple[float, float, float]:
        user, system = statistics.median(r[0] for r in runs) / gb, statistics.median(r[1] for r in runs) / gb
        return user + system, user, system

    print(f"adapter: {size / 1e6:.0f} MB; loreg serve + moto on 127.0.0.1; {os.cpu_count()} cpus; medians of {args.repeat}")
    print(f"one sha256 pass          {sha:5.2f} CPU-s/GB")
    rows = (("push (API)", results["api"]["push"], "goal <= 1.50 CPU-s/GB"),
            ("push (presigned, adopt)", results["presigned"]["push"], ""),
            ("pull (API)", results["api"]["pull"], "goal <= 1.30x sha256"))
    for label, runs, goal in rows:
        total, user, system = per_gb(runs)
        print(f"{label:24s} {total:5.2f} CPU-s/GB (user {user:.2f}, system {system:.2f})  "
              f"{total / sha:5.2f}x sha256   {goal}")
    print("what a push costs before loreg does anything with the bytes (same bytes, same run):")
    print(f"bare uvicorn receive     {receiving:5.2f} CPU-s/GB  (an ASGI app that only reads the body, h11, allocator tuned)")
    print(f"boto3 parts to S3        {sending:5.2f} CPU-s/GB  (8 MiB upload_part calls from one buffer, this process)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
