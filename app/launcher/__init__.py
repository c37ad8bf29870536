"""On the operator's machine: the job launcher and what it needs.

    from app.launcher import JobOptions, Launcher, Source, resolve_settings
    summary = Launcher(resolve_settings()).run(
        JobOptions(task="process_id", source=Source.parse("ids.txt"), out=Path("out.jsonl")))

    launcher.py   connections, calibration, publishing, and `run`
    dispatch.py   the dispatch loop: send, collect, write, re-send what was lost
    plan.py       how a job is cut into batches (pure; the simulator uses it too)
    sources.py    where IDs come from: files, stdin, S3, ranges
    output.py     the output file, its journal offset, the progress bar
    metrics.py    what a --stack job tells CloudWatch
    discovery.py  which fleet to talk to: a stack, flags, FLEET_* or the local fleet
    job.py        the public types: options, summary, errors
    versions.py   which code the workers online run, against what was deployed

Nothing here is imported by the workers or the host daemons
(tests/unit/test_imports.py). The names above are imported on first use, so
`import app.launcher.plan` costs no Celery import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.launcher.discovery import resolve_settings
    from app.launcher.job import (
        BadInput,
        JobError,
        JobOptions,
        JobSummary,
        Unreachable,
        VersionMismatch,
    )
    from app.launcher.launcher import Launcher
    from app.launcher.sources import InputError, Source

_EXPORTS = {
    "Launcher": "app.launcher.launcher",
    "JobOptions": "app.launcher.job",
    "JobSummary": "app.launcher.job",
    "JobError": "app.launcher.job",
    "BadInput": "app.launcher.job",
    "Unreachable": "app.launcher.job",
    "VersionMismatch": "app.launcher.job",
    "Source": "app.launcher.sources",
    "InputError": "app.launcher.sources",
    "resolve_settings": "app.launcher.discovery",
}

__all__ = [
    "BadInput",
    "InputError",
    "JobError",
    "JobOptions",
    "JobSummary",
    "Launcher",
    "Source",
    "Unreachable",
    "VersionMismatch",
    "resolve_settings",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app.launcher' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
