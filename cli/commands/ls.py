from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size


@click.command()
@click.argument("namespace", required=False)
@click.option("--base", default=None, metavar="NAME|DIGEST", help="Only adapters for this base model.")
@click.option("--target", default=None, help="Only adapters with this target module (e.g. q_proj).")
@click.option("--min-rank", type=int, default=None)
@click.option("--max-rank", type=int, default=None)
@click.option("--dora/--no-dora", default=None, help="Only DoRA (or only non-DoRA) adapters.")
@click.option("--task-type", default=None)
@click.option("--sort-by", "metric", default=None, metavar="METRIC", help="Order by this metric's latest value.")
@click.option("--asc/--desc", "ascending", default=None, help="Sort order (default: desc; asc with --sort-by *loss*).")
@click.option("-q", "--query", default=None, help="Text search in names and messages.")
@click.option("--all-versions", is_flag=True, help="Every matching version, not only each adapter's newest.")
@json_option
@url_option
def ls(namespace: str | None, base: str | None, target: str | None, min_rank: int | None, max_rank: int | None,
       dora: bool | None, task_type: str | None, metric: str | None, ascending: bool | None, query: str | None,
       all_versions: bool, as_json: bool, url: str | None) -> None:
    """List adapters (newest version of each), optionally in NAMESPACE, filtered and sorted."""
    if ascending is None:
        ascending = bool(metric and "loss" in metric)
    params = dict(namespace=namespace, base=base, target=target, min_rank=min_rank, max_rank=max_rank,
                  dora=None if dora is None else str(dora).lower(), task_type=task_type, metric=metric,
                  order="asc" if ascending else "desc", q=query, all_versions="true" if all_versions else None)
    with client(url) as c:
        items = c.list_all(**params)
    if as_json:
        emit_json({"items": items})
        return
    if not items:
        click.echo("no adapters", err=True)
        return
    rows = [("NAME", "VERSION", "RANK", "TARGETS", "BASE", "METRICS", "ALIASES", "SIZE")]
    for i in items:
        b = i.get("base") or {}
        base_label = (b.get("names") or [b.get("weights_digest", "")[:19]])[0] if b else "-"
        if i.get("match") == "layout":
            base_label += " (layout only)"
        metrics = ", ".join(f"{k}={v:g}" for k, v in sorted(i["metrics"].items())) or "-"
        warn_mark = " !" if i.get("warnings") else ""
        rows.append((i["name"], str(i["version"]) + warn_mark, str(i["rank"]), ",".join(i["target_modules"]) or "-",
                     base_label, metrics, ",".join(i["aliases"]) or "-", human_size(i["size"])))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
