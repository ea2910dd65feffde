"""One rule for transactions that lose a race: run them again, a bounded number of times.

The loser of an insert race (two requests creating the same row) gets an IntegrityError; run again,
its transaction sees the winner's row and takes the other branch. A serialization failure or a
deadlock (Postgres SQLSTATE 40001 / 40P01) is retried the same way. After the last attempt the
caller gets a ConflictError (409, "retry"), never a half-finished result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loreg.registry.errors import ConflictError

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 8
_RETRIED_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def is_race(exc: BaseException) -> bool:
    """Whether ``exc`` is what the loser of a concurrent write gets (worth running the transaction again)."""
    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in _RETRIED_SQLSTATES


def in_transaction(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, what: str, attempts: int = ATTEMPTS
) -> T:
    """Run ``work(session)`` in a transaction and return its result, again after a lost race.

    Raises:
        ConflictError: every attempt lost a race (nothing of the last attempt is kept).
    """
    for attempt in range(1, attempts + 1):
        try:
            with sessions.begin() as session:
                return work(session)
        except DBAPIError as exc:
            if not is_race(exc):
                raise
            log.debug("%s: lost a concurrent write (attempt %d of %d)", what, attempt, attempts)
    raise ConflictError(
        f"{what}: concurrent requests kept conflicting",
        detail={"attempts": attempts},
        hint="retry the request",
    )
