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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cpus import available_cpus
from app.host.command import worker_argv
from app.launcher.discovery import state_file
from app.settings import Settings, redact
from app.store import open_store
from scripts.local.processes import LocalFleetError, kill_group
from scripts.local.servers import Server, rabbitmq_server, redis_server
from scripts.local.tls import TlsFiles, make_tls_files

if TYPE_CHECKING:
    from app.wheelhouse import Wheelhouse


def instance_cpus(instances: int, cpus: list[int]) -> list[list[int]]:
    """Split the CPUs among instances; with more instances than CPUs, they share all."""
    if instances > len(cpus):
        return [cpus] * instances
    share, extra = divmod(len(cpus), instances)
    out, start = [], 0
    for i in range(instances):
        n = share + (1 if i < extra else 0)
        out.append(cpus[start : start + n])
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

    def __init__(
        self,
        instances: int | None = None,
        broker: str = "redis",
        include: tuple[str, ...] = (),
        queue: str = "fleet",
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
        lease_seconds: float | None = None,
        write_state: bool = False,
        settings: Settings | None = None,
        tls: bool = False,
        code: Sequence[Path] = (),
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        """`settings` given: no servers are started; the workers use that broker and store
        (an SQS queue and S3 bucket, say). `tls`: broker and store speak TLS only, with a
        certificate from a throwaway CA (FLEET_TLS_CA_FILE for the workers and `fleet run`).
        `code`: the workers run these projects from a wheelhouse installed for them
        (scripts/local/code.py), not this checkout; `say` hears the packaging's steps."""
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
        # Set when an instance failed to start: stop() then keeps the workdir's logs.
        self.keep_logs = False
        # What stop_instance found of workers that did not stop when signalled.
        self.stuck: list[str] = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = env or {}
        self.lease_seconds = lease_seconds
        self.write_state = write_state
        self.tls = tls
        self.tls_files: TlsFiles | None = None
        self.broker: Server | None = None
        self.results: Server | None = None
        self.instances: list[Instance] = []
        self._settings: Settings | None = settings
        if settings is not None:
            self.queue = settings.queue
        self.code = tuple(code)
        self.say = say
        # With `code`: the wheelhouse and the Python of the virtualenv it is installed in.
        self.wheelhouse: Wheelhouse | None = None
        self.python = sys.executable

    @property
    def settings(self) -> Settings:
        """How to reach the fleet's broker and result store (set once it has started)."""
        if self._settings is None:
            raise LocalFleetError("the local fleet has not started: no broker or store yet.")
        return self._settings

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop()
        if self.stuck and exc_type is None:
            # Stopped anyway (killed), but a worker that ignores its signal is a bug.
            raise LocalFleetError("\n".join(self.stuck))

    def start(self, wait: bool = True) -> Settings:
        if self.code and self.wheelhouse is None:
            # First: a project that cannot be packaged starts nothing.
            from scripts.local.code import install_code

            self.wheelhouse, python = install_code(self.code, self.say)
            self.python = str(python)
        if self._settings is None:
            self._settings = self._start_servers()
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
        overrides: dict[str, Any] = (
            {"lease_seconds": self.lease_seconds} if self.lease_seconds else {}
        )
        return Settings(
            broker_url=self.broker.url + ("/0" if self.broker_kind == "redis" else ""),
            result_url=self.results.url + "/1",
            queue=self.queue,
            include=self.include,
            tls_ca_file=str(tls.ca) if tls else None,
            code_version=self.wheelhouse.version if self.wheelhouse else None,
            **overrides,
        )

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(self.settings.as_env())
        if self.wheelhouse is None:
            # Modules named by --include are found from the directory fleet was started in.
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (os.getcwd(), env.get("PYTHONPATH")) if p
            )
        else:
            # The wheelhouse's code only: nothing of this checkout may shadow it.
            env.pop("PYTHONPATH", None)
        # A worker that will not stop can be asked where its threads are (SIGABRT).
        env["PYTHONFAULTHANDLER"] = "1"
        env.update(self.extra_env)
        return env

    def start_instance(self, inst: Instance) -> None:
        cpus = inst.cpus
        # The command an EC2 instance runs (app/host/command.py); the size comes from the pinning.
        argv = worker_argv(self.python, self.queue, None, f"instance{inst.index}-{os.getpid()}@%h")
        log = open(self.workdir / f"instance{inst.index}.log", "ab")  # noqa: SIM115
        inst.proc = subprocess.Popen(
            argv,
            env=self.worker_env(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            # `python -m` puts its directory first on the path: out of this checkout, with
            # a wheelhouse, so that its app/ does not shadow the installed one.
            cwd=Path(self.python).parent.parent if self.wheelhouse else None,
            start_new_session=True,
            # Pinned like a machine of that many cores; the worker sizes itself from it.
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until every instance has announced itself in the result store."""
        store = open_store(self.settings)
        deadline = time.monotonic() + timeout
        want = len([i for i in self.instances if i.proc is not None])
        while time.monotonic() < deadline:
            for inst in self.instances:
                if inst.proc is not None and inst.proc.poll() is not None:
                    path = self.workdir / f"instance{inst.index}.log"
                    # The logs outlive the stop that follows: they say why.
                    self.keep_logs = True
                    raise LocalFleetError(
                        f"instance {inst.index} exited with code {inst.proc.returncode} while "
                        f"starting; the end of its log ({path}, kept):\n{log_tail(path)}"
                    )
            if len(store.workers()) >= want:
                return
            time.sleep(0.1)
        raise LocalFleetError(
            f"workers did not come up within {timeout:.0f} s; see the logs in {self.workdir}"
        )

    def supervise(self) -> list[int]:
        """Restart instances that died (as systemd's Restart=always would); their indexes."""
        restarted = []
        for inst in self.instances:
            if inst.proc is not None and not inst.draining and inst.proc.poll() is not None:
                kill_group(inst.proc)
                inst.restarts += 1
                self.start_instance(inst)
                restarted.append(inst.index)
        return restarted

    def stop_instance(
        self, inst: Instance, sig: int | None = signal.SIGTERM, timeout: float = 60
    ) -> None:
        """Signal the instance's worker (unless `sig` is None: signalled already) and wait.

        A worker still running after `timeout` is a bug worth seeing: it is sent SIGABRT
        first, so that Python's faulthandler writes every thread's stack into its log,
        which is kept, and the fleet's `stuck` list says where; then its group is killed.
        """
        proc = inst.proc
        if proc is not None and proc.poll() is None:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._abort(inst, timeout)
        kill_group(proc)
        inst.proc = None

    def _abort(self, inst: Instance, timeout: float) -> None:
        assert inst.proc is not None
        path = self.workdir / f"instance{inst.index}.log"
        before = path.stat().st_size if path.exists() else 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(inst.proc.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            inst.proc.wait(10)
        self.keep_logs = True
        stacks = ""
        with contextlib.suppress(OSError):
            stacks = path.read_bytes()[before:].decode(errors="replace").strip()
        message = (
            f"instance {inst.index} (pid {inst.proc.pid}) did not stop within "
            f"{timeout:.0f} s of its signal; its threads' stacks are at the end of {path} "
            "(kept)"
        )
        self.stuck.append(f"{message}:\n{stacks}" if stacks else message)
        print(f"fleet local: {message}", file=sys.stderr)

    def stop(self) -> None:
        for inst in self.instances:
            if inst.proc is not None and inst.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    inst.proc.send_signal(signal.SIGTERM)  # warm shutdown, all at once
        for inst in self.instances:
            self.stop_instance(inst, sig=None)  # once: a second SIGTERM is not a no-op
        for server in (self.broker, self.results):
            if server is not None:
                server.close()
        if self.write_state:
            with contextlib.suppress(FileNotFoundError):
                state_file().unlink()
        if self._own_workdir and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- state for other commands -----------------------------------------

    def _write_state(self) -> None:
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "broker": self.broker_kind,
            "workdir": str(self.workdir),
            "env": self.settings.as_env(),
            "instances": [
                {"pid": i.proc.pid if i.proc else None, "cpus": i.cpus} for i in self.instances
            ],
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)

    def describe(self) -> str:
        per = ", ".join(f"instance{i.index}: {len(i.cpus)} CPU" for i in self.instances)
        tls = (
            f"\n  TLS only, certificates from the throwaway CA {self.settings.tls_ca_file}"
            if self.tls_files
            else ""
        )
        code = ""
        if self.wheelhouse is not None:
            projects = ", ".join(p["name"] for p in self.wheelhouse.manifest["projects"])
            code = f"\n  code: wheelhouse {self.wheelhouse.version} ({projects or 'the kit alone'})"
        return (
            f"local fleet up: broker {redact(self.settings.broker_url)}, "
            f"results {redact(self.settings.result_url)}\n  {per}{tls}{code}\n"
            f"  logs in {self.workdir}"
        )


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log, indented, or a note that there is none."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except FileNotFoundError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty)"
