from __future__ import annotations

from pathlib import Path

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size, transfer_progress


@click.group()
def base() -> None:
    """Base models, known by content (layout and weights digests)."""


@base.command("register")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, metavar="ORG/MODEL", help="The name adapters refer to (base_model_name_or_path).")
@click.option("--revision", default=None, help="A revision (commit, tag) of that name.")
@click.option("--upload-weights", is_flag=True, help="Also upload shards, config and tokenizer (needed to merge).")
@json_option
@url_option
def register(folder: Path, name: str, revision: str | None, upload_weights: bool, as_json: bool, url: str | None) -> None:
    """Register the checkpoint in FOLDER (config.json + safetensors, one file or shards) as a base model."""
    with client(url) as c, transfer_progress(not as_json) as progress:
        out = c.register_base(folder, name, revision=revision, upload_weights=upload_weights, progress=progress)
    if as_json:
        emit_json(out)
        return
    verb = "registered" if out["created"] else "known already; name added:"
    click.echo(f"{verb} {', '.join(out['names'])}")
    click.echo(f"weights_digest {out['weights_digest']}")
    click.echo(f"layout_digest  {out['layout_digest']}")
    click.echo(f"{out['tensor_count']} tensors, {out['parameter_count']:,} parameters, weights "
               f"{'stored' if out['weights_uploaded'] else 'not stored (headers only)'}"
               + (f", uploaded {human_size(out['bytes_uploaded'])}" if upload_weights else ""))


@base.command("ls")
@json_option
@url_option
def ls(as_json: bool, url: str | None) -> None:
    """List registered base models."""
    with client(url) as c:
        items = c.bases()
    if as_json:
        emit_json({"items": items})
        return
    for b in items:
        click.echo(f"{', '.join(b['names']):<40} {b['weights_digest'][:19]}  {b['model_type'] or '-':<10} "
                   f"{b['parameter_count']:>14,} params  weights {'stored' if b['weights_uploaded'] else 'headers only'}")


@base.command("show")
@click.argument("ref", metavar="NAME|DIGEST")
@json_option
@url_option
def show(ref: str, as_json: bool, url: str | None) -> None:
    """Show a base model by name, name@revision or weights digest."""
    with client(url) as c:
        b = c.base(ref)
    if as_json:
        emit_json(b)
        return
    click.echo(f"names          {', '.join(b['names'])}")
    click.echo(f"weights_digest {b['weights_digest']}")
    click.echo(f"layout_digest  {b['layout_digest']}")
    click.echo(f"model_type     {b['model_type']}  architectures {', '.join(b['architectures'])}")
    click.echo(f"tensors        {b['tensor_count']}  parameters {b['parameter_count']:,}")
    click.echo(f"weights        {'stored' if b['weights_uploaded'] else 'headers only'}")
    for f in b["files"]:
        click.echo(f"  {f['path']:<40} {human_size(f['size']):>10}  {f['digest']}")
