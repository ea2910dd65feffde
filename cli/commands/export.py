from __future__ import annotations

import sys
from pathlib import Path

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size, transfer_progress


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--weight", "weights", multiple=True, type=float, help="One per REF, in order (default 1.0).")
@click.option("--base", default=None, metavar="NAME|DIGEST", help="Base model (default: the first adapter's).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Destination folder.")
@click.option("--link", is_flag=True,
              help="Hard-link the files to the local cache instead of copying them (no second copy on disk; "
                   "only for folders nobody edits).")
@json_option
@url_option
def export(refs: tuple[str, ...], weights: tuple[float, ...], base: str | None, dtype: str, output: Path,
           link: bool, as_json: bool, url: str | None) -> None:
    """Merge adapters into their base model on the server and download the merged model.

    The folder holds the base's safetensors shards with merged weights, the index when sharded,
    config.json and the tokenizer: transformers and vLLM load it as is.
    """
    if weights and len(weights) != len(refs):
        raise click.BadParameter("give one --weight per REF, or none", param_hint="--weight")
    bar = None
    task = None

    def on_state(job: dict) -> None:  # type: ignore[type-arg]
        nonlocal bar, task
        if as_json or not sys.stderr.isatty():
            return
        p = job.get("progress") or {}
        if bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("merging {task.fields[state]}"), BarColumn(), TextColumn("{task.fields[count]}"),
                           TimeElapsedColumn(), console=Console(stderr=True))
            bar.start()
            task = bar.add_task("merge", total=None, state=job["state"], count="")
        total = p.get("tensors_total") or None
        count = f"{p.get('tensors_done', 0)}/{total} tensors" if total else ""
        bar.update(task, completed=p.get("tensors_done", 0), total=total, state=job["state"], count=count)
        if job["state"] in ("done", "failed"):
            bar.stop()

    with client(url) as c, transfer_progress(not as_json) as progress:
        try:
            out = c.export(list(refs), output, weights=list(weights) or None, base=base, dtype=dtype,
                           on_state=on_state, progress=progress, link=link)
        finally:
            if bar is not None:
                bar.stop()
    if as_json:
        emit_json(out)
        return
    total = sum(f["size"] for f in out["files"])
    click.echo(f"exported {' + '.join(refs)} into {out['path']}: {len(out['files'])} files, {human_size(total)} "
               f"({human_size(out['bytes_downloaded'])} downloaded), merged on {out.get('device') or '?'}")
