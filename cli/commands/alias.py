from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


@click.group()
def alias() -> None:
    """Point, show or remove aliases."""


@alias.command("set")
@click.argument("ref")
@click.argument("alias_name", metavar="ALIAS")
@json_option
@url_option
def set_(ref: str, alias_name: str, as_json: bool, url: str | None) -> None:
    """Point ALIAS at REF (e.g. loreg alias set org/bot:3 prod)."""
    with client(url) as c:
        out = c.set_alias(ref, alias_name)
    if as_json:
        emit_json(out)
    else:
        click.echo(f"{out['name']}:{out['alias']} -> {out['version']}")


@alias.command("rm")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@json_option
@url_option
def rm(name: str, alias_name: str, as_json: bool, url: str | None) -> None:
    """Remove ALIAS from NAME (namespace/name)."""
    with client(url) as c:
        out = c.remove_alias(name, alias_name)
    if as_json:
        emit_json(out)
    else:
        click.echo(f"removed {out['name']}:{out['alias']}")


@alias.command("show")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@json_option
@url_option
def show(name: str, alias_name: str, as_json: bool, url: str | None) -> None:
    """Show where ALIAS points and its history."""
    from loreg.registry.formats import names

    ns, short = names.split_name(name)
    names.check_alias(alias_name)
    with client(url) as c:
        out = c.get_json(f"/v1/adapters/{ns}/{short}/aliases/{alias_name}")
    if as_json:
        emit_json(out)
        return
    click.echo(f"{out['name']}:{out['alias']} -> {out['version'] if out['version'] is not None else '(removed)'}")
    for e in out["history"]:
        click.echo(f"  {e['created_at']}  {e['version'] if e['version'] is not None else 'removed'}  {e['actor'] or ''}")
