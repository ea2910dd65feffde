from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from loreg.cli.commands._common import client, json_option, url_option


ENGINE_HELP = (
    "vllm: refuse what vLLM cannot load; FOLDER is VLLM_LORA_RESOLVER_CACHE_DIR. sglang: prints --lora-paths. "
    "nim: FOLDER is NIM_PEFT_SOURCE (one flat folder per reference). lorax: local adapter_source. "
    "plain: the files as pushed."
)


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("refs", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["vllm", "sglang", "lorax", "nim", "plain"]), default="plain",
              show_default=True, help=ENGINE_HELP)
@click.option("--base-name", default=None,
              help="The served model's name (vLLM's --model): written as base_model_name_or_path into each folder's "
                   "adapter_config.json (the registry's copy is unchanged). With vllm, a registered base name or "
                   "a local folder, checked by content.")
@click.option("--max-lora-rank", type=click.IntRange(1), default=16, show_default=True,
              help="vLLM's --max-lora-rank (--engine vllm).")
@click.option("--jobs", type=click.IntRange(1, 64), default=8, show_default=True, help="References downloaded at once.")
@click.option("--watch", is_flag=True, help="Keep following the references (aliases move), until interrupted.")
@click.option("--interval", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds between rounds with --watch (each round is one conditional request for every reference).")
@json_option
@url_option
def sync(
    folder: Path, refs: tuple[str, ...], engine: str, base_name: str | None, max_lora_rank: int, jobs: int,
    watch: bool, interval: float, as_json: bool, url: str | None,
) -> None:
    """Keep FOLDER/REF on what each REF names (ns/name, :3, :ALIAS, @sha256:…).

    Each FOLDER/REF (FOLDER/ns--name... for nim) is a link to a verified version folder; a new
    version is published whole, then the link swapped by one rename. A reference the registry
    stops serving (alias removed, version deleted) has its link removed and is reported "removed".
    Prints how to point the engine at FOLDER. Exits 1 if a reference is not served (without --watch).
    """
    from loreg.cli.sync import Syncer

    def report(results: list[dict[str, Any]]) -> None:
        if as_json:
            click.echo(json.dumps(results, sort_keys=True))
            return
        for r in results:
            if r["status"] == "removed":
                click.secho(f"{r['ref']}: removed, the registry no longer serves it: {r['error']} [{r['code']}]",
                            fg="yellow", err=True)
            elif r.get("error"):
                if r["status"] != "not-modified" or not watch:
                    click.secho(f"{r['ref']}: {r['error']} [{r['code']}]", fg="red", err=True)
            elif r["status"] == "updated" or not watch:
                click.echo(f"{r['ref']}: {r['status']} -> {r['name']}:{r['version']} ({r['digest'][:19]}…) at {r['path']}")

    with client(url) as c:
        syncer = Syncer(c, folder, list(refs), engine=engine, base_name=base_name, max_rank=max_lora_rank, jobs=jobs)
        if not as_json:
            for line in engine_lines(engine, syncer.engine_args()):
                click.echo(line)
        if watch:
            syncer.watch(interval, on_round=report)
            return
        results = syncer.sync_once()
    report(results)
    if any(r.get("error") for r in results):
        raise SystemExit(1)


def engine_lines(engine: str, args: dict[str, Any]) -> list[str]:
    """Copy-paste lines that point ``engine`` at the synced folder."""
    import shlex

    lines = [f"export {k}={shlex.quote(v)}" for k, v in args.get("env", {}).items()]
    if "args" in args:
        lines.append(" ".join(shlex.quote(a) for a in args["args"]))
    for ref, model in args.get("model", {}).items():
        lines.append(f"# request {ref} as model {shlex.quote(model)}")
    for ref, req in args.get("request", {}).items():
        lines.append(f"# request {ref} with {json.dumps(req, sort_keys=True)}")
    return lines
