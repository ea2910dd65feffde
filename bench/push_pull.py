"""Push and pull throughput against raw boto3 on the same S3 endpoint, measured in the same run.

Starts moto's S3 server on 127.0.0.1 and `loreg serve` in its own process (SQLite + that bucket),
registers a synthetic llama-like base (headers only), writes a synthetic r=16 all-linear adapter
(~160 MB float32), then times:
  raw upload    boto3 upload_file of the adapter file to the bucket
  loreg push    hash, blobs:check, upload through the API, commit (strict parse, value scan, validation)
  raw download  streamed get_object of that object to a file
  loreg pull    resolve, download through the API with verification, into a fresh folder;
                then again with presigned direct downloads from S3 (DESIGN §7)
  re-push       the same folder again: bytes uploaded (goal 0)
and prints push/raw and pull/raw throughput ratios (goal >= 0.8).

    python bench/push_pull.py [--layers 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

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


def write_adapter(folder: Path, layers: int, r: int = 16) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
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
    args = ap.parse_args()

    import boto3

    from loreg.cli.client import RegistryClient
    from tests.support.moto import fake_aws_env, make_bucket, start_moto
    from tests.support.server import env_with, serving, token_for

    work = Path(tempfile.mkdtemp(prefix="loreg-bench-pp-"))
    os.environ["LOREG_HOME"] = str(work / "client")
    with fake_aws_env(), start_moto() as moto:
        make_bucket(moto.endpoint_url, "bench")
        server_env = env_with(LOREG_HOME=str(work / "server"), LOREG_STORAGE_URL="s3://bench/registry",
                              LOREG_S3_ENDPOINT_URL=moto.endpoint_url, LOREG_S3_REGION="us-east-1",
                              LOREG_EXPORT_WORKER="external")
        adapter = work / "adapter"
        write_adapter(adapter, args.layers)
        st = adapter / "adapter_model.safetensors"
        size = st.stat().st_size
        s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
        st.read_bytes()  # warm the page cache

        # `loreg serve` in its own process, as in production (S3 + SQLite)
        with serving(server_env, work) as (url, _proc):
            client = RegistryClient(url, token_for(work / "server", url))
            client.request("POST", "/v1/base-models", json={
                "name": "bench/llama-like", "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                "tensors": base_tensors(args.layers),
                "files": [{"path": "model.safetensors", "size": 1, "digest": "sha256:" + "0" * 64}]})
            t0 = time.perf_counter()
            s3.upload_file(str(st), "bench", "raw/adapter.safetensors")
            t_raw_up = time.perf_counter() - t0
            t0 = time.perf_counter()
            pushed = client.push(adapter, "bench/adapter")
            t_push = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = client.push(adapter, "bench/adapter")
            t_repush = time.perf_counter() - t0

            t0 = time.perf_counter()
            body = s3.get_object(Bucket="bench", Key="raw/adapter.safetensors")["Body"]
            with open(work / "raw-download", "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    f.write(chunk)
            t_raw_down = time.perf_counter() - t0
            t0 = time.perf_counter()
            body = s3.get_object(Bucket="bench", Key="raw/adapter.safetensors")["Body"]
            h = hashlib.sha256()
            with open(work / "raw-download-verified", "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
            t_raw_down_verified = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.pull("bench/adapter:1", work / "pulled")
            t_pull = time.perf_counter() - t0
            client.close()
        shutil.rmtree(work / "client" / "cache")
        with serving({**server_env, "LOREG_S3_PRESIGN_DOWNLOADS": "true"}, work) as (url, _proc):
            client = RegistryClient(url, token_for(work / "server", url))
            t0 = time.perf_counter()
            client.pull("bench/adapter:1", work / "pulled-direct")
            t_pull_direct = time.perf_counter() - t0
            client.close()

        mb = size / 1e6
        print(f"adapter: {mb:.0f} MB ({args.layers} layers x 7 modules, r=16, float32); S3 = moto on 127.0.0.1; "
              f"loreg serve in its own process; {os.cpu_count()} cpus")
        print(f"raw boto3 upload_file  {t_raw_up:6.2f} s {mb / t_raw_up:7.1f} MB/s")
        print(f"loreg push             {t_push:6.2f} s {mb / t_push:7.1f} MB/s   (version {pushed['version']})")
        print(f"raw get_object stream  {t_raw_down:6.2f} s {mb / t_raw_down:7.1f} MB/s")
        print(f"raw get_object + sha256 {t_raw_down_verified:5.2f} s {mb / t_raw_down_verified:7.1f} MB/s   (context: the baseline verifies nothing)")
        print(f"loreg pull (via API)   {t_pull:6.2f} s {mb / t_pull:7.1f} MB/s")
        print(f"loreg pull (presigned) {t_pull_direct:6.2f} s {mb / t_pull_direct:7.1f} MB/s   (LOREG_S3_PRESIGN_DOWNLOADS=true)")
        print(f"re-push                {t_repush:6.2f} s, bytes uploaded: {again['bytes_uploaded']} (created: {again['created']})")
        print(f"ratio push/raw upload throughput:   {t_raw_up / t_push:.2f}   (goal >= 0.8)")
        print(f"ratio pull/raw download throughput: {t_raw_down / t_pull:.2f} via the API, "
              f"{t_raw_down / t_pull_direct:.2f} presigned   (goal >= 0.8)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
