"""`fleet simulate`: a job on an autoscaled fleet, in discrete time, with the real policy.

    fleet simulate --items 1000000 --seconds-per-item 0.05 --cores 16 --boot 60 \\
        --max-instances 50 --plot docs/simulate.png

The model follows the real parts closely enough to choose the defaults:

- the launcher calibrates on one-ID probe batches (one per registered slot,
  at least one), advertising each ID left as a batch meanwhile; then it cuts
  batches of `target_seconds` of work (app/jobs.py `batch_size`), keeps
  max(4, 2 x slots) on the broker and advertises the rest as held back;
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

from app.autoscale import FleetState, Policy, desired_instances

PROBE_LIMIT = 32  # as app/jobs.py
BATCHES_PER_SLOT = 4


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
    max_batch_seconds: float = 900.0
    lease_seconds: float = 10.0
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


def simulate(s: Scenario, policy: Policy, name: str = "autoscaled",
             stop_at_end: bool = False, horizon: float = 6 * 3600) -> Result:
    """Run the job from an empty fleet; after it, run on until the fleet is back to its minimum."""
    rng = random.Random(s.seed)
    p_interrupt = 1 - math.exp(-s.spot_rate * s.dt / 3600)
    instances: list[_Instance] = []
    queue: deque[int] = deque()  # batches on the broker, by their number of items
    lost: list[tuple[float, int]] = []  # (when the launcher re-sends it, items)
    result = Result(name, 0.0, 0.0, s.price)

    # The launcher.
    left = s.items  # IDs not yet cut into batches
    size: int | None = None  # batch size, once calibrated
    probes = 0  # probe batches not yet committed
    in_flight = 0  # batches sent and not committed
    done_items = 0

    last_scale_out: float | None = None
    low_since: float | None = None
    next_eval = 0.0
    t = 0.0

    def slots_registered() -> int:
        return sum(len(i.slots) for i in instances if i.ended is None and i.ready <= t)

    # Calibration: one-ID probes on up to one registered slot each (at least one).
    n_probe = min(max(1, slots_registered()), PROBE_LIMIT, s.items)
    probe_slots = max(1, slots_registered())
    for _ in range(n_probe):
        queue.append(1)
    left -= n_probe
    probes = in_flight = n_probe

    while t < horizon:
        # Lost batches come back when their lease lapses (no agent).
        for when, items in [x for x in lost if x[0] <= t]:
            lost.remove((when, items))
            queue.appendleft(items)
            result.resent += 1
        # The launcher tops up the broker.
        if size is None and probes == 0:
            per_slot_cap = math.ceil(s.items / (probe_slots * BATCHES_PER_SLOT))
            size = max(1, int(min(s.target_seconds / s.seconds_per_item,
                                  s.max_batch_seconds / 4 / s.seconds_per_item, per_slot_cap)))
        if size is not None:
            cap = max(4, 2 * slots_registered())
            while left > 0 and in_flight < cap:
                n = min(size, left)
                queue.append(n)
                left -= n
                in_flight += 1
        held = left if size is None else math.ceil(left / size)

        # The policy.
        live = [i for i in instances if i.ended is None]
        running = sum(1 for i in live for sl in i.slots if sl is not None)
        if t >= next_eval:
            next_eval = t + s.interval
            state = FleetState(
                queued=len(queue) + (held if s.held_visible else 0) + len(lost),
                running=running, instances=len(live),
                slots_per_instance=s.cores, busy_instances=sum(1 for i in live if i.busy()),
                last_scale_out=last_scale_out, low_since=low_since)
            decision = desired_instances(state, policy, t)
            low_since = decision.low_since
            if decision.delta > 0:
                for _ in range(decision.delta):
                    instances.append(_Instance(t, t + s.boot_seconds, [None] * s.cores))
                last_scale_out = t
            elif decision.delta < 0:
                idle = sorted((i for i in live if not i.busy()), key=lambda i: -i.ready)
                for inst in idle[:-decision.delta]:
                    inst.ended = t
            live = [i for i in instances if i.ended is None]
            result.peak_instances = max(result.peak_instances, len(live))

        # Spot interruptions.
        for inst in live:
            if p_interrupt and rng.random() < p_interrupt:
                result.interruptions += 1
                inst.ended = t + s.notice_seconds  # billed through the notice
                for sl in inst.slots:
                    if sl is None:
                        continue
                    if s.agent:
                        queue.appendleft(int(sl[0]))
                        result.resent += 1
                    else:
                        lost.append((t + s.lease_seconds + 1, int(sl[0])))
                inst.slots = [None] * s.cores

        # Work for one step: each slot runs batches back to back.
        for inst in instances:
            if inst.ended is not None or inst.ready > t:
                continue
            for k in range(len(inst.slots)):
                budget = s.dt
                while True:
                    # Take the next batch as soon as one ends (prefetch), even at the step's end.
                    if inst.slots[k] is None and queue:
                        items = queue.popleft()
                        inst.slots[k] = [items, items * s.seconds_per_item]
                    slot = inst.slots[k]
                    if slot is None or budget <= 1e-12:
                        break
                    spent = min(budget, slot[1])
                    slot[1] -= spent
                    budget -= spent
                    if slot[1] <= 1e-12:
                        inst.slots[k] = None
                        in_flight -= 1
                        done_items += int(slot[0])
                        if probes:
                            probes -= 1
                        if done_items == s.items:
                            result.makespan = t + s.dt - budget
        t += s.dt
        live = [i for i in instances if i.ended is None]
        result.timeline.append((t, len(queue) + held + len(lost),
                                sum(1 for i in live for sl in i.slots if sl is not None),
                                len(live), sum(1 for i in live if i.ready <= t)))
        if result.makespan:
            if stop_at_end:
                for inst in live:
                    inst.ended = result.makespan
                break
            if len(live) <= policy.min_instances:
                break
    end = t
    result.instance_seconds = sum((i.ended if i.ended is not None else end) - i.launched
                                  for i in instances)
    if not result.makespan:
        raise RuntimeError(f"the job did not finish within {horizon:.0f} s of simulated time")
    return result


def compare(s: Scenario, policy: Policy) -> tuple[Result, Result, Result]:
    return (simulate(s, policy), static(s, policy.max_instances),
            ideal(s, policy.max_instances))


def table(results: tuple[Result, ...], bound: Result) -> str:
    head = ("| fleet | makespan | vs ideal | instance-hours | vs ideal | cost | "
            "peak | Spot interruptions | batches re-run |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for r in results:
        rows.append(
            f"| {r.name} | {r.makespan:,.1f} s | {r.makespan / bound.makespan - 1:+.1%} | "
            f"{r.instance_hours:.3f} | {r.instance_seconds / bound.instance_seconds - 1:+.1%} | "
            f"${r.cost:,.3f} | {r.peak_instances or '-'} | {r.interruptions} | {r.resent} |")
    return head + "\n".join(rows)


def plot(auto: Result, fixed: Result, bound: Result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    t = [p[0] for p in auto.timeline]
    top.plot(t, [max(p[1], 0.8) for p in auto.timeline],
             label="waiting: queued + held back\n(each ID counts while calibrating)")
    top.plot(t, [max(p[2], 0.8) for p in auto.timeline], label="running")
    top.set_yscale("log")
    top.set_ylabel("batches")
    top.legend(loc="upper right", fontsize="small")
    top.set_title(title, fontsize="medium")
    bottom.plot([p[0] for p in fixed.timeline], [p[3] for p in fixed.timeline],
                color="tab:grey", linewidth=4, alpha=0.4, label=fixed.name)
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
        plot(auto, fixed, bound, png,
             f"{s.items:,} items x {s.seconds_per_item * 1000:g} ms, {s.cores} cores/instance, "
             f"{s.boot_seconds:g} s boot, max {policy.max_instances}, "
             f"Spot {s.spot_rate:g}/h")
    return table((auto, fixed, bound), bound), (auto, fixed, bound)


def scenario_with(**changes: object) -> Scenario:
    return replace(Scenario(), **changes)
