"""`fleet cost`: what a stack costs idle, and per worker instance-hour."""

from __future__ import annotations

import json
from pathlib import Path

import click

from scripts.cost import StackSettings, estimate, load_prices, render, stack_file


@click.command("cost")
@click.option(
    "--stack",
    "stack",
    metavar="NAME",
    help="Read Pulumi.NAME.yaml of the Pulumi project here (or in a parent directory).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read this Pulumi stack file instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def cost(stack: str | None, config_file: Path | None, as_json: bool) -> None:
    """Hourly cost of the stack while idle, and of each worker instance-hour."""
    if config_file is None:
        if stack is None:
            raise click.UsageError("name a stack with --stack NAME or a file with --config FILE.")
        config_file = stack_file(stack)
    report = estimate(StackSettings.from_stack_file(config_file), load_prices())
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else render(report))
