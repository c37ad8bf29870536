"""The boot path for real: fleet-boot installs the wheel, app.boot configures and runs the worker.

scripts/fleet-boot.sh runs on this machine against a local fleet with no
worker of its own, so every job here is done by the booted worker alone.
systemd is not PID 1 here, so its steps are skipped and the worker runs in the
foreground mode; the systemd steps themselves are checked with a stand-in
`systemctl` that records its calls, and the units with `systemd-analyze verify`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from app.cpus import available_cpus
from app.host.command import worker_argv
from app.host.configure import Report, configure
from app.host.envfile import parse_env, render_env
from app.host.paths import HostPaths
from app.host.service import BootError, Pidfile
from app.host.units import agent_unit, worker_unit
from app.names import AGENT_UNIT, WORKER_UNIT
from app.settings import Settings
from scripts.local.fleet import LocalFleet
from tests.support.worker_host import (
    BOOT_SCRIPT,
    app_wheel,
    host_env,
    run_job,
    wait_worker,
    wheelhouse,
    write_settings,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A broker and result store, and no worker: the booted one is the only one."""
    with LocalFleet(0, "redis", workdir=tmp_path_factory.mktemp("fleet")) as f:
        yield f


@dataclass
class Booted:
    root: Path
    env: dict[str, str]
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    mtimes_before_second: dict[str, float]


def fleet_boot(
    env: dict[str, str], *args: str, prefix: tuple[str, ...] = (), timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, "bash", str(BOOT_SCRIPT), *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        cwd=env["FLEET_RUN_DIR"],
    )


def files_under(root: Path) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime_ns
        for sub in ("etc", "systemd")
        for p in (root / sub).rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def booted(fleet, tmp_path_factory) -> Booted:
    """fleet-boot run twice on a bare host: the first installs and configures, the second not."""
    root = tmp_path_factory.mktemp("host")
    (root / "run").mkdir()
    settings = write_settings(fleet.settings, root / "settings.env")
    env = host_env(root, FLEET_ARTIFACT=str(wheelhouse()), FLEET_SETTINGS_FILE=str(settings))
    first = fleet_boot(env)
    assert first.returncode == 0, first.stderr
    before = files_under(root)
    second = fleet_boot(env, "--json")
    return Booted(root, env, first, second, before)


def test_first_boot_installs_and_configures(booted):
    log = booted.first.stderr
    assert f"installed {app_wheel().name}" in log
    venv_python = booted.root / "opt" / "venv" / "bin" / "python"
    assert venv_python.exists()
    env_file = booted.root / "etc" / "env"
    assert env_file.stat().st_mode & 0o777 == 0o600, "the file holds the broker password"
    env = parse_env(env_file.read_text())
    assert env["FLEET_CONCURRENCY"] == str(available_cpus())
    unit = (booted.root / "systemd" / WORKER_UNIT).read_text()
    expected = worker_argv(str(venv_python), "fleet", available_cpus(), env["FLEET_NODE_NAME"])
    assert f"ExecStart={' '.join(expected)}" in unit.splitlines()
    assert "systemd: skipped: systemd is not running here" in log
    assert not (booted.root / "systemd" / AGENT_UNIT).exists(), "not on EC2: no agent"


def test_second_boot_changes_nothing(booted):
    assert booted.second.returncode == 0, booted.second.stderr
    assert f"unchanged: {app_wheel().name} is installed" in booted.second.stderr
    assert "nothing changed" in booted.second.stderr
    report = json.loads(booted.second.stdout)
    assert report["changed"] is False and report["files"] == [] and report["actions"] == []
    assert files_under(booted.root) == booted.mtimes_before_second


@pytest.mark.parametrize("pinned", [True, False], ids=["taskset-c0", "unrestricted"])
def test_foreground_worker_is_sized_to_its_cpus_and_runs_a_job(booted, fleet, tmp_path, pinned):
    expected = 1 if pinned else len(os.sched_getaffinity(0))
    node = f"boot-{'pinned' if pinned else 'free'}@test"
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    prefix = ["taskset", "-c", "0"] if pinned else []
    proc = subprocess.Popen(
        [*prefix, "bash", str(BOOT_SCRIPT), "--foreground", "--node", node],
        env=booted.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=booted.root / "run",
        start_new_session=True,
    )
    try:
        info = wait_worker(fleet.settings, node, proc=proc)
        assert info["concurrency"] == expected
        # exec all the way down: the pid we started is the worker, with one pool process per CPU.
        assert len(psutil.Process(proc.pid).children()) == expected
        summary = run_job(fleet.settings, tmp_path / "out.jsonl", n=400)
        assert (summary.status, summary.items, summary.errors) == ("ok", 400, 0)
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 400
        proc.send_signal(signal.SIGTERM)  # warm shutdown, as systemd stops it
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    output = (tmp_path / "worker.log").read_text()
    assert f"-c {expected} -n {node}" in output
    assert "Warm shutdown" in output


# -- app.boot without the install --------------------------------------------------


def test_units_verify_with_systemd(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    layout = HostPaths(tmp_path, tmp_path / "env", tmp_path, tmp_path)
    env = {
        "FLEET_QUEUE": "q",
        "FLEET_CONCURRENCY": "4",
        "FLEET_NODE_NAME": "celery@%h-1",
        "FLEET_MAX_BATCH_SECONDS": "600",
    }
    (tmp_path / "env").write_text(render_env(env))
    worker = worker_unit(layout, env, sys.executable, "root")
    agent = agent_unit(layout, env, sys.executable)
    for name, text in ((WORKER_UNIT, worker), (AGENT_UNIT, agent)):
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            [analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
    lines = worker.splitlines()
    for line in ("KillSignal=SIGTERM", "KillMode=mixed", "Restart=always", "TimeoutStopSec=660"):
        assert line in lines
    # systemd would expand %h itself: the node name reaches Celery as written.
    assert "-n celery@%%h-1" in worker
    assert "--node celery@%%h-1" in agent and "-m app.agent" in agent


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A `systemctl` on PATH that records its calls; units in active/ are active."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "active").mkdir()
    script = bin_dir / "systemctl"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >>{tmp_path}/calls
        [[ -e {tmp_path}/fail && "$1" == restart ]] && exit 1
        case "$1" in
        is-active) [[ -e {tmp_path}/active/${{@: -1}} ]] ;;
        start|restart) shift; for u in "$@"; do touch {tmp_path}/active/$u; done ;;
        esac
        """)
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def calls() -> list[str]:
        path = tmp_path / "calls"
        lines = path.read_text().splitlines() if path.exists() else []
        path.unlink(missing_ok=True)
        return lines

    return calls


def test_systemd_steps_run_with_systemd_and_only_on_change(tmp_path, fake_systemctl):
    layout = HostPaths(
        tmp_path / "opt", tmp_path / "etc" / "env", tmp_path / "units", tmp_path / "run"
    )
    settings = Settings("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1", queue="q")

    def run(concurrency: int = 3, use_systemd: bool = True) -> Report:
        return configure(
            layout,
            settings,
            {},
            "test",
            concurrency=concurrency,
            node="n@h",
            use_systemd=use_systemd,
            agent=True,
            user="root",
        )

    units = f"{WORKER_UNIT} {AGENT_UNIT}"
    apply = ["daemon-reload", f"enable {units}", f"restart {units}"]
    first = run()
    assert fake_systemctl() == apply
    assert first.changed and len(first.files) == 3
    second = run()
    assert not second.changed, second.as_dict()
    assert fake_systemctl() == [
        f"is-active --quiet {WORKER_UNIT}",
        f"is-active --quiet {AGENT_UNIT}",
    ]
    (tmp_path / "active" / WORKER_UNIT).unlink()  # someone stopped the worker
    assert run().actions == [f"started {WORKER_UNIT}"]
    assert fake_systemctl()[-1] == f"start {WORKER_UNIT}"
    # A new size rewrites the files and restarts, once.
    assert run(5).files and fake_systemctl() == apply
    # A restart that failed is tried again by the next run, though no file changes then.
    (tmp_path / "fail").touch()
    with pytest.raises(BootError):
        run(7)
    (tmp_path / "fail").unlink()
    fake_systemctl()
    retried = run(7)
    assert not retried.files and fake_systemctl() == apply
    # Without systemd the same change touches no systemctl at all.
    run(6, use_systemd=False)
    assert fake_systemctl() == []


def test_drain_never_signals_a_process_that_is_not_the_worker(tmp_path):
    layout = HostPaths(tmp_path, tmp_path / "env", tmp_path, tmp_path / "run")
    layout.env_file.write_text(render_env({"FLEET_NODE_NAME": "w@h"}))
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        layout.run_dir.mkdir()
        layout.pidfile.write_text(f"{stranger.pid}\n")  # a stale pidfile, its pid reused
        background = Pidfile(layout)
        assert background.pid() is None
        background.drain()
        assert stranger.poll() is None, "drain signalled a stranger"
    finally:
        stranger.kill()
        stranger.wait()


# -- the boot script's own functions -------------------------------------------------


def bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f'source "{BOOT_SCRIPT}"\n{script}'],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_fetch_artifact_mirrors_s3_and_wants_one_app_wheel(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "aws").write_text(
        f'#!/bin/bash\necho "$*" >>{tmp_path}/calls\ncp {app_wheel()} "${{@: -1}}"\n'
    )
    (fake / "aws").chmod(0o755)
    env = host_env(tmp_path, PATH=f"{fake}:{os.environ['PATH']}")
    result = bash("fetch_artifact s3://bucket/artifacts/abc/", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path}/opt/wheels/{app_wheel().name}"
    assert (
        (tmp_path / "calls")
        .read_text()
        .startswith(
            f"s3 sync --only-show-errors --delete s3://bucket/artifacts/abc/ {tmp_path}/opt/wheels/"
        )
    )
    shutil.copy(app_wheel(), tmp_path / "opt" / "wheels" / "celery_fleet-9.9-py3-none-any.whl")
    two = bash(f"fetch_artifact {tmp_path}/opt/wheels", env)
    assert two.returncode != 0 and "found 2" in two.stderr
    assert bash(f"fetch_artifact {app_wheel()}", env).stdout.strip() == str(app_wheel())
