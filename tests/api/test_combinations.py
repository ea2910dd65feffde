"""Combinations end to end: request, worker, push of the result as a new version, lineage, refusals."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from loreg.cli.client import RegistryClient
from loreg.registry.db.models import Combination, CombinationInput
from loreg.registry.formats.peft import parse_adapter_config
from loreg.registry.merge import combine
from loreg.registry.merge.combine_worker import CombinationWorker
from loreg.registry.merge.worker import JobWorker
from tests import factories
from tests.support.races import count_rows

torch = pytest.importorskip("torch")

WEIGHTS = (0.7, -0.4)
PARAMS: dict[str, dict[str, Any]] = {"cat": {}, "svd": {}, "ties": {"density": 0.5}}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combine-llama")
    base = factories.make_base(root / "base", "llama")
    return {
        "base": base,
        "a": factories.make_adapter(root / "a", "llama", base_dir=base, seed=11, target_modules=["q_proj", "v_proj"]),
        "b": factories.make_adapter(root / "b", "llama", base_dir=base, seed=12,
                                    target_modules=["q_proj", "v_proj", "o_proj"], lora_alpha=8),
        "r4": factories.make_adapter(root / "r4", "llama", base_dir=base, seed=13, target_modules=["q_proj"], r=4),
        "other_base": factories.make_base(root / "base2", "llama", seed=5),
    }


@pytest.fixture
def pushed(bare_client: RegistryClient, family: dict[str, Path]) -> RegistryClient:
    bare_client.register_base(family["base"], factories.base_name("llama"))
    for name in ("a", "b", "r4"):
        bare_client.push(family[name], f"org/{name}")
    return bare_client


def run_jobs(registry: Any) -> None:
    worker = JobWorker(registry, device="cpu")
    while worker.run_once():
        pass


def body(method: str, to: str = "org/mix", **kw: Any) -> dict[str, Any]:
    return {"inputs": [{"ref": "org/a:1", "weight": WEIGHTS[0]}, {"ref": "org/b:1", "weight": WEIGHTS[1]}],
            "method": method, "to": to, **kw}


def peft_state(family: dict[str, Path], method: str, **kw: Any) -> dict[str, Any]:
    from peft.utils import get_peft_model_state_dict

    model = factories.load_adapter_model(family["base"], family["a"])
    with factories._quiet(), warnings.catch_warnings():
        model.load_adapter(str(family["b"]), adapter_name="b")
        model.add_weighted_adapter(["default", "b"], list(WEIGHTS), "comb", combination_type=method, **kw)
        return get_peft_model_state_dict(model, adapter_name="comb", save_embedding_layers=False)


def products(state: dict[str, Any]) -> dict[str, Any]:
    return {k.removesuffix(".lora_A.weight"): state[k.replace(".lora_A.", ".lora_B.")] @ a
            for k, a in state.items() if k.endswith(".lora_A.weight")}


def rel(x: Any, y: Any) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("method", list(PARAMS))
def test_combined_version_loads_in_peft_and_equals_the_combination(
    pushed: RegistryClient, api: Any, registry: Any, family: dict[str, Path], method: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    first = api.post("/v1/combinations", json=body(method, aliases=["prod"], **PARAMS[method]))
    assert first.status_code == 202, first.text
    assert first.json()["state"] == "queued" and first.json()["method"] == method
    run_jobs(registry)
    job = api.get(f"/v1/combinations/{first.json()['id']}").json()
    assert job["state"] == "done" and job["version"] == 1, job
    pushed.pull("org/mix:prod", tmp_path / "got")

    inputs = [combine.CombineInput(f.name, f, parse_adapter_config((f / "adapter_config.json").read_bytes()))
              for f in (family["a"], family["b"])]
    combine.combine_to_dir(inputs, combine.CombineParams(method, WEIGHTS, **PARAMS[method]), tmp_path / "local", device="cpu")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()

    ours, theirs = load_file(tmp_path / "got" / "adapter_model.safetensors"), peft_state(family, method, **PARAMS[method])
    if method == "svd":
        ours, theirs = products(ours), products(theirs)
    assert set(ours) == set(theirs) and theirs
    for key in theirs:
        assert rel(ours[key], theirs[key]) < 1e-5, key
    factories.load_adapter_model(family["base"], tmp_path / "got")  # PeftModel.from_pretrained


def test_lineage_is_shown_on_the_version(pushed: RegistryClient, api: Any, registry: Any) -> None:
    job = api.post("/v1/combinations", json=body("ties", density=0.5, majority_sign_method="frequency")).json()
    run_jobs(registry)
    version = api.get("/v1/adapters/org/mix/versions/1").json()
    made_by = version["made_by"]
    assert made_by["kind"] == "combination" and made_by["id"] == job["id"] and made_by["method"] == "ties"
    assert made_by["params"] == {"density": 0.5, "majority_sign_method": "frequency", "svd_rank": None,
                                 "svd_clamp": None, "seed": None}
    a, b = pushed.version("org/a:1"), pushed.version("org/b:1")
    assert made_by["inputs"] == [{"name": "org/a:1", "digest": a["digest"], "weight": 0.7},
                                 {"name": "org/b:1", "digest": b["digest"], "weight": -0.4}]
    assert api.get("/v1/adapters/org/a/versions/1").json()["made_by"] is None


def test_same_request_twice_is_one_job(pushed: RegistryClient, api: Any, registry: Any) -> None:
    first = api.post("/v1/combinations", json=body("cat"))
    # the same request, with the tag instead of the number and the default spelled out
    again = api.post("/v1/combinations", json={**body("cat"), "inputs": [
        {"ref": "org/a", "weight": 0.7}, {"ref": "org/b:1", "weight": -0.4}]})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert count_rows(registry, Combination) == 1
    run_jobs(registry)
    done = api.post("/v1/combinations", json=body("cat"))
    assert done.status_code == 200 and done.json()["id"] == first.json()["id"] and done.json()["version"] == 1
    assert CombinationWorker(registry, device="cpu").run_once() is None
    assert [v["version"] for v in pushed.versions("org/mix")] == [1]


def test_read_only_token_on_the_target_is_refused(pushed: RegistryClient, api: Any, registry: Any, make_token: Any) -> None:
    reader = make_token("read")
    r = api.post("/v1/combinations", json=body("cat"), headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    other_ns = make_token("write", ["org/a", "org/b", "elsewhere/*"])
    r = api.post("/v1/combinations", json=body("cat"), headers={"Authorization": f"Bearer {other_ns}"})
    assert r.status_code == 403 and "org/mix" in r.json()["errors"][0]["message"]
    assert count_rows(registry, Combination) == 0


def test_token_that_cannot_read_an_input_is_refused(pushed: RegistryClient, api: Any, registry: Any, make_token: Any) -> None:
    writer = make_token("write", ["org/a", "org/mix"])
    r = api.post("/v1/combinations", json=body("cat"), headers={"Authorization": f"Bearer {writer}"})
    assert r.status_code == 403 and "org/b" in r.json()["errors"][0]["message"]
    assert count_rows(registry, Combination) == 0
    job = api.post("/v1/combinations", json=body("cat")).json()
    r = api.get(f"/v1/combinations/{job['id']}", headers={"Authorization": f"Bearer {writer}"})
    assert r.status_code == 403


def test_unequal_ranks_are_refused_naming_the_inputs(pushed: RegistryClient, api: Any, registry: Any) -> None:
    r = api.post("/v1/combinations", json={"inputs": [{"ref": "org/a:1"}, {"ref": "org/r4:1"}], "method": "linear",
                                           "to": "org/mix"})
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["code"] == "RANK_MISMATCH" and "org/r4:1" in err["message"] + str(err.get("detail"))
    assert count_rows(registry, Combination) == 0 and count_rows(registry, CombinationInput) == 0


def test_different_bases_are_refused_naming_the_inputs(
    bare_client: RegistryClient, api: Any, registry: Any, family: dict[str, Path], tmp_path: Path
) -> None:
    bare_client.register_base(family["base"], factories.base_name("llama"))
    bare_client.register_base(family["other_base"], "other/llama")
    other = factories.make_adapter(tmp_path / "o", "llama", base_dir=family["other_base"], seed=3,
                                   target_modules=["q_proj", "v_proj"])
    bare_client.push(family["a"], "org/a")
    bare_client.push(other, "org/o", base="other/llama")
    r = api.post("/v1/combinations", json={"inputs": [{"ref": "org/a:1"}, {"ref": "org/o:1"}], "method": "cat",
                                           "to": "org/mix"})
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["code"] == "MERGE_UNSUPPORTED" and "org/a:1" in err["message"] and "org/o:1" in err["message"]
    assert count_rows(registry, Combination) == 0


@pytest.mark.parametrize(("extra", "parameter"), [
    ({"method": "ties", "density": 1.5}, "density"),
    ({"method": "cat", "density": 0.5}, "density"),
    ({"method": "nope"}, "method"),
])
def test_bad_parameters_are_refused_before_anything_is_stored(
    pushed: RegistryClient, api: Any, registry: Any, extra: dict[str, Any], parameter: str
) -> None:
    r = api.post("/v1/combinations", json={**body("cat"), **extra})
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "COMBINATION_INVALID"
    assert r.json()["errors"][0]["detail"]["parameter"] == parameter
    assert count_rows(registry, Combination) == 0


def test_non_finite_weight_is_refused(pushed: RegistryClient, api: Any, registry: Any) -> None:
    r = api.post("/v1/combinations", content=b'{"inputs": [{"ref": "org/a:1", "weight": 1e400}, {"ref": "org/b:1"}],'
                                             b' "method": "cat", "to": "org/mix"}',
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "COMBINATION_INVALID"
    assert count_rows(registry, Combination) == 0


def test_job_whose_worker_died_is_taken_over(pushed: RegistryClient, api: Any, registry: Any) -> None:
    from datetime import UTC, datetime, timedelta

    job = api.post("/v1/combinations", json=body("cat")).json()
    dead = CombinationWorker(registry, device="cpu", lease_s=30)
    assert dead.claim() is not None  # claimed, then the process died: the lease is never renewed
    later = CombinationWorker(registry, device="cpu", lease_s=30, clock=lambda: datetime.now(UTC) + timedelta(minutes=5))
    assert later.run_once() == job["id"]
    done = api.get(f"/v1/combinations/{job['id']}").json()
    assert done["state"] == "done" and done["attempts"] == 2 and done["version"] == 1


# --- exports of a combination ------------------------------------------------------------------


@pytest.fixture
def with_weights(bare_client: RegistryClient, family: dict[str, Path]) -> RegistryClient:
    bare_client.register_base(family["base"], factories.base_name("llama"), upload_weights=True)
    for name in ("a", "b", "r4"):
        bare_client.push(family[name], f"org/{name}")
    return bare_client


def test_export_with_a_method_merges_the_combination_and_records_it(
    with_weights: RegistryClient, api: Any, registry: Any, family: dict[str, Path], tmp_path: Path
) -> None:
    export = {"adapters": [{"ref": "org/a:1", "weight": WEIGHTS[0]}, {"ref": "org/b:1", "weight": WEIGHTS[1]}]}
    ties = api.post("/v1/exports", json={**export, "method": "ties", "density": 0.5})
    assert ties.status_code == 202, ties.text
    plain = api.post("/v1/exports", json=export)
    assert plain.json()["id"] != ties.json()["id"]  # the method is part of the request key
    run_jobs(registry)
    out = with_weights.export(["org/a:1", "org/b:1"], tmp_path / "merged", weights=list(WEIGHTS),
                              combination={"method": "ties", "density": 0.5})
    assert out["id"] == ties.json()["id"]
    assert out["combination"] == {"method": "ties", "params": {"density": 0.5, "majority_sign_method": "total",
                                                                "svd_rank": None, "svd_clamp": None, "seed": None}}
    assert api.get(f"/v1/exports/{plain.json()['id']}").json()["combination"] is None

    inputs = [combine.CombineInput(f.name, f, parse_adapter_config((f / "adapter_config.json").read_bytes()))
              for f in (family["a"], family["b"])]
    combine.combine_to_dir(inputs, combine.CombineParams("ties", WEIGHTS, density=0.5), tmp_path / "c", device="cpu")
    with_weights.export(["org/a:1", "org/b:1"], tmp_path / "plain", weights=list(WEIGHTS))
    ids = torch.tensor([[1, 5, 9, 14, 3, 77, 2, 100]])
    with torch.no_grad():
        expected = factories.load_adapter_model(family["base"], tmp_path / "c").merge_and_unload()(input_ids=ids).logits
        plain_logits = factories.load_base_model(tmp_path / "plain")(input_ids=ids).logits  # the weighted sum
        ours = factories.load_base_model(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain_logits, atol=1e-5)


def test_export_with_a_method_is_refused_like_a_combination(with_weights: RegistryClient, api: Any, registry: Any) -> None:
    from loreg.registry.db.models import Export

    r = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}, {"ref": "org/r4:1"}], "method": "ties",
                                      "density": 0.5})
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "RANK_MISMATCH"
    r = api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}], "density": 0.5})
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "COMBINATION_INVALID"
    assert count_rows(registry, Export) == 0


def test_the_version_page_shows_what_the_combination_was_made_from(
    pushed: RegistryClient, api: Any, registry: Any, app: Any, admin_token: str
) -> None:
    import re

    from tests.web.test_access import browser, login

    api.post("/v1/combinations", json=body("ties", density=0.5))
    run_jobs(registry)
    a, b = pushed.version("org/a:1"), pushed.version("org/b:1")
    with browser(app) as http:
        login(http, admin_token)
        page = http.get("/ui/adapters/org/mix/versions/1")
        assert page.status_code == 200
        assert re.search(r'id="made-by" data-method="ties">ties, density=0.5, majority_sign_method=total<', page.text)
        links = re.findall(r'<a class="made-from" href="([^"]+)" data-digest="([^"]+)" data-weight="([^"]+)">', page.text)
        assert links == [("/ui/adapters/org/a/versions/1", a["digest"], "0.7"),
                         ("/ui/adapters/org/b/versions/1", b["digest"], "-0.4")]
        assert http.get(links[0][0]).status_code == 200
        assert 'id="made-by"' not in http.get("/ui/adapters/org/a/versions/1").text
