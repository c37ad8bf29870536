"""Jobs that live in the fleet: `fleet submit`, and `jobs`, `wait`, `results` and `cancel`
from other processes, against real workers on both brokers.

The driver of a submitted job runs in a worker's main process (app/worker/drivers.py):
the tests kill that worker mid-job and check another takes the job over from the
journal, every ID still written exactly once.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import subprocess
import time
import uuid

import psutil
import pytest

from app.launcher import JobOptions, Source
from app.launcher.dispatch import driver_lease, driver_slot
from app.store import bit_is_set, open_store
from tests.support.checker import exactly_once
from tests.support.cli import fleet_cmd
from tests.support.fleets import settle
from tests.support.jobs import Recording
from tests.support.paths import FLEET_BIN, ROOT
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)


def submit(settings, *args: str, stdin: bytes | None = None) -> str:
    p = fleet_cmd(settings, "submit", *args, stdin=stdin)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode().strip()


def results(settings, job: str) -> list[dict]:
    p = fleet_cmd(settings, "results", job)
    assert p.returncode == 0, p.stderr.decode()
    return [json.loads(line) for line in p.stdout.splitlines()]


def committed(store, job: str) -> int:
    bits = store.journal(job)[0]
    return sum(bit_is_set(bits, b) for b in range(len(bits) * 8))


def test_submitted_job_outlives_its_submitter_and_runs_once(fleet, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{i}\n" for i in range(3000)))
    started = time.monotonic()
    job = submit(fleet.settings, "double", "--ids", str(ids), "--batch-size", "100")
    # The submitter is gone: it returned as soon as the job was recorded.
    assert time.monotonic() - started < 30
    ids.unlink()  # uploaded: the job needs the file no more
    p = fleet_cmd(fleet.settings, "wait", job, "--json")
    assert p.returncode == 0, p.stderr.decode()
    view = json.loads(p.stdout)
    assert (view["state"], view["items"], view["errors"], view["total"]) == ("ok", 3000, 0, 3000)
    exactly_once(results(fleet.settings, job), [str(i) for i in range(3000)], lambda i: int(i) * 2)

    watched = fleet_cmd(fleet.settings, "watch", job)
    assert watched.returncode == 0 and "3.00k/3.00k" in watched.stderr.decode(), watched.stderr
    listed = fleet_cmd(fleet.settings, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    row = next(r for r in json.loads(listed.stdout) if r["job"] == job)
    assert (row["state"], row["items"], row["in_fleet"], row["out"]) == ("ok", 3000, True, "store")


def test_stdin_and_ranges_are_submitted_too(fleet):
    job = submit(fleet.settings, "double", "--ids", "-", stdin=b"5\n6\n7\n")
    ranged = submit(fleet.settings, "double", "--ids", "range:0:500")
    for j in (job, ranged):
        assert fleet_cmd(fleet.settings, "wait", j).returncode == 0
    exactly_once(results(fleet.settings, job), ["5", "6", "7"], lambda i: int(i) * 2)
    exactly_once(results(fleet.settings, ranged), range(500), lambda i: i * 2)


def test_driver_killed_mid_job_another_worker_finishes_it_exactly_once(make_fleet):
    fleet = make_fleet(instances=2, lease_seconds=2, env={"FLEET_TEST_ITEM_MS": "1"})
    store = open_store(fleet.settings)
    n = 4000
    job = submit(fleet.settings, "slow", "--ids", f"range:0:{n}", "--batch-size", "100")
    lease = driver_lease(fleet.settings.lease_seconds)

    def driver_pid() -> int | None:
        holders = store.slot_holders(driver_slot(job), lease)
        if not holders or committed(store, job) < 5:
            return None
        name = holders[0].removeprefix("driver@")
        return next((int(w["pid"]) for w in store.workers() if w["name"] == name), None)

    pid = wait_until(driver_pid, 60, "the job's driver to hold it and batches to commit")
    inst = next(i for i in fleet.instances if i.proc is not None and i.proc.pid == pid)
    main = psutil.Process(pid)
    for p in [*main.children(recursive=True), main]:
        p.kill()
    inst.proc.wait(10)
    before = committed(store, job)
    assert before < n // 100, "the job ended before its driver was killed"

    def ended() -> bool:
        fleet.supervise()  # the killed instance comes back, as systemd would bring it
        meta = store.get_meta(job) or {}
        return meta.get("status") == "ok"

    wait_until(ended, 150, "the job to end under another driver", poll=0.5)
    assert inst.restarts >= 1
    holders_seen = store.get_meta(job)
    assert holders_seen is not None and holders_seen["total"] == n
    exactly_once(results(fleet.settings, job), range(n), lambda i: i * 2)
    settle(fleet)


def test_cancel_stops_the_job_and_its_queued_batches(make_fleet):
    fleet = make_fleet(instances=2, lease_seconds=2, env={"FLEET_TEST_ITEM_MS": "2"})
    store = open_store(fleet.settings)
    job = submit(fleet.settings, "slow", "--ids", "range:0:20000", "--batch-size", "100")
    wait_until(lambda: committed(store, job) >= 3, 60, "batches of the job to commit")
    p = fleet_cmd(fleet.settings, "cancel", job)
    assert p.returncode == 0, p.stderr.decode()
    assert "cancelled" in p.stderr.decode()
    # Acknowledged: no batch of the job runs now, and none starts later.
    assert not [m for m in store.busy_slots() if m.startswith(f"{job}/")]
    done = committed(store, job)
    time.sleep(3)
    assert committed(store, job) == done
    assert done < 200
    w = fleet_cmd(fleet.settings, "wait", job)
    assert w.returncode == 5, w.stderr.decode()
    # What was written stays, and nothing else is there.
    records = results(fleet.settings, job)
    assert len(records) == len({r["id"] for r in records}) == 100 * done
    settle(fleet)


def test_bad_requests_say_one_line_and_exit_2(fleet, tmp_path):
    s = fleet.settings
    cases = [
        (("cancel", "j-nope"), "no job 'j-nope'"),
        (("results", "j-nope"), "no job 'j-nope'"),
        (("wait", "j-nope"), "no job 'j-nope'"),
        (("submit", "double", "--ids", "range:0:5", "--out", "ftp://x/y"), "no sink for ftp"),
        (("submit", "double", "--ids", "range:0:5", "--out", str(tmp_path / "f")), "stay in"),
        (("submit", "double", "--ids", str(tmp_path / "missing.txt")), "does not exist"),
        (("submit", "double"), "give a TASK and --ids"),
    ]
    for args, said in cases:
        p = fleet_cmd(s, *args)
        err = p.stderr.decode()
        assert p.returncode == 2, (args, err)
        assert said in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    # A job whose task the workers refuse ends failed, with the reason, exit 2 to `wait`.
    job = submit(s, "no_such_task", "--ids", "range:0:10")
    p = fleet_cmd(s, "wait", job)
    assert p.returncode == 2 and "unknown task" in p.stderr.decode(), p.stderr.decode()


def test_an_unreachable_store_is_one_line_and_exit_3(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env["FLEET_STATE_DIR"] = str(tmp_path)
    for verb in (("jobs",), ("wait", "j1"), ("results", "j1"), ("cancel", "j1")):
        p = subprocess.run(
            [
                str(FLEET_BIN),
                *verb,
                "--broker",
                "redis://127.0.0.1:9/0",
                "--backend",
                "redis://127.0.0.1:9/0",
            ],
            capture_output=True,
            timeout=60,
            env=env,
            cwd=ROOT,
        )
        err = p.stderr.decode()
        assert p.returncode == 3 and err.count("\n") == 1 and "Traceback" not in err, (verb, err)


ADD = "tests.support.fleet_tasks:add"


def test_reduce_counts_a_batch_run_twice_once(fleet, tmp_path):
    """Every batch is published twice (each runs twice, commits once): the reduced value is
    the serial fold's, attached (`fleet run`) and submitted alike."""
    launcher = Recording(fleet.settings, sends=2)
    opts = JobOptions(
        task="double",
        source=Source.parse("range:0:5000"),
        batch_size=250,
        out=tmp_path / "out.jsonl",
        progress=False,
        reduce=ADD,
    )
    summary = launcher.run(opts)
    assert summary.reduced == functools.reduce(operator.add, (2 * i for i in range(5000)))
    exactly_once(tmp_path / "out.jsonl", range(5000), lambda i: 2 * i)

    job = submit(fleet.settings, "poison", "--ids", "range:0:3000", "--reduce", ADD)
    assert fleet_cmd(fleet.settings, "wait", job).returncode == 1  # poison: errors
    p = fleet_cmd(fleet.settings, "results", job, "--reduced")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout) == sum(i + 1 for i in range(3000) if i % 7)
    settle(fleet)


def test_a_bad_reducer_is_one_line(fleet):
    cases = [
        ("run", "nope_module:f", "cannot import"),
        ("run", "justaname", "module:function"),
        ("submit", "justaname", "module:function"),
    ]
    for verb, name, said in cases:
        p = fleet_cmd(fleet.settings, verb, "double", "--ids", "range:0:5", "--reduce", name)
        err = p.stderr.decode()
        assert p.returncode == 2 and said in err and err.count("\n") == 1, (verb, err)
    # Not one of the workers' task modules (the driver runs in the fleet): the job fails,
    # saying why, and `wait` exits 2.
    for name in ("operator:add", "nope_module:f"):
        job = submit(fleet.settings, "double", "--ids", "range:0:5", "--reduce", name)
        p = fleet_cmd(fleet.settings, "wait", job)
        assert p.returncode == 2 and "--reduce" in p.stderr.decode(), p.stderr.decode()


def test_retry_runs_exactly_the_failed_ids_and_replaces_their_records(fleet, tmp_path):
    """`flaky` fails every 7th ID the first time only: a retry of the job runs those IDs
    alone, and `fleet results` of the first job then holds their results, not errors."""
    n, token = 700, uuid.uuid4().hex  # the markers of `flaky` outlive the test
    ids = [f"{token}:{i}" for i in range(n)]
    src = tmp_path / "ids.txt"
    src.write_text("".join(f"{i}\n" for i in ids))
    job = submit(fleet.settings, "flaky", "--ids", str(src), "--batch-size", "50")
    assert fleet_cmd(fleet.settings, "wait", job).returncode == 1
    failed = [f"{token}:{i}" for i in range(n) if i % 7 == 0]
    assert sorted(r["id"] for r in results(fleet.settings, job) if "error" in r) == sorted(failed)

    p = fleet_cmd(fleet.settings, "retry", job, "--json")
    assert p.returncode == 0, p.stderr.decode()
    again = json.loads(p.stdout)
    assert again["ids"] == len(failed)
    assert fleet_cmd(fleet.settings, "wait", again["job"]).returncode == 0
    number = lambda i: int(i.partition(":")[2]) + 1  # noqa: E731
    # Only those IDs ran again.
    exactly_once(results(fleet.settings, again["job"]), failed, number)
    exactly_once(results(fleet.settings, job), ids, number)
    # Nothing left to retry.
    p = fleet_cmd(fleet.settings, "retry", job)
    assert p.returncode == 2 and "no error record" in p.stderr.decode(), p.stderr.decode()


def test_a_small_job_beside_a_large_one_finishes_in_about_its_own_time(make_fleet):
    """Two jobs on one fleet: each driver keeps its own window of batches on the queue, so a
    small job's batches wait behind a few of the large one's, not behind all of them."""
    fleet = make_fleet(instances=2, lease_seconds=2, env={"FLEET_TEST_ITEM_MS": "2"})
    store = open_store(fleet.settings)
    large = submit(fleet.settings, "slow", "--ids", "range:0:30000", "--batch-size", "100")
    wait_until(lambda: committed(store, large) >= 5, 60, "the large job to be under way")
    started = time.monotonic()
    small = submit(fleet.settings, "slow", "--ids", "range:0:400", "--batch-size", "100")
    p = fleet_cmd(fleet.settings, "wait", small)
    took = time.monotonic() - started
    assert p.returncode == 0, p.stderr.decode()
    # The large job holds 60 s of its two slots' work: the small one (under a second of
    # it) ends long before, within a bound that leaves room for a slow machine.
    assert (store.get_meta(large) or {}).get("status") == "running"
    assert took < 20, f"the small job took {took:.1f} s beside the large one"
    exactly_once(results(fleet.settings, small), range(400), lambda i: 2 * i)
    assert fleet_cmd(fleet.settings, "cancel", large).returncode == 0
    settle(fleet)


def test_a_driver_reads_no_file_of_its_worker(fleet):
    """A job written into the result store by hand, naming a path on the workers as its
    IDs: the driver refuses it (whoever can write to the store must not read a worker's
    files through a job), and the job ends failed, saying why."""
    store = open_store(fleet.settings)
    job = "j20991231-000000-abcdef"
    store.put_meta(
        job,
        {
            "task": "echo",
            "source": {"spec": "/etc/hostname", "fmt": "text", "column": None, "field": None},
            "total": 1,
            "status": "submitted",
            "driver": "fleet",
            "out": "store",
        },
    )
    store.add_driven(fleet.settings.queue, job)
    p = fleet_cmd(fleet.settings, "wait", job, "--timeout", "60")
    assert p.returncode == 2, p.stderr.decode()
    assert "reads only IDs uploaded" in p.stderr.decode()
    assert store.journal(job)[3] == 0
