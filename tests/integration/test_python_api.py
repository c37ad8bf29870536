"""The Python API (app/fleet.py) against real workers, on both brokers: fleet.map, Pool,
Executor, job handles and the joblib backend, compared with multiprocessing's answers on
the same functions and items.

The fleet is found as a user's script finds it: here the FLEET_* variables of the
shared test fleet, with no local fleet's state to fall back on.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import joblib
import pytest

from app import fleet
from app.launcher.dispatch import running_batches
from app.launcher.stream import READ_AHEAD
from app.store import bit_is_set, open_store
from tests.bench.bench_fleet import RSS_10M_MAX_MB
from tests.support import fleet_tasks as tasks
from tests.support.paths import ROOT
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def on_fleet(fleet, monkeypatch):
    """The shared fleet, found through FLEET_* variables as a user's script would."""
    for name in list(os.environ):
        if name.startswith(("FLEET_", "CELERY_")):
            monkeypatch.delenv(name)
    for name, value in fleet.settings.as_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLEET_STATE_DIR", "/nonexistent/celery-fleet-test")
    return fleet


def committed(store, job: str) -> int:
    bits = store.journal(job)[0]
    return sum(bit_is_set(bits, b) for b in range(len(bits) * 8))


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_a_million_items_from_a_generator_each_once_in_bounded_memory(on_fleet, ordered):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "tests.support.map_million", "1000000"]
        + (["--ordered"] if ordered else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert report["count"] == 1_000_000 and report["once"], report
    if ordered:
        assert report["in_order"], report
    # The same ceiling as `fleet run` over ten times as many IDs (tests/bench).
    assert report["rss_mb"] < RSS_10M_MAX_MB, report


def test_results_come_as_multiprocessing_gives_them(on_fleet):
    items = list(range(300))
    with multiprocessing.Pool(2) as local:
        want_unordered = sorted(local.imap_unordered(tasks.squared, items))
        want_imap = list(local.imap(tasks.squared, items))
        want_map = local.map(tasks.double, items)
        want_star = local.starmap(tasks.plus, [(i, 2 * i) for i in items])
    with fleet.Pool() as pool:
        assert sorted(pool.imap_unordered(tasks.squared, items)) == want_unordered
        assert list(pool.imap(tasks.squared, items)) == want_imap
        assert pool.map(tasks.double, items, chunksize=7) == want_map
        assert pool.starmap(tasks.plus, [(i, 2 * i) for i in items]) == want_star
    assert [r for _, r in fleet.map(tasks.squared, items, ordered=True)] == want_imap
    # The caller's own items come back beside their results (a tuple stays a tuple).
    pairs = list(fleet.map(tasks.noop, [(1, "a"), (2, "b")], ordered=True))
    assert pairs == [((1, "a"), [1, "a"]), ((2, "b"), [2, "b"])]


def test_executor_answers_as_a_process_pool_executor(on_fleet):
    items = list(range(2000))
    with concurrent.futures.ProcessPoolExecutor(2) as local:
        want = sorted(
            f.result()
            for f in concurrent.futures.as_completed(
                [local.submit(tasks.plus, i, b=3) for i in items]
            )
        )
        want_map = list(local.map(tasks.plus, items, items))
    with fleet.Executor() as ex:
        futures = [ex.submit(tasks.plus, i, b=3) for i in items]
        done, not_done = concurrent.futures.wait(futures, timeout=120)
        assert len(done) == len(items)
        assert not not_done
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == want
        assert list(ex.map(tasks.plus, items, items)) == want_map
        failing = ex.submit(tasks.odd_fails, 3)
        with pytest.raises(tasks.Odd, match="odd item 3"):
            failing.result(timeout=60)
        # Gathered into batches: far fewer messages than calls.
        job = ex._feeds["**tests.support.fleet_tasks:plus"][1].job
        meta = open_store(on_fleet.settings).get_meta(job)
        assert meta["task"] == "**tests.support.fleet_tasks:plus"
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.plus, 1)


def test_joblib_parallel_gives_the_serial_results(on_fleet):
    fleet.register_joblib()
    want = [tasks.squared(i) for i in range(500)]
    with joblib.parallel_backend("fleet"):
        got = joblib.Parallel()(joblib.delayed(tasks.squared)(i) for i in range(500))
    assert got == want
    with joblib.parallel_backend("fleet"), pytest.raises(tasks.Odd):
        joblib.Parallel()(joblib.delayed(tasks.odd_fails)(i) for i in range(10))


def test_an_item_error_is_raised_as_its_own_type_or_returned(on_fleet):
    with pytest.raises(tasks.Odd, match="odd item 1") as info:
        list(fleet.map(tasks.odd_fails, [0, 1, 2], ordered=True, chunksize=1))
    assert info.value.item == 1
    assert "raise Odd" in info.value.remote_traceback
    assert any("raised on the fleet for item 1" in n for n in info.value.__notes__)
    got = dict(fleet.map(tasks.odd_fails, range(6), return_exceptions=True))
    assert [got[i] for i in (0, 2, 4)] == [0, 2, 4]
    assert all(isinstance(got[i], tasks.Odd) for i in (1, 3, 5))
    # A built-in type comes back as itself.
    with pytest.raises(ValueError, match="poison id 7"):
        list(fleet.map(tasks.poison, [7]))


def loop_until_it_raises() -> None:
    """A plain loop over fleet.map, no `with`, that raises in its body."""
    for n, _ in enumerate(fleet.map(tasks.slow, range(100_000), chunksize=5)):
        if n == 20:
            raise RuntimeError("the caller's own error")


def assert_cancelled(store, job: str) -> None:
    """Marked cancelled, nothing of it running, and nothing more of it runs."""
    assert store.get_meta(job)["status"] == "cancelled"
    assert not running_batches(store.busy_slots(), job)
    before = committed(store, job)
    time.sleep(3)
    assert committed(store, job) == before, "a batch of the cancelled job ran"
    assert before < 100_000 // 5 // 10


def test_an_exception_in_the_loop_cancels_the_rest(on_fleet):
    store = open_store(on_fleet.settings)
    with (
        pytest.raises(RuntimeError, match="caller"),
        fleet.map(tasks.slow, range(100_000), chunksize=5) as results,
    ):
        for n, _ in enumerate(results):
            if n == 20:
                raise RuntimeError("the caller's own error")
    assert results.job
    assert_cancelled(store, results.job)
    # No `with`: the loop's iterator, let go as the exception leaves the loop, cancels.
    before = {j.id for j in fleet.jobs()}
    with pytest.raises(RuntimeError, match="caller"):
        loop_until_it_raises()
    (job,) = {j.id for j in fleet.jobs()} - before
    assert_cancelled(store, job)


def test_ctrl_c_cancels_the_job(on_fleet, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(
        "import sys\n"
        "from app import fleet\n"
        "from tests.support.fleet_tasks import slow\n"
        "results = fleet.map(slow, range(100_000), chunksize=5)\n"
        "for n, _ in enumerate(results):\n"
        "    if n == 0:\n"
        "        print(results.job, flush=True)\n"
    )
    p = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    job = p.stdout.readline().decode().strip()
    assert job, p.stderr.read().decode()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and b"KeyboardInterrupt" in err
    store = open_store(on_fleet.settings)
    wait_until(lambda: store.get_meta(job)["status"] == "cancelled", 20, "job cancelled")
    before = committed(store, job)
    time.sleep(2)
    assert committed(store, job) == before


def test_a_submitted_job_is_followed_by_its_handle(on_fleet):
    job = fleet.submit(tasks.double, [str(i) for i in range(500)], chunksize=50)
    assert job.id in [j.id for j in fleet.jobs()]
    view = job.wait(timeout=120)
    assert view.state == "ok" and view.items == 500
    assert job.progress().items == 500
    assert sorted(r for _, r in job.results()) == [2 * i for i in range(500)]
    ranged = fleet.submit("poison", "range:0:50", chunksize=10)
    assert ranged.wait(timeout=120).errors == 8
    pairs = dict(ranged.results(return_exceptions=True))
    assert isinstance(pairs[14], ValueError) and pairs[15] == 16
    with pytest.raises(ValueError):
        list(ranged.results())
    long = fleet.submit(tasks.slow, "range:0:100000", chunksize=5)
    wait_until(lambda: long.progress().items > 0, 60, "the job running")
    assert long.cancel().state == "cancelled"
    with pytest.raises(fleet.Cancelled):
        long.wait(timeout=30)


def test_a_non_json_item_is_refused_at_once(on_fleet):
    with pytest.raises(fleet.BadInput, match=r"item 0 \(<object object.*cannot be sent"):
        fleet.map(tasks.squared, [object()])
    with pytest.raises(fleet.BadInput, match=r"item 3 .*travel as JSON"):
        fleet.map(tasks.squared, [1, 2, {3}, object()], chunksize=1)
    # Past the items read ahead, found as its batch is cut: the job stops there.
    late = itertools.chain(range(READ_AHEAD + 10), [object()])
    results = fleet.map(tasks.squared, late, chunksize=1000)
    with pytest.raises(fleet.BadInput, match=r"item 10 of batch 100 .*travel as JSON"):
        list(results)
    meta = open_store(on_fleet.settings).get_meta(results.job)
    assert meta["status"] == "failed" and "item 10 of batch 100" in meta["reason"]
    with fleet.Executor() as ex, pytest.raises(fleet.BadInput, match="cannot be sent"):
        ex.submit(tasks.plus, object())
