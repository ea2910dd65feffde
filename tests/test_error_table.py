"""One code, one status: the table in registry/errors.py, and every place that answers with a code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from loreg.registry import errors
from loreg.registry.api.errors import install_error_handlers

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "registry").rglob("*.py"), *(ROOT / "cli").rglob("*.py")])


def _all_error_classes() -> list[type[errors.LoregError]]:
    found, stack = [], [errors.LoregError]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub.__module__ == errors.__name__:
                found.append(sub)
            stack.append(sub)
    return found


def test_every_code_has_one_class_and_one_status() -> None:
    by_code: dict[str, set[tuple[str, int]]] = {}
    for cls in _all_error_classes():
        by_code.setdefault(cls.code, set()).add((cls.__name__, cls.status))
    several = {code: seen for code, seen in by_code.items() if len(seen) > 1}
    assert not several, several
    assert set(by_code) == set(errors.ERRORS)
    assert all(errors.ERRORS[code].status == next(iter(seen))[1] for code, seen in by_code.items())


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    def called(node: ast.Call) -> str | None:
        f = node.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n) == name]


def test_an_envelope_always_leaves_with_its_own_status() -> None:
    """An error envelope built by hand must carry the status of its class (``err.status``)."""
    wrong = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "JSONResponse") + _calls(tree, "HTTPException"):
            body = call.args[0] if call.args else None
            status = next((k.value for k in call.keywords if k.arg == "status_code"), None)
            builds_envelope = isinstance(body, ast.Call) and isinstance(body.func, ast.Attribute) and body.func.attr == "envelope"
            if builds_envelope or call in _calls(tree, "HTTPException"):
                if not (isinstance(status, ast.Attribute) and status.attr == "status"):
                    wrong.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not wrong, f"an error answered with a status other than its class's: {wrong}"


class Body(BaseModel):
    n: int


@pytest.fixture(scope="module")
def http() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/framework/{status}")
    def framework(status: int) -> None:
        raise HTTPException(status_code=status, detail=f"status {status}")

    @app.post("/body")
    def body(_b: Body) -> None:
        return None

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 409, 411, 413, 418, 422, 429, 500, 502])
def test_framework_errors_answer_with_the_tables_status(http: TestClient, status: int) -> None:
    resp = http.get(f"/framework/{status}")
    code = resp.json()["errors"][0]["code"]
    assert resp.status_code == errors.ERRORS[code].status, (status, resp.status_code, code)


def test_request_validation_answers_request_invalid_with_its_status(http: TestClient) -> None:
    resp = http.post("/body", json={"n": "x"})
    code = resp.json()["errors"][0]["code"]
    assert (code, resp.status_code) == ("REQUEST_INVALID", errors.RequestInvalidError.status)
    missing = http.get("/no-such-route")
    assert (missing.json()["errors"][0]["code"], missing.status_code) == ("NOT_FOUND", errors.NotFoundError.status)
    method = http.post("/framework/400")
    assert (method.json()["errors"][0]["code"], method.status_code) == ("METHOD_NOT_ALLOWED", 405)
