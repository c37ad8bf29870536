"""What every `fleet` command shares: how it fails, how it ends, when its imports are done."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from app.settings import Settings


def fail(message: str, code: int) -> NoReturn:
    """Say what went wrong on stderr, as `fleet: ...`, and exit with `code`."""
    click.echo(f"fleet: {message}", err=True)
    sys.exit(code)


# Set by main(), the console script: the process is ours to end.
CONSOLE = [False]


def finish(code: int) -> NoReturn:
    """End a finished command; as the console script, without the interpreter's teardown.

    Tearing down celery, kombu, redis-py and their modules takes about 0.1 s,
    a tenth of a million-ID no-op job. Everything the command wrote is closed
    by now, so flush the standard streams and the logs and leave. Called from
    Python (tests, CliRunner), it is a plain sys.exit.
    """
    if not CONSOLE[0]:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def imports_done() -> None:
    """Turn the garbage collector back on, with what the imports made frozen.

    main() turns it off: the imports of celery, kombu and redis-py make
    objects by the hundred thousand and no garbage, and the collections they
    set off cost `fleet run` about 40 ms. Frozen, those objects are never
    scanned again (gc.freeze).
    """
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def fleet_options(command: Any) -> Any:
    """--broker, --backend, --stack and --queue: which fleet a command talks to."""
    for option in reversed(
        [
            click.option(
                "--broker",
                metavar="URL",
                help="Broker URL (default: FLEET_BROKER_URL or the local fleet).",
            ),
            click.option(
                "--backend",
                metavar="URL",
                help="Result store URL (default: FLEET_RESULT_URL or the local fleet).",
            ),
            click.option(
                "--stack",
                metavar="NAME",
                help="A deployed stack: its broker and result store from SSM Parameter Store.",
            ),
            click.option("--queue", help="The fleet's queue (default: FLEET_QUEUE or 'fleet')."),
        ]
    ):
        command = option(command)
    return command


def fleet_settings(
    broker: str | None, backend: str | None, stack: str | None, queue: str | None
) -> Settings:
    """The fleet's settings, as `fleet run` finds them."""
    from app.launcher.discovery import resolve_settings

    if stack and (broker or backend):
        fail("give either --stack or --broker/--backend, not both.", 2)
    return resolve_settings(broker, backend, stack, queue=queue)


def open_fleet_store(settings: Settings) -> Any:
    """The fleet's result store, reached (exit 3 with one line if it cannot be)."""
    from app.store import StoreUnavailable, open_store

    store = open_store(settings)
    try:
        store.ping()
    except StoreUnavailable as exc:
        fail(str(exc), 3)
    return store


@contextlib.contextmanager
def store_errors(settings: Settings, store: Any) -> Iterator[None]:
    """A result store lost mid-command, or a job error: one line and its exit code."""
    from app.launcher.job import JobError
    from app.settings import redact
    from app.store import StoreUnavailable

    try:
        yield
    except JobError as exc:
        fail(str(exc), exc.exit_code)
    except (StoreUnavailable, *store.connection_errors) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        fail(f"lost the result store at {redact(settings.result_url)}: {why}", 3)
