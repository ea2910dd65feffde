"""The installed loreg's version: the one source for /v1/health, the API description and export records."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def loreg_version() -> str:
    try:
        return version("loreg")
    except PackageNotFoundError:
        return "0+unknown"
