"""Merge engine check for a GPU machine that has only torch, safetensors and numpy (no transformers/peft/web stack).

Run after ``pip install --no-deps .`` from the repository root:

    python tests/gpu/check_merge_gpu.py              # CPU and CUDA, a ~0.7 GB bf16 base
    python tests/gpu/check_merge_gpu.py --size tiny --cpu-only   # smoke test anywhere

It writes a synthetic llama-like bf16 base in a few shards and PEFT-style adapter folders (adapter_config.json +
adapter_model.safetensors written by safetensors.torch) to a temporary folder, merges them with device="cpu" and
device="cuda", and checks: every touched tensor within one bf16 ulp of an independent float32 reference
(W + s·B@A, DoRA renormalisation, weighted sums), CUDA output within one bf16 ulp of the CPU output (reports how
many tensors are bit-identical and the max abs diff), untouched shards byte-identical to the base, digests equal
to the files' sha256. Prints timings; exits 1 on any mismatch. Not collected by pytest (no test_ prefix).

The adapters' config and validation report are look-alikes built here (formats.peft needs pydantic and re2,
absent on such a machine); they hold what validate_adapter reports for these plain layouts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from loreg.registry.formats.safetensors import read_header_from_file
from loreg.registry.merge.engine import AdapterInput, BaseShard, OutputFile, merge_to_dir

SIZES = {  # vocab, hidden, intermediate, layers, rank, shards
    "tiny": (256, 64, 160, 2, 8, 3),
    "small": (32000, 2048, 5632, 4, 16, 3),
    "medium": (32000, 4096, 11008, 4, 64, 4),
}
PREFIX = "base_model.model."
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def base_tensors(vocab: int, hidden: int, inter: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    kv = hidden // 2
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_base(folder: Path, shapes: dict[str, tuple[int, ...]], shards: int, gen: torch.Generator) -> list[Path]:
    folder.mkdir(parents=True)
    total = sum(math.prod(s) for s in shapes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    seen = 0
    for name, shape in shapes.items():
        groups[min(shards - 1, seen * shards // total)].append(name)
        seen += math.prod(shape)
    paths, weight_map = [], {}
    for index, names in enumerate(groups):
        path = folder / f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, path, metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({n: path.name for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths


def write_adapter(folder: Path, shapes: dict[str, tuple[int, ...]], modules: list[str], rank: int, alpha: float,
                  dora: bool, embedding: bool, gen: torch.Generator) -> AdapterInput:
    folder.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    layer_types: dict[str, str] = {}
    for module in modules:
        out, inp = shapes[module + ".weight"]
        a, b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        tensors[a] = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
        tensors[b] = torch.randn(out, rank, generator=gen) * 0.01
        key_map.update({a: module + ".weight", b: module + ".weight"})
        layer_types[module] = "linear"
        if dora:
            m = f"{PREFIX}{module}.lora_magnitude_vector"
            tensors[m] = 1.0 + torch.rand(out, generator=gen)
            key_map[m] = module + ".weight"
    if embedding:
        module = "model.embed_tokens"
        vocab, hidden = shapes[module + ".weight"]
        a, b = f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
        tensors[a] = torch.randn(rank, vocab, generator=gen)
        tensors[b] = torch.randn(hidden, rank, generator=gen) * 0.01
        key_map.update({a: module + ".weight", b: module + ".weight"})
        layer_types[module] = "embedding"
    path = folder / "adapter_model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    targets = sorted({m.rsplit(".", 1)[-1] for m in layer_types})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "use_dora": dora,
              "bias": "none", "lora_bias": False, "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    look_config = SimpleNamespace(use_dora=dora, lora_bias=False, trainable_token_indices=None)
    report = SimpleNamespace(key_map=key_map, layer_types=layer_types, warnings=[],
                             scalings={m: alpha / rank for m in layer_types})
    return AdapterInput(look_config, read_header_from_file(path), path, report)  # type: ignore[arg-type]


def reference(base: dict[str, torch.Tensor], adapters: list[tuple[AdapterInput, float]]) -> dict[str, torch.Tensor]:
    """Independent float32 merge of the touched tensors (PEFT_FORMAT.md §4.1, §4.3, §4.5), one rounding to bf16."""
    touched: dict[str, torch.Tensor] = {}
    for adapter, weight in adapters:
        tensors = load_file(adapter.path)
        for module, layer in adapter.report.layer_types.items():
            name = module + ".weight"
            w = touched.get(name, base[name].float())
            s = adapter.report.scalings[module]
            key = PREFIX + module
            if layer == "embedding":
                delta = (tensors[f"{key}.lora_embedding_B"] @ tensors[f"{key}.lora_embedding_A"]).T
            else:
                delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            delta = delta * s * weight
            magnitude = tensors.get(f"{key}.lora_magnitude_vector")
            if magnitude is not None:
                v = w + delta
                w = v * (magnitude / torch.linalg.norm(v, dim=1)).view(-1, 1)
            else:
                w = w + delta
            touched[name] = w
    return {n: w.to(torch.bfloat16) for n, w in touched.items()}


def ulp(x: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8).clamp_min(2.0**-126)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Check:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)
            print("  FAIL", message)


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float, bool]:
    """(bit-identical, max abs diff, within one bf16 ulp of b)."""
    diff = (a.float() - b.float()).abs()
    return torch.equal(a, b), float(diff.max()) if diff.numel() else 0.0, bool((diff <= ulp(b)).all())


def run_case(name: str, work: Path, shards: list[BaseShard], base_digests: dict[str, str],
             adapters: list[tuple[AdapterInput, float]], devices: list[str], check: Check) -> None:
    print(f"[{name}]")
    inputs = [AdapterInput(a.config, a.header, a.path, a.report, w) for a, w in adapters]
    base = {}
    for shard in shards:
        base.update(load_file(shard.path))
    expected = reference(base, adapters)
    results: dict[str, dict[str, torch.Tensor]] = {}
    total_bytes = sum(s.path.stat().st_size for s in shards)
    for device in devices:
        out = work / f"out-{name}-{device}"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs: list[OutputFile] = merge_to_dir(shards, inputs, out, device=device)
        seconds = time.perf_counter() - start
        extra = ""
        if device == "cuda":
            extra = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        print(f"  {device}: {seconds:.2f} s, {total_bytes / seconds / 1e9:.2f} GB/s{extra}")
        merged: dict[str, torch.Tensor] = {}
        for output in outputs:
            path = out / output.name
            check.expect(output.digest == sha256(path), f"{name}/{device}: digest of {output.name}")
            check.expect(output.changed == (output.digest != base_digests[output.name]),
                         f"{name}/{device}: changed flag of {output.name}")
            part = load_file(path)
            if not any(n in expected for n in part):
                check.expect(output.digest == base_digests[output.name],
                             f"{name}/{device}: untouched shard {output.name} differs from the base")
            merged.update(part)
        for tensor, value in expected.items():
            same, diff, close = compare(merged[tensor], value)
            check.expect(close, f"{name}/{device}: {tensor} is {diff:.3g} from the float32 reference")
        for tensor, value in base.items():
            if tensor not in expected:
                check.expect(torch.equal(merged[tensor], value), f"{name}/{device}: untouched {tensor} changed")
        results[device] = merged
        for output in outputs:
            (out / output.name).unlink()
    if len(results) == 2:
        cpu, gpu = results["cpu"], results["cuda"]
        identical, worst, all_close = 0, 0.0, True
        for tensor in expected:
            same, diff, close = compare(gpu[tensor], cpu[tensor])
            identical += same
            worst = max(worst, diff)
            all_close = all_close and close
        print(f"  cuda vs cpu: {identical}/{len(expected)} touched tensors bit-identical, max abs diff {worst:.3g}")
        check.expect(all_close, f"{name}: cuda output is more than one bf16 ulp from the cpu output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA (smoke test on any machine)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="tiny with --cpu-only, else small")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here instead of a temp folder")
    args = parser.parse_args(argv)
    for blocked in ("transformers", "peft", "fastapi", "sqlalchemy"):
        if sys.modules.get(blocked) is not None:
            print(f"FAIL: {blocked} was imported")
            return 1
    devices = ["cpu"]
    if not args.cpu_only:
        if not torch.cuda.is_available():
            print("FAIL: CUDA is not available (use --cpu-only for a smoke test)")
            return 1
        devices.append("cuda")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    size = args.size or ("tiny" if args.cpu_only else "small")
    vocab, hidden, inter, layers, rank, nshards = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    check = Check()
    with tempfile.TemporaryDirectory(prefix="loreg-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        shapes = base_tensors(vocab, hidden, inter, layers)
        paths = write_base(work / "base", shapes, nshards, gen)
        shards = [BaseShard(p.name, p, read_header_from_file(p)) for p in paths]
        digests = {p.name: sha256(p) for p in paths}
        size_gb = sum(p.stat().st_size for p in paths) / 1e9
        print(f"base: {size} ({size_gb:.2f} GB in {len(paths)} shards), built in {time.perf_counter() - start:.1f} s")
        all_linear = [f"model.layers.{i}.{m}" for i in range(layers) for m in LINEAR]
        last = [f"model.layers.{layers - 1}.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj")]
        plain = write_adapter(work / "plain", shapes, all_linear, rank, 2 * rank, False, True, gen)
        dora = write_adapter(work / "dora", shapes, last, rank, rank, True, False, gen)
        other = write_adapter(work / "other", shapes, last, rank // 2, rank, False, False, gen)
        run_case("plain+embedding", work, shards, digests, [(plain, 1.0)], devices, check)
        run_case("dora", work, shards, digests, [(dora, 1.0)], devices, check)
        run_case("weighted", work, shards, digests, [(plain, 0.7), (other, -0.3)], devices, check)
    if check.failures:
        print(f"FAILED: {len(check.failures)} mismatches")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
