"""A job fed from Python and read back in Python: the engine under app.fleet.

The launcher's own dispatch loop runs the job in a thread of the caller's process. Its
IDs come from a Python iterable (`ItemsSource`) or from calls made while it runs
(`FeedSource`, the Executor's), and each committed batch's JSON lines go to an `Inbox`
the caller's thread reads, instead of a file. The batches the caller has not read yet
count against the job's in-flight limit (Dispatch), so a slow reader holds the job back
and memory stays bounded, as for `fleet run`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgspec

from app.batch import short_repr
from app.launcher.dispatch import NOTHING_YET, driver_lease
from app.launcher.job import BadInput, JobError, JobOptions, JobSummary
from app.launcher.launcher import Launcher
from app.launcher.output import quiet
from app.launcher.sources import InputError, Source
from app.settings import Settings

_encode = msgspec.json.Encoder().encode

# Items read ahead from an iterator before its job starts: an iterable that ends within
# them is a job of known length, cut as a file is (its last wave finer, so every slot ends
# together); a longer one streams, cut by the batch size calibrated from its first items.
READ_AHEAD = 100_000


class ItemsSource(Source):
    """The items of a Python iterable: a list or tuple (or an iterator that ended within
    READ_AHEAD items) is counted and can be read again; a longer iterator is read once,
    as the job cuts its batches. Each batch's items are kept (by batch number) until
    their results are read: the caller gets its own objects back, and the workers send
    the results alone."""

    def __init__(self, items: Iterable[Any], label: str) -> None:
        super().__init__(spec=f"python:{label}", fmt="items")
        object.__setattr__(self, "kept", {})
        held: Sequence[Any] | None = None
        rest: Iterator[Any] | None = None
        if isinstance(items, list | tuple | range):
            held = head = items
        else:
            it = iter(items)
            head = list(itertools.islice(it, READ_AHEAD))
            if len(head) < READ_AHEAD:
                held = head
            else:
                rest = itertools.chain(head, it)
        object.__setattr__(self, "held", held)
        object.__setattr__(self, "rest", rest)
        object.__setattr__(self, "head", head)

    held: Sequence[Any] | None
    rest: Iterator[Any] | None
    head: Sequence[Any]  # the items read ahead (or held): checked before the job starts
    kept: dict[int, list[Any]]

    @property
    def streamed(self) -> bool:
        return self.held is None

    def count(self) -> int | None:
        return None if self.held is None else len(self.held)

    def batches(self, sizes: Iterator[int]) -> Iterator[list[Any]]:
        """Successive batches: the n-th is batch n (a held source read again, after the
        calibration, starts again from batch 0, cut the same)."""
        kept = self.kept
        for number, chunk in enumerate(self._chunks(sizes)):
            kept[number] = chunk
            yield chunk

    def _chunks(self, sizes: Iterator[int]) -> Iterator[list[Any]]:
        held = self.held
        if held is not None:
            pos = 0
            while pos < len(held):
                n = next(sizes)
                yield list(held[pos : pos + n])
                pos += n
            return
        items = self.rest
        assert items is not None
        for n in sizes:
            chunk = list(itertools.islice(items, n))
            if not chunk:
                return
            yield chunk


class Feed:
    """The calls waiting for a FeedSource's next batch, and the futures of its batches."""

    def __init__(self, slots: Callable[[], int], most: int) -> None:
        self.waiting: deque[tuple[Future[Any], Any]] = deque()
        self.lock = threading.Lock()
        self.closed = False
        # batch number -> its futures and items, until its results are read
        self.tags: dict[int, tuple[list[Future[Any]], list[Any]]] = {}
        self.slots = slots
        self.most = most


class FeedSource(Source):
    """Calls gathered while the job runs (Executor.submit): each batch takes what waits,
    about half of it per slot online a round, so a loop of a million submits is sent in
    batches that grow with the backlog, and a lone call goes at the next round."""

    feed: Feed

    def __init__(self, label: str, slots: Callable[[], int], most: int) -> None:
        super().__init__(spec=f"python:{label}", fmt="items")
        object.__setattr__(self, "feed", Feed(slots, most))

    @property
    def streamed(self) -> bool:
        return True

    def count(self) -> int | None:
        return None

    def put(self, future: Future[Any], item: Any) -> None:
        with self.feed.lock:
            self.feed.waiting.append((future, item))

    def close(self, cancel: bool = False) -> None:
        """No more calls: the job ends once those waiting ran (`cancel`: they do not run)."""
        feed = self.feed
        with feed.lock:
            feed.closed = True
            if cancel:
                for future, _ in feed.waiting:
                    future.cancel()
                feed.waiting.clear()

    def take_tags(self, batch: int) -> tuple[list[Future[Any]], list[Any]]:
        return self.feed.tags.pop(batch)

    def orphans(self) -> list[Future[Any]]:
        """Every future not resolved: those waiting and those in batches not read."""
        feed = self.feed
        with feed.lock:
            out = [f for f, _ in feed.waiting]
            feed.waiting.clear()
        for futures, _ in feed.tags.values():
            out.extend(futures)
        feed.tags.clear()
        return out

    def batches(self, sizes: Iterator[int]) -> Iterator[Any]:
        feed = self.feed
        waiting = feed.waiting
        number = 0
        for n in sizes:
            with feed.lock:
                if not waiting:
                    if feed.closed:
                        return
                    take: list[tuple[Future[Any], Any]] = []
                else:
                    share = max(1, len(waiting) // (2 * max(1, feed.slots())))
                    take = [waiting.popleft() for _ in range(min(n, feed.most, share))]
            # A future cancelled by its caller is dropped; the others are running now.
            take = [(f, i) for f, i in take if f.set_running_or_notify_cancel()]
            if not take:
                yield NOTHING_YET
                continue
            items = [i for _, i in take]
            feed.tags[number] = [f for f, _ in take], items
            number += 1
            yield items


@dataclass
class End:
    summary: JobSummary | None = None
    error: BaseException | None = None


class Inbox:
    """Where the job's dispatch loop puts each committed batch's lines, for the reader."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, bytes, int] | End] = queue.SimpleQueue()
        self.put = 0  # batches put (by the dispatch loop only)
        self.taken = 0  # batches read (by the reader only)

    def write_batch(self, batch: int, lines: bytes, errors: int = 0) -> None:
        self.put += 1
        self._queue.put((batch, bytes(lines), errors))

    def unread(self) -> int:
        return self.put - self.taken

    def flush(self) -> None:
        pass

    def end(self, end: End) -> None:
        self._queue.put(end)

    def get(self, deadline: float | None = None) -> tuple[int, bytes, int] | End:
        """The next batch, or the job's end; TimeoutError past `deadline` (monotonic).
        Waits in short steps, so Ctrl-C reaches the caller at once."""
        while True:
            step = 0.25
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    raise TimeoutError("no result from the fleet in the time given")
            with contextlib.suppress(queue.Empty):
                return self._queue.get(timeout=step)


# The jobs of this process still running: the end of the program cancels them (Ctrl-C
# in a loop at a script's top level leaves its results object alive until then).
_open_jobs: weakref.WeakSet[StreamJob] = weakref.WeakSet()


@atexit.register
def _close_open_jobs() -> None:
    for job in list(_open_jobs):
        job.close()


class StreamJob:
    """One job run from this process: its launcher in a thread, its lines in an inbox."""

    def __init__(
        self, settings: Settings, task: str, source: Source, opts: JobOptions, progress: bool
    ) -> None:
        self.launcher = Launcher(settings)
        self.opts = opts
        self.opts.task, self.opts.source, self.opts.progress = task, source, progress
        self.source = source
        self.inbox = Inbox()
        self.stop = threading.Event()
        self.closed = False
        self.ended = False  # the job's run returned or raised: nothing left to cancel
        self.summary: JobSummary | None = None
        self.thread = threading.Thread(target=self._drive, name=f"fleet-job-{task}", daemon=True)
        self.thread.start()
        _open_jobs.add(self)

    @property
    def job(self) -> str | None:
        return self.launcher.job

    def _drive(self) -> None:
        quiet(not self.opts.progress)
        try:
            self.summary = self.launcher.run(self.opts, inbox=self.inbox, stop=self.stop)
            self.ended = True
        except BaseException as exc:  # handed to the reader, raised in its thread
            self.ended = True
            if self.job:  # `fleet jobs` shows it failed, and why
                from app.launcher.jobs import end

                with contextlib.suppress(Exception):
                    end(self.launcher.store, self.launcher.settings, self.job, "failed", str(exc))
            self.inbox.end(End(error=exc))
        else:
            self.inbox.end(End(summary=self.summary))

    def close(self) -> None:
        """Cancel what has not run (the workers drop the job's queued batches) and wait
        until no batch of the job runs (bounded by a few leases)."""
        if self.closed:
            return
        self.closed = True
        if self.ended or not self.thread.is_alive():
            return
        cancelled = self.job
        if cancelled:
            with contextlib.suppress(Exception):
                self.launcher.store.cancel(cancelled)
        self.stop.set()
        self.thread.join(timeout=3 * driver_lease(self.launcher.settings.lease_seconds))
        if self.job and not cancelled:  # it had no ID yet at the cancel (calibrating)
            with contextlib.suppress(Exception):
                self.launcher.store.cancel(self.job)


def raise_end(end: End, job: StreamJob) -> None:
    """Raise what ended the job early, as the caller should see it."""
    if end.error is not None:
        if isinstance(end.error, InputError):
            raise BadInput(str(end.error)) from None
        raise end.error
    summary = end.summary
    if summary is not None and summary.status in ("cancelled", "interrupted") and not job.closed:
        from app.launcher.jobs import Cancelled

        raise Cancelled(f"job {summary.job} was {summary.status} before it ended.")


class RemoteError(JobError):
    """An item's exception whose type cannot be made here: its `type`, `item` and
    `remote_traceback` say what it was."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type = type_name


def remote_exception(error: dict[str, Any], item: Any) -> BaseException:
    """An item's error record as an exception of its own type where this process has that
    type (a built-in one, or one of a module imported here), else a RemoteError; with the
    item and the worker's traceback (its text is also a note on the exception)."""
    name, module = str(error.get("type", "Exception")), str(error.get("module", "builtins"))
    message = str(error.get("message", ""))
    found: Any = sys.modules.get(module)
    for part in name.split("."):
        found = getattr(found, part, None)
    exc: BaseException | None = None
    if isinstance(found, type) and issubclass(found, Exception):
        with contextlib.suppress(Exception):
            exc = found(message)
    if exc is None:
        qualified = name if module == "builtins" else f"{module}.{name}"
        exc = RemoteError(f"{qualified}: {message}", qualified)
    tb = str(error.get("traceback", ""))
    exc.item = item  # type: ignore[attr-defined]
    exc.remote_traceback = tb  # type: ignore[attr-defined]
    exc.add_note(f"raised on the fleet for item {short_repr(item)}" + (f":\n{tb}" if tb else ""))
    return exc


class Record(msgspec.Struct, gc=False):
    """One line of a batch's results (app/batch.py writes them)."""

    id: Any
    result: Any = None
    error: dict[str, Any] | None = None


_decode_records = msgspec.json.Decoder(Record).decode_lines


def records(lines: bytes) -> list[Record]:
    return _decode_records(lines)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector held off for a moment: a batch's records and pairs
    are a hundred thousand new objects, none in a cycle, and collections while they are
    made cost a third of the time of reading them. Made as they are in C, nothing else
    runs meanwhile."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_decode_bare = msgspec.json.Decoder().decode_lines


def bare_values(lines: bytes, errors: int) -> tuple[list[Any], list[tuple[int, dict[str, Any]]]]:
    """A bare batch's results (null for an error) and its errors by position
    (app/batch.py _encode_bare)."""
    out: list[Any] = _decode_bare(lines)
    if not errors:
        return out, []
    trailer = out.pop()
    return out, [(int(i), e) for i, e in trailer["errors"]]


def batch_size_of(chunksize: Any) -> int | None:
    """JobOptions.batch_size for a chunksize: "auto" or None calibrates, else a whole number."""
    if chunksize is None or chunksize == "auto":
        return None
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise BadInput(f"chunksize={chunksize!r}: give a whole number of at least 1, or 'auto'.")
    return chunksize
