"""`fleet`: the command line. One sub-command per verb, one module each in this package.

Status and progress go to stderr, results to stdout. Exit codes: 0 every
item succeeded; 1 some items failed; 2 bad input, usage or unknown task; 3
broker or result store unreachable; 4 the workers run other code than was
deployed (`fleet run --require-version`); 5 the job was cancelled (`fleet wait`); 130
interrupted.
"""

from __future__ import annotations

import importlib
import sys
from typing import ClassVar

import click

from app.settings import ConfigError
from scripts.cli.common import CONSOLE, imports_done


class LazyGroup(click.Group):
    """A group whose sub-commands are imported only when called.

    `fleet run` is timed as a whole process: the other commands' imports
    (Fabric, boto3, price tables, matplotlib) are not its to pay.
    """

    COMMANDS: ClassVar[dict[str, str]] = {
        "cancel": "scripts.cli.cancel:cancel",
        "cost": "scripts.cli.cost:cost",
        "demo": "scripts.cli.demo:demo",
        "jobs": "scripts.cli.jobs:jobs",
        "local": "scripts.cli.local:local",
        "ops": "scripts.cli.ops:ops",
        "package": "scripts.cli.package:package",
        "results": "scripts.cli.results:results",
        "retry": "scripts.cli.retry:retry",
        "run": "scripts.cli.run:run",
        "simulate": "scripts.cli.simulate:simulate",
        "status": "scripts.cli.status:status",
        "submit": "scripts.cli.submit:submit",
        "wait": "scripts.cli.wait:wait",
        "watch": "scripts.cli.wait:watch",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module), name)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-fleet")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Spread a Python function over every core of a Celery fleet."""
    if ctx.invoked_subcommand != "run":  # `run` says when its imports are done
        imports_done()


def main() -> None:
    import gc

    gc.disable()  # until the command's imports are done (imports_done)
    CONSOLE[0] = True
    try:
        cli()
    except ConfigError as exc:
        click.echo(str(exc.code), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
