"""Lookup order and pagination by metric (versions without the metric last), bounds without a
metric, and the paginated list of an adapter's versions. Both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loreg.cli.client import RegistryClient
from tests.support.adapters import variant

# pushed in this order (so row ids grow in this order); two lack eval_loss, two share a value
PUSHED = [
    ("org/a0", {"eval_loss": 1.2, "accuracy": 0.50}),
    ("org/a1", {}),
    ("org/a2", {"eval_loss": 0.9, "accuracy": 0.70}),
    ("org/a3", {}),
    ("org/a4", {"eval_loss": 1.2, "accuracy": 0.60}),
]


@pytest.fixture
def five(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> RegistryClient:
    for i, (name, metrics) in enumerate(PUSHED):
        client.push(variant(adapter_dir, tmp_path / f"v{i}", seed=40 + i), name, metrics=metrics)
    return client


def pages(api: Any, limit: int, **params: Any) -> list[list[str]]:
    out: list[list[str]] = []
    cursor = None
    while True:
        resp = api.get("/v1/adapters", params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        out.append([i["name"] for i in body["items"]])
        cursor = body["next_cursor"]
        if not cursor:
            return out


def test_sorting_by_a_metric_keeps_versions_without_it_last_on_every_page(five: RegistryClient, api: Any) -> None:
    # by value, ties by push order in the same direction; those without the metric last, by push order
    ascending = ["org/a2", "org/a0", "org/a4", "org/a1", "org/a3"]
    descending = ["org/a4", "org/a0", "org/a2", "org/a3", "org/a1"]
    for limit in (1, 2, 3, 5):
        for order, expected in (("asc", ascending), ("desc", descending)):
            got = pages(api, limit, metric="eval_loss", order=order)
            assert [n for page in got for n in page] == expected, (limit, order, got)
            assert all(len(page) <= limit for page in got)
    # the default order: a loss ascending, any other metric descending; the client's list_all agrees
    assert [n for page in pages(api, 2, metric="eval_loss") for n in page] == ascending
    assert [n for page in pages(api, 2, metric="accuracy") for n in page] == ["org/a2", "org/a4", "org/a0", "org/a3", "org/a1"]
    assert [i["name"] for i in five.list_all(metric="eval_loss", limit=2)] == ascending
    # bounds filter: versions without the metric (and outside the bound) go
    assert [n for page in pages(api, 1, metric="eval_loss", metric_max=1.0) for n in page] == ["org/a2"]
    assert [n for page in pages(api, 2, metric="eval_loss", metric_min=1.0, order="desc") for n in page] == ["org/a4", "org/a0"]


def test_a_cursor_from_another_query_is_refused(five: RegistryClient, api: Any) -> None:
    by_metric = api.get("/v1/adapters", params={"metric": "eval_loss", "limit": 4}).json()["next_cursor"]
    plain = api.get("/v1/adapters", params={"limit": 2}).json()["next_cursor"]
    for params in ({"cursor": by_metric}, {"cursor": plain, "metric": "eval_loss"}):
        resp = api.get("/v1/adapters", params=params)
        assert resp.status_code == 400 and resp.json()["errors"][0]["code"] == "REQUEST_INVALID"


@pytest.mark.parametrize("params", [{"metric_max": "1.0"}, {"metric_min": "0"}, {"metric": "", "metric_max": "1.0"},
                                    {"metric": "eval_loss", "metric_max": "nan"}])
def test_metric_bounds_need_a_metric(client: RegistryClient, adapter_dir: Path, api: Any, params: dict[str, str]) -> None:
    client.push(adapter_dir, "org/bot", metrics={"eval_loss": 5.0})
    resp = api.get("/v1/adapters", params=params)
    assert resp.status_code == 400
    err = resp.json()["errors"][0]
    assert err["code"] == "REQUEST_INVALID" and "metric" in err["message"]


def test_versions_of_an_adapter_are_listed_newest_first_in_pages(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path, api: Any, make_token: Any, app: Any
) -> None:
    from fastapi.testclient import TestClient

    for i in range(3):
        client.push(variant(adapter_dir, tmp_path / f"v{i}", seed=60 + i), "org/bot", aliases=["prod"] if i == 1 else [])
    first = api.get("/v1/adapters/org/bot/versions", params={"limit": 2})
    assert first.status_code == 200
    body = first.json()
    assert [(i["name"], i["version"]) for i in body["items"]] == [("org/bot", 3), ("org/bot", 2)]
    assert body["items"][1]["aliases"] == ["prod"]
    rest = api.get("/v1/adapters/org/bot/versions", params={"limit": 2, "cursor": body["next_cursor"]}).json()
    assert [i["version"] for i in rest["items"]] == [1] and rest["next_cursor"] is None
    assert [i["version"] for i in api.get("/v1/adapters/org/bot/versions").json()["items"]] == [3, 2, 1]

    missing = api.get("/v1/adapters/org/nope/versions")
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "ADAPTER_NOT_FOUND"
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as other:
        other.headers["Authorization"] = f"Bearer {make_token('read', ['team-b/*'])}"
        assert other.get("/v1/adapters/org/bot/versions").status_code == 403
        assert other.get("/v1/adapters/org/bot/versions").json()["errors"][0]["code"] == "DENIED"


def test_a_later_evaluation_moves_a_version_in_sort_and_bounds(five: RegistryClient, api: Any) -> None:
    """Lookups read each key's latest value (version_metrics_latest): a later evaluation re-sorts and
    re-filters, a metric added to a version that lacked it joins the sorted part, q finds by message."""
    for name, metrics in (("org/a2", {"eval_loss": 1.5}), ("org/a1", {"eval_loss": 0.1}), ("org/a2", {"eval_loss": 1.3})):
        resp = api.post(f"/v1/adapters/{name}/versions/latest/metrics", json={"metrics": metrics})
        assert resp.status_code == 200, resp.text
    assert [n for page in pages(api, 2, metric="eval_loss") for n in page] == ["org/a1", "org/a0", "org/a4", "org/a2", "org/a3"]
    assert [n for page in pages(api, 1, metric="eval_loss", metric_max=1.25) for n in page] == ["org/a1", "org/a0", "org/a4"]
    assert [n for page in pages(api, 2, q="ORG/A3") for n in page] == ["org/a3"]


def test_by_base_each_adapter_answers_its_newest_matching_version(
    five: RegistryClient, api: Any, adapter_dir: Path, tmp_path: Path
) -> None:
    """With base= each adapter on the base (adapter_bases) is asked for its newest version that
    matches: the newest when it does, an older one when only that does, nothing once its versions
    are gone."""
    from tests import factories

    base = factories.base_name("llama")
    five.push(variant(adapter_dir, tmp_path / "again", seed=90), "org/a0", metrics={"eval_loss": 2.0})

    def listed(**params: Any) -> dict[str, int]:
        resp = api.get("/v1/adapters", params={"base": base, "metric": "eval_loss", **params})
        assert resp.status_code == 200, resp.text
        return {i["name"]: i["version"] for i in resp.json()["items"]}

    assert listed() == {"org/a0": 2, "org/a1": 1, "org/a2": 1, "org/a3": 1, "org/a4": 1}
    assert listed(metric_max=1.5) == {"org/a0": 1, "org/a2": 1, "org/a4": 1}
    assert api.delete("/v1/adapters/org/a3").status_code == 200
    assert api.delete("/v1/adapters/org/a0/versions/2").status_code == 200
    assert listed() == {"org/a0": 1, "org/a1": 1, "org/a2": 1, "org/a4": 1}


def test_q_finds_names_and_messages_and_each_adapter_answers_its_newest_match(
    client: RegistryClient, api: Any, adapter_dir: Path, tmp_path: Path
) -> None:
    """?q= matches the adapter's name (every version of it: the newest answers) or a version's message
    (the newest whose message matches answers, even when newer versions do not); case-insensitive,
    wildcards literal; with all_versions every matching version answers."""
    pushes = [("org/chat", "Warmup run"), ("org/chat", "final"), ("org/code", "warmup 2"), ("org/code", "later"),
              ("team/warmup", None), ("org/x_y", None)]
    for i, (name, message) in enumerate(pushes):
        client.push(variant(adapter_dir, tmp_path / f"q{i}", seed=60 + i), name, message=message)

    def found(**params: Any) -> list[tuple[str, int]]:
        resp = api.get("/v1/adapters", params=params)
        assert resp.status_code == 200, resp.text
        return sorted((i["name"], i["version"]) for i in resp.json()["items"])

    assert found(q="WARMUP") == [("org/chat", 1), ("org/code", 1), ("team/warmup", 1)]
    assert found(q="org/c") == [("org/chat", 2), ("org/code", 2)]
    assert found(q="final") == [("org/chat", 2)]
    assert found(q="x_y") == [("org/x_y", 1)] and found(q="x%y") == []
    assert found(q="warmup", all_versions=True) == [("org/chat", 1), ("org/code", 1), ("team/warmup", 1)]
    assert found(q="org/code", all_versions=True) == [("org/code", 1), ("org/code", 2)]
