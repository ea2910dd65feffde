"""vLLM serves an adapter it fetched from loreg by reference: check for a GPU machine with vLLM installed.

Run from the repository root, with loreg (`pip install -e '.[test]'`) and a full vLLM (with its CUDA
torch) in one environment:

    python tests/gpu/check_vllm_serve.py                 # the whole check (needs a GPU)
    python tests/gpu/check_vllm_serve.py --prepare-only  # everything before `vllm serve` (CPU is enough)

It builds, in a temporary folder, a tiny LLaMA base (bf16, head_dim 64 so the GPU attention kernels
take it) with a character-level tokenizer, and a PEFT LoRA adapter for it whose lora_B is random (so
it changes the outputs); starts `loreg serve` on the embedded default, registers the base and pushes
the adapter as `demo/bot` with alias `prod`; then starts `vllm serve BASE_FOLDER --enable-lora` with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and loreg's URL and token, and sends greedy completions naming
the base and `demo/bot:prod`. Passes when the adapter was fetched into LOREG_VLLM_CACHE_DIR, the two
completions differ, and an unknown reference gets a 404. Prints what it saw; exits 1 on any failure.
Not collected by pytest (no test_ prefix). No network: everything is built here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere: the tests package
from tests.support.server import poll_until  # noqa: E402

DEADLINE_S = 600.0
CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII, one token each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], what: str, deadline_s: float = DEADLINE_S) -> None:
    def answered() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before answering {url}")
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll_until(answered, f"{what} to answer {url}", deadline_s)
    except AssertionError as exc:
        raise SystemExit(str(exc)) from None


def make_base(dest: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


def make_adapter(base: Path, dest: Path, base_name: str) -> Path:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype) * 0.5)
    peft_model.save_pretrained(dest)
    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


def complete(url: str, model: str, prompt: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.0},
        timeout=120.0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-only", action="store_true", help="stop before starting vLLM (no GPU needed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loreg-vllm-check-"))
    home = tmp / "home"
    loreg_port, vllm_port = free_port(), free_port()
    loreg_url = f"http://127.0.0.1:{loreg_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOREG_")}
    env.update(LOREG_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        base = make_base(tmp / "base")
        adapter = make_adapter(base, tmp / "adapter", "tiny/llama-vllm")
        loreg_bin = str(Path(sys.executable).with_name("loreg"))
        server = subprocess.Popen([loreg_bin, "serve", "--port", str(loreg_port)], env=env, start_new_session=True)
        procs.append(server)
        wait_for(f"{loreg_url}/v1/health", server, "loreg serve", 120.0)

        os.environ.update(LOREG_HOME=str(home))
        from loreg.cli import Client, config

        token = config.token_for(loreg_url)
        assert token, "loreg serve wrote no admin token"
        with Client(loreg_url, token) as c:
            c.register_base(base, "tiny/llama-vllm")
            pushed = c.push(adapter, "demo/bot", aliases=["prod"])
        print(f"pushed demo/bot:{pushed['version']} {pushed['digest']} (alias prod)")
        if args.prepare_only:
            print("prepared; --prepare-only: vLLM not started")
            return 0

        cache = tmp / "vllm-cache"
        vllm_env = dict(
            env,
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="true",
            LOREG_URL=loreg_url,
            LOREG_TOKEN=token,
            LOREG_VLLM_CACHE_DIR=str(cache),
            LOREG_VLLM_MAX_LORA_RANK="16",
        )
        vllm = subprocess.Popen(
            [
                sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(base), "--enable-lora",
                "--max-lora-rank", "16", "--max-model-len", "128", "--gpu-memory-utilization", "0.3",
                "--enforce-eager", "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(vllm_port),
            ],
            env=vllm_env,
            start_new_session=True,
        )
        procs.append(vllm)
        vllm_url = f"http://127.0.0.1:{vllm_port}"
        wait_for(f"{vllm_url}/health", vllm, "vllm serve")

        prompt = "hello loreg, "
        plain = complete(vllm_url, str(base), prompt)
        adapted = complete(vllm_url, "demo/bot:prod", prompt)
        unknown = complete(vllm_url, "demo/nobody:prod", prompt)
        print("base:     ", plain.status_code, plain.text[:300])
        print("adapter:  ", adapted.status_code, adapted.text[:300])
        print("unknown:  ", unknown.status_code, unknown.text[:200])
        failures = []
        if plain.status_code != 200 or adapted.status_code != 200:
            failures.append("a completion failed")
        else:
            base_text = plain.json()["choices"][0]["text"]
            lora_text = adapted.json()["choices"][0]["text"]
            if base_text == lora_text:
                failures.append(f"the adapter did not change the output ({base_text!r})")
        folder = cache / pushed["digest"].removeprefix("sha256:")
        if not (folder / "adapter_model.safetensors").is_file():
            failures.append(f"the adapter was not fetched into {folder}")
        if unknown.status_code != 404:
            failures.append(f"an unknown reference answered {unknown.status_code}, not 404")
        for f in failures:
            print("FAIL:", f)
        print("OK" if not failures else f"{len(failures)} failure(s)")
        return 1 if failures else 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)


if __name__ == "__main__":
    sys.exit(main())
