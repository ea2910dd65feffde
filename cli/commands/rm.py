from __future__ import annotations

import sys

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


@click.command()
@click.argument("ref")
@click.option("--all", "whole", is_flag=True, help="Delete every version of the adapter NS/NAME and its aliases.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@url_option
def rm(ref: str, whole: bool, yes: bool, as_json: bool, url: str | None) -> None:
    """Delete the version REF (NS/NAME:3, NS/NAME:ALIAS or NS/NAME@sha256:…): it stops resolving,
    its aliases go, its number is never reused. With --all, delete every version of NS/NAME.
    """
    from loreg.registry.formats import names

    parsed = names.parse_reference(ref)
    # a bare NS/NAME means "latest" elsewhere; here that guess would delete the wrong version
    names_version = ":" in ref or "@" in ref
    if whole and names_version:
        raise click.UsageError(f"--all deletes every version: give the adapter's name alone (loreg rm {parsed.full_name} --all)")
    if not whole and not names_version:
        raise click.UsageError(
            f"say which version of {ref} to delete ({ref}:3, {ref}:ALIAS or {ref}@sha256:…), "
            f"or delete them all: loreg rm {ref} --all"
        )
    with client(url) as c:
        if whole:
            if not yes:
                adapter = c.adapter(ref)
                numbers = [v["version"] for v in adapter["versions"]]
                what = f"all {len(numbers)} versions of {ref} ({', '.join(map(str, sorted(numbers)))})"
                if adapter["aliases"]:
                    what += f" and its aliases {', '.join(sorted(adapter['aliases']))}"
                _confirm(f"delete {what}?")
            out = c.delete_adapter(ref)
        else:
            if not yes and not as_json:
                _confirm(f"delete {ref}?")
            out = c.delete(ref)
    if as_json:
        emit_json(out)
    elif whole:
        deleted = ", ".join(map(str, out["versions"])) or "none"
        click.echo(f"deleted {out['name']}: versions {deleted} (a later push continues the numbering)")
    else:
        click.echo(f"deleted {out['name']}:{out['version']}")


def _confirm(question: str) -> None:
    if not click.confirm(question, err=True):
        click.echo("nothing deleted", err=True)
        sys.exit(1)
