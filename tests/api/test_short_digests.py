"""Short digests (a unique prefix of 12+ hex digits) name versions and base models; both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.db.models import BaseModelRow, Version
from tests import factories
from tests.support.adapters import variant

SHORT = len("sha256:") + 12


def share_prefix(registry: Any, column: Any, where: Any, donor: str) -> str:
    """Rewrite one stored digest so that its first 12 hex digits are ``donor``'s (a 48-bit collision
    cannot be found by hashing in a test); returns the new digest."""
    forged = donor[:SHORT] + ("0" if donor[SHORT] != "0" else "1") + donor[SHORT + 1 :]
    with registry.sessions.begin() as s:
        s.execute(update(column.class_).where(where).values({column.key: forged}))
    return forged


def test_version_is_found_by_a_12_digit_prefix(client: RegistryClient, adapter_dir: Path, api: Any) -> None:
    first = client.push(adapter_dir, "org/bot")
    short = first["digest"][:SHORT]
    assert client.version(f"org/bot@{short}")["version"] == 1
    got = api.get(f"/v1/adapters/org/bot/versions/{short}")
    assert got.status_code == 200 and got.json()["digest"] == first["digest"]
    alias = api.put("/v1/adapters/org/bot/aliases/prod", json={"version": short})
    assert alias.status_code == 200 and alias.json()["version"] == 1


def test_a_prefix_under_12_digits_is_refused_with_a_hint(client: RegistryClient, adapter_dir: Path, api: Any) -> None:
    first = client.push(adapter_dir, "org/bot")
    short = first["digest"][: SHORT - 1]
    with pytest.raises(errors.ReferenceInvalidError) as info:
        client.version(f"org/bot@{short}")
    assert "12" in (info.value.hint or "")
    got = api.get(f"/v1/adapters/org/bot/versions/{short}")
    assert got.status_code == 400
    error = got.json()["errors"][0]
    assert error["code"] == "VERSION_INVALID" and "12" in error["detail"]["hint"]


def test_an_ambiguous_version_prefix_is_refused_naming_the_candidates(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path, registry: Any, api: Any
) -> None:
    first = client.push(adapter_dir, "org/bot")
    client.push(variant(adapter_dir, tmp_path / "v2", seed=2), "org/bot")
    forged = share_prefix(registry, Version.manifest_digest, Version.number == 2, first["digest"])
    short = first["digest"][:SHORT]

    got = api.get(f"/v1/adapters/org/bot/versions/{short}")
    assert got.status_code == 409
    error = got.json()["errors"][0]
    assert error["code"] == "DIGEST_AMBIGUOUS"
    assert error["detail"]["candidates"] == [
        {"version": "org/bot:1", "digest": first["digest"]},
        {"version": "org/bot:2", "digest": forged},
    ]
    with pytest.raises(errors.DigestAmbiguousError):
        client.version(f"org/bot@{short}")
    # one more digit tells them apart
    assert client.version(f"org/bot@{forged[: SHORT + 1]}")["version"] == 2
    assert client.version(f"org/bot@{first['digest']}")["version"] == 1


def test_base_model_is_found_by_prefix_and_an_ambiguous_one_is_refused(
    bare_client: RegistryClient, tiny_llama: dict[str, Path], tmp_path: Path, registry: Any, api: Any
) -> None:
    llama = bare_client.register_base(tiny_llama["base"], factories.base_name("llama"))
    short = llama["weights_digest"][:SHORT]
    assert bare_client.base(short)["weights_digest"] == llama["weights_digest"]
    bare_client.push(tiny_llama["adapter"], "org/bot")
    assert [i["name"] for i in bare_client.list_all(base=short)] == ["org/bot"]
    with pytest.raises(errors.DigestInvalidError):
        bare_client.get_json(f"/v1/base-models/{llama['weights_digest'][: SHORT - 1]}")

    other = bare_client.register_base(factories.make_base(tmp_path / "other", "llama", seed=7), "org/llama-instruct")
    forged = share_prefix(
        registry, BaseModelRow.weights_digest, BaseModelRow.weights_digest == other["weights_digest"], llama["weights_digest"]
    )
    got = api.get(f"/v1/base-models/{short}")
    assert got.status_code == 409
    error = got.json()["errors"][0]
    assert error["code"] == "DIGEST_AMBIGUOUS"
    assert error["detail"]["candidates"] == [
        {"digest": d, "names": n}
        for d, n in sorted([(llama["weights_digest"], [factories.base_name("llama")]), (forged, ["org/llama-instruct"])])
    ]
    assert bare_client.base(forged[: SHORT + 1])["names"] == ["org/llama-instruct"]


def test_blob_routes_take_full_digests_only(client: RegistryClient, adapter_dir: Path, api: Any) -> None:
    pushed = client.push(adapter_dir, "org/bot")
    digest = next(f["digest"] for f in pushed["files"] if f["path"] == "adapter_config.json")
    body = (adapter_dir / "adapter_config.json").read_bytes()
    for route in (f"/v1/adapters/org/bot/blobs/{digest[:SHORT]}", f"/v1/base-models/blobs/{digest[:SHORT]}"):
        got = api.put(route, content=body)
        assert got.status_code == 400 and got.json()["errors"][0]["code"] == "DIGEST_INVALID", route
