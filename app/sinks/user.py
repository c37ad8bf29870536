"""`--sink module:function`: the user's own writer, called on the workers.

    def write(records, key):        # records: [Record(id, result, error), ...]
        ...                         # key: "JOB/BATCH", the same however often the batch runs

It must be idempotent per batch key: a batch can run twice, and is then
written twice with the same key and records (a Django
`bulk_create(..., ignore_conflicts=True)` on a unique (job, id), an upsert, a
file named by the key). It may name only a function of a module the workers
load as task modules, as a job's task may: the name is read from the job, and
whoever can write to the result store must not make workers call `os:system`.
An exception is tried again a few times, then stops the job with its message.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from app.sinks.base import BadSink, Record, SinkError, SinkRefused, records, retrying


def resolve_writer(name: str, modules: Sequence[str]) -> Callable[[list[Record], str], Any]:
    """The function `module:function` of one of `modules`; BadSink for any other name."""
    module_name, sep, attr = name.partition(":")
    if not sep or not attr or "." in attr:
        raise BadSink(f"--sink {name!r}: give module:function, e.g. myproj.sinks:save.")
    if module_name not in modules:
        raise BadSink(
            f"--sink {name}: {module_name} is not one of the workers' task modules "
            f"({', '.join(modules)}); declare it by entry point in celery_fleet.tasks or "
            "with FLEET_INCLUDE."
        )
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not inspect.isfunction(fn) or fn.__module__ != module_name:
        raise BadSink(f"--sink {name}: {module_name} defines no function {attr}.")
    writer: Callable[[list[Record], str], Any] = fn
    return writer


class _Failed(SinkError):
    """The writer raised: tried again."""


class UserSink:
    def __init__(self, name: str, modules: Sequence[str]) -> None:
        self.name = name
        self.label = f"--sink {name}"
        self._modules = modules
        self._writer: Callable[[list[Record], str], Any] | None = None  # resolved once

    def check(self) -> None:
        """Only the form here: the function lives where the workers run."""
        module, sep, attr = self.name.partition(":")
        if not (module and sep and attr):
            raise BadSink(f"--sink {self.name!r}: give module:function, e.g. myproj.sinks:save.")

    def write(self, job: str, batch: int, lines: bytes) -> None:
        if self._writer is None:
            self._writer = resolve_writer(self.name, self._modules)
        writer = self._writer
        batch_records = records(lines)
        key = f"{job}/{batch}"

        def call() -> None:
            try:
                writer(batch_records, key)
            except Exception as exc:
                raise _Failed(f"{type(exc).__name__}: {exc}") from exc

        try:
            retrying(call, (_Failed,), f"{self.label} on batch {key}")
        except SinkError as exc:
            raise SinkRefused(str(exc)) from None

    def finish(self, job: str, batches: int, items: int, errors: int) -> None:
        """Nothing: the writer has written everything."""
