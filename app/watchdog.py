"""The worker's liveness watchdog: a worker that stops consuming while work waits exits.

Celery has failure modes where the worker process stays up, keeps its
heartbeat and its place in the fleet, and takes no more messages: the
consumer is not resumed after a broker reconnect (celery#10205), the main
thread hangs on a half-open socket (celery#9705), a consumer is cancelled and
never added back. Such a worker holds slots the launcher counts on, and
nothing else notices: it is neither dead (nothing restarts it) nor busy (no
lease lapses).

The rule, checked every `lease_seconds / 3` by a thread beside the
heartbeat's (app/worker.py), which like it keeps running when the main
thread (the consumer) is blocked:

    The worker is stuck when, at every check for `grace` seconds,
    1. it could take a message: it holds fewer batches (received and not
       finished, running ones included) than its concurrency, or its event
       loop has not turned since the previous check;
    2. it has received no message from its queue; and
    3. its queue holds ready messages: messages that no consumer holds.

Each part rules out a false alarm:

- (1) A worker whose slots are all busy with long batches takes nothing by
  design (prefetch one, acks late): it is not stuck however long the queue.
  The count of held batches is kept by the main thread, though, and goes
  stale when that thread is blocked (a batch that ends is never counted as
  ended), so a loop that does not turn counts as able to take a message. A
  live event loop turns at least every 10 s, and in practice every 1 s
  (Redis) or 2 s (RabbitMQ, the worker's event heartbeat), so a busy worker
  is seen turning well within a grace of at least 30 s.
- (2) A worker that received anything within the grace is consuming.
- (3) "Ready" is what the broker itself reports: Redis LLEN of the queue's
  lists (kombu moves a delivered message out of them into its unacked
  hash), RabbitMQ's message_count from a passive queue declare (ready
  messages, not the unacknowledged ones), SQS ApproximateNumberOfMessages
  (visible messages, not the in-flight ones). Messages reserved by other
  workers' prefetch do not count: they are those workers' business, not
  this one's; and an empty queue is no work waiting. A healthy consumer
  with a free slot takes a ready message within about a second, so ready
  messages that stay for the whole grace while this worker could take them
  and takes nothing mean it is not consuming. (SQS's count is approximate;
  a grace of 30 s is far longer than it lags.)

The launcher's advertised backlog (`store.backlog(queue)`) is not the signal:
it counts batches the launcher has not sent yet, so it is positive while
every batch on the broker is already reserved by other workers (a false
alarm), it is zero for the tail of a job while batches still wait on the
broker, and plain Celery clients do not advertise at all. The broker's own
count costs one call per check (four pipelined LLENs, a passive declare, or
one GetQueueAttributes), made only while (1) and (2) hold. A count that
cannot be read (the broker is down) restarts the clock: the grace then runs
from when the broker answers again, which is when a worker that failed to
resume consuming after a reconnect shows. (Celery retries a lost broker
connection at growing intervals, up to 30 s apart, with its event loop
stopped meanwhile; a worker still waiting to retry a grace after the broker
is back is restarted, which reconnects it no later.)

The grace is `max(3 * lease_seconds, 30)` seconds (30 s by default);
FLEET_WATCHDOG_SECONDS overrides it (0 turns the watchdog off). A stuck
worker is detected within `grace + lease_seconds` of the moment all three
hold (the clock starts at the first check that sees them, at most two
checks late, and fires at the first check past the grace).

Then the worker exits and its supervisor starts a new one. It logs an error
saying why, stops advertising its slots, and asks Celery for a warm
shutdown (`worker_state.should_stop`, as SIGTERM does, but with exit code
WATCHDOG_EXIT_CODE): no new message, anything received but not started is
handed back, running batches finish. If the main loop has not begun the
shutdown within `min(grace, 10)` seconds (its thread is blocked) or the
shutdown has not finished within FLEET_MAX_BATCH_SECONDS + 60 s, the process
ends at once with os._exit(WATCHDOG_EXIT_CODE); its pool processes die with
it (Celery gives them a parent-death signal) and their acks-late batches go
back to the queue (RabbitMQ at once; Redis and SQS through the launcher's
lease check). The supervisor is systemd on a host (`Restart=always` in the
unit app/boot.py writes; the exit code is non-zero, so `on-failure` would
do too), `LocalFleet.supervise` in `fleet local`, the container runtime for
`app.boot --foreground`. Where nothing restarts the worker (`app.boot start`
without systemd) it stays down, which is still better than a worker that
looks alive and takes nothing: the launcher stops counting its slots.

Why the worker restarts itself, rather than systemd's WatchdogSec or the
drain agent: only the worker process sees everything the rule needs (the
slots, the messages taken, the event loop's turns; the settings to reach
the broker), it runs the same on every host and in every local fleet, and
it needs neither sd_notify plumbing nor another process polling it.
WatchdogSec only proves that some thread still pings, and a blocked
consumer is exactly the case where the heartbeat thread still does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping

from app.queue_depth import ReadyCount, ready_count
from app.settings import Settings

log = logging.getLogger(__name__)

WATCHDOG_EXIT_CODE = 70  # EX_SOFTWARE: non-zero, so Restart=on-failure restarts it too
MIN_GRACE_SECONDS = 30.0
# A warm shutdown may take as long as the longest batch; then this long to exit.
STOP_MARGIN_SECONDS = 60.0
RESPOND_SECONDS = 10.0  # the main loop checks the stop flag at least every second


def grace_seconds(settings: Settings, env: Mapping[str, str] | None = None) -> float | None:
    """How long work may wait while this worker takes none; None: the watchdog is off."""
    env = os.environ if env is None else env
    default = max(3 * settings.lease_seconds, MIN_GRACE_SECONDS)
    raw = env.get("FLEET_WATCHDOG_SECONDS", "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value == 0:
        return None
    if not 0 < value < float("inf"):
        log.error("FLEET_WATCHDOG_SECONDS=%r is not a number of seconds (0: off); using %s",
                  raw, default)
        return default
    return value


# -- the rule -------------------------------------------------------------------


class Progress:
    """What the worker's main thread does, counted for the watchdog in another thread.

    `taken`: messages the consumer took from the queue (tasks received,
    revoked on arrival, rejected, unknown). `turns`: turns of its event loop
    (None until `watch_loop` has a loop to watch).
    """

    def __init__(self) -> None:
        self.taken = 0
        self.turns: int | None = None

    def took(self) -> None:
        self.taken += 1

    def turned(self) -> None:
        self.turns = (self.turns or 0) + 1

    def watch_loop(self, hub: object) -> None:
        """Count the turns of the consumer's event loop (kombu's Hub; none: not counted)."""
        on_tick = getattr(hub, "on_tick", None)
        if on_tick is not None:
            self.turns = 0
            on_tick.add(self.turned)


class Watchdog:
    """The stuck rule of the module docstring, one `check` per heartbeat.

    `ready` returns the queue's ready messages, or raises when the broker
    cannot be asked (it is created lazily, so a broker that is down at start
    only delays the watchdog).
    """

    def __init__(self, grace: float, ready: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.ready = ready
        self.clock = clock
        self.received_seen: int | None = None
        self.turns_seen: int | None = None
        self.since: float | None = None  # when all three conditions were first seen together
        self.last_ready = 0
        self.loop_stalled = False

    def check(self, received: int, held: int, concurrency: int,
              turns: int | None = None) -> float | None:
        """Seconds this worker has been starving work, once that reaches the grace; else None.

        `received` and `turns` count the messages the consumer took and the
        turns of its event loop so far (`turns` None: no event loop to watch).
        """
        now = self.clock()
        took_something = received != self.received_seen
        self.loop_stalled = turns is not None and turns == self.turns_seen
        self.received_seen, self.turns_seen = received, turns
        if took_something or (held >= concurrency and not self.loop_stalled):
            self.since = None
            return None
        try:
            self.last_ready = self.ready()
        except Exception as exc:  # noqa: BLE001 - unknown is not stuck: restart the clock
            log.debug("watchdog: cannot read the queue depth (%s)", exc)
            self.last_ready = 0
        if self.last_ready <= 0:
            self.since = None
            return None
        if self.since is None:
            self.since = now
            return None
        starving = now - self.since
        return starving if starving >= self.grace else None


# -- the action -------------------------------------------------------------------


def exit_worker(reason: str, stopping: Callable[[], bool], respond_seconds: float,
                stop_seconds: float, poll: float = 0.2) -> None:
    """Warm-shut the worker down with WATCHDOG_EXIT_CODE; os._exit if that does not happen.

    Called from a thread other than the main one. `stopping()` says whether
    the main loop has begun the warm shutdown. Never returns: the process
    ends here (hard) or in the main thread (warm).
    """
    from celery.worker import state as worker_state

    log.error("watchdog: %s; restarting the worker (warm shutdown, exit code %d)",
              reason, WATCHDOG_EXIT_CODE)
    # What Celery's SIGTERM handler does, with a non-zero exit code; the main
    # loop checks it at least once a second.
    worker_state.should_stop = WATCHDOG_EXIT_CODE
    started = time.monotonic()
    while True:
        time.sleep(poll)
        waited = time.monotonic() - started
        if not stopping() and waited > respond_seconds:
            why = f"the main loop did not begin the shutdown within {respond_seconds:.0f} s"
            break
        if waited > stop_seconds:
            why = f"the warm shutdown did not finish within {stop_seconds:.0f} s"
            break
    log.error("watchdog: %s; exiting at once", why)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(WATCHDOG_EXIT_CODE)


def blueprint_stopping(controller: object) -> Callable[[], bool]:
    """Whether the worker's main loop has begun its shutdown (its blueprint left RUN)."""
    from celery.bootsteps import RUN

    def stopping() -> bool:
        blueprint = getattr(controller, "blueprint", None)
        return blueprint is not None and getattr(blueprint, "state", RUN) != RUN

    return stopping


class Liveness:
    """The watchdog as the heartbeat runs it: the rule, its broker reader, and the action."""

    def __init__(self, settings: Settings, concurrency: int, controller: object,
                 grace: float) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.controller = controller
        self._reader: ReadyCount | None = None
        self.rule = Watchdog(grace, self._ready)

    def _ready(self) -> int:
        if self._reader is None:
            self._reader = ready_count(self.settings)
        return self._reader.ready()

    def check(self, progress: Progress, held: int) -> str | None:
        """Why this worker is stuck, or None; `held`: the batches it holds."""
        try:
            starving = self.rule.check(progress.taken, held, self.concurrency, progress.turns)
        except Exception:  # noqa: BLE001 - the watchdog must never stop the heartbeat
            log.warning("watchdog check failed", exc_info=True)
            return None
        if starving is None:
            return None
        could = (f"{self.concurrency - held} free slot(s)" if held < self.concurrency
                 else "its event loop has not turned since the last check")
        return (f"stuck: {self.rule.last_ready} message(s) ready on queue "
                f"{self.settings.queue!r} and {could}, but no message received for "
                f"{starving:.1f} s (grace {self.rule.grace:g} s)")

    def restart(self, reason: str) -> None:
        """Exit the worker for its supervisor to restart it (does not return)."""
        exit_worker(reason, blueprint_stopping(self.controller),
                    respond_seconds=min(self.rule.grace, RESPOND_SECONDS),
                    stop_seconds=self.settings.max_batch_seconds + STOP_MARGIN_SECONDS)
