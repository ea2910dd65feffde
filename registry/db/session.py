"""Engine and session factory: Postgres (psycopg 3, a ping on checkout after idle) or embedded SQLite
(WAL, BEGIN IMMEDIATE)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# a pooled connection that finished a statement this recently is not pinged again on checkout
PING_AFTER_IDLE_S = 0.1


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            # pysqlite's own transaction handling is off: we emit BEGIN IMMEDIATE ourselves
            isolation_level=None,
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # take the write lock up front: two deferred transactions that both upgrade to write
            # deadlock into "database is locked" instead of waiting on busy_timeout
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    pre_ping = kwargs.pop("pool_pre_ping", True)
    ping_after_idle_s = kwargs.pop("ping_after_idle_s", PING_AFTER_IDLE_S)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        # the connection checked in last goes out first: a request's token check and its read share
        # one, still fresh, and surplus ones stay idle long enough to be pinged or closed
        kwargs.setdefault("pool_use_lifo", True)
    kwargs.setdefault("connect_args", {"connect_timeout": 10})
    engine = create_engine(url, **kwargs)
    if pre_ping:
        ping_after_idle(engine, ping_after_idle_s)
    return engine


def ping_after_idle(engine: Engine, idle_s: float) -> None:
    """SQLAlchemy's pool_pre_ping, but only for a connection idle longer than ``idle_s``.

    A ping proves a pooled connection alive at checkout, so a restarted server costs no request. It
    is a round trip, and a request checks out twice (its token, then its read): two of a read's five.
    A connection that finished a statement a moment ago is as proven as one just pinged (either way
    the server may die the next instant, and that request gets a 503 to retry, never a 500), so only
    one idle longer than ``idle_s`` is pinged; a dead one is replaced (DisconnectionError: the pool
    connects again) before any request uses it."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")  # None: connected just now
        if since is None or time.monotonic() - since <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            if engine.dialect.is_disconnect(exc, dbapi_conn, None):
                raise DisconnectionError("a pooled connection died while idle") from exc
            raise


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
