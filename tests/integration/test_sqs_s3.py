"""The stack's default transport for real: an SQS broker and an S3 result store
(moto in server mode on a loopback port), real `celery worker` processes and
the real launcher, with the settings the stack gives the workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.store import open_store
from scripts.local.fleet import LocalFleet
from tests.support.aws import VISIBILITY, sqs_settings
from tests.support.checker import exactly_once


@pytest.mark.timeout(120)
def test_job_completes_with_errors_recorded(aws, tmp_path):
    settings = sqs_settings(aws, "fleet-basic")
    out = tmp_path / "out.jsonl"
    with LocalFleet(2, settings=settings, workdir=tmp_path / "fleet"):
        summary = Launcher(settings).run(
            JobOptions(task="poison", source=Source.parse("range:0:1500"), out=out, progress=False)
        )
    rows = list(exactly_once(out, range(1500)).values())
    assert summary.items == 1500
    assert summary.errors == sum(1 for i in range(1500) if i % 7 == 0)
    assert all(r["result"] == r["id"] + 1 for r in rows if "result" in r)


@pytest.mark.timeout(180)
def test_killed_worker_batch_is_recovered_before_visibility_timeout(aws, tmp_path):
    """SQS would hide the dead worker's batch for 31 minutes; the lease brings it back."""
    settings = sqs_settings(aws, "fleet-kill")
    out = tmp_path / "out.jsonl"
    n = 400
    with LocalFleet(
        2, settings=settings, workdir=tmp_path / "fleet", env={"FLEET_TEST_ITEM_MS": "40"}
    ) as fleet:
        result: dict = {}
        launcher = threading.Thread(
            target=lambda: result.update(
                summary=Launcher(settings).run(
                    JobOptions(
                        task="slow",
                        source=Source.parse(f"range:0:{n}"),
                        batch_size=25,
                        out=out,
                        progress=False,
                    )
                )
            )
        )
        started = time.monotonic()
        launcher.start()
        victim = fleet.instances[0].proc
        # Wait until the victim's heartbeat says it runs a batch (it takes them back to
        # back from then on), then kill the whole worker. Not its pool's CPU time: a pool
        # process on a loaded machine can spend that starting up, and the victim then
        # died before it took any batch (nothing to recover: resent 0).
        store = open_store(settings)
        deadline = time.monotonic() + 60
        while not any(
            w["hostname"].startswith("instance0-") and w.get("active", 0) > 0
            for w in store.workers()
        ):
            assert time.monotonic() < deadline, "the victim never ran a batch"
            time.sleep(0.05)
        # Batches of a second, and the job still running: the kill lands mid-batch, not
        # after the victim's last one (reading heartbeats from moto's S3 is slow under load).
        assert launcher.is_alive(), "the job ended before the victim could be killed"
        os.killpg(victim.pid, signal.SIGKILL)
        launcher.join(timeout=150)
        elapsed = time.monotonic() - started
    assert not launcher.is_alive(), "the job did not finish"
    rows = list(exactly_once(out, range(n)).values())
    assert all(r["result"] == 2 * r["id"] for r in rows)
    assert result["summary"].resent >= 1
    assert elapsed < VISIBILITY / 10, f"took {elapsed:.0f} s: waited for the visibility timeout"


@pytest.mark.timeout(180)
def test_submitted_job_on_sqs_and_s3(aws, tmp_path):
    """The stack's default: the uploaded IDs, the driver's hold, the job's listing and its
    results all live in the S3 store."""
    from app.launcher.driver import submit
    from app.launcher.jobs import results, views, wait

    settings = sqs_settings(aws, "fleet-submit")
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{i}\n" for i in range(800)))
    with LocalFleet(2, settings=settings, workdir=tmp_path / "fleet"):
        launcher = Launcher(settings)
        job = submit(
            launcher,
            JobOptions(task="poison", source=Source.parse(str(ids)), batch_size=50, progress=False),
        )
        view = wait(launcher.store, settings, job, timeout=120)
        assert (view.state, view.items, view.errors) == ("errors", 800, len(range(0, 800, 7)))
        assert [v.job for v in views(launcher.store, settings)] == [job]
        records = [
            json.loads(line)
            for chunk in results(launcher.store, settings, job)
            for line in chunk.splitlines()
        ]
    rows = exactly_once(records, [str(i) for i in range(800)])
    assert all(r["result"] == int(r["id"]) + 1 for r in rows.values() if "result" in r)
