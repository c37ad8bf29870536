"""The job launcher: the Python API behind `fleet run`.

    from app.jobs import Launcher, JobOptions
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
import itertools
import math
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import kombu.exceptions
import msgspec
from kombu.utils.uuid import uuid

from app.batch import MAX_BATCH_ITEMS, expand, pack
from app.celery_config import make_app
from app.settings import Settings, redact
from app.sources import InputError, Source
from app.store import StoreUnavailable, bit_is_set, open_store

BATCHES_PER_SLOT = 4  # at least this many batches per worker slot, so the tail stays short
PROBE_LIMIT = 32  # calibration batches at the most
WRITE_CHUNK = 8  # batch results fetched per round trip
_encode = msgspec.json.Encoder().encode


class JobError(Exception):
    """A job that cannot start or cannot finish; `exit_code` is what `fleet run` returns."""

    exit_code = 1


class BadInput(JobError):
    exit_code = 2


class Unreachable(JobError):
    exit_code = 3


@dataclass(frozen=True)
class Layout:
    """How the ID stream is cut into batches: `probe` sizes first, then `size` each.

    With the total known and `tail` slots, the last wave (about `tail` x
    `size` IDs) is cut finer, each batch a 1/(share x tail) of what is left
    and no smaller than `floor` (guided self-scheduling): the slots then
    finish within a small batch of each other, not a whole one apart. The
    layout is kept with the job, so a resumed job cuts its IDs the same way.

    share 1 and floor size/16 cut the wave into fewer batches than share 2
    and floor size/8 did (a 4,000-ID job on two slots: 14 batches, not 18).
    Each batch costs its worker a few milliseconds (the broker's round trip,
    the store's commit), which finer cuts pay more often than they save on
    the finish. Jobs stored without these fields were cut with share 2 and
    floor size/8.
    """

    probe: tuple[int, ...]
    size: int
    total: int | None = None
    tail: int = 0
    share: int = 1
    floor: int | None = None  # None: size // 16

    @classmethod
    def from_meta(cls, layout: dict[str, Any], total: int | None) -> Layout:
        """The layout kept with a job (see as_meta)."""
        size = layout["size"]
        return cls(tuple(layout["probe"]), size, total, layout.get("tail", 0),
                   layout.get("share", 2), layout.get("floor", max(1, size // 8)))

    def as_meta(self) -> dict[str, Any]:
        return {"probe": list(self.probe), "size": self.size, "tail": self.tail,
                "share": self.share, "floor": self._floor()}

    def _floor(self) -> int:
        return max(1, self.size // 16 if self.floor is None else self.floor)

    def sizes(self) -> Iterator[int]:
        yield from self.probe
        if self.total is not None and self.tail:
            body, last = self._split()
            yield from itertools.repeat(self.size, body)
            yield from self._tail(last)
        while True:  # streams of unknown length, and past the end
            yield self.size

    def count(self) -> int | None:
        """How many batches the total is cut into (None when the total is unknown)."""
        if self.total is None:
            return None
        count, left = 0, self.total
        for size in self.probe:
            if left <= 0:
                return count
            count, left = count + 1, left - size
        if not self.tail:
            return count + max(0, math.ceil(left / self.size))
        body, last = self._split()
        return count + body + sum(1 for _ in self._tail(last))

    def _split(self) -> tuple[int, int]:
        """Whole batches before the last wave, and the IDs left for it."""
        assert self.total is not None
        left = max(0, self.total - sum(self.probe))
        body = max(0, left - self.tail * self.size) // self.size
        return body, left - body * self.size

    def _tail(self, left: int) -> Iterator[int]:
        floor, parts = self._floor(), self.share * self.tail
        while left > 0:
            n = min(left, self.size, max(floor, math.ceil(left / parts)))
            left -= n
            yield n


@dataclass
class JobOptions:
    task: str | None = None  # None only with resume: taken from the job
    source: Source | None = None
    batch_size: int | None = None  # None: calibrate
    target_seconds: float = 2.0  # aimed-at duration of one batch
    max_in_flight: int | None = None  # None: twice the worker slots
    out: Path | None = None  # None: stdout
    resume: str | None = None
    progress: bool = True


@dataclass
class JobSummary:
    job: str
    status: str  # "ok", "errors" (some items failed) or "interrupted"
    items: int
    errors: int
    batches: int
    resent: int
    wall_seconds: float
    out: str
    seconds_per_item: float | None = None

    @property
    def items_per_second(self) -> float:
        return self.items / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "items_per_second": round(self.items_per_second, 1)}


@dataclass
class _InFlight:
    body: bytes  # the encoded message, ready to send again
    sent_at: float
    seen_running: float = 0.0  # last time its lease was seen, 0 if never


@dataclass
class _Progress:
    items: int = 0
    errors: int = 0
    bar: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, items: int, errors: int) -> None:
        self.items += items
        self.errors += errors
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix(errors=self.errors, **self.extra, refresh=False)


def new_job_id() -> str:
    return f"j{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self._metrics = StackMetrics(settings.stack or "", settings.aws_region)
        self.celery = make_app(settings)
        self._slots_cache = (0.0, 0)
        # A streamed source (stdin) is read once: calibration leaves the rest
        # of the stream here, its probe batches first, for the job to go on with.
        self._stream: Iterator[Any] | None = None

    # -- checks -----------------------------------------------------------

    def check_connections(self) -> None:
        try:
            self.store.ping()
        except StoreUnavailable as exc:
            raise Unreachable(str(exc)) from None
        conn = self.celery.connection_for_write()
        try:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5,
                                   timeout=5)
        except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
            raise Unreachable(
                f"cannot reach the broker at {redact(self.settings.broker_url)}: {exc}"
            ) from None
        finally:
            conn.release()

    def slots(self) -> int:
        """Worker processes consuming this queue now (cached for 2 s)."""
        at, n = self._slots_cache
        now = time.monotonic()
        if now - at > 2.0:
            n = sum(int(w.get("concurrency", 0)) for w in self.store.workers()
                    if w.get("queue", self.settings.queue) == self.settings.queue)
            self._slots_cache = (now, n)
        return n

    # -- publishing -------------------------------------------------------

    def encode(self, job: str, batch: int, task: str, payload: Any) -> bytes:
        """The Celery protocol-2 body of a batch message, encoded once.

        Kept as bytes while the batch is in flight: compact, and a re-send
        costs no encoding.
        """
        return _encode([[job, batch, task, pack(payload)], {},
                        {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])

    def send(self, job: str, batch: int, body: bytes) -> None:
        amqp = self.celery.amqp
        # Celery would build the body and a repr of the arguments itself; both
        # cost more than the batch for a large list of IDs.
        message = amqp.create_task_message(
            uuid(), "fleet.batch", (), {}, argsrepr=f"[{job!r}, {batch}, ...]", kwargsrepr="{}",
        )._replace(body=body)
        try:
            with self.celery.producer_or_acquire() as producer:
                amqp.send_task_message(
                    producer, "fleet.batch", message, queue=self.settings.queue, retry=True,
                    # About a minute of retrying rides out a broker restart.
                    retry_policy={"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5,
                                  "interval_max": 2.0},
                    content_type="application/json", content_encoding="utf-8",
                )
        except kombu.exceptions.OperationalError as exc:
            raise Unreachable(
                f"lost the broker at {redact(self.settings.broker_url)}: {exc}"
            ) from None

    def advertise_backlog(self, job: str, batches: int, completed: int = 0) -> None:
        """Tell the autoscaler how many batches this job still holds back from the broker.

        Only a few batches per slot are on the broker at a time, so its queue
        alone would hide a long job and a fleet scaled on it could grow no
        faster than the slots it has (see app/autoscale.py). `completed`:
        batches written since the last call, for the stack's dashboard.
        """
        self.store.advertise_backlog(self.settings.queue, job, batches,
                                     max(5.0, 3 * self.settings.lease_seconds))
        if self.settings.stack:
            self._metrics.publish(batches, completed)

    # -- the job ----------------------------------------------------------

    def run(self, opts: JobOptions) -> JobSummary:
        started = time.monotonic()
        if opts.resume:
            self.check_connections()
            job, meta = opts.resume, self._resume_meta(opts)
        else:
            # Input and output first: a bad file costs no broker round trip
            # and no calibration.
            total = self._count(opts)
            _check_writable(opts.out)
            self.check_connections()
            job, meta = self._new_job(opts, total)
        task, source = meta["task"], Source.from_meta(meta["source"])
        layout = Layout.from_meta(meta["layout"], meta.get("total"))
        committed_bits, written_bits, offset, items, errors = self.store.journal(job)
        out, out_path = self._open_output(opts.out, (offset or 0) if opts.resume else None)
        progress = _Progress(items, errors)
        if opts.progress:
            from tqdm import tqdm  # imported only when shown: it costs start-up time

            progress.bar = tqdm(
                total=meta.get("total"), initial=progress.items, unit=" ids", unit_scale=True,
                file=sys.stderr, mininterval=0.5, smoothing=0.05, dynamic_ncols=True, desc=job,
            )
        run = _Run(self, job, task, opts, out, out_path, progress,
                   layout.count())
        try:
            with _interrupt_guard() as interrupted:
                stream, self._stream = self._stream, None
                run.loop(stream if stream is not None else source.batches(layout.sizes()),
                         written_bits, committed_bits,
                         interrupted)
        finally:
            # Best effort: the entry lapses by itself if the store is gone.
            with contextlib.suppress(Exception):
                self.advertise_backlog(job, 0, run.unreported)
            if progress.bar is not None:
                progress.bar.close()
            if out is not sys.stdout.buffer:
                out.close()
            else:
                out.flush()
        status = "interrupted" if run.interrupted else ("errors" if progress.errors else "ok")
        meta.update(status=status, batches=run.batches or 0)
        self.store.put_meta(job, meta)
        return JobSummary(
            job=job, status=status, items=progress.items, errors=progress.errors,
            batches=run.batches or 0, resent=run.resent,
            wall_seconds=time.monotonic() - started, out=out_path or "-",
            seconds_per_item=meta.get("seconds_per_item"),
        )

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
        job = new_job_id()
        meta: dict[str, Any] = {
            "task": opts.task, "source": opts.source.as_meta(), "total": total,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "out": str(opts.out) if opts.out else "-", "status": "running",
        }
        if opts.batch_size:
            meta["layout"] = {"probe": [], "size": opts.batch_size}
        else:
            meta["layout"], meta["seconds_per_item"] = self._calibrate(job, opts, total)
        self.store.put_meta(job, meta)
        say(f"job {job}: {total if total is not None else 'streamed'} IDs from "
            f"{opts.source.spec}, task {opts.task}, batches of {meta['layout']['size']}")
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
                f"job {opts.resume} read IDs from {meta['source']['spec']}, "
                f"not {opts.source.spec}."
            )
        if meta["source"]["spec"] == "-":
            raise BadInput(f"job {opts.resume} read its IDs from stdin, which cannot be re-read.")
        say(f"resuming job {opts.resume}: task {meta['task']}, IDs from {meta['source']['spec']}")
        return meta

    def _open_output(self, out: Path | None, offset: int | None) -> tuple[IO[bytes], str | None]:
        if out is None:
            return sys.stdout.buffer, None
        try:
            if offset is None:
                return open(out, "wb"), str(out)  # noqa: SIM115 - closed by run()
            handle = open(out, "r+b" if out.exists() else "wb")  # noqa: SIM115
        except OSError as exc:
            raise BadInput(f"cannot write {out}: {exc.strerror}.") from None
        # Lines past the journaled offset belong to batches not known as
        # written; they are written again, so drop them.
        handle.truncate(offset)
        handle.seek(offset)
        return handle, str(out)

    def _calibrate(self, job: str, opts: JobOptions,
                   total: int | None) -> tuple[dict[str, Any], float]:
        """Run one-ID batches on up to one slot each, and size batches from their timing.

        The probes are the job's first batches, so nothing is computed twice.
        """
        assert opts.source is not None and opts.task
        slots = max(1, self.slots())
        n_probe = min(slots, PROBE_LIMIT, total or PROBE_LIMIT)
        probe = (1,) * n_probe
        size_after: list[int] = []  # set once calibrated; read lazily by the stream

        def sizes() -> Iterator[int]:
            yield from probe
            while True:
                yield size_after[0]

        stream = opts.source.batches(sizes())
        payloads = list(zip(range(n_probe), stream, strict=False))
        if not payloads:  # only stdin gets here: files are counted first
            raise BadInput(f"{'stdin' if opts.source.streamed else opts.source.spec} "
                           "holds no IDs.")
        for batch, payload in payloads:
            self.send(job, batch, self.encode(job, batch, opts.task, payload))
        timings: list[float] = []
        waited = time.monotonic()
        pending = {b for b, _ in payloads}
        while pending:
            # The batch size is not known yet: count each ID left as a batch (an
            # upper bound), so a long job scales out while its probes wait.
            self.advertise_backlog(job, (total or 0) - len(payloads))
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
        # The probes are committed now; the main loop writes them like any
        # batch found committed on resume.
        # The fastest probe: a probe slowed by a busy neighbour or a cold
        # process says nothing about the work itself.
        per_item = max(min(timings), 1e-7)
        sample = [i for _, p in payloads for i in expand(p)] if opts.source.streamed else None
        size = self.batch_size(per_item, opts.target_seconds, total, slots, opts.source,
                               sample)
        if opts.source.streamed:
            # stdin cannot be read again: go on from where the probes stopped.
            size_after.append(size)
            self._stream = itertools.chain((p for _, p in payloads), stream)
        # stdin's length is unknown: no finer last wave.
        tail = 0 if opts.source.streamed else slots
        return Layout(probe, size, total, tail).as_meta(), per_item

    def batch_size(self, per_item: float, target: float, total: int | None, slots: int,
                   source: Source, sample: list[Any] | None = None) -> int:
        size = min(target / per_item, MAX_BATCH_ITEMS)  # workers refuse more (app/batch.py)
        # Never near the hard time limit of a batch.
        size = min(size, self.settings.max_batch_seconds / 4 / per_item)
        # Enough batches that every slot gets several and the tail stays short.
        if total:
            size = min(size, math.ceil(total / (slots * BATCHES_PER_SLOT)))
        # Well under the broker's message size limit (ranges travel as two numbers).
        if source.fmt != "range":
            size = min(size, self.settings.message_limit // 2 // _id_bytes(source, sample))
        return max(1, int(size))


def _id_bytes(source: Source, sample: list[Any] | None = None) -> int:
    """A generous size of one ID in a JSON message, from the first IDs (or `sample`)."""
    if sample is None:
        sample = list(expand(next(source.batches(iter((1000,))), [])))
    encoded = sum(len(str(i)) + 4 for i in sample)
    return max(8, math.ceil(encoded / max(len(sample), 1)))


class StackMetrics:
    """What a --stack job tells CloudWatch (namespace CeleryFleet, dimension Stack).

    HeldBatches: what the launcher holds back. The stack scales on (queue
    depth + held batches) per instance (infra/scaling.py), so a long job grows
    the fleet at once instead of doubling it once per boot. BatchesCompleted:
    batches written since the last call, for the stack's dashboard.

    Published at most every PERIOD seconds, and at once when the held count
    drops to zero; a failure to publish never stops a job.
    """

    PERIOD = 20.0

    def __init__(self, stack: str, region: str | None) -> None:
        self.stack = stack
        self.region = region
        self.client: Any = None
        self.last: tuple[float, int] = (0.0, -1)
        self.completed = 0  # batches written, not published yet

    def publish(self, held: int, completed: int = 0) -> None:
        self.completed += completed
        at, value = self.last
        now = time.monotonic()
        if now - at < self.PERIOD and (held != 0 or value == 0):
            return
        dimensions = [{"Name": "Stack", "Value": self.stack}]
        data = [{"MetricName": "HeldBatches", "Value": float(held), "Unit": "Count",
                 "Dimensions": dimensions}]
        if self.completed:
            data.append({"MetricName": "BatchesCompleted", "Value": float(self.completed),
                         "Unit": "Count", "Dimensions": dimensions})
        self.last = (now, held)
        try:
            if self.client is None:
                import boto3

                self.client = boto3.client("cloudwatch", region_name=self.region)
            self.client.put_metric_data(Namespace="CeleryFleet", MetricData=data)
            self.completed = 0
        except Exception as exc:  # noqa: BLE001 - scaling hint and dashboard only
            say(f"could not publish HeldBatches to CloudWatch ({exc}); the fleet scales on "
                "queue depth alone")


def _check_writable(path: Path | None) -> None:
    """BadInput unless `path` can be written; an existing file is left as it is."""
    if path is None:
        return
    existed = path.exists()
    try:
        open(path, "ab").close()
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror}.") from None
    if not existed:
        path.unlink()


class _Run:
    """The state of one pass over a job's batches."""

    def __init__(self, launcher: Launcher, job: str, task: str, opts: JobOptions,
                 out: IO[bytes], out_path: str | None, progress: _Progress,
                 batches: int | None = None) -> None:
        self.launcher = launcher
        # How many batches the job is cut into: known from the layout, or
        # counted when a stream of unknown length runs out.
        self.batches = batches
        self.store = launcher.store
        self.job = job
        self.task = task
        self.opts = opts
        self.out = out
        self.out_path = out_path
        self.progress = progress
        self.inflight: dict[int, _InFlight] = {}
        self.written: set[int] = set()
        self.resent = 0
        self.unreported = 0  # batches written since the last advertise_backlog
        self.interrupted = False
        self.lease = launcher.settings.lease_seconds
        self._idle_since: float | None = None

    def max_in_flight(self) -> int:
        return self.opts.max_in_flight or max(4, 2 * self.launcher.slots())

    def loop(self, payloads: Iterator[Any], written_bits: bytes, committed_bits: bytes,
             interrupted: list[bool]) -> None:
        batch = 0
        exhausted = False
        backlog: list[int] = []  # committed on an earlier pass, not yet written
        last_check = time.monotonic()
        while True:
            while not exhausted and len(self.inflight) < self.max_in_flight():
                try:
                    payload = next(payloads)
                except StopIteration:
                    exhausted = True
                    self.batches = batch
                    break
                except InputError as exc:  # only a streamed source gets here
                    self.store.cancel(self.job)
                    raise BadInput(f"{exc} Batches before it were sent and written.") from None
                if bit_is_set(written_bits, batch):
                    pass
                else:
                    body = self.launcher.encode(self.job, batch, self.task, payload)
                    if len(body) > self.launcher.settings.message_limit:
                        # Workers refuse it (app/batch.py): say so before sending.
                        self.store.cancel(self.job)
                        raise BadInput(
                            f"batch {batch} takes {len(body):,} bytes, more than the "
                            f"{self.launcher.settings.message_limit:,} a batch message may "
                            "hold on this broker; use a smaller --batch-size.")
                    self.inflight[batch] = _InFlight(body, time.monotonic())
                    if bit_is_set(committed_bits, batch):
                        backlog.append(batch)
                    else:
                        self.launcher.send(self.job, batch, body)
                batch += 1
            if backlog:
                self.write(backlog)
                backlog = []
            if interrupted[0]:
                self.interrupted = True
                return
            if exhausted and not self.inflight:
                return
            dones = self.store.wait_done(self.job, timeout=0.5)
            refused = next((d.refused for d in dones if d.refused), None)
            if refused:
                self.store.cancel(self.job)
                raise BadInput(refused)
            self.write([d.batch for d in dones])
            now = time.monotonic()
            if now - last_check >= 1.0:
                self.find_lost(now)
                self.launcher.advertise_backlog(self.job, self.held(batch, exhausted),
                                                self.unreported)
                self.unreported = 0
                last_check = now

    def held(self, sent: int, exhausted: bool) -> int:
        """Batches not sent yet; for a stream of unknown length, as many again as in flight."""
        if exhausted:
            return 0
        if self.batches is None:
            return len(self.inflight)
        return max(0, self.batches - sent)

    def write(self, batches: list[int]) -> None:
        """Copy the committed lines of `batches` to the output and journal them."""
        pending = sorted({b for b in batches if b not in self.written})
        # A few batches per round trip, so memory stays bounded however many finished.
        for i in range(0, len(pending), WRITE_CHUNK):
            self._write_chunk(pending[i:i + WRITE_CHUNK])

    def _write_chunk(self, batches: list[int]) -> None:
        items = errors = 0
        done_now = []
        for b, result in zip(batches, self.store.results(self.job, batches), strict=False):
            if result is None:
                continue  # expired; the lost-batch check re-sends it
            n, e, lines = result
            self.out.write(lines)
            items += n
            errors += e
            done_now.append(b)
        if not done_now:
            return
        self.out.flush()
        offset = self.out.tell() if self.out_path else None
        self.store.mark_written(self.job, done_now, offset, items, errors)
        for b in done_now:
            self.written.add(b)
            self.inflight.pop(b, None)
        self.unreported += len(done_now)
        self.progress.add(items, errors)

    def find_lost(self, now: float) -> None:
        """Re-send batches whose lease lapsed, or that sit unstarted while slots are idle."""
        busy = self.store.busy_slots()
        prefix = f"{self.job}/"
        running = {int(m[len(prefix):]) for m in busy if m.startswith(prefix)}
        lost = []
        unstarted = []
        for b, f in self.inflight.items():
            if b in running:
                f.seen_running = now
            elif f.seen_running and now - f.seen_running > self.lease:
                lost.append(b)
            elif not f.seen_running:
                unstarted.append(b)
        idle = self.launcher.slots() - len(busy)
        if unstarted and idle > 0:
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since > self.lease:
                lost.extend(sorted(unstarted)[:idle])
                self._idle_since = None
        else:
            self._idle_since = None
        for b in lost:
            f = self.inflight[b]
            f.seen_running, f.sent_at = 0.0, now
            self.launcher.send(self.job, b, f.body)
            self.resent += 1


class _interrupt_guard:
    """Turn the first Ctrl-C into a clean stop (the job stays resumable); a second one aborts."""

    def __enter__(self) -> list[bool]:
        self.flag = [False]
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self.flag

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag[0]:
            raise KeyboardInterrupt
        self.flag[0] = True
        say("\nstopping: batches already running will be kept for --resume (Ctrl-C again to abort)")

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
