"""The batch task every worker runs: `fleet.batch`.

The task is thin: resolve the named function (refusing anything not
allowed), skip a batch that is already committed, hold a lease while the
batch runs so the launcher can tell a live batch from a lost one, run the
batch, write its records to the job's sink if it has one (app/sinks), and
commit it once: with its lines, or, written to a sink, without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from celery import Task, shared_task

from app.batch import BadPayload, check_address, check_payload, run_batch
from app.registry import UnknownTask, resolve
from app.settings import Settings
from app.sinks import BadSink, Sink, open_sink
from app.store import Done, Store, open_store

# The worker's heartbeat and watchdog start with the worker, through Celery's signals.
from app.worker import heartbeat  # noqa: F401

log = logging.getLogger(__name__)

_stores: dict[int, Store] = {}


def store_for(settings: Settings) -> Store:
    # One connection pool per process: pool processes are forked, and a
    # socket shared across a fork is corrupted by both sides.
    pid = os.getpid()
    if pid not in _stores:
        _stores.clear()
        _stores[pid] = open_store(settings)
    return _stores[pid]


# Each job's sink, by job: its spec is read from the job once per process (None: the
# launcher writes the results). The few most recent jobs are kept.
_sinks: dict[str, Sink | None] = {}
SINKS_KEPT = 16


def sink_for(settings: Settings, store: Store, job: str, modules: tuple[str, ...]) -> Sink | None:
    if job in _sinks:
        return _sinks[job]
    meta = store.get_meta(job)
    if meta is None:
        return None  # a job of a launcher that writes no metadata: nothing to remember
    spec = meta.get("sink")
    if len(_sinks) >= SINKS_KEPT:
        _sinks.pop(next(iter(_sinks)))
    _sinks[job] = sink = open_sink(spec, settings, store, modules) if spec else None
    return sink


@contextlib.contextmanager
def lease(store: Store, job: str, batch: int, seconds: float) -> Iterator[None]:
    """Renew the batch's lease every seconds/3 while the body runs."""
    stop = threading.Event()

    def renew() -> None:
        while True:
            try:
                store.renew_lease(job, batch, seconds)
            except Exception:
                log.warning("could not renew the lease of %s/%s", job, batch, exc_info=True)
            if stop.wait(seconds / 3):
                return

    thread = threading.Thread(target=renew, name=f"lease-{batch}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
    if store.is_committed(job, batch) or store.is_cancelled(job):
        return 0  # a redelivery of a finished batch, or a cancelled job
    try:
        check_payload(payload, settings.message_limit)
        # The modules the app was built with (make_app): worked out once, not per batch.
        task = resolve(task_name, self.app.fleet_task_modules)
    except (BadPayload, UnknownTask) as exc:
        # Announced: the job's launcher stops with this reason instead of re-sending.
        store.announce(job, Done(batch, 0, 0, 0.0, me, refused=str(exc)))
        log.error("refused batch %s/%s: %s", job, batch, exc)
        return 0
    with lease(store, job, batch, settings.lease_seconds):
        outcome = run_batch(task, payload)
        lines = outcome.lines
        try:
            sink = sink_for(settings, store, job, self.app.fleet_task_modules)
            if sink is not None:
                # Idempotent per (job, batch): a batch run twice is written once. A failure
                # that retries did not mend raises: the batch is not committed, and is sent
                # again once its lease lapses.
                sink.write(job, batch, lines)
                lines = b""  # the sink holds them
        except BadSink as exc:
            store.announce(job, Done(batch, 0, 0, 0.0, me, refused=f"the sink: {exc}"))
            log.error("batch %s/%s: the sink refused it: %s", job, batch, exc)
            return 0
    store.commit(job, Done(batch, outcome.items, outcome.errors, outcome.seconds, me), lines)
    return outcome.items
