"""The worker's shutdown hook survives a second signal that arrives inside the first.

Celery calls `_Heartbeat.close` from its signal handler. A second SIGTERM (the local
fleet used to send two; systemd and a user's second Ctrl-C can too) is handled by
the same thread between two bytecodes of the first call, possibly while it holds the
stop event's lock inside `Event.set()`. Seen in the suite as workers that never
exited after SIGTERM: the main thread waited on a lock it held itself.
"""

from __future__ import annotations

import threading

from app.worker.heartbeat import _Heartbeat


class _SignalInsideSet(threading.Event):
    """An event whose set() runs a nested 'signal handler' while holding its lock."""

    def __init__(self, nested: _Heartbeat) -> None:
        super().__init__()
        self.nested = nested
        self.nested_calls = 0

    def set(self) -> None:
        cond: threading.Condition = self._cond  # type: ignore[attr-defined]
        with cond:  # where Event.set is when the second signal lands
            self.nested_calls += 1
            self.nested.close()
            self._flag = True
            cond.notify_all()


def test_a_second_close_inside_the_first_returns_at_once() -> None:
    heartbeat = _Heartbeat()
    heartbeat.stop = _SignalInsideSet(heartbeat)
    closing = threading.Thread(target=heartbeat.close, daemon=True)
    closing.start()
    closing.join(timeout=5)
    assert not closing.is_alive(), "close() waited for a lock its own thread holds"
    assert heartbeat.stop.is_set()
    assert heartbeat.stop.nested_calls == 1


def test_close_stops_the_threads_once() -> None:
    heartbeat = _Heartbeat()
    beats = threading.Event()

    def beat() -> None:
        heartbeat.stop.wait()
        beats.set()

    heartbeat.thread = threading.Thread(target=beat, daemon=True)
    heartbeat.thread.start()
    heartbeat.close()
    assert beats.is_set() and not heartbeat.thread.is_alive()
    heartbeat.close()  # again, as a second signal would: nothing left to do
    assert heartbeat.closing
