"""How many worker instances the fleet should have: one pure function.

As in Ray's autoscaler v2, deciding *how many* instances is kept apart from
deciding *which* ones: `desired_instances` turns demand into a count, and a
provider carries it out. The local autoscaler (scripts/local/autoscaler.py) starts
and drains worker processes; on AWS the autoscaling group does it, steered by
target tracking on `Policy.target_backlog_per_instance(cores)` and kept off
busy instances by the drain agent (app/host/agent.py); the simulator
(scripts/simulate.py) runs this same function to choose the defaults.

Demand is counted in batches: those waiting (on the broker, reserved by a
worker, or still held back by the launcher) plus those running. The launcher
sizes a batch to about two seconds of work, so batches per slot is also
seconds of work per core: a backlog of one batch per slot drains in one wave.

The function decides a count only. It never asks for fewer instances than
are busy, and the provider removes only instances that hold no batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    min_instances: int = 0
    max_instances: int = 10
    # Batches of demand per worker slot the fleet is sized for. 1.0: a slot
    # for every batch left, so the backlog runs in one wave. Must stay below
    # the launcher's in-flight ratio (2 batches per slot) or a fleet that
    # only sees the broker's queue could never grow past its first instance.
    backlog_per_slot: float = 1.0
    # After a scale-out, wait this long before the next one: the count
    # already includes booting instances, so this only damps a noisy reading.
    scale_out_cooldown: float = 5.0
    # Demand must stay below the fleet this long (and this long after the
    # last scale-out) before instances go: long enough to ride out the gap
    # between two jobs, short because an idle instance bills like a busy
    # one. In the simulator (docs/autoscaling.md) every second of it costs
    # about 0.8% over the ideal instance-hours at 50 instances: 10 s gives
    # +9%, 30 s +26%.
    scale_in_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.min_instances < 0:
            raise ValueError(f"min_instances={self.min_instances} must be at least 0.")
        if self.max_instances < max(1, self.min_instances):
            raise ValueError(
                f"max_instances={self.max_instances} must be at least 1 "
                f"and at least min_instances={self.min_instances}."
            )
        if not self.backlog_per_slot > 0:
            raise ValueError(f"backlog_per_slot={self.backlog_per_slot} must be above 0.")
        if self.scale_out_cooldown < 0 or self.scale_in_delay < 0:
            raise ValueError("cooldowns must not be negative.")

    def target_backlog_per_instance(self, cores: int) -> float:
        """The AWS target-tracking value: batches (waiting + running) per in-service instance."""
        return self.backlog_per_slot * max(1, cores)

    def instances_for(self, demand: int, slots_per_instance: int) -> int:
        """Instances that hold `demand` batches at the target (not clamped to min/max)."""
        if demand <= 0:
            return 0
        return math.ceil(demand / self.target_backlog_per_instance(slots_per_instance) - 1e-9)


@dataclass(frozen=True)
class FleetState:
    """What the policy sees of the fleet at one moment."""

    queued: int  # batches waiting: on the broker, reserved by a worker, or held by the launcher
    running: int  # batches running now
    instances: int  # instances up or starting (draining ones not counted)
    slots_per_instance: int
    busy_instances: int = 0  # instances running or holding a batch; never asked to go
    last_scale_out: float | None = None
    # When demand fell below the fleet; carried over from the previous Decision.
    low_since: float | None = None

    @property
    def demand(self) -> int:
        return max(0, self.queued) + max(0, self.running)


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: str
    low_since: float | None  # feed back into the next FleetState

    @property
    def delta(self) -> int:
        return self.desired - self.current


def desired_instances(state: FleetState, policy: Policy, now: float) -> Decision:
    """The instance count for `state` under `policy` at time `now` (seconds, any clock)."""
    current = max(0, state.instances)
    need = policy.instances_for(state.demand, state.slots_per_instance)
    low_since = None
    if need > current:
        cooling = (
            state.last_scale_out is not None
            and now - state.last_scale_out < policy.scale_out_cooldown
        )
        desired, reason = (current, "scale-out cooldown") if cooling else (need, "scale out")
    elif need < current:
        low_since = state.low_since if state.low_since is not None else now
        quiet_from = max(
            low_since, state.last_scale_out if state.last_scale_out is not None else low_since
        )
        if now - quiet_from >= policy.scale_in_delay:
            desired = max(need, min(state.busy_instances, current))
            reason = "scale in" if desired < current else "busy instances"
        else:
            desired, reason = current, "waiting before scale in"
    else:
        desired, reason = current, "steady"
    clamped = min(policy.max_instances, max(policy.min_instances, desired))
    if clamped != desired:
        reason = f"{reason}; held within {policy.min_instances}..{policy.max_instances}"
    return Decision(clamped, current, reason, low_since)
