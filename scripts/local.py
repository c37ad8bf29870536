"""A fleet on this machine: a broker, a result store and N worker "instances".

Each instance is a real `celery worker` pinned to its share of the CPUs, so it
sizes itself exactly as an EC2 worker does. Servers listen on free loopback
ports with random passwords, kept in mode-0600 files and never on a command
line; with `tls=True` they speak only TLS (rediss://, amqps://), with a
certificate from a throwaway CA made for the fleet, as Amazon MQ and
ElastiCache do. Everything runs in its own process group and is stopped on
exit, leaving nothing behind. The connection details go to a state file (mode
0600) that `fleet run` and `fleet local --env` read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.boot import worker_argv
from app.cpus import available_cpus
from app.settings import Settings, redact
from app.store import open_store


class LocalFleetError(RuntimeError):
    pass


def state_file() -> Path:
    base = os.environ.get("FLEET_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "celery-fleet")
    return Path(base) / "local.json"


def read_state() -> dict | None:
    """The running local fleet's state, or None if there is none (or it died)."""
    path = state_file()
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalFleetError(f"{what} exited with code {proc.returncode} while starting.")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise LocalFleetError(f"{what} did not open port {port} within {timeout:.0f} s.")


def stop_process(proc: subprocess.Popen | None, timeout: float = 30,
                 sig: int = signal.SIGTERM) -> None:
    """Signal the process, then kill its whole group if it has not exited in time."""
    if proc is None or proc.poll() is not None:
        _kill_group(proc)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen | None) -> None:
    # Pool processes and helpers (the Erlang VM, epmd) share the group.
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _need(binary: str) -> str:
    # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user, who
    # cannot write our private directory; the script under /usr/lib runs as us.
    path = next((p for p in (f"/usr/lib/rabbitmq/bin/{binary}",) if os.access(p, os.X_OK)),
                None) or shutil.which(binary)
    if path is None:
        raise LocalFleetError(f"{binary} is not installed; run `make setup` (it installs it).")
    return path


def _private_file(path: Path, text: str) -> Path:
    """Write `text` to a file only its owner can read (it holds a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 only."""

    ca: Path  # what clients trust (FLEET_TLS_CA_FILE)
    cert: Path
    key: Path


def make_tls_files(directory: Path, days: int = 30) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1, made with openssl.

    The CA's key is deleted once it signed the server's: nothing else can
    ever be signed by it.
    """
    openssl = _need("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("basicConstraints = critical, CA:FALSE\n"
                   "keyUsage = critical, digitalSignature, keyEncipherment\n"
                   "extendedKeyUsage = serverAuth\n"
                   "subjectAltName = IP:127.0.0.1\n"
                   "subjectKeyIdentifier = hash\n"
                   "authorityKeyIdentifier = keyid\n")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    old_umask = os.umask(0o077)  # the keys are born private
    try:
        steps = [
            [openssl, "req", "-x509", *newkey, "-keyout", str(ca_key), "-out", str(ca),
             "-days", str(days), "-subj", "/CN=celery-fleet local CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            [openssl, "req", *newkey, "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1"],
            [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext)],
        ]
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise LocalFleetError(f"openssl failed making the fleet's TLS certificates: "
                                      f"{done.stderr.strip()}")
    finally:
        os.umask(old_umask)
        for leftover in (ca_key, csr, ext, directory / "ca.srl"):
            leftover.unlink(missing_ok=True)
    ca.chmod(0o644)
    cert.chmod(0o644)
    return TlsFiles(ca, cert, key)


@dataclass
class Server:
    """A broker or result store process with the URL that reaches it."""

    name: str
    port: int
    url: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen | None = None
    helpers: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=self.workdir)
        log.close()
        wait_port(self.port, self.proc, self.name)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, timeout=30, sig=sig)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        for helper in self.helpers:
            stop_process(helper, timeout=5)


def redis_server(name: str, workdir: Path, password: str, tls: TlsFiles | None = None,
                 bind: str = "127.0.0.1", port: int | None = None) -> Server:
    """redis-server on `bind`:`port` (a free loopback port by default); with `tls`, a TLS
    port only (rediss://)."""
    port = port or free_port()
    data = workdir / name
    data.mkdir(parents=True, exist_ok=True)
    listen = [f"port {port}"] if tls is None else [
        # No plaintext port at all; clients need no certificate of their own,
        # as with ElastiCache.
        "port 0", f"tls-port {port}", f'tls-cert-file "{tls.cert}"',
        f'tls-key-file "{tls.key}"', f'tls-ca-cert-file "{tls.ca}"', "tls-auth-clients no"]
    # The password goes in a private config file: on the command line, any
    # user on the machine would read it in `ps`.
    config = _private_file(workdir / f"{name}.conf", "\n".join([
        *listen, f"bind {bind}", f'dir "{data}"', f"requirepass {password}",
        # An append-only file so a restart keeps queued batches and results.
        "appendonly yes", "appendfsync everysec", 'save ""',
        "daemonize no", "loglevel warning", ""]))
    scheme = "redis" if tls is None else "rediss"
    return Server(name, port, f"{scheme}://:{password}@{bind}:{port}",
                  [_need("redis-server"), str(config)], dict(os.environ), workdir)


def rabbitmq_server(workdir: Path, password: str, tls: TlsFiles | None = None,
                    bind: str = "127.0.0.1", port: int | None = None,
                    dist_port: int | None = None, epmd_port: int | None = None,
                    start_epmd: bool = True) -> Server:
    """rabbitmq-server on `bind`:`port` (a free loopback port by default); with `tls`, an
    AMQPS listener only. Its epmd runs on `epmd_port`: started here in the foreground, or
    by the caller when not `start_epmd` (inside a network namespace, say)."""
    port, dist = port or free_port(), dist_port or free_port()
    epmd_port = epmd_port or free_port()
    home = workdir / "rabbitmq"
    home.mkdir(parents=True, exist_ok=True)
    if tls is None:
        listen = f"listeners.tcp.default = {bind}:{port}\n"
        node_env = {"RABBITMQ_NODE_IP_ADDRESS": bind, "RABBITMQ_NODE_PORT": str(port)}
    else:
        # AMQPS only, as Amazon MQ: no plaintext listener; no client certificates.
        listen = ("listeners.tcp = none\n"
                  f"listeners.ssl.default = {bind}:{port}\n"
                  f"ssl_options.cacertfile = {tls.ca}\n"
                  f"ssl_options.certfile = {tls.cert}\n"
                  f"ssl_options.keyfile = {tls.key}\n"
                  "ssl_options.verify = verify_none\n"
                  "ssl_options.fail_if_no_peer_cert = false\n")
        node_env = {}
    _private_file(home / "rabbitmq.conf", (
        listen
        + f"default_user = fleet\ndefault_pass = {password}\n"
        "loopback_users = none\n"
        # Celery's long batches must not trip the consumer-ack timeout.
        "consumer_timeout = 86400000\n"
    ))
    env = dict(
        {k: v for k, v in os.environ.items()
         if k not in ("RABBITMQ_NODE_IP_ADDRESS", "RABBITMQ_NODE_PORT")},
        **node_env, HOME=str(home), RABBITMQ_NODENAME=f"fleet{port}@localhost",
        RABBITMQ_DIST_PORT=str(dist), ERL_EPMD_PORT=str(epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_MNESIA_BASE=str(home / "mnesia"), RABBITMQ_LOG_BASE=str(home / "log"),
        RABBITMQ_CONFIG_FILE=str(home / "rabbitmq"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(home / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(home / "pid"),
    )
    scheme = "amqp" if tls is None else "amqps"
    server = Server("rabbitmq", port, f"{scheme}://fleet:{password}@{bind}:{port}//",
                    [_need("rabbitmq-server")], env, workdir)
    if start_epmd:
        # Our own epmd in the foreground: the one Erlang starts daemonises and would
        # outlive us.
        epmd = subprocess.Popen([_need("epmd"), "-port", str(epmd_port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        wait_port(epmd_port, epmd, "epmd", timeout=10)
        server.helpers.append(epmd)
    return server


def instance_cpus(instances: int, cpus: list[int]) -> list[list[int]]:
    """Split the CPUs among instances; with more instances than CPUs, they share all."""
    if instances > len(cpus):
        return [cpus] * instances
    share, extra = divmod(len(cpus), instances)
    out, start = [], 0
    for i in range(instances):
        n = share + (1 if i < extra else 0)
        out.append(cpus[start:start + n])
        start += n
    return out


@dataclass
class Instance:
    index: int
    cpus: list[int]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    draining: bool = False  # being stopped on purpose (scale-in): not restarted


class LocalFleet:
    """Start with `with LocalFleet(...) as fleet:`; `fleet.settings` reaches it."""

    def __init__(self, instances: int | None = None, broker: str = "redis",
                 include: tuple[str, ...] = (), queue: str = "fleet",
                 workdir: Path | None = None, env: dict[str, str] | None = None,
                 lease_seconds: float | None = None, write_state: bool = False,
                 settings: Settings | None = None, tls: bool = False) -> None:
        """`settings` given: no servers are started; the workers use that broker and store
        (an SQS queue and S3 bucket, say). `tls`: broker and store speak TLS only, with a
        certificate from a throwaway CA (FLEET_TLS_CA_FILE for the workers and `fleet run`)."""
        if settings is None and broker not in ("redis", "rabbitmq"):
            raise LocalFleetError(f"unknown broker {broker!r}: use redis or rabbitmq.")
        self.broker_kind = broker
        cpus = sorted(os.sched_getaffinity(0))[: available_cpus()]
        self.cpus = cpus
        # 0: start with no worker (the autoscaler adds them).
        self.n_instances = 1 if instances is None else instances
        self.cpu_sets = instance_cpus(self.n_instances, cpus) if self.n_instances else []
        self.include = include
        self.queue = queue
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="celery-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = env or {}
        self.lease_seconds = lease_seconds
        self.write_state = write_state
        self.tls = tls
        self.tls_files: TlsFiles | None = None
        self.broker: Server | None = None
        self.results: Server | None = None
        self.instances: list[Instance] = []
        self.settings: Settings | None = settings
        if settings is not None:
            self.queue = settings.queue

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait: bool = True) -> Settings:
        if self.settings is None:
            self.settings = self._start_servers()
        self.instances = [Instance(i, cpus) for i, cpus in enumerate(self.cpu_sets)]
        for inst in self.instances:
            self.start_instance(inst)
        if self.write_state:
            self._write_state()
        if wait:
            self.wait_ready()
        return self.settings

    def _start_servers(self) -> Settings:
        password = secrets.token_urlsafe(18)
        tls = self.tls_files = make_tls_files(self.workdir / "tls") if self.tls else None
        self.results = redis_server("results", self.workdir, password, tls)
        self.results.start()
        if self.broker_kind == "redis":
            self.broker = redis_server("broker", self.workdir, password, tls)
        else:
            self.broker = rabbitmq_server(self.workdir, password, tls)
        self.broker.start()
        overrides = {"lease_seconds": self.lease_seconds} if self.lease_seconds else {}
        return Settings(
            broker_url=self.broker.url + ("/0" if self.broker_kind == "redis" else ""),
            result_url=self.results.url + "/1",
            queue=self.queue, include=self.include,
            tls_ca_file=str(tls.ca) if tls else None, **overrides,
        )

    def worker_env(self) -> dict[str, str]:
        assert self.settings is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(self.settings.as_env())
        # Modules named by --include are found from the directory fleet was started in.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        return env

    def start_instance(self, inst: Instance) -> None:
        cpus = inst.cpus
        # The command an EC2 instance runs (app/boot.py); the size comes from the pinning.
        argv = worker_argv(sys.executable, self.queue, None,
                           f"instance{inst.index}-{os.getpid()}@%h")
        log = open(self.workdir / f"instance{inst.index}.log", "ab")  # noqa: SIM115
        inst.proc = subprocess.Popen(
            argv, env=self.worker_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,
            # Pinned like a machine of that many cores; the worker sizes itself from it.
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until every instance has announced itself in the result store."""
        assert self.settings is not None
        store = open_store(self.settings)
        deadline = time.monotonic() + timeout
        want = len([i for i in self.instances if i.proc is not None])
        while time.monotonic() < deadline:
            for inst in self.instances:
                if inst.proc is not None and inst.proc.poll() is not None:
                    raise LocalFleetError(
                        f"instance {inst.index} exited with code {inst.proc.returncode}; "
                        f"see {self.workdir / f'instance{inst.index}.log'}"
                    )
            if len(store.workers()) >= want:
                return
            time.sleep(0.1)
        raise LocalFleetError(f"workers did not come up within {timeout:.0f} s; "
                              f"see the logs in {self.workdir}")

    def supervise(self) -> list[int]:
        """Restart instances that died (as systemd's Restart=always would); their indexes."""
        restarted = []
        for inst in self.instances:
            if inst.proc is not None and not inst.draining and inst.proc.poll() is not None:
                _kill_group(inst.proc)
                inst.restarts += 1
                self.start_instance(inst)
                restarted.append(inst.index)
        return restarted

    def stop_instance(self, inst: Instance, sig: int = signal.SIGTERM,
                      timeout: float = 60) -> None:
        stop_process(inst.proc, timeout=timeout, sig=sig)
        inst.proc = None

    def stop(self) -> None:
        for inst in self.instances:
            if inst.proc is not None and inst.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    inst.proc.send_signal(signal.SIGTERM)  # warm shutdown, all at once
        for inst in self.instances:
            self.stop_instance(inst)
        for server in (self.broker, self.results):
            if server is not None:
                server.close()
        if self.write_state:
            with contextlib.suppress(FileNotFoundError):
                state_file().unlink()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- state for other commands -----------------------------------------

    def _write_state(self) -> None:
        assert self.settings is not None
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(), "broker": self.broker_kind, "workdir": str(self.workdir),
            "env": self.settings.as_env(),
            "instances": [{"pid": i.proc.pid if i.proc else None, "cpus": i.cpus}
                          for i in self.instances],
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)

    def describe(self) -> str:
        assert self.settings is not None
        per = ", ".join(f"instance{i.index}: {len(i.cpus)} CPU" for i in self.instances)
        tls = (f"\n  TLS only, certificates from the throwaway CA {self.settings.tls_ca_file}"
               if self.tls_files else "")
        return (f"local fleet up: broker {redact(self.settings.broker_url)}, "
                f"results {redact(self.settings.result_url)}\n  {per}{tls}\n"
                f"  logs in {self.workdir}")
