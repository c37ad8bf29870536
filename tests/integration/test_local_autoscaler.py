"""The local autoscaler with real brokers, a real result store and real `celery worker`s.

From an empty fleet a job must start running within seconds, the fleet must
grow to its maximum while there is work and go back to zero when there is
none, and an instance drained in the middle of a job must lose no batch and
write no result twice.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import replace

import pytest

from app.autoscale import Policy
from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.store import open_store
from scripts.local.autoscaler import local_autoscaler
from tests.support.checker import exactly_once

pytestmark = pytest.mark.timeout(150)

POLICY = Policy(max_instances=2, scale_out_cooldown=1.0, scale_in_delay=2.0)


@pytest.fixture
def autoscaled(make_fleet):
    """A fleet of zero instances and an autoscaler stepping every 0.25 s in a thread."""
    started = []

    def start(broker: str = "redis", policy: Policy = POLICY, **kwargs):
        fleet = make_fleet(0, broker, **kwargs)
        events: list[tuple[float, str]] = []
        scaler = local_autoscaler(fleet, policy, say=lambda m: events.append((time.monotonic(), m)))
        stop = threading.Event()
        thread = threading.Thread(target=scaler.run, args=(stop, 0.25), daemon=True)
        thread.start()
        started.append((stop, thread))
        return fleet, scaler, events

    yield start
    for stop, thread in started:  # before make_fleet stops the fleets
        stop.set()
        thread.join(10)


def live(fleet) -> int:
    return sum(1 for i in fleet.instances if i.proc is not None and not i.draining)


def start_job(fleet, task: str, n: int, out, **kwargs):
    result: dict = {}

    def go():
        result["summary"] = Launcher(fleet.settings).run(
            JobOptions(
                task=task, source=Source.parse(f"range:0:{n}"), out=out, progress=False, **kwargs
            )
        )

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_from_zero_to_max_and_back_to_zero(autoscaled, tmp_path, broker):
    fleet, _, events = autoscaled(broker, env={"FLEET_TEST_ITEM_MS": "150"}, lease_seconds=3)
    store = open_store(fleet.settings)
    time.sleep(1.0)
    assert live(fleet) == 0, "an idle fleet started an instance"

    out = tmp_path / "out.jsonl"
    submitted = time.monotonic()
    job, result = start_job(fleet, "slow", 60, out, target_seconds=0.6)
    first_batch = None
    peak = 0
    while job.is_alive() and time.monotonic() - submitted < 90:
        if first_batch is None and store.busy_slots():
            first_batch = time.monotonic() - submitted
        peak = max(peak, live(fleet))
        time.sleep(0.02)
    job.join(5)
    assert not job.is_alive(), "the job did not finish"
    print(
        f"\n{broker}: first batch running {first_batch:.2f} s after the job was submitted "
        "to a fleet of zero instances"
    )
    # The target is 5 s; the bound leaves room for a loaded machine.
    assert first_batch is not None and first_batch < 8.0
    assert peak == 2, f"the fleet never grew to its maximum: {events}"
    rows = list(exactly_once(out, range(60)).values())
    assert all(r["result"] == 2 * r["id"] for r in rows)
    assert result["summary"].status == "ok"

    finished = time.monotonic()
    while fleet.instances and time.monotonic() - finished < 30:
        time.sleep(0.2)
    idle_to_zero = time.monotonic() - finished
    assert not fleet.instances, f"still {len(fleet.instances)} instances 30 s after the job"
    print(
        f"{broker}: back to zero instances {idle_to_zero:.1f} s after the job ended "
        f"(scale-in delay {POLICY.scale_in_delay:g} s)"
    )
    assert any("-> 0 instances" in m for _, m in events)


def test_busy_instance_drained_mid_job_loses_nothing(autoscaled, tmp_path):
    """Scale-in that takes a busy instance (the race the idle check cannot close) is safe:
    the warm shutdown finishes the running batch and hands the reserved one back."""
    fleet, scaler, events = autoscaled("redis", env={"FLEET_TEST_ITEM_MS": "80"}, lease_seconds=5)
    out = tmp_path / "out.jsonl"
    n = 120
    job, result = start_job(fleet, "slow", n, out, batch_size=8)
    store = open_store(fleet.settings)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        # Read from the workers' heartbeats, not through the provider the autoscaler
        # thread is using.
        workers = store.workers()
        busy = [w["hostname"] for w in workers if w.get("active", 0) > 0]
        if len(workers) == 2 and busy:
            victim = next(i for i in fleet.instances if busy[0].startswith(f"instance{i.index}-"))
        time.sleep(0.1)
    assert victim is not None, f"no busy instance to drain: {events}"
    # Keep the fleet at one instance from now on, and drain the busy one.
    scaler.policy = replace(POLICY, max_instances=1)
    inst, proc = victim, victim.proc
    scaler.provider.drain(str(inst.index))
    job.join(90)
    assert not job.is_alive(), "the job did not finish"
    assert proc.wait(30) == 0, "the drained worker did not exit cleanly"
    exactly_once(out, range(n))
    assert result["summary"].resent == 0, "a batch had to be re-sent: the drain lost it"
    log = (fleet.workdir / f"instance{inst.index}.log").read_text()
    shutdown = log.index("Warm shutdown")
    assert re.search(r"fleet\.batch\[[^\]]+\] succeeded", log[shutdown:]), (
        "the drained instance was not running a batch when it was drained"
    )
    assert inst not in fleet.instances, "the drained instance was not removed"


def wait_for_output(fleet, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in fleet.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert text in fleet.output(), fleet.output()


def test_fleet_local_autoscale_command(local_fleet, tmp_path):
    fleet = local_fleet(
        "--autoscale", "--max-instances", "2", "--include", "tests.support.fleet_tasks"
    )
    fleet.wait_up()
    # The line follows "local fleet up", which wait_up returns on.
    wait_for_output(fleet, "autoscaling between 0 and 2 instances", 10)
    out = tmp_path / "out.jsonl"
    ran = fleet.cmd("run", "double", "--ids", "range:0:1000", "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    exactly_once(out, range(1000))
    wait_for_output(fleet, "-> 0 instances", 40)
    assert re.search(r"autoscaler: 0 -> [12] instances", fleet.output()), fleet.output()
    assert "-> 0 instances" in fleet.output(), fleet.output()
    fleet.snapshot()
    assert fleet.stop(signal.SIGINT) == 0
