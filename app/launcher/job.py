"""What a job is to its caller: its options, its summary, and the errors that stop it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.launcher.sources import Source


class JobError(Exception):
    """A job that cannot start or cannot finish; `exit_code` is what `fleet run` returns."""

    exit_code = 1


class BadInput(JobError):
    exit_code = 2


class Unreachable(JobError):
    exit_code = 3


class VersionMismatch(JobError):
    """The workers online run other code than each other, or than was deployed."""

    exit_code = 4


@dataclass
class JobOptions:
    task: str | None = None  # None only with resume: taken from the job
    source: Source | None = None
    batch_size: int | None = None  # None: calibrate
    target_seconds: float = 2.0  # aimed-at duration of one batch
    max_in_flight: int | None = None  # None: twice the worker slots
    out: Path | None = None  # None: stdout (or the sink)
    # Where the workers write the results instead (app/sinks: sink_spec); None: `out`.
    sink: dict[str, Any] | None = None
    resume: str | None = None
    progress: bool = True
    # module:function, an associative f(a, b): each batch's results are folded on its worker,
    # the partials by the driver, in batch order (`--reduce`).
    reduce: str | None = None
    # Refuse to start while the workers online run more than one version of the code, or
    # another than was deployed (app/launcher/versions.py); otherwise that is a warning.
    require_version: bool = False
    # Bare lines: each ID's result alone (app/batch.py _encode_bare), for a caller that
    # keeps its IDs in order and matches them up (app.fleet); no output file or sink.
    bare: bool = False


@dataclass
class JobSummary:
    job: str
    status: str  # "ok", "errors" (some items failed) or "interrupted"
    items: int
    errors: int
    batches: int
    resent: int
    wall_seconds: float
    out: str
    seconds_per_item: float | None = None
    # Seconds the workers spent running this run's batches (as they reported them), over
    # every slot: divided by slots x wall seconds, how busy the job kept the fleet.
    batch_seconds: float = 0.0
    reduced: Any = None  # with --reduce: the folded value of every result

    @property
    def items_per_second(self) -> float:
        return self.items / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "items_per_second": round(self.items_per_second, 1)}


def new_job_id() -> str:
    return f"j{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def reducer_name(name: str) -> tuple[str, str]:
    """(module, function) of a reducer's name; BadInput unless it reads module:function."""
    module, sep, attr = name.partition(":")
    if not (module and sep and attr) or "." in attr:
        raise BadInput(f"--reduce {name!r}: give module:function, e.g. myproj.stats:merge.")
    return module, attr


def reducer(name: str) -> Any:
    """The function `module:function` names, imported here; BadInput if it cannot be."""
    import importlib

    module, attr = reducer_name(name)
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError as exc:
        raise BadInput(
            f"--reduce {name}: cannot import {module} here ({exc}); `fleet run` folds the "
            "batches' partials itself, so the reducer must be importable here (and be in one "
            "of the workers' task modules). `fleet submit` folds them in the fleet."
        ) from None
    if not callable(fn):
        raise BadInput(f"--reduce {name}: {module} defines no function {attr}.")
    return fn
