"""Benchmark: one 1,000,000-ID no-op job to each sink, beside the local file, in one run;
and the same job submitted (`fleet submit`: driven in the fleet, its results kept in the
result store), from the submit to the driver marking it done.

    .venv/bin/python -m tests.bench.bench_sinks [--ids N] [--repeat R]

One local fleet (Redis broker and store, one worker instance per usable CPU), a
PostgreSQL server (Debian's, started here) and moto's S3 server on this machine.
Each row is the best of --repeat runs of `bench_noop` over range:0:N through the
Launcher API, checked for every ID once; the table goes to stdout and the numbers
to bench-results/sinks.json. moto is not S3: its per-request cost is this
machine's CPU, so the S3 row says what the kit adds, not what AWS takes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import boto3

from app.launcher import JobOptions, Launcher, Source
from app.sinks import sink_spec
from scripts.local.fleet import LocalFleet
from tests.support.aws import moto_server
from tests.support.postgres import Postgres
from tests.support.sink_writers import load

REPO = Path(__file__).resolve().parents[2]
TASKS = ("tests.bench.tasks", "tests.support.sink_writers")


def timed(fleet: LocalFleet, n: int, out: Path | None, sink: dict | None) -> tuple[float, str]:
    opts = JobOptions(
        task="bench_noop", source=Source.parse(f"range:0:{n}"), out=out, sink=sink, progress=False
    )
    started = time.perf_counter()
    summary = Launcher(fleet.settings).run(opts)
    wall = time.perf_counter() - started
    assert summary.status == "ok" and summary.items == n, summary
    return wall, summary.job


def timed_submit(fleet: LocalFleet, n: int) -> tuple[float, str]:
    """`fleet submit` (the driver in a worker, the results kept in the store) to its end."""
    from app.launcher.driver import submit

    launcher = Launcher(fleet.settings)
    opts = JobOptions(task="bench_noop", source=Source.parse(f"range:0:{n}"), progress=False)
    started = time.perf_counter()
    job = submit(launcher, opts)
    while (launcher.store.get_meta(job) or {}).get("status") not in ("ok", "errors", "failed"):
        time.sleep(0.02)
    wall = time.perf_counter() - started
    items = launcher.store.journal(job)[3]
    assert items == n, items
    return wall, job


def check(name: str, job: str, n: int, pg: Postgres, sink_dir: Path) -> None:
    """Every ID once in the sink the row wrote to (the file and S3 rows: by the job's counts)."""
    if name.startswith("PostgreSQL"):
        found = pg.query("SELECT count(*), count(DISTINCT id) FROM bench WHERE job = %s", job)
        assert found == [(n, n)], found
    elif name.startswith("user"):
        ids = {r["id"] for r in load(sink_dir, job)}
        assert len(ids) == n, len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.ids
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, moto_server() as (_, endpoint):
        sink_dir = Path(tmp, "sink")
        sink_dir.mkdir()
        pg = Postgres().start()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-out")
        try:
            with LocalFleet(
                len(os.sched_getaffinity(0)),
                "redis",
                include=TASKS,
                env={"FLEET_TEST_SINK_DIR": str(sink_dir)},
            ) as fleet:
                targets = {
                    "local file (today)": (Path(tmp, "out.jsonl"), None),
                    "S3 parts (moto)": (
                        None,
                        sink_spec(f"s3://bench-out/r/?endpoint_url={endpoint}"),
                    ),
                    "PostgreSQL, 4 writers": (
                        None,
                        sink_spec(pg.url(table="bench"), max_writers=4),
                    ),
                    "user writer (files)": (
                        None,
                        sink_spec(None, "tests.support.sink_writers:save"),
                    ),
                    "result store, by `fleet submit`": (None, None),
                }
                for _ in range(args.repeat):  # interleaved: the machine's drift hits each alike
                    for name, (out, sink) in targets.items():
                        if name.startswith("result store"):
                            wall, job = timed_submit(fleet, n)
                        else:
                            wall, job = timed(fleet, n, out, sink)
                        rows[name] = min(rows.get(name, wall), wall)
                        check(name, job, n, pg, sink_dir)
        finally:
            pg.close()
    print(f"| sink | wall, {n:,} no-op IDs | µs per ID |")
    print("|---|---|---|")
    for name, wall in rows.items():
        print(f"| {name} | {wall:.2f} s | {wall / n * 1e6:.2f} |")
    results = REPO / "bench-results"
    results.mkdir(exist_ok=True)
    report = {"ids": n, "cpus": len(os.sched_getaffinity(0)), "wall": rows}
    (results / "sinks.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
