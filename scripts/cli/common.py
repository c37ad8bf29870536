"""What every `fleet` command shares: how it fails, how it ends, when its imports are done."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import click


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
