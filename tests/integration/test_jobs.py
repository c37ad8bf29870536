"""Jobs end to end on real fleets (Redis and RabbitMQ brokers, real `celery worker`s).

Every test checks the output the user gets: each input ID exactly once, with
the right result or an error record, and a summary that counts what happened.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import threading
import time

import pytest

from app.celery_config import make_app
from app.launcher.job import BadInput
from app.store.redis import RedisStore
from tests.support.checker import exactly_once
from tests.support.cli import fleet_cmd
from tests.support.fleets import settle
from tests.support.jobs import run_job
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def settled(fleet):
    """After the module, let what its tests left queued (a refused job's other probes) run
    out before other modules use the shared fleet."""
    yield
    settle(fleet)


# -- sizes and sources ----------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size"),
    [(1, None), (7, 3), (1000, None), (1000, 7), (100_000, None)],
    ids=["1", "7-by-3", "1000-auto", "1000-by-7", "100k-auto"],
)
def test_range_jobs_of_every_size(fleet, tmp_path, n, batch_size):
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "double", f"range:0:{n}", out, batch_size=batch_size)
    records = exactly_once(out, list(range(n)))
    assert all(r == {"id": i, "result": 2 * i} for i, r in records.items())
    assert (summary.status, summary.items, summary.errors) == ("ok", n, 0)
    if batch_size:
        assert summary.batches == -(-n // batch_size)
    assert summary.out == str(out)


def test_range_with_an_offset_start(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "echo", "range:5000:5250", out, batch_size=16)
    records = exactly_once(out, list(range(5000, 5250)))
    assert all(r["result"] == i for i, r in records.items())
    assert summary.items == 250


@pytest.mark.parametrize(("n", "batch_size"), [(1, None), (7, None), (1000, 64), (100_000, None)])
def test_text_file_of_string_ids(fleet, tmp_path, n, batch_size):
    ids = [f"user-{i:06d}" for i in range(n)]
    src = tmp_path / "ids.txt"
    src.write_text("\n".join(ids) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "echo", str(src), out, batch_size=batch_size)
    records = exactly_once(out, ids)
    assert all(r == {"id": i, "result": i} for i, r in records.items())
    assert (summary.status, summary.items) == ("ok", n)


def test_text_file_with_crlf_and_no_final_newline(fleet, tmp_path):
    ids = [str(i) for i in range(300)]
    src = tmp_path / "ids.txt"
    src.write_bytes("\r\n".join(ids).encode())
    out = tmp_path / "out.jsonl"
    run_job(fleet, "double", str(src), out)
    records = exactly_once(out, ids)
    assert all(r["result"] == 2 * int(i) for i, r in records.items())


def test_csv_file_by_column(fleet, tmp_path):
    src = tmp_path / "ids.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "item_id", "note"])
        for i in range(1000):
            w.writerow([f"n{i}", str(i * 3), 'a, quoted "note"'])
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "double", str(src), out, column="item_id", batch_size=100)
    expected = [str(i * 3) for i in range(1000)]  # CSV cells are strings
    records = exactly_once(out, expected)
    assert all(r["result"] == 2 * int(i) for i, r in records.items())
    assert summary.items == 1000


def test_jsonl_file_by_field(fleet, tmp_path):
    src = tmp_path / "ids.jsonl"
    values = [i if i % 2 else f"s{i}" for i in range(1000)]  # ints and strings
    src.write_text("".join(json.dumps({"k": v, "other": [1, 2]}) + "\n" for v in values))
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "echo", str(src), out, field="k")
    records = exactly_once(out, values)
    assert all(r["result"] == i for i, r in records.items())
    assert summary.items == 1000


# -- per-item errors --------------------------------------------------------


def test_poison_items_become_error_records(fleet, tmp_path):
    n = 1000
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "poison", f"range:0:{n}", out, batch_size=100)
    records = exactly_once(out, list(range(n)))
    bad = [i for i in range(n) if i % 7 == 0]
    for i, r in records.items():
        if i % 7 == 0:
            assert r["error"].pop("traceback").endswith(f"ValueError: poison id {i}\n")
            assert r == {"id": i, "error": {"type": "ValueError", "message": f"poison id {i}"}}
        else:
            assert r == {"id": i, "result": i + 1}  # the rest of the batch ran
    assert summary.status == "errors"
    assert (summary.items, summary.errors) == (n, len(bad))
    assert summary.batches == 10


# -- which functions a job may name ------------------------------------------


def test_module_function_from_an_included_module(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "tests.support.fleet_tasks:defined_here", "range:0:50", out)
    records = exactly_once(out, list(range(50)))
    assert all(r["result"] == f"plain-{i}" for i, r in records.items())
    assert summary.status == "ok"


@pytest.mark.parametrize(
    ("task", "batch_size"),
    [
        ("os:system", None),
        ("tests.support.fleet_tasks:system", None),
        ("tests.support.fleet_tasks:system", 2),
        ("tests.support.fleet_tasks:_private", 2),
        ("tests.support.fleet_tasks:os.system", 2),
    ],
)
def test_functions_not_allowed_are_refused_and_never_run(fleet, tmp_path, task, batch_size):
    marker = tmp_path / "pwned"
    # Were os.system ever called on an ID, it would create the marker file.
    src = tmp_path / "ids.txt"
    src.write_text("".join(f"touch {marker}-{i}\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    with pytest.raises(BadInput, match="unknown task"):
        run_job(fleet, task, str(src), out, batch_size=batch_size)
    # Let every batch already queued for the refused job reach a worker: a
    # job sent after them finishes only once the queue got past them.
    run_job(fleet, "echo", "range:0:8", tmp_path / "after.jsonl", batch_size=1)
    assert not list(tmp_path.glob("pwned*"))
    # Refused while calibrating, the job never opened its output; later, it wrote nothing.
    assert not out.exists() or out.read_bytes() == b""


# -- the command line ------------------------------------------------------------


def fleet_cli(fleet, *args: str, stdin: bytes | None = None, timeout: float = 90):
    return fleet_cmd(fleet.settings, "run", *args, stdin=stdin, timeout=timeout)


def test_cli_success_exits_0_and_prints_a_json_summary(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    p = fleet_cli(fleet, "double", "--ids", "range:0:500", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr.decode()
    summary = json.loads(p.stdout)  # with --out, stdout holds the summary alone
    assert summary["status"] == "ok"
    assert (summary["items"], summary["errors"]) == (500, 0)
    assert summary["out"] == str(out)
    assert summary["job"] in p.stderr.decode()
    records = exactly_once(out, list(range(500)))
    assert all(r["result"] == 2 * i for i, r in records.items())


def test_cli_exits_1_when_items_failed(fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    p = fleet_cli(
        fleet, "poison", "--ids", "range:0:100", "--batch-size", "10", "--out", str(out), "--json"
    )
    assert p.returncode == 1, p.stderr.decode()
    summary = json.loads(p.stdout)
    assert summary["status"] == "errors"
    assert (summary["items"], summary["errors"]) == (100, 15)
    records = exactly_once(out, list(range(100)))
    assert sum("error" in r for r in records.values()) == 15


@pytest.mark.parametrize(("n", "batch_size"), [(2500, "auto"), (1, "auto"), (300, "7")])
def test_cli_reads_ids_from_stdin_and_writes_results_to_stdout(fleet, n, batch_size):
    # stdin is read once: the calibration probes must not swallow the IDs after them.
    ids = [f"id{i}" for i in range(n)]
    p = fleet_cli(
        fleet,
        "echo",
        "--ids",
        "-",
        "--batch-size",
        batch_size,
        "--json",
        stdin=("\n".join(ids) + "\n").encode(),
    )
    assert p.returncode == 0, p.stderr.decode()
    records = exactly_once([json.loads(line) for line in p.stdout.splitlines()], ids)
    assert all(r["result"] == i for i, r in records.items())
    # Without --out the summary goes to stderr, keeping stdout for results.
    summaries = [json.loads(line) for line in p.stderr.splitlines() if line.startswith(b"{")]
    assert len(summaries) == 1
    assert (summaries[0]["items"], summaries[0]["status"], summaries[0]["out"]) == (n, "ok", "-")


def test_cli_refuses_empty_stdin(fleet):
    p = fleet_cli(fleet, "echo", "--ids", "-", stdin=b"")
    assert p.returncode == 2, p.stderr.decode()
    assert b"no IDs" in p.stderr
    assert p.stdout == b""


def test_cli_refuses_an_unknown_task_with_exit_2(fleet, tmp_path):
    p = fleet_cli(fleet, "os:system", "--ids", "range:0:3", "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    assert b"unknown task" in p.stderr


def test_marking_batches_written_twice_counts_them_once(fleet):
    # The store client retries a call whose reply timed out: the journal's
    # counters (a resumed job's progress) must not count the batches again.
    store = RedisStore(fleet.settings.result_url)
    job = f"twice-{os.getpid()}-{time.time_ns()}"
    for _ in range(2):
        store.mark_written(job, [0, 3], 120, 50, 2)
    store.mark_written(job, [1], 160, 25, 0)
    _, written, offset, items, errors = store.journal(job)
    assert (offset, items, errors) == (160, 75, 2)
    assert [i for i in range(4) if written[i // 8] >> (7 - i % 8) & 1] == [0, 1, 3]


def test_batches_leave_nothing_in_celerys_result_backend(fleet, tmp_path):
    # The batch writes its results to the store itself; a Celery result per batch
    # (the message header overrides the task's ignore_result) would cost two more
    # store round trips each and pile up keys until they expire.
    store = RedisStore(fleet.settings.result_url)
    before = set(store.r.scan_iter("celery-task-meta-*"))
    out = tmp_path / "out.jsonl"
    summary = run_job(fleet, "double", "range:0:500", out, batch_size=50)
    assert (summary.status, summary.batches) == ("ok", 10)
    assert set(store.r.scan_iter("celery-task-meta-*")) - before == set()


# -- monitoring --------------------------------------------------------------------


def test_task_events_only_while_asked_for(fleet, tmp_path):
    """Workers send no task events by default: each batch's three would cost the
    worker's cores broker messages. Asked as Flower asks (enable_events), they do."""
    client = make_app(fleet.settings)
    events: list[dict] = []
    stop = threading.Event()

    def capture() -> None:
        with client.connection_for_read() as conn:
            recv = client.events.Receiver(conn, handlers={"*": events.append})
            while not stop.is_set():
                with contextlib.suppress(socket.timeout, TimeoutError):
                    recv.capture(limit=None, timeout=0.5)

    def seen(kind: str, since: int = 0) -> list[dict]:
        return [e for e in events[since:] if e["type"] == kind]

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    try:
        # The receiver is listening once it hears an event of this test's own.
        with client.connection_for_write() as conn:
            dispatcher = client.events.Dispatcher(conn, enabled=True)
            wait_until(
                lambda: dispatcher.send("fleet-probe") or seen("fleet-probe"),
                20,
                "the event receiver to listen",
            )
        summary = run_job(fleet, "double", "range:0:200", tmp_path / "quiet.jsonl", batch_size=20)
        assert summary.items == 200 and summary.batches == 10
        time.sleep(1)  # the workers' event buffers flush within a second
        assert not [e for e in events if e["type"].startswith("task-")]

        mark = len(events)
        # A broadcast without replies may reach a worker after the job's batches did:
        # wait until every worker has said it now sends events.
        wait_until(
            lambda: len(client.control.enable_events(reply=True, timeout=1)) >= fleet.n_instances,
            20,
            "every worker to enable events",
        )
        summary = run_job(fleet, "double", "range:0:200", tmp_path / "watched.jsonl", batch_size=20)
        assert summary.items == 200
        wait_until(lambda: len(seen("task-received", mark)) >= 10, 20, "task-received events")
        assert {e["name"] for e in seen("task-received", mark)} == {"fleet.batch"}
        wait_until(lambda: len(seen("task-succeeded", mark)) >= 10, 20, "task-succeeded events")
    finally:
        client.control.disable_events()
        stop.set()
        thread.join(timeout=5)
        client.close()
