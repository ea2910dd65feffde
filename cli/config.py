"""Where the CLI finds its server, token, cache and credentials file."""

from __future__ import annotations

import json
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


def credentials_path() -> Path:
    return loreg_home() / "credentials.json"


def read_credentials() -> dict[str, str]:
    path = credentials_path()
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_credential(url: str, token: str) -> Path:
    """Keep ``token`` for ``url`` in the credentials file (mode 0600, written atomically)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = read_credentials()
    creds[url.rstrip("/")] = token
    tmp = path.with_name(f".credentials.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def token_for(url: str) -> str | None:
    return os.environ.get("LOREG_TOKEN") or read_credentials().get(url.rstrip("/"))


def cache_dir() -> Path:
    return loreg_home() / "cache"
