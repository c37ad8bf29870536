"""`fleet ops` against real sshd servers on 127.0.0.1, and host discovery against moto.

Each "host" is an sshd on its own free port, with a throwaway key, whose
sessions get (sshd_config SetEnv) the FLEET_* paths of the host's own
directory: its venv, environment file and worker. There is no systemd here,
so the remote `python -m app.boot` drives the workers through pidfiles: the
same commands a systemd host runs. Everything the tests start is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.host.envfile import read_env, render_env
from app.host.paths import HostPaths
from app.host.service import pid_alive
from app.names import WHEELHOUSE_MANIFEST
from app.wheelhouse import Wheelhouse
from scripts.cli import cli
from scripts.local.fleet import LocalFleet
from scripts.local.processes import free_port, wait_port
from scripts.ops import tasks as ops_tasks
from scripts.ops.hosts import SSM_PROXY, Host, Hosts, expand_proxy
from scripts.ops.rolling import rolling
from tests.support.checker import exactly_once
from tests.support.fleets import settle
from tests.support.jobs import Background
from tests.support.projects import write_project
from tests.support.worker_host import BOOT_SCRIPT, host_env, wheelhouse, write_settings

pytestmark = pytest.mark.timeout(240)

SSHD = "/usr/sbin/sshd"
# A user's project the hosts run, in two versions: its task naps, so that a job outlasts
# the deploy, and says which code ran it.
NAPS = {
    "naps/__init__.py": "",
    "naps/tasks.py": """\
        import time

        from app import fleet_task
        from app.names import code_version


        @fleet_task
        def nap(item):
            time.sleep(0.05)
            return code_version()
        """,
}


def naps(root: Path, version: int) -> Wheelhouse:
    modules = {**NAPS, "naps/__init__.py": f"VERSION = {version}\n"}
    return wheelhouse(write_project(root / f"naps{version}", "naps", modules, ["naps.tasks"]))


@dataclass
class SshHost:
    name: str
    root: Path
    port: int
    proc: subprocess.Popen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def layout(self) -> HostPaths:
        return HostPaths.from_env(host_env(self.root))

    @property
    def stamp(self) -> Path:
        """The manifest of the wheelhouse installed in the host's venv."""
        return self.root / "opt" / "venv" / WHEELHOUSE_MANIFEST

    def worker_pid(self) -> int | None:
        try:
            return int(self.layout.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None


def start_sshd(name: str, root: Path, keys: Path) -> SshHost:
    port = free_port()
    env = host_env(root, FLEET_BOOT_SCRIPT=str(BOOT_SCRIPT))
    setenv = " ".join(f"{k}={env[k]}" for k in sorted(env) if k.startswith("FLEET_"))
    config = root / "sshd_config"
    config.write_text(
        textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {keys}/host_key
        AuthorizedKeysFile {keys}/authorized_keys
        PidFile {root}/sshd.pid
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        Subsystem sftp internal-sftp
        SetEnv {setenv}
        """)
    )
    with open(root / "sshd.log", "wb") as log:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    wait_port(port, proc, f"sshd {name}", timeout=20)
    return SshHost(name, root, port, proc)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server is not installed (Debian package in the Makefile)")
    d = tmp_path_factory.mktemp("keys")
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    # sshd refuses to start without its privilege separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def hosts(keys, tmp_path_factory):
    """Two hosts, each with the old code (version 1 of the naps project) installed and its
    worker online."""
    with LocalFleet(0, "redis", workdir=tmp_path_factory.mktemp("fleet")) as fleet:
        base = tmp_path_factory.mktemp("base")
        old = naps(tmp_path_factory.mktemp("projects"), 1)
        install = subprocess.run(
            ["bash", str(BOOT_SCRIPT), "install", str(old.directory)],
            env=host_env(base),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert install.returncode == 0, install.stderr
        started: list[SshHost] = []
        try:
            for name in ("hosta", "hostb"):
                root = tmp_path_factory.mktemp(name)
                # A copy of one installed venv: only `python -m` is used, so it runs anywhere.
                shutil.copytree(base / "opt", root / "opt", symlinks=True)
                settings = write_settings(fleet.settings, root / "settings.env")
                env = host_env(root)
                python = str(root / "opt" / "venv" / "bin" / "python")
                for args in (
                    [
                        "--settings",
                        str(settings),
                        "--node",
                        f"{name}@test",
                        "--systemd",
                        "no",
                        "--concurrency",
                        "1",
                    ],
                    ["start"],
                    ["wait", "--timeout", "60"],
                ):
                    r = subprocess.run(
                        [python, "-m", "app.boot", *args],
                        env=env,
                        cwd=root / "opt",
                        capture_output=True,
                        text=True,
                    )
                    assert r.returncode == 0, r.stderr
                started.append(start_sshd(name, root, keys))
            yield fleet, started
        finally:
            for host in started:
                host.proc.terminate()
                host.proc.wait(10)
                pid = host.worker_pid()
                if pid and pid_alive(pid):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def new_code(tmp_path_factory) -> Wheelhouse:
    """Version 2 of the hosts' project: another code version."""
    return naps(tmp_path_factory.mktemp("projects"), 2)


def fleet_of(hosts: list[SshHost], keys: Path, **kw) -> Hosts:
    return Hosts([Host(h.address) for h in hosts], user="root", key=str(keys / "client_key"), **kw)


def how_to_reach(hosts: list[SshHost], keys: Path) -> list[str]:
    """`fleet ops` options for these hosts."""
    return [
        "--hosts",
        ",".join(h.address for h in hosts),
        "--user",
        "root",
        "--key",
        str(keys / "client_key"),
    ]


def test_deploy_rolls_one_host_at_a_time_under_a_running_job(hosts, keys, new_code, tmp_path):
    """A new version reaches a busy fleet: the job that runs through the deploy loses no
    result and writes none twice, and its batches ran on both versions."""
    fleet, (a, b) = hosts
    old_pids = {h.name: h.worker_pid() for h in (a, b)}
    old_code = json.loads((a.root / "opt" / "venv" / WHEELHOUSE_MANIFEST).read_text())["version"]
    events: list[tuple[str, str, float]] = []
    job = Background(fleet, tmp_path / "out.jsonl", n=800, batch=10, task="nap")

    def deploy(c, house):
        return ops_tasks.deploy(
            c, house, 90, step=lambda s: events.append((c.port, s, time.time()))
        )

    ops = fleet_of([a, b], keys)
    try:
        outcomes = rolling(ops, deploy, new_code, at_a_time=1)
    finally:
        ops.close()
    summary = job.result(timeout=180)
    assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
    a_drain = next(t for port, s, t in events if port == a.port and s == "drain")
    assert summary.status == "ok" and job.finished > a_drain, "the job outlasted no drain"
    # A drain finishes the batches running and hands the others back: none is sent again.
    assert summary.resent == 0
    settle(fleet)
    ran = exactly_once(tmp_path / "out.jsonl", range(800))
    assert {r["result"] for r in ran.values()} == {old_code, new_code.version}
    steps = ["upload", "drain", "install", "start", "wait", "done"]
    assert [(port, s) for port, s, _ in events] == [(a.port, s) for s in steps] + [
        (b.port, s) for s in steps
    ], "host b began before host a answered"
    a_done = next(t for port, s, t in events if port == a.port and s == "done")
    b_drain = next(t for port, s, t in events if port == b.port and s == "drain")
    assert outcomes[0].finished <= outcomes[1].started and a_done <= b_drain
    # On the hosts themselves: a's new worker was up before b's old one was drained.
    assert a.layout.pidfile.stat().st_mtime <= b_drain
    for host, outcome in zip((a, b), outcomes, strict=True):
        assert outcome.result["code"] == outcome.result["worker_code"] == new_code.version
        assert outcome.result["online"] and outcome.result["node"] == f"{host.name}@test"
        assert host.worker_pid() != old_pids[host.name]


def test_status_and_logs_show_each_host(hosts, keys):
    _, (a, b) = hosts
    runner = CliRunner()
    how = how_to_reach([a, b], keys)
    result = runner.invoke(cli, ["ops", "status", *how, "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["address"]: r for r in json.loads(result.stdout)}
    table = runner.invoke(cli, ["ops", "status", *how])
    assert table.exit_code == 0, table.output
    for host in (a, b):
        row = rows[host.address]
        assert row["node"] == f"{host.name}@test" and row["online"]
        assert row["cores"] == len(os.sched_getaffinity(0)) and row["concurrency"] == 1
        code = json.loads(host.stamp.read_text())["version"]
        assert row["code"] == row["worker_code"] == code and row["active"] == 0
        line = next(line for line in table.stdout.splitlines() if line.startswith(host.address))
        assert line.split()[-3:] == [code, code, "online"], table.stdout
    logs = runner.invoke(cli, ["ops", "logs", *how, "--lines", "200"])
    assert logs.exit_code == 0, logs.output
    for host in (a, b):
        mine = [line for line in logs.stdout.splitlines() if line.startswith(f"{host.address} | ")]
        assert any(f"{host.name}@test ready" in line for line in mine), logs.stdout[-2000:]
        other = b if host is a else a
        assert not any(f"{other.name}@test" in line for line in mine)


def test_a_failing_host_stops_the_roll(hosts, keys):
    _, (a, b) = hosts
    # Host a's settings are broken: its new worker will exit at once.
    env = read_env(a.layout.env_file)
    a.layout.env_file.write_text(render_env({**env, "FLEET_MAX_BATCH_SECONDS": "0"}))
    b_pid, b_stamp = b.worker_pid(), b.stamp.read_text()
    house = wheelhouse()
    try:
        result = CliRunner().invoke(
            cli,
            ["ops", "deploy", str(house.directory), *how_to_reach([a, b], keys), "--timeout", "30"],
        )
    finally:
        a.layout.env_file.write_text(render_env(env))
    assert result.exit_code == 1, result.output
    said = result.stderr.splitlines()
    assert any(line.startswith(f"rolling out wheelhouse {house.version}: ") for line in said)
    failed = next(line for line in said if line.startswith(f"{a.address}: FAILED"))
    assert "the worker is not running" in failed
    assert "FLEET_MAX_BATCH_SECONDS=0 must be at least 1" in failed, "the log tail"
    assert said[-2:] == [
        "stopping: 1 host(s) not touched",
        f"deployed wheelhouse {house.version} to 0 of 2 host(s)",
    ]
    assert not any(line.startswith(f"{b.address}:") for line in said), said
    assert b.worker_pid() == b_pid and pid_alive(b_pid), "host b was touched"
    assert b.stamp.read_text() == b_stamp


@pytest.mark.parametrize("given", ["wheel", "directory"])
def test_deploy_refuses_what_is_not_a_wheelhouse(hosts, keys, tmp_path, given):
    _, (a, b) = hosts
    # An old single wheel, and a directory of wheels without a manifest.
    wheel = tmp_path / "dist" / "celery_fleet-0.2.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK\x05\x06" + bytes(18))
    path = wheel if given == "wheel" else wheel.parent
    before = {h.name: (h.worker_pid(), (h.root / "sshd.log").read_text()) for h in (a, b)}
    result = CliRunner().invoke(cli, ["ops", "deploy", str(path), *how_to_reach([a, b], keys)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith(f"fleet: {path} ") and len(message.splitlines()) == 1, message
    assert "make one with `fleet package PROJECT --out DIR`" in message
    # Not connected to at all: sshd logs every connection.
    assert {h.name: (h.worker_pid(), (h.root / "sshd.log").read_text()) for h in (a, b)} == before


RELAY = """\
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


def test_connections_go_through_a_proxy_command(hosts, keys, tmp_path):
    _, (a, _) = hosts
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    ops = fleet_of([a], keys, proxy=f"{sys.executable} {relay} %h %p")
    try:
        assert ops.on(ops.hosts[0], ops_tasks.status)["node"] == "hosta@test"
    finally:
        ops.close()
    assert expand_proxy(SSM_PROXY, "i-0abc", 22, "ec2-user") == (
        "aws ssm start-session --target i-0abc --document-name AWS-StartSSHSession "
        "--parameters portNumber=22"
    )
