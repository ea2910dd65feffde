"""Forcing the lost-race path of a transaction (the retry rule of registry/db/retry.py) on a real database."""

from __future__ import annotations

from typing import Any


class LosesEveryInsertRace:
    """A session hook that makes every flush inserting a ``model`` row fail as the loser of an insert race does."""

    def __init__(self, registry: Any, model: type) -> None:
        self.sessions, self.model, self.attempts = registry.sessions, model, 0

    def __call__(self, session: Any, _context: Any, _instances: Any) -> None:
        from sqlalchemy.exc import IntegrityError

        if any(isinstance(o, self.model) for o in session.new):
            self.attempts += 1
            raise IntegrityError("INSERT", {}, Exception("a concurrent request inserted the row first"))

    def __enter__(self) -> LosesEveryInsertRace:
        from sqlalchemy import event

        event.listen(self.sessions, "before_flush", self)
        return self

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import event

        event.remove(self.sessions, "before_flush", self)


def count_rows(registry: Any, model: type) -> int:
    from sqlalchemy import func, select

    with registry.sessions.begin() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)
