from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from loreg.cli.commands._common import client, json_option, url_option


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("refs", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["vllm", "plain"]), default="plain", show_default=True,
              help="vllm: refuse what vLLM cannot load and name --base-model in each adapter_config.json.")
@click.option("--base-model", default=None,
              help="vLLM's --model (a registered base name or a local folder): checked by content, written "
                   "into adapter_config.json (vLLM's filesystem resolver compares them). --engine vllm only.")
@click.option("--max-lora-rank", type=click.IntRange(1), default=16, show_default=True,
              help="vLLM's --max-lora-rank (--engine vllm).")
@click.option("--watch", is_flag=True, help="Keep following the references (aliases move), until interrupted.")
@click.option("--interval", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds between rounds with --watch (each round is one conditional request per reference).")
@json_option
@url_option
def sync(
    folder: Path, refs: tuple[str, ...], engine: str, base_model: str | None, max_lora_rank: int, watch: bool,
    interval: float, as_json: bool, url: str | None,
) -> None:
    """Keep FOLDER/REF on what each REF names (ns/name, :3, :ALIAS, @sha256:…).

    Each FOLDER/REF is a link to a verified version folder; a new version is published whole, then
    the link swapped by one rename. With --engine vllm, start vLLM with
    VLLM_LORA_RESOLVER_CACHE_DIR=FOLDER and VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, and request
    REF as the model. Exits 1 if a reference failed (without --watch).
    """
    from loreg.cli.sync import Syncer

    if base_model is not None and engine != "vllm":
        raise click.BadParameter("--base-model is for --engine vllm", param_hint="--base-model")

    def report(results: list[dict[str, Any]]) -> None:
        if as_json:
            click.echo(json.dumps(results, sort_keys=True))
            return
        for r in results:
            if r["status"] == "failed":
                click.secho(f"{r['ref']}: {r['error']} [{r['code']}]", fg="red", err=True)
            elif r["status"] == "updated" or not watch:
                click.echo(f"{r['ref']}: {r['status']} -> {r['name']}:{r['version']} ({r['digest'][:19]}…) at {r['path']}")

    with client(url) as c:
        syncer = Syncer(c, folder, list(refs), engine=engine, base_model=base_model, max_rank=max_lora_rank)
        if watch:
            syncer.watch(interval, on_round=report)
            return
        results = syncer.sync_once()
    report(results)
    if any(r["status"] == "failed" for r in results):
        raise SystemExit(1)
