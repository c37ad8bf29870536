"""The Ansible role: production lint, and a real converge on this machine, twice.

The converge copies this checkout's wheelhouse from the controller over the
leftovers of an earlier one, installs it, and reads settings from a file that
points at a local fleet with no worker of its own. systemd is not PID 1 here:
the role must say so and skip only the systemd steps. Then the worker it
configured is started from its environment file and must process a job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.host.envfile import parse_env
from app.names import WORKER_UNIT, code_version
from scripts.local.fleet import LocalFleet
from tests.support.paths import ROOT
from tests.support.worker_host import (
    NO_COMPILE,
    host_env,
    run_job,
    wait_worker,
    wheelhouse,
)

pytestmark = pytest.mark.timeout(300)

ANSIBLE = ROOT / "ansible"
ROLE = ANSIBLE / "roles" / "celery_fleet_worker"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (pip: the dev extras of pyproject.toml)")
    return str(path)


def test_ansible_lint_production_profile_passes():
    result = subprocess.run(
        [tool("ansible-lint"), "--profile", "production", "--nocolor"],
        cwd=ANSIBLE,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_every_role_variable_is_documented_and_prefixed():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    assert all(name.startswith("celery_fleet_worker_") for name in defaults)
    for name, value in defaults.items():
        assert options[name]["default"] == value, name
    internal = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert all(name.startswith("_celery_fleet_worker_") for name in internal)
    for template in (ROLE / "templates").glob("*.j2"):
        assert template.read_text().startswith("{{ ansible_managed | comment }}")


def recap(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.startswith("localhost "))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.fixture(scope="module")
def converged(tmp_path_factory):
    """A fleet, and the role run twice against this machine; (fleet, root, first, second)."""
    root = tmp_path_factory.mktemp("ansible-host")
    # What an earlier wheelhouse left: the copy of this one removes it.
    (root / "opt" / "wheels").mkdir(parents=True)
    (root / "opt" / "wheels" / "celery_fleet-0.0.1-py3-none-any.whl").write_bytes(b"old")
    with LocalFleet(0, "redis", workdir=root / "fleet") as fleet:
        inventory = root / "inventory.yml"
        inventory.write_text(
            yaml.safe_dump(
                {
                    "celery_fleet_workers": {
                        "hosts": {
                            "localhost": {
                                "ansible_connection": "local",
                                "ansible_python_interpreter": sys.executable,
                            }
                        },
                        "vars": {
                            # On the controller: the role copies it to the host.
                            "celery_fleet_worker_wheelhouse": str(wheelhouse().directory),
                            "celery_fleet_worker_python": sys.executable,
                            # As a dict: the role templates it into <etc>/settings.env.
                            "celery_fleet_worker_settings": fleet.settings.as_env(),
                            "celery_fleet_worker_node_name": "ansible@test",
                            "celery_fleet_worker_app_dir": str(root / "opt"),
                            "celery_fleet_worker_etc_dir": str(root / "etc"),
                            "celery_fleet_worker_systemd_dir": str(root / "systemd"),
                            "celery_fleet_worker_boot_script": str(root / "sbin" / "fleet-boot"),
                        },
                    }
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(
            NO_COMPILE,
            ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_LOCAL_TEMP=str(root / "tmp"),
            ANSIBLE_REMOTE_TEMP=str(root / "tmp"),
        )
        runs = []
        for _ in range(2):
            result = subprocess.run(
                [tool("ansible-playbook"), "-i", str(inventory), "playbooks/worker.yml"],
                cwd=ANSIBLE,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
            runs.append(result.stdout)
        yield fleet, root, runs[0], runs[1]


def test_first_converge_installs_and_configures_without_systemd(converged):
    fleet, root, first, _ = converged
    assert recap(first)["changed"] >= 3 and recap(first)["failed"] == 0
    assert (root / "opt" / "venv" / "bin" / "python").exists()
    house = wheelhouse()
    assert code_version(str(root / "opt" / "venv")) == house.version
    assert {p.name for p in (root / "opt" / "wheels").iterdir()} == {p.name for p in house.files}
    assert (root / "sbin" / "fleet-boot").read_text() == (
        ROOT / "scripts" / "fleet-boot.sh"
    ).read_text()
    env_file = root / "etc" / "env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert parse_env(env_file.read_text())["FLEET_NODE_NAME"] == "ansible@test"
    assert (root / "systemd" / WORKER_UNIT).exists(), "units are written all the same"
    settings = root / "etc" / "settings.env"
    assert settings.stat().st_mode & 0o777 == 0o600
    assert settings.read_text().startswith("#")  # {{ ansible_managed | comment }}
    assert parse_env(settings.read_text()) == fleet.settings.as_env()
    # Not systemd here, and the role says so rather than starting anything.
    assert "systemd is not the service manager here" in first


def test_second_converge_changes_nothing(converged):
    _, _, _, second = converged
    counts = recap(second)
    assert counts["changed"] == 0 and counts["failed"] == 0, second[-3000:]


def test_the_configured_worker_processes_a_job(converged, tmp_path):
    fleet, root, _, _ = converged
    env = host_env(root, FLEET_APP_DIR=str(root / "opt"))
    python = str(root / "opt" / "venv" / "bin" / "python")

    def boot_cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, "-m", "app.boot", *args],
            env=env,
            cwd=root / "opt",
            capture_output=True,
            text=True,
            timeout=120,
        )

    started = boot_cmd("start")
    assert started.returncode == 0, started.stderr
    try:
        info = wait_worker(fleet.settings, "ansible@test")
        assert info["concurrency"] == len(os.sched_getaffinity(0))
        summary = run_job(fleet.settings, tmp_path / "out.jsonl", n=300)
        assert (summary.status, summary.items, summary.errors) == ("ok", 300, 0)
        status = json.loads(boot_cmd("status", "--json").stdout)
        assert status["online"] and status["manager"] == "pidfile"
    finally:
        drained = boot_cmd("drain")
    assert drained.returncode == 0, drained.stderr
    assert not json.loads(boot_cmd("status", "--json").stdout)["running"]
    shutil.rmtree(root / "tmp", ignore_errors=True)
