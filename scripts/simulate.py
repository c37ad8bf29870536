"""A job on an autoscaled fleet, in discrete time, with the real policy (`fleet simulate`).

    fleet simulate --items 1000000 --seconds-per-item 0.05 --cores 16 --boot 60 \\
        --max-instances 50 --plot docs/simulate.png

The model follows the real parts closely enough to choose the defaults:

- the launcher calibrates on one-ID probe batches (one per registered slot,
  at least one), advertising each ID left as a batch meanwhile; then it cuts
  batches of `target_seconds` of work and keeps max(4, 2 x slots) on the
  broker (app/launcher/plan.py, as the real launcher), advertising the rest
  as held back;
- an instance boots for `boot_seconds`, then each of its `cores` slots runs
  one batch at a time, taking the next from the queue within the same step;
- every `interval` seconds app/autoscale.py's `desired_instances` sees the
  queue, the held batches and the running ones; scale-out launches
  instances, scale-in ends idle ones only (booting ones first);
- a Spot interruption strikes each instance at `spot_rate` per hour: with
  the drain agent its running batches go back to the queue at once (their
  work so far is lost); without it they come back when their lease lapses.
  The instance is billed for the two-minute notice, and no longer counts.

It compares the autoscaled fleet with (a) a static fleet of max instances,
launched with the job and stopped the moment it ends (the best a static
fleet can do), and (b) the ideal bound: total work / (max x cores) plus one
boot, with max instances billed for exactly that long.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.autoscale import FleetState, Policy, desired_instances
from app.launcher.plan import batch_size, in_flight_limit, probe_count
from app.settings import LEASE_SECONDS, MAX_BATCH_SECONDS


@dataclass(frozen=True)
class Scenario:
    items: int = 1_000_000
    seconds_per_item: float = 0.05
    cores: int = 16  # worker slots per instance
    boot_seconds: float = 60.0
    spot_rate: float = 0.05  # interruptions per instance-hour
    # Per instance-hour: an example (c7i.4xlarge on-demand, us-east-1, when
    # written); pass the price you pay.
    price: float = 0.714
    target_seconds: float = 2.0  # the launcher's aimed-at batch duration
    max_batch_seconds: float = MAX_BATCH_SECONDS
    lease_seconds: float = LEASE_SECONDS
    notice_seconds: float = 120.0  # a Spot instance lives (and bills) this long after the notice
    agent: bool = True  # the drain agent hands batches back on a Spot notice
    # The policy sees the batches launchers hold back; False: only the broker's
    # queue and the running batches (a depth metric without the launcher's number).
    held_visible: bool = True
    interval: float = 2.0  # seconds between policy evaluations
    dt: float = 0.25  # the time step
    seed: int = 1

    @property
    def work(self) -> float:
        return self.items * self.seconds_per_item


@dataclass
class Result:
    name: str
    makespan: float
    instance_seconds: float
    price: float
    peak_instances: int = 0
    interruptions: int = 0
    resent: int = 0  # batches run again after an interruption
    # (t, batches waiting or held, batches running, instances up or booting, instances up)
    timeline: list[tuple[float, int, int, int, int]] = field(default_factory=list)

    @property
    def instance_hours(self) -> float:
        return self.instance_seconds / 3600

    @property
    def cost(self) -> float:
        return self.instance_hours * self.price


@dataclass
class _Instance:
    launched: float
    ready: float
    slots: list[list[float] | None]  # per slot: [batch items, seconds left] or None
    ended: float | None = None

    def busy(self) -> bool:
        return any(s is not None for s in self.slots)


def ideal(s: Scenario, max_instances: int) -> Result:
    makespan = s.work / (max_instances * s.cores) + s.boot_seconds
    return Result("ideal bound", makespan, max_instances * makespan, s.price)


def static(s: Scenario, max_instances: int) -> Result:
    """Max instances from the start to the end of the job, replaced when Spot takes one."""
    policy = Policy(min_instances=max_instances, max_instances=max_instances)
    return simulate(s, policy, name=f"static fleet of {max_instances}", stop_at_end=True)


def simulate(
    s: Scenario,
    policy: Policy,
    name: str = "autoscaled",
    stop_at_end: bool = False,
    horizon: float = 6 * 3600,
) -> Result:
    """Run the job from an empty fleet; after it, run on until the fleet is back to its minimum."""
    run = _Simulation(s, policy, Result(name, 0.0, 0.0, s.price))
    while run.t < horizon:
        run.step()
        if run.result.makespan:
            if stop_at_end:
                for inst in run.live():
                    inst.ended = run.result.makespan
                break
            if len(run.live()) <= policy.min_instances:
                break
    result = run.result
    result.instance_seconds = sum(
        (i.ended if i.ended is not None else run.t) - i.launched for i in run.instances
    )
    if not result.makespan:
        raise RuntimeError(f"the job did not finish within {horizon:.0f} s of simulated time")
    return result


class _Simulation:
    """One simulated job: the launcher, the policy, Spot and the slots, one `dt` per step."""

    def __init__(self, s: Scenario, policy: Policy, result: Result) -> None:
        self.s = s
        self.policy = policy
        self.result = result
        self.rng = random.Random(s.seed)
        self.p_interrupt = 1 - math.exp(-s.spot_rate * s.dt / 3600)
        self.instances: list[_Instance] = []
        self.queue: deque[int] = deque()  # batches on the broker, by their number of items
        self.lost: list[tuple[float, int]] = []  # (when the launcher re-sends it, items)
        self.t = 0.0
        # The launcher: calibration first, one-ID probes on up to one registered slot each.
        self.probe_slots = max(1, self.slots_registered())
        n_probe = probe_count(self.probe_slots, s.items)
        self.queue.extend([1] * n_probe)
        self.left = s.items - n_probe  # IDs not yet cut into batches
        self.size: int | None = None  # batch size, once calibrated
        self.probes = n_probe  # probe batches not yet committed
        self.in_flight = n_probe  # batches sent and not committed
        self.held = 0
        self.done_items = 0
        # The policy.
        self.last_scale_out: float | None = None
        self.low_since: float | None = None
        self.next_eval = 0.0

    def live(self) -> list[_Instance]:
        return [i for i in self.instances if i.ended is None]

    def slots_registered(self) -> int:
        return sum(len(i.slots) for i in self.live() if i.ready <= self.t)

    def step(self) -> None:
        s = self.s
        self.resend_lost()
        self.top_up()
        live = self.live()
        if self.t >= self.next_eval:
            self.next_eval = self.t + s.interval
            self.decide(live)
            live = self.live()
            self.result.peak_instances = max(self.result.peak_instances, len(live))
        self.interrupt(live)
        for inst in self.instances:
            if inst.ended is None and inst.ready <= self.t:
                for k in range(len(inst.slots)):
                    self.work(inst, k)
        self.t += s.dt
        live = self.live()
        self.result.timeline.append(
            (
                self.t,
                len(self.queue) + self.held + len(self.lost),
                sum(1 for i in live for sl in i.slots if sl is not None),
                len(live),
                sum(1 for i in live if i.ready <= self.t),
            )
        )

    def resend_lost(self) -> None:
        """Lost batches come back when their lease lapses (no agent)."""
        for when, items in [x for x in self.lost if x[0] <= self.t]:
            self.lost.remove((when, items))
            self.queue.appendleft(items)
            self.result.resent += 1

    def top_up(self) -> None:
        """The launcher: size batches once the probes are in, keep the broker topped up."""
        s = self.s
        if self.size is None and self.probes == 0:
            self.size = batch_size(
                s.seconds_per_item,
                s.target_seconds,
                s.items,
                self.probe_slots,
                max_batch_seconds=s.max_batch_seconds,
            )
        if self.size is not None:
            cap = in_flight_limit(self.slots_registered())
            while self.left > 0 and self.in_flight < cap:
                n = min(self.size, self.left)
                self.queue.append(n)
                self.left -= n
                self.in_flight += 1
        self.held = self.left if self.size is None else math.ceil(self.left / self.size)

    def decide(self, live: list[_Instance]) -> None:
        """The shared policy, on what the fleet shows now."""
        s = self.s
        state = FleetState(
            queued=len(self.queue) + (self.held if s.held_visible else 0) + len(self.lost),
            running=sum(1 for i in live for sl in i.slots if sl is not None),
            instances=len(live),
            slots_per_instance=s.cores,
            busy_instances=sum(1 for i in live if i.busy()),
            last_scale_out=self.last_scale_out,
            low_since=self.low_since,
        )
        decision = desired_instances(state, self.policy, self.t)
        self.low_since = decision.low_since
        if decision.delta > 0:
            for _ in range(decision.delta):
                self.instances.append(_Instance(self.t, self.t + s.boot_seconds, [None] * s.cores))
            self.last_scale_out = self.t
        elif decision.delta < 0:
            idle = sorted((i for i in live if not i.busy()), key=lambda i: -i.ready)
            for inst in idle[: -decision.delta]:
                inst.ended = self.t

    def interrupt(self, live: list[_Instance]) -> None:
        """Spot interruptions: batches handed back at once (agent) or when their lease lapses."""
        s = self.s
        for inst in live:
            if not (self.p_interrupt and self.rng.random() < self.p_interrupt):
                continue
            self.result.interruptions += 1
            inst.ended = self.t + s.notice_seconds  # billed through the notice
            for sl in inst.slots:
                if sl is None:
                    continue
                if s.agent:
                    self.queue.appendleft(int(sl[0]))
                    self.result.resent += 1
                else:
                    self.lost.append((self.t + s.lease_seconds + 1, int(sl[0])))
            inst.slots = [None] * s.cores

    def work(self, inst: _Instance, k: int) -> None:
        """One step of slot `k`: batches back to back, the next taken as soon as one ends."""
        budget = self.s.dt
        while True:
            # Take the next batch as soon as one ends (prefetch), even at the step's end.
            if inst.slots[k] is None and self.queue:
                items = self.queue.popleft()
                inst.slots[k] = [items, items * self.s.seconds_per_item]
            slot = inst.slots[k]
            if slot is None or budget <= 1e-12:
                return
            spent = min(budget, slot[1])
            slot[1] -= spent
            budget -= spent
            if slot[1] <= 1e-12:
                inst.slots[k] = None
                self.finished(int(slot[0]), budget)

    def finished(self, items: int, budget: float) -> None:
        self.in_flight -= 1
        self.done_items += items
        if self.probes:
            self.probes -= 1
        if self.done_items == self.s.items:
            self.result.makespan = self.t + self.s.dt - budget


def compare(s: Scenario, policy: Policy) -> tuple[Result, Result, Result]:
    return (simulate(s, policy), static(s, policy.max_instances), ideal(s, policy.max_instances))


def table(results: tuple[Result, ...], bound: Result) -> str:
    head = (
        "| fleet | makespan | vs ideal | instance-hours | vs ideal | cost | "
        "peak | Spot interruptions | batches re-run |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results:
        rows.append(
            f"| {r.name} | {r.makespan:,.1f} s | {r.makespan / bound.makespan - 1:+.1%} | "
            f"{r.instance_hours:.3f} | {r.instance_seconds / bound.instance_seconds - 1:+.1%} | "
            f"${r.cost:,.3f} | {r.peak_instances or '-'} | {r.interruptions} | {r.resent} |"
        )
    return head + "\n".join(rows)


def plot(auto: Result, fixed: Result, bound: Result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    t = [p[0] for p in auto.timeline]
    top.plot(
        t,
        [max(p[1], 0.8) for p in auto.timeline],
        label="waiting: queued + held back\n(each ID counts while calibrating)",
    )
    top.plot(t, [max(p[2], 0.8) for p in auto.timeline], label="running")
    top.set_yscale("log")
    top.set_ylabel("batches")
    top.legend(loc="upper right", fontsize="small")
    top.set_title(title, fontsize="medium")
    bottom.plot(
        [p[0] for p in fixed.timeline],
        [p[3] for p in fixed.timeline],
        color="tab:grey",
        linewidth=4,
        alpha=0.4,
        label=fixed.name,
    )
    bottom.plot(t, [p[3] for p in auto.timeline], label="autoscaled: launched")
    bottom.plot(t, [p[4] for p in auto.timeline], linestyle="--", label="autoscaled: booted")
    bottom.axvline(bound.makespan, color="grey", linestyle=":", label="ideal makespan")
    bottom.set_ylabel("instances")
    bottom.set_xlabel("seconds since the job was submitted")
    bottom.legend(loc="center left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(s: Scenario, policy: Policy, png: Path | None = None) -> tuple[str, tuple[Result, ...]]:
    """The comparison as a Markdown table (and a PNG when `png` is given)."""
    auto, fixed, bound = compare(s, policy)
    if png is not None:
        plot(
            auto,
            fixed,
            bound,
            png,
            f"{s.items:,} items x {s.seconds_per_item * 1000:g} ms, {s.cores} cores/instance, "
            f"{s.boot_seconds:g} s boot, max {policy.max_instances}, "
            f"Spot {s.spot_rate:g}/h",
        )
    return table((auto, fixed, bound), bound), (auto, fixed, bound)


def scenario_with(**changes: Any) -> Scenario:
    return replace(Scenario(), **changes)
