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
@click.option("--method", default="linear_delta", show_default=True,
              help="linear_delta: the weighted sum of the adapters' changes; or a `loreg combine` method, applied first.")
@click.option("--density", type=float, default=None, help="With --method: as `loreg combine`.")
@click.option("--majority-sign", "majority_sign", type=click.Choice(["total", "frequency"]), default=None)
@click.option("--svd-rank", type=int, default=None)
@click.option("--svd-clamp", type=float, default=None)
@click.option("--seed", type=int, default=None)
@json_option
@url_option
def export(refs: tuple[str, ...], weights: tuple[float, ...], base: str | None, dtype: str, output: Path,
           link: bool, method: str, density: float | None, majority_sign: str | None, svd_rank: int | None,
           svd_clamp: float | None, seed: int | None, as_json: bool, url: str | None) -> None:
    """Merge adapters into their base model on the server and download the merged model.

    The folder holds the base's safetensors shards with merged weights, the index when sharded,
    config.json and the tokenizer: transformers and vLLM load it as is. With --method the adapters
    are combined first (see `loreg combine`); the method is part of the export's record.
    """
    combination = {"method": method, "density": density, "majority_sign_method": majority_sign,
                   "svd_rank": svd_rank, "svd_clamp": svd_clamp, "seed": seed}
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
                           on_state=on_state, progress=progress, link=link, combination=combination)
        finally:
            if bar is not None:
                bar.stop()
    if as_json:
        emit_json(out)
        return
    total = sum(f["size"] for f in out["files"])
    click.echo(f"exported {' + '.join(refs)} into {out['path']}: {len(out['files'])} files, {human_size(total)} "
               f"({human_size(out['bytes_downloaded'])} downloaded), merged on {out.get('device') or '?'}")
