"""Variants of a real PEFT adapter folder: same layout, different weights (for many-version tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def variant(src: Path, dest: Path, seed: int) -> Path:
    """Copy the adapter folder with every lora_B perturbed deterministically by ``seed``."""
    shutil.copytree(src, dest)
    path = dest / "adapter_model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(seed)
    for key, value in tensors.items():
        if ".lora_B." in key:
            tensors[key] = (value + rng.standard_normal(value.shape).astype(value.dtype) * 0.01).astype(value.dtype)
    save_file(tensors, path)
    return dest
