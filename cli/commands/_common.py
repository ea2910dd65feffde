"""Options shared by commands."""

from __future__ import annotations

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
url_option = click.option("--url", envvar="LOREG_URL", default=None, help="Server URL (LOREG_URL).")


def client(url: str | None):  # type: ignore[no-untyped-def]
    from loreg.cli.client import RegistryClient

    return RegistryClient(url)


def base_line(match: dict[str, str]) -> str:
    """How a base folder named by the adapter's config was matched to a registered base."""
    return f"base: {match['name']} (matched by {match['by']} from {match['path']})"


def parse_metrics(pairs: tuple[str, ...]) -> dict[str, float]:
    import math

    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: use KEY=VALUE, e.g. eval_loss=1.21", param_hint="--metric")
        try:
            number = float(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: {value!r} is not a number", param_hint="--metric") from None
        if not math.isfinite(number):
            raise click.BadParameter(f"{pair!r}: metrics must be finite", param_hint="--metric")
        out[key] = number
    return out


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, param_hint: str) -> int:
    """``90s``, ``30m``, ``24h``, ``2d``, ``1w`` (or ``0``) as seconds."""
    import re

    m = re.fullmatch(r"(\d{1,9})([smhdw])", text.strip())
    if m is None:
        if text.strip() == "0":
            return 0
        raise click.BadParameter(f"{text!r}: give a number with a unit, e.g. 30m, 24h or 2d", param_hint=param_hint)
    return int(m.group(1)) * DURATION_UNITS[m.group(2)]
