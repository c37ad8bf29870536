"""`fleet package`: the wheelhouse the workers install, to look inside or to deploy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from scripts.cli.common import fail


@click.command()
@click.argument("projects", nargs=-1, metavar="[PROJECT ...]", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory to write the wheelhouse into (new, empty, or an earlier wheelhouse).",
)
@click.option(
    "--arch",
    type=click.Choice(["x86_64", "arm64"]),
    default="x86_64",
    show_default=True,
    help="The workers' architecture (Graviton instances: arm64).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def package(projects, out, arch, as_json):
    """Build the wheelhouse of each PROJECT directory and this kit for the workers.

    A PROJECT is a directory with a pyproject.toml (its task modules declared
    with an entry point in the group celery_fleet.tasks; a uv.lock beside it
    pins the versions), or plain modules with a requirements.txt. The
    wheelhouse holds this kit's wheel, each project's wheel and every
    dependency wheel for the workers' platform (CPython 3.11, manylinux), and
    is exactly what `pulumi up` uploads with `celery-fleet:code` set to the
    same directories. Its version, printed, is the content hash of the code.
    Deploy it with `fleet ops deploy DIR`.
    """
    from app.wheelhouse import PackageError, build, summary

    say = lambda message: click.echo(f"{message}...", err=True)  # noqa: E731
    try:
        house = build(projects, arch, say=say).write(out)
    except PackageError as exc:
        fail(str(exc), 2)
    if as_json:
        click.echo(json.dumps({"directory": str(house.directory), **house.manifest}, indent=2))
    else:
        click.echo("\n".join(summary(house)))
