"""Token globs in SQL (services.adapters.visible) select exactly the adapters whose ``ns/name`` the
glob matches, as the former LIKE over ``namespace || '/' || name`` did: equalities where a part has
no ``*``, LIKE only for a part with ``*`` among other characters. Both backends."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from loreg.registry.db.models import Adapter
from loreg.registry.db.session import make_engine
from loreg.registry.services.adapters import visible
from tests.conftest import fresh_database

NAMES = ["team-a/bot", "team-a/bot2", "team-ab/bot", "team-b/bot", "team_a/x", "teamxa/x", "shared/bot", "a/b"]
GLOBS = ["team-a", "team-a/*", "team-a/bot", "team-*", "team-*/bot", "*/bot", "team-a/bo*", "*", "*/*",
         "team_a", "*a/x", "t*m-a/b*t"]


@pytest.mark.parametrize("glob", GLOBS)
def test_each_glob_selects_what_it_matches(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                                           glob: str) -> None:
    engine = make_engine(fresh_database(request, backend, tmp_path / "home"))
    with Session(engine) as session, session.begin():
        session.add_all(Adapter(namespace=n.split("/")[0], name=n.split("/")[1]) for n in NAMES)
    with Session(engine) as session:
        full = Adapter.namespace + "/" + Adapter.name
        got = set(session.scalars(select(full).where(visible((glob,)))))
    pattern = glob if "/" in glob else f"{glob}/*"
    assert got == {n for n in NAMES if fnmatch.fnmatchcase(n, pattern)}
    engine.dispose()
