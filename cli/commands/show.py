from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size


@click.command()
@click.argument("ref")
@json_option
@url_option
def show(ref: str, as_json: bool, url: str | None) -> None:
    """Show a version: files, config facts, metrics, aliases, warnings."""
    with client(url) as c:
        v = c.version(ref)
    if as_json:
        emit_json(v)
        return
    facts, cfg = v["facts"], v["config"]
    click.echo(f"{v['name']}:{v['version']}  {v['digest']}")
    click.echo(f"created   {v['created_at']}")
    if v.get("message"):
        click.echo(f"message   {v['message']}")
    click.echo(f"aliases   {', '.join(v['aliases']) or '-'}")
    base = v.get("base")
    if base:
        click.echo(f"base      {', '.join(base['names']) or '-'}  {base['weights_digest']}")
    click.echo(f"config    r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} task_type={cfg.get('task_type')}")
    click.echo(f"          target_modules={cfg.get('target_modules')}")
    click.echo(f"          base_model_name_or_path={cfg.get('base_model_name_or_path')}")
    for key in ("ranks", "dtypes", "parameter_count", "use_dora", "use_rslora"):
        if key in facts:
            click.echo(f"facts     {key}={facts[key]}")
    for engine, verdict in (facts.get("serving") or {}).items():
        why = "loads with its defaults" if verdict.get("loads") else "refuses it: " + "; ".join(verdict.get("reasons", []))
        click.echo(f"serving   {engine} {why}")
    if v["metrics"]:
        click.echo("metrics   " + ", ".join(f"{k}={val:g}" for k, val in sorted(v["metrics"].items())))
    click.echo("files")
    for f in v["files"]:
        click.echo(f"  {f['path']:<32} {human_size(f['size']):>10}  {f['digest']}")
    for w in v.get("warnings", []):
        click.secho(f"warning: {w.get('message')}", fg="yellow")
