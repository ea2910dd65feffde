"""Combining adapters (registry/merge/combine.py) against PEFT's own add_weighted_adapter on real PEFT adapters."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest

from loreg.registry.errors import CombinationInvalidError, MergeUnsupportedError, RankMismatchError
from loreg.registry.formats.peft import parse_adapter_config
from loreg.registry.merge import combine
from loreg.registry.merge.combine import CombineInput, CombineParams, Factors
from tests import factories

torch = pytest.importorskip("torch")

# family -> (targets of the first adapter, targets of the second: a superset, so some modules have one input)
TARGETS = {
    "llama": (["q_proj", "v_proj"], ["q_proj", "v_proj", "o_proj", "embed_tokens"]),
    "gpt2": (["c_attn"], ["c_attn", "c_fc"]),  # Conv1D: fan_in_fan_out
    "bert": (["query", "value"], ["query", "value", "key"]),
}
CONV_TARGETS = (["q_proj", "projection"], ["projection", "v_proj"])  # ViT (test_conv2d_*)
WEIGHTS = (0.7, -0.4)
# density 1 keeps DARE deterministic in PEFT too (PEFT cannot be seeded per module; see test_dare_* below)
PARAMS: dict[str, dict[str, Any]] = {
    "cat": {}, "svd": {}, "linear": {},
    "ties_svd": {"density": 0.5, "majority_sign_method": "frequency"},
    "dare_linear_svd": {"density": 1.0}, "dare_ties_svd": {"density": 1.0, "majority_sign_method": "frequency"},
    "magnitude_prune_svd": {"density": 0.6},
    "ties": {"density": 0.5}, "dare_linear": {"density": 1.0}, "dare_ties": {"density": 1.0},
    "magnitude_prune": {"density": 0.7},
}
PROMPT = [[1, 5, 9, 14, 3, 77, 2, 100]]


class Family:
    def __init__(self, root: Path, family: str):
        self.family = family
        self.base = factories.make_base(root / "base", family)
        first, second = CONV_TARGETS if family == "vit" else TARGETS[family]
        self.adapters = [
            factories.make_adapter(root / "a0", family, base_dir=self.base, seed=11, target_modules=first),
            factories.make_adapter(root / "a1", family, base_dir=self.base, seed=12, target_modules=second,
                                   lora_alpha=8),
        ]
        self.peft = factories.load_adapter_model(self.base, self.adapters[0])
        with factories._quiet():
            self.peft.load_adapter(str(self.adapters[1]), adapter_name="a1")
        self.n = 0

    def inputs(self, folders: list[Path] | None = None) -> list[CombineInput]:
        folders = folders or self.adapters
        return [CombineInput(f.name, f, parse_adapter_config((f / "adapter_config.json").read_bytes())) for f in folders]

    def peft_combined(self, names: list[str], weights: tuple[float, ...], method: str, **kw: Any) -> tuple[str, dict]:
        from peft.utils import get_peft_model_state_dict

        self.n += 1
        name = f"comb{self.n}"
        with factories._quiet(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The density 1.0 is greater than or equal to 1")
            self.peft.add_weighted_adapter(names, list(weights), name, combination_type=method, **kw)
            state = get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False)
        return name, state

    def peft_merged_logits(self, name: str) -> Any:
        self.peft.merge_adapter(adapter_names=[name])
        try:
            with torch.no_grad():
                return _logits(self.peft.get_base_model())
        finally:
            with warnings.catch_warnings():  # layers the combination does not adapt were never merged
                warnings.filterwarnings("ignore", message="Already unmerged")
                self.peft.unmerge_adapter()

    def our_merged_logits(self, out: Path) -> Any:
        model = factories.load_adapter_model(self.base, out).merge_and_unload()
        with torch.no_grad():
            return _logits(model)


def _logits(model: Any) -> Any:
    if model.config.model_type == "vit":
        return model(pixel_values=torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)).logits
    return model(input_ids=torch.tensor(PROMPT)).logits


@pytest.fixture(scope="module", params=sorted(TARGETS))
def fam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp(request.param), request.param)


def _rel(x: Any, y: Any) -> float:
    return float((x - y).norm() / y.norm())


def _products(state: dict[str, Any]) -> dict[str, Any]:
    """B·A per module (SVD factors have free signs, the product does not)."""
    out = {}
    for key, a in state.items():
        for sa, sb in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(sa):
                out[key[: -len(sa)]] = state[key[: -len(sa)] + sb] @ a
    return out


@pytest.mark.parametrize("method", list(PARAMS))
def test_combination_matches_peft_add_weighted_adapter(fam: Family, method: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    kw = PARAMS[method]
    result = combine.combine_to_dir(fam.inputs(), CombineParams(method, WEIGHTS, **kw), tmp_path / "out", device="cpu")
    name, expected = fam.peft_combined(["default", "a1"], WEIGHTS, method, **kw)
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {k for k in ours if ".base_layer." not in k} == set(expected)
    if method in combine.SVD_METHODS:
        theirs = _products(expected)
        got = _products(ours)
        assert set(got) == set(theirs) and len(got) > 0
        for key in theirs:
            assert _rel(got[key], theirs[key]) < 1e-5, key
    else:
        for key in expected:
            assert ours[key].shape == expected[key].shape, key
            assert _rel(ours[key], expected[key]) < 1e-5 if expected[key].norm() > 0 else torch.equal(ours[key], expected[key])
    assert result.rank == {"cat": 16}.get(method, 8) and result.method == method
    config = parse_adapter_config((tmp_path / "out" / "adapter_config.json").read_bytes())
    assert config.r == config.lora_alpha == result.rank
    assert config.target_modules == sorted(set(TARGETS[fam.family][0]) | set(TARGETS[fam.family][1]))
    torch.testing.assert_close(fam.our_merged_logits(tmp_path / "out"), fam.peft_merged_logits(name), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp("vit"), "vit")


@pytest.mark.parametrize("method", ["cat", "svd", "ties_svd", "ties"])
def test_conv2d_lora_combines_like_peft(vit: Family, method: str, tmp_path: Path) -> None:
    # ViT's patch embedding is a Conv2d with an 8x8 kernel: A is [r, 3, 8, 8], B [32, r, 1, 1]
    from safetensors.torch import load_file

    kw = PARAMS[method]
    combine.combine_to_dir(vit.inputs(), CombineParams(method, WEIGHTS, **kw), tmp_path, device="cpu")
    name, expected = vit.peft_combined(["default", "a1"], WEIGHTS, method, **kw)
    ours = load_file(tmp_path / "adapter_model.safetensors")
    conv = "base_model.model.vit.embeddings.patch_embeddings.projection"
    assert ours[f"{conv}.lora_A.weight"].shape == expected[f"{conv}.lora_A.weight"].shape
    theirs = _products({k: v.flatten(1) if v.dim() == 4 else v for k, v in expected.items()})
    got = _products({k: v.flatten(1) if v.dim() == 4 else v for k, v in ours.items()})
    assert set(got) == set(theirs) and f"{conv}" in got
    for key in theirs:
        assert _rel(got[key], theirs[key]) < 1e-5, key
    torch.testing.assert_close(vit.our_merged_logits(tmp_path), vit.peft_merged_logits(name), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    fam = Family(tmp_path_factory.mktemp("llama-ranks"), "llama")
    root = fam.base.parent
    fam.adapters.append(factories.make_adapter(root / "a2", "llama", base_dir=fam.base, seed=13, r=4, lora_alpha=4,
                                               target_modules=["q_proj", "k_proj"]))
    with factories._quiet():
        fam.peft.load_adapter(str(fam.adapters[2]), adapter_name="a2")
    return fam


@pytest.mark.parametrize(("method", "kw"), [("cat", {}), ("svd", {}), ("svd", {"svd_rank": 12, "svd_clamp": 0.9}),
                                            ("ties_svd", {"density": 0.3, "svd_rank": 3})])
def test_adapters_of_different_ranks_combine_like_peft(llama: Family, method: str, kw: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weights = (1.0, 0.5)
    folders = [llama.adapters[0], llama.adapters[2]]
    result = combine.combine_to_dir(llama.inputs(folders), CombineParams(method, weights, **kw), tmp_path, device="cpu")
    name, expected = llama.peft_combined(["default", "a2"], weights, method, **kw)
    theirs, got = _products(expected), _products(load_file(tmp_path / "adapter_model.safetensors"))
    assert set(got) == set(theirs)
    for key in theirs:
        assert _rel(got[key], theirs[key]) < 1e-5, key
    assert result.rank == {"cat": 12}.get(method, kw.get("svd_rank", 8))
    torch.testing.assert_close(llama.our_merged_logits(tmp_path), llama.peft_merged_logits(name), rtol=1e-4, atol=1e-5)


def test_cat_pads_a_module_of_lower_rank_so_the_result_loads(llama: Family, tmp_path: Path) -> None:
    # k_proj is adapted only by the r=4 input: PEFT would write [4, in] under r=12
    from safetensors.torch import load_file

    folders = [llama.adapters[0], llama.adapters[2]]
    combine.combine_to_dir(llama.inputs(folders), CombineParams("cat", (1.0, 1.0)), tmp_path, device="cpu")
    k_a = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    assert k_a.shape[0] == 12 and not k_a[4:].any() and k_a[:4].any()
    llama.our_merged_logits(tmp_path)  # loads in PeftModel.from_pretrained


# ------------------------------------------------------------------------------------------------
# DARE: seeded per module


def _factor_sets(n: int, rank: int = 4, out: int = 24, inp: int = 20) -> list[Factors]:
    gen = torch.Generator().manual_seed(5)
    return [Factors(torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen), 0.5 + i, 1.0 - 0.3 * i)
            for i in range(n)]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_draws_what_peft_merge_utils_draws_after_the_module_seed(method: str) -> None:
    from peft.utils import merge_utils

    fs = _factor_sets(3)
    params = combine.check_params(CombineParams(method, tuple(f.weight for f in fs), density=0.4, seed=7), 3)
    a, b = combine.combine_factors(fs, params, 4, module="model.layers.0.q_proj")
    torch.manual_seed(combine.module_seed(7, "model.layers.0.q_proj"))
    if method.endswith("_svd"):
        deltas = [(f.b @ f.a) * f.scale for f in fs]
        fn = merge_utils.dare_linear if method == "dare_linear_svd" else merge_utils.dare_ties
        delta = fn(deltas, torch.tensor([f.weight for f in fs]), 0.4)
        u, s, vh = torch.linalg.svd(delta)
        assert _rel(b @ a, (u[:, :4] * s[:4]) @ vh[:4]) < 1e-5
    else:
        fn = getattr(merge_utils, method)
        scaled = [f.weight * f.scale for f in fs]
        w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled])
        w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
        assert _rel(a, fn([f.a for f in fs], w_a, 0.4)) < 1e-6
        assert _rel(b, fn([f.b for f in fs], w_b, 0.4)) < 1e-6


def test_dare_keeps_the_density_and_rescales_the_kept_entries() -> None:
    f = Factors(torch.full((64, 256), 2.0), torch.full((64, 64), 3.0), scale=4.0, weight=1.0)
    params = combine.check_params(CombineParams("dare_linear", (1.0,), density=0.25, seed=1), 1)
    a, b = combine.combine_factors([f], params, 64, module="m")
    for got, value in ((a, 2.0 * 2.0 / 0.25), (b, 3.0 * 2.0 / 0.25)):  # √(w·s) = 2 on each side
        kept = got != 0
        assert torch.equal(got[kept], torch.full_like(got[kept], value))
        n, frac = got.numel(), float(kept.float().mean())
        assert abs(frac - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(llama: Family, tmp_path: Path) -> None:
    def run(seed: int, dest: str) -> bytes:
        params = CombineParams("dare_ties", WEIGHTS, density=0.5, seed=seed)
        combine.combine_to_dir(llama.inputs(llama.adapters[:2]), params, tmp_path / dest, device="cpu")
        return (tmp_path / dest / "adapter_model.safetensors").read_bytes()

    assert run(3, "x") == run(3, "y")
    assert run(3, "x") != run(4, "z")


# ------------------------------------------------------------------------------------------------
# refusals: each leaves nothing in the output folder


def _refused(fam: Family, folders: list[Path], params: CombineParams, tmp_path: Path, error: type) -> Any:
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        combine.combine_to_dir(fam.inputs(folders), params, out, device="cpu")
    assert not out.exists() or not any(out.iterdir())
    return info.value


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_unequal_ranks_are_refused_for_factor_wise_methods(llama: Family, method: str, tmp_path: Path) -> None:
    kw = {} if method == "linear" else {"density": 0.5}
    err = _refused(llama, [llama.adapters[0], llama.adapters[2]], CombineParams(method, (1.0, 1.0), **kw), tmp_path,
                   RankMismatchError)
    assert "a0" in err.message and "a2" in err.message and err.hint


@pytest.mark.parametrize(("params", "field"), [
    (CombineParams("ties", (1.0, 1.0), density=0.0), "density"),
    (CombineParams("ties", (1.0, 1.0), density=1.5), "density"),
    (CombineParams("dare_linear", (1.0, 1.0)), "density"),
    (CombineParams("svd", (1.0, 1.0), density=0.5), "density"),
    (CombineParams("ties", (1.0, 1.0), density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (CombineParams("svd", (1.0, 1.0), svd_rank=0), "svd_rank"),
    (CombineParams("svd", (1.0, 1.0), svd_rank=33), "svd_rank"),  # q_proj is 32 x 32
    (CombineParams("svd", (1.0, 1.0), svd_clamp=1.5), "svd_clamp"),
    (CombineParams("linear", (1.0, float("nan"))), "weights"),
    (CombineParams("cat", (1.0, float("inf"))), "weights"),
    (CombineParams("cat", (1.0,)), "weights"),
    (CombineParams("dare_ties", (1.0, 1.0), density=0.5, seed=-1), "seed"),
    (CombineParams("merge_all", (1.0, 1.0)), "method"),
])
def test_bad_parameters_are_refused_naming_the_parameter(llama: Family, params: CombineParams, field: str,
                                                         tmp_path: Path) -> None:
    err = _refused(llama, llama.adapters[:2], params, tmp_path, CombinationInvalidError)
    assert err.detail["parameter"] == field and err.hint


def test_dora_input_is_refused_naming_it(llama: Family, tmp_path: Path) -> None:
    dora = factories.make_adapter(tmp_path / "dora", "llama", base_dir=llama.base, seed=3, use_dora=True)
    err = _refused(llama, [llama.adapters[0], dora], CombineParams("cat", (1.0, 1.0)), tmp_path, MergeUnsupportedError)
    assert "dora" in err.message and "DoRA" in err.message


def test_one_input_combines_linearly_like_peft(llama: Family, tmp_path: Path) -> None:
    result = combine.combine_to_dir(llama.inputs(llama.adapters[:1]), CombineParams("svd", (0.5,)), tmp_path, device="cpu")
    assert result.method == "linear"
    name, _ = llama.peft_combined(["default"], (0.5,), "svd")
    torch.testing.assert_close(llama.our_merged_logits(tmp_path), llama.peft_merged_logits(name), rtol=1e-4, atol=1e-5)


def test_rslora_inputs_keep_their_meaning(llama: Family, tmp_path: Path) -> None:
    # PEFT keeps use_rslora with r = alpha = rank: its result is scaled by sqrt(rank); ours is not
    rs = factories.make_adapter(tmp_path / "rs", "llama", base_dir=llama.base, seed=21, use_rslora=True)
    zero = factories.make_adapter(tmp_path / "zero", "llama", base_dir=llama.base, seed=22)
    combine.combine_to_dir(llama.inputs([rs, zero]), CombineParams("cat", (1.0, 0.0)), tmp_path / "out", device="cpu")
    assert parse_adapter_config((tmp_path / "out" / "adapter_config.json").read_bytes()).use_rslora is False
    expected = factories.load_adapter_model(llama.base, rs).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(llama.our_merged_logits(tmp_path / "out"), _logits(expected), rtol=1e-4, atol=1e-5)


def test_inputs_that_narrow_their_targets_differently_name_the_exact_modules(llama: Family, tmp_path: Path) -> None:
    layer0 = factories.make_adapter(tmp_path / "l0", "llama", base_dir=llama.base, seed=23, layers_to_transform=[0])
    combine.combine_to_dir(llama.inputs([layer0, llama.adapters[2]]), CombineParams("cat", (1.0, 1.0)),
                           tmp_path / "out", device="cpu")
    config = parse_adapter_config((tmp_path / "out" / "adapter_config.json").read_bytes())
    assert config.layers_to_transform is None
    assert config.target_modules == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
    ]
    llama.our_merged_logits(tmp_path / "out")  # the exact paths load in PeftModel.from_pretrained


def test_importing_combine_loads_no_torch_and_no_web_stack() -> None:
    import subprocess
    import sys

    code = ("import sys, loreg.registry.merge.combine; "
            "print(sorted(m for m in ('torch', 'pydantic', 're2', 'fastapi', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
