from __future__ import annotations

from typing import Any

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json, human_size


@click.command()
@click.argument("ref")
@json_option
@url_option
def show(ref: str, as_json: bool, url: str | None) -> None:
    """Show a version: files, config facts, metrics, aliases, warnings, and how to serve it.

    The "use" part (also under "use" in --json) names the reference to use (pinned by digest, and
    the alias form, which follows the alias) and, for each engine, the `loreg sync` command and
    the engine's arguments for a synced folder DIR.
    """
    with client(url) as c:
        v = c.version(ref)
    v["use"] = usage(v)
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
    if v.get("made_by"):
        for line in lineage_lines(v["made_by"]):
            click.echo(line)
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
    use = v["use"]
    click.echo(f"use       {use['pinned']}  (pinned: these bytes for good)")
    for alias_ref in use["aliases"]:
        click.echo(f"          {alias_ref}  (follows the alias)")
    for engine, how in use["engines"].items():
        click.echo(f"serve     {engine:7s} {how['sync']}")
        for line in how["lines"]:
            click.echo(f"                  {line}")


def lineage_lines(made_by: dict[str, Any]) -> list[str]:
    """How a version a combination made shows its lineage (inputs, method, every parameter)."""
    from loreg.registry.merge.combine import FACTOR_METHODS  # no torch: the module imports it inside functions

    params = ", ".join(f"{k}={val}" for k, val in sorted(made_by.get("params", {}).items()) if val is not None)
    lines = [f"made by   combination {made_by['id']}: {made_by['method']}" + (f" ({params})" if params else "")]
    lines += [f"          {i['weight']:g} x {i['name']}  {i['digest']}" for i in made_by.get("inputs", [])]
    if made_by["method"] in FACTOR_METHODS:
        lines.append("          A's and B's combined separately: not the weighted sum of the inputs' changes "
                     "(PEFT issue #3004)")
    return lines


def usage(v: dict[str, Any]) -> dict[str, Any]:
    """The references naming this version and, per engine, how to serve it from a synced folder DIR."""
    from loreg.cli.commands.sync import engine_lines
    from loreg.cli.sync import ENGINES, engine_args, folder_name

    pinned = f"{v['name']}@{v['digest']}"
    aliases = [f"{v['name']}:{a}" for a in v.get("aliases", [])]
    ref = aliases[0] if aliases else pinned
    engines = {}
    for engine in ENGINES:
        base = " --base-name MODEL" if engine == "vllm" else ""
        args = engine_args(engine, "DIR", {ref: f"DIR/{folder_name(engine, ref)}"})
        engines[engine] = {"sync": f"loreg sync DIR {ref} --engine {engine}{base}", **args,
                           "lines": engine_lines(engine, args)}
    return {"pinned": pinned, "aliases": aliases, "ref": ref, "engines": engines}
