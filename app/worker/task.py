"""The batch task every worker runs: `fleet.batch`.

The task is thin: resolve the named function (refusing anything not
allowed), skip a batch that is already committed, hold a lease while the
batch runs so the launcher can tell a live batch from a lost one, run the
batch, commit its lines once.
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
    store.commit(
        job, Done(batch, outcome.items, outcome.errors, outcome.seconds, me), outcome.lines
    )
    return outcome.items
