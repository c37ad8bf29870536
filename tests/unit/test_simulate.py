"""The simulator (scripts/simulate.py) and `fleet simulate`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from click.testing import CliRunner

from app.autoscale import Policy
from app.launcher.plan import DRIVER_RATE, MAX_BATCH_RATE
from scripts.cli import cli
from scripts.simulate import (
    BUSY,
    WORK_PER_SLOT,
    Scenario,
    busy_fraction,
    busy_line,
    compare,
    ideal,
    largest_busy_fleet,
    simulate,
)

pytestmark = pytest.mark.timeout(120)

TARGET = Scenario(items=1_000_000, seconds_per_item=0.05, cores=16, boot_seconds=60)
TARGET_POLICY = Policy(max_instances=50)  # the defaults, but for max


def test_target_scenario_meets_its_bounds():
    auto, static, bound = compare(TARGET, TARGET_POLICY)
    assert bound.makespan == pytest.approx(1_000_000 * 0.05 / (50 * 16) + 60)
    assert auto.makespan <= 1.15 * bound.makespan, auto.makespan
    assert auto.instance_seconds <= 1.20 * bound.instance_seconds, auto.instance_hours
    assert auto.peak_instances == 50
    # Back to zero after the job.
    assert auto.timeline[-1][3] == 0
    # The static fleet is no faster: autoscaling costs no time here.
    assert static.makespan >= auto.makespan - TARGET.dt


def test_same_seed_same_run_and_seeds_differ():
    stormy = replace(TARGET, items=200_000, spot_rate=20.0)
    a = simulate(stormy, TARGET_POLICY)
    b = simulate(stormy, TARGET_POLICY)
    assert (a.makespan, a.instance_seconds, a.interruptions, a.timeline) == (
        b.makespan,
        b.instance_seconds,
        b.interruptions,
        b.timeline,
    )
    others = {simulate(replace(stormy, seed=s), TARGET_POLICY).interruptions for s in range(2, 6)}
    assert others - {a.interruptions}, "the seed changes nothing"


def test_spot_interruptions_rerun_batches_and_the_agent_saves_time():
    stormy = replace(TARGET, items=300_000, spot_rate=30.0, seed=3)
    with_agent = simulate(stormy, TARGET_POLICY)
    without = simulate(replace(stormy, agent=False), TARGET_POLICY)
    assert with_agent.interruptions > 0 and with_agent.resent > 0
    # Handed back at once vs after the lease lapses: never slower, and billed for the notice.
    assert with_agent.makespan < without.makespan
    assert with_agent.instance_seconds >= with_agent.interruptions * stormy.notice_seconds


def test_a_small_job_does_not_keep_the_fleet():
    small = replace(TARGET, items=2_000, spot_rate=0.0)
    auto = simulate(small, TARGET_POLICY)
    # 2,000 IDs count as 2,000 batches while calibrating, so the fleet starts big;
    # once sized, 100 s of work needs few instances and the rest go.
    assert auto.timeline[-1][3] == 0
    assert auto.makespan < small.boot_seconds + 10
    end_of_run = auto.timeline[-1][0]
    assert end_of_run - auto.makespan <= TARGET_POLICY.scale_in_delay + small.interval + 1


def test_a_longer_scale_in_delay_costs_instance_hours():
    quick = simulate(TARGET, TARGET_POLICY).instance_seconds
    slow = simulate(TARGET, replace(TARGET_POLICY, scale_in_delay=60)).instance_seconds
    assert slow > quick + 50 * 40


def test_ideal_bound():
    s = Scenario(items=1000, seconds_per_item=1.0, cores=10, boot_seconds=30)
    bound = ideal(s, 5)
    assert (bound.makespan, bound.instance_seconds) == (50.0, 250.0)


def test_cli_table_json_and_plot(tmp_path):
    png = tmp_path / "sim.png"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["simulate", "--items", "100000", "--max-instances", "10", "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "| autoscaled |" in result.output and "| ideal bound |" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(cli, ["simulate", "--items", "100000", "--json"])
    rows = json.loads(result.output)
    assert [r["fleet"] for r in rows] == ["autoscaled", "static fleet of 50", "ideal bound"]
    bad = runner.invoke(cli, ["simulate", "--min-instances", "9", "--max-instances", "3"])
    assert bad.exit_code == 2 and "max_instances" in bad.output


def test_without_the_held_backlog_the_fleet_only_doubles_per_boot():
    """What the launcher's advertised backlog buys: a depth metric of the broker alone
    sees at most 2 batches per slot, so the fleet grows one boot at a time."""
    blind = replace(TARGET, held_visible=False)
    doubling = simulate(blind, TARGET_POLICY)
    assert doubling.peak_instances == 50
    assert doubling.makespan > 2.5 * ideal(TARGET, 50).makespan
    # A target at the launcher's own ratio never grows past the first instance.
    stuck = simulate(replace(blind, items=100_000), replace(TARGET_POLICY, backlog_per_slot=2.0))
    assert stuck.peak_instances == 1


# -- the control plane ------------------------------------------------------------------

SLOW = Scenario(driver_rate=20.0)  # a driver that binds below 400 slots, where batches last 2 s


def test_the_driver_bounds_a_job_sized_on_the_empty_fleet():
    """Calibrated with no slot registered, the batches last target_seconds however far the
    fleet grows, so the launcher must hand out slots / target_seconds of them a second."""
    auto = simulate(TARGET, TARGET_POLICY)
    batches = TARGET.items / (TARGET.target_seconds / TARGET.seconds_per_item)
    assert auto.makespan >= TARGET.boot_seconds + batches / TARGET.driver_rate
    unlimited = simulate(replace(TARGET, driver_rate=math.inf), TARGET_POLICY)
    assert unlimited.makespan <= 1.15 * ideal(TARGET, 50).makespan


def test_a_slower_driver_keeps_proportionally_fewer_slots_busy():
    # Batches of 2 s (the target: these fleets are under 400 slots) and their round trips.
    batch = SLOW.target_seconds + SLOW.store_latency + SLOW.broker_latency
    for rate in (20.0, 40.0):
        slots = largest_busy_fleet(replace(SLOW, driver_rate=rate))
        # The launcher hands out `rate` batches a second, each keeping a slot busy for
        # `batch` seconds: no more than rate x batch slots are busy at once.
        bound = rate * batch / BUSY
        assert 0.9 * bound <= slots <= bound, (rate, slots, bound)
    assert largest_busy_fleet(replace(SLOW, driver_rate=40.0)) == pytest.approx(
        2 * largest_busy_fleet(SLOW), rel=0.1
    )


def test_below_the_largest_busy_fleet_is_busy_and_well_above_is_not():
    slots = largest_busy_fleet(SLOW)
    assert busy_fraction(SLOW, slots) >= BUSY
    assert busy_fraction(SLOW, slots // 2) >= BUSY
    assert busy_fraction(SLOW, 2 * slots) < BUSY
    # Twice the slots the driver can feed: about half of them busy.
    assert busy_fraction(SLOW, 2 * slots) == pytest.approx(BUSY / 2, rel=0.1)


def test_with_the_default_driver_its_rate_sets_the_answer():
    """The plan gives S slots batches of at least S / MAX_BATCH_RATE seconds, so a driver
    of DRIVER_RATE > MAX_BATCH_RATE keeps up once they run; but handing every slot its
    first batch takes S / DRIVER_RATE seconds, and the last ones end as far apart: a job
    of W seconds per slot runs W + S / DRIVER_RATE, busy >= 90% while
    S <= DRIVER_RATE x W x (1 / 0.9 - 1)."""
    s = Scenario()
    assert s.driver_rate == DRIVER_RATE > MAX_BATCH_RATE
    # 2.5 and 5 minutes of work per slot. At 20 minutes the model's answer is lower
    # (43,520: a step near 44,000 slots, where batches reach max_batch_seconds / 4); not
    # explained yet, so not asserted.
    for work in (WORK_PER_SLOT / 4, WORK_PER_SLOT / 2):
        expected = DRIVER_RATE * work * (1 / BUSY - 1)
        assert largest_busy_fleet(s, work) == pytest.approx(expected, rel=0.1), work


def test_without_control_plane_limits_no_fleet_is_too_large():
    unlimited = replace(Scenario(), driver_rate=math.inf, store_latency=0.0, broker_latency=0.0)
    limit = 1 << 17
    assert largest_busy_fleet(unlimited, limit=limit) == limit
    assert largest_busy_fleet(Scenario(), limit=limit) < limit


def test_a_slow_handoff_weighs_on_short_batches():
    """Each batch waits `broker_latency` before it starts: busy at most batch / (batch + wait)."""
    handoff = replace(Scenario(), broker_latency=0.5)
    batch = handoff.target_seconds + handoff.store_latency
    assert busy_fraction(handoff, 100) <= batch / (batch + handoff.broker_latency)
    assert busy_fraction(Scenario(), 100) >= BUSY


def test_cli_prints_the_largest_busy_fleet():
    runner = CliRunner()
    result = runner.invoke(cli, ["simulate", "--largest-busy-fleet", "--driver-rate", "20"])
    assert result.exit_code == 0, result.output
    slots = largest_busy_fleet(SLOW)
    assert result.output.strip() == busy_line(SLOW, slots, WORK_PER_SLOT, BUSY)
    assert f"one job keeps {slots:,} slots ≥ 90% busy (driver 20 batches/s" in result.output
    assert "store 0.5 ms, broker 1 ms, 50 ms items, 10 min of work per slot)" in result.output
    result = runner.invoke(
        cli, ["simulate", "--largest-busy-fleet", "--json", "--driver-rate", "20"]
    )
    answer = json.loads(result.output)
    assert answer["largest_busy_fleet"] == slots and answer["driver_rate"] == 20.0
