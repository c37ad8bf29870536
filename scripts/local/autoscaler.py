"""The local autoscaler: app/autoscale.py's policy starting and draining local workers.

    fleet local --autoscale --max-instances 4

As in Ray's autoscaler v2, the policy decides how many instances and a
provider decides which: `LocalProvider` starts worker processes of a
`LocalFleet` and drains them; an EC2 autoscaling group is the same idea on
AWS, with the drain agent (app/host/agent.py) keeping busy instances from being taken.

Demand is read from the real system each step:

- ready: batches on the broker no worker has taken (a reader per broker);
- reserved: batches a worker has received but not started (its heartbeat);
- running: batches holding a lease in the result store;
- held: batches launchers keep back from the broker (they advertise them),
  without which a long job would look no bigger than the slots it has.

Scale-in drains: an instance is chosen only while it has taken no batch, then
gets a warm shutdown (SIGTERM: Celery stops consuming at once, hands back
anything it received but did not start, finishes what is running) and is
removed once its process has exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.autoscale import Decision, FleetState, Policy, desired_instances
from app.queue_depth import ReadyCount, ready_count
from app.store import Store
from scripts.local.fleet import Instance, LocalFleet, instance_cpus
from scripts.local.processes import stop_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """One worker instance as the autoscaler sees it."""

    id: str
    slots: int
    ready: bool  # consuming (advertised in the result store)
    taken: int = 0  # batches received and not finished, running ones included
    running: int = 0
    draining: bool = False


class Provider(Protocol):
    """Where instances come from."""

    def slots_per_instance(self) -> int: ...
    def nodes(self) -> list[Node]: ...
    def launch(self, count: int) -> None: ...
    def drain(self, node_id: str) -> None: ...  # stop taking batches, finish, then go


# -- the local provider ---------------------------------------------------


class LocalProvider:
    """Worker processes of a LocalFleet, each pinned like a machine of its CPU share."""

    def __init__(
        self,
        fleet: LocalFleet,
        store: Store,
        max_instances: int,
        drain_timeout: float | None = None,
    ) -> None:
        self.fleet = fleet
        self.store = store
        self.cpu_sets = instance_cpus(max_instances, fleet.cpus)
        self.next_index = max((i.index for i in fleet.instances), default=-1) + 1
        # A warm shutdown waits for the running batch; past the longest a
        # batch may run, the instance is stuck and is killed (acks_late
        # brings its batch back).
        self.drain_timeout = drain_timeout or fleet.settings.max_batch_seconds + 60
        self._drain_started: dict[int, float] = {}

    def slots_per_instance(self) -> int:
        # A worker sizes itself to the CPUs it is pinned to.
        return min(len(c) for c in self.cpu_sets)

    def _prefix(self, inst: Instance) -> str:
        # The node name LocalFleet gives the instance's worker.
        return f"instance{inst.index}-{os.getpid()}@"

    def nodes(self) -> list[Node]:
        self._reap()
        seen = {str(w.get("hostname", "")): w for w in self.store.workers()}
        out = []
        for inst in self.fleet.instances:
            if inst.proc is None:
                continue
            prefix = self._prefix(inst)
            info = next((w for name, w in seen.items() if name.startswith(prefix)), None)
            out.append(
                Node(
                    id=str(inst.index),
                    slots=int(info["concurrency"]) if info else len(inst.cpus),
                    ready=info is not None,
                    taken=int(info.get("reserved", 0)) if info else 0,
                    running=int(info.get("active", 0)) if info else 0,
                    draining=inst.draining,
                )
            )
        return out

    def launch(self, count: int) -> None:
        for _ in range(count):
            # The CPU share fewest live instances use, as a new machine would bring its own.
            used = [
                sum(1 for i in self.fleet.instances if i.proc is not None and i.cpus == c)
                for c in self.cpu_sets
            ]
            inst = Instance(self.next_index, self.cpu_sets[used.index(min(used))])
            self.next_index += 1
            self.fleet.instances.append(inst)
            self.fleet.start_instance(inst)

    def drain(self, node_id: str) -> None:
        inst = self._instance(node_id)
        if inst is None or inst.draining or inst.proc is None:
            return
        inst.draining = True
        self._drain_started[inst.index] = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            inst.proc.send_signal(signal.SIGTERM)  # warm shutdown

    def _instance(self, node_id: str) -> Instance | None:
        return next((i for i in self.fleet.instances if str(i.index) == node_id), None)

    def _reap(self) -> None:
        """Forget drained instances whose worker has exited; kill those stuck past the timeout."""
        now = time.monotonic()
        for inst in list(self.fleet.instances):
            if not inst.draining or inst.proc is None:
                continue
            started = self._drain_started.get(inst.index, now)
            if inst.proc.poll() is None and now - started < self.drain_timeout:
                continue
            stop_process(inst.proc, timeout=5, sig=signal.SIGKILL)  # its whole group
            self.fleet.instances.remove(inst)
            self._drain_started.pop(inst.index, None)


# -- the loop -------------------------------------------------------------


@dataclass
class Autoscaler:
    provider: Provider
    depth: ReadyCount
    store: Store
    queue: str
    policy: Policy
    clock: Callable[[], float] = time.monotonic
    say: Callable[[str], None] = log.info
    last_scale_out: float | None = None
    low_since: float | None = None

    def observe(self) -> tuple[FleetState, list[Node]]:
        nodes = self.provider.nodes()
        live = [n for n in nodes if not n.draining]
        reserved = sum(max(0, n.taken - n.running) for n in nodes)
        state = FleetState(
            queued=self.depth.ready() + reserved + self.store.backlog(self.queue),
            running=len(self.store.busy_slots()),
            instances=len(live),
            slots_per_instance=self.provider.slots_per_instance(),
            busy_instances=sum(1 for n in live if n.taken > 0),
            last_scale_out=self.last_scale_out,
            low_since=self.low_since,
        )
        return state, live

    def step(self) -> Decision:
        now = self.clock()
        state, live = self.observe()
        decision = desired_instances(state, self.policy, now)
        self.low_since = decision.low_since
        if decision.delta > 0:
            self.provider.launch(decision.delta)
            self.last_scale_out = now
        elif decision.delta < 0:
            # Only instances that have taken no batch; those not consuming yet first.
            idle = sorted((n for n in live if n.taken == 0), key=lambda n: (n.ready, n.id))
            for node in idle[: -decision.delta]:
                self.provider.drain(node.id)
        if decision.delta:
            self.say(
                f"autoscaler: {decision.current} -> {decision.desired} instances "
                f"({decision.reason}; {state.queued} batches waiting, "
                f"{state.running} running)"
            )
        return decision

    def tick(self) -> Decision | None:
        """One step; a failure (a broker or store blip) is logged and retried next time."""
        try:
            return self.step()
        except Exception:
            log.warning("autoscaler step failed", exc_info=True)
            return None

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Step every `interval` seconds until `stop` is set."""
        while not stop.is_set():
            self.tick()
            stop.wait(interval)


def local_autoscaler(
    fleet: LocalFleet, policy: Policy, say: Callable[[str], None] = log.info
) -> Autoscaler:
    """The autoscaler for a started LocalFleet, reading its broker and result store."""
    from app.store import open_store

    store = open_store(fleet.settings)
    provider = LocalProvider(fleet, store, policy.max_instances)
    return Autoscaler(
        provider, ready_count(fleet.settings), store, fleet.settings.queue, policy, say=say
    )
