"""The worker side of a fleet job: the generic batch task and the worker's heartbeat.

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
from importlib import metadata

from celery import Task, shared_task, signals
from celery.worker import state as worker_state

from app.batch import BadPayload, check_address, check_payload, run_batch
from app.celery_config import BASE_MODULES
from app.registry import FleetTask, UnknownTask, resolve
from app.settings import Settings
from app.store import Done, Store, open_store, worker_name
from app.watchdog import Liveness, Progress, grace_seconds

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


def app_version() -> str:
    try:
        return metadata.version("celery-fleet")
    except metadata.PackageNotFoundError:
        return "dev"


@contextlib.contextmanager
def lease(store: Store, job: str, batch: int, seconds: float):
    """Renew the batch's lease every seconds/3 while the body runs."""
    stop = threading.Event()

    def renew() -> None:
        while True:
            try:
                store.renew_lease(job, batch, seconds)
            except Exception:  # noqa: BLE001 - a missed renewal only risks a duplicate run
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


@shared_task(name="fleet.batch", bind=True, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True)
def fleet_batch(self: Task, job: str, batch: int, task_name: str, payload) -> int:
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
        task = resolve(task_name, (*BASE_MODULES, *settings.include))
    except (BadPayload, UnknownTask) as exc:
        # Announced: the job's launcher stops with this reason instead of re-sending.
        store.announce(job, Done(batch, 0, 0, 0.0, me, refused=str(exc)))
        log.error("refused batch %s/%s: %s", job, batch, exc)
        return 0
    with lease(store, job, batch, settings.lease_seconds):
        outcome = run_batch(task, payload)
    store.commit(job, Done(batch, outcome.items, outcome.errors, outcome.seconds, me),
                 outcome.lines)
    return outcome.items


def held_batches() -> dict[str, int]:
    """Batches this worker holds: received and not finished (running ones included), and running.

    Advertised with each heartbeat: the drain agent and the local autoscaler
    take only an instance that holds none.
    """
    return {"reserved": len(worker_state.reserved_requests),
            "active": len(worker_state.active_requests)}


# Messages taken and event-loop turns of the main thread: the watchdog's proof it consumes.
_progress = Progress()


@signals.task_received.connect
@signals.task_revoked.connect
@signals.task_rejected.connect
@signals.task_unknown.connect
def _on_taken(**_: object) -> None:
    _progress.took()


class _Heartbeat:
    """Advertises this worker and its slots in the result store while it consumes.

    Beside it runs the liveness watchdog (app/watchdog.py): a worker that
    stops consuming while work waits for it exits, to be restarted. Both are
    threads, so they keep running when the main thread, the consumer, is
    blocked; the watchdog has its own so that a broker that does not answer
    its queue-depth reads never delays a heartbeat.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.name = worker_name()
        self.thread: threading.Thread | None = None

    def start(self, app, hostname: str, concurrency: int, controller: object = None) -> None:
        settings: Settings | None = getattr(app, "fleet_settings", None)
        if settings is None:
            return
        store = open_store(settings)
        grace = grace_seconds(settings)
        liveness = None if grace is None else Liveness(settings, concurrency, controller, grace)
        info = {"hostname": hostname, "concurrency": concurrency, "pid": os.getpid(),
                "version": app_version(), "queue": settings.queue}
        period = settings.lease_seconds / 3

        def beat() -> None:
            while not self.stop.is_set():
                try:
                    store.register_worker(self.name, {**info, **held_batches()},
                                          settings.lease_seconds)
                except Exception:  # noqa: BLE001 - retried on the next beat
                    log.warning("worker heartbeat failed", exc_info=True)
                self.stop.wait(period)
            with contextlib.suppress(Exception):
                store.unregister_worker(self.name)

        def watch(liveness: Liveness) -> None:
            while not self.stop.wait(period):
                stuck = liveness.check(_progress, held_batches()["reserved"])
                if stuck and not self.stop.is_set():
                    self.stop.set()  # the heartbeat unregisters the slots that are going
                    liveness.restart(stuck)  # ends the process

        self.thread = threading.Thread(target=beat, name="fleet-heartbeat", daemon=True)
        self.thread.start()
        if liveness is not None:
            threading.Thread(target=watch, args=(liveness,), name="fleet-watchdog",
                             daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


_heartbeat = _Heartbeat()


@signals.worker_process_init.connect
def _warm_up(**_: object) -> None:
    # The first batch of a fresh pool process pays one-off costs (first
    # encoder and class use) that would make a one-ID calibration probe look
    # ten times slower than the work is.
    run_batch(FleetTask(str, "warm-up"), [0])


@signals.worker_ready.connect
def _on_ready(sender=None, **_: object) -> None:
    controller = getattr(sender, "controller", None)
    concurrency = getattr(controller, "concurrency", None) or sender.app.conf.worker_concurrency
    _progress.watch_loop(getattr(sender, "hub", None))
    _heartbeat.start(sender.app, sender.hostname, int(concurrency), controller)


@signals.worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    # Stop advertising slots as soon as draining starts.
    _heartbeat.close()
