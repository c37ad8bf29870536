"""Where a job's JSON lines go: the output file (or stdout) and the progress bar."""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from app.launcher.job import BadInput

# Per thread: a job run from Python (app.fleet) without progress keeps its status lines
# off stderr, in the log of "app.fleet" instead.
_quiet = threading.local()


def say(message: str) -> None:
    """A status line for the operator, on stderr."""
    if getattr(_quiet, "on", False):
        logging.getLogger("app.fleet").info(message)
        return
    print(message, file=sys.stderr, flush=True)


def quiet(on: bool = True) -> None:
    """Status lines of this thread's jobs go to the log, not stderr (`say`)."""
    _quiet.on = on


def check_writable(path: Path | None) -> None:
    """BadInput unless `path` can be written; an existing file is left as it is."""
    if path is None:
        return
    existed = path.exists()
    try:
        open(path, "ab").close()
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror}.") from None
    if not existed:
        path.unlink()


def no_output() -> IO[bytes]:
    """The output of a job whose workers write its results to a sink: nothing comes here."""
    return open(os.devnull, "wb")


def open_output(out: Path | None, offset: int | None) -> tuple[IO[bytes], str | None]:
    """The output and its path (None: stdout); with `offset`, resumed at that journaled size."""
    if out is None:
        return sys.stdout.buffer, None
    try:
        if offset is None:
            return open(out, "wb"), str(out)
        handle = open(out, "r+b" if out.exists() else "wb")  # noqa: SIM115
    except OSError as exc:
        raise BadInput(f"cannot write {out}: {exc.strerror}.") from None
    # Lines past the journaled offset belong to batches not known as
    # written; they are written again, so drop them.
    handle.truncate(offset)
    handle.seek(offset)
    return handle, str(out)


@dataclass
class Progress:
    """Items and errors written so far, shown on a tqdm bar when there is one."""

    items: int = 0
    errors: int = 0
    bar: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, items: int, errors: int) -> None:
        self.items += items
        self.errors += errors
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix(errors=self.errors, **self.extra, refresh=False)

    def show(self, total: int | None, job: str) -> None:
        from tqdm import tqdm  # imported only when shown: it costs start-up time

        self.bar = tqdm(
            total=total,
            initial=self.items,
            unit=" ids",
            unit_scale=True,
            file=sys.stderr,
            mininterval=0.5,
            smoothing=0.05,
            dynamic_ncols=True,
            desc=job,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
