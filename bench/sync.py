"""`loreg sync` of N adapters against N `loreg pull`s one after the other, and the requests per idle
`--watch` round, measured in the same run.

Starts `loreg serve` in its own process (SQLite + local folder), registers a synthetic llama-like base
(headers only), pushes N synthetic adapters (different bytes; --layers x 7 modules, r=--rank, float32:
about 2.5 MB each by default) each with the alias prod, then times, each with a fresh client cache:
  pull (cli)     N `loreg pull NAME:prod -o FOLDER` processes, one after the other
  sync (cli)     one `loreg sync DIR NAME:prod...` process (parallel downloads, --jobs)
  pull (client)  N Client.pull calls in this process (no process start-ups: the fairer baseline)
  sync (client)  one Syncer.sync_once in this process
and prints sync/pull ratios (goal <= 0.5), then runs idle `--watch` rounds in this process and prints
the requests each round made and their answers (goal: 1, answered 304).

    python bench/sync.py [--adapters 50] [--layers 1] [--rank 8] [--jobs 8] [--idle-rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.push_pull import base_tensors, write_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--idle-rounds", type=int, default=3)
    args = ap.parse_args()

    from loreg.cli.client import RegistryClient
    from loreg.cli.sync import Syncer
    from tests.support.server import LOREG, env_with, serving, token_for

    work = Path(tempfile.mkdtemp(prefix="loreg-bench-sync-"))
    client_home = work / "client"
    os.environ["LOREG_HOME"] = str(client_home)
    try:
        with serving(env_with(LOREG_HOME=str(work / "server"), LOREG_EXPORT_WORKER="external"), work) as (url, _):
            token = token_for(work / "server", url)
            cli_env = env_with(LOREG_URL=url, LOREG_TOKEN=token, LOREG_HOME=str(client_home))
            with RegistryClient(url, token) as client:
                client.request("POST", "/v1/base-models", json={
                    "name": "bench/llama-like", "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                    "tensors": base_tensors(args.layers),
                    "files": [{"path": "model.safetensors", "size": 1, "digest": "sha256:" + "0" * 64}]})
                refs = []
                for i in range(args.adapters):
                    folder = work / "src" / f"a{i:03d}"
                    write_adapter(folder, args.layers, r=args.rank, seed=i)
                    client.push(folder, f"bench/a{i:03d}", aliases=["prod"])
                    refs.append(f"bench/a{i:03d}:prod")
                size = sum(f.stat().st_size for f in (work / "src").rglob("*") if f.is_file()) / args.adapters

                def fresh() -> None:
                    for p in (client_home / "cache", work / "pulled", work / "synced"):
                        shutil.rmtree(p, ignore_errors=True)

                def timed(fn: object) -> float:
                    fresh()
                    t0 = time.perf_counter()
                    fn()  # type: ignore[operator]
                    return time.perf_counter() - t0

                def pull_cli() -> None:
                    for i, ref in enumerate(refs):
                        subprocess.run([LOREG, "pull", ref, "-o", str(work / "pulled" / str(i))], env=cli_env,
                                       check=True, capture_output=True)

                def sync_cli() -> None:
                    subprocess.run([LOREG, "sync", str(work / "synced"), *refs, "--jobs", str(args.jobs), "--json"],
                                   env=cli_env, check=True, capture_output=True)

                def pull_client() -> None:
                    for i, ref in enumerate(refs):
                        client.pull(ref, work / "pulled" / str(i))

                def sync_client() -> None:
                    results = Syncer(client, work / "synced", refs, jobs=args.jobs).sync_once()
                    assert all(r["status"] == "updated" for r in results), results

                t = {"pull_cli": timed(pull_cli), "sync_cli": timed(sync_cli),
                     "pull_client": timed(pull_client), "sync_client": timed(sync_client)}

            # idle --watch rounds, requests counted as they leave this process
            seen: list[tuple[str, str, int]] = []
            http = httpx.Client(base_url=url, event_hooks={
                "response": [lambda r: seen.append((r.request.method, r.request.url.path, r.status_code))]})
            with RegistryClient(url, token, http=http) as counted:
                per_round: list[list[tuple[str, str, int]]] = []
                round_s: list[float] = []
                last = [time.perf_counter()]

                def after(_: object) -> None:
                    per_round.append(list(seen))
                    seen.clear()
                    round_s.append(time.perf_counter() - last[0])
                    last[0] = time.perf_counter()

                # the folder is already in sync: the first round learns the ETag, the rest are idle
                Syncer(counted, work / "synced", refs, jobs=args.jobs).watch(0.0, rounds=args.idle_rounds + 1, on_round=after)
        print(f"{args.adapters} adapters of {size / 1e6:.1f} MB ({args.layers} layer(s) x 7 modules, r={args.rank}, "
              f"float32); loreg serve in its own process (SQLite + folder); {os.cpu_count()} cpus; fresh cache each")
        rows = [
            (f"loreg pull x{args.adapters}, one after the other (cli)", t["pull_cli"], ""),
            (f"loreg sync DIR <{args.adapters} refs> --jobs {args.jobs} (cli)", t["sync_cli"],
             f"   ratio {t['sync_cli'] / t['pull_cli']:.2f} (goal <= 0.5)"),
            (f"Client.pull x{args.adapters} (in process)", t["pull_client"], ""),
            ("Syncer.sync_once (in process)", t["sync_client"],
             f"   ratio {t['sync_client'] / t['pull_client']:.2f} (goal <= 0.5)"),
        ]
        for label, secs, note in rows:
            print(f"{label:48s} {secs:7.2f} s{note}")
        for i, (reqs, secs) in enumerate(zip(per_round[1:], round_s[1:], strict=True), 1):
            answers = ", ".join(f"{m} {p} -> {s}" for m, p, s in reqs)
            print(f"idle --watch round {i}: {len(reqs)} request(s) for {len(refs)} references ({answers}); {secs * 1000:.0f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
