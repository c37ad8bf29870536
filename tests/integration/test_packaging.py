"""The wheel outside the checkout: installed with its operator extra into a fresh virtualenv,
offline, from a wheelhouse of the wheels it declares, its `fleet` commands run where no app/
is in sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.names import WHEELHOUSE_REQUIREMENTS
from tests.support.paths import ROOT
from tests.support.worker_host import wheelhouse

pytestmark = pytest.mark.timeout(240)

STACK_FILE = "config:\n  aws:region: us-east-1\n  celery-fleet:nat: none\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding the wheel and its operator extra, and nothing of the checkout."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    house = wheelhouse(extras=("aws", "operator"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # --no-compile: byte-compiling botocore and matplotlib is most of an install's time,
    # and these few commands need no .pyc files.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--quiet", "--disable-pip-version-check", "--no-index", "--no-compile",
         "--find-links", str(house.directory), "--require-hashes",
         "-r", str(house.directory / WHEELHOUSE_REQUIREMENTS)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return venv


def run(venv: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_code_comes_from_the_virtualenv(installed, tmp_path):
    # The operator extra's packages are there too.
    code = "import app, scripts, fabric, yaml, flower, matplotlib; print(app.__file__)"
    found = run(installed, tmp_path, "python", "-c", code)
    assert found.returncode == 0, found.stderr
    where = Path(found.stdout.strip())
    assert where.is_relative_to(installed) and not where.is_relative_to(ROOT), where


def test_fleet_help_lists_every_command(installed, tmp_path):
    shown = run(installed, tmp_path, "fleet", "--help")
    assert shown.returncode == 0, shown.stderr
    for command in ("cost", "demo", "local", "ops", "package", "run", "simulate", "status"):
        assert f"  {command} " in shown.stdout, shown.stdout
    assert run(installed, tmp_path, "fleet", "ops", "--help").returncode == 0


def test_fleet_cost_reads_a_stack_file_and_its_own_prices(installed, tmp_path):
    config = tmp_path / "Pulumi.dev.yaml"
    config.write_text(STACK_FILE)
    by_file = run(installed, tmp_path, "fleet", "cost", "--config", str(config), "--json")
    assert by_file.returncode == 0, by_file.stderr
    report = json.loads(by_file.stdout)
    assert report["region"] == "us-east-1" and report["idle_hourly"] > 0
    # --stack finds the file beside the project's Pulumi.yaml, from a folder below it.
    (tmp_path / "Pulumi.yaml").write_text("name: celery-fleet\nruntime: python\n")
    below = tmp_path / "sub"
    below.mkdir()
    by_stack = run(installed, below, "fleet", "cost", "--stack", "dev", "--json")
    assert by_stack.returncode == 0, by_stack.stderr
    assert json.loads(by_stack.stdout) == report


def test_fleet_simulate_prints_its_table_and_plots(installed, tmp_path):
    png = tmp_path / "plot.png"
    simulated = run(
        installed, tmp_path, "fleet", "simulate", "--items", "20000", "--max-instances", "5",
        "--plot", str(png),
    )  # fmt: skip
    assert simulated.returncode == 0, simulated.stderr
    assert "| autoscaled |" in simulated.stdout and "| ideal bound |" in simulated.stdout
    assert png.read_bytes().startswith(b"\x89PNG")


def test_fleet_package_needs_the_kits_sources(installed, tmp_path):
    """Installed from a wheel there are no sources to build the kit's wheel from: one line
    saying where to run it, exit code 2, nothing written."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "tasks.py").write_text("X = 1\n")
    out = tmp_path / "wheelhouse"
    packaged = run(installed, tmp_path, "fleet", "package", "proj", "--out", str(out))
    assert packaged.returncode == 2, packaged.stderr
    assert "installed from a wheel" in packaged.stderr and "clone" in packaged.stderr
    assert "Traceback" not in packaged.stderr and not out.exists()
