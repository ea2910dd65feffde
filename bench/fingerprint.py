"""Base-model fingerprint throughput: `loreg base register`'s checkpoint scan vs `sha256sum`.

Builds a synthetic sharded checkpoint (random bytes as BF16 tensors, llama-like names), warms the
page cache, then times, on the same files:
  baseline  sha256sum over every shard (one process, as a user would check files)
  loreg     scan_checkpoint: strict headers + file digest + one digest per tensor, files in parallel
and prints the throughput ratio loreg / sha256sum (> 1 means loreg is faster).

    python bench/fingerprint.py [--size-mb 1024] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def build(root: Path, size_mb: int, shards: int) -> None:
    rng = np.random.default_rng(0)
    per_shard = size_mb * 1024 * 1024 // shards
    tensor_bytes = 16 * 1024 * 1024
    index: dict[str, str] = {}
    n = 0
    for s in range(shards):
        tensors = {}
        left = per_shard
        while left > 0:
            nbytes = min(tensor_bytes, left)
            rows = nbytes // (2 * 1024)
            tensors[f"model.layers.{n}.mlp.up_proj.weight"] = rng.integers(0, 2**16, size=(rows, 1024), dtype=np.uint16)
            n += 1
            left -= rows * 2 * 1024
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    from loreg.cli.checkpoint import scan_checkpoint

    root = Path(tempfile.mkdtemp(prefix="loreg-bench-fp-"))
    try:
        build(root, args.size_mb, args.shards)
        files = sorted(str(p) for p in root.glob("*.safetensors"))
        total = sum(os.path.getsize(f) for f in files)
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", *files], stdout=subprocess.DEVNULL, check=True)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt = scan_checkpoint(root)
        t_loreg = time.perf_counter() - t0
        mb = total / 1e6
        print(f"checkpoint: {mb:.0f} MB in {len(files)} shards, {len(ckpt.tensors)} tensors, {os.cpu_count()} cpus")
        print(f"sha256sum:        {t_base:6.2f} s  {mb / t_base:7.0f} MB/s")
        print(f"loreg fingerprint:{t_loreg:6.2f} s  {mb / t_loreg:7.0f} MB/s  (file + per-tensor digests)")
        print(f"ratio loreg/sha256sum throughput: {t_base / t_loreg:.2f}")
        print(f"weights_digest {ckpt.weights_digest}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
