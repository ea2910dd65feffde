from __future__ import annotations

from typing import Any

import click

from loreg.cli.commands._common import client, json_option, url_option
from loreg.cli.output import emit_json


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(out: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    one, two = out["first"], out["second"]
    table = Table(
        title=f"{one['name']}:{one['version']} -> {two['name']}:{two['version']} (same base {out['base_match']})",
        title_justify="left",
    )
    for col, justify in (("module", "left"), ("ranks", "right"), ("rel change", "right"), ("cosine", "right"),
                         ("φ_in", "right"), ("φ_out", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in out["modules"]:
        table.add_row(
            Text(m["module"] + (" (DoRA)" if m["dora"] else "")),  # a module name is never rich markup
            f"{m['rank_a']}/{m['rank_b']}",
            _num(m["relative_change"], ".4g"),
            _num(m["cosine"]),
            _num(m["similarity_in"]),
            _num(m["similarity_out"]),
        )
    return table


@click.command()
@click.argument("first")
@click.argument("second")
@json_option
@url_option
def diff(first: str, second: str, as_json: bool, url: str | None) -> None:
    """Compare two versions on one base model, per module: how much ΔW moved and where it points.

    rel change = ||ΔW2 − ΔW1|| / ||ΔW1||; cosine of the two ΔW; φ_in / φ_out = normalized subspace
    similarity (Hu et al. 2021, §7.2) of their top min(r1, r2) input / output singular directions:
    1 = the same subspace, 0 = orthogonal. Modules adapted in one version only are listed apart.
    """
    with client(url) as c:
        out = c.diff(first, second)
    if as_json:
        emit_json(out)
        return
    import sys

    from rich.console import Console

    # piped output gets whole module names on one line each (rich would wrap them at 80 columns)
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(_table(out))
    for label, key in (("added (only in the second)", "added"), ("removed (only in the first)", "removed"),
                       ("skipped (factors too large to read)", "skipped")):
        if out[key]:
            console.print(f"{label}: {', '.join(out[key])}", markup=False, highlight=False)
    if out["dora"]:
        console.print("DoRA: the LoRA deltas are compared; magnitude vectors are not.", highlight=False)
