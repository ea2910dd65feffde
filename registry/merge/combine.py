"""Combine LoRA adapters into a new LoRA adapter with PEFT's ``add_weighted_adapter`` semantics (PEFT 0.21.2,
``tuners/lora/model.py`` and ``utils/merge_utils.py``; PEFT_FORMAT.md §7).

Imports only torch (inside functions), ``loreg.registry.errors`` and ``loreg.registry.formats.safetensors``,
like the merge engine: it runs on a bare GPU host. Each input's ``config`` is read by attribute (a
``formats.peft.AdapterConfig`` or a look-alike): ``raw``, ``r``, ``rank_pattern``, ``use_dora``, ``lora_bias``,
``bias``, ``modules_to_save``, ``target_modules``, ``target_parameters``, ``trainable_token_indices`` and
``scaling_for(module)`` (rank_pattern/alpha_pattern are user regexes: the caller matched them safely).

Public:
    METHODS                                              the combination types, PEFT's names
    CombineParams(method, weights, density=None, majority_sign_method=None, svd_rank=None, svd_clamp=None,
                  seed=None)
    check_params(params, n_inputs) -> CombineParams     validated, canonical (defaults filled in)
    Factors(a, b, scale, weight)                          one input's factors of one module
    combine_factors(factors, params, rank, *, module="") -> (A, B)   one module, float32
    module_seed(seed, module) -> int                      the torch seed DARE uses for ``module``
    CombineInput(name, folder, config)                    one adapter folder
    plan_combination(inputs, params, headers=None) -> CombinePlan      every check that needs headers and configs only
    combine_to_dir(inputs, params, out_dir, *, device="auto") -> CombineResult

Semantics (Δᵢ = sᵢ·Bᵢ·Aᵢ with sᵢ the input's PEFT scaling; wᵢ its weight):
- ``cat``: A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁, B₂, …]; B·A = Σ wᵢΔᵢ exactly; rank = Σ rᵢ.
- ``svd`` and ``ties_svd``/``dare_linear_svd``/``dare_ties_svd``/``magnitude_prune_svd``: Δ = Σ wᵢΔᵢ (or TIES /
  DARE / magnitude pruning of the Δᵢ), then a truncated SVD: B = U_k·S_k, A = V_kᵀ, k = svd_rank or the largest
  input rank; ``svd_clamp`` clips U·S and Vᵀ to the ±quantile of their entries.
- ``linear``/``ties``/``dare_linear``/``dare_ties``/``magnitude_prune``: A and B are combined separately with
  weights √|wᵢsᵢ| (the sign on A's side), so B·A holds cross terms BᵢAⱼ: NOT the weighted sum of the Δᵢ
  (PEFT issue #3004). Equal ranks required.
- One input: the method becomes ``linear``, as in PEFT.
The result has ``r = lora_alpha = rank`` (scaling 1: the inputs' scalings are folded into the tensors). Where
PEFT writes an adapter that does not load or does not mean what it says, this module differs: a module of
lower rank than the result is padded with zero rows of A and columns of B (PEFT writes the smaller tensor,
which then fails to load); ``use_rslora`` is cleared (PEFT keeps it, scaling the result by √rank); the
target modules are the union of the inputs', or, when the inputs narrow them differently
(``layers_to_transform``, ``exclude_modules``, regex and list mixed), the exact module paths that have tensors.

DARE draws its masks from a CPU ``torch.Generator`` seeded per module with ``module_seed(seed, module)``, A's
masks (input order) before B's for the factor-wise methods, each mask ``torch.bernoulli(full(shape, density))``
of the tensor in [out, in] layout: the same draws PEFT's ``merge_utils.dare_*`` make after
``torch.manual_seed(module_seed(seed, module))``. PEFT's own call cannot be reproduced from a seed: it draws
from the global RNG after initialising the new adapter's factors (which consumes it), walks the modules in the
model's order, and for fan_in_fan_out and embedding layers masks the transposed Δ.

Streaming: one module at a time (its inputs' factors, and for the pruning SVD methods their dense Δᵢ); the
output header is known from the inputs' headers before any weight is read. Plain ``svd`` without clamping
never builds the dense Δ: B·A = B_cat·A_cat has rank ≤ Σ rᵢ, so QR of both factors and the SVD of the small
core give the same truncation. Float32 throughout; the output tensors are F32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loreg.registry.errors import (
    CombinationInvalidError,
    DtypeUnsupportedError,
    MergeUnsupportedError,
    NonFiniteValuesError,
    RankMismatchError,
    ShapeMismatchError,
)
from loreg.registry.formats import lora
from loreg.registry.formats.safetensors import Header, TensorInfo, read_header_from_file

METHODS = (
    "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
    "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
)
SVD_METHODS = frozenset({"svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"})
FACTOR_METHODS = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"} | (SVD_METHODS - {"svd"}))
SIGN_METHODS = frozenset({"ties", "dare_ties", "ties_svd", "dare_ties_svd"})
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
SIGN_RULES = ("total", "frequency")

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# What add_weighted_adapter cannot combine, by the rules module's tensor kind (named in the refusal).
_UNCOMBINABLE = {
    lora.MAGNITUDE: "a DoRA magnitude vector",
    lora.LORA_B_BIAS: "a lora_B bias (lora_bias=true)",
    lora.TRAINABLE_TOKENS: "trainable token rows",
}
_FACTOR_SIDES = {lora.LORA_A: "A", lora.LORA_B: "B", lora.EMBEDDING_A: "A_emb", lora.EMBEDDING_B: "B_emb"}
_BASE_COPY = ".base_layer.weight"  # PEFT saves the embedding's base weights with embedding LoRA (vocab check)


# ------------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class CombineParams:
    method: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: str | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None


def _invalid(message: str, hint: str, **detail: Any) -> CombinationInvalidError:
    return CombinationInvalidError(message, detail=detail, hint=hint)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unused(params: CombineParams, field: str, methods: frozenset[str]) -> None:
    if getattr(params, field) is not None and params.method not in methods:
        raise _invalid(
            f"{field} does not apply to method {params.method!r}",
            f"{field} is used by: {', '.join(m for m in METHODS if m in methods)}",
            parameter=field,
        )


def check_params(params: CombineParams, n_inputs: int) -> CombineParams:
    """Refuse unknown methods and out-of-range or unused parameters; fill in the defaults.

    The result is canonical: two requests that mean the same combination compare equal.
    """
    if params.method not in METHODS:
        raise _invalid(f"unknown combination method {params.method!r}", f"choose one of {', '.join(METHODS)}",
                       parameter="method")
    if n_inputs < 1:
        raise _invalid("no adapters to combine", "name at least one adapter")
    weights = tuple(params.weights)
    if len(weights) != n_inputs:
        raise _invalid(f"{len(weights)} weights for {n_inputs} adapters", "give one weight per adapter",
                       parameter="weights")
    if not all(_is_number(w) and math.isfinite(w) for w in weights):
        raise _invalid("weights must be finite numbers", "negative weights subtract an adapter; NaN and inf are refused",
                       parameter="weights")
    for field, methods in (("density", DENSITY_METHODS), ("majority_sign_method", SIGN_METHODS),
                           ("svd_rank", SVD_METHODS), ("svd_clamp", SVD_METHODS), ("seed", RANDOM_METHODS)):
        _unused(params, field, methods)
    density = params.density
    if params.method in DENSITY_METHODS:
        if density is None or not _is_number(density) or not 0 < density <= 1:
            raise _invalid(f"method {params.method!r} needs a density in (0, 1], got {density!r}",
                           "density is the fraction of entries kept, e.g. 0.5", parameter="density")
        density = float(density)
    sign = params.majority_sign_method
    if params.method in SIGN_METHODS:
        sign = sign or "total"
        if sign not in SIGN_RULES:
            raise _invalid(f"unknown majority_sign_method {sign!r}", "choose total or frequency",
                           parameter="majority_sign_method")
    if params.svd_rank is not None and (not isinstance(params.svd_rank, int) or isinstance(params.svd_rank, bool)
                                        or params.svd_rank < 1):
        raise _invalid(f"svd_rank must be a positive integer, got {params.svd_rank!r}",
                       "omit it to keep the largest input rank", parameter="svd_rank")
    clamp = params.svd_clamp
    if clamp is not None and (not _is_number(clamp) or not 0 < clamp <= 1):
        raise _invalid(f"svd_clamp must be a quantile in (0, 1], got {clamp!r}", "e.g. 0.99, or omit it",
                       parameter="svd_clamp")
    seed = params.seed
    if params.method in RANDOM_METHODS:
        seed = 0 if seed is None else seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise _invalid(f"seed must be an integer in [0, 2^63), got {seed!r}", "e.g. 0", parameter="seed")
    return replace(params, weights=tuple(float(w) for w in weights), density=density,
                   majority_sign_method=sign, svd_clamp=None if clamp is None else float(clamp), seed=seed)


def effective_method(method: str, n_inputs: int) -> str:
    """PEFT combines a single adapter linearly whatever the method asked for."""
    return "linear" if n_inputs == 1 else method


def module_seed(seed: int, module: str) -> int:
    """The torch seed of ``module``'s DARE masks: independent of module order, so streaming needs no global RNG."""
    digest = hashlib.sha256(f"{seed}\0{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------------
# one module


@dataclass(frozen=True)
class Factors:
    a: Any  # torch tensor [r, in, *kernel]
    b: Any  # torch tensor [out, r, *ones]
    scale: float  # the input's PEFT scaling for this module
    weight: float


def _pad(torch: Any, a: Any, b: Any, rank: int) -> tuple[Any, Any]:
    r = a.shape[0]
    if r == rank:
        return a, b
    a_out = torch.zeros((rank, *a.shape[1:]), dtype=a.dtype, device=a.device)
    b_out = torch.zeros((b.shape[0], rank, *b.shape[2:]), dtype=b.dtype, device=b.device)
    a_out[:r] = a
    b_out[:, :r] = b
    return a_out, b_out


def _magnitude_prune(torch: Any, t: Any, density: float) -> Any:
    if density >= 1:
        return t
    flat = t.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _random_prune(torch: Any, t: Any, density: float, gen: Any) -> Any:
    if density >= 1:
        return t
    probs = torch.full(tuple(t.shape), density, dtype=t.dtype)
    mask = torch.bernoulli(probs, generator=gen).to(t.device)
    return t * mask / density


def _task_merge(torch: Any, kind: str, tensors: list[Any], weights: list[float], p: CombineParams, gen: Any) -> Any:
    """merge_utils' task arithmetic / TIES / DARE / magnitude pruning of same-shaped task tensors."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(torch, t, p.density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(torch, t, p.density, gen) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if p.majority_sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _generator(torch: Any, p: CombineParams, module: str) -> Any:
    if p.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(module_seed(p.seed, module))


def _factorwise(torch: Any, fs: Sequence[Factors], p: CombineParams, rank: int, gen: Any) -> tuple[Any, Any]:
    ranks = {f.a.shape[0] for f in fs}
    if len(ranks) != 1:
        raise RankMismatchError(f"method {p.method!r} needs equal ranks, got {sorted(ranks)}",
                                hint="use cat or an svd method for adapters of different ranks")
    scaled = [f.weight * f.scale for f in fs]
    w_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]  # the sign on one side only
    w_b = [math.sqrt(abs(x)) for x in scaled]
    a = _task_merge(torch, p.method, [f.a for f in fs], w_a, p, gen)
    b = _task_merge(torch, p.method, [f.b for f in fs], w_b, p, gen)
    return _pad(torch, a, b, rank)


def _cat(torch: Any, fs: Sequence[Factors], rank: int) -> tuple[Any, Any]:
    a = torch.cat([f.a * f.weight * f.scale for f in fs], dim=0)
    b = torch.cat([f.b for f in fs], dim=1)
    return _pad(torch, a, b, rank)


def _truncate(torch: Any, u: Any, s: Any, vh: Any, k: int) -> tuple[Any, Any]:
    """(U_k·S_k, V_kᵀ), zero-padded when Δ has fewer than k singular values."""
    m = min(k, s.shape[0])
    us = u[:, :m] * s[:m]
    v = vh[:m]
    if m < k:
        us = torch.cat([us, us.new_zeros((us.shape[0], k - m))], dim=1)
        v = torch.cat([v, v.new_zeros((k - m, v.shape[1]))], dim=0)
    return us, v


def _svd_lowrank(torch: Any, fs: Sequence[Factors], k: int) -> tuple[Any, Any]:
    b_cat = torch.cat([f.b.reshape(f.b.shape[0], -1) for f in fs], dim=1)
    a_cat = torch.cat([(f.a.reshape(f.a.shape[0], -1) * f.weight) * f.scale for f in fs], dim=0)
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return _truncate(torch, qb @ u, s, vh @ qa.T, k)


def _svd(torch: Any, fs: Sequence[Factors], p: CombineParams, rank: int, gen: Any) -> tuple[Any, Any]:
    a0, b0 = fs[0].a, fs[0].b
    if p.method == "svd" and p.svd_clamp is None:
        us, vh = _svd_lowrank(torch, fs, rank)
    else:
        deltas = [(f.b.reshape(f.b.shape[0], -1) @ f.a.reshape(f.a.shape[0], -1)) * f.scale for f in fs]
        kind = "linear" if p.method == "svd" else p.method[: -len("_svd")]
        delta = _task_merge(torch, kind, deltas, [f.weight for f in fs], p, gen)
        del deltas
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us, vh = _truncate(torch, u, s, vh, rank)
    if p.svd_clamp is not None:
        hi = torch.quantile(torch.cat([us.flatten(), vh.flatten()]), p.svd_clamp)
        us, vh = us.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh.reshape(rank, *a0.shape[1:]).contiguous(), us.reshape(b0.shape[0], rank, *b0.shape[2:]).contiguous()


def combine_factors(factors: Sequence[Factors], params: CombineParams, rank: int, *, module: str = "") -> tuple[Any, Any]:
    """One module's combined (A, B), float32, rank ``rank``; ``params`` as returned by check_params.

    ``factors`` are the inputs that adapt this module, in input order, on one device; ``module`` seeds DARE.
    """
    import torch

    fs = [replace(f, a=f.a.to(torch.float32), b=f.b.to(torch.float32)) for f in factors]
    gen = _generator(torch, params, module)
    with torch.no_grad():
        if params.method == "cat":
            return _cat(torch, fs, rank)
        if params.method in SVD_METHODS:
            return _svd(torch, fs, params, rank, gen)
        return _factorwise(torch, fs, params, rank, gen)


# ------------------------------------------------------------------------------------------------
# folders: plan


@dataclass(frozen=True)
class CombineInput:
    name: str  # how errors name this input (a reference, a folder name)
    folder: Path  # holds adapter_model.safetensors
    config: Any  # formats.peft.AdapterConfig or a look-alike (see the module docstring)


@dataclass(frozen=True)
class _Part:
    input: int
    a: TensorInfo
    b: TensorInfo
    scale: float


@dataclass(frozen=True)
class _Module:
    name: str
    embedding: bool
    parts: tuple[_Part, ...]
    a_shape: tuple[int, ...]  # of the result
    b_shape: tuple[int, ...]


@dataclass(frozen=True)
class CombinePlan:
    params: CombineParams  # checked; method is the effective one
    requested: str  # the method asked for
    rank: int
    modules: tuple[_Module, ...]
    copies: tuple[tuple[str, tuple[tuple[int, TensorInfo], ...]], ...]  # output key, (input, tensor) holding it
    headers: tuple[Header, ...]
    config: dict[str, Any]
    header_bytes: bytes


@dataclass(frozen=True)
class CombineResult:
    method: str  # the effective method
    rank: int
    modules: int
    config: dict[str, Any]


def _refuse(message: str, hint: str, **detail: Any) -> MergeUnsupportedError:
    return MergeUnsupportedError(message, detail=detail, hint=hint)


def _check_config(inp: CombineInput) -> None:
    c = inp.config
    refusals = (
        (c.use_dora, "it is a DoRA adapter: no method can combine its magnitude vectors",
         "PEFT's add_weighted_adapter would drop them; combine plain LoRA adapters"),
        (c.lora_bias, "it trains lora_B biases (lora_bias=true), which no method combines", "retrain without lora_bias"),
        (c.bias != "none", f"it trains base biases (bias={c.bias!r}), which no method combines",
         "combine adapters trained with bias='none'"),
        (bool(c.modules_to_save), "it stores modules_to_save copies, which no method combines",
         "combine adapters without modules_to_save"),
        (bool(c.target_parameters), "it targets nn.Parameters (target_parameters), which PEFT cannot combine",
         "combine adapters of nn.Linear/Conv1D/embedding modules"),
        (bool(c.trainable_token_indices), "it trains token rows (trainable_token_indices), which no method combines",
         "combine adapters without trainable tokens"),
    )
    for bad, why, hint in refusals:
        if bad:
            raise _refuse(f"adapter {inp.name!r} cannot be combined: {why}", hint, adapter=inp.name)


def _split(key: str) -> tuple[str, str, str]:
    """(module, suffix, what): what is "A"/"B"/"A_emb"/"B_emb", "copy" or a description of what cannot combine."""
    full = "a full tensor (modules_to_save or a trained bias)"
    try:
        tk = lora.parse_tensor_key(key)
    except lora.TensorKeyError:
        return key, "", full
    if tk.kind in _FACTOR_SIDES:
        return tk.module, "", _FACTOR_SIDES[tk.kind]
    if tk.kind in _UNCOMBINABLE:
        return tk.module, "", _UNCOMBINABLE[tk.kind]
    if tk.kind == lora.BASE_LAYER and tk.param == "weight":
        return tk.module, _BASE_COPY, "copy"
    if ".modules_to_save." in key:
        return tk.module, "", "a modules_to_save copy"
    return tk.module, "", full


def _max_rank(config: Any) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


def _collect(inputs: Sequence[CombineInput], headers: Sequence[Header]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """{module: [(input, A, B, embedding)]} and {copy key: [(input, info)]}, refusing what cannot combine."""
    factors: dict[str, list[Any]] = {}
    copies: dict[str, list[Any]] = {}
    for i, (inp, header) in enumerate(zip(inputs, headers)):
        found: dict[str, dict[str, TensorInfo]] = {}
        for key, info in header.tensors.items():
            module, suffix, what = _split(key)
            if what == "copy":
                copies.setdefault(lora.PEFT_PREFIX + module + suffix, []).append((i, info))
            elif what in ("A", "B", "A_emb", "B_emb"):
                if info.dtype not in _TORCH_DTYPES:
                    raise DtypeUnsupportedError(f"adapter {inp.name!r}: tensor {key!r} is {info.dtype}",
                                                detail={"adapter": inp.name, "key": key}, hint="use F32, F16 or BF16")
                found.setdefault(module, {})[what] = info
            else:
                raise _refuse(f"adapter {inp.name!r} cannot be combined: {key!r} is {what}",
                              "combine plain LoRA adapters (A and B factors only)", adapter=inp.name, key=key)
        for module, kinds in found.items():
            emb = "A_emb" in kinds or "B_emb" in kinds
            a, b = kinds.get("A_emb" if emb else "A"), kinds.get("B_emb" if emb else "B")
            if a is None or b is None or len(kinds) != 2:
                raise _refuse(f"adapter {inp.name!r}: module {module!r} lacks a matching A/B pair",
                              "validate the adapter first", adapter=inp.name, module=module)
            factors.setdefault(module, []).append((i, a, b, emb))
    return factors, copies


def _check_module(name: str, inputs: Sequence[CombineInput], parts: list[Any], method: str) -> None:
    first_i, first_a, first_b, emb = parts[0]
    for i, a, b, e in parts:
        who = [inputs[first_i].name, inputs[i].name]
        if e != emb:
            raise _refuse(f"module {name!r} is an embedding in one adapter and not in the other", "combine adapters of "
                          "one base", module=name, adapters=who)
        if len(a.shape) != len(b.shape) or a.shape[0] != b.shape[1] or a.shape[1:] != first_a.shape[1:] \
                or b.shape[:1] + b.shape[2:] != first_b.shape[:1] + first_b.shape[2:]:
            raise ShapeMismatchError(
                f"module {name!r}: factors {list(a.shape)}/{list(b.shape)} of {inputs[i].name!r} do not fit "
                f"{list(first_a.shape)}/{list(first_b.shape)} of {inputs[first_i].name!r}",
                detail={"module": name, "adapters": who}, hint="combine adapters trained on the same base")
        if method in FACTOR_METHODS and a.shape[0] != first_a.shape[0]:
            raise RankMismatchError(
                f"method {method!r} needs equal ranks: module {name!r} has rank {first_a.shape[0]} in "
                f"{inputs[first_i].name!r} and {a.shape[0]} in {inputs[i].name!r}",
                detail={"module": name, "adapters": who, "ranks": [first_a.shape[0], a.shape[0]]},
                hint="use cat or an svd method for adapters of different ranks")
    if method in SVD_METHODS and len(first_a.shape) not in (2, 4):
        raise _refuse(f"method {method!r} cannot combine module {name!r}: SVD handles Linear, Conv1D, embedding "
                      f"and Conv2d LoRA, not a {len(first_a.shape) - 1}-d convolution",
                      "use cat or a factor-wise method (linear, ties, ...)", module=name)


def _result_rank(inputs: Sequence[CombineInput], p: CombineParams, modules: dict[str, list[Any]]) -> int:
    ranks = [_max_rank(inp.config) for inp in inputs]
    if p.method == "cat":
        return sum(ranks)
    if p.method in FACTOR_METHODS:
        if len(set(ranks)) != 1:
            raise RankMismatchError(
                f"method {p.method!r} needs adapters of one rank, got "
                + ", ".join(f"{inp.name!r}: r={r}" for inp, r in zip(inputs, ranks)),
                detail={"adapters": [inp.name for inp in inputs], "ranks": ranks},
                hint="use cat or an svd method for adapters of different ranks")
        return ranks[0]
    rank = p.svd_rank or max(ranks)
    allowed = {name: min(parts[0][2].shape[0], math.prod(parts[0][1].shape[1:])) for name, parts in modules.items()}
    name = min(allowed, key=lambda n: (allowed[n], n))
    if rank > allowed[name]:
        # PEFT fails here, or writes factors of another rank than its config says
        raise _invalid(f"svd rank {rank} is larger than module {name!r} allows (at most {allowed[name]})",
                       f"pass svd_rank <= {allowed[name]}", parameter="svd_rank", module=name)
    return rank


def _narrowing(config: Any) -> str:
    raw = config.raw
    return json.dumps([raw.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules")], sort_keys=True)


def _new_config(inputs: Sequence[CombineInput], rank: int, modules: Sequence[str]) -> dict[str, Any]:
    """PEFT's: the first input's config with r = lora_alpha = rank and the target modules' union."""
    config = dict(inputs[0].config.raw)
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    targets = [inp.config.target_modules for inp in inputs]
    same_narrowing = len({_narrowing(inp.config) for inp in inputs}) == 1
    if same_narrowing and all(isinstance(t, list) for t in targets):
        config["target_modules"] = sorted(set().union(*targets))
    elif same_narrowing and all(isinstance(t, str) and t.lower() != "all-linear" for t in targets):
        config["target_modules"] = "|".join(f"({t})" for t in targets)
    else:  # the inputs select modules differently: name exactly the modules the result adapts
        config.update(target_modules=sorted(modules), layers_to_transform=None, layers_pattern=None,
                      exclude_modules=None)
    return config


def _header_bytes(entries: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in entries:
        end = offset + 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _factor_keys(module: _Module) -> tuple[str, str]:
    if module.embedding:
        return f"{lora.PEFT_PREFIX}{module.name}.lora_embedding_A", f"{lora.PEFT_PREFIX}{module.name}.lora_embedding_B"
    return f"{lora.PEFT_PREFIX}{module.name}.lora_A.weight", f"{lora.PEFT_PREFIX}{module.name}.lora_B.weight"


def plan_combination(inputs: Sequence[CombineInput], params: CombineParams,
                     headers: Sequence[Header] | None = None) -> CombinePlan:
    """Check the inputs and parameters against each other and lay out the result; reads headers only
    (``headers``: the inputs' headers read already, e.g. from a blob store at request time)."""
    requested = check_params(params, len(inputs))
    p = replace(requested, method=effective_method(requested.method, len(inputs)))
    for inp in inputs:
        _check_config(inp)
    if headers is None:
        headers = tuple(read_header_from_file(Path(inp.folder) / ADAPTER_FILE) for inp in inputs)
    headers = tuple(headers)
    found, copies = _collect(inputs, headers)
    if not found:
        raise _refuse("the adapters hold no LoRA factors to combine", "check the inputs")
    for name, parts in found.items():
        _check_module(name, inputs, parts, p.method)
    rank = _result_rank(inputs, p, found)
    modules = []
    for name in sorted(found):
        parts = found[name]
        _, a, b, emb = parts[0]
        scales = [inputs[i].config.scaling_for(name) for i, *_ in parts]
        modules.append(_Module(name, emb, tuple(_Part(i, pa, pb, s) for (i, pa, pb, _), s in zip(parts, scales)),
                               (rank, *a.shape[1:]), (b.shape[0], rank, *b.shape[2:])))
    entries = [(key, held[0][1].shape) for key, held in sorted(copies.items())]
    for m in modules:
        key_a, key_b = _factor_keys(m)
        entries += [(key_a, m.a_shape), (key_b, m.b_shape)]
    return CombinePlan(p, requested.method, rank, tuple(modules), tuple(sorted((k, tuple(v)) for k, v in copies.items())),
                       headers, _new_config(inputs, rank, [m.name for m in modules]), _header_bytes(entries))


# ------------------------------------------------------------------------------------------------
# folders: streaming


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _read(torch: Any, fd: int, header: Header, info: TensorInfo) -> Any:
    buf = bytearray(info.nbytes)
    view, pos = memoryview(buf), header.data_offset + info.start
    while view:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise ShapeMismatchError(f"tensor {info.name!r} is cut short", detail={"key": info.name})
        view, pos = view[n:], pos + n
    dtype = getattr(torch, _TORCH_DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=dtype)


def _copy_tensor(torch: Any, fds: Sequence[int], plan: CombinePlan, key: str, held: Sequence[tuple[int, TensorInfo]]) -> Any:
    """A base copy PEFT saved beside embedding LoRA: every input holding it must agree (one base)."""
    first = _read(torch, fds[held[0][0]], plan.headers[held[0][0]], held[0][1]).to(torch.float32)
    for i, info in held[1:]:
        other = _read(torch, fds[i], plan.headers[i], info).to(torch.float32)
        if other.shape != first.shape or not torch.equal(other, first):
            raise ShapeMismatchError(f"{key!r} differs between the adapters: they were trained on different bases",
                                     detail={"key": key}, hint="combine adapters of one base")
    return first


def _combine_module(torch: Any, fds: Sequence[int], plan: CombinePlan, weights: Sequence[float], module: _Module,
                    device: str) -> tuple[Any, Any]:
    factors = [
        Factors(_read(torch, fds[part.input], plan.headers[part.input], part.a).to(device),
                _read(torch, fds[part.input], plan.headers[part.input], part.b).to(device),
                part.scale, weights[part.input])
        for part in module.parts
    ]
    a, b = combine_factors(factors, plan.params, plan.rank, module=module.name)
    # NaN and inf survive a sum, which costs far less than isfinite(); only a non-finite sum is looked at closely
    if not all(math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all()) for t in (a, b)):
        raise NonFiniteValuesError(f"the combination of module {module.name!r} is not finite",
                                   detail={"module": module.name}, hint="check the inputs and weights")
    return a, b


@contextlib.contextmanager
def _open_inputs(inputs: Sequence[CombineInput]) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for inp in inputs:
            fds.append(os.open(Path(inp.folder) / ADAPTER_FILE, os.O_RDONLY))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _write(f: Any, torch: Any, tensor: Any) -> None:
    f.write(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def combine_to_dir(inputs: Sequence[CombineInput], params: CombineParams, out_dir: Path, *,
                   device: str = "auto") -> CombineResult:
    """Combine adapter folders into ``out_dir`` (adapter_model.safetensors + adapter_config.json), module by module.

    Raises CombinationInvalidError, RankMismatchError, ShapeMismatchError, MergeUnsupportedError,
    DtypeUnsupportedError or NonFiniteValuesError; on any error the partial files are removed.
    """
    import torch

    plan = plan_combination(inputs, params)
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{ADAPTER_FILE}.partial"
    try:
        with _open_inputs(inputs) as fds, open(partial, "wb") as f:
            f.write(plan.header_bytes)
            for key, held in plan.copies:
                _write(f, torch, _copy_tensor(torch, fds, plan, key, held))
            for module in plan.modules:
                a, b = _combine_module(torch, fds, plan, plan.params.weights, module, device)
                _write(f, torch, a)
                _write(f, torch, b)
            f.flush()
            os.fsync(f.fileno())
        (out_dir / CONFIG_FILE).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        os.replace(partial, out_dir / ADAPTER_FILE)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return CombineResult(plan.params.method, plan.rank, len(plan.modules), plan.config)
