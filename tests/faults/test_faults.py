"""Faults during a job, on real fleets: nothing lost, nothing written twice.

Each test runs a job of `slow` items (FLEET_TEST_ITEM_MS of CPU each, so a
batch takes about a second), injects one fault while it runs, and compares
the output's multiset of IDs with the input. The fleets are shared by the
module (one per broker); a test that damages its fleet leaves it to the
`fleet` fixture to restart what it stopped before the next test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from app.celery_config import make_app
from app.launcher.job import JobSummary
from app.store.redis import RedisStore, _keys
from scripts.local.fleet import LocalFleet
from tests.support.checker import exactly_once
from tests.support.fleets import TASKS, restore, settle
from tests.support.jobs import Background
from tests.support.paths import FLEET_BIN, ROOT
from tests.support.wait import wait_until

ITEM_MS = 2
N = 2000  # 4 s of CPU over the fleet's 2 slots
BATCH = 500  # about 1 s per batch

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def shared(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"faults-{request.param}")
    with LocalFleet(
        2,
        request.param,
        include=TASKS,
        workdir=workdir,
        lease_seconds=2,
        env={"FLEET_TEST_ITEM_MS": str(ITEM_MS)},
    ) as f:
        yield f
        settle(f)


@pytest.fixture
def fleet(shared):
    """The module's fleet with its broker up and both instances consuming."""
    restore(shared)
    yield shared


# -- helpers -------------------------------------------------------------------


def running(store: RedisStore, job: str) -> set[int]:
    prefix = f"{job}/"
    return {int(m[len(prefix) :]) for m in store.busy_slots() if m.startswith(prefix)}


def wait_all_slots_busy(fleet: LocalFleet, job: str) -> None:
    """Wait until every slot runs a batch of `job`, so each pool process is mid-batch."""
    store = RedisStore(fleet.settings.result_url)
    wait_until(lambda: len(running(store, job)) >= 2, 30, f"two running batches of {job}")


def assert_job_complete(
    fleet: LocalFleet, summary: JobSummary, out: Path, n: int = N, batch: int = BATCH
) -> None:
    assert (summary.status, summary.items, summary.errors) == ("ok", n, 0)
    assert summary.batches == -(-n // batch)
    exactly_once(out, range(n), result=lambda i: 2 * i)
    # The store agrees: every batch journaled as written once, and nothing left to write.
    store = RedisStore(fleet.settings.result_url)
    committed, written, _, items, errors = store.journal(summary.job)
    assert (items, errors) == (n, 0)
    bits = summary.batches
    assert _count_bits(written) == bits and _count_bits(committed) == bits
    assert store.r.llen(_keys(summary.job)["done"]) == 0


def _count_bits(bitmap: bytes) -> int:
    return sum(bin(b).count("1") for b in bitmap)


def pool_children(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def log_text(fleet: LocalFleet, index: int) -> str:
    return (fleet.workdir / f"instance{index}.log").read_text(errors="replace")


# -- worker faults ---------------------------------------------------------------


def test_kill_9_of_a_pool_process_mid_batch(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    inst = fleet.instances[0]
    before = log_text(fleet, 0).count("WorkerLostError")
    job = Background(fleet, out, N, BATCH)
    wait_all_slots_busy(fleet, job.job)
    victims = pool_children(inst.proc)
    assert victims, "the instance has no pool process"
    for p in victims:
        p.kill()
    summary = job.result(60)
    assert_job_complete(fleet, summary, out)
    # The kill landed mid-batch (Celery saw the batch's process die; it may
    # say so only after the launcher re-sent the batch), and the instance
    # replaced its pool process.
    wait_until(
        lambda: log_text(fleet, 0).count("WorkerLostError") > before,
        20,
        "Celery to report the lost pool process",
    )
    old_pids = {p.pid for p in victims}
    wait_until(
        lambda: {p.pid for p in pool_children(inst.proc)} - old_pids, 20, "a new pool process"
    )
    assert inst.proc.poll() is None


@pytest.mark.parametrize("supervised", [False, True], ids=["other-alone", "supervised"])
def test_kill_9_of_a_whole_worker_mid_batch(fleet, tmp_path, supervised):
    """With Redis the dead worker's batch would come back only after the
    visibility timeout (half an hour): the launcher's lease check re-sends it."""
    out = tmp_path / "out.jsonl"
    inst = fleet.instances[0]
    job = Background(fleet, out, N, BATCH)
    wait_all_slots_busy(fleet, job.job)
    victims = [*pool_children(inst.proc), psutil.Process(inst.proc.pid)]
    for p in victims:
        p.kill()
    inst.proc.wait(10)
    killed_at = time.monotonic()
    if supervised:  # as `fleet local` and systemd do: bring the instance back
        while job.thread.is_alive() and time.monotonic() - killed_at < 60:
            fleet.supervise()
            job.thread.join(0.2)
        assert inst.restarts >= 1
    summary = job.result(max(1.0, 60 - (time.monotonic() - killed_at)))
    assert_job_complete(fleet, summary, out)
    if fleet.broker_kind == "redis":
        # Nothing but the launcher could have brought the batch back this soon.
        assert summary.resent >= 1
    if not supervised:
        assert inst.proc.poll() is not None  # the other instance did it alone


def test_sigterm_of_a_worker_mid_batch_drains_it(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    inst = fleet.instances[0]
    job = Background(fleet, out, N, BATCH)
    wait_all_slots_busy(fleet, job.job)
    before = len(log_text(fleet, 0))
    inst.proc.send_signal(signal.SIGTERM)
    # Warm shutdown: the running batch finishes, then the worker exits cleanly.
    # (Generous: billiard lets a pool process wait up to 30 s at exit for the
    # parent to take its last result, which a shutdown race can leave unread.)
    assert inst.proc.wait(90) == 0
    summary = job.result(60)
    assert_job_complete(fleet, summary, out)
    log = log_text(fleet, 0)[before:]
    assert "Warm shutdown" in log
    assert "WorkerLostError" not in log
    # The batch it was running when told to stop ran to the end there.
    assert re.search(r"fleet\.batch\[[^]]+\] succeeded in [\d.]+s: 500", log)


# -- broker and launcher faults ---------------------------------------------------


def test_broker_restart_mid_job(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    job = Background(fleet, out, N, BATCH)
    wait_all_slots_busy(fleet, job.job)
    fleet.broker.restart()
    assert job.thread.is_alive(), "the job ended before the broker came back"
    summary = job.result(120)
    assert_job_complete(fleet, summary, out)
    # The workers reconnected: a fresh job runs on the restarted broker.
    again = Background(fleet, tmp_path / "again.jsonl", 200, 50)
    assert_job_complete(fleet, again.result(60), tmp_path / "again.jsonl", 200, 50)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_launcher_stopped_mid_job_then_resumed(fleet, tmp_path, how):
    """SIGKILL: the launcher dies between any two steps. SIGINT (Ctrl-C): it
    stops cleanly, exits 130 and says how to resume."""
    src = tmp_path / "ids.txt"
    src.write_text("".join(f"{i}\n" for i in range(N)))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env["FLEET_STATE_DIR"] = str(tmp_path / "state")  # never a local fleet's state
    urls = ["--broker", fleet.settings.broker_url, "--backend", fleet.settings.result_url]
    first = subprocess.Popen(
        [
            str(FLEET_BIN),
            "run",
            "slow",
            "--ids",
            str(src),
            "--batch-size",
            "250",
            "--out",
            str(out),
            *urls,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        seen = []
        for _ in range(50):  # the job line comes first, but skip any warning before it
            seen.append(first.stderr.readline().decode())
            match = re.match(r"job (\S+): ", seen[-1])
            if match or not seen[-1]:
                break
        assert match, f"no job line on stderr: {seen!r}"
        job = match.group(1)
        wait_until(lambda: out.exists() and out.stat().st_size > 0, 60, "some output")
        first.send_signal(getattr(signal, how))
        code = first.wait(30)
        rest = first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    partial = out.read_bytes()
    assert 0 < partial.count(b"\n") < N, "the launcher was not stopped mid-job"
    store = RedisStore(fleet.settings.result_url)
    offset = store.journal(job)[2] or 0
    assert offset <= len(partial)
    if how == "SIGINT":
        assert code == 130, rest
        assert f"fleet run --resume {job}" in rest
        assert offset == len(partial)  # a clean stop journals all it wrote
        assert store.get_meta(job)["status"] == "interrupted"
    else:
        assert code == -signal.SIGKILL

    again = subprocess.run(
        [str(FLEET_BIN), "run", "--resume", job, "--out", str(out), "--json", *urls],
        capture_output=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert again.returncode == 0, again.stderr.decode()
    assert f"resuming job {job}" in again.stderr.decode()
    summary = json.loads(again.stdout)
    assert (summary["job"], summary["status"], summary["items"]) == (job, "ok", N)
    final = out.read_bytes()
    # IDs from a text file are strings; `slow` doubles them as numbers.
    exactly_once(out, [str(i) for i in range(N)], result=lambda i: 2 * int(i))
    # What the first launcher had journaled as written is kept as it was.
    assert final[:offset] == partial[:offset]
    assert store.journal(job)[2] == len(final)
    assert store.journal(job)[3] == N
    assert store.get_meta(job)["status"] == "ok"


# -- duplicates --------------------------------------------------------------------


def test_every_batch_published_twice_is_written_once(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    job = Background(fleet, out, 1000, 125, sends=2)
    summary = job.result(60)
    assert_job_complete(fleet, summary, out, n=1000, batch=125)


def test_a_batch_run_twice_by_hand_commits_once(fleet, tmp_path):
    """Two copies of one batch, taken by both slots at once: the first commit wins."""
    settings = fleet.settings
    store = RedisStore(settings.result_url)
    job = "jtest-dup-" + os.urandom(3).hex()
    store.put_meta(job, {"task": "slow", "status": "running"})
    client = make_app(settings)
    ids = list(range(300))
    sent = [
        client.send_task("fleet.batch", args=[job, 0, "slow", ids], queue=settings.queue)
        for _ in range(2)
    ]
    # Both copies run to the end: wait for each to be reported done by a worker.
    wait_until(lambda: all(_succeeded(fleet, r.id) for r in sent), 60, "both copies to run")
    k = _keys(job)
    announced = store.r.lrange(k["done"], 0, -1)
    assert len(announced) == 1, announced  # announced once
    assert json.loads(announced[0])["batch"] == 0
    assert store.committed(job, [0]) == [0]
    [(items, errors, lines)] = store.results(job, [0])
    assert (items, errors) == (300, 0)
    records = [json.loads(x) for x in bytes(lines).splitlines()]
    assert [r["id"] for r in records] == ids  # one copy's lines, not two
    assert all(r["result"] == 2 * r["id"] for r in records)
    assert not running(store, job)  # no lease left behind

    # A third copy after the commit is skipped outright.
    third = client.send_task("fleet.batch", args=[job, 0, "slow", ids], queue=settings.queue)
    wait_until(lambda: _succeeded(fleet, third.id), 30, "the third copy")
    assert store.r.llen(k["done"]) == 1
    assert _return_value(fleet, third.id) == "0"
    client.close()


def _succeeded(fleet: LocalFleet, task_id: str) -> bool:
    return any(
        f"fleet.batch[{task_id}] succeeded" in log_text(fleet, i.index) for i in fleet.instances
    )


def _return_value(fleet: LocalFleet, task_id: str) -> str | None:
    for inst in fleet.instances:
        m = re.search(
            rf"fleet\.batch\[{task_id}\] succeeded in [\d.e-]+s: (\S+)", log_text(fleet, inst.index)
        )
        if m:
            return m.group(1)
    return None
