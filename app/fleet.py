"""Run a function over the fleet from Python, as with multiprocessing.

    from app import fleet

    for item, result in fleet.map(heavy, ids):        # as batches commit, unordered
        ...
    with fleet.Pool() as pool:                         # multiprocessing.Pool's calls
        total = sum(pool.imap_unordered(heavy, ids))
    with fleet.Executor() as ex:                       # a concurrent.futures.Executor
        futures = [ex.submit(heavy, i) for i in ids]   # gathered into batches
    job = fleet.submit(heavy, "ids.txt", out="s3://bucket/prefix/")  # lives in the fleet
    job.wait()

The fleet is found as the CLI finds it: `stack="NAME"` (its SSM parameters), else the
FLEET_* variables, else the local fleet that `fleet local` runs on this machine. What
goes wrong raises: `Unreachable` (no fleet, or it cannot be reached), `BadInput` (what
was asked cannot run), `Cancelled`, and, for an item, its own exception.

What runs must be importable by the workers: a @fleet_task function, or a function
defined at the top of a module the workers load (your project's task module). Nothing
is pickled: items, arguments and results travel as JSON.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

from app.launcher.job import BadInput, JobError, JobOptions, Unreachable, VersionMismatch
from app.launcher.jobs import Cancelled, JobView
from app.launcher.sources import check_json
from app.launcher.stream import (
    End,
    FeedSource,
    ItemsSource,
    RemoteError,
    StreamJob,
    bare_values,
    batch_size_of,
    no_gc,
    raise_end,
    records,
    remote_exception,
)
from app.registry import STAR, STARSTAR, registered_name
from app.settings import ConfigError, Settings

__all__ = [
    "BadInput",
    "Cancelled",
    "Executor",
    "Job",
    "JobError",
    "Pool",
    "RemoteError",
    "Results",
    "Unreachable",
    "VersionMismatch",
    "jobs",
    "map",
    "register_joblib",
    "settings",
    "submit",
    "task_name",
]

_MOVE_IT = (
    "Define it with `def` at the top level of a module the workers load (your project's "
    "task module, shipped with `fleet package` or `fleet local --code`), import it from "
    "there, and pass that function; or decorate it with @fleet_task in such a module."
)


def settings(stack: str | None = None) -> Settings:
    """The fleet's settings, found as the CLI finds them; Unreachable when there is none."""
    from app.launcher.discovery import resolve_settings

    try:
        return resolve_settings(stack=stack)
    except ConfigError as exc:
        raise Unreachable(str(exc.code if exc.code is not None else exc)) from None


def task_name(func: Callable[..., Any] | str) -> str:
    """The name the workers know `func` by; BadInput, saying how to fix it, for a function
    they cannot import (a lambda, a closure, a function of __main__)."""
    if isinstance(func, str):
        if not func.strip():
            raise BadInput("the task name is empty: give a function, or module:function.")
        return func
    if inspect.isfunction(func) and func.__module__ == "__main__":
        raise BadInput(
            f"{func.__name__} is defined in __main__ (the script being run), which the "
            f"workers do not load. {_MOVE_IT}"
        )
    registered = registered_name(func)
    if registered is not None:
        return registered
    if not inspect.isfunction(func):
        kind = type(func).__name__
        raise BadInput(
            f"{func!r} is a {kind}, not a plain function: the fleet runs only functions the "
            f"workers import by name. {_MOVE_IT}"
        )
    name, qualified, module = func.__name__, func.__qualname__, func.__module__
    if name == "<lambda>":
        raise BadInput(f"a lambda cannot run on the fleet: it has no name to import. {_MOVE_IT}")
    if "<locals>" in qualified:
        raise BadInput(
            f"{qualified} is defined inside another function (a closure): the workers cannot "
            f"import it. {_MOVE_IT}"
        )
    if "." in qualified:
        raise BadInput(
            f"{qualified} is a method: the workers call module-level functions. {_MOVE_IT}"
        )
    return f"{module}:{name}"


class _Raise:
    """An item's error, in place of its value, to be raised once the values before it
    were yielded."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Results:
    """What `fleet.map` returns: an iterator over the results as the fleet commits them.

    Leaving it early cancels the job's batches that have not run, and returns once none
    of them runs: the end of a `with` block or close() (at once), a `for` loop left by
    break, an exception or Ctrl-C (as the loop's iterator is let go), or the end of the
    program."""

    def __init__(
        self,
        job: StreamJob | None,
        *,
        ordered: bool,
        return_exceptions: bool,
        pairs: bool,
        timeout: float | None = None,
    ) -> None:
        self._job = job
        source = job.source if job is not None else None
        kept = source.kept if isinstance(source, ItemsSource) else None
        reader = _Reader(pairs, return_exceptions, kept if kept is not None else {})
        self._gen = _generate(job, reader, ordered, timeout)
        # Into its try block at once: dropped before any item was read, it cancels too.
        next(self._gen)

    @property
    def job(self) -> str | None:
        """The job's ID in the result store (`fleet jobs` shows it), once it has one."""
        return self._job.job if self._job is not None else None

    def __iter__(self) -> Iterator[Any]:
        return self._gen  # a `for` loop then runs the generator itself: no call per item

    def __next__(self) -> Any:
        return next(self._gen)

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._gen.close()


def _generate(
    job: StreamJob | None, reader: _Reader, ordered: bool, timeout: float | None
) -> Generator[Any, None, None]:
    """The values of a job's batches as they come; closing it (or letting it go) closes
    the job. It holds no reference to its Results: a `for` loop's is the only one."""
    if job is None:
        yield None
        return
    held: dict[int, tuple[bytes, int]] = {}  # ordered: batches that came before their turn
    turn = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        yield None  # primed by Results
        while True:
            got = job.inbox.get(deadline)
            if isinstance(got, End):
                raise_end(got, job)
                return
            batch, lines, errors = got
            if ordered:
                held[batch] = lines, errors
                if turn not in held:
                    continue
                batch, (lines, errors) = turn, held.pop(turn)
            while True:
                values = reader.values(batch, lines, errors)
                if values and isinstance(values[-1], _Raise):  # an item's error, in its place
                    yield from values[:-1]
                    raise values[-1].exc
                yield from values  # a list: one generator between it and the caller's loop
                job.inbox.taken += 1
                if not ordered:
                    break
                turn += 1
                if turn not in held:
                    break
                batch, (lines, errors) = turn, held.pop(turn)
    finally:
        job.close()


class _Reader:
    """A batch's bare lines (app/batch.py _encode_bare) and the caller's items it ran on
    as what the caller asked for: (item, result) pairs, or results."""

    def __init__(self, pairs: bool, return_exceptions: bool, kept: dict[int, list[Any]]) -> None:
        self._pairs = pairs
        self._return_exceptions = return_exceptions
        self._kept = kept  # the caller's items of each batch not read yet (ItemsSource)

    def values(self, batch: int, lines: bytes, errors: int) -> list[Any]:
        """Batch `batch`'s (item, result) pairs, or results, with the caller's own items;
        an item's error is raised in its place (a _Raise ends the list), or with
        return_exceptions given in place of its result."""
        items = self._kept.pop(batch)
        with no_gc():  # at C speed: no object per record but the pair
            results, failed = bare_values(lines, errors)
            out = list(zip(items, results, strict=True)) if self._pairs else results
        for i, error in failed:
            exc = remote_exception(error, items[i])
            if not self._return_exceptions:
                return [*out[:i], _Raise(exc)]
            out[i] = (items[i], exc) if self._pairs else exc
        return out


def _start(
    task: str,
    items: Iterable[Any],
    *,
    chunksize: Any,
    progress: bool,
    config: Settings,
) -> StreamJob | None:
    """The job over `items`, started; None when there are none. Each batch's items are
    kept until its results are read, and the workers send the results alone (bare)."""
    size = batch_size_of(chunksize)
    source = ItemsSource(items, task)
    if not source.head:
        return None
    # What the job's calibration sends comes from these: checked before anything is.
    check_json(list(source.head), 0, BadInput)
    return StreamJob(config, task, source, JobOptions(batch_size=size, bare=True), progress)


def map(  # fleet.map, as Pool.map and Executor.map
    func: Callable[..., Any] | str,
    iterable: Iterable[Any],
    *,
    ordered: bool = False,
    return_exceptions: bool = False,
    chunksize: int | str | None = "auto",
    progress: bool = False,
    stack: str | None = None,
) -> Results:
    """Run `func` on the fleet over the items of `iterable`, read as the job goes (a
    generator of ten million items never sits in memory), and yield (item, result) pairs
    as batches commit; with `ordered`, in the order of the items.

    An item's exception is raised (its own type where it can be made here, with `.item`
    and the worker's `.remote_traceback`) unless `return_exceptions`, which yields it in
    place of the result. `chunksize`: items per batch ("auto": sized from a few timed
    items to about two seconds each). `progress`: a progress bar on stderr. Leaving the
    loop early cancels what has not run."""
    name = task_name(func)
    config = settings(stack)
    job = _start(name, iterable, chunksize=chunksize, progress=progress, config=config)
    return Results(job, ordered=ordered, return_exceptions=return_exceptions, pairs=True)


def _values(
    task: str,
    items: Iterable[Any],
    chunksize: Any,
    progress: bool,
    config: Settings,
    ordered: bool,
    timeout: float | None = None,
) -> Results:
    """The results alone of a job over `items` (Pool's and Executor.map's)."""
    job = _start(task, items, chunksize=chunksize, progress=progress, config=config)
    return Results(job, ordered=ordered, return_exceptions=False, pairs=False, timeout=timeout)


class Pool:
    """multiprocessing.Pool's calls, run on the fleet: imap_unordered, imap, map, starmap.

    `processes` is accepted for a drop-in and ignored: the fleet's slots decide. Each
    call is a job of its own; closing the pool (or leaving its `with` block) cancels the
    jobs still running, as multiprocessing's terminate() does."""

    def __init__(
        self, processes: int | None = None, *, stack: str | None = None, progress: bool = False
    ) -> None:
        self._config = settings(stack)
        self._progress = progress
        self._open: list[Results] = []
        self._closed = False

    def _results(
        self, func: Any, iterable: Iterable[Any], chunksize: int | None, ordered: bool, star: str
    ) -> Results:
        if self._closed:
            raise ValueError("Pool not running")
        results = _values(
            star + task_name(func), iterable, chunksize, self._progress, self._config, ordered
        )
        self._open = [r for r in self._open if r._job is not None and not r._job.closed]
        self._open.append(results)
        return results

    def imap_unordered(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> Results:
        """Results as they come (their order is not the items')."""
        return self._results(func, iterable, chunksize, False, "")

    def imap(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> Results:
        """Results in the order of the items, holding no more than the in-flight window."""
        return self._results(func, iterable, chunksize, True, "")

    def map(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        with self.imap(func, iterable, chunksize) as results:
            return list(results)

    def starmap(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        """func(*args) for each args of `iterable`, in order."""
        with self._results(func, iterable, chunksize, True, STAR) as results:
            return list(results)

    def close(self) -> None:
        self._closed = True

    def terminate(self) -> None:
        self._closed = True
        for results in self._open:
            results.close()
        self._open.clear()

    def join(self) -> None:
        pass

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor on the fleet: `submit` returns a Future, so
    `as_completed` and `wait` work as with a process pool.

    Calls are gathered into batches behind the scenes (a job per function, fed as calls
    come), so a loop of a million submits costs thousands of messages, not a million.
    `max_batch`: the most calls in one batch."""

    def __init__(
        self, *, stack: str | None = None, progress: bool = False, max_batch: int = 10_000
    ) -> None:
        self._config = settings(stack)
        self._progress = progress
        self._max_batch = batch_size_of(max_batch) or 10_000
        self._feeds: dict[str, tuple[FeedSource, StreamJob, threading.Thread]] = {}
        self._names: dict[int, tuple[Any, str]] = {}
        self._maps: list[Results] = []
        self._lock = threading.Lock()
        self._shutdown = False

    def _name(self, fn: Any) -> str:
        known = self._names.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        name = STARSTAR + task_name(fn)
        self._names[id(fn)] = (fn, name)
        return name

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        name = self._name(fn)
        item = [list(args), kwargs]
        check_json([item], 0, BadInput)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            feed = self._feeds.get(name) or self._open_feed(name)
            feed[0].put(future, item)
        return future

    def _open_feed(self, name: str) -> tuple[FeedSource, StreamJob, threading.Thread]:
        holder: list[StreamJob] = []
        source = FeedSource(
            name, lambda: holder[0].launcher.slots() if holder else 1, self._max_batch
        )
        job = StreamJob(
            self._config,
            name,
            source,
            JobOptions(batch_size=self._max_batch, bare=True),
            self._progress,
        )
        holder.append(job)
        reader = threading.Thread(
            target=self._read, args=(source, job), name=f"fleet-futures-{name}", daemon=True
        )
        reader.start()
        self._feeds[name] = (source, job, reader)
        return self._feeds[name]

    @staticmethod
    def _read(source: FeedSource, job: StreamJob) -> None:
        """Resolve each batch's futures as its lines come."""
        while True:
            got = job.inbox.get()
            if isinstance(got, End):
                try:
                    raise_end(got, job)
                    why: BaseException = Cancelled("the executor was shut down")
                except BaseException as exc:
                    why = exc
                for future in source.orphans():
                    if not future.done():
                        with contextlib.suppress(concurrent.futures.InvalidStateError):
                            future.set_exception(why)
                return
            batch, lines, errors = got
            futures, items = source.take_tags(batch)
            results, failed = bare_values(lines, errors)
            failed_at = dict(failed)
            for i, (future, result) in enumerate(zip(futures, results, strict=True)):
                error = failed_at.get(i)
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(remote_exception(error, items[i]))
            job.inbox.taken += 1

    def map(  # lazy and bounded, and chunksize may be "auto"
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | str | None = "auto",
    ) -> Results:
        """fn over the items (or, with several iterables, their tuples), in order: a job of
        its own, its items read as it goes (unlike the standard Executor, which collects
        them first). `timeout`: TimeoutError once the results take longer in all."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        star = "" if len(iterables) == 1 else STAR
        items = iterables[0] if len(iterables) == 1 else zip(*iterables, strict=False)
        name = star + task_name(fn)
        results = _values(name, items, chunksize, self._progress, self._config, True, timeout)
        self._maps.append(results)
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            feeds = list(self._feeds.values())
        for source, _, _ in feeds:
            source.close(cancel=cancel_futures)
        for results in self._maps:
            results.close()
        if wait:
            for _, job, reader in feeds:
                job.thread.join()
                reader.join()


class Job:
    """A job that lives in the fleet (`fleet.submit`), seen from any machine that reaches
    its fleet: what `fleet jobs`, `wait`, `results` and `cancel` do, from Python."""

    def __init__(self, job: str, config: Settings, store: Any = None) -> None:
        from app.store import open_store

        self.id = job
        self._config = config
        self._store = store if store is not None else open_store(config)

    def __repr__(self) -> str:
        return f"<fleet.Job {self.id}>"

    def progress(self) -> JobView:
        """Its state now: state, items done of total, errors, rate, eta_seconds, ..."""
        from app.launcher.jobs import known

        return known(self._store, self._config, self.id)

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> JobView:
        """Block until it ends. TimeoutError past `timeout`; Cancelled if it was cancelled;
        JobError if it failed (its reason) or its `fleet run` launcher is gone."""
        from app.launcher import jobs

        view = jobs.wait(self._store, self._config, self.id, poll=poll, timeout=timeout)
        if view.state == "cancelled":
            raise Cancelled(f"job {self.id} was cancelled.")
        if view.state == "failed":
            raise JobError(f"job {self.id} failed: {view.reason or 'see `fleet jobs`'}")
        if view.state == "stopped":
            raise JobError(f"job {self.id} stopped: the `fleet run` launcher driving it is gone.")
        if view.state not in jobs.ENDED:
            raise TimeoutError(f"job {self.id} is still {view.state} after {timeout} s.")
        return view

    def results(self, return_exceptions: bool = False) -> Iterator[tuple[Any, Any]]:
        """(item, result) pairs of the batches written so far, in batch order, from the
        result store or an S3 sink's parts; an item's error raised, or with
        `return_exceptions` given in place of its result."""
        from app.launcher import jobs

        for chunk in jobs.results(self._store, self._config, self.id):
            for record in records(chunk):
                if record.error is not None:
                    exc = remote_exception(record.error, record.id)
                    if not return_exceptions:
                        raise exc
                    yield record.id, exc
                else:
                    yield record.id, record.result

    def cancel(self, timeout: float = 60.0) -> JobView:
        """Stop it: its queued batches are dropped unrun; returns once none runs."""
        from app.launcher import jobs

        return jobs.cancel(self._store, self._config, self.id, timeout=timeout)


def submit(
    func: Callable[..., Any] | str,
    ids: str | Iterable[str | int],
    *,
    out: str | None = None,
    chunksize: int | str | None = "auto",
    target_seconds: float = 2.0,
    reduce: str | None = None,
    stack: str | None = None,
) -> Job:
    """Hand a job to the fleet, which drives it (this process may go away), and return its
    handle. `ids`: an ID source as `fleet submit --ids` takes it (a file, s3://BUCKET/KEY,
    range:START:STOP), or an iterable of str or int IDs (uploaded to the result store).
    `out`: s3://BUCKET/PREFIX/ or postgresql://...?table=NAME; None keeps the results in
    the result store, for `job.results()`."""
    from app.launcher import InputError, Launcher, Source
    from app.launcher.driver import submit as submit_job
    from app.sinks import BadSink, sink_spec

    name = task_name(func)
    config = settings(stack)
    try:
        spec = sink_spec(out)
    except BadSink as exc:
        raise BadInput(str(exc)) from None
    if out and not spec:
        raise BadInput(
            f"out={out!r}: a submitted job's results stay in the fleet: give "
            "s3://BUCKET/PREFIX/, postgresql://...?table=NAME, or None (then job.results())."
        )
    opts = JobOptions(
        task=name,
        batch_size=batch_size_of(chunksize),
        target_seconds=target_seconds,
        sink=spec,
        reduce=reduce,
        progress=False,
    )
    launcher = Launcher(config)
    try:
        if isinstance(ids, str):
            opts.source = Source.parse(ids)
            return Job(submit_job(launcher, opts), config)
        with tempfile.TemporaryDirectory(prefix="fleet-submit-") as tmp:
            path = Path(tmp) / "ids.jsonl"
            _write_ids(ids, path)
            opts.source = Source.parse(str(path), "jsonl", field="id")
            return Job(submit_job(launcher, opts), config)
    except InputError as exc:
        raise BadInput(str(exc)) from None


def _write_ids(ids: Iterable[Any], path: Path) -> None:
    from app.launcher.stream import _encode

    with path.open("wb") as f:
        for n, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, str | int):
                raise BadInput(
                    f"ID {n} ({i!r}) is a {type(i).__name__}: a submitted job's IDs are str or "
                    "int (fleet.map takes any JSON items)."
                )
            f.write(b'{"id":%s}\n' % _encode(i))


def jobs(stack: str | None = None) -> list[Job]:
    """Every job the fleet's result store holds, oldest first; each with `.view`, its
    state when listed."""
    from app.launcher.jobs import views
    from app.store import open_store

    config = settings(stack)
    store = open_store(config)
    out = []
    for view in views(store, config):
        job = Job(view.job, config, store)
        job.view = view  # type: ignore[attr-defined]
        out.append(job)
    return out


def register_joblib() -> None:
    """Make "fleet" a joblib backend: `with joblib.parallel_backend("fleet"): ...`."""
    from app.launcher.joblib_backend import register

    register(Executor)
