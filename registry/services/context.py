"""The running registry's parts, built once per process from Settings (never at import time)."""

from __future__ import annotations

from dataclasses import dataclass

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
