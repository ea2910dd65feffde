"""Where the CLI finds its server, token, cache and credentials file."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"


def loreg_home() -> Path:
    home = os.environ.get("LOREG_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "loreg"


def server_url(url: str | None = None) -> str:
    return (url or os.environ.get("LOREG_URL") or DEFAULT_URL).rstrip("/")


# the file is the server's too (`loreg serve` writes its token there): one owner, imported when
# used so that `loreg --help` loads no server module
def credentials_path() -> Path:
    from loreg.registry import credentials

    return loreg_home() / credentials.FILE_NAME


def read_credentials() -> dict[str, str]:
    from loreg.registry import credentials

    return credentials.read(credentials_path())


def write_credential(url: str, token: str) -> Path:
    """Keep ``token`` for ``url`` in the credentials file (mode 0600, written atomically)."""
    from loreg.registry import credentials

    return credentials.write(credentials_path(), url, token)


def token_for(url: str) -> str | None:
    return os.environ.get("LOREG_TOKEN") or read_credentials().get(url.rstrip("/"))


def cache_dir() -> Path:
    return loreg_home() / "cache"
