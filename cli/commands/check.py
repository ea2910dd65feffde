from __future__ import annotations

from pathlib import Path

import click

from loreg.cli.commands._common import base_line, client, json_option, url_option
from loreg.cli.output import emit_json, warn


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", default=None, metavar="NAME|DIGEST", help="Base model (default: the config's base_model_name_or_path; a local folder is matched by content).")
@json_option
@url_option
def check(folder: Path, base: str | None, as_json: bool, url: str | None) -> None:
    """Validate the adapter in FOLDER against a registered base model, locally; uploads nothing."""
    with client(url) as c:
        out = c.check(folder, base)
    if as_json:
        emit_json(out)
        return
    facts = out["facts"]
    if out.get("base_match"):
        click.echo(base_line(out["base_match"]))
    click.echo(f"ok: {len(facts['modules'])} modules, ranks {facts['ranks']}, fit {out['base']['ref']} "
               f"({out['base']['weights_digest'][:19]}…)")
    for w in out["warnings"]:
        warn(f"warning: {w.get('message')}")
