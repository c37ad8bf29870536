"""`fleet local` for real: `fleet run` finds it without flags; a signal stops it without a trace."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from tests.support.local_fleet import LocalFleetProcess, alive
from tests.support.paths import FLEET_BIN

FLEET = str(FLEET_BIN)

pytestmark = pytest.mark.timeout(240)


def port_open(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1):
            return True
    except OSError:
        return False


def processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes anywhere whose command line or environment holds `marker`."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid() or not alive(p):
                continue
            environ = " ".join(f"{k}={v}" for k, v in p.environ().items())
            text = " ".join(p.cmdline()) + " " + environ
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if marker in text:
            found.append(p)
    return found


def names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(p.name())
        except psutil.NoSuchProcess:
            out.append("?")
    return out


def assert_nothing_left(
    f: LocalFleetProcess, state: dict, started: list[psutil.Process], rc: int, sig: int
) -> None:
    # Exited by its own clean-up path, not killed by the signal.
    assert rc in (0, 128 + sig), f"exit code {rc}:\n{f.output()}"
    assert "Traceback" not in f.output(), f.output()
    _, left = psutil.wait_procs(started, timeout=10)
    left = [p for p in left if alive(p)]
    assert not left, f"still running after fleet local exited: {names(left)}"
    assert not f.state_file.exists()
    assert not Path(state["workdir"]).exists()
    env = state["env"]
    for url in (env["FLEET_BROKER_URL"], env["FLEET_RESULT_URL"]):
        assert not port_open(url), f"something still listens at {urlsplit(url).port}"
    # Nothing escaped the process tree either (a daemonised helper would have).
    strays = processes_mentioning(state["workdir"]) + processes_mentioning(env["FLEET_BROKER_URL"])
    assert not strays, f"processes of the fleet outside its tree: {names(strays)}"
    # And the next `fleet run` no longer finds a fleet.
    proc = f.cmd("run", "process_id", "--ids", "range:0:10", timeout=60)
    assert proc.returncode == 2 and "fleet local" in proc.stderr, proc.stderr


def check_env_exports(f: LocalFleetProcess, state: dict) -> None:
    proc = f.cmd("local", "--env", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("export ") for line in proc.stdout.splitlines()), proc.stdout
    keys = (
        "FLEET_BROKER_URL",
        "FLEET_RESULT_URL",
        "FLEET_QUEUE",
        "CELERY_BROKER_URL",
        "CELERY_RESULT_BACKEND",
    )
    # A plain POSIX shell evaluates it and sees the fleet's settings.
    script = (
        'eval "$1"; for k in '
        + " ".join(keys)
        + '; do printf "%s=%s\\n" "$k" "$(printenv "$k")"; done'
    )
    shell = subprocess.run(
        ["sh", "-c", script, "sh", proc.stdout],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    seen = dict(line.split("=", 1) for line in shell.stdout.splitlines())
    env = state["env"]
    assert seen["FLEET_BROKER_URL"] == env["FLEET_BROKER_URL"] == seen["CELERY_BROKER_URL"]
    assert seen["FLEET_RESULT_URL"] == env["FLEET_RESULT_URL"] == seen["CELERY_RESULT_BACKEND"]
    assert seen["FLEET_QUEUE"] == "fleet"
    assert port_open(seen["FLEET_BROKER_URL"]) and port_open(seen["FLEET_RESULT_URL"])


def run_job_without_flags(f: LocalFleetProcess, tmp_path: Path, n: int) -> None:
    out = tmp_path / "results.jsonl"
    proc = f.cmd("run", "process_id", "--ids", f"range:0:{n}", "--out", str(out))
    assert proc.returncode == 0, f"{proc.stderr}\n--- fleet local:\n{f.output()}"
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == n
    assert sorted(r["id"] for r in records) == list(range(n))
    assert all("result" in r for r in records)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_local_fleet_found_without_flags_and_stopped_cleanly(local_fleet, tmp_path, sig):
    f = local_fleet("-n", "2")
    state = f.wait_up()
    assert state["pid"] == f.proc.pid
    assert len(state["instances"]) == 2
    assert oct(f.state_file.stat().st_mode & 0o777) == oct(0o600)  # it holds passwords

    check_env_exports(f, state)
    run_job_without_flags(f, tmp_path, 2000)

    if sig == signal.SIGTERM:
        # A second fleet on the same state directory is refused, and leaves the first alone.
        again = f.cmd("local", "-n", "1", timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        assert f.proc.poll() is None

    started = f.snapshot()
    started_names = names(started)
    assert started_names.count("redis-server") == 2, started_names
    workers = [p for p in started if "celery" in " ".join(p.cmdline())]
    assert len(workers) >= 4, started_names  # two instances, each with a pool process

    rc = f.stop(sig)
    assert_nothing_left(f, state, started, rc, sig)


def test_local_fleet_on_rabbitmq_leaves_nothing_behind(local_fleet, tmp_path):
    f = local_fleet("-n", "1", "--broker", "rabbitmq")
    state = f.wait_up(timeout=180)
    assert state["broker"] == "rabbitmq"
    assert state["env"]["FLEET_BROKER_URL"].startswith("amqp://")
    run_job_without_flags(f, tmp_path, 300)

    started = f.snapshot()
    started_names = names(started)
    for name in ("epmd", "beam.smp", "redis-server"):
        assert name in started_names, started_names

    rc = f.stop(signal.SIGTERM)
    assert_nothing_left(f, state, started, rc, signal.SIGTERM)


def test_fleet_demo_runs_the_example_task_and_leaves_nothing_behind(tmp_path):
    """`make demo`'s command, smaller: every ID's result once, the report, no process left."""
    from app.tasks import process_id

    marker = f"demo-test-{os.getpid()}-{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env.update(DEMO_TEST_MARK=marker, FLEET_STATE_DIR=str(tmp_path / "state"))
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [FLEET, "demo", "--ids", "5000", "--instances", "2", "--out", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(5000))
    assert all(r["result"] == process_id(r["id"]) for r in records)
    assert "5,000 IDs in " in proc.stderr and "0 errors" in proc.stderr, proc.stderr
    assert "parallel efficiency" in proc.stderr and f"results in {out}" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The fleet's servers and workers inherited the marker: none may outlive the demo.
    left = psutil.wait_procs(processes_mentioning(marker), timeout=10)[1]
    assert not [p for p in left if alive(p)], names(left)


def test_a_worker_that_cannot_start_is_explained_and_its_log_kept(local_fleet, tmp_path):
    f = local_fleet("-n", "1", "--include", "nosuch_project.tasks")
    rc = f.proc.wait(120)
    output = f.output()
    assert rc != 0, output
    assert "instance 0 exited with code" in output, output
    # The reason itself, not only where to look, and the log it points to is still there.
    assert "No module named 'nosuch_project'" in output, output
    kept = output.split("the end of its log (", 1)[1].split(", kept)", 1)[0]
    assert "No module named 'nosuch_project'" in Path(kept).read_text()
