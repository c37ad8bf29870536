"""Fixtures that start real fleets: redis-server or rabbitmq-server, and real
`celery worker` processes, on free loopback ports. Each is stopped afterwards."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from app.launcher.job import JobOptions, JobSummary
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from scripts.local.fleet import LocalFleet

TASKS = ("tests.fleet_tasks",)


@pytest.fixture
def make_fleet(tmp_path):
    """Start a fleet with custom options: make_fleet(instances=2, broker="rabbitmq", ...)."""
    fleets: list[LocalFleet] = []

    def start(instances: int = 2, broker: str = "redis", **kwargs) -> LocalFleet:
        kwargs.setdefault("include", TASKS)
        fleet = LocalFleet(instances, broker, workdir=tmp_path / f"fleet{len(fleets)}", **kwargs)
        fleets.append(fleet)
        fleet.__enter__()
        return fleet

    yield start
    for fleet in fleets:
        fleet.stop()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def fleet(request, tmp_path_factory):
    """A two-instance fleet shared by a module's tests, once per broker."""
    workdir = tmp_path_factory.mktemp(f"fleet-{request.param}")
    with LocalFleet(2, request.param, include=TASKS, workdir=workdir, lease_seconds=3) as f:
        yield f


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_until(predicate, timeout: float, what: str):
    """predicate()'s first true value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Recording(Launcher):
    """A launcher that tells the test its job's ID as soon as the job exists."""

    def __init__(self, settings, sends: int = 1) -> None:
        super().__init__(settings)
        self.job: str | None = None
        self.known = threading.Event()
        self.sends = sends

    def _new_job(self, *args, **kwargs):
        job, meta = super()._new_job(*args, **kwargs)
        self.job = job
        self.known.set()
        return job, meta

    def send(self, *args, **kwargs) -> None:
        for _ in range(self.sends):  # sends > 1: every batch is published that many times
            super().send(*args, **kwargs)


class Background:
    """A job run by the launcher in a thread while the test injects a fault."""

    def __init__(
        self, fleet: LocalFleet, out: Path, n: int, batch: int, sends: int = 1, task: str = "slow"
    ) -> None:
        self.launcher = Recording(fleet.settings, sends)
        self.opts = JobOptions(
            task=task,
            source=Source.parse(f"range:0:{n}"),
            batch_size=batch,
            out=out,
            progress=False,
        )
        self.summary: JobSummary | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.launcher.known.wait(0.05) and self.thread.is_alive():
            assert time.monotonic() < deadline, "the job did not start within 30 s"
        if self.error is not None:
            raise self.error
        self.job = self.launcher.job

    def _run(self) -> None:
        try:
            self.summary = self.launcher.run(self.opts)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float) -> JobSummary:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"job {self.job} did not finish within {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary
