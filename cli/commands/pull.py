from __future__ import annotations

from pathlib import Path

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size, transfer_progress


@click.command()
@click.argument("ref")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Destination folder (default: ./NAME).")
@click.option("--link", is_flag=True,
              help="Hard-link the files to the local cache instead of copying them (no second copy on disk; "
                   "only for folders nobody edits: an edit shows in every folder linked to the same bytes).")
@json_option
@url_option
def pull(ref: str, output: Path | None, link: bool, as_json: bool, url: str | None) -> None:
    """Download REF (ns/name, ns/name:3, ns/name:ALIAS, ns/name@sha256:…) into a folder.

    Every file is verified (sha256) before it is moved into place; a local cache makes a second
    pull of the same bytes download nothing. The files are your own copies (copied in the kernel,
    or reflinked where the file system can), unless --link.
    """
    from loreg.registry.formats import names

    r = names.parse_reference(ref)
    dest = output or Path(r.name)
    with client(url) as c, transfer_progress(not as_json) as progress:
        out = c.pull(ref, dest, progress=progress, link=link)
    if as_json:
        emit_json(out)
        return
    click.echo(f"pulled {out['name']}:{out['version']} into {out['path']} ({human_size(out['bytes_downloaded'])} downloaded)")
