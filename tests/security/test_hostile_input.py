"""Hostile input through the REST API: TESTPLAN B1-B16 (B12 lives in tests/api/test_bases.py).

Each bad file is uploaded as the adapter_model.safetensors (or adapter_config.json) of an otherwise
valid adapter: blobs are accepted as bytes, the commit refuses them, and nothing is stored.
"""

from __future__ import annotations

import ast
import http.client
import json
import pickle
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pytest
import safetensors.numpy

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.formats import names
from tests.security.conftest import (
    POSTGRES_ONLY,
    SQLITE_ONLY,
    Pusher,
    assert_blob_absent,
    assert_known_refusal,
    assert_nothing_stored,
    error_of,
    hdr,
    sha256,
    snapshot,
)
from tests.support.adapters import pickle_looking, with_header_length

REPO = Path(__file__).resolve().parents[2]
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def split(weights: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", weights[:8])[0]
    return json.loads(weights[8:8 + n]), weights[8 + n:]


def padded(header: dict[str, Any] | bytes) -> bytes:
    j = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return j + b" " * (-(len(j) + 8) % 8)


def with_tensors(weights: bytes, change: Any) -> bytes:
    tensors = safetensors.numpy.load(weights)
    change(tensors)
    return safetensors.numpy.save(tensors)


def _b9_int(tensors: dict[str, np.ndarray]) -> None:
    tensors[KEY_A] = tensors[KEY_A].view(np.int32)


def _b9_bool(tensors: dict[str, np.ndarray]) -> None:
    tensors[KEY_A] = tensors[KEY_A] > 0


def _b9_empty(tensors: dict[str, np.ndarray]) -> None:
    tensors[KEY_A] = np.zeros((0, tensors[KEY_A].shape[1]), np.float32)


def _b10_nonfinite(tensors: dict[str, np.ndarray]) -> None:
    b = tensors[KEY_B].copy()
    b[0, 0], b[1, 1] = np.nan, np.inf
    tensors[KEY_B] = b


def _header_of(valid: bytes) -> dict[str, Any]:
    return split(valid)[0]


def _data_of(valid: bytes) -> bytes:
    return split(valid)[1]


def _lying_length(valid: bytes, cap: int) -> bytes:
    return struct.pack("<Q", 1_000_000) + b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}' + bytes(16)


def _duplicate_key(valid: bytes, cap: int) -> bytes:
    key = KEY_A.encode()
    j = (b'{"' + key + b'":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"'
         + key + b'":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    return hdr(padded(j)) + bytes(8)


def _one(entry: dict[str, Any], size: int) -> Any:
    return lambda valid, cap: hdr(padded({"a": entry})) + bytes(size)


def _replace_a(**change: Any) -> Any:
    def build(valid: bytes, cap: int) -> bytes:
        header = _header_of(valid)
        return hdr(padded({**header, KEY_A: {**header[KEY_A], **change}})) + _data_of(valid)

    return build


def _tensors(change: Any) -> Any:
    return lambda valid, cap: with_tensors(valid, change)


# case -> (build(valid file, header cap) -> bad file, status, code, tensor the detail names)
BAD_WEIGHTS: dict[str, tuple[Any, int, str, str | None]] = {
    "B1 length prefix 100_000_001": (
        lambda v, cap: struct.pack("<Q", 100_000_001) + v[8:], 400, "HEADER_TOO_LARGE", None,
    ),
    "B1 length prefix cap + 1": (lambda v, cap: struct.pack("<Q", cap + 1) + v[8:], 400, "HEADER_TOO_LARGE", None),
    "B2 length past the end": (_lying_length, 400, "HEADER_INVALID", None),
    "B2 empty file": (lambda v, cap: b"", 400, "HEADER_INVALID", None),
    "B2 7 bytes": (lambda v, cap: b"\x10\x00\x00\x00\x00\x00\x00", 400, "HEADER_INVALID", None),
    "B3 zip polyglot": (lambda v, cap: v + b"PK\x03\x04" + bytes(100), 400, "TRAILING_DATA", None),
    "B4 data 2 bytes short": (lambda v, cap: v[:-2], 400, "SIZE_MISMATCH", None),
    "B5 offsets gap": (_one({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, 16), 400, "OFFSET_INVALID", "a"),
    "B5 offsets overlap": (
        lambda v, cap: hdr(padded({
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        })) + bytes(8),
        400, "OFFSET_INVALID", None,
    ),
    "B6 shape overflows": (
        _one({"dtype": "I32", "shape": [2, 9223372036854775807], "data_offsets": [0, 16]}, 16), 400, "SHAPE_INVALID", "a",
    ),
    "B6 shape disagrees with offsets": (
        _one({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, 8), 400, "SIZE_MISMATCH", "a",
    ),
    "B6 negative dimension": (
        _one({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, 4), 400, "SHAPE_INVALID", "a",
    ),
    "B7 duplicate key": (_duplicate_key, 400, "DUPLICATE_KEY", None),
    "B8 leading space": (
        lambda v, cap: hdr(padded(b" " + json.dumps(_header_of(v)).encode())) + _data_of(v), 400, "HEADER_INVALID", None,
    ),
    "B8 NUL padding": (
        lambda v, cap: hdr(json.dumps(_header_of(v)).encode() + b"\x00\x00\x00") + _data_of(v),
        400, "HEADER_INVALID", None,
    ),
    "B8 array header": (lambda v, cap: hdr(b"[1,2]   "), 400, "HEADER_INVALID", None),
    "B8 invalid UTF-8": (lambda v, cap: hdr(b'{"\xff":1}'), 400, "HEADER_INVALID", None),
    "B8 metadata value not a string": (
        lambda v, cap: hdr(padded({**_header_of(v), "__metadata__": {"k": 1}})) + _data_of(v),
        400, "HEADER_INVALID", None,
    ),
    "B9 unknown dtype": (_replace_a(dtype="F128"), 400, "DTYPE_UNKNOWN", None),
    "B9 I32 lora weight": (_tensors(_b9_int), 422, "DTYPE_UNSUPPORTED", None),
    "B9 BOOL lora weight": (_tensors(_b9_bool), 422, "DTYPE_UNSUPPORTED", None),
    "B9 empty tensor": (_tensors(_b9_empty), 422, "EMPTY_TENSOR", None),
    "B10 NaN and inf in lora_B": (_tensors(_b10_nonfinite), 422, "NONFINITE_VALUES", None),
}


@pytest.fixture(scope="module")
def valid_weights(tiny_llama: dict[str, Path]) -> bytes:
    return (tiny_llama["adapter"] / "adapter_model.safetensors").read_bytes()


def check_bad_weights(pusher: Pusher, registry: Any, settings: Any, valid: bytes, case: str) -> None:
    build, status, code, tensor = BAD_WEIGHTS[case]
    weights = build(valid, settings.max_header_size)
    reads: list[int] = []
    store_read = registry.store.read_range

    def counting(digest: str, start: int, end: int) -> bytes:
        out = store_read(digest, start, end)
        if digest == sha256(weights):
            reads.append(len(out))
        return out

    registry.store.read_range = counting
    try:
        before = snapshot(registry)
        err = error_of(pusher.push("org/x", weights=weights), status, code)
        assert_nothing_stored(registry, before)
    finally:
        del registry.store.read_range
    if tensor is not None:
        assert err["detail"].get("tensor") == tensor, err
    if code == "HEADER_TOO_LARGE":
        assert sum(reads) <= 8  # the length prefix alone decides: no header or data read
    elif status == 400:
        n = struct.unpack("<Q", weights[:8])[0] if len(weights) >= 8 else 0
        assert sum(reads) <= 8 + n  # refused from the header alone: no tensor data read


@SQLITE_ONLY
@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_safetensors_is_refused_and_nothing_stored(
    pusher: Pusher, registry: Any, settings: Any, valid_weights: bytes, case: str
) -> None:
    check_bad_weights(pusher, registry, settings, valid_weights, case)


@POSTGRES_ONLY
def test_bad_inputs_are_refused_on_postgres_and_s3(
    pusher: Pusher, registry: Any, settings: Any, valid_weights: bytes
) -> None:
    """The same tables once on the other backend (ranged reads from S3, rows in Postgres)."""
    for case in BAD_WEIGHTS:
        check_bad_weights(pusher, registry, settings, valid_weights, case)
    for case in CONFIG_CASES:
        check_bad_config(pusher, registry, case)
    for what in REFUSED_BYTES:
        check_refused_bytes(pusher, registry, what)


@SQLITE_ONLY
def test_trailing_space_padding_is_accepted(pusher: Pusher, valid_weights: bytes) -> None:
    header, data = split(valid_weights)
    j = json.dumps(header, separators=(",", ":")).encode()
    weights = hdr(j + b" " * (-(len(j) + 8) % 8 + 8)) + data
    resp = pusher.push("org/x", weights=weights)
    assert resp.status_code == 201, resp.text
    assert safetensors.numpy.load(weights).keys() == safetensors.numpy.load(valid_weights).keys()


# --- B11 -----------------------------------------------------------------------------------------


def _torch_zip() -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    return buf.getvalue()


REFUSED_BYTES = {
    **{f"pickle protocol {p}": pickle.dumps({"a": 1}, protocol=p) for p in (2, 3, 4, 5)},
    "torch zip": _torch_zip(),
    "empty zip": b"PK\x05\x06" + bytes(18),
}


def check_refused_bytes(pusher: Pusher, registry: Any, what: str) -> None:
    data = REFUSED_BYTES[what]
    before = snapshot(registry)
    error_of(pusher.put_blob(data), 415, "UNSUPPORTED_FORMAT")
    # the same bytes streamed without a Content-Length
    chunked = pusher.http.put(f"/v1/adapters/org/x/blobs/{sha256(data)}", content=iter([data[:3], data[3:]]))
    error_of(chunked, 415, "UNSUPPORTED_FORMAT")
    assert_blob_absent(registry, sha256(data))
    # named as the weights of a version: the blob was never stored
    files = [
        {"path": k, "size": len(v), "digest": sha256(v)}
        for k, v in pusher.files.items() if k != "adapter_model.safetensors"
    ]
    renamed = files + [{"path": "adapter_model.safetensors", "size": len(data), "digest": sha256(data)}]
    error_of(pusher.http.post("/v1/adapters/org/x/versions", json={"files": renamed}), 422, "BLOB_MISSING")
    as_bin = files + [{"path": "adapter_model.bin", "size": len(data), "digest": sha256(data)}]
    error_of(pusher.http.post("/v1/adapters/org/x/versions", json={"files": as_bin}), 415, "UNSUPPORTED_FORMAT")
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
@pytest.mark.parametrize("what", sorted(REFUSED_BYTES))
def test_pickle_and_zip_uploads_are_refused_by_magic(pusher: Pusher, registry: Any, what: str) -> None:
    check_refused_bytes(pusher, registry, what)


# --- B17 -----------------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize("plus", [0, 65536])
def test_valid_safetensors_starting_like_pickle_is_accepted(pusher: Pusher, valid_weights: bytes, plus: int) -> None:
    weights = pickle_looking(valid_weights, plus=plus)
    assert safetensors.numpy.load(weights).keys() == safetensors.numpy.load(valid_weights).keys()
    # streamed in small pieces: the decision waits for the whole header
    pieces = [weights[i:i + 3] for i in range(0, 12, 3)] + [weights[12:]]
    up = pusher.http.put(f"/v1/adapters/org/x/blobs/{sha256(weights)}", content=iter(pieces))
    assert up.status_code == 201, up.text
    resp = pusher.push("org/x", weights=weights)
    assert resp.status_code == 201, resp.text
    stored = {f["path"]: f["digest"] for f in resp.json()["files"]}
    assert stored["adapter_model.safetensors"] == sha256(weights)


@SQLITE_ONLY
def test_pickle_behind_a_plausible_length_is_still_refused(pusher: Pusher, registry: Any, valid_weights: bytes) -> None:
    """0x80 0x02 and a length within the cap, but the header bytes are not a safetensors header."""
    data = bytearray(pickle_looking(valid_weights))
    data[8] = ord("[")  # the header no longer parses: the bytes are taken for what they start like
    before = snapshot(registry)
    error_of(pusher.put_blob(bytes(data)), 415, "UNSUPPORTED_FORMAT")
    assert_blob_absent(registry, sha256(bytes(data)))
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
def test_base_shard_starting_like_pickle_is_uploaded(bare_client: RegistryClient, tiny_llama: dict[str, Path],
                                                    tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama["base"], base)
    shard = base / "model.safetensors"
    data = shard.read_bytes()
    natural = struct.unpack("<Q", data[:8])[0]
    n = 1408 + 65536 * (natural // 65536 + 1)  # 0x80 0x05 .. after the shard's own header
    shard.write_bytes(with_header_length(data, n))
    assert shard.read_bytes()[:2] == b"\x80\x05"
    out = bare_client.register_base(base, "org/padded", upload_weights=True)
    assert out["weights_digest"] == bare_client.register_base(tiny_llama["base"], "org/plain")["weights_digest"]


UNPICKLING = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


def test_no_code_path_unpickles() -> None:
    """No pickle import, no torch.load / numpy allow_pickle, anywhere in the server or the CLI."""
    found = []
    for root in ("registry", "cli"):
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            rel = path.relative_to(REPO)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found += [f"{rel}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING:
                    found.append(f"{rel}: from {node.module} import")
                elif isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                        any(a.name == "load" for a in node.names):
                    found.append(f"{rel}: from torch import load")
                elif isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler") and \
                        isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle", "dill", "joblib"):
                    found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
                elif isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
                    found.append(f"{rel}:{node.lineno}: {node.arg}=")
    assert found == []


SERVER_PROBE = textwrap.dedent(
    """
    import json, pickle, sys
    calls = []
    for name in ("load", "loads"):
        real = getattr(pickle, name)
        setattr(pickle, name, lambda *a, _n=name, **k: calls.append(_n) or real(*a, **k))
    from pathlib import Path
    from fastapi.testclient import TestClient
    from loreg.cli.client import RegistryClient
    from loreg.registry.app import create_app
    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine
    from loreg.registry.services.context import open_registry
    from loreg.registry.services.tokens import TokenService
    from loreg.registry.settings import Settings

    home, base, adapter = (Path(p) for p in sys.argv[1:4])
    settings = Settings(home=home, export_worker="inprocess")
    engine = make_engine(settings.effective_database_url)
    migrate.upgrade(engine)
    engine.dispose()
    registry = open_registry(settings)
    token = TokenService(registry).create("admin")[1]
    app = create_app(registry=registry)
    with TestClient(app, raise_server_exceptions=False) as http:
        client = RegistryClient("http://testserver", token, http=http)
        client.register_base(base, "loreg-test/tiny-llama")
        client.push(adapter, "org/x")
        client.pull("org/x", home / "pulled")
        data = pickle.dumps({"a": 1}, protocol=4)
        import hashlib
        status = http.put("/v1/adapters/org/x/blobs/sha256:" + hashlib.sha256(data).hexdigest(), content=data).status_code
        client.request("GET", "/v1/adapters/org/x/versions/1/inspect")
    print(json.dumps({"torch": "torch" in sys.modules, "unpickled": calls, "pickle_status": status}))
    """
)


def test_server_process_never_imports_torch_or_unpickles(tiny_llama: dict[str, Path], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SERVER_PROBE, str(tmp_path / "home"), str(tiny_llama["base"]), str(tiny_llama["adapter"])],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "unpickled": [], "pickle_status": 415}


# --- B13 -----------------------------------------------------------------------------------------


def _config_text(config: dict[str, Any], **raw: str) -> bytes:
    """The config as JSON with some values written verbatim (NaN, 1e400, a repeated key)."""
    text = json.dumps({k: v for k, v in config.items() if k not in raw}, indent=2)
    extra = ", ".join(f'"{k.rstrip("_")}": {v}' for k, v in raw.items())
    return (text[:-2] + ",\n  " + extra + "\n}").encode()


CONFIG_CASES: dict[str, tuple[Any, str | None]] = {
    "not JSON": (lambda c: b"{this is not json", None),
    "not an object": (lambda c: b"[1, 2]", None),
    "duplicate key": (lambda c: _config_text(c, r="8", r_="16"), "r"),
    "r Infinity": (lambda c: _config_text(c, r="Infinity"), "r"),
    "r NaN": (lambda c: _config_text(c, r="NaN"), "r"),
    "r 1e400": (lambda c: _config_text(c, r="1e400"), "r"),
    "r 0": (lambda c: {**c, "r": 0}, "r"),
    "r -1": (lambda c: {**c, "r": -1}, "r"),
    "r as a string": (lambda c: {**c, "r": "8"}, "r"),
    "r 10**9": (lambda c: {**c, "r": 10**9}, "r"),
    "r with 5000 digits": (lambda c: _config_text(c, r="9" * 5000), "r"),
    "prefix tuning": (lambda c: {**c, "peft_type": "PREFIX_TUNING"}, "peft_type"),
    "lora_alpha a list": (lambda c: {**c, "lora_alpha": [16]}, "lora_alpha"),
    "lone surrogate": (lambda c: _config_text(c, task_type='"\\ud800"'), "task_type"),
}


def check_bad_config(pusher: Pusher, registry: Any, case: str) -> None:
    make, field = CONFIG_CASES[case]
    before = snapshot(registry)
    err = error_of(pusher.push("org/x", config=make(pusher.config)), 422, "CONFIG_INVALID")
    assert err["detail"].get("field") == field, err
    if field:
        assert field in err["message"]
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_adapter_config_is_refused_naming_the_field(pusher: Pusher, registry: Any, case: str) -> None:
    check_bad_config(pusher, registry, case)


@SQLITE_ONLY
def test_oversized_adapter_config_is_refused_with_413(pusher: Pusher, registry: Any, settings: Any) -> None:
    config = {**pusher.config, "padding": "x" * (65 * 1024)}
    before = snapshot(registry)
    err = error_of(pusher.push("org/x", config=config), 413, "CONFIG_TOO_LARGE")
    assert err["detail"]["limit"] == settings.max_config_size
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
def test_other_base_name_with_explicit_base_is_stored_recording_the_choice_without_a_warning(pusher: Pusher) -> None:
    resp = pusher.push("org/x", config={**pusher.config, "base_model_name_or_path": "someone/else"},
                       base="loreg-test/tiny-llama")
    assert resp.status_code == 201, resp.text
    assert resp.json()["facts"]["base_source"] == "explicit"
    assert "BASE_NAME_MISMATCH" not in {w["code"] for w in resp.json()["warnings"]}


# --- B14 -----------------------------------------------------------------------------------------

EVIL = ("(a+)+$", "(.*a){20}", "(a|aa)+$", "([a-z]+)*!")
DEADLINE_S = 60.0


def _hostile_regex_adapters(folder: Path, dest: Path) -> dict[str, Path]:
    import shutil

    out = {}
    config = json.loads((folder / "adapter_config.json").read_text())
    for label, change in {
        "target_modules": {"target_modules": EVIL[0]},
        "target_modules 2": {"target_modules": EVIL[1]},
        "rank_pattern": {"rank_pattern": {p: 8 for p in EVIL}, "alpha_pattern": {p: 16 for p in EVIL}},
    }.items():
        d = dest / label.replace(" ", "-")
        shutil.copytree(folder, d)
        (d / "adapter_config.json").write_text(json.dumps({**config, **change}))
        out[label] = d
    # module names that make a backtracking engine explode on those patterns
    d = dest / "long-keys"
    shutil.copytree(folder, d)
    tensors = safetensors.numpy.load((folder / "adapter_model.safetensors").read_bytes())
    hostile = "a" * 60 + "_x"
    renamed = {k.replace("q_proj", hostile): v for k, v in tensors.items()}
    (d / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(renamed))
    (d / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": EVIL[0], "rank_pattern": {p: 8 for p in EVIL}})
    )
    out["long keys"] = d
    return out


@SQLITE_ONLY
def test_catastrophic_regexes_end_in_time_and_the_server_keeps_answering(
    live_server: str, admin_token: str, tiny_llama: dict[str, Path], tmp_path: Path, registry: Any
) -> None:
    folders = _hostile_regex_adapters(tiny_llama["adapter"], tmp_path)
    results: dict[str, Any] = {}

    def push(label: str, folder: Path) -> None:
        with RegistryClient(live_server, admin_token, timeout=DEADLINE_S) as c:
            try:
                results[label] = c.push(folder, f"org/{label.replace(' ', '-')}")
            except errors.LoregError as exc:
                results[label] = exc

    threads = [threading.Thread(target=push, args=item, daemon=True) for item in folders.items()]
    start = time.monotonic()
    for t in threads:
        t.start()
    with RegistryClient(live_server, admin_token, timeout=DEADLINE_S) as c:
        assert c.get_json("/v1/health")["status"] == "ok"  # answered while the pushes run
    for t in threads:
        t.join(timeout=max(0.0, DEADLINE_S - (time.monotonic() - start)))
    assert not any(t.is_alive() for t in threads), "a push with a hostile regex did not finish in time"
    for label, out in results.items():
        if isinstance(out, errors.LoregError):
            assert out.status == 422 and out.code in ("CONFIG_INVALID", "UNKNOWN_MODULE", "ADAPTER_INVALID"), (label, out)
        else:
            assert out["created"], (label, out)
    assert isinstance(results["long keys"], errors.UnknownModuleError)


# --- B18 -----------------------------------------------------------------------------------------

# tiny_llama's tensors adapt q_proj and v_proj of layers 0 and 1
MISMATCHED_TARGETS = {
    "other modules": (["k_proj"], "ADAPTER_INVALID", "model.layers.0.self_attn.k_proj"),
    "lookahead": ("(?=.*q_proj).*", "CONFIG_INVALID", "lookaround"),
    "too large": ("(a{1000}){1000}", "CONFIG_INVALID", "repetition"),
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", sorted(MISMATCHED_TARGETS))
def test_config_that_peft_would_load_differently_is_refused(pusher: Pusher, registry: Any, case: str) -> None:
    target, code, named = MISMATCHED_TARGETS[case]
    before = snapshot(registry)
    first = error_of(pusher.push("org/x", config={**pusher.config, "target_modules": target}), 422, code)
    assert named in first["message"]
    if code == "ADAPTER_INVALID":
        problem = first["detail"]["problems"][0]
        assert problem["code"] == "TARGET_MISMATCH"
        assert "model.layers.1.self_attn.v_proj" in problem["tensors_not_targeted"]
    else:
        assert first["detail"]["field"] == "target_modules" and first["detail"]["pattern"] == target
    assert_nothing_stored(registry, before)
    assert pusher.http.get("/v1/adapters/org/x/versions/1").status_code == 404


@SQLITE_ONLY
def test_regex_target_modules_selecting_the_tensors_modules_is_accepted(pusher: Pusher) -> None:
    resp = pusher.push("org/x", config={**pusher.config, "target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"})
    assert resp.status_code == 201, resp.text


# --- B15 -----------------------------------------------------------------------------------------

# (name as sent in the URL path, whether the router can match it as one {namespace}/{name} pair)
HOSTILE_NAMES = [
    ("../../etc/passwd", False),
    ("org/..%2Fx", False),
    ("org%2F..%2F..%2Fx", False),
    ("org/%252e%252e%252f", True),
    ("org/x%00", True),
    ("org/x%0A", True),
    ("org/x%0D%0AX-Injected:%201", True),
    (quote("ｏrg") + "/x", True),
    ("Org/X", True),
    ("a%5C..%5Cb/x", True),
    ("a\\..\\b/x", True),
    ("org//x", False),
    ("/abs", False),
    ("org/" + "a" * 300, True),
    ("org/x.", True),
    ("org/-x", True),
    ("org/x..y", True),
    ("org/%20x", True),
]
HOSTILE_TAGS = ["..", "-x", "a" * 129, "%2e%2e", "1%00", "0", "01", "99999999999", "latest%0A", "sha256:abc"]


def raw_request(
    base: str, token: str, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any] | None]:
    """Send ``path`` byte for byte (httpx would normalise dot segments)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.name.startswith("loreg.db")}


@SQLITE_ONLY
def test_hostile_names_are_refused_on_every_path(
    live_server: str, admin_token: str, adapter_dir: Path, tmp_path: Path, registry: Any
) -> None:
    with RegistryClient(live_server, admin_token) as c:
        pushed = c.push(adapter_dir, "org/x")
    files = json.dumps({"files": [{k: f[k] for k in ("path", "size", "digest")} for f in pushed["files"]]}).encode()
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    tree = _tree(tmp_path)
    before = snapshot(registry)
    for name, matchable in HOSTILE_NAMES:
        namespace = unquote(name).split("/")[0]
        query = f"/v1/adapters?namespace={quote(namespace, safe='')}"
        status, payload = raw_request(live_server, admin_token, "GET", query)
        if names.NAME_PART.fullmatch(namespace):
            assert status == 200
        else:
            assert (status, payload["errors"][0]["code"]) in ((400, "NAME_INVALID"), (400, "REQUEST_INVALID")), payload
        for method, path, body in (
            ("GET", f"/v1/adapters/{name}", None),
            ("GET", f"/v1/adapters/{name}/versions/1", None),
            ("GET", f"/v1/adapters/{name}/versions/1/files/adapter_config.json", None),
            ("POST", f"/v1/adapters/{name}/versions", files),
            ("PUT", f"/v1/adapters/{name}/aliases/prod", b'{"version": 1}'),
            ("DELETE", f"/v1/adapters/{name}/versions/1", None),
        ):
            status, payload = raw_request(live_server, admin_token, method, path, body)
            assert status < 500, (method, path, status, payload)
            code = payload["errors"][0]["code"] if payload and "errors" in payload else None
            if matchable:
                expected = "REQUEST_INVALID" if "%00" in name else "NAME_INVALID"  # NUL: refused for any URL
                assert (status, code) == (400, expected), (method, path, status, payload)
            else:
                assert status in (400, 404), (method, path, status, payload)
                assert code in ("NAME_INVALID", "NOT_FOUND", "REQUEST_INVALID"), (method, path, status, payload)
    for tag in HOSTILE_TAGS:
        for method, path, body in (
            ("GET", f"/v1/adapters/org/x/versions/{tag}", None),
            ("DELETE", f"/v1/adapters/org/x/versions/{tag}", None),
            ("POST", f"/v1/adapters/org/x/versions/{tag}/metrics", b'{"metrics": {"l": 1.0}}'),
            ("PUT", f"/v1/adapters/org/x/aliases/{tag}", b'{"version": 1}'),
            ("PUT", "/v1/adapters/org/x/aliases/prod", json.dumps({"version": tag}).encode()),
        ):
            status, payload = raw_request(live_server, admin_token, method, path, body)
            assert status < 500, (method, path, status, payload)
            code = payload["errors"][0]["code"] if payload else None
            expected = {(400, "VERSION_INVALID"), (404, "VERSION_NOT_FOUND")}
            if "%00" in path:
                expected = {(400, "REQUEST_INVALID")}  # NUL: refused for any URL
            assert (status, code) in expected, (method, path, status, payload)
    assert_nothing_stored(registry, before)
    assert canary.read_text() == "untouched"
    assert _tree(tmp_path) == tree, "a file appeared or changed outside the store"


@SQLITE_ONLY
@pytest.mark.parametrize("name", [n for n, _ in HOSTILE_NAMES] + ["org/x\n", "ｏrg/x", "org/x\x00", "org/x/y", "org"])
def test_client_refuses_hostile_names_before_sending(bare_client: RegistryClient, adapter_dir: Path, name: str) -> None:
    for value in {name, unquote(name)}:
        with pytest.raises((errors.NameInvalidError, errors.ReferenceInvalidError, errors.VersionInvalidError)):
            bare_client.push(adapter_dir, value)
        with pytest.raises((errors.NameInvalidError, errors.ReferenceInvalidError, errors.VersionInvalidError)):
            bare_client.version(f"{value}:1")
        with pytest.raises((errors.NameInvalidError, errors.ReferenceInvalidError, errors.VersionInvalidError)):
            bare_client.set_alias(f"{value}:1", "prod")


@SQLITE_ONLY
@pytest.mark.parametrize("tag", ["..", "-x", "a" * 129, "latest\n", "1\x00"])
def test_client_refuses_hostile_versions_and_aliases(bare_client: RegistryClient, tag: str) -> None:
    with pytest.raises((errors.VersionInvalidError, errors.ReferenceInvalidError)):
        bare_client.version(f"org/x:{tag}")
    with pytest.raises((errors.VersionInvalidError, errors.ReferenceInvalidError)):
        bare_client.set_alias("org/x:1", tag)


@SQLITE_ONLY
def test_url_and_path_fields_are_refused_and_never_fetched(pusher: Pusher, registry: Any) -> None:
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(8)
    canary.setblocking(False)
    port = canary.getsockname()[1]
    files = [{"path": k, "size": len(v), "digest": sha256(v)} for k, v in pusher.files.items()]
    before = snapshot(registry)
    try:
        for extra in (
            {"source": "file:///etc/passwd"},
            {"url": f"http://127.0.0.1:{port}/"},
            {"files": files + [{"path": "file:///etc/passwd", "size": 1, "digest": "sha256:" + "1" * 64}]},
        ):
            resp = pusher.http.post("/v1/adapters/org/x/versions", json={"files": files, **extra})
            assert resp.status_code == 400, resp.text
            assert_known_refusal(resp)
        for base in (f"http://127.0.0.1:{port}/", "file:///etc/passwd", "../../etc/passwd"):
            resp = pusher.http.post("/v1/adapters/org/x/versions", json={"files": files, "base": base})
            assert 400 <= resp.status_code < 500, resp.text
            assert_known_refusal(resp)
        for name in (f"http://127.0.0.1:{port}/x", "file:///etc/passwd", "../../etc/passwd"):
            resp = pusher.http.get(f"/v1/base-models/{quote(name, safe='')}")
            assert resp.status_code in (400, 404), resp.text
            assert_known_refusal(resp)
        with pytest.raises(BlockingIOError):
            canary.accept()  # nobody called
    finally:
        canary.close()
    assert_nothing_stored(registry, before)


# --- B16 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_with_wrong_digest_keeps_nothing(pusher: Pusher, registry: Any, chunked: bool) -> None:
    good = pusher.files["README.md"] + b"\nanother line\n"
    sent = good + b"oh no"
    before = snapshot(registry)
    body: Any = iter([sent[:5], sent[5:]]) if chunked else sent
    err = error_of(pusher.http.put(f"/v1/adapters/org/x/blobs/{sha256(good)}", content=body), 400, "DIGEST_MISMATCH")
    assert err["detail"]
    assert_blob_absent(registry, sha256(good))
    assert_blob_absent(registry, sha256(sent))
    assert_nothing_stored(registry, before)


def test_large_upload_with_wrong_digest_leaves_no_staging_or_multipart_upload(pusher: Pusher, registry: Any) -> None:
    """Over one S3 part (8 MiB): the multipart upload is aborted, the local staging file removed."""
    sent = bytes(range(256)) * (9 * 4096) + b"oh no"
    declared = sha256(sent[:-5])
    before = snapshot(registry)
    error_of(pusher.http.put(f"/v1/adapters/org/x/blobs/{declared}", content=sent), 400, "DIGEST_MISMATCH")
    assert_blob_absent(registry, declared)
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
@pytest.mark.parametrize("digest", [
    "sha256:baddigeststring", "sha256:" + "A" * 64, "sha512:" + "0" * 128, "sha256:" + "0" * 63,
    "sha256:" + "0" * 64 + "%0A", "md5:" + "0" * 32, "%2e%2e%2fsha256:" + "0" * 64,
])
def test_malformed_digest_is_refused(pusher: Pusher, registry: Any, digest: str) -> None:
    before = snapshot(registry)
    resp = pusher.http.put(f"/v1/adapters/org/x/blobs/{digest}", content=b"data")
    if "%2f" in digest:
        assert resp.status_code in (400, 404)
    else:
        error_of(resp, 400, "DIGEST_INVALID")
    assert_known_refusal(pusher.http.post("/v1/adapters/org/x/blobs:check", json={"digests": [digest]}))
    assert_nothing_stored(registry, before)


# --- B20 (file rules) ------------------------------------------------------------------------------

DISALLOWED_FILES = {
    "modeling_evil.py": b"import os\nos.system('id')\n",
    # protocol 0 has no PROTO opcode: no magic bytes to catch, only the name
    "rng_state.pth.tar": pickle.dumps({"a": 1}, protocol=0),
    "con": b"a Windows device name\n",
}


@SQLITE_ONLY
@pytest.mark.parametrize("path", sorted(DISALLOWED_FILES))
def test_files_outside_the_adapter_allowlist_are_refused_at_commit(
    pusher: Pusher, registry: Any, path: str
) -> None:
    data = DISALLOWED_FILES[path]
    before = snapshot(registry)
    resp = pusher.push("org/x", files={path: data})
    first = error_of(resp, 422, "ADAPTER_INVALID")
    assert first["detail"]["path"] == path and first["detail"]["rule"] == "allowlist"
    assert path in first["message"]
    assert_nothing_stored(registry, before)
    assert pusher.http.get("/v1/adapters/org/x/versions/1").status_code == 404


@SQLITE_ONLY
def test_model_card_over_the_limit_is_refused_and_at_the_limit_accepted(
    pusher: Pusher, registry: Any, settings: Any
) -> None:
    limit = settings.max_card_size
    before = snapshot(registry)
    resp = pusher.push("org/x", files={"README.md": b"#" * (2 * 1024 * 1024)})
    first = error_of(resp, 422, "ADAPTER_INVALID")
    assert {k: first["detail"][k] for k in ("path", "rule", "size", "limit")} == {
        "path": "README.md", "rule": "card_size", "size": 2 * 1024 * 1024, "limit": limit
    }
    assert_nothing_stored(registry, before)
    assert pusher.http.get("/v1/adapters/org/x/versions/1").status_code == 404
    extras = {"README.md": b"#" * limit, "tokenizer_config.json": b"{}", "chat_template.jinja": b"{{ messages }}"}
    resp = pusher.push("org/x", files=extras)
    assert resp.status_code == 201, resp.text
    assert set(extras) <= {f["path"] for f in resp.json()["files"]}


def test_client_and_server_share_one_allowlist(adapter_dir: Path) -> None:
    from loreg.cli.client import scan_adapter_folder

    for path, data in DISALLOWED_FILES.items():
        (adapter_dir / path).write_bytes(data)
    scanned = scan_adapter_folder(adapter_dir)
    assert set(scanned.files) <= names.ADAPTER_FILES
    assert set(DISALLOWED_FILES) <= set(scanned.skipped)
    for path in scanned.files:
        names.check_adapter_file(path, 0, max_card_size=1)


# --- values the database cannot take (found 500s on Postgres) ------------------------------------


def _cursor(values: Any) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


CRAFTED_CURSORS = [["x"], [None], [[1]], [{"a": 1}], [10**30], [True], ["1"], ["a", "b"], [1e400], [1, 2, 3]]


def test_crafted_cursors_are_refused(pusher: Pusher) -> None:
    assert pusher.push("org/x").status_code == 201
    for values in CRAFTED_CURSORS:
        for path, params in (
            ("/v1/adapters", {}),
            ("/v1/adapters", {"metric": "loss"}),
            ("/v1/base-models/loreg-test/tiny-llama/adapters", {}),
        ):
            resp = pusher.http.get(path, params={**params, "cursor": _cursor(values)})
            error_of(resp, 400, "REQUEST_INVALID")


def test_nul_characters_are_refused_not_500(pusher: Pusher, registry: Any) -> None:
    assert pusher.push("org/x").status_code == 201
    before = snapshot(registry)
    for param in ("q", "target", "task_type", "metric", "namespace", "base", "cursor"):
        error_of(pusher.http.get("/v1/adapters", params={param: "a\x00b"}), 400, "REQUEST_INVALID")
    for path in ("/v1/tokens/abc%00def", "/v1/exports/abc%00def", "/v1/adapters/org/x%00", "/v1/base-models/Org/X%00"):
        resp = pusher.http.request("DELETE" if "tokens" in path else "GET", path)
        error_of(resp, 400, "REQUEST_INVALID")
    error_of(pusher.push("org/y", message="a\x00b"), 400, "REQUEST_INVALID")
    error_of(pusher.http.post("/v1/tokens", json={"scope": "read", "description": "a\x00b"}), 400, "REQUEST_INVALID")
    error_of(pusher.http.post("/v1/adapters/org/x/versions/1/metrics", json={"metrics": {"a\x00": 1.0}}),
             400, "REQUEST_INVALID")
    assert_nothing_stored(registry, before)
