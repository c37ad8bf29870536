"""A multi-host fleet on one machine: each host in its own network namespace.

    switch ns:  bridge br0 --+-- veth -- server ns    10.A.B.1  (broker + result store)
                             +-- veth -- launcher ns  10.A.B.2  (`fleet run`)
                             +-- veth -- w0 ns        10.A.B.10 (one `celery worker`)
                             +-- veth -- w1 ns ...

Each host reaches the others only through its veth, so a fault can be put
on one host's link alone: the link set down at the switch (a pulled cable),
or its packets dropped silently with iptables (a half-open connection). The
root namespace gets no interface and no route: the tests talk to the servers
from a thread that entered the server namespace (`NsThread`).

Names carry a random run id (`cfp<6 hex>-<role>`), so parallel or aborted
runs never collide; each run records what it made in STATE_DIR, and a later
run removes what a run whose process is gone left behind, and nothing else.
Everything (processes, namespaces, hence veths, the bridge and iptables
rules, which live inside the namespaces) is removed by `NetFleet.close()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from app.host.command import worker_argv
from app.settings import Settings
from app.store.redis import RedisStore
from scripts.local.processes import need_binary, stop_process
from scripts.local.servers import rabbitmq_server, redis_server
from tests.support.paths import FLEET_BIN, ROOT

PREFIX = "cfp"
STATE_DIR = Path("/run/celery-fleet-netns")
CLONE_NEWNET = 0x40000000
REDIS_BROKER_PORT, REDIS_RESULT_PORT, AMQP_PORT = 6379, 6380, 5672

T = TypeVar("T")


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    if check and done.returncode:
        raise NetnsError(f"{' '.join(argv)} in {ns}: {done.stderr.strip()}")
    return done.stdout


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (not root, no `ip`, EPERM), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (`make setup` installs it)"
    probe = f"{PREFIX}probe{secrets.token_hex(3)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


# -- namespaces ------------------------------------------------------------------------


def _ns_pids(ns: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", ns, check=False).split()]


def _kill_ns(ns: str) -> None:
    """SIGKILL every process in `ns` (only ever one of ours) and wait for them to go."""
    deadline = time.monotonic() + 10
    while (pids := _ns_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _owner_alive(record: dict[str, Any]) -> bool:
    try:
        return psutil.Process(record["pid"]).create_time() == record["started"]
    except (psutil.Error, KeyError):
        return False


def clean_leftovers() -> list[str]:
    """Remove the namespaces of earlier runs whose test process is gone.

    Only names listed in a run's own record (written before they were made)
    are touched, so another user's namespaces and a live parallel run are safe.
    """
    removed = []
    for path in STATE_DIR.glob(f"{PREFIX}*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _owner_alive(record):
            continue
        for ns in record.get("namespaces", []):
            if ns.startswith(PREFIX) and Path("/run/netns", ns).exists():
                _kill_ns(ns)
                ip("netns", "del", ns, check=False)
                removed.append(ns)
        path.unlink(missing_ok=True)
    return removed


class Net:
    """The namespaces, the bridge and one veth per host of one run."""

    def __init__(self, roles: list[str]) -> None:
        self.run = f"{PREFIX}{secrets.token_hex(3)}"
        # 10.200-249.x.0/24: rare in real networks; only the namespaces see it anyway.
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
        self.switch = f"{self.run}-sw"
        self.roles = roles
        self.made: list[str] = []
        self.cut: set[str] = set()  # hosts whose link is down
        self.holes: set[tuple[str, str]] = set()  # host pairs whose packets are dropped
        self.record = STATE_DIR / f"{self.run}.json"

    def ns(self, role: str) -> str:
        return f"{self.run}-{role}"

    def peer(self, role: str) -> str:
        """The switch end of a host's veth (at most 15 characters)."""
        return f"{self.run}{role}"[:15]

    def addr(self, role: str) -> str:
        index = self.roles.index(role)
        return f"{self.subnet}.{index + 1 if index < 2 else index + 8}"

    def up(self) -> None:
        clean_leftovers()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        me = psutil.Process()
        names = [self.switch, *map(self.ns, self.roles)]
        # Recorded before anything exists: a crash half-way is still cleaned.
        self.record.write_text(
            json.dumps({"pid": me.pid, "started": me.create_time(), "namespaces": names})
        )
        for ns in names:
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for role in self.roles:
            ns, peer = self.ns(role), self.peer(role)
            ip(
                "-n",
                self.switch,
                "link",
                "add",
                peer,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr(role)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Kill what runs in the namespaces, then delete them (their veths and rules go too)."""
        for ns in reversed(self.made):
            _kill_ns(ns)
            ip("netns", "del", ns, check=False)
        self.made.clear()
        self.record.unlink(missing_ok=True)

    # -- faults on the wire ---------------------------------------------------------

    def link(self, role: str, up: bool) -> None:
        """Pull (or plug back) the host's cable at the switch: it sees its carrier go."""
        ip("-n", self.switch, "link", "set", self.peer(role), "up" if up else "down")
        (self.cut.discard if up else self.cut.add)(role)

    def blackhole(self, role: str, other: str, on: bool) -> None:
        """Drop every packet between two hosts, silently, on both sides.

        INPUT on each side: neither side's sends fail, nothing arrives, so
        each keeps its connection open on a peer it cannot hear (half-open).
        """
        action = "-I" if on else "-D"
        for here, there in ((role, other), (other, role)):
            in_ns(
                self.ns(here),
                "iptables",
                action,
                "INPUT",
                "-s",
                self.addr(there),
                "-j",
                "DROP",
                check=on,
            )
        (self.holes.add if on else self.holes.discard)((role, other))

    def forget_connections(self, role: str, peer: str) -> None:
        """`role` drops its TCP connections with `peer` on the spot (ss -K: a reset is
        sent, which a blackhole swallows), as a rebooted NAT or server forgets them."""
        in_ns(self.ns(role), "ss", "-K", "dst", self.addr(peer))

    def heal_all(self) -> None:
        for role in list(self.cut):
            self.link(role, up=True)
        for role, other in list(self.holes):
            self.blackhole(role, other, on=False)


def _enter_ns(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


class NsThread:
    """One thread in a namespace: sockets it opens belong there.

    setns() moves only the calling thread, so the test process can reach the
    servers' addresses without giving the root namespace a route to them.
    """

    def __init__(self, ns: str) -> None:
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix=f"ns-{ns}", initializer=_enter_ns, initargs=(ns,)
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60) -> T:
        return self.pool.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _port_open(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), 0.5).close()
        return True
    except OSError:
        return False


# -- servers -------------------------------------------------------------------------


@dataclass
class NsServer:
    """A server process in the server namespace, bound to that namespace's address."""

    name: str
    ns: str
    addr: str
    port: int
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen | None = None
    helpers: list[subprocess.Popen] = field(default_factory=list)

    def start(self, view: NsThread, timeout: float = 90) -> None:
        with open(self.workdir / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *self.argv],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while not view.call(_port_open, self.addr, self.port):
            if self.proc.poll() is not None:
                raise NetnsError(
                    f"{self.name} exited with {self.proc.returncode}; "
                    f"see {self.workdir / (self.name + '.log')}"
                )
            if time.monotonic() > deadline:
                raise NetnsError(f"{self.name} did not listen within {timeout} s")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the server's whole process group (RabbitMQ is a script and an Erlang VM)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped server cannot exit
        stop_process(self.proc, timeout=timeout)
        self.proc = None

    def close(self) -> None:
        self.stop()
        for helper in self.helpers:
            stop_process(helper, timeout=5)


def redis_in_ns(name: str, ns: str, addr: str, port: int, workdir: Path, password: str) -> NsServer:
    """The local fleet's redis-server (scripts/local/servers.py), bound to the namespace's
    address."""
    server = redis_server(name, workdir, password, bind=addr, port=port)
    return NsServer(name, ns, addr, port, server.argv, server.env, workdir)


def rabbitmq_in_ns(ns: str, addr: str, workdir: Path, password: str) -> NsServer:
    """RabbitMQ on the namespace's address; its epmd on the namespace's own loopback.

    The local fleet's rabbitmq_server, on the standard ports: each namespace has
    its own, so they are free; the node name resolves to the namespace's
    127.0.0.1 (lo is up).
    """
    server = rabbitmq_server(
        workdir,
        password,
        bind=addr,
        port=AMQP_PORT,
        dist_port=25672,
        epmd_port=4369,
        start_epmd=False,
    )
    # Our own epmd in the foreground, so it dies with the test, not after it.
    epmd = subprocess.Popen(
        ["ip", "netns", "exec", ns, need_binary("epmd"), "-port", "4369"],
        env=server.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ns_server = NsServer("rabbitmq", ns, addr, AMQP_PORT, server.argv, server.env, workdir)
    ns_server.helpers.append(epmd)
    return ns_server


# -- worker hosts and the launcher ------------------------------------------------------


@dataclass
class Host:
    """A worker host: one namespace, one `celery worker` (its own process group)."""

    role: str
    ns: str
    node: str
    proc: subprocess.Popen | None = None
    restarts: int = 0


class NetFleet:
    """Servers, `hosts` worker hosts and a launcher namespace; `close()` removes it all."""

    def __init__(
        self,
        workdir: Path,
        broker: str = "redis",
        hosts: int = 3,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        lease_seconds: float = 2.0,
        include: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.broker_kind = broker
        self.concurrency = concurrency
        self.extra_env = env or {}
        self.lease_seconds = lease_seconds
        self.include = include
        self.net = Net(["srv", "launcher", *(f"w{i}" for i in range(hosts))])
        self.hosts = [
            Host(f"w{i}", self.net.ns(f"w{i}"), f"w{i}@{self.net.run}") for i in range(hosts)
        ]
        self.view: NsThread | None = None
        self.broker: NsServer | None = None
        self.results: NsServer | None = None
        self.settings: Settings | None = None
        self._store: RedisStore | None = None

    def __enter__(self) -> NetFleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net.up()
        srv, addr = self.net.ns("srv"), self.net.addr("srv")
        self.view = NsThread(srv)
        password = secrets.token_urlsafe(18)
        self.results = redis_in_ns("results", srv, addr, REDIS_RESULT_PORT, self.workdir, password)
        if self.broker_kind == "redis":
            self.broker = redis_in_ns(
                "broker", srv, addr, REDIS_BROKER_PORT, self.workdir, password
            )
            broker_url = f"redis://:{password}@{addr}:{REDIS_BROKER_PORT}/0"
        else:
            self.broker = rabbitmq_in_ns(srv, addr, self.workdir, password)
            broker_url = f"amqp://fleet:{password}@{addr}:{AMQP_PORT}//"
        self.results.start(self.view)
        self.broker.start(self.view)
        self.settings = Settings(
            broker_url=broker_url,
            result_url=f"redis://:{password}@{addr}:{REDIS_RESULT_PORT}/1",
            include=self.include,
            lease_seconds=self.lease_seconds,
            max_batch_seconds=60,
        )
        for host in self.hosts:
            self.start_host(host)
        self.wait_hosts()

    def close(self) -> None:
        for host in self.hosts:
            if host.proc is not None:
                self.kill_host(host)
        for server in (self.broker, self.results):
            if server is not None:
                server.close()
        if self.view is not None:
            self.view.close()
        self.net.down()

    # -- the tests' view of the store ------------------------------------------------

    def store_call(self, fn: Callable[[RedisStore], T], timeout: float = 60) -> T:
        """fn(store), run from inside the server namespace."""
        assert self.view is not None and self.settings is not None
        if self._store is None:
            self._store = RedisStore(self.settings.result_url, self.settings.result_ttl)
        return self.view.call(fn, self._store, timeout=timeout)

    # -- worker hosts ---------------------------------------------------------------

    def worker_env(self, host: Host) -> dict[str, str]:
        assert self.settings is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
        env.update(self.settings.as_env())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["FLEET_NETNS_HOST"] = host.role
        # A worker that will not stop can be asked where its threads are (SIGABRT).
        env["PYTHONFAULTHANDLER"] = "1"
        env.update(self.extra_env)
        return env

    def start_host(self, host: Host) -> None:
        """Boot the host's worker: the command every fleet host runs
        (app.host.command.worker_argv)."""
        assert self.settings is not None
        argv = worker_argv(sys.executable, self.settings.queue, self.concurrency, host.node)
        with open(self.workdir / f"{host.role}.log", "ab") as log:
            host.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.ns, *argv],
                env=self.worker_env(host),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )

    def kill_host(self, host: Host) -> None:
        """The host dies: every process in it gets SIGKILL at once."""
        assert host.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.proc.pid, signal.SIGKILL)
        _kill_ns(host.ns)
        host.proc.wait(10)

    def wait_exit(self, host: Host, timeout: float) -> int:
        """The exit code of the host's worker once it exits by itself, within `timeout`.

        One that does not is a failure: its threads' stacks (Python's faulthandler,
        on SIGABRT) go into the message, and the host is killed and started again, so
        that the tests after this one find a whole fleet.
        """
        assert host.proc is not None
        try:
            return host.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        pid = host.proc.pid
        stacks = self.abort_with_stacks(host)
        self.start_host(host)
        raise AssertionError(
            f"{host.role}'s worker (pid {pid}) did not exit within {timeout:.0f} s; "
            f"its threads when it was aborted:\n{stacks[-8000:]}"
        )

    def abort_with_stacks(self, host: Host) -> str:
        """Abort every process of the host (its pool too), and say where their threads were.

        The workers run with Python's faulthandler on, which writes each thread's
        stack to the host's log on SIGABRT. The host is dead afterwards
        (`restart_host` or `start_host` brings it back).
        """
        assert host.proc is not None
        log = self.workdir / f"{host.role}.log"
        before = log.stat().st_size
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(host.proc.pid)
            # Children first: the main process's death would take them down unheard.
            for proc in [*main.children(recursive=True), main]:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGABRT)
                    proc.wait(5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.proc.wait(5)
        self.kill_host(host)
        return log.read_bytes()[before:].decode(errors="replace")

    def restart_host(self, host: Host) -> None:
        """What systemd's Restart=always does once the worker has exited."""
        assert host.proc is not None
        host.proc.wait(120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.proc.pid, signal.SIGKILL)  # leftover pool processes, if any
        host.restarts += 1
        self.start_host(host)

    def live_pids(self) -> set[int]:
        return {int(w["pid"]) for w in self.store_call(lambda s: s.workers()) if w.get("pid")}

    def wait_hosts(self, timeout: float = 90) -> None:
        """Until every host's current worker process advertises itself in the store."""
        deadline = time.monotonic() + timeout
        while True:
            for host in self.hosts:
                if host.proc is None or host.proc.poll() is not None:
                    raise NetnsError(
                        f"worker host {host.role} is not running; "
                        f"see {self.workdir / (host.role + '.log')}"
                    )
            with contextlib.suppress(Exception):
                if {h.proc.pid for h in self.hosts} <= self.live_pids():
                    return
            if time.monotonic() > deadline:
                raise NetnsError(
                    f"worker hosts did not come up within {timeout} s; logs in {self.workdir}"
                )
            time.sleep(0.2)

    def host_log(self, host: Host) -> str:
        return (self.workdir / f"{host.role}.log").read_text(errors="replace")

    # -- the launcher -----------------------------------------------------------------

    def launch(self, args: list[str], name: str) -> Launch:
        """`fleet run ARGS` in the launcher's namespace; stdout and stderr to files."""
        assert self.settings is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
        env.update(self.settings.as_env())
        env["FLEET_STATE_DIR"] = str(self.workdir / "state")  # never a local fleet's state
        stdout, stderr = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.net.ns("launcher"),
                    str(FLEET_BIN),
                    "run",
                    *args,
                    "--no-progress",
                ],
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        return Launch(proc, stdout, stderr)


@dataclass
class Launch:
    """A running `fleet run` and where its output goes."""

    proc: subprocess.Popen
    stdout: Path
    stderr: Path

    def job(self, timeout: float = 60) -> str:
        """The job id from the launcher's first line (`job J: ...` or `resuming job J: ...`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr.read_text(errors="replace").splitlines():
                words = line.split()
                if words[:1] == ["job"] or words[:2] == ["resuming", "job"]:
                    return words[words.index("job") + 1].rstrip(":")
            if self.proc.poll() is not None:
                raise NetnsError(
                    f"fleet run exited with {self.proc.returncode}: "
                    f"{self.stderr.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        raise NetnsError(f"no job line from fleet run within {timeout} s")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def summary(self) -> dict[str, Any]:
        return json.loads(self.stdout.read_text())
