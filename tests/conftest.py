"""Fixtures for every tier: real fleets on this machine, stopped afterwards.

A fleet that needs no servers of its own takes a namespace on servers shared
by the whole run (tests/support/servers.py): RabbitMQ alone costs about ten
seconds to start. Helpers are in tests/support/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import LEASE_SECONDS, Settings
from scripts.local.fleet import LocalFleet
from tests.support.aws import moto_server
from tests.support.fleets import TASKS, settle
from tests.support.local_fleet import LocalFleetProcess
from tests.support.servers import SharedServers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    shared = SharedServers(tmp_path_factory.mktemp("servers"))
    yield shared
    shared.close()


def shared_settings(
    servers: SharedServers,
    broker: str,
    include: tuple[str, ...] = TASKS,
    queue: str = "fleet",
    lease_seconds: float | None = None,
) -> Settings:
    """Settings of a fresh namespace on the shared servers."""
    broker_url, result_url = servers.namespace(broker)
    return Settings(
        broker_url,
        result_url,
        queue=queue,
        include=include,
        lease_seconds=lease_seconds or LEASE_SECONDS,
    )


@pytest.fixture
def make_fleet(tmp_path: Path, servers: SharedServers) -> Iterator[Callable[..., LocalFleet]]:
    """Start fleets with custom options: make_fleet(instances=2, broker="rabbitmq", ...).

    On the shared servers unless the test gives `settings`, asks for `tls` or
    for `own_servers` (to restart or stop them).
    """
    fleets: list[LocalFleet] = []

    def start(
        instances: int = 2, broker: str = "redis", own_servers: bool = False, **kwargs: Any
    ) -> LocalFleet:
        kwargs.setdefault("include", TASKS)
        if not own_servers and "settings" not in kwargs and not kwargs.get("tls"):
            kwargs["settings"] = shared_settings(
                servers,
                broker,
                kwargs.pop("include"),
                kwargs.pop("queue", "fleet"),
                kwargs.pop("lease_seconds", None),
            )
        fleet = LocalFleet(instances, broker, workdir=tmp_path / f"fleet{len(fleets)}", **kwargs)
        fleets.append(fleet)
        fleet.__enter__()
        return fleet

    yield start
    for fleet in fleets:
        fleet.stop()
    # A worker that did not stop when signalled was killed: its stacks say where it hung.
    stuck = [message for fleet in fleets for message in fleet.stuck]
    assert not stuck, "\n".join(stuck)


@pytest.fixture(scope="session", params=["redis", "rabbitmq"])
def fleet(
    request: pytest.FixtureRequest,
    servers: SharedServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalFleet]:
    """A two-instance fleet shared by every test that only runs jobs on it, per broker."""
    workdir = tmp_path_factory.mktemp(f"fleet-{request.param}")
    settings = shared_settings(servers, request.param, lease_seconds=3)
    with LocalFleet(2, settings=settings, workdir=workdir) as shared:
        yield shared
        settle(shared)


@pytest.fixture(scope="module")
def aws() -> Iterator[tuple[int, str]]:
    """A moto server (port, endpoint) with the bucket the stack would create."""
    with moto_server() as server:
        yield server


@pytest.fixture
def local_fleet(tmp_path: Path) -> Iterator[Callable[..., LocalFleetProcess]]:
    """Start `fleet local ARGS...` as a process; whatever a failed test left is stopped."""
    fleets: list[LocalFleetProcess] = []

    def start(*args: str) -> LocalFleetProcess:
        f = LocalFleetProcess(tmp_path, *args)
        fleets.append(f)
        return f

    yield start
    for f in fleets:
        f.cleanup()


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (`make test`), each module goes whole to one worker, which starts
    its fixtures once; and the fault tier goes whole to one worker, in order, so its timing
    bounds are measured beside the other tiers' tests but never beside each other."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleFaultsTogether(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "tests/faults" if module.startswith("tests/faults/") else module

    return ByModuleFaultsTogether(config, log)
