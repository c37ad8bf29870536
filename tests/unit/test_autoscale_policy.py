"""The scaling policy (app/autoscale.py): a table of cases, then properties over all inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.autoscale import FleetState, Policy, desired_instances

POLICY = Policy(
    min_instances=0,
    max_instances=10,
    backlog_per_slot=1.0,
    scale_out_cooldown=5.0,
    scale_in_delay=10.0,
)
NOW = 1000.0


def state(queued=0, running=0, instances=0, slots=4, busy=0, last_out=None, low_since=None):
    return FleetState(queued, running, instances, slots, busy, last_out, low_since)


@pytest.mark.parametrize(
    ("case", "fleet", "policy", "desired", "reason"),
    [
        ("idle at zero stays at zero", state(), POLICY, 0, "steady"),
        ("one batch wakes one instance", state(queued=1), POLICY, 1, "scale out"),
        ("backlog sized by slots", state(queued=9, instances=1), POLICY, 3, "scale out"),
        (
            "running batches count as demand",
            state(queued=2, running=6, instances=1),
            POLICY,
            2,
            "scale out",
        ),
        ("capped at max", state(queued=10_000, instances=3), POLICY, 10, "scale out; held"),
        (
            "a lower target asks for more",
            state(queued=8),
            Policy(max_instances=10, backlog_per_slot=0.5),
            4,
            "scale out",
        ),
        (
            "scale-out cooldown holds the count",
            state(queued=40, instances=2, last_out=NOW - 2),
            POLICY,
            2,
            "scale-out cooldown",
        ),
        (
            "after the cooldown it scales out",
            state(queued=40, instances=2, last_out=NOW - 6),
            POLICY,
            10,
            "scale out",
        ),
        ("demand just dropped: wait", state(instances=5), POLICY, 5, "waiting before scale in"),
        (
            "low for less than the delay: wait",
            state(running=4, instances=5, low_since=NOW - 9),
            POLICY,
            5,
            "waiting before scale in",
        ),
        (
            "low for the delay: scale in to the need",
            state(running=4, instances=5, busy=1, low_since=NOW - 10),
            POLICY,
            1,
            "scale in",
        ),
        (
            "never below the busy instances",
            state(running=4, instances=5, busy=4, low_since=NOW - 60),
            POLICY,
            4,
            "scale in",
        ),
        (
            "all busy: nothing to take",
            state(running=5, instances=5, busy=5, low_since=NOW - 60),
            POLICY,
            5,
            "busy instances",
        ),
        (
            "a recent scale-out delays scale-in",
            state(instances=5, last_out=NOW - 3, low_since=NOW - 60),
            POLICY,
            5,
            "waiting before scale in",
        ),
        (
            "idle long enough: to zero",
            state(instances=5, low_since=NOW - 10),
            POLICY,
            0,
            "scale in",
        ),
        (
            "min kept with no work",
            state(instances=0),
            Policy(min_instances=2, max_instances=10),
            2,
            "held within 2..10",
        ),
        (
            "above max after a change: down to max",
            state(queued=100, running=40, instances=12, busy=12),
            POLICY,
            10,
            "held within",
        ),
    ],
)
def test_policy_table(case, fleet, policy, desired, reason):
    decision = desired_instances(fleet, policy, NOW)
    assert decision.desired == desired, case
    assert reason in decision.reason, (case, decision.reason)
    assert decision.delta == desired - fleet.instances


def test_low_since_is_remembered_and_cleared():
    first = desired_instances(state(instances=3), POLICY, NOW)
    assert (first.desired, first.low_since) == (3, NOW)
    later = desired_instances(state(instances=3, low_since=first.low_since), POLICY, NOW + 10)
    assert later.desired == 0
    back = desired_instances(state(queued=12, instances=3, low_since=NOW), POLICY, NOW + 5)
    assert back.low_since is None and back.desired == 3


def test_target_for_aws_target_tracking():
    assert Policy().target_backlog_per_instance(16) == 16.0
    assert Policy(backlog_per_slot=0.5).target_backlog_per_instance(4) == 2.0
    # With the launcher keeping 2 batches per slot on the broker, a fleet that sees
    # only the broker still doubles per step when the target is below that ratio.
    assert Policy().backlog_per_slot < 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_instances": -1},
        {"max_instances": 0},
        {"min_instances": 3, "max_instances": 2},
        {"backlog_per_slot": 0},
        {"scale_in_delay": -1},
    ],
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        Policy(**kwargs)


# -- properties -------------------------------------------------------------

policies = st.builds(
    lambda lo, span, target, out, delay: Policy(lo, max(1, lo + span), target, out, delay),
    st.integers(0, 5),
    st.integers(0, 60),
    st.floats(0.1, 8),
    st.floats(0, 60),
    st.floats(0, 600),
)
times = st.one_of(st.none(), st.floats(0, NOW))


@st.composite
def fleets(draw):
    instances = draw(st.integers(0, 80))
    return FleetState(
        queued=draw(st.integers(0, 100_000)),
        running=draw(st.integers(0, 5_000)),
        instances=instances,
        slots_per_instance=draw(st.integers(1, 96)),
        busy_instances=draw(st.integers(0, instances)),
        last_scale_out=draw(times),
        low_since=draw(times),
    )


@settings(max_examples=400, deadline=None)
@given(fleets(), policies)
def test_never_below_min_or_above_max(fleet, policy):
    decision = desired_instances(fleet, policy, NOW)
    assert policy.min_instances <= decision.desired <= policy.max_instances


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(0, 80), st.integers(1, 96))
def test_zero_queue_at_rest_gives_min(policy, instances, slots):
    at_rest = FleetState(
        0, 0, instances, slots, 0, last_scale_out=None, low_since=NOW - policy.scale_in_delay - 1
    )
    assert desired_instances(at_rest, policy, NOW).desired == policy.min_instances


@settings(max_examples=400, deadline=None)
@given(fleets(), policies, st.integers(0, 100_000))
def test_monotone_in_queue_depth(fleet, policy, extra):
    more = FleetState(
        fleet.queued + extra,
        *[
            getattr(fleet, f)
            for f in (
                "running",
                "instances",
                "slots_per_instance",
                "busy_instances",
                "last_scale_out",
                "low_since",
            )
        ],
    )
    assert (
        desired_instances(fleet, policy, NOW).desired
        <= desired_instances(more, policy, NOW).desired
    )


@settings(max_examples=200, deadline=None)
@given(fleets(), policies)
def test_never_asks_to_remove_a_busy_instance_within_max(fleet, policy):
    decision = desired_instances(fleet, policy, NOW)
    assert decision.desired >= min(fleet.busy_instances, policy.max_instances)


@settings(max_examples=200, deadline=None)
@given(fleets(), policies)
def test_enough_slots_for_the_demand_unless_capped_or_cooling(fleet, policy):
    decision = desired_instances(fleet, policy, NOW)
    if decision.reason == "scale out":
        assert (
            decision.desired * fleet.slots_per_instance * policy.backlog_per_slot
            >= fleet.demand - 1e-6
        )
