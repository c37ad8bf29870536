"""The drivers of submitted jobs, in the worker's main process.

`fleet submit` lists a job as one to drive (app/launcher/driver.py). Every worker
looks at that list every few seconds, beside its heartbeat; the first to take a
job's driver slot (one holder, a lease renewed every second) drives it in a thread
of its main process: the dispatch loop of `fleet run`, which mostly waits on the
result store. No pool process is taken from the batches, and no driver step waits
in the queue behind them. A worker that dies or drains lets its hold lapse or
releases it, and another worker takes the job over from the journal.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from app.store import open_store

if TYPE_CHECKING:
    from celery import Celery

    from app.launcher import Launcher
    from app.settings import Settings

log = logging.getLogger(__name__)

# How often a worker looks for a job without a driver: a set read on Redis; on the S3
# store a LIST request, billed, by every worker of the fleet, so less often there.
POLL_SECONDS = {"redis": 2.0, "s3": 10.0}


class Drivers:
    def __init__(self, app: Celery, settings: Settings, name: str) -> None:
        self.app = app
        self.settings = settings
        self.holder = f"driver@{name}"
        self.store = open_store(settings)
        self.threads: dict[str, threading.Thread] = {}
        self._launcher: Launcher | None = None

    def launcher(self) -> Launcher:
        # Imported at the first job to drive: a worker that never drives one never loads
        # the launcher's code.
        if self._launcher is None:
            from app.launcher import Launcher

            # The reducer of a job, read from the store, then resolves among the task
            # modules only (Launcher.reduce), as on the workers.
            self.app.fleet_driver = True
            self._launcher = Launcher(self.settings, celery=self.app)
        return self._launcher

    def run(self, stop: threading.Event) -> None:
        poll = POLL_SECONDS["s3" if self.settings.result_url.startswith("s3://") else "redis"]
        while not stop.wait(poll):
            try:
                self.look(stop)
            except Exception:
                log.warning("could not look for jobs to drive", exc_info=True)
        for thread in list(self.threads.values()):
            thread.join(timeout=10)  # each hands its job over at its next tick

    def look(self, stop: threading.Event) -> None:
        """Take the driver slot of every listed job that has no live driver."""
        from app.launcher.dispatch import driver_lease, driver_slot

        lease = driver_lease(self.settings.lease_seconds)
        for job in self.store.driven(self.settings.queue):
            running = self.threads.get(job)
            if running is not None and running.is_alive():
                continue
            if stop.is_set() or not self.store.acquire_slot(
                driver_slot(job), self.holder, 1, lease
            ):
                continue
            thread = threading.Thread(
                target=self._drive, args=(job, stop), name=f"fleet-driver-{job}", daemon=True
            )
            self.threads[job] = thread
            thread.start()

    def _drive(self, job: str, stop: threading.Event) -> None:
        from app.launcher.driver import drive

        try:
            state: Any = drive(self.launcher(), job, self.holder, stop)
            log.info("job %s: driver stopped, job %s", job, state)
        except Exception as exc:
            # The store or broker lost for good: the hold lapses, and a driver (this
            # worker's or another's) takes the job up again once they are back. Said
            # with the job, for `fleet jobs`, if the store takes it.
            log.warning("the driver of job %s stopped", job, exc_info=True)
            with contextlib.suppress(Exception):
                meta = self.store.get_meta(job)
                if meta is not None:
                    meta["driver_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    self.store.put_meta(job, meta)
