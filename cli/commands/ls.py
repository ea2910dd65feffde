from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size


@click.command()
@click.argument("namespace", required=False)
@click.option("--base", default=None, metavar="NAME|DIGEST", help="Only adapters for this base model.")
@click.option("--target", default=None, help="Only adapters with this target module (e.g. q_proj).")
@click.option("--min-rank", type=int, default=None, metavar="R", help="Only adapters whose every rank is at least R.")
@click.option("--max-rank", type=int, default=None, metavar="R", help="Only adapters whose every rank is at most R.")
@click.option("--dora/--no-dora", default=None, help="Only DoRA (or only non-DoRA) adapters.")
@click.option("--task-type", default=None, metavar="TYPE",
              help="Only adapters with this PEFT task_type (CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, ...).")
@click.option("--sort-by", "metric", default=None, metavar="METRIC",
              help="Order by this metric's latest value; adapters without it come last.")
@click.option("--asc/--desc", "ascending", default=None,
              help="Sort order. Default: ascending when METRIC's name contains 'loss', else descending; "
                   "without --sort-by, newest first. The REST API has the same default.")
@click.option("-q", "--query", default=None, help="Text search in names and messages.")
@click.option("--all-versions", is_flag=True, help="Every matching version, not only each adapter's newest.")
@json_option
@url_option
def ls(namespace: str | None, base: str | None, target: str | None, min_rank: int | None, max_rank: int | None,
       dora: bool | None, task_type: str | None, metric: str | None, ascending: bool | None, query: str | None,
       all_versions: bool, as_json: bool, url: str | None) -> None:
    """List adapters (newest version of each), optionally in NAMESPACE, filtered and sorted.

    A `!` after the version number marks a version stored with warnings (for example a feature
    vLLM refuses, or a base other than the one its config names); `loreg show NAME:VERSION` lists them.
    """
    # no --asc/--desc: the server's default order, so the CLI and REST sort alike
    order = None if ascending is None else ("asc" if ascending else "desc")
    params = dict(namespace=namespace, base=base, target=target, min_rank=min_rank, max_rank=max_rank,
                  dora=None if dora is None else str(dora).lower(), task_type=task_type, metric=metric,
                  order=order, q=query, all_versions="true" if all_versions else None)
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
    if any(i.get("warnings") for i in items):
        click.echo("! stored with warnings: loreg show NAME:VERSION lists them", err=True)
