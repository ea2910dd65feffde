from __future__ import annotations

from pathlib import Path

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size, transfer_progress


@click.command()
@click.argument("ref")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Destination folder (default: ./NAME).")
@json_option
@url_option
def pull(ref: str, output: Path | None, as_json: bool, url: str | None) -> None:
    """Download REF (ns/name, ns/name:3, ns/name:ALIAS, ns/name@sha256:…) into a folder.

    Every file is verified (sha256) before it is moved into place; a local cache makes a second
    pull of the same bytes download nothing.
    """
    from loreg.registry.formats import names

    r = names.parse_reference(ref)
    dest = output or Path(r.name)
    with client(url) as c, transfer_progress(not as_json) as progress:
        out = c.pull(ref, dest, progress=progress)
    if as_json:
        emit_json(out)
        return
    click.echo(f"pulled {out['name']}:{out['version']} into {out['path']} ({human_size(out['bytes_downloaded'])} downloaded)")
