from __future__ import annotations

import sys

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--method", required=True,
              help="PEFT's combination_type: cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd, "
                   "linear, ties, dare_linear, dare_ties, magnitude_prune.")
@click.option("--weight", "weights", multiple=True, type=float, help="One per REF, in order (default 1.0).")
@click.option("--density", type=float, default=None, help="Fraction of entries kept (ties, dare, magnitude_prune).")
@click.option("--majority-sign", "majority_sign", type=click.Choice(["total", "frequency"]), default=None,
              help="TIES sign election (default total).")
@click.option("--svd-rank", type=int, default=None, help="Rank of the SVD methods' result (default: the largest input rank).")
@click.option("--svd-clamp", type=float, default=None, help="Quantile the SVD factors are clamped to.")
@click.option("--seed", type=int, default=None, help="Seed of the DARE masks (default 0).")
@click.option("--to", "to", required=True, metavar="NS/NAME", help="The adapter the result is pushed to, as its next version.")
@click.option("--alias", "aliases", multiple=True, help="Point this alias at the new version (repeatable).")
@json_option
@url_option
def combine(refs: tuple[str, ...], method: str, weights: tuple[float, ...], density: float | None,
            majority_sign: str | None, svd_rank: int | None, svd_clamp: float | None, seed: int | None, to: str,
            aliases: tuple[str, ...], as_json: bool, url: str | None) -> None:
    """Combine adapter versions on the server (PEFT's add_weighted_adapter methods) into the next version of NS/NAME.

    The server checks the request first (one base, equal ranks for linear/ties/dare*/magnitude_prune,
    parameters in range); a worker combines and pushes the result, with its lineage (`loreg show`).
    linear, ties, dare_* and magnitude_prune combine A's and B's separately: the result is not the
    weighted sum of the adapters' changes (PEFT issue #3004); cat is exact, svd its best low-rank fit.
    """
    if weights and len(weights) != len(refs):
        raise click.BadParameter("give one --weight per REF, or none", param_hint="--weight")
    shown: list[str] = []

    def on_state(job: dict) -> None:  # type: ignore[type-arg]
        if as_json or not sys.stderr.isatty():
            return
        step = (job.get("progress") or {}).get("step")
        line = f"combining ({job['method']}): {job['state']}" + (f", {step}" if step and job["state"] == "running" else "")
        if not shown or shown[-1] != line:
            shown.append(line)
            click.echo(f"\r{line:<60}", err=True, nl=job["state"] in ("done", "failed"))

    with client(url) as c:
        out = c.combine(list(refs), to, method=method, weights=list(weights) or None, density=density,
                        majority_sign_method=majority_sign, svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed,
                        aliases=list(aliases), on_state=on_state)
    if as_json:
        emit_json(out)
        return
    v = out["pushed"]
    alias_text = f" (aliases: {', '.join(v['aliases'])})" if v["aliases"] else ""
    click.echo(f"combined {' + '.join(refs)} with {out['method']} into {v['name']}:{v['version']}  {v['digest']}"
               f"{alias_text}")
