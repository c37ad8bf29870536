"""The boot path for real: fleet-boot installs the wheelhouse, app.boot configures and runs
the worker.

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
from app.names import AGENT_UNIT, WHEELHOUSE_MANIFEST, WORKER_UNIT
from app.settings import Settings
from app.wheelhouse import Wheelhouse
from scripts.local.fleet import LocalFleet
from tests.support.projects import write_project
from tests.support.worker_host import (
    BOOT_SCRIPT,
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
    house: Wheelhouse


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
    house = wheelhouse()
    env = host_env(root, FLEET_ARTIFACT=str(house.directory), FLEET_SETTINGS_FILE=str(settings))
    first = fleet_boot(env)
    assert first.returncode == 0, first.stderr
    before = files_under(root)
    second = fleet_boot(env, "--json")
    return Booted(root, env, first, second, before, house)


def test_first_boot_installs_and_configures(booted):
    log = booted.first.stderr
    assert f"installed wheelhouse {booted.house.version} (celery-fleet) in" in log
    venv_python = booted.root / "opt" / "venv" / "bin" / "python"
    assert venv_python.exists()
    # The worker reports the code it runs from the manifest in its venv.
    installed = json.loads((booted.root / "opt" / "venv" / WHEELHOUSE_MANIFEST).read_text())
    assert installed == booted.house.manifest
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
    assert f"unchanged: wheelhouse {booted.house.version} is installed" in booted.second.stderr
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


def test_fetch_artifact_mirrors_s3_and_wants_a_wheelhouse(tmp_path):
    house = wheelhouse()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "aws").write_text(
        f'#!/bin/bash\necho "$*" >>{tmp_path}/calls\ncp {house.directory}/* "${{@: -1}}"\n'
    )
    (fake / "aws").chmod(0o755)
    env = host_env(tmp_path, PATH=f"{fake}:{os.environ['PATH']}")
    result = bash("fetch_artifact s3://bucket/artifacts/abc/", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path}/opt/wheels"
    assert (
        (tmp_path / "calls")
        .read_text()
        .startswith(
            f"s3 sync --only-show-errors --delete s3://bucket/artifacts/abc/ {tmp_path}/opt/wheels/"
        )
    )
    assert bash(f"fetch_artifact {house.directory}", env).stdout.strip() == str(house.directory)
    # A wheel alone, or a directory of wheels without the manifest, is no wheelhouse.
    (tmp_path / "loose").mkdir()
    shutil.copy(house.wheels[0], tmp_path / "loose")
    for artifact in (tmp_path / "loose", house.wheels[0]):
        refused = bash(f"fetch_artifact {artifact}", env)
        assert refused.returncode != 0
        assert f"no wheelhouse at {artifact} (no {WHEELHOUSE_MANIFEST})" in refused.stderr
        assert "fleet package" in refused.stderr


# -- a boot that fails: retries, then fail_boot (tag, Unhealthy) -------------------

INSTANCE_ID = "i-0fa11ed0b00700000"


@pytest.fixture
def imds():
    """IMDSv2 on a loopback port: a token from PUT, then instance-id and region with it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = {
        "instance-id": INSTANCE_ID,
        "placement/region": "eu-west-1",
        # As soon as the instance is reported Unhealthy: the group holds it in its hook.
        "autoscaling/target-lifecycle-state": "Terminated",
    }

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            ok = self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            )
            self.reply(200 if ok else 400, "token-1" if ok else "")

        def do_GET(self) -> None:
            if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                return self.reply(401, "")
            value = data.get(self.path.removeprefix("/latest/meta-data/"))
            self.reply(404, "") if value is None else self.reply(200, value)

        def reply(self, code: int, body: str) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def fake_aws(tmp_path):
    """`aws` and `dnf` on a PATH of their own that record their argv (one tab-separated line a
    call, in calls-aws / calls-dnf) and fail their first $FAKE_S3_FAILURES `s3 sync`s (and
    $FAKE_DNF_FAILURES installs); a sync that succeeds copies $FAKE_S3_SOURCE."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, failing in (("aws", "S3"), ("dnf", "DNF")):
        script = bin_dir / name
        script.write_text(
            textwrap.dedent(f"""\
            #!/bin/bash
            (IFS=$'\\t'; echo "$*") >>{tmp_path}/calls-{name}
            if [[ "{name}" == dnf || "$1 $2" == "s3 sync" ]]; then
                n=$(cat {tmp_path}/count-{name} 2>/dev/null || echo 0)
                echo $((n + 1)) >{tmp_path}/count-{name}
                if ((n < ${{FAKE_{failing}_FAILURES:-0}})); then
                    echo "fake {name}: failing on purpose" >&2
                    exit 1
                fi
                [[ "{name}" == aws ]] && cp "$FAKE_S3_SOURCE"/* "${{@: -1}}"
            fi
            case "$*" in
            *describe-auto-scaling-instances*) echo fleet-group ;;
            *describe-lifecycle-hooks*) echo fleet-drain ;;
            esac
            exit 0
            """)
        )
        script.chmod(0o755)

    def calls(name: str = "aws") -> list[list[str]]:
        """The calls since the last look."""
        path = tmp_path / f"calls-{name}"
        lines = path.read_text().splitlines() if path.exists() else []
        path.unlink(missing_ok=True)
        return [line.split("\t") for line in lines]

    calls.path = f"{bin_dir}:{os.environ['PATH']}"  # type: ignore[attr-defined]
    return calls


def failing_host(tmp_path: Path, fake_aws, imds_url: str, **extra: str) -> dict[str, str]:
    root = tmp_path / "host"
    (root / "run").mkdir(parents=True)
    env = host_env(
        root,
        PATH=fake_aws.path,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds_url,
        FLEET_BOOT_ATTEMPTS="3",
        FLEET_BOOT_BACKOFF="0",
        FLEET_BOOT_RELEASE_SECONDS="3",
    )
    env.update(extra)
    return env


def test_boot_retries_failing_steps_and_completes(fleet, tmp_path, fake_aws, imds):
    settings = write_settings(fleet.settings, tmp_path / "settings.env")
    house = wheelhouse()
    env = failing_host(
        tmp_path,
        fake_aws,
        imds,
        FLEET_ARTIFACT="s3://bucket/artifacts/abc/",
        FLEET_SETTINGS_FILE=str(settings),
        FAKE_S3_SOURCE=str(house.directory),
        FAKE_S3_FAILURES="2",
        FAKE_DNF_FAILURES="1",
    )
    result = fleet_boot(env)
    assert result.returncode == 0, result.stderr
    calls = fake_aws()
    syncs = [c for c in calls if c[:2] == ["s3", "sync"]]
    assert len(syncs) == 3, "two failures, then the sync that worked"
    assert "attempt 2 of 3 failed (exit 1), again in 0 s: aws s3 sync" in result.stderr
    install = ["install", "-y", "--quiet", "--setopt=timeout=20", "--setopt=retries=1"]
    assert fake_aws("dnf") == [[*install, "amazon-cloudwatch-agent"]] * 2
    assert f"installed wheelhouse {house.version}" in result.stderr
    assert "boot failed" not in result.stderr
    assert calls == syncs, "a boot that worked tags nothing, reports nothing"


def test_boot_that_keeps_failing_tags_the_instance_and_reports_it_unhealthy(
    tmp_path, fake_aws, imds
):
    env = failing_host(
        tmp_path, fake_aws, imds, FLEET_ARTIFACT="s3://bucket/artifacts/abc/", FAKE_S3_FAILURES="99"
    )
    env.pop("AWS_DEFAULT_REGION", None)  # then the region comes from instance metadata
    result = fleet_boot(env)
    assert result.returncode != 0
    calls = fake_aws()
    syncs = [c for c in calls if c[:2] == ["s3", "sync"]]
    assert len(syncs) == 3, "FLEET_BOOT_ATTEMPTS tries, no more"
    reason = (
        "aws s3 sync --only-show-errors --delete s3://bucket/artifacts/abc/ "
        f"{env['FLEET_APP_DIR']}/wheels/ failed 3 times (exit 1)"
    )
    assert f"fleet-boot: boot failed: {reason}" in result.stderr
    tag, health, find_group, find_hook, release = calls[3:]
    assert tag[:6] == ["--region", "eu-west-1", "ec2", "create-tags", "--resources", INSTANCE_ID]
    assert tag[6] == "--tags"
    assert json.loads(tag[7]) == [{"Key": "celery-fleet:boot-error", "Value": reason}]
    assert health == [
        "--region",
        "eu-west-1",
        "autoscaling",
        "set-instance-health",
        "--instance-id",
        INSTANCE_ID,
        "--health-status",
        "Unhealthy",
        "--no-should-respect-grace-period",
    ]
    # No drain agent runs to let the termination hook go: the failed boot does, at once.
    assert find_group[2:5] == ["autoscaling", "describe-auto-scaling-instances", "--instance-ids"]
    assert find_hook[2:6] == [
        "autoscaling",
        "describe-lifecycle-hooks",
        "--auto-scaling-group-name",
        "fleet-group",
    ]
    assert release == [
        "--region",
        "eu-west-1",
        "autoscaling",
        "complete-lifecycle-action",
        "--auto-scaling-group-name",
        "fleet-group",
        "--lifecycle-hook-name",
        "fleet-drain",
        "--instance-id",
        INSTANCE_ID,
        "--lifecycle-action-result",
        "CONTINUE",
    ]
    assert f"let fleet-drain go: {INSTANCE_ID} terminates now" in result.stderr


def python_boot_env(booted, fake_aws, imds, settings_file: Path) -> dict[str, str]:
    """A second boot of the booted host on "EC2" (fake aws CLI, metadata stand-in), with
    the app installed already (straight to app.boot) and `settings_file`, failing fast."""
    env = dict(
        booted.env,
        PATH=fake_aws.path,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds,
        AWS_DEFAULT_REGION="us-east-2",
        FLEET_SETTINGS_FILE=str(settings_file),
        FLEET_BOOT_ATTEMPTS="2",
        FLEET_BOOT_BACKOFF="0",
        FLEET_BOOT_RELEASE_SECONDS="3",
    )
    env.pop("FLEET_ARTIFACT")
    return env


def test_python_failure_of_the_boot_goes_through_fail_boot_too(booted, tmp_path, fake_aws, imds):
    env = python_boot_env(booted, fake_aws, imds, tmp_path / "missing.env")
    result = fleet_boot(env)
    assert result.returncode == 1, result.stderr
    reason = f"app.boot: settings file {tmp_path}/missing.env does not exist."
    assert f"boot failed: {reason}" in result.stderr
    tag, health, *release = fake_aws()
    assert release[-1][2:4] == ["autoscaling", "complete-lifecycle-action"]
    assert tag[:2] == ["--region", "us-east-2"] and tag[2:4] == ["ec2", "create-tags"]
    assert json.loads(tag[-1])[0]["Value"] == reason
    assert health[2:6] == ["autoscaling", "set-instance-health", "--instance-id", INSTANCE_ID]
    # A command that is not a boot (`fleet ops` runs these) never marks the instance.
    status = fleet_boot(dict(env, FLEET_ENV_FILE=str(tmp_path / "no-env")), "status")
    assert status.returncode != 0 and fake_aws() == []


def test_failing_boot_off_ec2_only_logs(tmp_path, fake_aws):
    from scripts.local.processes import free_port

    nothing = f"http://127.0.0.1:{free_port()}"  # no metadata service answers here
    env = failing_host(tmp_path, fake_aws, nothing, FLEET_ARTIFACT=str(tmp_path / "none"))
    result = fleet_boot(env)
    assert result.returncode == 1
    assert f"boot failed: no wheelhouse at {tmp_path}/none (no " in result.stderr
    assert "not on EC2 (no instance metadata" in result.stderr
    assert fake_aws() == []


def test_cloudwatch_agent_install_is_skipped_without_dnf(tmp_path):
    if shutil.which("dnf"):
        pytest.skip("this machine has dnf")
    result = bash("install_cloudwatch_agent && echo done", host_env(tmp_path))
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr
    assert "no dnf: not installing the CloudWatch agent" in result.stderr


def test_units_that_append_to_log_files_verify_with_systemd(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    layout = HostPaths(tmp_path, tmp_path / "env", tmp_path, tmp_path, tmp_path / "log")
    env = {"FLEET_QUEUE": "q", "FLEET_CONCURRENCY": "4", "FLEET_NODE_NAME": "n@h"}
    (tmp_path / "env").write_text(render_env(env))
    worker = worker_unit(layout, env, sys.executable, "root", tmp_path / "log" / "worker.log")
    agent = agent_unit(layout, env, sys.executable, tmp_path / "log" / "agent.log")
    for name, text in ((WORKER_UNIT, worker), (AGENT_UNIT, agent)):
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            [analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert not result.stderr.strip(), result.stderr  # no "Unknown key" warnings either
    assert f"StandardOutput=append:{tmp_path}/log/worker.log" in worker.splitlines()


def test_a_cloudwatch_agent_that_will_not_install_does_not_fail_the_boot(tmp_path, fake_aws):
    env = host_env(tmp_path, PATH=fake_aws.path, FAKE_DNF_FAILURES="99", FLEET_BOOT_BACKOFF="0")
    env["FLEET_BOOT_ATTEMPTS"] = "2"
    result = bash(
        'REASON_FILE=$(mktemp); install_cloudwatch_agent; echo "rc=$? reason=$(<"$REASON_FILE")"',
        env,
    )
    assert result.stdout == "rc=0 reason=\n", result.stderr
    assert len(fake_aws("dnf")) == 2
    assert "could not install the CloudWatch agent" in result.stderr


def test_a_task_module_that_will_not_import_stops_the_boot_naming_it(
    booted, tmp_path, fake_aws, imds
):
    settings = tmp_path / "settings.env"
    original = Path(booted.env["FLEET_SETTINGS_FILE"]).read_text()
    settings.write_text(original + "FLEET_INCLUDE=nosuch_project.tasks\n")
    result = fleet_boot(python_boot_env(booted, fake_aws, imds, settings))
    assert result.returncode == 1, result.stderr
    reason = (
        "app.boot: task module nosuch_project.tasks (FLEET_INCLUDE) cannot be imported: "
        "ModuleNotFoundError: No module named 'nosuch_project'."
    )
    assert reason in result.stderr
    tag, health, *_ = fake_aws()
    assert json.loads(tag[-1])[0]["Value"].startswith(reason)
    assert health[2:4] == ["autoscaling", "set-instance-health"]


def test_a_projects_task_module_that_will_not_import_stops_a_fresh_boot(
    fleet, tmp_path, fake_aws, imds
):
    """The user's project, shipped in the wheelhouse, declares a task module that needs a
    package it forgot to depend on: the boot installs it, then stops naming the module,
    the project and the exception, and the instance is tagged and reported unhealthy."""
    project = write_project(
        tmp_path / "proj",
        "forgetful-proj",
        {"forgetful/__init__.py": "", "forgetful/tasks.py": "import not_a_dependency\n"},
        tasks=["forgetful.tasks"],
    )
    house = wheelhouse(project)
    settings = write_settings(fleet.settings, tmp_path / "settings.env")
    env = failing_host(
        tmp_path,
        fake_aws,
        imds,
        FLEET_ARTIFACT=str(house.directory),
        FLEET_SETTINGS_FILE=str(settings),
    )
    result = fleet_boot(env)
    assert result.returncode == 1, result.stderr
    assert f"installed wheelhouse {house.version} (celery-fleet forgetful-proj)" in result.stderr
    reason = (
        "app.boot: task module forgetful.tasks (project forgetful-proj, entry point group "
        "celery_fleet.tasks) cannot be imported: ModuleNotFoundError: No module named "
        "'not_a_dependency'."
    )
    assert reason in result.stderr
    calls = fake_aws()
    tag = next(c for c in calls if c[2:4] == ["ec2", "create-tags"])
    assert json.loads(tag[-1])[0]["Value"].startswith(reason)
    assert any(c[2:4] == ["autoscaling", "set-instance-health"] for c in calls)
    assert not (tmp_path / "host" / "run" / "worker.pid").exists(), "no worker was started"
