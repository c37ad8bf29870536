"""The liveness watchdog (app/worker/watchdog.py) on a real fleet.

A local fleet of two worker instances (real redis-server broker and result
store, real `celery worker` processes), supervised as `fleet local` does it
(LocalFleet.supervise, restarting any instance that exits). A worker is made
to stop consuming while its process stays up, in the two ways Celery's own
failures take:

- its consumer is cancelled (remote control `cancel_consumer`): the main
  loop runs, the worker takes nothing;
- its main thread is blocked (a remote-control command that sleeps there,
  tests/support/watchdog_block.py): nothing runs but the heartbeat and watchdog
  threads, and the worker's count of reserved batches goes stale.

Either way, while a job's batches wait on the broker, the watchdog must see
it within the stated bound (grace + lease_seconds), the worker must exit
non-zero, come back under a new pid and consume again, and the job must
finish with every ID exactly once. And the rule must not fire on a worker
whose slots are busy with long batches while the queue is non-empty, nor
on an idle worker with an empty queue.

The grace is shortened with FLEET_WATCHDOG_SECONDS (default: 30 s) and the
lease to 2 s, so the module runs in about 40 s on two CPUs. The rule alone
is also checked step by step with a hand-driven clock, and the SQS count it
reads against moto (the fleet tests use Redis; RabbitMQ with
FLEET_WATCHDOG_TEST_BROKERS=redis,rabbitmq).
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import boto3
import pytest

from app.celery_config import make_app
from app.launcher.job import JobSummary
from app.queue_depth import SqsReady, ready_count
from app.store.redis import RedisStore, _keys
from app.worker.watchdog import WATCHDOG_EXIT_CODE
from scripts.local.fleet import LocalFleet
from tests.support.aws import sqs_settings
from tests.support.checker import exactly_once
from tests.support.fleets import TASKS, settle
from tests.support.jobs import Background
from tests.support.wait import wait_until

GRACE = 3.0  # FLEET_WATCHDOG_SECONDS
LEASE = 2.0  # FLEET_LEASE_SECONDS: a check every LEASE / 3
BOUND = GRACE + LEASE  # the stated detection bound (app/worker/watchdog.py)
# Thread scheduling and log timestamps on a loaded two-CPU machine.
SLACK = 1.0
ITEM_MS = 2  # CPU per ID of the `slow` task
N = 2000  # 4 s of CPU; batches of 250 take about 0.5 s

pytestmark = pytest.mark.timeout(120)


# -- the fleet -------------------------------------------------------------------


# Redis by default: a RabbitMQ fleet takes longer to start than this module's
# budget allows. FLEET_WATCHDOG_TEST_BROKERS=redis,rabbitmq runs it on both.
BROKERS = os.environ.get("FLEET_WATCHDOG_TEST_BROKERS", "redis").split(",")


@pytest.fixture(scope="module", params=BROKERS)
def shared(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"watchdog-{request.param}")
    env = {"FLEET_TEST_ITEM_MS": str(ITEM_MS), "FLEET_WATCHDOG_SECONDS": str(GRACE)}
    with LocalFleet(
        2,
        request.param,
        include=(*TASKS, "tests.support.watchdog_block"),
        workdir=workdir,
        lease_seconds=LEASE,
        env=env,
    ) as fleet:
        yield fleet


class Supervisor:
    """What `fleet local` does every half second: restart any instance that exited."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        self.stop = threading.Event()
        self.exits: list[tuple[int, int, float]] = []  # (index, exit code, when noticed)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            old = {i.index: i.proc for i in self.fleet.instances}
            for index in self.fleet.supervise():
                self.exits.append((index, old[index].returncode, time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def fleet(shared):
    """The shared fleet, settled (nothing queued or running), under supervision."""
    settle(shared)
    supervisor = Supervisor(shared)
    shared.supervisor = supervisor
    yield shared
    supervisor.close()


# -- helpers ---------------------------------------------------------------------


def assert_exactly_once(summary: JobSummary, out: Path, n: int) -> None:
    assert (summary.status, summary.items, summary.errors) == ("ok", n, 0)
    exactly_once(out, range(n), result=lambda i: 2 * i)


def log_path(fleet: LocalFleet, index: int) -> Path:
    return fleet.workdir / f"instance{index}.log"


def log_since(fleet: LocalFleet, index: int, offset: int) -> str:
    with open(log_path(fleet, index), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(fleet: LocalFleet, index: int) -> int:
    return log_path(fleet, index).stat().st_size


_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ", re.M)


def stamp_of(text: str, marker: str, last: bool = False) -> float | None:
    """The log timestamp (seconds) of the first (or last) line holding `marker`."""
    lines = [line for line in text.splitlines() if marker in line]
    if not lines:
        return None
    m = _STAMP.match(lines[-1 if last else 0])
    assert m, f"no timestamp on {lines[0]!r}"
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def node_of(fleet: LocalFleet, index: int) -> str:
    store = RedisStore(fleet.settings.result_url)
    pid = fleet.instances[index].proc.pid
    return wait_until(
        lambda: next((str(w["hostname"]) for w in store.workers() if w.get("pid") == pid), ""),
        30,
        "the worker's heartbeat",
    )


def running(fleet: LocalFleet) -> int:
    return len(RedisStore(fleet.settings.result_url).busy_slots())


def wait_restarted(fleet: LocalFleet, index: int, old_pid: int, timeout: float) -> float:
    """Wait until instance `index` runs under a new pid that heartbeats; when that was."""
    store = RedisStore(fleet.settings.result_url)
    inst = fleet.instances[index]
    wait_until(
        lambda: (
            inst.proc.pid != old_pid and any(w.get("pid") == inst.proc.pid for w in store.workers())
        ),
        timeout,
        f"instance{index} to come back under a new pid",
    )
    return time.monotonic()


def assert_consumes_again(fleet: LocalFleet, tmp_path: Path) -> None:
    """A fresh job: every restarted worker takes part in it."""
    offsets = [log_size(fleet, i.index) for i in fleet.instances]
    job = Background(fleet, tmp_path / "again.jsonl", 1600, 100)
    assert_exactly_once(job.result(60), tmp_path / "again.jsonl", 1600)
    for inst, offset in zip(fleet.instances, offsets, strict=True):
        done = len(
            re.findall(
                r"Task fleet\.batch\[[^]]+\] succeeded", log_since(fleet, inst.index, offset)
            )
        )
        print(f"instance{inst.index} ran {done} of the fresh job's 16 batches")
        assert done, f"instance{inst.index} took no batch after its restart"


# -- the SQS count the rule reads ------------------------------------------------


def test_sqs_ready_count_leaves_out_messages_other_workers_hold(aws):
    """The count the rule reads on SQS: visible messages, not in-flight ones (moto)."""
    settings = sqs_settings(aws, "fleet-watchdog")
    sqs = boto3.client("sqs", endpoint_url=aws[1])
    for i in range(3):
        sqs.send_message(QueueUrl=settings.sqs_queue_url, MessageBody=str(i))
    reader = SqsReady(settings)
    assert reader.ready() == 3
    # Another worker receives one and holds it (invisible until acknowledged).
    got = sqs.receive_message(QueueUrl=settings.sqs_queue_url, MaxNumberOfMessages=1)
    assert len(got["Messages"]) == 1
    assert reader.ready() == 2
    reader.close()


# -- a real fleet ------------------------------------------------------------------


def test_idle_worker_with_an_empty_queue_is_not_restarted(fleet):
    pids = [i.proc.pid for i in fleet.instances]
    offsets = [log_size(fleet, i.index) for i in fleet.instances]
    time.sleep(BOUND + SLACK)  # free slots, nothing received, nothing waiting
    assert [i.proc.pid for i in fleet.instances] == pids
    assert fleet.supervisor.exits == []
    for inst, offset in zip(fleet.instances, offsets, strict=True):
        assert "watchdog" not in log_since(fleet, inst.index, offset)


def test_worker_busy_with_long_batches_is_not_restarted(fleet):
    """Both slots run a batch longer than the bound while two more wait: not stuck."""
    settings = fleet.settings
    store = RedisStore(settings.result_url)
    job = "jtest-busy-" + os.urandom(3).hex()
    store.put_meta(job, {"task": "nap", "status": "running"})
    pids = [i.proc.pid for i in fleet.instances]
    offsets = [log_size(fleet, i.index) for i in fleet.instances]
    long_ms = int((BOUND + 1.5) * 1000)  # one ID that naps this long
    client = make_app(settings)
    # Two long batches, one per slot, then two short ones that wait behind them.
    payloads = [[long_ms], [long_ms], [1, 2], [3, 4]]
    started = time.monotonic()
    for b, ids in enumerate(payloads):
        client.send_task("fleet.batch", args=[job, b, "nap", ids], queue=settings.queue)
    ready = ready_count(settings)
    wait_until(lambda: running(fleet) == 2, 30, "both slots to run a long batch")
    waiting = []  # when two batches were seen waiting
    while store.committed(job, [0, 1]) == [] and time.monotonic() - started < 60:
        if ready.ready() == 2:
            waiting.append(time.monotonic())
        time.sleep(0.1)
    wait_until(lambda: len(store.committed(job, range(4))) == 4, 60, "all four batches")
    waited = waiting[-1] - waiting[0] if waiting else 0.0
    print(
        f"two batches waited {waited:.1f} s behind two long ones; all done in "
        f"{time.monotonic() - started:.1f} s"
    )
    assert waited > BOUND, "the short batches did not wait longer than the bound"
    assert [i.proc.pid for i in fleet.instances] == pids
    assert fleet.supervisor.exits == []
    for inst, offset in zip(fleet.instances, offsets, strict=True):
        assert "watchdog" not in log_since(fleet, inst.index, offset)
    assert store.r.llen(_keys(job)["done"]) == 4
    ready.close()
    client.close()


def test_workers_that_stop_consuming_are_restarted_and_the_job_completes(fleet, tmp_path):
    """Mid-job, instance0's consumer is cancelled (its main loop runs, it takes
    nothing: the symptom of celery#10205) and instance1's main thread is
    blocked (only its heartbeat thread runs, as in celery#9705's hang; its
    count of reserved batches goes stale, so its stalled event loop is what
    shows it). With neither consuming, the job's batches wait on the broker
    until the watchdog has both restarted; the new workers finish the job."""
    old_pids = [i.proc.pid for i in fleet.instances]
    nodes = [node_of(fleet, i.index) for i in fleet.instances]
    offsets = [log_size(fleet, i.index) for i in fleet.instances]
    out = tmp_path / "out.jsonl"
    job = Background(fleet, out, N, 250)
    wait_until(lambda: running(fleet) == 2, 30, "both slots to run a batch")
    client = make_app(fleet.settings)
    queue = fleet.settings.queue
    replies = client.control.cancel_consumer(queue, destination=[nodes[0]], reply=True, timeout=5)
    assert replies == [{nodes[0]: {"ok": f"no longer consuming from {queue}"}}]
    client.control.broadcast("fleet_test_block", arguments={"seconds": 300}, destination=[nodes[1]])
    faulted = time.monotonic()
    wait_until(
        lambda: "blocking the main thread" in log_since(fleet, 1, offsets[1]),
        10,
        "instance1 to block",
    )
    assert [i.proc.pid for i in fleet.instances] == old_pids  # alive, and taking nothing

    detected = []
    for inst in fleet.instances:
        wait_until(
            lambda i=inst: "watchdog: stuck" in log_since(fleet, i.index, offsets[i.index]),
            BOUND + 30,
            f"the watchdog to report instance{inst.index}",
        )
        detected.append(time.monotonic() - faulted)
    back = [
        wait_restarted(fleet, i.index, old_pids[i.index], 60) - faulted for i in fleet.instances
    ]
    summary = job.result(90)
    cancelled, blocked = (log_since(fleet, i.index, offsets[i.index]) for i in fleet.instances)

    # The bound, by each worker's own log clock: from the moment it could take
    # a batch and did not (consumer cancelled and its last batch done; main
    # thread blocked) to the watchdog's report.
    before = cancelled.split("watchdog: stuck")[0]
    free_at = max(
        stamp_of(cancelled, "Canceling queue"), stamp_of(before, "succeeded", last=True) or 0
    )
    took = [
        stamp_of(cancelled, "watchdog: stuck") - free_at,
        stamp_of(blocked, "watchdog: stuck") - stamp_of(blocked, "blocking the main thread"),
    ]
    for index in (0, 1):
        print(
            f"instance{index}: stuck -> detected {took[index]:.2f} s (bound {BOUND:g} s), "
            f"fault -> detected {detected[index]:.1f} s, fault -> back under a new pid "
            f"{back[index]:.1f} s"
        )
    print(f"job {summary.wall_seconds:.1f} s, {summary.resent} batches re-sent")
    assert max(took) <= BOUND + SLACK, f"detected {took} s after the workers were stuck"
    # What the watchdog saw, and how each worker went: the cancelled one with a
    # warm shutdown, the blocked one at once (its main loop could not stop).
    assert "free slot(s)" in cancelled.split("watchdog: stuck")[1].splitlines()[0]
    assert "exiting at once" not in cancelled
    assert "event loop has not turned" in blocked.split("watchdog: stuck")[1].splitlines()[0]
    assert "exiting at once" in blocked
    exits = sorted((index, code) for index, code, _ in fleet.supervisor.exits)
    assert exits == [(0, WATCHDOG_EXIT_CODE), (1, WATCHDOG_EXIT_CODE)]
    assert_exactly_once(summary, out, N)
    assert_consumes_again(fleet, tmp_path)
    client.close()
