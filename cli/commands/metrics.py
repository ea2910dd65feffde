from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, parse_metrics, url_option
from loreg.cli.output import emit_json


@click.group()
def metrics() -> None:
    """Evaluation metrics of versions (appended, never rewritten)."""


@metrics.command("add")
@click.argument("ref")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@json_option
@url_option
def add(ref: str, pairs: tuple[str, ...], as_json: bool, url: str | None) -> None:
    """Append evaluations to REF; lookups use each key's latest value."""
    with client(url) as c:
        out = c.add_metrics(ref, parse_metrics(pairs))
    if as_json:
        emit_json(out)
    else:
        click.echo(f"{out['name']}:{out['version']}  " + ", ".join(f"{k}={v:g}" for k, v in sorted(out["metrics"].items())))
