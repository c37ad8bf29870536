"""Benchmark: the control plane with many emulated slots (`make bench-scale`).

    .venv/bin/python -m tests.bench.bench_scale [--slots 100,1000,5000] [--brokers redis,rabbitmq]
                                                [--ideal SECONDS] [--sleep-ms 50]
                                                [--batch-seconds default,10]
                                                [--threads-per-worker 100]

Each emulated slot is a thread of a `celery worker -P threads` process running
`bench_sleep` (50 ms asleep, almost no CPU), so a job's wall time beyond its ideal
(IDs x 50 ms / slots) is the control plane's: the launcher, the broker, the result
store and the workers' main loops. One local fleet's broker and Redis store per broker
kind; worker processes of at most 100 threads each. For each size: slot utilization
(ideal / wall), how busy the slots were (the batch seconds the workers reported over
slots x wall: an item may take longer than its nap on a loaded machine), every ID
exactly once in the output, batches sent and re-sent, the CPU seconds per batch of each process,
the store's (and a Redis broker's) commands per batch, and the launcher's peak memory.
The table goes to stdout, the numbers to bench-results/scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import psutil
import redis

from app.host.command import worker_argv
from app.launcher import JobOptions, Launcher, Source
from app.store import open_store
from scripts.local.fleet import LocalFleet

REPO = Path(__file__).resolve().parents[2]
# Slots per emulated worker process. Each process's main loop fetches, hands over and
# acknowledges the batches of all its slots (a real host's, 16 or so): with 500, a 20 s
# job on 1,000 slots reached 0.37 of its ideal here, with 100 0.60, with 50 or 25 no better.
THREADS_PER_WORKER = 100


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children, now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def commands(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def start_workers(
    fleet: LocalFleet, slots: int, workdir: Path, sleep_ms: float, per_process: int
) -> list:
    env = fleet.worker_env()
    env["FLEET_BENCH_SLEEP_MS"] = str(sleep_ms)
    procs = []
    count = math.ceil(slots / per_process)
    for i in range(count):
        threads = slots // count + (1 if i < slots % count else 0)
        argv = worker_argv(sys.executable, fleet.queue, threads, f"emulated{i}-{os.getpid()}@%h")
        argv[argv.index("worker") + 1 : argv.index("worker") + 1] = ["-P", "threads"]
        log = open(workdir / f"emulated{i}.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        )
        log.close()
    store = open_store(fleet.settings)
    deadline = time.monotonic() + 120
    while sum(int(w.get("concurrency", 0)) for w in store.workers()) < slots:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the emulated workers did not come up; logs in {workdir}")
        time.sleep(0.2)
    return procs


def stop_workers(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def exactly_once(out: Path, n: int) -> None:
    """Every ID of range:0:n in the output once, and nothing else."""
    decode = msgspec.json.Decoder().decode
    ids = [decode(line)["id"] for line in out.read_bytes().splitlines()]
    assert len(ids) == n and set(ids) == set(range(n)), f"{len(ids)} lines, {len(set(ids))} IDs"


def measure(
    fleet: LocalFleet,
    slots: int,
    ideal: float,
    sleep_ms: float,
    workdir: Path,
    batch_seconds: float | None = None,
    per_process: int = THREADS_PER_WORKER,
) -> dict:
    """One job on `slots` emulated slots, `ideal` seconds of work per slot; `batch_seconds`:
    batches of that long (None: the launcher's own sizing, the default)."""
    n = int(ideal * slots / (sleep_ms / 1000))
    procs = start_workers(fleet, slots, workdir, sleep_ms, per_process)
    try:
        assert fleet.broker is not None and fleet.results is not None
        servers = {"broker": fleet.broker.proc.pid, "store": fleet.results.proc.pid}
        cpu0 = {k: tree_cpu(pid) for k, pid in servers.items()}
        workers0 = sum(tree_cpu(p.pid) for p in procs)
        me0 = psutil.Process().cpu_times()
        store_ops0 = commands(fleet.settings.result_url)
        broker_redis = fleet.settings.broker_url.startswith("redis")
        broker_ops0 = commands(fleet.settings.broker_url) if broker_redis else 0
        opts = JobOptions(
            task="bench_sleep",
            source=Source.parse(f"range:0:{n}"),
            out=workdir / "out.jsonl",
            progress=False,
        )
        if batch_seconds is not None:
            opts = dataclasses.replace(opts, target_seconds=batch_seconds)
        summary = Launcher(fleet.settings).run(opts)
        me1 = psutil.Process().cpu_times()
        assert summary.status == "ok" and summary.items == n, summary
        batches = summary.batches + summary.resent
        cpu = {k: tree_cpu(pid) - cpu0[k] for k, pid in servers.items()}
        cpu["launcher"] = (me1.user + me1.system) - (me0.user + me0.system)
        cpu["workers"] = sum(tree_cpu(p.pid) for p in procs) - workers0
        row = {
            "slots": slots,
            "broker": fleet.broker_kind,
            "ids": n,
            "ideal_s": round(n * sleep_ms / 1000 / slots, 2),
            "wall_s": round(summary.wall_seconds, 2),
            "utilization": round(n * sleep_ms / 1000 / slots / summary.wall_seconds, 3),
            # How much of the time the slots ran batches, whatever an item took in them
            # (under this machine's load, often more than its nap).
            "slots_busy": round(summary.batch_seconds / slots / summary.wall_seconds, 3),
            "item_ms": round(summary.batch_seconds / n * 1000, 1),
            "batches": summary.batches,
            "resent": summary.resent,
            "batch_size": math.ceil(n / max(summary.batches, 1)),
            "batch_seconds": batch_seconds or "default",
            "batches_per_second": round(batches / summary.wall_seconds, 1),
            "cpu_ms_per_batch": {k: round(v / batches * 1000, 2) for k, v in cpu.items()},
            "control_plane_ms_per_batch": round(
                (cpu["launcher"] + cpu["broker"] + cpu["store"]) / batches * 1000, 2
            ),
            "store_commands_per_batch": round(
                (commands(fleet.settings.result_url) - store_ops0) / batches, 1
            ),
            "launcher_max_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
        }
        exactly_once(workdir / "out.jsonl", n)  # after the peak memory is read: it takes some
        if broker_redis:
            row["broker_commands_per_batch"] = round(
                (commands(fleet.settings.broker_url) - broker_ops0) / batches, 1
            )
        return row
    finally:
        stop_workers(procs)


def batch_label(row: dict) -> str:
    size = f"{row['batch_size']:,} IDs"
    if row["batch_seconds"] == "default":
        return f"default, {size}"
    return f"{row['batch_seconds']:g} s, {size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", default="100,1000,5000")
    parser.add_argument("--brokers", default="redis,rabbitmq")
    parser.add_argument("--ideal", type=float, default=20.0, help="ideal seconds per job")
    parser.add_argument("--sleep-ms", type=float, default=50.0)
    parser.add_argument(
        "--batch-seconds",
        default="default",
        help="comma-separated target batch durations to run each size with; "
        "'default' is the launcher's own sizing (at least slots / MAX_BATCH_RATE seconds)",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        default=THREADS_PER_WORKER,
        help="emulated slots per worker process",
    )
    args = parser.parse_args()
    durations = [None if d == "default" else float(d) for d in args.batch_seconds.split(",")]
    rows = []
    for broker in args.brokers.split(","):
        with (
            tempfile.TemporaryDirectory() as tmp,
            LocalFleet(0, broker, include=("tests.bench.tasks",), workdir=Path(tmp)) as fleet,
        ):
            for slots in (int(s) for s in args.slots.split(",")):
                for duration in durations:
                    row = measure(
                        fleet,
                        slots,
                        args.ideal,
                        args.sleep_ms,
                        Path(tmp),
                        duration,
                        args.threads_per_worker,
                    )
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    print(
        "| broker | slots | IDs | batch | ideal | wall | utilization | slots busy (item ms) | "
        "batches (per s) | re-sent | "
        "control plane ms/batch (launcher + broker + store) | worker processes ms/batch | "
        "store cmds/batch | launcher RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cpu_ms_per_batch"]
        print(
            f"| {r['broker']} | {r['slots']:,} | {r['ids']:,} | {batch_label(r)} | "
            f"{r['ideal_s']} s | {r['wall_s']} s | {r['utilization']:.2f} | "
            f"{r['slots_busy']:.2f} ({r['item_ms']}) | "
            f"{r['batches']:,} ({r['batches_per_second']}) | {r['resent']} | "
            f"{r['control_plane_ms_per_batch']} ({c['launcher']} + {c['broker']} + "
            f"{c['store']}) | {c['workers']} | {r['store_commands_per_batch']} | "
            f"{r['launcher_max_rss_mb']} MB |"
        )
    results = REPO / "bench-results"
    results.mkdir(exist_ok=True)
    (results / "scale.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
