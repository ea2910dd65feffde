"""Session services (a real Postgres cluster, a real S3 protocol server) and per-test registries.

API and CLI suites run in two configurations through the ``backend`` fixture:
``sqlite`` (SQLite + local folder, the embedded default) and ``postgres`` (Postgres + S3 on moto).
Each test gets a fresh database cloned from a template the migrations built.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# No test may touch the user's real data: the whole session gets its own HOME, XDG folders and
# LOREG_HOME (set before anything reads them); pytest_sessionfinish checks the real folder.
REAL_LOREG_DATA = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "loreg"
SESSION_HOME = Path(tempfile.mkdtemp(prefix="loreg-test-home-"))
for _var, _sub in (
    ("HOME", ""),
    ("XDG_DATA_HOME", ".local/share"),
    ("XDG_CONFIG_HOME", ".config"),
    ("XDG_CACHE_HOME", ".cache"),
    ("XDG_STATE_HOME", ".local/state"),
    ("LOREG_HOME", ".local/share/loreg"),
):
    os.environ[_var] = str(SESSION_HOME / _sub)
for _var in ("LOREG_URL", "LOREG_TOKEN", "LOREG_DATABASE_URL", "LOREG_STORAGE_URL", "LOREG_S3_ENDPOINT_URL"):
    os.environ.pop(_var, None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tests.support.moto import REGION, MotoServer, fake_aws_env, make_bucket, start_moto  # noqa: E402
from tests.support.postgres import PgServer, start_postgres  # noqa: E402

BACKENDS = ("sqlite", "postgres")


def _snapshot(folder: Path) -> list[tuple[str, int, int]]:
    if not folder.exists():
        return []
    return sorted(
        (str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in [folder, *folder.rglob("*")]
    )


REAL_LOREG_DATA_BEFORE = _snapshot(REAL_LOREG_DATA)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any test wrote into the user's real loreg data folder."""
    after = _snapshot(REAL_LOREG_DATA)
    if after != REAL_LOREG_DATA_BEFORE:
        changed = sorted(set(after) ^ set(REAL_LOREG_DATA_BEFORE))[:10]
        session.config.get_terminal_writer().line(
            f"FAILED: the suite changed the real data folder {REAL_LOREG_DATA}: {changed}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(SESSION_HOME, ignore_errors=True)
TEMPLATE_DB = "loreg_template"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with fake_aws_env(), start_moto() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine

    with start_postgres() as server:
        server.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        engine = make_engine(server.url(TEMPLATE_DB), poolclass=_null_pool())
        migrate.upgrade(engine)
        engine.dispose()
        yield server


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine

    path = tmp_path_factory.mktemp("sqlite-template") / "loreg.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return path


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def loreg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "loreg-home"
    monkeypatch.setenv("LOREG_HOME", str(home))
    for var in ("LOREG_URL", "LOREG_TOKEN", "LOREG_DATABASE_URL", "LOREG_STORAGE_URL", "LOREG_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    return home


def fresh_database(request: pytest.FixtureRequest, backend: str, home: Path) -> str:
    """A database URL with the current schema, private to this test."""
    if backend == "sqlite":
        home.mkdir(parents=True, exist_ok=True)
        path = home / "loreg.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    pg: PgServer = request.getfixturevalue("pg_server")
    name = f"t_{uuid.uuid4().hex[:20]}"
    pg.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    request.addfinalizer(lambda: pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return pg.url(name)


def fresh_storage(request: pytest.FixtureRequest, backend: str, home: Path) -> tuple[str, str | None]:
    if backend == "sqlite":
        return (home / "store").as_uri(), None
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = f"loreg-{uuid.uuid4().hex[:16]}"
    make_bucket(moto.endpoint_url, bucket)
    return f"s3://{bucket}/registry", moto.endpoint_url


@pytest.fixture
def settings(request: pytest.FixtureRequest, backend: str, loreg_home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from loreg.registry.settings import Settings

    if backend == "postgres":
        request.getfixturevalue("moto_server")
        for k, v in _aws_env().items():
            monkeypatch.setenv(k, v)
    server_home = loreg_home.parent / "server-home"
    database_url = fresh_database(request, backend, server_home)
    storage_url, endpoint = fresh_storage(request, backend, server_home)
    return Settings(
        home=server_home,
        database_url=database_url,
        storage_url=storage_url,
        s3_endpoint_url=endpoint,
        s3_region=REGION if endpoint else None,
        # tests run export jobs explicitly (ExportWorker.run_once) unless they ask for threads
        export_worker="external",
    )


def _aws_env() -> dict[str, str]:
    from tests.support.moto import FAKE_AWS_ENV

    return dict(FAKE_AWS_ENV)


@pytest.fixture
def registry(settings: Any) -> Iterator[Any]:
    from loreg.registry.services.context import open_registry

    reg = open_registry(settings)
    yield reg
    reg.close()


@pytest.fixture
def app(registry: Any) -> Any:
    from loreg.registry.app import create_app

    return create_app(registry=registry)


@pytest.fixture
def make_token(registry: Any) -> Any:
    from loreg.registry.services.tokens import TokenService

    def make(scope: str = "admin", namespaces: list[str] | None = None, **kw: Any) -> str:
        return TokenService(registry).create(scope, namespaces or [], **kw)[1]

    return make


@pytest.fixture
def admin_token(make_token: Any) -> str:
    return str(make_token("admin"))


@pytest.fixture
def api(app: Any, admin_token: str) -> Iterator[Any]:
    """An in-process HTTP client (ASGI) authenticated as admin."""
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as http:
        http.headers["Authorization"] = f"Bearer {admin_token}"
        yield http


@pytest.fixture
def anon(app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as http:
        yield http


@pytest.fixture
def bare_client(app: Any, admin_token: str, loreg_home: Path) -> Iterator[Any]:
    """The real RegistryClient (as the CLI uses it) over the in-process app; no base registered."""
    from fastapi.testclient import TestClient

    from loreg.cli.client import RegistryClient

    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as http:
        yield RegistryClient("http://testserver", admin_token, http=http)


@pytest.fixture
def client(bare_client: Any, tiny_llama: dict[str, Path]) -> Any:
    """RegistryClient with the tiny LLaMA base registered (headers and digests only)."""
    from tests import factories

    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"))
    return bare_client


@pytest.fixture
def live_server(app: Any, admin_token: str, tiny_llama: dict[str, Path]) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 in a thread (real HTTP, for CLI and concurrency tests)."""
    from tests.support.server import serve_in_thread

    with serve_in_thread(app) as url:
        from loreg.cli.client import RegistryClient
        from tests import factories

        with RegistryClient(url, admin_token) as c:
            c.register_base(tiny_llama["base"], factories.base_name("llama"))
        yield url


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaMA base checkpoint and a real PEFT LoRA adapter for it (built once per session)."""
    from tests import factories

    root = tmp_path_factory.mktemp("tiny-llama")
    base = factories.make_base(root / "base", "llama")
    adapter = factories.make_adapter(root / "adapter", "llama", base_dir=base)
    return {"base": base, "adapter": adapter}


@pytest.fixture
def adapter_dir(tiny_llama: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the session's PEFT adapter folder (tests may change it)."""
    dest = tmp_path / "adapter"
    shutil.copytree(tiny_llama["adapter"], dest)
    return dest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests last. Playwright's sync API keeps its event loop marked running in the main thread
    while the session's browser lives, so any later `asyncio.run` (the vLLM resolver tests) would fail;
    pytest's grouping by the session-scoped browser parameter otherwise moves them mid-suite."""
    browser = [item for item in items if item.nodeid.startswith("tests/web/test_browser.py")]
    if browser:
        items[:] = [item for item in items if item not in browser] + browser
