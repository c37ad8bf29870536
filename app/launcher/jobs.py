"""What `fleet jobs`, `wait`, `watch`, `results` and `cancel` read and do: a job seen and
steered through the result store, from any machine that reaches it.

A job's state is its metadata's status, read beside its driver's hold: a job marked
running whose driver's hold has lapsed is waiting for a driver (in the fleet: a worker
takes it up) or, run attached by `fleet run`, stopped (its launcher is gone: `fleet run
--resume` goes on).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from app.launcher.dispatch import driver_lease, driver_slot, running_batches
from app.launcher.job import BadInput, JobError
from app.settings import Settings, redact
from app.store import Store, bit_is_set

ENDED = ("ok", "errors", "cancelled", "failed", "interrupted")
# `fleet wait`'s exit code for each way a job ends, as `fleet run`'s where it has one.
EXIT_CODES = {"ok": 0, "errors": 1, "failed": 2, "cancelled": 5, "interrupted": 130, "stopped": 130}
RESULTS_CHUNK = 64  # batches fetched per round trip by `fleet results`
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Cancelled(JobError):
    exit_code = 5


@dataclass
class JobView:
    job: str
    state: str  # submitted, running, waiting (for a driver), stopped, or one of ENDED
    task: str
    total: int | None
    items: int
    errors: int
    rate: float  # items per second since it started
    eta_seconds: float | None
    out: str  # where the results are: "store", a sink's label, or a local file
    driver: str  # who drives it now ("" if nobody)
    created: str
    in_fleet: bool
    reason: str = ""
    reduced: Any = None  # with --reduce, once the job ended: the folded value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def view(store: Store, settings: Settings, job: str) -> JobView | None:
    meta = store.get_meta(job)
    if meta is None:
        return None
    _, _, _, items, errors = store.journal(job)
    status = str(meta.get("status", "running"))
    in_fleet = meta.get("driver") == "fleet"
    driver = ""
    state = status
    if status not in ENDED:
        holders = store.slot_holders(driver_slot(job), driver_lease(settings.lease_seconds))
        driver = holders[0] if holders else ""
        if not driver:
            state = ("submitted" if status == "submitted" else "waiting") if in_fleet else "stopped"
        elif meta.get("paused"):
            state = "paused"
    started = meta.get("started")
    end = meta.get("finished") if status in ENDED else None
    elapsed = (end or time.time()) - started if started else 0.0
    rate = items / elapsed if elapsed > 0 else 0.0
    total = meta.get("total")
    eta = (total - items) / rate if total is not None and rate > 0 and status not in ENDED else None
    return JobView(
        job=job,
        state=state,
        task=str(meta.get("task")),
        total=total,
        items=items,
        errors=errors,
        rate=round(rate, 1),
        eta_seconds=None if eta is None else round(eta, 1),
        out=str(meta.get("out", "-")),
        driver=driver,
        created=str(meta.get("created", "")),
        in_fleet=in_fleet,
        reduced=meta.get("reduced"),
        reason=str(
            meta.get("reason")
            or (meta.get("paused", "") if state == "paused" else "")
            or (meta.get("driver_error", "") if state == "waiting" else "")
        ),
    )


def views(store: Store, settings: Settings) -> list[JobView]:
    """Every job the store still holds, oldest first."""
    out = []
    for job in store.jobs():
        v = view(store, settings, job)
        if v is not None:
            out.append(v)
    return out


def known(store: Store, settings: Settings, job: str) -> JobView:
    v = view(store, settings, job)
    if v is None:
        raise BadInput(
            f"no job {job!r} in the result store at {redact(settings.result_url)} "
            "(wrong fleet, or expired). `fleet jobs` lists the jobs it holds."
        )
    return v


def wait(
    store: Store,
    settings: Settings,
    job: str,
    on_progress: Callable[[JobView], None] = lambda _: None,
    poll: float = 1.0,
    timeout: float | None = None,
) -> JobView:
    """Block until `job` ends (or, attached, its launcher is gone: state "stopped")."""
    deadline = None if timeout is None else time.monotonic() + timeout
    stopped_since: float | None = None
    while True:
        v = known(store, settings, job)
        on_progress(v)
        if v.state in ENDED:
            return v
        if v.state == "stopped":
            # Give a launcher that just started its grace: its first hold may be a second away.
            stopped_since = stopped_since or time.monotonic()
            if time.monotonic() - stopped_since > driver_lease(settings.lease_seconds):
                return v
        else:
            stopped_since = None
        if deadline is not None and time.monotonic() > deadline:
            return v
        time.sleep(poll)


def cancel(store: Store, settings: Settings, job: str, timeout: float = 60.0) -> JobView:
    """Cancel `job`: no new batch is sent, and the workers drop its queued batches without
    running them. Returns once no batch of the job is running any more (or `timeout`)."""
    v = known(store, settings, job)
    if v.state in ENDED:
        return v
    store.cancel(job)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running_batches(store.busy_slots(), job):
            break
        time.sleep(0.2)
    # Its driver marks the job cancelled at its next tick (within a second); a job
    # without one (gone, or a worker yet to take it up) is marked here.
    while time.monotonic() < deadline:
        v = known(store, settings, job)
        if v.state in ENDED or not v.driver:
            break
        time.sleep(0.2)
    if v.state not in ENDED and not v.driver:
        end(store, settings, job, "cancelled")
        v = known(store, settings, job)
    return v


def end(store: Store, settings: Settings, job: str, status: str, reason: str = "") -> None:
    """Mark `job` ended (`reason`: why, for `fleet jobs`) and no longer one to drive."""
    meta = store.get_meta(job) or {}
    meta.update(status=status, finished=time.time())
    if reason:
        meta["reason"] = reason
    store.put_meta(job, meta)
    store.remove_driven(settings.queue, job)


def results(store: Store, settings: Settings, job: str) -> Iterator[bytes]:
    """The JSON lines of the job's batches written so far, in batch order; an error record
    that a retry of the job (`fleet retry`) has redone is replaced by the retry's record."""
    meta = store.get_meta(job)
    if meta is None:
        known(store, settings, job)  # raises
        return
    redone: dict[bytes, bytes] = {}
    for retry in meta.get("retried_by", []):
        for chunk in _own_results(store, settings, retry):
            for line in chunk.splitlines(keepends=True):
                redone[_id_key(line)] = line
    if not redone:
        yield from _own_results(store, settings, job, meta)
        return
    for chunk in _own_results(store, settings, job, meta):
        out = []
        for line in chunk.splitlines(keepends=True):
            if b'"error":' in line:
                line = redone.get(_id_key(line), line)
            out.append(line)
        yield b"".join(out)


def _id_key(line: bytes) -> bytes:
    """A record's ID as JSON: the same ID, whatever record it is in."""
    return _encode(_decode(line)["id"])


def error_ids(store: Store, settings: Settings, job: str) -> list[Any]:
    """The IDs of the job's error records (after its retries), as the task took them."""
    meta = store.get_meta(job) or {}
    spec = meta.get("sink") or {}
    if spec.get("kind") == "postgresql":
        from app.sinks.postgres import PostgresSink

        sink = PostgresSink(spec["url"], password=settings.sink_password)
        query = "SELECT id FROM {} WHERE job = %s AND error IS NOT NULL ORDER BY id"
        with sink._connect() as conn:
            from psycopg import sql

            rows = conn.execute(sql.SQL(query).format(sink.table), (job,)).fetchall()
        # The table keeps IDs as text: a range's IDs go back to the numbers they were.
        ranged = meta.get("source", {}).get("fmt") == "range"
        return [int(r[0]) if ranged else r[0] for r in rows]
    if meta.get("driver") != "fleet" and not spec:
        path = Path(str(meta.get("out", "-")))
        if not path.is_file():
            raise BadInput(
                f"job {job} was run by `fleet run` into {meta.get('out')}, which is not on "
                "this machine: run `fleet retry` where that file is."
            )
        chunks: Iterator[bytes] = iter([path.read_bytes()])
    else:
        chunks = results(store, settings, job)
    ids = []
    for chunk in chunks:
        for line in chunk.splitlines():
            if b'"error":' in line:
                record = _decode(line)
                if "error" in record:
                    ids.append(record["id"])
    return ids


def _own_results(
    store: Store, settings: Settings, job: str, meta: dict[str, Any] | None = None
) -> Iterator[bytes]:
    meta = meta if meta is not None else store.get_meta(job)
    if meta is None:
        return
    spec = meta.get("sink")
    if spec and spec.get("kind") == "s3":
        from app.sinks.s3 import S3Sink

        yield from S3Sink(spec["url"], settings.aws_region).read(job)
        return
    if spec and spec.get("kind") == "postgresql":
        raise BadInput(
            f"the results of job {job} are rows of {meta.get('out')}: "
            f"SELECT id, result, error FROM <table> WHERE job = '{job}'."
        )
    if spec:
        raise BadInput(f"the results of job {job} went to your writer, {meta.get('out')}.")
    if meta.get("driver") != "fleet":
        raise BadInput(
            f"job {job} was run by `fleet run`: its results went to {meta.get('out')} on the "
            "machine that ran it."
        )
    _, written, _, _, _ = store.journal(job)
    batches = [b for b in range(len(written) * 8) if bit_is_set(written, b)]
    for i in range(0, len(batches), RESULTS_CHUNK):
        for result in store.results(job, batches[i : i + RESULTS_CHUNK]):
            if result is None:
                raise BadInput(f"the results of job {job} have expired from the result store.")
            yield bytes(result[2])


def write_results(chunks: Iterator[bytes], out: IO[bytes]) -> int:
    """Copy `chunks` to `out`; the lines written."""
    lines = 0
    for chunk in chunks:
        out.write(chunk)
        lines += chunk.count(b"\n")
    out.flush()
    return lines
