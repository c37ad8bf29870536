"""The job launcher: the Python API behind `fleet run`.

    from app.launcher import JobOptions, Launcher, Source
    summary = Launcher(settings).run(JobOptions(task="process_id", source=Source.parse("ids.txt")))

A job streams its IDs into batches (sized by a short calibration), keeps a
bounded number of batches on the broker, and writes each batch's JSON lines
to the output as the workers commit them. The output is journaled in the
result store, so `resume` re-sends only the batches that have no result and
never writes a batch twice.

Lost batches are found without waiting for the broker's visibility timeout:
a running batch holds a lease in the result store. A batch whose lease
lapsed, or one that has not started while worker slots sit idle, is sent
again; the first commit wins, so a batch that then runs twice is written once.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import kombu.exceptions
import msgspec
from kombu.utils.uuid import uuid

from app.batch import expand, pack
from app.celery_config import make_app
from app.launcher.dispatch import Dispatch, Steering, driver_lease, interrupt_guard
from app.launcher.job import (
    BadInput,
    JobOptions,
    JobSummary,
    Unreachable,
    VersionMismatch,
    new_job_id,
    reducer,
)
from app.launcher.metrics import StackMetrics
from app.launcher.output import Progress, check_writable, no_output, open_output, say
from app.launcher.plan import BatchPlan, batch_size, message_cap, probe_count
from app.launcher.sources import InputError, Source
from app.launcher.versions import CodeVersions
from app.registry import resolve
from app.settings import Settings, redact
from app.sinks import BadSink, Sink, open_sink, sink_label
from app.store import StoreUnavailable, bit_is_set, open_store

_encode = msgspec.json.Encoder().encode


class Stopped(Exception):
    """A driver in the fleet stops calibrating: the job was cancelled or is handed over."""


class Launcher:
    def __init__(self, settings: Settings, celery: Any = None) -> None:
        """`celery`: the app to publish with (a worker's own, for a driver in the fleet)."""
        self.settings = settings
        self.store = open_store(settings)
        self._metrics = StackMetrics(settings.stack or "", settings.aws_region)
        self.celery = celery if celery is not None else make_app(settings)
        # The heartbeats of the queue's workers, and when they were read (cached for 2 s).
        self._workers: tuple[float, list[dict[str, Any]]] = (-1e9, [])
        # A streamed source (stdin) is read once: calibration leaves the rest
        # of the stream here, its probe batches first, for the job to go on with.
        self._stream: Iterator[Any] | None = None
        self.job: str | None = None  # the job of the last `run`, once it has an ID

    # -- checks -----------------------------------------------------------

    def check_connections(self) -> None:
        try:
            self.store.ping()
        except StoreUnavailable as exc:
            raise Unreachable(str(exc)) from None
        conn = self.celery.connection_for_write()
        try:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
        except Exception as exc:
            raise Unreachable(
                f"cannot reach the broker at {redact(self.settings.broker_url)}: {exc}"
            ) from None
        finally:
            conn.release()

    def check_code(self, require: bool) -> CodeVersions:
        """Compare the code of the workers online with each other and with what was
        deployed: a warning, or with `require` a VersionMismatch."""
        versions = CodeVersions.of(self.workers(), self.settings.code_version)
        problem = versions.problem()
        if problem and require:
            raise VersionMismatch(f"{problem} Not started (--require-version).")
        if problem:
            say(f"warning: {problem}")
        return versions

    def _lost_store(self, job: str, opts: JobOptions, exc: BaseException) -> Unreachable:
        """The result store is gone for good mid-job (its client's retries gave up)."""
        if opts.sink:  # a resumed job writes where it wrote: no --out to give
            where, resume = sink_label(opts.sink), f"fleet run --resume {job}"
        else:
            where = "standard output" if str(opts.out) == "-" else str(opts.out)
            resume = f"fleet run --resume {job} --out {opts.out}"
        why = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        return Unreachable(
            f"lost the result store at {redact(self.settings.result_url)} during job {job}: "
            f"{why}. What was written is in {where}; once the store is back with its data, "
            f"`{resume}` goes on from there."
        )

    def workers(self) -> list[dict[str, Any]]:
        """The heartbeats of the workers consuming this queue now (cached for 2 s)."""
        at, workers = self._workers
        now = time.monotonic()
        if now - at > 2.0:
            queue = self.settings.queue
            workers = [w for w in self.store.workers() if w.get("queue", queue) == queue]
            self._workers = (now, workers)
        return workers

    def slots(self) -> int:
        """Worker processes consuming this queue now."""
        return sum(int(w.get("concurrency", 0)) for w in self.workers())

    def idle_slots(self) -> int:
        """Worker processes running no batch, as their workers' heartbeats say."""
        return sum(
            max(0, int(w.get("concurrency", 0)) - int(w.get("active") or 0)) for w in self.workers()
        )

    # -- publishing -------------------------------------------------------

    def encode(self, job: str, batch: int, task: str, payload: Any) -> bytes:
        """The Celery protocol-2 body of a batch message, encoded once.

        Kept as bytes while the batch is in flight: compact, and a re-send
        costs no encoding.
        """
        return _encode(
            [
                [job, batch, task, pack(payload)],
                {},
                {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
            ]
        )

    def send(self, job: str, batch: int, body: bytes) -> None:
        self.send_many(job, [(batch, body)])

    def send_many(self, job: str, batches: Sequence[tuple[int, bytes]]) -> None:
        """Publish the batches' messages, in one round trip where the broker allows it.

        kombu's publish batches put a Redis broker's messages in one pipeline; other
        transports publish each at once. A broker lost while they go out: each is
        published again with the retrying publish. Some may then be on the broker
        twice, which costs a skipped redelivery, not a result (the first commit wins).
        """
        if not batches:
            return
        try:
            with self.celery.producer_or_acquire() as producer:
                # A pipeline that failed is BatchPublishError: some of it may be delivered.
                lost = (
                    kombu.exceptions.BatchPublishError,
                    kombu.exceptions.OperationalError,
                    *producer.connection.connection_errors,
                )
                try:
                    with producer.batch(max_size=len(batches)):
                        for i, (batch, body) in enumerate(batches):
                            # The queue is declared with the first (kombu remembers it).
                            self._publish(producer, job, batch, body, retry=False, declare=not i)
                except lost:
                    for batch, body in batches:
                        self._publish(producer, job, batch, body, retry=True, declare=True)
        except kombu.exceptions.OperationalError as exc:
            raise Unreachable(
                f"lost the broker at {redact(self.settings.broker_url)}: {exc}"
            ) from None

    def _publish(
        self, producer: Any, job: str, batch: int, body: bytes, retry: bool, declare: bool
    ) -> None:
        amqp = self.celery.amqp
        # Celery would build the body and a repr of the arguments itself; both
        # cost more than the batch for a large list of IDs.
        message = amqp.create_task_message(
            uuid(),
            "fleet.batch",
            (),
            {},
            argsrepr=f"[{job!r}, {batch}, ...]",
            kwargsrepr="{}",
            # The header overrides the task's own ignore_result, and Celery's default
            # (False) would have every worker store each batch's return value in the
            # result backend: two more store round trips per batch, and a write that
            # fails outside the batch (a store cut off as the batch ends) whose
            # failure Celery's pool could lose track of.
            ignore_result=True,
        )._replace(body=body)
        amqp.send_task_message(
            producer,
            "fleet.batch",
            message,
            queue=self.settings.queue,
            retry=retry,
            # About a minute of retrying rides out a broker restart.
            retry_policy={
                "max_retries": 30,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": 2.0,
            },
            content_type="application/json",
            content_encoding="utf-8",
            declare=None if declare else [],
        )

    def advertise_backlog(self, job: str, batches: int, completed: int = 0) -> None:
        """Tell the autoscaler how many batches this job still holds back from the broker.

        Only a few batches per slot are on the broker at a time, so its queue
        alone would hide a long job and a fleet scaled on it could grow no
        faster than the slots it has (see app/autoscale.py). `completed`:
        batches written since the last call, for the stack's dashboard.
        """
        self.store.advertise_backlog(
            self.settings.queue, job, batches, max(5.0, 3 * self.settings.lease_seconds)
        )
        if self.settings.stack:
            self._metrics.publish(batches, completed)

    # -- the job ----------------------------------------------------------

    def run(
        self, opts: JobOptions, inbox: Any = None, stop: threading.Event | None = None
    ) -> JobSummary:
        """Run a job to its end. `inbox`: where each batch's lines go instead of `opts.out`
        (app.fleet: an object with write_batch(batch, lines, errors), unread() and flush());
        `stop`: set, the job stops at its next tick (within a second) as if interrupted."""
        started = time.monotonic()
        if opts.resume:
            self.check_connections()
            self.check_code(opts.require_version)
            job, meta = opts.resume, self._resume_meta(opts)
        else:
            # Input and output first: a bad file costs no broker round trip
            # and no calibration.
            total = self._count(opts)
            if opts.reduce:
                reducer(opts.reduce)
            if opts.sink:
                self.sink(opts.sink, check=True)
            else:
                check_writable(opts.out)
            self.check_connections()
            self.check_code(opts.require_version)
            job, meta = self._new_job(opts, total)
        lost: tuple[type[BaseException], ...] = (StoreUnavailable, *self.store.connection_errors)
        steering = None
        if stop is not None:
            lease = driver_lease(self.settings.lease_seconds)
            steering = Steering(self.store, job, launcher_holder(), lease, stop=stop)
        # A new job's source is read as given: a Python iterable (app.fleet) exists only here.
        source = None if opts.resume else opts.source
        try:
            return self._dispatch(job, meta, opts, started, steering, source, inbox)
        except lost as exc:
            raise self._lost_store(job, opts, exc) from None

    def sink(self, spec: dict[str, Any], check: bool = False) -> Sink:
        """The sink of `spec` (with `check`, tried: it can take the job's results); BadInput
        if it cannot."""
        try:
            sink = open_sink(spec, self.settings, self.store)
            if check:
                sink.check()
        except BadSink as exc:
            raise BadInput(str(exc)) from None
        return sink

    def _dispatch(
        self,
        job: str,
        meta: dict[str, Any],
        opts: JobOptions,
        started: float,
        steering: Steering | None = None,
        source: Source | None = None,
        inbox: Any = None,
    ) -> JobSummary:
        """Send the job's batches and write their results, until done, interrupted,
        cancelled or (a driver in the fleet) handed over. `source`: where the IDs of
        the job's source are read (a fetched copy of one uploaded to the store)."""
        task = meta["task"]
        source = source or Source.from_meta(meta["source"])
        plan = BatchPlan.from_meta(meta["layout"], meta.get("total"))
        committed_bits, written_bits, offset, items, errors = self.store.journal(job)
        spec = meta.get("sink")
        in_fleet = meta.get("driver") == "fleet"
        out, out_path = self._output(opts, bool(spec or in_fleet), offset, inbox)
        if steering is None:
            steering = Steering(
                self.store, job, launcher_holder(), driver_lease(self.settings.lease_seconds)
            )
        # The batches grow with the fleet only in a job's first run. A later one (a resume,
        # a driver taking over) cannot know every batch an earlier run sent, and a size
        # of its own from a batch on could cut some of those anew: IDs twice or never.
        first_run = not opts.resume and not meta.get("runs") and "sent" not in meta
        meta["runs"] = int(meta.get("runs", 0)) + 1
        self.store.put_meta(job, meta)
        progress = Progress(items, errors)
        if opts.progress:
            progress.show(meta.get("total"), job)
        run = Dispatch(
            self,
            job,
            task,
            opts,
            out,
            out_path,
            progress,
            plan.count(),
            steering=steering,
            sent_before=int(meta.get("sent", 0)) if in_fleet else 0,
            keep=in_fleet and not spec,
            meta=meta,
            # A stream read once (stdin) is cut by its own sizes, which do not grow.
            plan=plan if first_run and self._stream is None else None,
        )
        try:
            with interrupt_guard() as interrupted:
                stream, self._stream = self._stream, None
                run.loop(
                    stream if stream is not None else source.batches(plan.sizes()),
                    written_bits,
                    committed_bits,
                    interrupted,
                )
        finally:
            # Best effort: the entry lapses by itself if the store is gone.
            with contextlib.suppress(Exception):
                self.advertise_backlog(job, 0, run.unreported)
            with contextlib.suppress(Exception):
                steering.release()
            progress.close()
            if out_path is None and not (spec or in_fleet):
                out.flush()  # standard output: not ours to close
            else:
                out.close()
        if steering.why == "cancelled":
            status = "cancelled"
        elif run.interrupted:
            status = "interrupted"
        else:
            status = "errors" if progress.errors else "ok"
        summary = JobSummary(
            job=job,
            status=status,
            items=progress.items,
            errors=progress.errors,
            batches=run.batches or 0,
            resent=run.resent,
            wall_seconds=time.monotonic() - started,
            out=sink_label(spec) if spec else out_path or ("store" if in_fleet else "-"),
            seconds_per_item=meta.get("seconds_per_item"),
            batch_seconds=round(run.batch_seconds, 3),
        )
        if in_fleet and status == "interrupted":
            return summary  # handed over: the job runs on under its next driver
        if spec and status in ("ok", "errors"):
            self.sink(spec).finish(job, run.batches or 0, progress.items, progress.errors)
        if meta.get("reduce") and status in ("ok", "errors"):
            meta["reduced"] = summary.reduced = self.reduce(job, meta["reduce"])
        meta.update(status=status, batches=run.batches or 0, finished=time.time())
        self.store.put_meta(job, meta)
        return summary

    @staticmethod
    def _output(
        opts: JobOptions, elsewhere: bool, offset: int | None, inbox: Any
    ) -> tuple[Any, str | None]:
        """Where the job's lines go, and its path (None: not a file of ours)."""
        if inbox is not None:  # a Python caller reads them (app.fleet)
            return inbox, None
        if elsewhere:  # the workers write the results, or they stay in the store
            return no_output(), None
        return open_output(opts.out, (offset or 0) if opts.resume else None)

    def reduce(self, job: str, name: str) -> Any:
        """The partials of the job's batches folded in batch order (None: no result at all).
        Each batch's partial is kept with its commit, so a batch run twice counts once.

        Driving in the fleet (a worker's app), the name read from the job resolves as the
        workers resolve it, among their task modules only."""
        modules = getattr(self.celery, "fleet_task_modules", None)
        fn: Any
        if getattr(self.celery, "fleet_driver", False) and modules is not None:
            fn = resolve(name, modules).fn
        else:
            fn = reducer(name)
        partials = self.store.partials(job)
        values = [partials[b] for b in sorted(partials)]
        return functools.reduce(fn, values) if values else None

    @staticmethod
    def _count(opts: JobOptions) -> int | None:
        if not opts.task or opts.source is None:
            raise BadInput("a new job needs a task and an ID source.")
        try:
            return opts.source.count()
        except InputError as exc:
            raise BadInput(str(exc)) from None

    def _new_job(self, opts: JobOptions, total: int | None) -> tuple[str, dict[str, Any]]:
        assert opts.task and opts.source is not None
        job = self.job = new_job_id()
        meta: dict[str, Any] = {
            "task": opts.task,
            "source": opts.source.as_meta(),
            "total": total,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "out": sink_label(opts.sink) if opts.sink else str(opts.out) if opts.out else "-",
            "status": "running",
            "started": time.time(),
        }
        if opts.sink or opts.reduce or opts.bare:
            # Before the probes: the workers read the sink, the reducer and the form of the
            # lines of every batch here.
            if opts.sink:
                meta["sink"] = opts.sink
            if opts.reduce:
                meta["reduce"] = opts.reduce
            if opts.bare:
                meta["records"] = "values"
            self.store.put_meta(job, meta)
        if opts.batch_size:
            meta["layout"] = {"probe": [], "size": opts.batch_size}
        else:
            meta["layout"], meta["seconds_per_item"] = self._calibrate(job, opts, total)
        self.store.put_meta(job, meta)
        say(
            f"job {job}: {total if total is not None else 'streamed'} IDs from "
            f"{opts.source.spec}, task {opts.task}, batches of {meta['layout']['size']}"
        )
        return job, meta

    def _resume_meta(self, opts: JobOptions) -> dict[str, Any]:
        meta = self.store.get_meta(opts.resume or "")
        if meta is None:
            raise BadInput(
                f"no job {opts.resume!r} in the result store at "
                f"{redact(self.settings.result_url)} (wrong store, or expired)."
            )
        if opts.task and opts.task != meta["task"]:
            raise BadInput(f"job {opts.resume} ran task {meta['task']!r}, not {opts.task!r}.")
        if opts.source and opts.source.spec != meta["source"]["spec"]:
            raise BadInput(
                f"job {opts.resume} read IDs from {meta['source']['spec']}, not {opts.source.spec}."
            )
        if meta.get("driver") == "fleet":
            raise BadInput(
                f"job {opts.resume} was submitted: its driver runs in the fleet and resumes "
                f"by itself. See it with `fleet jobs`; wait for it with `fleet wait {opts.resume}`."
            )
        if meta["source"]["spec"] == "-":
            raise BadInput(f"job {opts.resume} read its IDs from stdin, which cannot be re-read.")
        if meta["source"]["fmt"] == "items":
            raise BadInput(
                f"job {opts.resume} read its items from a Python iterable (app.fleet), which "
                "cannot be re-read: run it again from Python."
            )
        say(f"resuming job {opts.resume}: task {meta['task']}, IDs from {meta['source']['spec']}")
        return meta

    # -- calibration ------------------------------------------------------

    def _calibrate(
        self, job: str, opts: JobOptions, total: int | None, steering: Steering | None = None
    ) -> tuple[dict[str, Any], float]:
        """Run one-ID batches on up to one slot each, and size batches from their timing.

        The probes are the job's first batches, so nothing is computed twice.
        The plan and the fastest probe's seconds per item are returned.
        """
        assert opts.source is not None and opts.task
        slots = max(1, self.slots())
        probe = (1,) * probe_count(slots, total)
        size_after: list[int] = []  # set once calibrated; read lazily by the stream

        def sizes() -> Iterator[int]:
            yield from probe
            while True:
                yield size_after[0]

        stream = opts.source.batches(sizes())
        payloads = list(zip(range(len(probe)), stream, strict=False))
        if not payloads:  # only stdin gets here: files are counted first
            raise BadInput(f"{'stdin' if opts.source.streamed else opts.source.spec} holds no IDs.")
        for batch, payload in payloads:
            self.send(job, batch, self.encode(job, batch, opts.task, payload))
        timings = self._wait_for_probes(
            job, {b for b, _ in payloads}, (total or 0) - len(payloads), steering
        )
        # The probes are committed now; the main loop writes them like any
        # batch found committed on resume.
        # The fastest probe: a probe slowed by a busy neighbour or a cold
        # process says nothing about the work itself.
        # No timing at all: a driver that took over found every probe done by its
        # predecessor; a hundredth of a second per item is then assumed.
        per_item = max(min(timings), 1e-7) if timings else 0.01
        ranged = opts.source.fmt == "range"  # ranges travel as two numbers, whatever their size
        sample = [i for _, p in payloads for i in expand(p)] if opts.source.streamed else None
        bytes_each = 8 if ranged else id_bytes(opts.source, sample)
        size = batch_size(
            per_item,
            opts.target_seconds,
            total,
            slots,
            max_batch_seconds=self.settings.max_batch_seconds,
            message_limit=None if ranged else self.settings.message_limit,
            id_bytes=bytes_each,
        )
        if opts.source.streamed:
            # stdin cannot be read again: go on from where the probes stopped.
            size_after.append(size)
            self._stream = itertools.chain((p for _, p in payloads), stream)
        # stdin's length is unknown: no finer last wave.
        tail = 0 if opts.source.streamed else slots
        # The batches may grow with the fleet later (Dispatch.grow), never past this.
        most = None if ranged else message_cap(self.settings.message_limit, bytes_each)
        return BatchPlan(probe, size, total, tail, most=most).as_meta(), per_item

    def _wait_for_probes(
        self, job: str, pending: set[int], left: int, steering: Steering | None = None
    ) -> list[float]:
        """Seconds per item of each probe batch, once all of `pending` are committed.

        With `steering` (a driver in the fleet, which may have taken over from one that
        died while it calibrated): a probe found committed without its announcement (read
        by the driver before) counts as done with no timing; a cancel or a hand-over stops
        the wait (Stopped)."""
        timings: list[float] = []
        waited = time.monotonic()
        while pending:
            if steering is not None:
                if steering.check():
                    raise Stopped(steering.why)
                committed = self.store.journal(job)[0]
                pending -= {b for b in pending if bit_is_set(committed, b)}
                if not pending:
                    break
            # The batch size is not known yet: count each ID left as a batch (an
            # upper bound), so a long job scales out while its probes wait.
            self.advertise_backlog(job, left)
            for done in self.store.wait_done(job, timeout=1.0):
                if done.refused:
                    self.store.cancel(job)
                    raise BadInput(done.refused)
                if done.batch in pending:
                    pending.discard(done.batch)
                    timings.append(done.seconds / max(done.items, 1))
            if pending and time.monotonic() - waited > 10 and not self.slots():
                say("waiting for a worker to come up...")
                waited = time.monotonic()
        return timings


def launcher_holder() -> str:
    """How a launcher names itself as its job's driver (`fleet jobs` shows it)."""
    return f"fleet-run@{socket.gethostname()}:{os.getpid()}"


def id_bytes(source: Source, sample: list[Any] | None = None) -> int:
    """A generous size of one ID in a JSON message, from the first IDs (or `sample`)."""
    if sample is None:
        sample = list(expand(next(source.batches(iter((1000,))), [])))
    encoded = sum(len(str(i)) + 4 for i in sample)
    return max(8, math.ceil(encoded / max(len(sample), 1)))
