"""Combining four adapters into one (loreg's streaming combine) against PEFT's add_weighted_adapter, in the same run.

Builds the synthetic bf16 LLaMA-shaped base of bench/export.py (--size-gb) and four all-linear r=16 float32
adapters (q/k/v/o/gate/up/down of every layer, different random values, alpha 32), then, each in a fresh
child process (peak RSS = that child's ru_maxrss):
  loreg   registry.merge.combine.combine_to_dir(four folders -> one folder): headers, plan, module by module
          combine, write; no base needed
  PEFT    AutoModelForCausalLM.from_pretrained (bf16) + PeftModel.from_pretrained + 3x load_adapter
          + add_weighted_adapter + save_pretrained(selected_adapters=[the new one])
for `ties` (density 0.5) and `svd` (svd_rank 16), and prints time and peak RSS of each and the ratios
PEFT/loreg (goals: time >= 5, loreg peak RSS <= 512 MB). It reports; it asserts nothing.
--device cuda runs loreg's side on the GPU (PEFT's stays on the CPU, as its loads are).

    python bench/combine.py [--size-gb 2] [--methods ties,svd] [--device cpu|cuda] [--no-peft]
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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.export import ALPHA, ATTN, MLP, R, SHAPES, sizing, write_base  # noqa: E402

N_ADAPTERS = 4
PARAMS = {"ties": {"density": 0.5}, "svd": {"svd_rank": 16}}
WEIGHTS = (0.4, 0.3, 0.2, 0.1)
MB = 1e6


def write_adapter(folder: Path, layers: int, seed: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for leaf in ATTN + MLP:
            group = "mlp" if leaf in MLP else "self_attn"
            out_f, in_f = SHAPES[leaf]
            prefix = f"base_model.model.model.layers.{i}.{group}.{leaf}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((R, in_f), dtype=np.float32) / np.sqrt(in_f)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, R), dtype=np.float32) * 1e-3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(ATTN + MLP), "bias": "none", "base_model_name_or_path": "bench/llama-synth",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, indent=2))


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loreg_child(method: str, out: str, device: str, *adapters: str) -> None:
    import torch  # noqa: F401 - imported before timing, as PEFT's child imports before its clock starts

    from loreg.registry.formats.peft import parse_adapter_config
    from loreg.registry.merge.combine import CombineInput, CombineParams, combine_to_dir

    t0 = time.perf_counter()
    inputs = [CombineInput(Path(a).name, Path(a), parse_adapter_config((Path(a) / "adapter_config.json").read_bytes()))
              for a in adapters]
    result = combine_to_dir(inputs, CombineParams(method, WEIGHTS, **PARAMS[method]), Path(out), device=device)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"total_s": elapsed, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rank": result.rank, "modules": result.modules}))


def peft_child(method: str, out: str, base: str, *adapters: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft_model.load_adapter(a, adapter_name=f"a{i}")
    t1 = time.perf_counter()
    peft_model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], list(WEIGHTS), "combined",
                                    combination_type=method, **PARAMS[method])
    t2 = time.perf_counter()
    peft_model.save_pretrained(out, selected_adapters=["combined"])
    t3 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "combine_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
                      "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="base size in GB (1e9 bytes); 0.2 for a smoke run")
    ap.add_argument("--methods", default="ties,svd", help="comma-separated: ties, svd")
    ap.add_argument("--device", default="cpu", help="where loreg combines: cpu or cuda")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    layers, vocab = sizing(args.size_gb)
    tmp = Path(tempfile.mkdtemp(prefix="loreg-bench-combine-"))
    try:
        base = tmp / "base"
        write_base(base, layers, vocab, 1 << 30)
        adapters = [tmp / f"adapter{i}" for i in range(N_ADAPTERS)]
        for i, folder in enumerate(adapters):
            write_adapter(folder, layers, seed=i + 1)
        print(f"base: {layers} layers, vocab {vocab}, {sum(p.stat().st_size for p in base.glob('*.safetensors')) / 1e9:.2f} GB;"
              f" {N_ADAPTERS} adapters r={R}, {7 * layers} modules each")
        for method in methods:
            ours = run_child(["loreg", method, str(tmp / f"loreg-{method}"), args.device, *map(str, adapters)])
            line = f"{method:5s} loreg ({args.device}): {ours['total_s']:7.2f} s, peak RSS {ours['peak_kb'] * 1e3 / MB:6.0f} MB"
            if not args.no_peft:
                peft = run_child(["peft", method, str(tmp / f"peft-{method}"), str(base), *map(str, adapters)])
                line += (f" | PEFT: {peft['total_s']:7.2f} s (load {peft['load_s']:.1f}, combine {peft['combine_s']:.1f},"
                         f" save {peft['save_s']:.1f}), peak RSS {peft['peak_kb'] * 1e3 / MB:6.0f} MB"
                         f" | PEFT/loreg time {peft['total_s'] / ours['total_s']:.1f}x (goal >= 5),"
                         f" RSS {peft['peak_kb'] / ours['peak_kb']:.1f}x")
            line += f" | loreg peak RSS goal <= 512 MB: {'met' if ours['peak_kb'] * 1e3 <= 512 * MB else 'NOT met'}"
            print(line, flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("loreg", "peft"):
        (loreg_child if sys.argv[1] == "loreg" else peft_child)(*sys.argv[2:])
    else:
        main()
