"""The worker's liveness watchdog: a worker that stops consuming while work waits exits.

A worker can stay up, keep its heartbeat and take nothing (a consumer not
resumed after a reconnect, a main thread hung on a half-open socket). The
rule, checked beside the heartbeat: stuck when, for a whole grace period,
it could take a message, has received none, and its queue holds ready
messages; then it exits for its supervisor to restart it. Why each part
of the rule, and why the worker restarts itself: docs/watchdog.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping

from app.queue_depth import ReadyCount, ready_count
from app.settings import STOP_MARGIN_SECONDS, Settings

log = logging.getLogger(__name__)

WATCHDOG_EXIT_CODE = 70  # EX_SOFTWARE: non-zero, so Restart=on-failure restarts it too
MIN_GRACE_SECONDS = 30.0
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
        log.error(
            "FLEET_WATCHDOG_SECONDS=%r is not a number of seconds (0: off); using %s", raw, default
        )
        return default
    return value


# -- the rule -------------------------------------------------------------------


class ConsumerActivity:
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


class _Stretch:
    """How long a condition has held at every check in a row."""

    def __init__(self) -> None:
        self.since: float | None = None  # the first check of the current stretch

    def seconds(self, holds: bool, now: float) -> float | None:
        """Seconds since the stretch began (0 at its first check); None when it is broken."""
        if not holds:
            self.since = None
            return None
        if self.since is None:
            self.since = now
        return now - self.since


class Watchdog:
    """The stuck rule (docs/watchdog.md), one `check` per heartbeat.

    `ready` returns the queue's ready messages, or raises when the broker
    cannot be asked (it is created lazily, so a broker that is down at start
    only delays the watchdog).
    """

    def __init__(
        self, grace: float, ready: Callable[[], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.grace = grace
        self.ready = ready
        self.clock = clock
        self.received_seen: int | None = None
        self.turns_seen: int | None = None
        self.starving = _Stretch()  # all three conditions of the first rule
        self.last_ready = 0
        self.loop_stalled = False
        self.accepted_seen: int | None = None
        self.held = _Stretch()  # a batch held and not started (the second rule)

    def _past_grace(self, stretch: _Stretch, holds: bool, now: float) -> float | None:
        seconds = stretch.seconds(holds, now)
        return seconds if seconds is not None and seconds >= self.grace else None

    def holding(self, reserved: int, active: int, concurrency: int, accepted: int) -> float | None:
        """Seconds this worker has held a batch no pool process starts, once that reaches
        the grace; else None.

        `reserved`: batches taken and not finished; `active`: those a pool process has
        accepted (started); `accepted`: how many it has accepted since it began. A batch
        waiting while a pool process is free starts within milliseconds; one that waits
        a whole grace, with no other batch started meanwhile, never will (Celery's pool
        can lose track of a process across a broker reconnect). No ready messages are
        needed for this one: the held batch is the work waiting.
        """
        now = self.clock()
        started_one = accepted != self.accepted_seen
        self.accepted_seen = accepted
        waiting = reserved > active and active < concurrency
        return self._past_grace(self.held, waiting and not started_one, now)

    def check(
        self, received: int, reserved: int, concurrency: int, turns: int | None = None
    ) -> float | None:
        """Seconds this worker has been starving work, once that reaches the grace; else None.

        `received` and `turns` count the messages the consumer took and the
        turns of its event loop so far (`turns` None: no event loop to watch).
        """
        now = self.clock()
        took_something = received != self.received_seen
        self.loop_stalled = turns is not None and turns == self.turns_seen
        self.received_seen, self.turns_seen = received, turns
        could_take = not took_something and (reserved < concurrency or self.loop_stalled)
        if could_take:
            # The broker is asked only while the first two conditions hold.
            try:
                self.last_ready = self.ready()
            except Exception as exc:
                log.debug("watchdog: cannot read the queue depth (%s)", exc)
                self.last_ready = 0
        return self._past_grace(self.starving, could_take and self.last_ready > 0, now)


# -- the action -------------------------------------------------------------------


def exit_worker(
    reason: str,
    stopping: Callable[[], bool],
    respond_seconds: float,
    stop_seconds: float,
    poll: float = 0.2,
) -> None:
    """Warm-shut the worker down with WATCHDOG_EXIT_CODE; os._exit if that does not happen.

    Called from a thread other than the main one. `stopping()` says whether
    the main loop has begun the warm shutdown. Never returns: the process
    ends here (hard) or in the main thread (warm).
    """
    from celery.worker import state as worker_state

    log.error(
        "watchdog: %s; restarting the worker (warm shutdown, exit code %d)",
        reason,
        WATCHDOG_EXIT_CODE,
    )
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

    def __init__(
        self, settings: Settings, concurrency: int, controller: object, grace: float
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.controller = controller
        self._reader: ReadyCount | None = None
        self.rule = Watchdog(grace, self._ready)

    def _ready(self) -> int:
        if self._reader is None:
            self._reader = ready_count(self.settings)
        return self._reader.ready()

    def check(self, activity: ConsumerActivity, taken: Mapping[str, int]) -> str | None:
        """Why this worker is stuck, or None.

        `taken`: the batches taken and not finished ("reserved"), those running
        ("active") and all ever started ("accepted"), as heartbeat.taken_batches counts.
        """
        reserved = taken["reserved"]
        try:
            held = self.rule.holding(reserved, taken["active"], self.concurrency, taken["accepted"])
            starving = self.rule.check(activity.taken, reserved, self.concurrency, activity.turns)
        except Exception:
            log.warning("watchdog check failed", exc_info=True)
            return None
        if held is not None:
            return (
                f"stuck: {reserved - taken['active']} batch(es) taken but not started for "
                f"{held:.1f} s while {self.concurrency - taken['active']} pool slot(s) are free "
                f"(grace {self.rule.grace:g} s)"
            )
        if starving is None:
            return None
        could = (
            f"{self.concurrency - reserved} free slot(s)"
            if reserved < self.concurrency
            else "its event loop has not turned since the last check"
        )
        return (
            f"stuck: {self.rule.last_ready} message(s) ready on queue "
            f"{self.settings.queue!r} and {could}, but no message received for "
            f"{starving:.1f} s (grace {self.rule.grace:g} s)"
        )

    def restart(self, reason: str, running: int) -> None:
        """Exit the worker for its supervisor to restart it (does not return).

        `running`: batches running now. The warm shutdown waits for them, at most
        the longest a batch may take; with none running there is nothing to wait
        for (a batch the pool never started would hold the shutdown for ever), so
        it gets as long as the main loop gets to begin it.
        """
        respond = min(self.rule.grace, RESPOND_SECONDS)
        exit_worker(
            reason,
            blueprint_stopping(self.controller),
            respond_seconds=respond,
            stop_seconds=(
                self.settings.max_batch_seconds + STOP_MARGIN_SECONDS if running else respond
            ),
        )
