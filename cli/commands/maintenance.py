from __future__ import annotations

import sys

import click

from loreg.cli.commands._common import json_option, parse_duration
from loreg.cli.output import emit_json, human_size


@click.command()
@click.option("--grace", "grace_s", default=None, metavar="DURATION",
              callback=lambda _ctx, _param, value: None if value is None else parse_duration(value, "--grace"),
              help="Keep blobs seen within this long: 90s, 30m, 24h, 2d (a unit is required: a bare number "
                   "once meant hours). Default: LOREG_GC_GRACE_SECONDS (a day).")
@click.option("--dry-run", is_flag=True, help="Report what would go; delete nothing.")
@json_option
def gc(grace_s: int | None, dry_run: bool, as_json: bool) -> None:
    """Delete unreferenced blobs older than the grace period (server host; safe while pushes run)."""
    from datetime import timedelta

    from loreg.cli.serving_process import share_metrics
    from loreg.registry.admin import open_for_admin
    from loreg.registry.services.maintenance import MaintenanceService

    share_metrics(1)  # with LOREG_METRICS_DIR, the result shows in the server's /metrics
    registry = open_for_admin()
    try:
        report = MaintenanceService(registry).gc(grace=None if grace_s is None else timedelta(seconds=grace_s), dry_run=dry_run)
    finally:
        registry.close()
    if as_json:
        emit_json(report.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(report.deleted) + len(report.stray_deleted)} blobs ({human_size(report.bytes_freed)}); "
               f"kept {report.kept_recent} recent unreferenced; {report.staging_removed} staging files, "
               f"{report.multipart_aborted} multipart uploads cleaned")


@click.command()
@json_option
def fsck(as_json: bool) -> None:
    """Re-hash every stored blob and report corruption (server host). Exits 1 if any is bad."""
    from loreg.cli.serving_process import share_metrics
    from loreg.registry.admin import open_for_admin
    from loreg.registry.services.maintenance import MaintenanceService

    share_metrics(1)  # with LOREG_METRICS_DIR, the result shows in the server's /metrics
    registry = open_for_admin()
    try:
        report = MaintenanceService(registry).fsck()
    finally:
        registry.close()
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"checked {report.checked} blobs ({human_size(report.bytes_checked)})")
        for c in report.corrupt:
            click.secho(f"CORRUPT {c['digest']} (hashes to {c['actual']}, {c['actual_size']} of {c['size']} bytes)", fg="red")
        for m in report.missing:
            click.secho(f"MISSING {m}", fg="red")
    if not report.ok:
        sys.exit(1)
