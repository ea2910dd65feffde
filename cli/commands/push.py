from __future__ import annotations

from pathlib import Path

import click

from loreg.cli.commands._common import base_line, client, json_option, parse_metrics, url_option
from loreg.cli.output import emit_json, human_size, transfer_progress, warn


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("name")
@click.option("--metric", "metrics", multiple=True, metavar="KEY=VALUE", help="An evaluation metric (repeatable).")
@click.option("--alias", "aliases", multiple=True, metavar="ALIAS", help="Point this alias at the version (repeatable).")
@click.option("--message", "-m", default=None, help="A note stored with the version.")
@click.option(
    "--base",
    default=None,
    metavar="NAME|DIGEST",
    help="Base model to validate against (default: the config's base_model_name_or_path; a local folder is matched by content).",
)
@json_option
@url_option
def push(
    folder: Path,
    name: str,
    metrics: tuple[str, ...],
    aliases: tuple[str, ...],
    message: str | None,
    base: str | None,
    as_json: bool,
    url: str | None,
) -> None:
    """Push the PEFT adapter in FOLDER as the next version of NAME (namespace/name).

    Only the adapter's files are stored (adapter_config.json, adapter_model.safetensors, README.md,
    tokenizer and chat-template files); only what the server lacks is uploaded.
    """
    parsed = parse_metrics(metrics)
    with client(url) as c, transfer_progress(not as_json) as progress:
        out = c.push(folder, name, metrics=parsed, aliases=list(aliases), message=message, base=base, progress=progress)
    if as_json:
        emit_json(out)
        return
    if out["skipped"]:
        warn(f"skipped (not adapter files): {', '.join(out['skipped'])}")
    if out.get("base_match"):
        click.echo(base_line(out["base_match"]))
    verb = "pushed" if out["created"] else "unchanged: already stored as"
    click.echo(f"{verb} {out['name']}:{out['version']}  {out['digest']}")
    click.echo(f"uploaded {human_size(out['bytes_uploaded'])} ({len(out['files_uploaded'])} of {len(out['files'])} files)")
    if out["aliases"]:
        click.echo(f"aliases: {', '.join(out['aliases'])}")
    for w in out.get("warnings", []):
        warn(f"warning: {w.get('message')}")
