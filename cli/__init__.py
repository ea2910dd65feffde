"""The client side of loreg: the `loreg` command and the Python client.

    from loreg.cli import Client
    client = Client()                     # LOREG_URL, LOREG_TOKEN or the credentials file
    version = client.resolve("org/support-bot:prod")

Names resolve lazily, so `loreg --help` imports neither httpx nor anything else heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "ResolvedVersion", "FileEntry", "LoregError"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from loreg.cli.client import RegistryClient

        return RegistryClient
    if name in ("ResolvedVersion", "FileEntry"):
        from loreg.cli import client

        return getattr(client, name)
    # the typed errors of the one table (loreg.registry.errors), e.g. `from loreg.cli import NotFoundError`
    from loreg.registry import errors

    if name == "LoregError" or name in {cls.__name__ for cls in errors.ERRORS.values()}:
        return getattr(errors, name)
    raise AttributeError(f"module 'loreg.cli' has no attribute {name!r}")
