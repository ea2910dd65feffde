"""The `loreg` command. Heavy imports (httpx, the server, torch) happen inside commands only."""

from __future__ import annotations

import sys

import click

from loreg.registry.errors import LoregError

COMMANDS = {
    "push": ("loreg.cli.commands.push", "push"),
    "pull": ("loreg.cli.commands.pull", "pull"),
    "ls": ("loreg.cli.commands.ls", "ls"),
    "show": ("loreg.cli.commands.show", "show"),
    "alias": ("loreg.cli.commands.alias", "alias"),
    "metrics": ("loreg.cli.commands.metrics", "metrics"),
    "rm": ("loreg.cli.commands.rm", "rm"),
    "serve": ("loreg.cli.commands.serve", "serve"),
    "db": ("loreg.cli.commands.db", "db"),
    "token": ("loreg.cli.commands.token", "token"),
    "login": ("loreg.cli.commands.token", "login"),
    "base": ("loreg.cli.commands.base", "base"),
    "check": ("loreg.cli.commands.check", "check"),
    "inspect": ("loreg.cli.commands.inspect", "inspect"),
    "diff": ("loreg.cli.commands.diff", "diff"),
    "export": ("loreg.cli.commands.export", "export"),
    "combine": ("loreg.cli.commands.combine", "combine"),
    "worker": ("loreg.cli.commands.worker", "worker"),
    "gc": ("loreg.cli.commands.maintenance", "gc"),
    "fsck": ("loreg.cli.commands.maintenance", "fsck"),
    "sync": ("loreg.cli.commands.sync", "sync"),
}
SUMMARIES = {
    "push": "Push a PEFT adapter folder as a new immutable version.",
    "pull": "Download a version into a folder that PEFT loads as is.",
    "ls": "List adapters, or find them by base model, rank, target, metric.",
    "show": "Show a version: files, config facts, metrics, aliases.",
    "alias": "Point, show or remove aliases (prod, staging).",
    "metrics": "Append evaluation metrics to a version.",
    "rm": "Delete a version, or an adapter with --all (numbers are never reused).",
    "serve": "Run the registry server.",
    "db": "Database migrations (server host).",
    "token": "Create, list and revoke API tokens.",
    "login": "Store a token for a server in the credentials file.",
    "base": "Register, list and show base models (known by content).",
    "check": "Validate an adapter against its base model locally (dry run).",
    "inspect": "Show what an adapter changes, per module (norms, effective rank).",
    "diff": "Compare two versions per module: change, cosine, subspace similarity.",
    "export": "Merge adapters into their base on the server and download the model.",
    "combine": "Combine adapters (cat, svd, ties, dare, …) into a new version on the server.",
    "worker": "Run a standalone job worker: exports and combinations (Postgres; one per GPU).",
    "gc": "Delete unreferenced blobs past the grace period (server host).",
    "fsck": "Re-hash stored blobs and report corruption (server host).",
    "sync": "Keep a folder per reference for a serving engine (vLLM), swapped atomically.",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs: `loreg --help` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        import importlib

        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # summaries from the table, so that `loreg --help` imports no command module
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUMMARIES[name]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loreg", prog_name="loreg")
def cli() -> None:
    """loreg: a registry for LoRA adapters.

    The CLI talks to the server at LOREG_URL (default http://127.0.0.1:8080) with LOREG_TOKEN, or
    the token kept for that URL in LOREG_HOME/credentials.json (`loreg serve` on the embedded
    default writes one for itself).
    """


def fail(err: LoregError, as_json: bool) -> None:
    if as_json:
        import json

        click.echo(json.dumps(err.envelope(), indent=2, sort_keys=True, default=str))
    else:
        click.secho(f"error: {err.message} [{err.code}]", fg="red", err=True)
        problems = err.detail.get("problems")
        if isinstance(problems, list):
            shown = [p for p in problems if isinstance(p, dict)][:50]
            for p in shown:
                click.echo(f"  - {_problem_line(p)}", err=True)
            total = err.detail.get("problem_count")
            more = (total if isinstance(total, int) else len(problems)) - len(shown)
            if more > 0:
                click.echo(f"  … and {more} more", err=True)
        if err.hint:
            click.secho(f"hint: {err.hint}", fg="cyan", err=True)
        if err.request_id:
            click.echo(f"request id: {err.request_id} (quote it to the server's operator)", err=True)
    sys.exit(1)


def _problem_line(p: dict[str, object]) -> str:
    """One problem on one line, each fact once (messages that already name the key or shapes keep them)."""
    where = str(p.get("key") or p.get("loc") or "")
    text = str(p.get("message") or "")
    if not text:
        text = f"expected {p.get('expected')}, found {p.get('actual')}"
    if not where or where in text:
        return text
    return f"{where}: {text}"


def main() -> None:
    as_json = "--json" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except LoregError as err:
        fail(err, as_json)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
