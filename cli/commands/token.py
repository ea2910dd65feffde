from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


def parse_expiry(value: str | None) -> datetime | None:
    if value is None:
        return None
    m = re.fullmatch(r"(\d{1,5})([hdw])", value)
    if m is None:
        raise click.BadParameter("use a duration like 12h, 30d or 8w", param_hint="--expires")
    n, unit = int(m.group(1)), m.group(2)
    delta = {"h": timedelta(hours=n), "d": timedelta(days=n), "w": timedelta(weeks=n)}[unit]
    return datetime.now(UTC) + delta


@click.group()
def token() -> None:
    """Create, list and revoke API tokens (admin)."""


@token.command("create")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="read", show_default=True)
@click.option("--namespace", "namespaces", multiple=True, metavar="GLOB", help="Limit to namespaces, e.g. 'team-a/*'.")
@click.option("--expires", default=None, metavar="DURATION", help="e.g. 30d, 12h, 8w.")
@click.option("--description", default=None)
@click.option("--bootstrap", is_flag=True, help="Create directly in the database (server host; first admin token).")
@json_option
@url_option
def create(scope: str, namespaces: tuple[str, ...], expires: str | None, description: str | None, bootstrap: bool,
           as_json: bool, url: str | None) -> None:
    """Create a token; it is shown once."""
    expires_at = parse_expiry(expires)
    if bootstrap:
        from loreg.registry.server import bootstrap_token

        out = bootstrap_token(scope, list(namespaces), expires_at, description)
    else:
        body = {"scope": scope, "namespaces": list(namespaces), "description": description,
                "expires_at": expires_at.isoformat() if expires_at else None}
        with client(url) as c:
            out = c.request("POST", "/v1/tokens", json=body).json()
    if as_json:
        emit_json(out)
    else:
        click.echo(out["token"])
        click.echo(f"id {out['id']}, scope {out['scope']}; this is the only time the token is shown", err=True)


@token.command("ls")
@json_option
@url_option
def ls(as_json: bool, url: str | None) -> None:
    """List tokens (never their secrets)."""
    with client(url) as c:
        out = c.get_json("/v1/tokens")
    if as_json:
        emit_json(out)
        return
    for t in out["items"]:
        state = "revoked" if t["revoked_at"] else "active"
        click.echo(f"{t['id']}  {t['scope']:<5}  {','.join(t['namespaces']) or '*':<20} {state:<8} "
                   f"expires {t['expires_at'] or 'never'}  {t['description'] or ''}")


@token.command("revoke")
@click.argument("token_id")
@json_option
@url_option
def revoke(token_id: str, as_json: bool, url: str | None) -> None:
    """Revoke token TOKEN_ID."""
    with client(url) as c:
        out = c.request("DELETE", f"/v1/tokens/{token_id}").json()
    if as_json:
        emit_json(out)
    else:
        click.echo(f"revoked {out['id']}")


@click.command()
@click.argument("url")
@click.option("--token", "token_value", prompt=True, hide_input=True, help="The token (prompted if not given).")
def login(url: str, token_value: str) -> None:
    """Check TOKEN against the server at URL and keep it in the credentials file (mode 0600)."""
    from loreg.cli import config
    from loreg.cli.client import RegistryClient

    with RegistryClient(url, token_value.strip()) as c:
        me = c.get_json("/v1/tokens/self")
    path = config.write_credential(config.server_url(url), token_value.strip())
    click.echo(f"logged in to {config.server_url(url)} as token {me['id']} ({me['scope']}); saved in {path}")
