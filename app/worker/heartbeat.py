"""The worker's heartbeat: it advertises this worker and its slots in the result store.

Beside it runs the liveness watchdog (app/worker/watchdog.py). Both start
when the worker is ready and stop when it begins to shut down, through
Celery's signals, connected when the batch task's module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.worker import state as worker_state

from app.batch import run_batch
from app.names import (
    BUSY_SLOTS_METRIC,
    INSTANCE_DIMENSION,
    METRIC_DIMENSION,
    METRIC_NAMESPACE,
    WORKER_BATCHES_METRIC,
    app_version,
    code_version,
)
from app.registry import FleetTask
from app.settings import Settings
from app.store import open_store
from app.worker.drivers import Drivers
from app.worker.watchdog import ConsumerActivity, Liveness, grace_seconds

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


def worker_name() -> str:
    """This worker's key in the result store's registry: unique per process start."""
    return f"{socket.gethostname()}:{time.time_ns()}"


def taken_batches() -> dict[str, int]:
    """Batches this worker has taken (received, not finished, running ones included), and running.

    Advertised with each heartbeat: the drain agent and the local autoscaler
    take only an instance that has taken none.
    """
    return {
        "reserved": len(worker_state.reserved_requests),
        "active": len(worker_state.active_requests),
    }


def started_batches() -> int:
    """Batches a pool process of this worker has accepted (started) since it began."""
    accepted: int = worker_state.all_total_count[0]
    return accepted


def finished_batches() -> int:
    """Batches this worker has finished since it started: accepted, and running no more."""
    return started_batches() - len(worker_state.active_requests)


# -- the worker's own metrics in CloudWatch (FLEET_METRICS=cloudwatch) ---------------

METRICS_PERIOD = 60.0


def metric_data(stack: str, instance_id: str, busy: int, finished: int) -> dict[str, Any]:
    """The PutMetricData request of one worker's minute: its slots running a batch and the
    batches it finished, per instance (Stack, InstanceId) and for the stack (Stack alone,
    which CloudWatch sums over the instances)."""
    per_instance = [
        {"Name": METRIC_DIMENSION, "Value": stack},
        {"Name": INSTANCE_DIMENSION, "Value": instance_id},
    ]
    per_stack = [{"Name": METRIC_DIMENSION, "Value": stack}]
    return {
        "Namespace": METRIC_NAMESPACE,
        "MetricData": [
            {"MetricName": name, "Dimensions": dims, "Value": float(value), "Unit": "Count"}
            for name, value in ((BUSY_SLOTS_METRIC, busy), (WORKER_BATCHES_METRIC, finished))
            for dims in (per_instance, per_stack)
        ],
    }


class InstanceMetrics:
    """Publishes this worker's busy slots and finished batches every `period` seconds.

    Its own thread, so that a slow CloudWatch never delays a heartbeat; a failure to
    publish is logged and the next minute is tried again (its batches count then).
    """

    def __init__(
        self,
        stack: str,
        instance_id: str,
        client: Any,
        sample: Callable[[], tuple[int, int]],
        clock: Callable[[], float] = time.monotonic,
        period: float = METRICS_PERIOD,
    ) -> None:
        self.stack, self.instance_id, self.client = stack, instance_id, client
        self.sample, self.clock, self.period = sample, clock, period
        self.next_at = clock()
        self.published = sample()[1]  # finished batches already published

    def tick(self) -> bool:
        """Publish if a period has passed since the last time; True if it did."""
        now = self.clock()
        if now < self.next_at:
            return False
        self.next_at = now + self.period
        busy, finished = self.sample()
        try:
            self.client.put_metric_data(
                **metric_data(self.stack, self.instance_id, busy, finished - self.published)
            )
            self.published = finished
        except Exception:
            log.warning("could not publish the worker's metrics to CloudWatch", exc_info=True)
        return True

    def run(self, stop: threading.Event, wait: Callable[[float], object] | None = None) -> None:
        wait = wait or stop.wait
        while not stop.is_set():
            self.tick()
            wait(max(0.0, self.next_at - self.clock()))


def instance_metrics(settings: Settings, environ: Mapping[str, str]) -> InstanceMetrics | None:
    """The publisher FLEET_METRICS asks for (`cloudwatch`), or None."""
    kind = environ.get("FLEET_METRICS", "").strip().lower()
    if kind in ("", "none", "off"):
        return None
    stack, instance_id = settings.stack, environ.get("FLEET_INSTANCE_ID", "").strip()
    if kind != "cloudwatch" or not stack or not instance_id:
        log.warning(
            "FLEET_METRICS=%s: not publishing metrics (needs `cloudwatch`, FLEET_STACK and "
            "FLEET_INSTANCE_ID)",
            kind,
        )
        return None
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "cloudwatch",
        region_name=settings.aws_region or environ.get("AWS_DEFAULT_REGION") or None,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=5,
            read_timeout=10,
        ),
    )
    return InstanceMetrics(
        stack, instance_id, client, lambda: (taken_batches()["active"], finished_batches())
    )


# Messages taken and event-loop turns of the main thread: the watchdog's proof it consumes.
_activity = ConsumerActivity()


# celery has no types: to mypy its signals' `connect` is an untyped decorator.
@signals.task_received.connect  # type: ignore[untyped-decorator]
@signals.task_revoked.connect  # type: ignore[untyped-decorator]
@signals.task_rejected.connect  # type: ignore[untyped-decorator]
@signals.task_unknown.connect  # type: ignore[untyped-decorator]
def _on_taken(**_: object) -> None:
    _activity.took()


class _Heartbeat:
    """Advertises this worker and its slots in the result store while it consumes.

    Beside it runs the liveness watchdog (app/worker/watchdog.py): a worker that
    stops consuming while work waits for it exits, to be restarted. Both are
    threads, so they keep running when the main thread, the consumer, is
    blocked; the watchdog has its own so that a broker that does not answer
    its queue-depth reads never delays a heartbeat.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.closing = False
        self.name = worker_name()
        self.thread: threading.Thread | None = None
        self.drivers: threading.Thread | None = None

    def start(
        self, app: Celery, hostname: str, concurrency: int, controller: object = None
    ) -> None:
        settings: Settings | None = getattr(app, "fleet_settings", None)
        if settings is None:
            return
        store = open_store(settings)
        grace = grace_seconds(settings)
        liveness = None if grace is None else Liveness(settings, concurrency, controller, grace)
        info = {
            "hostname": hostname,
            "concurrency": concurrency,
            "pid": os.getpid(),
            "version": app_version(),
            # The content hash of the wheelhouse this worker's venv was installed from
            # (None: a checkout or a single wheel); `fleet run` compares them.
            "code": code_version(),
            "queue": settings.queue,
        }
        period = settings.lease_seconds / 3

        def beat() -> None:
            while not self.stop.is_set():
                try:
                    store.register_worker(
                        self.name, {**info, **taken_batches()}, settings.lease_seconds
                    )
                except Exception:
                    log.warning("worker heartbeat failed", exc_info=True)
                self.stop.wait(period)
            with contextlib.suppress(Exception):
                store.unregister_worker(self.name)

        def watch(liveness: Liveness) -> None:
            while not self.stop.wait(period):
                taken = {**taken_batches(), "accepted": started_batches()}
                stuck = liveness.check(_activity, taken)
                if stuck and not self.stop.is_set():
                    self.stop.set()  # the heartbeat unregisters the slots that are going
                    liveness.restart(stuck, running=taken["active"])  # ends the process

        self.thread = threading.Thread(target=beat, name="fleet-heartbeat", daemon=True)
        self.thread.start()
        # The drivers of submitted jobs (app/worker/drivers.py): joined as the worker stops,
        # so each hands its job over before the process ends.
        self.drivers = threading.Thread(
            target=Drivers(app, settings, self.name).run,
            args=(self.stop,),
            name="fleet-drivers",
            daemon=True,
        )
        self.drivers.start()
        metrics = instance_metrics(settings, os.environ)
        if metrics is not None:
            threading.Thread(
                target=metrics.run, args=(self.stop,), name="fleet-metrics", daemon=True
            ).start()
        if liveness is not None:
            threading.Thread(
                target=watch, args=(liveness,), name="fleet-watchdog", daemon=True
            ).start()

    def close(self) -> None:
        """Stop the threads and join them; the first call does it, later ones return.

        It runs in Celery's signal handler (worker_shutting_down), so a second signal
        (systemd's, a user's second Ctrl-C) can arrive while the first is still here:
        inside `stop.set()`, which holds the event's lock. A nested call that took that
        lock again would wait for itself and the worker would never exit. The flag is
        set before any lock is taken, and a signal handler runs between bytecodes of
        this same thread, so a nested call always sees it.
        """
        if self.closing:
            return
        self.closing = True
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.drivers is not None:
            self.drivers.join(timeout=15)


_heartbeat = _Heartbeat()


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up(**_: object) -> None:
    # The first batch of a fresh pool process pays one-off costs (first
    # encoder and class use) that would make a one-ID calibration probe look
    # ten times slower than the work is.
    run_batch(FleetTask(str, "warm-up"), [0])


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _on_ready(sender: Any = None, **_: object) -> None:  # sender: Celery's WorkController
    controller = getattr(sender, "controller", None)
    concurrency = getattr(controller, "concurrency", None) or sender.app.conf.worker_concurrency
    _activity.watch_loop(getattr(sender, "hub", None))
    _heartbeat.start(sender.app, sender.hostname, int(concurrency), controller)


@signals.worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _on_shutdown(**_: object) -> None:
    # Stop advertising slots as soon as draining starts.
    _heartbeat.close()
