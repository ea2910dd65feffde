"""The running registry's parts, built once per process from Settings (never at import time)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loreg.registry.db.session import make_engine, make_session_factory
from loreg.registry.settings import Settings
from loreg.registry.storage.protocol import BlobStore
from loreg.registry.storage.factory import store_from_url


@dataclass
class AppContext:
    """What every service shares in one process: settings, the database engine and sessions, the blob store."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: BlobStore

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for a read that writes nothing. On Postgres it runs without BEGIN and COMMIT:
        under READ COMMITTED every statement takes its own snapshot whether a transaction wraps the
        statements or not, so the transaction would add nothing to a read but two round trips (of the
        few a read makes). On SQLite the read keeps its transaction (there it is one snapshot)."""
        if self.engine.dialect.name != "postgresql":
            with self.sessions.begin() as session:
                yield session
            return
        with self.sessions(bind=self._autocommit) as session:
            yield session

    @cached_property
    def _autocommit(self) -> Engine:
        return self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def close(self) -> None:
        self.engine.dispose()
        close_store = getattr(self.store, "close", None)
        if callable(close_store):
            close_store()


def open_registry(settings: Settings, *, store: BlobStore | None = None) -> AppContext:
    engine = make_engine(settings.effective_database_url)
    if store is None:
        store = store_from_url(
            settings.effective_storage_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            s3_presign_endpoint_url=settings.s3_presign_endpoint_url,
        )
    return AppContext(settings=settings, engine=engine, sessions=make_session_factory(engine), store=store)
