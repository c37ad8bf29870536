"""Faults on a fleet of hosts in network namespaces: nothing lost, nothing written twice,
and the job finishes within a bound once the fault heals.

The fleet (tests/support/netns.py): a server namespace with the broker (Redis or
RabbitMQ) and the Redis result store, three worker hosts each running one
real `celery worker` (concurrency 1), and a launcher namespace running the
real `fleet run` as a subprocess. Each test runs a job of N IDs of
`netns_hash` (ITEM_MS of CPU each: 10 s or so for the whole job), injects one
kind of fault at a random point (seeded; the seed is printed), heals it, and
checks the output with tests/support/checker.py: lost = duplicated = wrong = 0. IDs
that ran more than once are counted and printed, not refused. Each test's
numbers go to stdout (`pytest -s`) and to partitions.jsonl in pytest's base
temporary directory (or FLEET_NETNS_REPORT).

Liveness. After the fault heals, the job must finish, and every worker host
must be running IDs again, within

    bound = detect + 3 x lease + batch + boot + left x item / slots x SLOWDOWN

    detect    how long a client may take to notice a connection that died
              silently: the broker client's socket timeout (Redis), or two
              heartbeats (AMQP), or the result store's socket timeout,
              whichever is longest (see `detect_seconds`);
    3 x lease a lost batch's lease lapses (1 lease), the launcher's check
              runs (every second) and waits a lease before re-sending
              batches that never started while slots sit idle (1 lease);
              one more lease of slack;
    batch     one batch run again;
    boot      a restarted worker's start (WORKER_BOOT);
    left ...  the IDs not yet written at the heal, on `slots` worker
              processes, at 1/SLOWDOWN speed (two shared CPUs).

A worker hung on a dead connection would still let the other hosts finish
the job; the second check (every host runs IDs again) catches it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.celery_config import celery_config
from app.settings import Settings
from app.store.redis import RedisStore
from tests.support.checker import Report, check
from tests.support.netns import NetFleet, netns_unavailable
from tests.support.netns_tasks import expected

_why = netns_unavailable()
if _why:
    pytest.skip(f"needs network namespaces: {_why}", allow_module_level=True)

N = 100_000
ITEM_MS = 0.12
BATCH = 500
LEASE = 2.0
HOSTS = 3
SLOTS = HOSTS  # concurrency 1 per host
WORKER_BOOT = 20.0
SLOWDOWN = 3.0
CUT_SECONDS = 3 * LEASE  # a cut or freeze outlasts the lease: its batches are re-sent
SEED = int(os.environ.get("FLEET_NETNS_SEED") or secrets.randbelow(2**31))
TASKS = ("tests.support.netns_tasks",)

pytestmark = pytest.mark.timeout(180)


def detect_seconds(settings: Settings) -> float:
    """The longest a client takes to give up on a connection whose peer went silent."""
    conf = celery_config(settings)
    if settings.broker_scheme.startswith("amqp"):
        broker = 2.0 * conf["broker_heartbeat"]
    else:
        options = conf["broker_transport_options"]
        # A synchronous command gives up after socket_timeout (none: never);
        # kombu's check, every health_check_interval, drops an event-loop
        # BRPOP overdue by brpop_timeout (1 s) + health_check_interval.
        assert options.get("socket_timeout"), "a Redis broker client with no socket timeout"
        broker = max(
            float(options["socket_timeout"]),
            1.0 + 2.0 * float(options.get("health_check_interval", 25)),
        )
    store = RedisStore(settings.result_url).r.connection_pool.connection_kwargs
    return max(broker, float(store["socket_timeout"]))


def liveness_bound(settings: Settings, left: int) -> float:
    return (
        detect_seconds(settings)
        + 3 * settings.lease_seconds
        + BATCH * ITEM_MS / 1000
        + WORKER_BOOT
        + left * ITEM_MS / 1000 / SLOTS * SLOWDOWN
    )


# -- the fleet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exec_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("executions")


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    path = Path(
        os.environ.get("FLEET_NETNS_REPORT") or tmp_path_factory.getbasetemp() / "partitions.jsonl"
    )
    print(f"\npartition tests: seed {SEED} (FLEET_NETNS_SEED), numbers in {path}")
    return path


@pytest.fixture(scope="module")
def shared(request, tmp_path_factory, exec_dir):
    workdir = tmp_path_factory.mktemp(f"netns-{request.param}")
    env = {"FLEET_NETNS_EXEC_DIR": str(exec_dir), "FLEET_NETNS_ITEM_MS": str(ITEM_MS)}
    with NetFleet(
        workdir, request.param, hosts=HOSTS, env=env, lease_seconds=LEASE, include=TASKS
    ) as f:
        yield f


@pytest.fixture
def fleet(shared):
    """The module's fleet with every link up, both servers running and every host ready."""
    restore(shared)
    yield shared


def restore(fleet: NetFleet) -> None:
    fleet.net.heal_all()
    for server in (fleet.results, fleet.broker):
        if server.running:
            server.signal(signal.SIGCONT)
        else:
            assert fleet.view is not None
            server.start(fleet.view)
    for host in fleet.hosts:
        if host.proc is None or host.proc.poll() is not None:
            fleet.restart_host(host)
    fleet.wait_hosts()


# -- a job and its checks ---------------------------------------------------------------------


@dataclass
class Job:
    """One `fleet run` over N fresh IDs (a per-test tag keeps each test's IDs apart)."""

    fleet: NetFleet
    tmp: Path
    n: int = N

    def __post_init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ids = self.tmp / "ids.txt"
        self.ids.write_text("".join(f"{tag}-{i:07d}\n" for i in range(self.n)))
        self.out = self.tmp / "out.jsonl"
        # Every output line has the same length: progress is the file size.
        self.line_len = (
            len(
                json.dumps({"id": f"{tag}-{0:07d}", "result": expected("x")}, separators=(",", ":"))
            )
            + 1
        )
        self.launch = self.fleet.launch(
            [
                "netns_hash",
                "--ids",
                str(self.ids),
                "--batch-size",
                str(BATCH),
                "--out",
                str(self.out),
                "--json",
            ],
            "launch",
        )
        self.job = self.launch.job()
        self.started = time.monotonic()

    def written(self) -> int:
        return self.out.stat().st_size // self.line_len if self.out.exists() else 0

    def wait_written(self, fraction: float, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.written() < fraction * self.n:
            assert self.launch.proc.poll() is None, "the job ended before the fault"
            assert time.monotonic() < deadline, f"under {fraction:.0%} written in {timeout} s"
            time.sleep(0.02)

    def resume(self) -> None:
        self.launch = self.fleet.launch(
            ["--resume", self.job, "--out", str(self.out), "--json"], "resume"
        )
        assert self.launch.job() == self.job

    def finish(self, timeout: float) -> dict:
        try:
            code = self.launch.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"job {self.job} did not finish within {timeout:.0f} s of "
                f"the heal; {self.written()}/{self.n} written; logs in "
                f"{self.fleet.workdir}"
            ) from None
        err = self.launch.stderr.read_text(errors="replace")
        assert code == 0, f"fleet run exited with {code}: {err}"
        return self.launch.summary()


def random_point(request, low: float = 0.1, high: float = 0.35) -> float:
    """A fraction of the job, drawn from the module seed and the test's name."""
    return random.Random(f"{SEED}/{request.node.name}").uniform(low, high)


def host_executions(exec_dir: Path, role: str) -> int:
    """Bytes the host's worker processes have logged: grows with every ID it runs."""
    return sum(p.stat().st_size for p in exec_dir.glob(f"{role}-*.log"))


class Resumption:
    """When each host runs IDs again after the heal (seconds after it)."""

    def __init__(self, fleet: NetFleet, exec_dir: Path, healed_at: float) -> None:
        self.fleet = fleet
        self.exec_dir = exec_dir
        self.healed_at = healed_at
        self.before = {h.role: host_executions(exec_dir, h.role) for h in fleet.hosts}
        self.after: dict[str, float] = {}
        self.probes = 0

    def poll(self) -> list[str]:
        """Hosts that have not run an ID since the heal."""
        for role, size in self.before.items():
            if role not in self.after and host_executions(self.exec_dir, role) > size:
                self.after[role] = round(time.monotonic() - self.healed_at, 1)
        return [role for role in self.before if role not in self.after]

    def probe(self, deadline: float) -> None:
        """A short job that gives idle hosts work once the job itself has ended."""
        launch = self.fleet.launch(
            [
                "netns_hash",
                "--ids",
                f"range:0:{20 * BATCH}",
                "--batch-size",
                str(BATCH // 2),
                "--max-in-flight",
                "12",
            ],
            f"probe{self.probes}",
        )
        self.probes += 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            launch.wait(max(1.0, deadline - time.monotonic()))


def verify(
    fleet: NetFleet,
    job: Job,
    exec_dir: Path,
    report_file: Path,
    request,
    healed_at: float,
    left: int,
    **facts,
) -> Report:
    """The job finishes and every host runs IDs again within the bound; then the output."""
    assert fleet.settings is not None
    bound = liveness_bound(fleet.settings, left)
    deadline = healed_at + bound
    hosts = Resumption(fleet, exec_dir, healed_at)
    finished = None
    while True:
        idle = hosts.poll()
        if finished is None and job.launch.proc.poll() is not None:
            finished = time.monotonic() - healed_at
        if finished is not None and not idle:
            break
        if time.monotonic() > deadline:
            exited = {h.role: h.proc.returncode for h in fleet.hosts if h.proc.poll() is not None}
            # Where the idle hosts' threads are (the hosts are restarted by the next test).
            stacks = "".join(
                f"\n--- {h.role}:\n{fleet.abort_with_stacks(h)[-6000:]}"
                for h in fleet.hosts
                if h.role in idle and h.proc.poll() is None
            )
            raise AssertionError(
                f"not live {bound:.0f} s after the heal: job finished: {finished is not None} "
                f"({job.written()}/{job.n} written), hosts that ran nothing since: {idle}, "
                f"workers that exited: {exited}; logs in {fleet.workdir}; seed {SEED}{stacks}"
            )
        if finished is not None:
            hosts.probe(deadline)
        time.sleep(0.05)
    summary = job.finish(1)
    report = check(job.ids, job.out, exec_dir, expected)
    record = {
        "test": request.node.name,
        "seed": SEED,
        **facts,
        **report.as_dict(),
        "finish_after_heal_s": round(finished, 1),
        "hosts_resumed_after_s": hosts.after,
        "bound_s": round(bound, 1),
        "job_s": round(time.monotonic() - job.started, 1),
        "resent": summary.get("resent"),
    }
    print(
        f"\n{request.node.name}: {report.line()} finish_after_heal={finished:.1f}s "
        f"hosts_resumed={hosts.after} (bound {bound:.0f}s) resent={summary.get('resent')} "
        f"{facts}"
    )
    with open(report_file, "a") as f:
        f.write(json.dumps(record) + "\n")
    assert report.ok, f"{report.line()} {report.examples} (seed {SEED})"
    assert (summary["status"], summary["items"], summary["errors"]) == ("ok", job.n, 0)
    return report


def run_fault(
    fleet: NetFleet,
    tmp_path: Path,
    exec_dir: Path,
    report_file: Path,
    request,
    fault: Callable[[], dict],
    n: int = N,
) -> Report:
    """A job with `fault` injected at a random point; `fault` returns once it has healed."""
    job = Job(fleet, tmp_path, n)
    at = random_point(request)
    job.wait_written(at)
    facts = {"at": round(at, 2), **fault()}
    healed_at = time.monotonic()
    left = job.n - job.written()
    return verify(fleet, job, exec_dir, report_file, request, healed_at, left, **facts)


def both(*ids: str):
    return pytest.mark.parametrize("shared", ids, indirect=True)


ALL = both("redis", "rabbitmq")
REDIS = both("redis")


# -- worker hosts -------------------------------------------------------------------------


@REDIS
def test_worker_host_killed_and_restarted(fleet, tmp_path, exec_dir, report_file, request):
    """SIGKILL to every process of a host at once, then the host boots again."""
    host = fleet.hosts[0]

    def fault() -> dict:
        fleet.kill_host(host)
        fleet.restart_host(host)
        return {"host": host.role}

    run_fault(fleet, tmp_path, exec_dir, report_file, request, fault)


@REDIS
def test_sigterm_and_sigquit_to_workers(fleet, tmp_path, exec_dir, report_file, request):
    """Warm shutdown (SIGTERM) on one host, cold (SIGQUIT) on another; both restarted."""
    warm, cold = fleet.hosts[1], fleet.hosts[2]

    def fault() -> dict:
        warm.proc.send_signal(signal.SIGTERM)
        cold.proc.send_signal(signal.SIGQUIT)
        codes = {}
        for host in (cold, warm):
            codes[host.role] = fleet.wait_exit(host, 60)
            fleet.restart_host(host)
        return {"exit_codes": codes}

    run_fault(fleet, tmp_path, exec_dir, report_file, request, fault)
    assert "Warm shutdown" in fleet.host_log(warm)
    assert "Cold shutdown" in fleet.host_log(cold)


# -- the network -----------------------------------------------------------------------------


@ALL
def test_worker_host_cut_off_then_restored(fleet, tmp_path, exec_dir, report_file, request):
    """The host's link goes down at the switch for longer than the lease, then comes back."""
    host = fleet.hosts[0]

    def fault() -> dict:
        fleet.net.link(host.role, up=False)
        time.sleep(CUT_SECONDS)
        fleet.net.link(host.role, up=True)
        return {"host": host.role, "cut_s": CUT_SECONDS}

    run_fault(fleet, tmp_path, exec_dir, report_file, request, fault)


@ALL
def test_half_open_connections_of_a_host(fleet, tmp_path, exec_dir, report_file, request):
    """The host's requests reach the servers, then its packets are dropped silently and
    the servers forget its connections (as a rebooted server or a NAT that lost its
    state does; the resets are dropped too). When packets flow again the host waits
    for replies that will never come, on connections nobody else knows: it must give
    up on them and reconnect by itself.

    Both servers are frozen (SIGSTOP) for a moment first, so that the host has
    requests in flight on its broker and its result store connections, as it has
    with busy servers."""
    host = fleet.hosts[0]
    servers = (fleet.broker, fleet.results)

    def fault() -> dict:
        for server in servers:
            server.signal(signal.SIGSTOP)
        time.sleep(0.5)
        fleet.net.blackhole(host.role, "srv", on=True)
        fleet.net.forget_connections("srv", host.role)
        for server in servers:
            server.signal(signal.SIGCONT)
        time.sleep(CUT_SECONDS)
        fleet.net.blackhole(host.role, "srv", on=False)
        return {"host": host.role, "dropped_s": CUT_SECONDS}

    run_fault(fleet, tmp_path, exec_dir, report_file, request, fault)


# -- the servers ------------------------------------------------------------------------------


@REDIS
def test_broker_frozen_then_resumed(fleet, tmp_path, exec_dir, report_file, request):
    """SIGSTOP to the broker: connections stay open and nothing answers; then SIGCONT."""

    def fault() -> dict:
        fleet.broker.signal(signal.SIGSTOP)
        time.sleep(CUT_SECONDS)
        fleet.broker.signal(signal.SIGCONT)
        return {"frozen_s": CUT_SECONDS}

    run_fault(fleet, tmp_path, exec_dir, report_file, request, fault)


@REDIS
def test_result_store_paused_past_a_lease_runs_no_batch_twice(
    fleet, tmp_path, exec_dir, report_file, request
):
    """CLIENT PAUSE on the result store for three leases: every client's calls wait, while
    the leases' expiry (the server's clock) passes. No worker died, so no batch may run
    twice: the launcher sees that the store fell behind and waits for the workers' renewals
    before it calls a batch lost."""

    def fault() -> dict:
        pause = CUT_SECONDS
        fleet.store_call(lambda s: s.r.execute_command("CLIENT", "PAUSE", int(pause * 1000), "ALL"))
        time.sleep(pause)
        return {"paused_s": pause}

    report = run_fault(fleet, tmp_path, exec_dir, report_file, request, fault)
    assert report.executed_twice == 0, f"{report.line()} {report.examples} (seed {SEED})"


def restart(fleet, server) -> dict:
    """SIGTERM to a server, then the same server started again on its data."""
    began = time.monotonic()
    server.stop()
    server.start(fleet.view)
    return {"down_s": round(time.monotonic() - began, 1)}


@ALL
def test_broker_restarted(fleet, tmp_path, exec_dir, report_file, request):
    """SIGTERM to the broker, then the same server started again on its data."""
    run_fault(fleet, tmp_path, exec_dir, report_file, request, lambda: restart(fleet, fleet.broker))


@REDIS
def test_result_store_restarted(fleet, tmp_path, exec_dir, report_file, request):
    """SIGTERM to the result store, then started again on its append-only file."""
    run_fault(
        fleet, tmp_path, exec_dir, report_file, request, lambda: restart(fleet, fleet.results)
    )


# -- the launcher ------------------------------------------------------------------------------


@REDIS
def test_launcher_killed_and_resumed(fleet, tmp_path, exec_dir, report_file, request):
    """SIGKILL to `fleet run` mid-job; `fleet run --resume JOB` finishes it into the same file."""
    job = Job(fleet, tmp_path)
    at = random_point(request)
    job.wait_written(at)
    job.launch.kill()
    killed_with = job.written()
    job.resume()
    healed_at = time.monotonic()
    verify(
        fleet,
        job,
        exec_dir,
        report_file,
        request,
        healed_at,
        job.n - killed_with,
        at=round(at, 2),
        written_when_killed=killed_with,
    )


# -- several faults in one job -------------------------------------------------------------------


@REDIS
def test_soak_several_faults_in_one_job(fleet, tmp_path, exec_dir, report_file, request):
    """A host killed, another cut off, the broker and then the result store restarted,
    one after the other at random points of one job."""
    n = 3 * N // 2
    job = Job(fleet, tmp_path, n)
    rng = random.Random(f"{SEED}/{request.node.name}")
    points = sorted(rng.uniform(0.05, 0.6) for _ in range(4))
    w0, w1 = fleet.hosts[0], fleet.hosts[1]
    steps = [
        ("kill w0", lambda: (fleet.kill_host(w0), fleet.restart_host(w0))),
        (
            "cut w1",
            lambda: (
                fleet.net.link(w1.role, up=False),
                time.sleep(CUT_SECONDS),
                fleet.net.link(w1.role, up=True),
            ),
        ),
        ("restart broker", lambda: restart(fleet, fleet.broker)),
        ("restart results", lambda: restart(fleet, fleet.results)),
    ]
    done = []
    for at, (name, step) in zip(points, steps, strict=True):
        job.wait_written(at, timeout=120)
        step()
        done.append(f"{name}@{at:.2f}")
    healed_at = time.monotonic()
    verify(
        fleet, job, exec_dir, report_file, request, healed_at, job.n - job.written(), faults=done
    )
