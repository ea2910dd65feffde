from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


@click.command()
@click.argument("ref")
@click.option("--top", default=20, show_default=True, help="Show this many modules (most changed first).")
@json_option
@url_option
def inspect(ref: str, top: int, as_json: bool, url: str | None) -> None:
    """Per adapted module of REF: ||scale·B·A||, effective rank, and ||ΔW||/||W|| when base weights are stored."""
    from loreg.registry.formats import names

    r = names.parse_reference(ref)
    with client(url) as c:
        out = c.get_json(f"/v1/adapters/{r.namespace}/{r.name}/versions/{r.tag}/inspect")
    if as_json:
        emit_json(out)
        return
    click.echo(f"{out['name']}:{out['version']}  {len(out['modules'])} modules, most changed first")
    click.echo(f"{'MODULE':<56} {'RANK':>4} {'||dW||':>10} {'EFF.RANK':>8} {'ENTROPY':>8} {'||dW||/||W||':>12}")
    for m in out["modules"][:top]:
        rel = m.get("relative_change")
        click.echo(f"{m['module'][-56:]:<56} {m['rank']:>4} {m['delta_norm']:>10.4g} {m['effective_rank']:>8} "
                   f"{m['entropy_rank']:>8.2f} {(f'{rel:.3g}' if rel is not None else '-'):>12}")
