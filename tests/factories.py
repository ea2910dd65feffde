"""Real PEFT LoRA adapters on tiny transformers models built from configs (random weights, no hub).

Every function seeds its own RNG (``torch.random.fork_rng``), so results depend only on the
arguments and the global torch RNG is left as it was. Nothing is cached across calls.
torch, transformers and peft are imported lazily: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llama", "gpt2", "bert", "vit")

# family -> (config class, model class, headless model class, default target_modules, hub-style name)
_FAMILY_SPEC: dict[str, tuple[str, str, str, list[str], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel", ["q_proj", "v_proj"], "loreg-test/tiny-llama"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2Model", ["c_attn"], "loreg-test/tiny-gpt2"),
    "bert": ("BertConfig", "BertForSequenceClassification", "BertModel", ["query", "value"], "loreg-test/tiny-bert"),
    # transformers 5 names ViT attention q_proj/v_proj (checkpoints keep attention.attention.query/value)
    "vit": ("ViTConfig", "ViTForImageClassification", "ViTModel", ["q_proj", "v_proj"], "loreg-test/tiny-vit"),
}

# Known, harmless warnings raised inside PEFT/transformers while building test data.
_QUIET = (
    r"`is_gradient_checkpointing` is deprecated",
    r"Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`",
    # tied embedding targets are built on purpose (GPT-2 wte / lm_head)
    r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
    # PEFT sets fan_in_fan_out per layer type (GPT-2 mixes Conv1D and Linear lm_head)
    r"fan_in_fan_out is set to (True|False) but the target module is",
    # PEFT 0.21.2 flags the 1-D lora_B.bias of lora_bias=True adapters on save; the file is fine
    r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape: .*lora_B\.bias",
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        yield

VOCAB_SIZE = 128
HIDDEN = 32
LAYERS = 2


def _spec(family: str) -> tuple[str, str, str, list[str], str]:
    try:
        return _FAMILY_SPEC[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}") from None


def base_name(family: str) -> str:
    """The hub-style name written as base_model_name_or_path by make_adapter."""
    return _spec(family)[4]


def default_target_modules(family: str) -> list[str]:
    return list(_spec(family)[3])


def tiny_config(family: str = "llama", *, headless: bool = False, hidden: int = HIDDEN) -> Any:
    """A transformers config for a 2-layer model with hidden size ``hidden`` (32) and vocab 128."""
    import transformers

    config_cls, model_cls, headless_cls, _, _ = _spec(family)
    common = {"architectures": [headless_cls if headless else model_cls]}
    if family == "llama":
        kw = dict(
            vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )
    elif family == "gpt2":
        kw = dict(
            vocab_size=VOCAB_SIZE, n_embd=hidden, n_layer=LAYERS, n_head=4, n_positions=64,
            bos_token_id=VOCAB_SIZE - 1, eos_token_id=VOCAB_SIZE - 1,
        )
    elif family == "bert":
        kw = dict(
            vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=2,
        )
    else:  # vit
        kw = dict(
            hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=8, num_channels=3, num_labels=2,
        )
    return getattr(transformers, config_cls)(**kw, **common)


def _build_model(family: str, *, seed: int, headless: bool = False, hidden: int = HIDDEN) -> Any:
    import torch
    import transformers

    config = tiny_config(family, headless=headless, hidden=hidden)
    model_cls = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def make_base(
    dest: Path,
    family: str = "llama",
    *,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    seed: int = 0,
    headless: bool = False,
    hidden: int = HIDDEN,
) -> Path:
    """Save a tiny random ``family`` model (config.json + safetensors) into ``dest``.

    ``max_shard_size`` (e.g. ``"20KB"``) shards it and writes ``model.safetensors.index.json``.
    ``headless`` builds the bare backbone (``LlamaModel``, ``BertModel``, ...) instead of the head class;
    ``hidden`` changes the hidden size (another model of the same family).
    """
    import torch

    dest = Path(dest)
    model = _build_model(family, seed=seed, headless=headless, hidden=hidden)
    model = model.to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    with _quiet():
        model.save_pretrained(dest, **kwargs)
    return dest


def load_base_model(base_dir: Path, *, dtype: str | None = None) -> Any:
    """Load a base saved by make_base with the class named in its config.json (eval mode)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_dir)
    model_cls = getattr(transformers, config.architectures[0])
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype) if dtype else "auto"}
    with _quiet():
        return model_cls.from_pretrained(base_dir, **kwargs).eval()


def load_adapter_model(base_dir: Path, adapter_dir: Path) -> Any:
    """The base with the adapter applied by PEFT itself (a PeftModel in eval mode)."""
    from peft import PeftModel

    base = load_base_model(base_dir)
    with _quiet():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def make_adapter(
    dest: Path,
    family: str = "llama",
    *,
    base_dir: Path | None = None,
    seed: int = 1,
    base_seed: int = 0,
    headless: bool = False,
    base_name: str | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Train-free PEFT LoRA adapter for ``family`` saved by PEFT into ``dest``.

    The base is loaded from ``base_dir`` when given (the adapter then belongs to those exact
    weights), else built from config with ``base_seed`` (make_base's default seed).
    ``lora_kwargs`` override the LoraConfig (r=8, lora_alpha=16, per-family target_modules).
    lora_B (which PEFT initialises to zero) is randomised with a generator seeded by ``seed``, and the
    other trainable tensors (DoRA magnitudes, modules_to_save copies, biases, lora_B.bias,
    trainable-token rows) get seeded noise, so every stored tensor changes the model.
    ``base_model_name_or_path`` in the saved config is ``base_name`` (default: the family's hub-style name;
    pass ``""`` for an empty one).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    dest = Path(dest)
    spec = _spec(family)
    if base_dir is not None:
        model = load_base_model(Path(base_dir))
    else:
        model = _build_model(family, seed=base_seed, headless=headless)

    kwargs: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": list(spec[3]), "lora_dropout": 0.0}
    kwargs.update(lora_kwargs)
    if family == "gpt2" and "fan_in_fan_out" not in lora_kwargs:
        targets = kwargs["target_modules"]
        kwargs["fan_in_fan_out"] = isinstance(targets, list) and any(
            t.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for t in targets
        )
    config = LoraConfig(**kwargs)

    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad or "lora_A" in name:
                continue
            if "lora_embedding_A" in name and bool(param.any()):
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
            # PEFT initialises lora_B and (for embeddings) lora_embedding_A to zero: either makes a no-op
            if ("lora_B" in name and name.endswith("weight")) or "lora_embedding_B" in name or "lora_embedding_A" in name:
                param.copy_(noise * 0.1)
            else:
                param.add_(noise * 0.01)
    with _quiet():
        peft_model.save_pretrained(dest)

    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = spec[4] if base_name is None else base_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dest


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, {key: torch tensor}) of an adapter folder."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(adapter_dir / "adapter_model.safetensors")


def edit_adapter(
    src: Path,
    dest: Path,
    *,
    tensors: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    config: Callable[[dict[str, Any]], Mapping[str, Any]] | Mapping[str, Any] | None = None,
) -> Path:
    """Copy adapter folder ``src`` to ``dest``, rewriting its tensors and/or config.

    ``tensors`` gets ``{key: torch tensor}`` and returns the new mapping (written as a new safetensors
    file); ``config`` is a function of the config dict or a dict of keys to update.
    """
    from safetensors.torch import save_file

    src, dest = Path(src), Path(dest)
    shutil.copytree(src, dest)
    cfg, weights = read_adapter(src)
    if tensors is not None:
        new = {k: v.contiguous() for k, v in dict(tensors(dict(weights))).items()}
        save_file(new, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = dict(config(dict(cfg))) if callable(config) else {**cfg, **config}
        (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dest
