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
  The instance is billed for the two-minute notice, and no longer counts;
- the control plane: one launcher sends at most `driver_rate` batches a
  second and collects at most as many; a batch it has not sent leaves its
  slot idle, and one it has not collected holds its place in the in-flight
  window. A batch's slot waits a broker round trip before it starts and a
  store round trip (the commit) after it ends.

It compares the autoscaled fleet with (a) a static fleet of max instances,
launched with the job and stopped the moment it ends (the best a static
fleet can do), and (b) the ideal bound: total work / (max x cores) plus one
boot, with max instances billed for exactly that long. `largest_busy_fleet`
asks the control plane alone how many slots one job keeps busy (docs/scale.md).

Running batches are kept as groups that started together on one instance,
with a heap of their ends, and the queue as runs of one batch size: a step
costs about the same at 100,000 slots as at 100.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.autoscale import FleetState, Policy, desired_instances
from app.launcher.plan import (
    DRIVER_RATE,
    BatchPlan,
    batch_size,
    grown_size,
    in_flight_limit,
    probe_count,
)
from app.settings import LEASE_SECONDS, MAX_BATCH_SECONDS

# The busy-fleet runs give each slot this many seconds of work: long enough that the
# answer is about the control plane (how fast one launcher hands batches out and takes
# them in) and not about the tail of a short job, short enough to answer in seconds.
WORK_PER_SLOT = 600.0
BUSY = 0.9  # the utilization `largest_busy_fleet` asks for by default


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
    # The control plane. Batches a second one launcher (or driver) sends, and as many it
    # collects: what it sustains (app/launcher/plan.py, measured by `make bench-scale`),
    # not the lower rate the plan sizes batches for.
    driver_rate: float = DRIVER_RATE
    # Seconds per round trip: local-machine round trips, measured on the development
    # machine; EC2 within one AZ is typically 0.2-1 ms. On SQS a handoff also waits for
    # kombu's next look at a worker whose slots were all busy (up to its polling_interval,
    # 1 s: docs/scale.md).
    store_latency: float = 0.0005
    broker_latency: float = 0.001

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


@dataclass(eq=False)
class _Instance:
    launched: float
    ready: float
    cores: int
    ended: float | None = None
    # Its running batches, as groups that started together: group id -> (items, count).
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)
    running: int = 0

    def busy(self) -> bool:
        return self.running > 0


class _Queue:
    """Batches on the broker, in order, as runs of one size: [items, count]."""

    def __init__(self) -> None:
        self.runs: deque[list[int]] = deque()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def put(self, items: int, count: int = 1, front: bool = False) -> None:
        end = 0 if front else -1
        if self.runs and self.runs[end][0] == items:
            self.runs[end][1] += count
        elif front:
            self.runs.appendleft([items, count])
        else:
            self.runs.append([items, count])
        self.count += count

    def take(self, n: int) -> list[tuple[int, int]]:
        """Up to n batches from the front, as (items, count) runs."""
        out = []
        while n > 0 and self.runs:
            run = self.runs[0]
            k = min(n, run[1])
            out.append((run[0], k))
            run[1] -= k
            n -= k
            self.count -= k
            if not run[1]:
                self.runs.popleft()
        return out


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


def busy_fraction(
    s: Scenario, slots: int, work_per_slot: float = WORK_PER_SLOT, floor: float = 0.0
) -> float:
    """How busy `slots` slots are over one job of `work_per_slot` seconds of work each:
    the ideal time (the work / slots) over the job's wall time, up to 1.

    The fleet is static and up when the job starts (no boot, no Spot): one instance of
    `slots` slots, since the launcher sees slots, not instances; the rest is `s`. A run
    that cannot reach `floor` any more stops there and returns a value below it.
    """
    items = max(1, round(slots * work_per_slot / s.seconds_per_item))
    job = replace(s, items=items, cores=slots, boot_seconds=0.0, spot_rate=0.0)
    one = Policy(min_instances=1, max_instances=1)
    run = _Simulation(job, one, Result("busy fleet", 0.0, 0.0, job.price), up=1)
    best = job.work / slots
    give_up = best / floor if floor > 0 else 6 * 3600
    while not run.result.makespan and run.t <= give_up:
        run.step()
    return best / (run.result.makespan or run.t)


def largest_busy_fleet(
    s: Scenario,
    work_per_slot: float = WORK_PER_SLOT,
    utilization: float = BUSY,
    limit: int = 1 << 20,
    tolerance: float = 0.01,
) -> int:
    """The most slots one job keeps at least `utilization` busy (`busy_fraction`), within
    `tolerance`; 0 if no fleet up to `limit` slots is, `limit` or just under it if all are.

    Slot counts double from one until a busy enough fleet is followed by one that is not
    (a small fleet may miss it and a larger one reach it: a long broker handoff weighs on
    the short batches of a small fleet), then bisection between the two.
    """

    def busy(slots: int) -> bool:
        return busy_fraction(s, slots, work_per_slot, floor=utilization) >= utilization

    good, slots = 0, 1
    while slots <= limit:
        if busy(slots):
            good = slots
        elif good:
            break
        slots *= 2
    if not good or slots > limit:
        return good
    bad = slots
    while bad - good > max(1.0, good * tolerance):
        middle = (good + bad) // 2
        if busy(middle):
            good = middle
        else:
            bad = middle
    return good


class _Simulation:
    """One simulated job: the launcher, the policy, Spot and the slots, one `dt` per step."""

    def __init__(self, s: Scenario, policy: Policy, result: Result, up: int = 0) -> None:
        self.s = s
        self.policy = policy
        self.result = result
        self.rng = random.Random(s.seed)
        self.p_interrupt = 1 - math.exp(-s.spot_rate * s.dt / 3600)
        # `up` instances are booted before the job starts (the busy-fleet runs).
        self.instances = [_Instance(0.0, 0.0, s.cores) for _ in range(up)]
        self.queue = _Queue()  # batches on the broker
        self.lost: list[tuple[float, int]] = []  # (when the launcher re-sends it, items)
        self.ends: list[tuple[float, int, _Instance]] = []  # heap: (end, group id, instance)
        self.group_ids = itertools.count()
        # A batch's slot waits for the broker's handoff, and for its commit in the store.
        self.overhead = s.broker_latency + s.store_latency
        self.t = 0.0
        # The launcher: calibration first, one-ID probes on up to one registered slot each.
        self.probe_slots = max(1, self.slots_registered())
        n_probe = probe_count(self.probe_slots, s.items)
        self.queue.put(1, n_probe)
        self.left = s.items - n_probe  # IDs not yet cut into batches
        self.size: int | None = None  # batch size, once calibrated
        self.grow_at = 0.0  # when the launcher next looks whether batches should grow
        self.probes = n_probe  # probe batches not yet committed
        self.in_flight = n_probe  # batches sent and not collected
        self.held = 0
        self.done_items = 0
        # What the launcher may still send and collect in this step (driver_rate x dt), and
        # the batches committed that it has not collected yet: (items, count).
        self.send_credit = 0.0
        self.collect_credit = 0.0
        self.uncollected: deque[tuple[int, int]] = deque()
        # The policy.
        self.last_scale_out: float | None = None
        self.low_since: float | None = None
        self.next_eval = 0.0

    def live(self) -> list[_Instance]:
        return [i for i in self.instances if i.ended is None]

    def slots_registered(self) -> int:
        return sum(i.cores for i in self.live() if i.ready <= self.t)

    def step(self) -> None:
        s = self.s
        self.launcher_turn()
        self.resend_lost()
        self.top_up()
        live = self.live()
        if self.t >= self.next_eval:
            self.next_eval = self.t + s.interval
            self.decide(live)
            live = self.live()
            self.result.peak_instances = max(self.result.peak_instances, len(live))
        self.interrupt(live)
        self.work()
        self.t += s.dt
        live = self.live()
        self.result.timeline.append(
            (
                self.t,
                len(self.queue) + self.held + len(self.lost),
                sum(i.running for i in live),
                len(live),
                sum(1 for i in live if i.ready <= self.t),
            )
        )

    def launcher_turn(self) -> None:
        """This step's budget of sends and collections (unused budget is not saved up),
        and the committed batches the last one left uncollected."""
        per_step = self.s.driver_rate * self.s.dt
        most = max(per_step, 1.0)  # a driver slower than a batch a step sends one now and then
        self.send_credit = min(self.send_credit + per_step, most)
        self.collect_credit = min(self.collect_credit + per_step, most)
        while self.uncollected and self.collect_credit >= 1:
            items, count = self.uncollected.popleft()
            n = int(min(count, self.collect_credit))
            self.collect(items, n, self.t)
            if count > n:
                self.uncollected.appendleft((items, count - n))

    def resend_lost(self) -> None:
        """Lost batches come back when their lease lapses (no agent)."""
        for when, items in [x for x in self.lost if x[0] <= self.t]:
            self.lost.remove((when, items))
            self.queue.put(items, front=True)
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
        if self.size is not None and self.t >= self.grow_at:
            # As the launcher (Dispatch.grow), once a second: larger batches for the
            # batches not cut yet once the fleet has grown past what they were sized for.
            self.grow_at = self.t + 1.0
            grown = grown_size(
                BatchPlan((), self.size, s.items, tail=1),
                s.seconds_per_item,
                s.target_seconds,
                self.slots_registered(),
                max_batch_seconds=s.max_batch_seconds,
            )
            self.size = grown or self.size
        if self.size is not None:
            cap = in_flight_limit(self.slots_registered())
            while self.left > 0 and self.in_flight < cap and self.send_credit >= 1:
                n = min(self.size, self.left)
                k = int(min(cap - self.in_flight, self.send_credit, self.left // n))
                self.queue.put(n, k)
                self.left -= n * k
                self.in_flight += k
                self.send_credit -= k
        self.held = self.left if self.size is None else math.ceil(self.left / self.size)

    def decide(self, live: list[_Instance]) -> None:
        """The shared policy, on what the fleet shows now."""
        s = self.s
        state = FleetState(
            queued=len(self.queue) + (self.held if s.held_visible else 0) + len(self.lost),
            running=sum(i.running for i in live),
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
                self.instances.append(_Instance(self.t, self.t + s.boot_seconds, s.cores))
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
            for items, count in inst.groups.values():
                if s.agent:
                    self.queue.put(items, count, front=True)
                    self.result.resent += count
                else:
                    self.lost.extend([(self.t + s.lease_seconds + 1, items)] * count)
            inst.groups.clear()  # their ends in the heap are skipped
            inst.running = 0

    def work(self) -> None:
        """One step of every slot: free slots take batches now, and each slot that ends
        one takes the next at once (prefetch), in the order the batches end."""
        end = self.t + self.s.dt + 1e-12
        for inst in self.instances:
            if inst.ended is None and inst.ready <= self.t:
                self.start(inst, inst.cores - inst.running, self.t)
        while self.ends and self.ends[0][0] <= end:
            when, group, inst = heapq.heappop(self.ends)
            batches = inst.groups.pop(group, None)
            if batches is None:
                continue  # handed back on a Spot notice
            items, count = batches
            inst.running -= count
            self.finished(items, count, when)
            self.start(inst, count, when)

    def start(self, inst: _Instance, free: int, when: float) -> None:
        for items, count in self.queue.take(free):
            group = next(self.group_ids)
            inst.groups[group] = (items, count)
            inst.running += count
            done = when + items * self.s.seconds_per_item + self.overhead
            heapq.heappush(self.ends, (done, group, inst))

    def finished(self, items: int, count: int, when: float) -> None:
        """Committed: collected now as far as this step's budget goes, later otherwise."""
        n = int(min(count, self.collect_credit))
        if n:
            self.collect(items, n, when)
        if count > n:
            self.uncollected.append((items, count - n))

    def collect(self, items: int, count: int, when: float) -> None:
        self.collect_credit -= count
        self.in_flight -= count
        self.done_items += items * count
        self.probes = max(0, self.probes - count)
        if self.done_items == self.s.items:
            self.result.makespan = when


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


def busy_line(s: Scenario, slots: int, work_per_slot: float, utilization: float) -> str:
    """What `fleet simulate --largest-busy-fleet` says, with the limits it assumed."""
    return (
        f"one job keeps {slots:,} slots ≥ {utilization:.0%} busy "
        f"(driver {s.driver_rate:g} batches/s, store {s.store_latency * 1000:g} ms, "
        f"broker {s.broker_latency * 1000:g} ms, {s.seconds_per_item * 1000:g} ms items, "
        f"{work_per_slot / 60:g} min of work per slot)"
    )


def scenario_with(**changes: Any) -> Scenario:
    return replace(Scenario(), **changes)
