"""Benchmark: the fleet against its peers, side by side, in one run on this machine.

Run it from the repository root:

    make bench                                   # or:
    .venv/bin/python -m tests.bench.bench_fleet  # full run (a few minutes)
    .venv/bin/python -m tests.bench.bench_fleet --quick       # smoke run, small sizes
    .venv/bin/python -m tests.bench.bench_fleet --skip-10m    # without the 10M-ID RSS run

It prints a table and writes every number to bench-results/bench.json
(git-ignored; the path is printed at the end). A benchmark prints: it never
fails the build, it says PASS or MISS next to each target.

What runs
---------
One local fleet for the whole run (scripts.local.LocalFleet): a redis-server
broker, a redis-server result store, and one real `celery worker` instance
per usable CPU, each pinned to its CPU, loading tests.bench.tasks. On it:

* Celery `group` of one task per ID; Celery `chunks` (starmap of the per-ID
  task); Celery `chord` of one task per ID with a summarising callback;
  a Celery group of hand-made list batches (extra, for reference). Timed from
  building the signatures to holding every result in this process;
* the fleet through its Python API in this process
  (`Launcher(settings).run(JobOptions(...))`, timed from constructing the
  Launcher to the return of run(), like Pool: no interpreter start);
* the fleet through `from app import fleet` in this process: `fleet.map` and
  `fleet.Pool().imap_unordered` over a generator of the IDs (timed from the
  call to the last result in hand);
* the fleet through the whole `fleet run` CLI process, wall time from spawn
  to exit, with the launcher's peak RSS.

In this process, while the fleet sits idle: a plain serial loop and
`multiprocessing.Pool(N).map` (N = usable CPUs, default chunksize, pool
start and stop included).

Two workloads: (a) 4,000 CPU-heavy items (a deterministic pure-Python busy
loop of about 1-2 ms, tests.bench.tasks.busy; per-ID group and chord take
2,000 of them), (b) no-op items over 1,000,000 IDs (per-ID group and chord
take 2,000). The table says where a row uses fewer IDs. A last measurement
runs `fleet run bench_noop --ids range:0:10000000` for the launcher's peak RSS.

Noise: every row is the best of --repeat runs (3; one for per-ID group/chord
and the 10M run, and none repeated past --repeat-max-s). The CPU case's
serial, Pool, fleet-API, fleet.map and fleet.Pool rows run interleaved, round by round
(--cpu-rounds, 5; every other round in reverse order), and the 5%-of-Pool
target is judged on the median of the per-round ratios: on a
shared VM the speed of a core drifts by tens of percent over minutes, which
back-to-back blocks would misread as overhead. Before each run the benchmark
waits (bounded, --quiet-wait / --quiet-budget) for other processes to leave
the machine nearly idle.

Correctness is checked for every variant: Celery results are compared with
the serial results (chord: the sum), and every fleet output file must hold
exactly one line per ID, with no error records (outputs up to 2,000,000 lines
are parsed in full: every ID once, CPU results compared with the serial ones).

Peak RSS of a CLI run comes from `/usr/bin/time -f %M` around a fresh child
(psutil polling every 10 ms if GNU time is missing). Not from wait4() /
RUSAGE_CHILDREN: a vfork'ed child inherits this process's RSS high-water mark
before its exec, so those report the benchmark's own size for a tiny child.

Each row also records how much CPU other processes on the machine used
during it ("foreign CPU"): on a shared 2-core box that is the first thing to
check when a number looks off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench-results"
TASKS_MODULE = "tests.bench.tasks"

# Targets (issue 2, deliverable 8).
CPU_VS_POOL_MAX = 1.05  # CPU-heavy fleet wall within 5% of Pool wall
# app.fleet (issue 16): its per-ID cost on 1,000,000 no-op items, against the Launcher API's.
PYTHON_API_VS_LAUNCHER_MAX = 2.0
NOOP_US_PER_ID_MAX = 1.0  # whole `fleet run` process, 1,000,000 no-op IDs
RSS_10M_MAX_MB = 150.0  # launcher peak RSS for 10,000,000 IDs
NOISY = 0.10  # foreign CPU share above which a row is flagged


@dataclass
class Sizes:
    cpu_items: int = 4000
    noop_items: int = 1_000_000
    per_id_cpu: int = 2000  # Celery group / chord on the CPU workload (keeps the run short)
    per_id_noop: int = 2000  # Celery group / chord on the no-op workload
    chunks_noop: int = 1_000_000
    cpu_chunks: int = 30  # number of chunks, CPU case
    noop_chunk_size: int = 10_000  # IDs per chunk, no-op case
    rss_ids: int = 10_000_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            cpu_items=400,
            noop_items=50_000,
            per_id_cpu=400,
            per_id_noop=300,
            chunks_noop=50_000,
            noop_chunk_size=1000,
            rss_ids=500_000,
        )


@dataclass
class Row:
    workload: str  # "cpu" or "noop"
    method: str
    items: int
    wall: float | None = None
    ideal: float | None = None
    overhead_us: float | None = None
    efficiency: float | None = None
    rss_mb: float | None = None
    verified: bool | None = None
    note: str = ""
    foreign_cpu_s: float | None = None  # CPU other processes used during the measurement
    error: str = ""
    diag: dict[str, Any] = field(default_factory=dict)


# -- measuring helpers --------------------------------------------------------


class CpuAccount:
    """System-wide busy CPU seconds, and the share of it not spent by this process tree."""

    def __init__(self) -> None:
        self.me = psutil.Process()

    def _ours(self) -> float:
        t = self.me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = child.cpu_times()
                # children_*: e.g. redis-server's AOF-rewrite forks, reaped by redis.
                total += ct.user + ct.system + ct.children_user + ct.children_system
        return total

    @staticmethod
    def _busy() -> float:
        # Process time only: irq/softirq (loopback traffic) is not charged to any process.
        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0)

    def foreign_share(self, window: float = 0.5) -> float:
        """Share of the machine used by other processes over the next `window` seconds."""
        busy0, ours0 = self._busy(), self._ours()
        time.sleep(window)
        busy1, ours1 = self._busy(), self._ours()
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (window * psutil.cpu_count())

    @contextlib.contextmanager
    def measure(self, row: Row) -> Iterator[None]:
        busy0, ours0 = self._busy(), self._ours()
        try:
            yield
        finally:
            busy1, ours1 = self._busy(), self._ours()
            # Processes that ran and exited outside our tree are invisible to
            # both sides' per-process counters but show in the system total.
            row.foreign_cpu_s = max(0.0, (busy1 - busy0) - (ours1 - ours0))


def count_lines(path: Path) -> tuple[int, bool]:
    """(newline count, file ends with a newline or is empty)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n, last == b"\n"


class _Line(msgspec.Struct):
    id: Any
    result: Any = None
    error: Any = None


def verify_fleet_output(
    path: Path, n: int, expected: Callable[[int], Any] | None, parse_limit: int = 2_000_000
) -> tuple[bool, str]:
    """Exactly n lines; no error records; parsed in full (each ID once, right result) if small."""
    lines, ends_ok = count_lines(path)
    if lines != n or not ends_ok:
        return False, f"output has {lines:,} lines, expected {n:,}"
    if n > parse_limit:
        # Too big to parse cheaply: scan for error records instead.
        with open(path, "rb") as f:
            tail = b""
            while chunk := f.read(8 << 20):
                if b'"error":' in tail + chunk:
                    return False, "output holds error records"
                tail = chunk[-16:]
        return True, f"{lines:,} lines, no errors"
    decode = msgspec.json.Decoder(_Line).decode
    seen = bytearray(n)
    with open(path, "rb") as f:
        for raw in f:
            rec = decode(raw)
            if rec.error is not None:
                return False, f"error record for ID {rec.id!r}: {rec.error}"
            i = int(rec.id)
            if not 0 <= i < n or seen[i]:
                return False, f"ID {rec.id!r} out of range or seen twice"
            seen[i] = 1
            if expected is not None and rec.result != expected(i):
                return False, f"ID {i}: result {rec.result!r}, expected {expected(i)!r}"
    return True, f"{lines:,} lines, every ID once, results checked"


def _wrap(
    stats: dict[str, Any],
    patched: list[tuple[Any, str, Any]],
    owner: Any,
    name: str,
    key: str,
    on_result: Callable[[Any], None] | None = None,
) -> None:
    """Time every call of owner.name into stats[key + "_s"] and count them; remember the
    original in `patched` (nothing happens when owner has no such method)."""
    orig = owner.__dict__.get(name)
    if orig is None:
        return

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            res = orig(*a, **kw)
        finally:
            stats[key + "_s"] = stats.get(key + "_s", 0.0) + time.perf_counter() - t
            stats[key + "_calls"] = stats.get(key + "_calls", 0) + 1
        if on_result is not None:
            on_result(res)
        return res

    setattr(owner, name, wrapper)
    patched.append((owner, name, orig))


@contextlib.contextmanager
def launcher_probe() -> Iterator[dict[str, Any]]:
    """Time the launcher's phases by wrapping its methods (a few calls per batch: negligible).

    Tolerant of a changing launcher: only methods that exist are wrapped.
    """
    from app.launcher.dispatch import Dispatch
    from app.launcher.launcher import Launcher
    from app.store.redis import RedisStore

    stats: dict[str, Any] = {}
    patched: list[tuple[Any, str, Any]] = []

    def on_done(dones: Any) -> None:
        for d in dones or ():
            stats["batches_done"] = stats.get("batches_done", 0) + 1
            stats["worker_fn_s"] = stats.get("worker_fn_s", 0.0) + float(getattr(d, "seconds", 0))

    def on_new_job(res: Any) -> None:
        with contextlib.suppress(Exception):
            _, meta = res
            stats["layout"] = meta.get("layout")
            stats["calibrated_s_per_item"] = meta.get("seconds_per_item")

    for owner, name, key, hook in (
        (Launcher, "__init__", "init", None),
        (Launcher, "check_connections", "connect", None),
        (Launcher, "_new_job", "new_job", on_new_job),
        (Launcher, "_calibrate", "calibrate", None),
        (Launcher, "send", "send", None),
        (Dispatch, "loop", "loop", None),
        (Dispatch, "write", "write", None),
        (Dispatch, "find_lost", "find_lost", None),
        (RedisStore, "wait_done", "wait_done", on_done),
        (RedisStore, "results", "fetch_results", None),
    ):
        _wrap(stats, patched, owner, name, key, hook)
    try:
        yield stats
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)
        for k, v in list(stats.items()):
            if isinstance(v, float):
                stats[k] = round(v, 4)


def run_cli(
    argv: list[str], env: dict[str, str], workdir: Path, timeout: float
) -> tuple[float, float | None, int, str, str]:
    """Run a fresh child: (wall s, peak RSS MB, exit code, stdout, stderr)."""
    rss_file = workdir / "rss.txt"
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time:
        full = [gnu_time, "-f", "%M", "-o", str(rss_file), *argv]
        t0 = time.perf_counter()
        proc = subprocess.run(full, env=env, cwd=REPO, capture_output=True, timeout=timeout)
        wall = time.perf_counter() - t0
        try:
            rss = int(rss_file.read_text().split()[-1]) / 1024
        except (OSError, ValueError, IndexError):
            rss = None
        return wall, rss, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    # No GNU time: poll the child's RSS every 10 ms.
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=err)
        ps = psutil.Process(child.pid)
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.01)
            if time.perf_counter() - t0 > timeout:
                child.kill()
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return wall, peak / 2**20, child.returncode, out.read().decode(), err.read().decode()


# -- the benchmark ------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from app.cpus import available_cpus

        self.args = args
        self.sizes = Sizes.quick() if args.quick else Sizes()
        if args.cpu_items:
            self.sizes.cpu_items = args.cpu_items
        self.cores = available_cpus()
        self.rows: list[Row] = []
        self.cpu = CpuAccount()
        self.tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.serial_per_item: float | None = None
        self.expected_cpu: list[int] = []
        self.diag: dict[str, Any] = {}
        # Set by run() while the fleet is up.
        self.fleet: Any = None
        self.app: Any = None
        self.quiet_waited = 0.0
        self.collect: list[tuple[Row, Callable[[Row], None]]] | None = None
        self.serial_out: dict[str, list[Any]] = {}
        # Per fleet row of the CPU case: its wall / Pool's wall, per interleaved round.
        self.paired: dict[str, list[float]] = {}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        if row.wall is not None:
            if row.workload == "cpu" and self.serial_per_item is not None:
                row.ideal = self.serial_per_item * row.items / self.cores
                row.efficiency = row.ideal / row.wall
            else:
                row.ideal = 0.0
            row.overhead_us = (row.wall - row.ideal) / row.items * 1e6
        self.rows.append(row)
        status = f"{row.wall:.3f} s" if row.wall is not None else "ERROR " + row.error
        self.log(
            f"{row.workload:4} {row.method:<34} {row.items:>10,}  {status}"
            + ("" if row.verified in (None, True) else "  NOT VERIFIED: " + row.note)
        )
        return row

    def wait_quiet(self) -> float:
        """Wait (bounded) until other processes leave the machine nearly idle; seconds waited."""
        budget = min(self.args.quiet_wait, self.args.quiet_budget - self.quiet_waited)
        if budget <= 0:
            return 0.0
        t0 = time.perf_counter()
        while self.cpu.foreign_share() > NOISY and time.perf_counter() - t0 < budget:
            pass
        waited = time.perf_counter() - t0
        waited = 0.0 if waited < 0.6 else round(waited, 1)  # one quiet window: no wait
        self.quiet_waited += waited
        return waited

    def trial(self, row: Row, fn: Callable[[Row], None]) -> Row:
        """One run of a measurement; an exception becomes an ERROR trial."""
        trial = Row(row.workload, row.method, row.items, note=row.note)
        waited = self.wait_quiet()
        if waited:
            trial.diag["waited_for_quiet_s"] = waited
        try:
            with self.cpu.measure(trial):
                fn(trial)
        except Exception as exc:
            trial.wall = None
            trial.error = f"{type(exc).__name__}: {exc}"[:300]
        time.sleep(0.3)  # let the fleet settle between measurements
        return trial

    def final(self, trial: Row) -> bool:
        """No more runs after this one: it failed, or it was long."""
        return trial.wall is None or not trial.verified or trial.wall > self.args.repeat_max_s

    @staticmethod
    def best(trials: list[Row]) -> Row:
        """The lowest wall; an error or a wrong result is reported, never hidden."""
        bad = [t for t in trials if t.wall is None or not t.verified]
        if bad:
            return bad[0]
        walls = [t.wall for t in trials if t.wall is not None]  # every one, by now
        best = trials[walls.index(min(walls))]
        if len(trials) > 1:
            best.diag["walls"] = [round(w, 4) for w in walls]
        return best

    def attempt(self, row: Row, fn: Callable[[Row], None], repeat: int | None = None) -> Row:
        """Measure one row, best of up to `repeat` runs (a run longer than --repeat-max-s is
        not repeated). Inside `interleaved()`, only collect it."""
        if self.collect is not None:
            self.collect.append((row, fn))
            return row
        trials: list[Row] = []
        for _ in range(max(1, self.args.repeat if repeat is None else repeat)):
            trials.append(self.trial(row, fn))
            if self.final(trials[-1]):
                break
        return self.add(self.best(trials))

    @contextlib.contextmanager
    def interleaved(self, out: list[list[Row]]) -> Iterator[None]:
        """Measurements declared in the block run round-robin, --cpu-rounds rounds, so that
        a drift of the machine's speed hits each of them alike. Every other round runs
        them in reverse order (A B C, C B A, ...): neither of two neighbours always runs
        second, on a machine still warm from the first. `out` gets each one's trials;
        the caller adds the best rows."""
        self.collect = []
        try:
            yield
            specs, self.collect = self.collect, None
            trials: list[list[Row]] = [[] for _ in specs]
            for r in range(max(1, self.args.cpu_rounds)):
                order = list(enumerate(specs))
                for i, (row, fn) in reversed(order) if r % 2 else order:
                    if not (trials[i] and self.final(trials[i][-1])):
                        trials[i].append(self.trial(row, fn))
            out.extend(trials)
        finally:
            self.collect = None

    # -- in-process peers ------------------------------------------------------

    def serial(self, workload: str, fn: Callable[[Any], Any], n: int) -> None:
        """The plain loop; its results are kept in self.serial_out[workload]."""
        row = Row(workload, "serial (plain loop)", n)

        def body(row: Row) -> None:
            c0, t0 = time.process_time(), time.perf_counter()
            res = []
            for item in range(n):
                res.append(fn(item))
            row.wall = time.perf_counter() - t0
            row.diag["cpu_s"] = round(time.process_time() - c0, 4)  # unaffected by contention
            self.serial_out[workload] = res
            row.verified = len(res) == n

        self.attempt(row, body)

    def pool(self, workload: str, fn: Callable[[Any], Any], n: int) -> None:
        """Checked against the serial loop's results (serial runs first)."""
        row = Row(
            workload,
            f"multiprocessing.Pool({self.cores}).map",
            n,
            note="default chunksize, pool start/stop included",
        )

        def body(row: Row) -> None:
            t0 = time.perf_counter()
            with multiprocessing.get_context("fork").Pool(self.cores) as p:
                res = p.map(fn, range(n))
            row.wall = time.perf_counter() - t0
            row.verified = res == self.serial_out[workload]

        self.attempt(row, body)

    # -- plain Celery on the fleet -------------------------------------------------

    def celery_group(
        self, workload: str, task: str, n: int, expected: list[Any], note: str = ""
    ) -> None:
        from celery import group

        app = self.app
        row = Row(workload, "celery group (task per ID)", n, note=note)

        def body(row: Row) -> None:
            t0 = time.perf_counter()
            res = group(app.signature(task, args=(i,)) for i in range(n)).apply_async()
            sent = time.perf_counter()
            values = res.get(timeout=self.args.timeout)
            row.wall = time.perf_counter() - t0
            row.diag["publish_s"] = round(sent - t0, 4)
            row.verified = values == expected
            if not row.verified:
                row.note += " WRONG RESULTS"

        self.attempt(row, body, repeat=1)  # the slow peer: one run is enough

    def celery_chunks(
        self,
        workload: str,
        task: str,
        n: int,
        chunk_size: int,
        expected: Callable[[int], Any],
        note: str = "",
    ) -> None:
        app = self.app
        n_chunks = -(-n // chunk_size)
        row = Row(workload, f"celery chunks ({n_chunks} x {chunk_size:,})", n, note=note)

        def body(row: Row) -> None:
            t0 = time.perf_counter()
            res = app.tasks[task].chunks(((i,) for i in range(n)), chunk_size).apply_async()
            sent = time.perf_counter()
            parts = res.get(timeout=self.args.timeout)
            row.wall = time.perf_counter() - t0
            row.diag["publish_s"] = round(sent - t0, 4)
            flat = [v for part in parts for v in part]
            row.verified = len(flat) == n and all(v == expected(i) for i, v in enumerate(flat))
            if not row.verified:
                row.note += " WRONG RESULTS"

        self.attempt(row, body)

    def celery_chord(
        self, workload: str, task: str, n: int, expected_total: int, note: str = ""
    ) -> None:
        from celery import chord

        app = self.app
        row = Row(workload, "celery chord (task per ID + total)", n, note=note)

        def body(row: Row) -> None:
            t0 = time.perf_counter()
            res = chord(app.signature(task, args=(i,)) for i in range(n))(
                app.signature("bench.total")
            )
            sent = time.perf_counter()
            value = res.get(timeout=self.args.timeout)
            row.wall = time.perf_counter() - t0
            row.diag["publish_s"] = round(sent - t0, 4)
            row.verified = value == expected_total
            if not row.verified:
                row.note += f" WRONG TOTAL {value} != {expected_total}"

        self.attempt(row, body, repeat=1)  # the slow peer: one run is enough

    def celery_batches(
        self, workload: str, task: str, n: int, n_batches: int, expected: Callable[[int], Any]
    ) -> None:
        """Extra reference: a Celery group over hand-made list batches (what fleet automates)."""
        from celery import group

        app = self.app
        size = -(-n // n_batches)
        row = Row(
            workload,
            f"celery group of lists ({n_batches} x {size:,})",
            n,
            note="extra: hand-made batches",
        )

        def body(row: Row) -> None:
            t0 = time.perf_counter()
            res = group(
                app.signature(task, args=(list(range(s, min(n, s + size))),))
                for s in range(0, n, size)
            ).apply_async()
            parts = res.get(timeout=self.args.timeout)
            row.wall = time.perf_counter() - t0
            flat = [v for part in parts for v in part]
            row.verified = len(flat) == n and all(v == expected(i) for i, v in enumerate(flat))

        self.attempt(row, body)

    # -- the fleet -------------------------------------------------------------

    def fleet_api(
        self, workload: str, task: str, n: int, expected: Callable[[int], Any] | None
    ) -> Row:
        from app.launcher.job import JobOptions
        from app.launcher.launcher import Launcher
        from app.launcher.sources import Source

        out = self.tmp / f"api-{workload}.jsonl"
        row = Row(workload, "fleet Launcher.run (Python API)", n, note="in-process, like Pool")

        def body(row: Row) -> None:
            with launcher_probe() as probe:
                t0 = time.perf_counter()
                summary = Launcher(self.fleet.settings).run(
                    JobOptions(
                        task=task, source=Source.parse(f"range:0:{n}"), out=out, progress=False
                    )
                )
                row.wall = time.perf_counter() - t0
            row.diag.update(probe)
            row.diag["summary"] = summary.as_dict()
            ok, why = verify_fleet_output(out, n, expected)
            row.verified = ok and summary.items == n and summary.errors == 0
            if not row.verified:
                row.note += f" {why}; summary items {summary.items} errors {summary.errors}"

        try:
            return self.attempt(row, body)
        finally:
            out.unlink(missing_ok=True)

    def fleet_python(self, workload: str, call: str, n: int, expected: Callable[[int], Any]) -> Row:
        """`from app import fleet` in this process: fleet.map, or fleet.Pool's
        imap_unordered, over a generator of the IDs (the general path: a `range` itself
        would travel as its bounds, as the Launcher API's rows do)."""
        from app import fleet
        from tests.bench.tasks import bench_cpu, bench_noop

        fn = bench_cpu if workload == "cpu" else bench_noop
        method = "fleet.map (Python API)" if call == "map" else "fleet.Pool.imap_unordered"
        row = Row(workload, method, n, note="in-process, like Pool; IDs from a generator")

        def body(row: Row) -> None:
            # Timed to every result in hand, as Pool.map's list; checked afterwards.
            t0 = time.perf_counter()
            if call == "map":
                with fleet.map(fn, (i for i in range(n))) as results:
                    pairs = list(results)
            else:
                with fleet.Pool() as pool:
                    values = list(pool.imap_unordered(fn, (i for i in range(n))))
            row.wall = time.perf_counter() - t0
            seen = bytearray(n)
            wrong = 0
            if call == "map":
                for item, value in pairs:
                    seen[item] += 1
                    wrong += value != expected(item)
            elif workload == "noop":  # the result is the ID
                for value in values:
                    seen[value] += 1
            else:
                seen = bytearray([1]) * n if len(values) == n else seen
                wrong = sorted(values) != sorted(expected(i) for i in range(n))
            row.verified = seen.count(1) == n and not wrong
            if not row.verified:
                row.note += f" {n - seen.count(1)} IDs not once, {int(wrong)} wrong"

        return self.attempt(row, body)

    def cli_argv(self, task: str, ids: str, out: Path) -> list[str]:
        s = self.fleet.settings
        fleet_bin = Path(sys.executable).parent / "fleet"
        return [
            str(fleet_bin),
            "run",
            task,
            "--ids",
            ids,
            "--out",
            str(out),
            "--broker",
            s.broker_url,
            "--backend",
            s.result_url,
            "--queue",
            s.queue,
            "--no-progress",
            "--json",
        ]

    def cli_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}

    def fleet_cli(
        self,
        workload: str,
        task: str,
        ids: str,
        n: int,
        label: str,
        expected: Callable[[int], Any] | None,
        note: str = "",
        repeat: int | None = None,
    ) -> Row:
        out = self.tmp / f"cli-{workload}-{n}-{len(self.rows)}.jsonl"
        row = Row(workload, f"fleet run CLI ({label})", n, note=note)

        def body(row: Row) -> None:
            wall, rss, code, stdout, stderr = run_cli(
                self.cli_argv(task, ids, out), self.cli_env(), self.tmp, self.args.timeout
            )
            row.wall, row.rss_mb = wall, rss
            row.diag["exit_code"] = code
            with contextlib.suppress(ValueError, IndexError, KeyError):
                row.diag["summary"] = json.loads(stdout.strip().splitlines()[-1])
                # Process start, imports, Launcher(), exit: all but Launcher.run itself.
                row.diag["outside_run_s"] = round(wall - row.diag["summary"]["wall_seconds"], 4)
            row.diag["stderr_tail"] = stderr.strip().splitlines()[-3:]
            if code != 0:
                row.verified = False
                row.note += f" exit code {code}: {stderr.strip()[-200:]}"
                return
            ok, why = verify_fleet_output(out, n, expected)
            row.verified = ok
            if not ok:
                row.note += " " + why

        try:
            return self.attempt(row, body, repeat)
        finally:
            out.unlink(missing_ok=True)

    def cli_startup(self) -> None:
        """The fixed cost of a `fleet run` process before any work: interpreter + imports."""
        code = "import scripts.cli, scripts.cli.run, app.launcher.launcher, app.celery_config"
        walls = []
        for _ in range(3):
            wall, rss, rc, _, _err = run_cli(
                [sys.executable, "-c", code], self.cli_env(), self.tmp, 60
            )
            if rc == 0:
                walls.append(wall)
        if walls:
            self.diag["cli_import_s"] = round(min(walls), 4)
            self.diag["cli_import_rss_mb"] = rss
        # The same for the console script's own start (`fleet --version` imports click only).
        wall, _, rc, _, _ = run_cli(
            [str(Path(sys.executable).parent / "fleet"), "--version"], self.cli_env(), self.tmp, 60
        )
        self.diag["fleet_version_s"] = round(wall, 4)

    def source_timing(self, ids_file: Path) -> None:
        """How long the launcher's input side takes alone for the ID file (no fleet)."""
        from app.batch import expand
        from app.launcher.sources import Source

        with contextlib.suppress(Exception):
            src = Source.parse(str(ids_file))
            t0 = time.perf_counter()
            n = src.count()
            t1 = time.perf_counter()
            sizes = iter(lambda: 50_000, 0)
            m = sum(len(list(expand(b))) for b in src.batches(sizes))
            t2 = time.perf_counter()
            self.diag["id_file_count_s"] = round(t1 - t0, 4)
            self.diag["id_file_batches_s"] = round(t2 - t1, 4)
            self.diag["id_file_ids"] = [n, m]

    def warm_up(self) -> None:
        """Each worker imports, connects and runs once before anything is timed."""
        from celery import group

        from app.launcher.job import JobOptions
        from app.launcher.launcher import Launcher
        from app.launcher.sources import Source

        group(
            self.app.signature("bench.noop", args=(i,)) for i in range(4 * self.cores)
        ).apply_async().get(timeout=60)
        out = self.tmp / "warmup.jsonl"
        Launcher(self.fleet.settings).run(
            JobOptions(
                task="bench_noop", source=Source.parse("range:0:1000"), out=out, progress=False
            )
        )
        out.unlink(missing_ok=True)

    # -- the whole run -----------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from app.celery_config import make_app
        from scripts.local.fleet import LocalFleet
        from tests.bench.tasks import CPU_ROUNDS, bench_cpu, bench_noop, busy

        self.t0 = time.perf_counter()
        os.chdir(REPO)  # the workers find tests.bench.tasks from the current directory
        sz = self.sizes
        load0 = os.getloadavg()
        self.log(f"{self.cores} usable CPUs; sizes {asdict(sz)}; load average {load0}")
        self.log(
            "starting the local fleet (redis broker + results, "
            f"{self.cores} pinned worker instances)..."
        )
        with LocalFleet(
            self.cores, "redis", include=(TASKS_MODULE,), workdir=self.tmp / "fleet"
        ) as fleet:
            self.fleet = fleet
            self.app = make_app(fleet.settings)
            # `from app import fleet` finds the fleet as a user's script does.
            os.environ.update(fleet.settings.as_env())
            self.log("fleet up; " + fleet.describe().replace("\n", ";"))

            self.log("warm-up (not timed)...")
            self.warm_up()
            self.cli_startup()

            # (a) CPU-heavy. Serial and Pool run in this process while the fleet is idle;
            # the three key rows alternate, round by round.
            n = sz.cpu_items
            self.log(
                f"CPU-heavy: serial, Pool and the fleet API, {self.args.cpu_rounds} "
                "interleaved rounds..."
            )
            rounds: list[list[Row]] = []
            with self.interleaved(rounds):
                self.serial("cpu", bench_cpu, n)
                self.pool("cpu", bench_cpu, n)
                self.fleet_api("cpu", "bench_cpu", n, lambda i: self.serial_out["cpu"][i])
                self.fleet_python("cpu", "map", n, lambda i: self.serial_out["cpu"][i])
                self.fleet_python("cpu", "pool", n, lambda i: self.serial_out["cpu"][i])
            best_rows = [self.best(t) for t in rounds]
            serial_row, api_row = best_rows[0], best_rows[2]
            exp = self.serial_out.get("cpu") or [busy(i) for i in range(n)]
            if serial_row.wall:
                self.serial_per_item = serial_row.wall / n
            for row in best_rows:
                self.add(row)
            for trials in rounds[2:]:
                self.paired[trials[0].method] = [
                    a.wall / p.wall
                    for p, a in zip(rounds[1], trials, strict=False)
                    if p.wall and a.wall
                ]
            self.diag["cpu_fleet_over_pool_per_round"] = {
                m: [round(x, 3) for x in ratios] for m, ratios in self.paired.items()
            }
            if api_row.diag.get("worker_fn_s") and self.serial_per_item:
                # Time inside the function on the workers (their own clock) against the
                # serial loop's: a worker that runs the same code slower shows here.
                self.diag["cpu_worker_fn_ms_per_item"] = round(
                    api_row.diag["worker_fn_s"] / n * 1e3, 4
                )
                self.diag["cpu_serial_ms_per_item"] = round(self.serial_per_item * 1e3, 4)

            k = min(n, sz.per_id_cpu)
            fewer_cpu = "" if k == n else f"fewer IDs: {k:,} of {n:,}"
            self.celery_group("cpu", "bench.cpu", k, exp[:k], note=fewer_cpu)
            self.celery_chunks("cpu", "bench.cpu", n, -(-n // sz.cpu_chunks), exp.__getitem__)
            self.celery_chord("cpu", "bench.cpu", k, sum(exp[:k]), note=fewer_cpu)
            self.celery_batches("cpu", "bench.cpu_many", n, 4 * self.cores, exp.__getitem__)
            self.fleet_cli(
                "cpu",
                "bench_cpu",
                f"range:0:{n}",
                n,
                "--ids range",
                exp.__getitem__,
                note="whole process (info: Pool's row has no interpreter start)",
            )

            # (b) no-op: serial and Pool first, while the fleet is idle
            self.serial("noop", bench_noop, sz.noop_items)
            self.pool("noop", bench_noop, sz.noop_items)

            # (b) no-op on the fleet
            ident = int
            m = sz.per_id_noop
            fewer = f"fewer IDs: {m:,} of {sz.noop_items:,}"
            self.celery_group("noop", "bench.noop", m, list(range(m)), note=fewer)
            self.celery_chunks(
                "noop",
                "bench.noop",
                sz.chunks_noop,
                sz.noop_chunk_size,
                ident,
                note="" if sz.chunks_noop == sz.noop_items else f"fewer IDs: {sz.chunks_noop:,}",
            )
            self.celery_chord("noop", "bench.noop", m, m * (m - 1) // 2, note=fewer)
            self.celery_batches("noop", "bench.noop_many", sz.noop_items, 4 * self.cores, ident)
            self.fleet_api("noop", "bench_noop", sz.noop_items, ident)
            self.fleet_python("noop", "map", sz.noop_items, ident)
            self.fleet_python("noop", "pool", sz.noop_items, ident)
            ids_file = self.tmp / "ids.txt"
            with open(ids_file, "w") as f:
                f.write("\n".join(map(str, range(sz.noop_items))) + "\n")
            self.fleet_cli(
                "noop",
                "bench_noop",
                str(ids_file),
                sz.noop_items,
                "--ids FILE",
                str,
                note="whole process; IDs are strings",
            )
            self.fleet_cli(
                "noop",
                "bench_noop",
                f"range:0:{sz.noop_items}",
                sz.noop_items,
                "--ids range",
                ident,
                note="whole process",
            )
            self.source_timing(ids_file)
            ids_file.unlink()

            # launcher memory at 10M IDs
            if not self.args.skip_10m:
                self.fleet_cli(
                    "rss",
                    "bench_noop",
                    f"range:0:{sz.rss_ids}",
                    sz.rss_ids,
                    "--ids range",
                    None,
                    note="peak RSS run",
                    repeat=1,
                )
            self.diag["fleet_workdir_logs"] = str(fleet.workdir)
            self.log("stopping the fleet...")
        load1 = os.getloadavg()
        total = time.perf_counter() - self.t0
        return self.report(load0, load1, total, CPU_ROUNDS, busy)

    # -- output ------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        def find(workload: str, prefix: str) -> list[Row]:
            return [r for r in self.rows if r.workload == workload and r.method.startswith(prefix)]

        out = []
        pool = next(iter(find("cpu", "multiprocessing")), None)
        for r in find("cpu", "fleet"):
            if pool and pool.wall and r.wall and r.method in self.paired:
                best = r.wall / pool.wall
                # Judged on the median of the per-round ratios: rounds interleave Pool and
                # the fleet, so a drift of the machine's speed cancels out.
                paired = self.paired.get(r.method, [])
                ratio = statistics.median(paired) if paired else best
                out.append(
                    dict(
                        target=f"CPU-heavy {r.method}: wall <= {CPU_VS_POOL_MAX:.2f} x Pool",
                        value=f"{ratio:.3f} x Pool (median of {len(paired)} "
                        f"interleaved rounds {[round(x, 2) for x in paired]};"
                        f" best {r.wall:.2f} s vs {pool.wall:.2f} s)",
                        ok=ratio <= CPU_VS_POOL_MAX and bool(r.verified),
                    )
                )
        api = next(iter(find("noop", "fleet Launcher")), None)
        api_wall = api.wall if api is not None and api.wall else None
        for r in find("noop", "fleet.") if api is not None and api_wall else []:
            if r.wall and api_wall:
                ratio = r.wall / api_wall
                out.append(
                    dict(
                        target=f"no-op {r.method}: per-ID cost <= "
                        f"{PYTHON_API_VS_LAUNCHER_MAX:g} x the Launcher API's",
                        value=f"{ratio:.2f} x ({r.wall / r.items * 1e6:.2f} vs "
                        f"{api_wall / api.items * 1e6:.2f} us/ID)",
                        ok=ratio <= PYTHON_API_VS_LAUNCHER_MAX and bool(r.verified),
                    )
                )
        for r in find("noop", "fleet run CLI"):
            if r.wall:
                us = r.wall / r.items * 1e6
                ok = us <= NOOP_US_PER_ID_MAX and bool(r.verified)
                scale = "" if r.items == 1_000_000 else f" (at {r.items:,} IDs, target is for 1M)"
                out.append(
                    dict(
                        target=f"no-op {r.method}: <= {NOOP_US_PER_ID_MAX:g} us/ID "
                        "end to end" + scale,
                        value=f"{us:.2f} us/ID ({r.wall:.2f} s)",
                        ok=ok,
                    )
                )
        for r in find("rss", "fleet run CLI"):
            if r.rss_mb is not None:
                scale = "" if r.items == 10_000_000 else f" (at {r.items:,} IDs, target is for 10M)"
                out.append(
                    dict(
                        target=f"launcher peak RSS, {r.items:,} IDs: <= "
                        f"{RSS_10M_MAX_MB:g} MB" + scale,
                        value=f"{r.rss_mb:.1f} MB ({r.wall:.1f} s)",
                        ok=r.rss_mb <= RSS_10M_MAX_MB and bool(r.verified),
                    )
                )
        return out

    def table(self) -> str:
        head = (
            f"{'method':<36} {'items':>10} {'wall s':>9} {'ovh us/ID':>10} {'eff':>6} "
            f"{'RSS MB':>7} {'ok':>3} {'foreign':>8}  note"
        )
        lines = []
        titles = {
            "cpu": f"(a) CPU-heavy: {self.sizes.cpu_items:,} items of "
            f"{(self.serial_per_item or 0) * 1e3:.2f} ms (serial, one core)",
            "noop": f"(b) no-op: {self.sizes.noop_items:,} IDs",
            "rss": "launcher memory",
        }
        for wl in ("cpu", "noop", "rss"):
            rows = [r for r in self.rows if r.workload == wl]
            if not rows:
                continue
            lines += ["", titles[wl], head, "-" * len(head)]
            for r in rows:
                if r.wall is None:
                    lines.append(f"{r.method:<36} {r.items:>10,} ERROR {r.error}")
                    continue
                eff = f"{r.efficiency:.0%}" if r.efficiency is not None else "-"
                rss = f"{r.rss_mb:.1f}" if r.rss_mb is not None else "-"
                ok = {True: "yes", False: "NO", None: "-"}[r.verified]
                share = self.foreign_share(r)
                foreign = "-" if share is None else f"{share:.0%}" + ("!" if share > NOISY else "")
                lines.append(
                    f"{r.method:<36} {r.items:>10,} {r.wall:>9.3f} "
                    f"{r.overhead_us:>10.2f} {eff:>6} {rss:>7} {ok:>3} {foreign:>8}  "
                    f"{r.note.strip()}"
                )
        return "\n".join(lines)

    def foreign_share(self, r: Row) -> float | None:
        if r.foreign_cpu_s is None or not r.wall:
            return None
        # Approximate (10 ms ticks; a child's CPU shows when it is reaped): capped at 100%.
        return min(1.0, r.foreign_cpu_s / (r.wall * self.cores))

    def legend(self) -> str:
        return (
            "legend:\n"
            "  ovh us/ID = (wall - ideal) / items, in microseconds\n"
            f"    CPU case: ideal = serial_time_per_item x items / cores ({self.cores} cores)\n"
            "    no-op case: ideal = 0, so ovh = wall / items\n"
            "  eff = ideal / wall (CPU case)\n"
            "  RSS MB = peak RSS of the `fleet run` launcher process (GNU time %M; CLI rows only)\n"
            "  ok = output verified (every ID once, results checked; chord: the sum)\n"
            "  foreign = CPU used by processes outside this benchmark during the row, as a share\n"
            f"    of the machine ({self.cores} cores x wall); '!' above {NOISY:.0%}: "
            "the row is perturbed\n"
            "  wall: best of --repeat runs (lowest) where a run takes under --repeat-max-s;\n"
            "    per-ID group/chord and the 10M run: one run. CPU serial, Pool and fleet API\n"
            f"    run interleaved, {self.args.cpu_rounds} rounds (serial, Pool, fleet, then "
            "fleet, Pool, serial, ...), best kept\n"
            "    Pool and fleet API include setup (pool start / Launcher connect + "
            "calibration);\n"
            "    CLI rows are the whole process, spawn to exit"
        )

    def report(self, load0, load1, total, rounds, busy) -> dict[str, Any]:
        targets = self.targets()
        print(self.table())
        print()
        print(self.legend())
        print()
        print("targets:")
        for t in targets:
            print(f"  {'PASS' if t['ok'] else 'MISS'}  {t['target']}: {t['value']}")
        if not targets:
            print("  (no target could be evaluated)")
        noisy = [r for r in self.rows if (self.foreign_share(r) or 0) > NOISY]
        if noisy:
            print(
                f"  WARNING: {len(noisy)} of {len(self.rows)} rows ran while other processes "
                f"used over {NOISY:.0%} of the machine (marked '!'); rerun on a quiet machine "
                "before trusting them."
            )
        print()
        print("diagnostics:")
        for k, v in self.diag.items():
            print(f"  {k}: {v}")
        for r in self.rows:
            if r.method.startswith("fleet") and r.diag:
                d = {k: v for k, v in r.diag.items() if k not in ("stderr_tail",)}
                print(f"  [{r.workload}] {r.method}: {json.dumps(d, default=str)}")
        print(
            f"\nload average before {load0}, after {load1}; waited {self.quiet_waited:.0f} s for "
            f"a quiet machine; total benchmark time {total:.1f} s"
        )
        doc = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cores_usable": self.cores,
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "celery": _version("celery"),
                "cpu_model": _cpu_model(),
            },
            "git_commit": _git_commit(),
            "argv": sys.argv[1:],
            "sizes": asdict(self.sizes),
            "cpu_item": {"rounds": rounds, "serial_seconds_per_item": self.serial_per_item},
            "rows": [dict(asdict(r), foreign_share=self.foreign_share(r)) for r in self.rows],
            "targets": targets,
            "diagnostics": dict(self.diag, waited_for_quiet_s=round(self.quiet_waited, 1)),
            "load_average": {"before": load0, "after": load1},
            "total_seconds": round(total, 2),
        }
        RESULTS_DIR.mkdir(exist_ok=True)
        path = Path(self.args.json) if self.args.json else RESULTS_DIR / "bench.json"
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"results written to {path}")
        return doc

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--skip-10m", action="store_true", help="skip the launcher-RSS run over 10,000,000 IDs"
    )
    parser.add_argument("--cpu-items", type=int, help="CPU-heavy items (default 4000)")
    parser.add_argument(
        "--repeat", type=int, help="runs per row, best kept (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--cpu-rounds",
        type=int,
        help="interleaved rounds of serial, Pool and the fleet API on the "
        "CPU-heavy items; the fleet/Pool target is their median ratio "
        "(default 5: on a shared VM one round's ratio swings by 10-20%%; "
        "1 with --quick)",
    )
    parser.add_argument(
        "--repeat-max-s",
        type=float,
        default=12.0,
        help="do not repeat a row whose run took longer than this",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this long for other processes to "
        f"use under {NOISY * 100:.0f}%% of the machine (0: do not wait)",
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        help="total seconds the whole benchmark may spend waiting so",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per measurement, seconds")
    parser.add_argument("--json", help="write the JSON here instead of bench-results/bench.json")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.cpu_rounds is None:
        args.cpu_rounds = 1 if args.quick else 5
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()


if __name__ == "__main__":
    main()
