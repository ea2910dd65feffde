"""The one error table and the envelope every error leaves in."""

from __future__ import annotations

from typing import Any

from loreg.registry import errors


def test_error_codes_are_unique_and_map_to_one_status() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LoregError) and c is not errors.LoregError]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(400 <= c.status < 600 for c in classes)
    assert set(errors.ERRORS) == set(codes)


def test_client_rebuilds_the_typed_error_from_the_envelope() -> None:
    err = errors.ShapeMismatchError("bad", detail={"problems": [{"key": "k"}]}, hint="fix it")
    rebuilt = errors.error_from_envelope(422, err.envelope())
    assert type(rebuilt) is errors.ShapeMismatchError
    assert rebuilt.detail == err.detail and rebuilt.hint == "fix it"
    assert isinstance(errors.error_from_envelope(502, "<html>"), errors.InternalError)


def test_unknown_route_and_method_answer_in_the_envelope(api: Any) -> None:
    missing = api.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "NOT_FOUND"
    wrong = api.delete("/v1/health")
    assert wrong.status_code == 405
    assert wrong.json()["errors"][0]["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in wrong.headers["allow"]


def test_request_validation_is_400_naming_the_field(api: Any) -> None:
    resp = api.post("/v1/adapters/org/x/versions", json={"files": [{"path": "a", "size": "8", "digest": "sha256:" + "0" * 64}]})
    assert resp.status_code == 400
    err = resp.json()["errors"][0]
    assert err["code"] == "REQUEST_INVALID" and "size" in err["message"]
