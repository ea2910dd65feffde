from __future__ import annotations

import click

from loreg.cli.commands._common import client, json_option, parse_metrics, url_option
from loreg.cli.output import emit_json


@click.group()
def metrics() -> None:
    """Evaluation metrics of versions (appended, never rewritten)."""


@metrics.command("add")
@click.argument("ref")
@click.argument("pairs", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--metric", "metric_opts", multiple=True, metavar="KEY=VALUE",
              help="An evaluation metric (repeatable), as in `loreg push --metric`.")
@json_option
@url_option
def add(ref: str, pairs: tuple[str, ...], metric_opts: tuple[str, ...], as_json: bool, url: str | None) -> None:
    """Append evaluations to REF; lookups use each key's latest value.

    \b
    loreg metrics add org/bot:3 --metric eval_loss=1.1 --metric bleu=31
    loreg metrics add org/bot:3 eval_loss=1.1 bleu=31
    """
    if not pairs and not metric_opts:
        raise click.UsageError("give at least one metric: --metric KEY=VALUE")
    with client(url) as c:
        out = c.add_metrics(ref, parse_metrics(metric_opts + pairs))
    if as_json:
        emit_json(out)
    else:
        click.echo(f"{out['name']}:{out['version']}  " + ", ".join(f"{k}={v:g}" for k, v in sorted(out["metrics"].items())))
