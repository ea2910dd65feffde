from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


@click.command()
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@url_option
def rm(ref: str, yes: bool, as_json: bool, url: str | None) -> None:
    """Delete the version REF: it stops resolving, its aliases go, its number is never reused."""
    if not yes and not as_json:
        click.confirm(f"delete {ref}?", abort=True)
    with client(url) as c:
        out = c.delete(ref)
    if as_json:
        emit_json(out)
    else:
        click.echo(f"deleted {out['name']}:{out['version']}")
