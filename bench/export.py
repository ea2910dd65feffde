"""Export (merge) time and memory against `cp` + `sync` of the same base files, and against PEFT, in the same run.

Builds a synthetic bf16 LLaMA checkpoint that transformers loads (LlamaForCausalLM: hidden 2048,
intermediate 5504, 16 heads, untied lm_head, as many layers as reach --size-gb; random bf16 values,
~1 GB shards + model.safetensors.index.json + config.json) and an all-linear r=16 float32 adapter
(q/k/v/o/gate/up/down of every layer), starts loreg's API in-process (uvicorn thread, embedded
default: SQLite + local blob folder, no in-process worker), registers the base with --upload-weights
and pushes the adapter, then times:
  cp + sync      the base's shard files copied to a new folder, then `sync`; cold (page cache of the
                 sources dropped with posix_fadvise DONTNEED after a sync) and warm
  loreg merge    ExportWorker.run_once() on a queued export, in a child process: claim, headers,
                 validation, streaming merge, index, result blobs stored (fsynced) and committed;
                 cold (stored base and adapter blobs dropped from the page cache) and warm (a second,
                 different request: weight 0.5, so it is not answered from the stored result);
                 peak RSS of that child (ru_maxrss) and the part of it above the RSS after imports
  PEFT           in a child process: AutoModelForCausalLM.from_pretrained (bf16) + PeftModel.from_pretrained
                 + merge_and_unload + save_pretrained (+ sync, as loreg's stored blobs are fsynced), warm
  end to end     RegistryClient.export(...) -o DIR (what `loreg export` runs) with the in-process worker
                 pool `loreg serve` uses: request + merge + store + download, warm (weight 0.25)
and prints merge/(cp+sync) cold (goal <= 1.10) and warm (goal <= 1.15), peak RSS (goal <= 512 MB),
PEFT/loreg (goal >= 5) and end-to-end/(cp+sync). It reports; it asserts nothing.

Every timed section starts after `sync` and the same pause (--settle-s): on a VM that hands freed
memory back to its host (virtio-balloon free page reporting, as on the firecracker dev machines),
memory freed a few seconds earlier costs ~1 s/GB to touch again, so without the pause whichever
section happens to run right after another one's memory was freed looks faster.

    python bench/export.py [--size-gb 2] [--shard-gb 1] [--no-peft]    (--size-gb 0.2: a quick smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HIDDEN, INTER, HEADS = 2048, 5504, 16
BASE_NAME = "bench/llama-synth"
ADAPTER = "bench/export-adapter"
R, ALPHA = 16, 32
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}
MB = 1e6


# ------------------------------------------------------------------------------------------------
# synthetic checkpoint and adapter


def llama_tensors(layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """LlamaForCausalLM's state dict names and shapes, in the order save_pretrained writes them."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", (HIDDEN,)))
        out += [(f"{p}.mlp.{m}.weight", SHAPES[m]) for m in sorted(MLP)]
        out.append((f"{p}.post_attention_layernorm.weight", (HIDDEN,)))
        out += [(f"{p}.self_attn.{m}.weight", SHAPES[m]) for m in sorted(ATTN)]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]
    return out


def sizing(size_gb: float) -> tuple[int, int]:
    """(layers, vocab) whose bf16 checkpoint comes closest to size_gb (a smaller vocabulary below 1 GB)."""
    vocab = 32000 if size_gb >= 1 else 4096
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * INTER * HIDDEN + 2 * HIDDEN)
    fixed = 2 * (2 * vocab * HIDDEN + HIDDEN)
    return max(1, round((size_gb * 1e9 - fixed) / per_layer)), vocab


def _random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits &= 0x80FF  # keep the sign, the lowest exponent bit and the mantissa ...
    bits |= 0x3C00  # ... in exponent 120-121: finite values of magnitude 2^-7 .. 2^-5
    return bits


def write_base(root: Path, layers: int, vocab: int, shard_bytes: int) -> list[Path]:
    """Sharded like save_pretrained(max_shard_size): a shard closes before the tensor that would overflow it."""
    rng = np.random.default_rng(0)
    tensors = llama_tensors(layers, vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    root.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    files = []
    total = 0
    for s, members in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in members:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(root / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape in members:
                n = int(np.prod(shape))
                if name.endswith("norm.weight"):
                    f.write(np.full(n, 0x3F80, dtype=np.uint16).tobytes())  # 1.0
                else:
                    f.write(_random_bf16(rng, n).data)
        total += offset
        files.append(root / fname)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS, "vocab_size": vocab, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }, indent=2))
    return files


def write_adapter(folder: Path, layers: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(layers):
        for leaf in ATTN + MLP:
            group = "mlp" if leaf in MLP else "self_attn"
            out_f, in_f = SHAPES[leaf]
            prefix = f"base_model.model.model.layers.{i}.{group}.{leaf}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((R, in_f), dtype=np.float32) / np.sqrt(in_f)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, R), dtype=np.float32) * 1e-3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(ATTN + MLP), "bias": "none", "base_model_name_or_path": BASE_NAME,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, indent=2))


# ------------------------------------------------------------------------------------------------
# measuring


def drop_cache(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only: sync first)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths: list[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def settle(seconds: float) -> None:
    """Flush dirty pages, then let the machine reach the same memory state before every timed section."""
    os.sync()
    time.sleep(seconds)


def cp_sync(sources: list[Path], dest: Path, pause: float) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    settle(pause)
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, sources), str(dest)], check=True)
    subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(dest)
    return elapsed


def rss_now_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_child(home: str, work_dir: str, pause: str) -> None:
    """Run one queued export in this (fresh) process; print its time breakdown and memory as JSON."""
    import torch  # noqa: F401 - imported before the RSS baseline: the merge's own memory is what is measured

    from loreg.registry.merge import engine, worker
    from loreg.registry.services.context import open_registry
    from loreg.registry.settings import Settings

    registry = open_registry(Settings(home=Path(home), export_worker="external", work_dir=Path(work_dir)))
    w = worker.ExportWorker(registry, device="cpu")
    times = {"engine_s": 0.0, "put_s": 0.0}
    merge_to_dir, put_file = engine.merge_to_dir, registry.store.put_file

    def timed_merge(*a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return merge_to_dir(*a, **k)
        finally:
            times["engine_s"] += time.perf_counter() - t

    def timed_put(*a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return put_file(*a, **k)
        finally:
            times["put_s"] += time.perf_counter() - t

    engine.merge_to_dir = timed_merge
    registry.store.put_file = timed_put  # type: ignore[method-assign]
    rss_imports = rss_now_kb()
    settle(float(pause))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    job = w.run_once()
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    registry.close()
    print(json.dumps({"job": job, "run_s": elapsed, "peak_kb": r1.ru_maxrss, "rss_imports_kb": rss_imports,
                      "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                      "minflt": r1.ru_minflt - r0.ru_minflt, **times}))


def peft_child(base: str, adapter: str, out: str, pause: str) -> None:
    """PEFT's way: load the base, apply the adapter, merge_and_unload, save_pretrained; print the times."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    settle(float(pause))
    t0 = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, output_loading_info=True)
    t1 = time.perf_counter()
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    t2 = time.perf_counter()
    merged.save_pretrained(out, max_shard_size="1GB")
    os.sync()
    t3 = time.perf_counter()
    problems = {k: list(v)[:5] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    print(json.dumps({"load_s": t1 - t0, "merge_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
                      "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "model": type(model).__name__, "load_problems": problems}))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="base size in GB (1e9 bytes); 0.2 for a smoke run")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="max shard size in GB, like max_shard_size='1GB'")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    ap.add_argument("--settle-s", type=float, default=None,
                    help="sync + pause before every timed section, see above (default: 3 s per GB, at most 6 s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    if args.settle_s is None:
        args.settle_s = min(6.0, 3.0 * args.size_gb)

    import uvicorn

    from loreg.cli.client import RegistryClient
    from loreg.registry.app import create_app
    from loreg.registry.db import migrate
    from loreg.registry.services.context import open_registry
    from loreg.registry.services.tokens import TokenService
    from loreg.registry.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="loreg-bench-export-", dir="/tmp"))
    os.environ["LOREG_HOME"] = str(work / "client")
    server = thread = registry = pool = None
    try:
        layers, vocab = sizing(args.size_gb)
        t0 = time.perf_counter()
        shards = write_base(work / "base", layers, vocab, int(args.shard_gb * 1e9))
        write_adapter(work / "adapter", layers)
        t_build = time.perf_counter() - t0
        total = sum(p.stat().st_size for p in shards)
        adapter_size = (work / "adapter" / "adapter_model.safetensors").stat().st_size

        home, scratch = work / "server", work / "scratch"
        scratch.mkdir()
        settings = Settings(home=home, export_worker="external", work_dir=scratch)
        registry = open_registry(settings)
        migrate.upgrade(registry.engine)
        token = TokenService(registry).create("admin")[1]
        app = create_app(registry=registry)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = RegistryClient(f"http://127.0.0.1:{port}", token, timeout=600)
        t0 = time.perf_counter()
        base = client.register_base(work / "base", BASE_NAME, upload_weights=True)
        t_register = time.perf_counter() - t0
        client.push(work / "adapter", ADAPTER)
        ref = f"{ADAPTER}:1"
        stored = [Path(registry.store.local_path(f["digest"])) for f in base["files"] if f["path"].endswith(".safetensors")]
        version = client.version(ref)
        adapter_blob = Path(registry.store.local_path(
            next(f["digest"] for f in version["files"] if f["path"] == "adapter_model.safetensors")))

        # 1. baseline: cp + sync of the shard files
        drop_cache(shards)
        t_cp_cold = cp_sync(shards, work / "cp", args.settle_s)
        warm_cache(shards)
        t_cp_warm = cp_sync(shards, work / "cp", args.settle_s)

        # 2, 3. the merge, in a child process: cold, then warm with another weight
        merges = {}
        for label, weight in (("cold", 1.0), ("warm", 0.5)):
            job = client.request("POST", "/v1/exports", json={"adapters": [{"ref": ref, "weight": weight}]}).json()
            assert job["state"] == "queued", job["state"]
            if label == "cold":
                drop_cache([*stored, adapter_blob])
            else:
                warm_cache([*stored, adapter_blob])
            res = run_child(["--_merge-child", str(home), str(scratch), str(args.settle_s)])
            done = client.get_json(f"/v1/exports/{job['id']}")
            if done["state"] != "done" or res["job"] != job["id"]:
                raise RuntimeError(f"export {job['id']} ended {done['state']}: {done.get('error')}")
            res["files"] = done["files"]
            res["job_s"] = (_ts(done["finished_at"]) - _ts(done["started_at"])) if done["finished_at"] else None
            merges[label] = res
        changed = sum(1 for f in merges["cold"]["files"] if f["digest"] not in {b["digest"] for b in base["files"]})

        # 4. PEFT
        peft = None
        avail_kb = _meminfo_kb("MemAvailable")
        if args.no_peft:
            peft_note = "skipped (--no-peft)"
        elif avail_kb and avail_kb * 1024 < 2 * total:
            peft_note = f"skipped: {avail_kb / 1e6:.1f} GB of memory available, PEFT needs about 2x the base"
        else:
            warm_cache(shards)
            peft = run_child(["--_peft-child", str(work / "base"), str(work / "adapter"), str(work / "peft-out"),
                              str(args.settle_s)])
            shutil.rmtree(work / "peft-out", ignore_errors=True)
            peft_note = ""

        # 5. end to end, with the worker pool `loreg serve` runs in-process
        import torch  # noqa: F401 - a running server has imported it for its first export already
        from loreg.registry.merge.worker import ExportWorker
        from loreg.registry.services.jobs import WorkerPool

        pool = WorkerPool(lambda: ExportWorker(registry), 1)
        pool.start()
        app.state.exports.jobs.on_queued.append(pool.notify)
        warm_cache([*stored, adapter_blob])
        settle(args.settle_s)
        t0 = time.perf_counter()
        e2e = client.export([ref], work / "exported", weights=[0.25], poll_s=0.05)
        t_e2e = time.perf_counter() - t0
        e2e_job_s = _ts(e2e["finished_at"]) - _ts(e2e["started_at"])
        client.close()

        # report
        gb = total / 1e9
        print(f"base: {gb:.2f} GB bf16 in {len(shards)} shards (llama: {layers} layers, hidden {HIDDEN}, "
              f"intermediate {INTER}, vocab {vocab}); adapter: all-linear r={R} float32, {adapter_size / MB:.0f} MB; "
              f"{os.cpu_count()} cpus; store: local folder + SQLite")
        print(f"setup: build {t_build:.1f} s, register --upload-weights {t_register:.1f} s; "
              f"the merge changes {changed} of {len(shards)} shards; sync + {args.settle_s:g} s pause before each figure")
        print(f"cp + sync  cold {t_cp_cold:6.2f} s {total / MB / t_cp_cold:7.0f} MB/s")
        print(f"cp + sync  warm {t_cp_warm:6.2f} s {total / MB / t_cp_warm:7.0f} MB/s")
        for label in ("cold", "warm"):
            m = merges[label]
            other = m["run_s"] - m["engine_s"] - m["put_s"]
            job_s = f"{m['job_s']:.2f} s" if m["job_s"] is not None else "n/a"
            print(f"loreg merge {label} {m['run_s']:6.2f} s {total / MB / m['run_s']:7.0f} MB/s   "
                  f"(engine {m['engine_s']:.2f} s, put_file (fsync + rename) {m['put_s']:.2f} s, claim/validate/commit "
                  f"{other:.2f} s; job started_at..finished_at {job_s}; cpu {m['user_s']:.1f} s user + "
                  f"{m['sys_s']:.1f} s sys, {m['minflt'] / 1e3:.0f}k page faults)")
        peak = max(m["peak_kb"] for m in merges.values())
        above = max(m["peak_kb"] - m["rss_imports_kb"] for m in merges.values())
        print(f"merge peak RSS {peak / 1024:.0f} MB (ru_maxrss of the worker process; "
              f"{above / 1024:.0f} MB above the {merges['cold']['rss_imports_kb'] / 1024:.0f} MB after imports)")
        if peft is not None:
            print(f"PEFT       warm {peft['total_s']:6.2f} s   (load {peft['load_s']:.2f} s, merge_and_unload "
                  f"{peft['merge_s']:.2f} s, save_pretrained + sync {peft['save_s']:.2f} s; peak RSS "
                  f"{peft['peak_kb'] / 1024:.0f} MB; {peft['model']} loaded"
                  f"{', problems: ' + json.dumps(peft['load_problems']) if peft['load_problems'] else ' with no missing or unexpected keys'})")
        else:
            print(f"PEFT       {peft_note}")
        print(f"end to end warm {t_e2e:6.2f} s   (RegistryClient.export -o DIR, weight 0.25: job {e2e_job_s:.2f} s "
              f"in the in-process worker, then {e2e['bytes_downloaded'] / MB:.0f} MB downloaded and verified in "
              f"{t_e2e - e2e_job_s:.2f} s incl. request and polling)")
        cold, warm = merges["cold"]["run_s"] / t_cp_cold, merges["warm"]["run_s"] / t_cp_warm
        print(f"ratio merge/(cp+sync) cold: {cold:.2f}   (goal <= 1.10: {verdict(cold <= 1.10)})")
        print(f"ratio merge/(cp+sync) warm: {warm:.2f}   (goal <= 1.15: {verdict(warm <= 1.15)})")
        print(f"merge peak RSS: {peak / 1024:.0f} MB process, {above / 1024:.0f} MB above imports   "
              f"(goal <= 512 MB: {verdict(peak / 1024 <= 512)} for the process, {verdict(above / 1024 <= 512)} above imports)")
        if peft is not None:
            speedup = peft["total_s"] / merges["warm"]["run_s"]
            print(f"ratio PEFT/loreg merge (warm): {speedup:.1f}x   (goal >= 5: {verdict(speedup >= 5)})")
        print(f"ratio end-to-end/(cp+sync) warm: {t_e2e / t_cp_warm:.2f}   (no goal; request + merge + store + download)")
    finally:
        if pool is not None:
            pool.shutdown()
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(10)
        if registry is not None:
            registry.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _meminfo_kb(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_merge-child":
        merge_child(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_peft-child":
        peft_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        main()
