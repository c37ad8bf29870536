"""The batch task every worker runs: `fleet.batch`.

The task is thin: resolve the named function (refusing anything not
allowed), skip a batch that is already committed, hold a lease while the
batch runs so the launcher can tell a live batch from a lost one, run the
batch, write its records to the job's sink if it has one (app/sinks), and
commit it once: with its lines, or, written to a sink, without them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgspec
from celery import Task, shared_task

from app.batch import BadPayload, check_address, check_payload, run_batch
from app.registry import FleetTask, UnknownTask, resolve
from app.settings import Settings
from app.sinks import BadSink, Sink, SinkError, SinkRefused, open_sink
from app.store import Done, Store, open_store

# The worker's heartbeat and watchdog start with the worker, through Celery's signals.
from app.worker import heartbeat  # noqa: F401

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder().decode

_stores: dict[int, Store] = {}


def store_for(settings: Settings) -> Store:
    # One connection pool per process: pool processes are forked, and a
    # socket shared across a fork is corrupted by both sides.
    pid = os.getpid()
    if pid not in _stores:
        _stores.clear()
        _stores[pid] = open_store(settings)
    return _stores[pid]


# What each job asks of its batches beyond running them, read from the job once per
# process: its sink (None: the launcher writes the results), its reducer (None: none), and
# whether its lines are bare results (a Python caller that keeps its items: app.fleet).
# The few most recent jobs are kept.
_jobs: dict[str, tuple[Sink | None, FleetTask | None, bool]] = {}
JOBS_KEPT = 16


def job_extras(
    settings: Settings, store: Store, job: str, modules: tuple[str, ...]
) -> tuple[Sink | None, FleetTask | None, bool]:
    if job in _jobs:
        return _jobs[job]
    meta = store.get_meta(job)
    if meta is None:
        # A job of a launcher that writes no metadata, or not yet (its first batches, when
        # it asks nothing more of them): nothing to remember.
        return None, None, False
    spec, reducer = meta.get("sink"), meta.get("reduce")
    if len(_jobs) >= JOBS_KEPT:
        _jobs.pop(next(iter(_jobs)))
    # A reducer is resolved as a task is: only a function of the workers' task modules.
    _jobs[job] = extras = (
        open_sink(spec, settings, store, modules) if spec else None,
        resolve(reducer, modules) if reducer else None,
        meta.get("records") == "values",
    )
    return extras


def fold(reducer: FleetTask, lines: bytes) -> Any:
    """The batch's results folded left to right by the job's reducer (None: no result)."""
    results = [r["result"] for r in map(_decode, lines.splitlines()) if "result" in r]
    combine = cast(Callable[[Any, Any], Any], reducer.fn)  # f(a, b), resolved as a task is
    return functools.reduce(combine, results) if results else None


class Leases:
    """The leases of the batches a worker process runs, renewed together.

    One thread per process renews every running batch's lease in one store call each
    `seconds / 3`: a process of 500 thread-pool slots makes one call per tick, not 500,
    and no batch starts or joins a thread of its own. The first lease of a batch is
    taken by `Store.begin`, in the round trip that checks the batch should run.
    """

    def __init__(self) -> None:
        self.running: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()
        self.pid = 0  # the process whose thread renews: a forked pool process starts its own

    @contextlib.contextmanager
    def held(self, store: Store, job: str, batch: int, seconds: float) -> Iterator[None]:
        key = (job, batch)
        with self.lock:
            if self.pid != os.getpid():
                self.pid = os.getpid()
                self.running.clear()
                threading.Thread(
                    target=self._renew, args=(store, seconds), name="fleet-leases", daemon=True
                ).start()
            self.running[key] = self.running.get(key, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                if self.running[key] <= 1:
                    del self.running[key]
                else:
                    self.running[key] -= 1

    def _renew(self, store: Store, seconds: float) -> None:
        pid = os.getpid()
        while self.pid == pid:
            time.sleep(seconds / 3)
            with self.lock:
                leases = list(self.running)
            try:
                store.renew_leases(leases, seconds)
            except Exception:
                log.warning("could not renew the leases of %d batches", len(leases), exc_info=True)


_leases = Leases()


@shared_task(  # type: ignore[untyped-decorator]  # celery has no types
    name="fleet.batch", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def fleet_batch(self: Task, job: str, batch: int, task_name: str, payload: Any) -> int:
    settings: Settings = self.app.fleet_settings
    store = store_for(settings)
    me = self.request.hostname or ""
    # Anyone who can publish to the broker can send any arguments: a message
    # the launcher would not build is refused (and acknowledged), never run.
    try:
        check_address(job, batch, task_name)
    except BadPayload as exc:
        log.error("refused a batch message: %s", exc)
        return 0
    try:
        check_payload(payload, settings.message_limit)
        # The modules the app was built with (make_app): worked out once, not per batch.
        task = resolve(task_name, self.app.fleet_task_modules)
    except (BadPayload, UnknownTask) as exc:
        if store.is_committed(job, batch):
            return 0  # a redelivery of a batch some other worker could run
        # Announced: the job's launcher stops with this reason instead of re-sending.
        store.announce(job, Done(batch, 0, 0, 0.0, me, refused=str(exc)))
        log.error("refused batch %s/%s: %s", job, batch, exc)
        return 0
    if not store.begin(job, batch, settings.lease_seconds):
        return 0  # a redelivery of a finished batch, or a cancelled job
    with _leases.held(store, job, batch, settings.lease_seconds):
        try:
            sink, reducer, bare = job_extras(settings, store, job, self.app.fleet_task_modules)
        except (BadSink, UnknownTask) as exc:
            why = f"the sink: {exc}" if isinstance(exc, BadSink) else f"--reduce: {exc}"
            store.announce(job, Done(batch, 0, 0, 0.0, me, refused=why))
            log.error("batch %s/%s refused: %s", job, batch, why)
            return 0
        outcome = run_batch(task, payload, bare=bare)
        lines = outcome.lines
        try:
            partial = None if reducer is None else fold(reducer, lines)
        except Exception as exc:  # the reducer raised: the job cannot give its value
            why = f"--reduce: the reducer raised {type(exc).__name__}: {exc}"
            store.announce(job, Done(batch, 0, 0, 0.0, me, refused=why))
            log.error("batch %s/%s: %s", job, batch, why)
            return 0
        try:
            if sink is not None:
                # Idempotent per (job, batch): a batch run twice is written once. A failure
                # that retries did not mend raises: the batch is not committed, and is sent
                # again once its lease lapses.
                sink.write(job, batch, lines)
                lines = b""  # the sink holds them
        except SinkError as exc:
            # Refused for now (SinkRefused, or retries that did not mend it): the job pauses
            # and sends the batch again later. A sink the job cannot use stops it.
            later = isinstance(exc, SinkRefused) or not isinstance(exc, BadSink)
            store.announce(job, Done(batch, 0, 0, 0.0, me, refused=f"the sink: {exc}", later=later))
            log.error("batch %s/%s: the sink refused it: %s", job, batch, exc)
            return 0
    done = Done(batch, outcome.items, outcome.errors, outcome.seconds, me, partial=partial)
    store.commit(job, done, lines)
    return outcome.items
