"""Push and pull throughput against raw boto3 on the same S3 endpoint, measured in the same run.

Starts moto's S3 server on 127.0.0.1 and `loreg serve` in its own process (SQLite + that bucket),
registers a synthetic llama-like base (headers only), writes --repeat synthetic r=16 all-linear
adapters (~160 MB float32 each, different bytes), then, --repeat times each, interleaved:
  raw upload    boto3 upload_file of an adapter file to the bucket
  loreg push    hash, blobs:check, upload through the API, commit (strict parse, value scan, validation)
  raw download  streamed get_object of that object to a file (and again hashing it: context)
  loreg pull    resolve, download through the API with verification, into a fresh folder; then the
                same with presigned direct downloads from S3 (DESIGN §7, LOREG_S3_PRESIGN_DOWNLOADS)
  re-push       the same folder again: bytes uploaded (goal 0)
and prints the median of each, the CPU seconds each process used for it (this process, `loreg serve`,
moto), and push/raw and pull/raw throughput ratios (goal >= 0.8).

Every timed download first deletes the previous one's output (and a pull its cache entry), so each
writes into memory freed just before: on a VM that hands freed memory back to its host (virtio-balloon
free page reporting), memory untouched for a few seconds costs a host fault per page, ~2.5 ms per MB
here, which would otherwise decide which side looks faster.

Those loopback figures are CPU-bound: on a small machine the bench, `loreg serve` and moto share the
cores, and what they measure is who gets the CPU, not a transfer.

--link RATE (1gbit, 200mbit) measures what users feel instead: the client in its own network
namespace, `loreg serve` and the S3 server (moto) in another, joined by a veth pair shaped with tc
(bench/shaped_link.py). Both sides are timed the same way, as commands started in the client
namespace: raw boto3 upload_file / streamed get_object as their own Python process, loreg as the
`loreg push` / `loreg pull` command; interleaved, medians of --repeat runs, on a --size-gb adapter
(1 GB by default, so that process starts do not decide the ratio). It also prints the CPU seconds
`loreg serve` spent per GB pushed and pulled (/proc/<pid>/stat), next to one sha256 pass over the
same bytes in this process. Needs root; the namespaces are removed on exit, SIGTERM, SIGHUP and
Ctrl-C, and a later run removes what a killed one left.

    python bench/push_pull.py [--layers 32] [--repeat 3]
    python bench/push_pull.py --link 1gbit [--size-gb 1] [--repeat 3] [--delay-ms 1] [--profile DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, INTER = 4096, 11008
TARGETS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def base_tensors(layers: int) -> list[dict]:
    out = []
    for i in range(layers):
        for leaf, (o, n) in TARGETS.items():
            group = "mlp" if leaf in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{i}.{group}.{leaf}.weight"
            out.append({"name": name, "dtype": "BF16", "shape": [o, n], "file": "model.safetensors",
                        "digest": "sha256:" + hashlib.sha256(name.encode()).hexdigest()})
    return out


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_adapter(folder: Path, layers: int, r: int = 16, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for leaf, (o, n) in TARGETS.items():
            group = "mlp" if leaf in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{i}.{group}.{leaf}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, n), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((o, r), dtype=np.float32) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": list(TARGETS), "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "bench/llama-like", "bias": "none"}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--link", default=None, metavar="RATE",
                    help="shaped link (e.g. 1gbit, 200mbit) instead of loopback")
    ap.add_argument("--size-gb", type=float, default=1.0, help="adapter size with --link")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="added one-way delay with --link (netem)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="with --link: run the loreg commands under cProfile, one .prof per run in DIR")
    args = ap.parse_args()
    if args.link:
        from bench.link_run import run_link

        run_link(args.link, args.size_gb, args.repeat, args.delay_ms, args.profile)
        return
    loopback(args.layers, args.repeat)


def loopback(layers: int, repeat: int) -> None:
    """The loopback figures (CPU-bound, see the module's docstring)."""
    import boto3

    from loreg.cli.client import RegistryClient
    from tests.support.moto import fake_aws_env, make_bucket, start_moto
    from tests.support.server import env_with, serving, token_for

    work = Path(tempfile.mkdtemp(prefix="loreg-bench-pp-"))
    os.environ["LOREG_HOME"] = str(work / "client")
    cache = work / "client" / "cache"
    keys = ("raw_up", "push", "raw_down", "raw_down_sha", "pull", "direct")
    times: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[tuple[float, float, float]]] = {k: [] for k in keys}  # (bench, loreg serve, moto)
    pids: dict[str, int] = {}

    def cpu_now() -> tuple[float, float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        return (me.ru_utime + me.ru_stime, process_cpu(pids.get("server")), process_cpu(pids.get("moto")))

    def timed(key: str, fn: Any) -> Any:
        c0 = cpu_now()
        t0 = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - t0)
        cpu[key].append(tuple(b - a for a, b in zip(c0, cpu_now(), strict=True)))  # type: ignore[arg-type]
        return out

    def fresh(*paths: Path) -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    with fake_aws_env(), start_moto() as moto:
        pids["moto"] = moto.process.pid
        make_bucket(moto.endpoint_url, "bench")
        server_env = env_with(LOREG_HOME=str(work / "server"), LOREG_STORAGE_URL="s3://bench/registry",
                              LOREG_S3_ENDPOINT_URL=moto.endpoint_url, LOREG_S3_REGION="us-east-1",
                              LOREG_EXPORT_WORKER="external")
        adapters = [work / f"adapter-{i}" for i in range(repeat)]
        for i, folder in enumerate(adapters):
            write_adapter(folder, layers, seed=i)
            (folder / "adapter_model.safetensors").read_bytes()  # in the page cache, as for both sides
        size = (adapters[0] / "adapter_model.safetensors").stat().st_size
        s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")

        def raw_download(key: str, target: Path, verify: bool) -> None:
            body = s3.get_object(Bucket="bench", Key=key)["Body"]
            h = hashlib.sha256()
            with open(target, "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    if verify:
                        h.update(chunk)
                    f.write(chunk)

        # `loreg serve` in its own process, as in production (S3 + SQLite)
        with serving(server_env, work) as (url, proc):
            pids["server"] = proc.pid
            client = RegistryClient(url, token_for(work / "server", url))
            client.request("POST", "/v1/base-models", json={
                "name": "bench/llama-like", "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                "tensors": base_tensors(layers),
                "files": [{"path": "model.safetensors", "size": 1, "digest": "sha256:" + "0" * 64}]})
            for i, folder in enumerate(adapters):
                st = folder / "adapter_model.safetensors"
                timed("raw_up", lambda: s3.upload_file(str(st), "bench", f"raw/{i}"))
                pushed = timed("push", lambda: client.push(folder, "bench/adapter"))
                assert pushed["version"] == i + 1 and pushed["bytes_uploaded"] >= size
            t0 = time.perf_counter()
            again = client.push(adapters[-1], "bench/adapter")
            t_repush = time.perf_counter() - t0
            for i in range(repeat):
                fresh(work / "raw-download")
                timed("raw_down", lambda: raw_download(f"raw/{i}", work / "raw-download", False))
                fresh(work / "raw-download")
                timed("raw_down_sha", lambda: raw_download(f"raw/{i}", work / "raw-download", True))
                fresh(work / "raw-download", work / "pulled", cache)
                timed("pull", lambda: client.pull(f"bench/adapter:{i + 1}", work / "pulled"))
            client.close()
        with serving({**server_env, "LOREG_S3_PRESIGN_DOWNLOADS": "true"}, work) as (url, proc):
            pids["server"] = proc.pid
            client = RegistryClient(url, token_for(work / "server", url))
            for i in range(repeat):
                fresh(work / "raw-download")
                timed("raw_down", lambda: raw_download(f"raw/{i}", work / "raw-download", False))
                fresh(work / "raw-download", work / "pulled", cache)
                timed("direct", lambda: client.pull(f"bench/adapter:{i + 1}", work / "pulled"))
            client.close()

        m = {k: statistics.median(v) for k, v in times.items()}
        mb = size / 1e6

        def line(label: str, key: str, note: str = "") -> None:
            runs = " ".join(f"{t:.2f}" for t in times[key])
            used = [statistics.median(c[i] for c in cpu[key]) for i in range(3)]
            print(f"{label:24s} {m[key]:6.2f} s {mb / m[key]:7.1f} MB/s   (runs: {runs}; cpu s: client {used[0]:.2f}, "
                  f"server {used[1]:.2f}, moto {used[2]:.2f}){note}")

        print("loopback, CPU-bound (the bench, loreg serve and moto share the cores; see --link for a network)")
        print(f"adapter: {mb:.0f} MB ({layers} layers x 7 modules, r=16, float32); S3 = moto on 127.0.0.1; "
              f"loreg serve in its own process; {os.cpu_count()} cpus; medians of {repeat} runs (raw download: "
              f"{len(times['raw_down'])})")
        line("raw boto3 upload_file", "raw_up")
        line("loreg push", "push")
        line("raw get_object stream", "raw_down")
        line("raw get_object + sha256", "raw_down_sha", "   context: the baseline verifies nothing")
        line("loreg pull (via API)", "pull")
        line("loreg pull (presigned)", "direct", "   LOREG_S3_PRESIGN_DOWNLOADS=true")
        print(f"re-push                  {t_repush:6.2f} s, bytes uploaded: {again['bytes_uploaded']} "
              f"(created: {again['created']})")
        print(f"ratio push/raw upload throughput:   {m['raw_up'] / m['push']:.2f}   (goal >= 0.8)")
        print(f"ratio pull/raw download throughput: {m['raw_down'] / m['direct']:.2f} presigned, "
              f"{m['raw_down'] / m['pull']:.2f} via the API   (goal >= 0.8)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
