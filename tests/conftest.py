"""Fixtures that start real fleets: redis-server or rabbitmq-server, and real
`celery worker` processes, on free loopback ports. Each is stopped afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.local import LocalFleet

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
