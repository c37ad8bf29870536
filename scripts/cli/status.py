"""`fleet status`: instances, workers, queue depth and jobs in flight of a fleet."""

from __future__ import annotations

import json
import os
from typing import Any

import click


@click.command()
@click.option(
    "--stack",
    metavar="NAME",
    help="A deployed stack: its instances (by the celery-fleet:stack tag) and "
    "its broker and result store (SSM Parameter Store).",
)
@click.option("--region", help="AWS region of the stack (default: your AWS configuration).")
@click.option(
    "--broker", metavar="URL", help="Broker URL (default: FLEET_BROKER_URL or the local fleet)."
)
@click.option("--backend", metavar="URL", help="Result store URL.")
@click.option("--queue", help="The fleet's queue (default: FLEET_QUEUE or 'fleet').")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(stack, region, broker, backend, queue, as_json):
    """Instances, workers online, queue depth and jobs in flight of a stack or the local fleet."""
    from app.launcher.discovery import read_local_state, resolve_settings
    from scripts.status import collect, local_instances, render, stack_instances

    if stack:
        import boto3

        from app.stack import settings_from_stack

        session = boto3.session.Session(region_name=region)
        settings = settings_from_stack(stack, session, queue=queue)
        instances: list[dict[str, Any]] | None = stack_instances(stack, session)
        source = f"stack {stack} ({session.region_name})"
    else:
        settings = resolve_settings(broker, backend, queue=queue)
        state = read_local_state()
        local = state is not None and not (broker or os.environ.get("FLEET_BROKER_URL"))
        instances = local_instances(state) if local and state is not None else None
        source = "the local fleet" if local else "the given broker and result store"
    report = collect(settings, instances, source)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report["errors"]:
        raise SystemExit(3)
