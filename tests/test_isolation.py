"""The suite never touches the user's real data folder (conftest gives the session its own HOME)."""

from __future__ import annotations

import os
from pathlib import Path

from tests import conftest


def test_session_home_and_xdg_folders_are_private() -> None:
    home = conftest.SESSION_HOME
    for var in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "LOREG_HOME"):
        assert Path(os.environ[var]).is_relative_to(home), var
    assert Path.home() == home
    assert not conftest.REAL_LOREG_DATA.is_relative_to(home)


def test_client_and_server_default_folders_resolve_inside_the_session_home(monkeypatch) -> None:
    from loreg.cli import config
    from loreg.registry.settings import Settings

    monkeypatch.delenv("LOREG_HOME")
    for path in (config.loreg_home(), config.cache_dir(), config.credentials_path(), Settings().home):
        assert Path(path).is_relative_to(conftest.SESSION_HOME), path
