"""Jobs that live in the fleet: `fleet submit` and the driver that runs them on the workers.

`submit` checks the job as `fleet run` would (its IDs, its sink, the fleet), uploads a
local ID file to the result store, writes the job's metadata and lists the job as one
to drive, then returns: the submitting machine may go away.

`drive` is the same dispatch loop as `fleet run`'s, run by a worker's main process
(app/worker/drivers.py) that holds the job's driver slot, a one-holder semaphore in the
result store renewed every second. If that worker dies the hold lapses and another
worker takes the job over from the journal, exactly as `fleet run --resume` would: the
batches already committed are written, those sent before (the "sent" mark in the job's
metadata, saved every second) are not sent again unless found lost, and the first
commit of a batch wins. With no sink, the results stay in the result store, where
`fleet results JOB` reads them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from app.launcher.dispatch import Steering, driver_lease, driver_slot
from app.launcher.job import BadInput, JobError, JobOptions, new_job_id, reducer_name
from app.launcher.jobs import ENDED, end
from app.launcher.launcher import Launcher, Stopped
from app.launcher.sources import InputError, Source
from app.sinks import sink_label

log = logging.getLogger(__name__)
_encode_json = msgspec.json.Encoder().encode

STORED = "stored:"  # the spec of a source uploaded to the result store


def submit(launcher: Launcher, opts: JobOptions, retry_of: str = "") -> str:
    """Check and record a job for the fleet to drive; its ID. BadInput, Unreachable or
    VersionMismatch as `fleet run` (nothing is recorded then)."""
    if not opts.task or opts.source is None:
        raise BadInput("a new job needs a task and an ID source.")
    source = opts.source
    total, data = _read(source)
    if opts.reduce:
        reducer_name(opts.reduce)  # the driver, on a worker, imports it
    if opts.sink:
        launcher.sink(opts.sink, check=True)
    launcher.check_connections()
    launcher.check_code(opts.require_version)
    store = launcher.store
    job = new_job_id()
    meta: dict[str, Any] = {
        "task": opts.task,
        "source": source.as_meta(),
        "total": total,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "out": sink_label(opts.sink) if opts.sink else "store",
        "status": "submitted",
        "driver": "fleet",
        "options": {
            "batch_size": opts.batch_size,
            "target_seconds": opts.target_seconds,
            "max_in_flight": opts.max_in_flight,
        },
    }
    if opts.sink:
        meta["sink"] = opts.sink
    if opts.reduce:
        meta["reduce"] = opts.reduce
    if retry_of:
        meta["retry_of"] = retry_of
    if data is not None:
        # Uploaded before the job is listed: a driver never meets a job without its IDs.
        store.put_input(job, data)
        meta["source"] = dict(source.as_meta(), spec=STORED + job)
        meta["source_name"] = "stdin" if source.streamed else source.spec
    store.put_meta(job, meta)
    store.add_driven(launcher.settings.queue, job)
    return job


def retry(launcher: Launcher, job: str) -> tuple[str, int]:
    """Submit a new job over exactly the IDs of `job` that have an error record: the same
    task, sink and options. Its records replace those errors: in `fleet results JOB`, and
    in a PostgreSQL sink's rows under JOB's key. (new job, IDs)."""
    from app.launcher.jobs import error_ids, known

    store, settings = launcher.store, launcher.settings
    known(store, settings, job)
    meta = store.get_meta(job) or {}
    if meta.get("status") not in ENDED:
        raise BadInput(f"job {job} is still {meta.get('status')}: retry it once it has ended.")
    spec = meta.get("sink")
    if spec and spec.get("kind") == "python":
        raise BadInput(
            f"job {job} wrote to your writer {meta.get('out')}, which the kit cannot read: "
            "submit the failed IDs yourself (`fleet submit TASK --ids FILE`)."
        )
    ids = error_ids(store, settings, job)
    if not ids:
        raise BadInput(f"job {job} has no error record: nothing to retry.")
    if spec and spec.get("kind") == "postgresql":
        spec = dict(spec, replace_job=meta.get("retry_of") or job)
    options = meta.get("options", {})
    with tempfile.TemporaryDirectory(prefix="fleet-retry-") as tmp:
        path = Path(tmp) / "ids.jsonl"
        path.write_bytes(b"".join(b'{"id":%s}\n' % _encode_json(i) for i in ids))
        opts = JobOptions(
            task=meta["task"],
            source=Source.parse(str(path), "jsonl", field="id"),
            batch_size=options.get("batch_size"),
            target_seconds=options.get("target_seconds") or 2.0,
            max_in_flight=options.get("max_in_flight"),
            sink=spec,
            progress=False,
        )
        new = submit(launcher, opts, retry_of=job)
    meta.setdefault("retried_by", []).append(new)
    store.put_meta(job, meta)
    return new, len(ids)


def _read(source: Source) -> tuple[int | None, bytes | None]:
    """(the IDs counted and checked, the bytes to upload: None for a range or S3)."""
    data = None
    try:
        if source.streamed:  # stdin: kept whole, it cannot be read twice
            data = sys.stdin.buffer.read()
            return _count_bytes(data, source), data
        total = source.count()
        if source.fmt != "range" and not source.spec.startswith("s3://"):
            data = Path(source.spec).read_bytes()
        return total, data
    except InputError as exc:
        raise BadInput(str(exc)) from None


def _count_bytes(data: bytes, source: Source) -> int | None:
    """The IDs in `data` read as `source`'s format (stdin, kept whole), checked line by line."""
    with tempfile.TemporaryDirectory(prefix="fleet-submit-") as tmp:
        path = Path(tmp) / "stdin"
        path.write_bytes(data)
        try:
            return Source(str(path), source.fmt, source.column, source.field).count()
        except InputError as exc:
            raise InputError(str(exc).replace(str(path), "stdin")) from None


def _source(launcher: Launcher, job: str, meta: dict[str, Any], workdir: Path) -> Source:
    """The source of the job's metadata as the dispatch loop reads it: one uploaded to
    the store is fetched into `workdir` first. Only those, ranges and S3 objects: whoever
    can write to the result store must not make a worker read its own files."""
    source = dict(meta["source"])
    spec = str(source.get("spec", ""))
    if not spec.startswith((STORED, "range:", "s3://")):
        raise BadInput(
            f"job {job} names IDs at {spec!r}: a driver in the fleet reads only IDs uploaded "
            "by `fleet submit`, range:START:STOP or s3://BUCKET/KEY."
        )
    if spec.startswith(STORED):
        data = launcher.store.get_input(job)
        if data is None:
            raise BadInput(f"the IDs of job {job} are gone from the result store (expired?).")
        path = workdir / "ids"
        path.write_bytes(data)
        source["spec"] = str(path)
    return Source.from_meta(source)


def drive(launcher: Launcher, job: str, holder: str, stop: threading.Event) -> str:
    """Drive `job` while this process holds its driver slot (taken by the caller); the
    state it leaves the job in ("running" when handed over or lost)."""
    store, settings = launcher.store, launcher.settings
    steering = Steering(
        store,
        job,
        holder,
        driver_lease(settings.lease_seconds),
        in_fleet=True,
        stop=stop,
    )
    try:
        meta = store.get_meta(job)
        if meta is None or meta.get("status") in ENDED:
            store.remove_driven(settings.queue, job)
            return "gone" if meta is None else str(meta["status"])
        steering.meta = meta
        options = meta.get("options", {})
        with tempfile.TemporaryDirectory(prefix="fleet-driver-") as workdir:
            source = _source(launcher, job, meta, Path(workdir))
            opts = JobOptions(
                task=meta["task"],
                source=source,
                batch_size=options.get("batch_size"),
                target_seconds=options.get("target_seconds") or 2.0,
                max_in_flight=options.get("max_in_flight"),
                sink=meta.get("sink"),
                progress=False,
            )
            started = time.monotonic()
            if meta.get("status") == "submitted":
                meta.update(status="running", started=time.time())
                store.put_meta(job, meta)
            log.info("driving job %s (%s)", job, holder)
            if "layout" not in meta:
                if opts.batch_size:
                    meta["layout"] = {"probe": [], "size": opts.batch_size}
                else:
                    meta["layout"], meta["seconds_per_item"] = launcher._calibrate(
                        job, opts, meta.get("total"), steering
                    )
                store.put_meta(job, meta)
            summary = launcher._dispatch(job, meta, opts, started, steering, source)
            if summary.status == "interrupted":
                return "running"  # handed over, or lost: the job runs on under another driver
            store.remove_driven(settings.queue, job)
            log.info("job %s: %s", job, summary.status)
            return summary.status
    except Stopped as exc:
        if str(exc) == "cancelled":
            _end(launcher, job, "cancelled")
            return "cancelled"
        return "running"
    except JobError as exc:  # refused by the workers, bad input: the job cannot go on
        _end(launcher, job, "failed", str(exc))
        return "failed"
    finally:
        with contextlib.suppress(Exception):
            steering.release()


def _end(launcher: Launcher, job: str, status: str, reason: str = "") -> None:
    end(launcher.store, launcher.settings, job, status, reason)
    with contextlib.suppress(Exception):
        launcher.advertise_backlog(job, 0)


__all__ = ["STORED", "drive", "driver_slot", "retry", "submit"]
