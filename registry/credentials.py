"""The credentials file in LOREG_HOME (server URL -> token, mode 0600): `loreg serve` writes its own
admin token there on the embedded default, and the CLI reads it (loreg.cli.config) and keeps logins."""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE_NAME = "credentials.json"


def read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write(path: Path, url: str, token: str) -> Path:
    """Keep ``token`` for ``url`` in the credentials file at ``path`` (mode 0600, written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = read(path)
    creds[url.rstrip("/")] = token
    tmp = path.with_name(f".credentials.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
