"""The workers' user-data and boot script, checked by the tools that run them.

cloud-init and shellcheck come from Debian packages (cloud-init, shellcheck);
a test skips only when its tool is absent. The boot script itself (and the
units app/host/units.py writes) run for real in tests/integration/test_boot.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from infra.config import StackConfig
from infra.userdata import BOOT_SCRIPT, MAX_USER_DATA, render_user_data


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package in the CI setup)")
    return path


@pytest.fixture(scope="module")
def user_data(run_stack) -> str:
    return run_stack(StackConfig(stack="test", broker="rabbitmq", result_store="redis")).user_data


def test_user_data_is_valid_cloud_config(user_data, tmp_path):
    cloud_init = need("cloud-init")
    path = tmp_path / "user-data"
    path.write_text(user_data)
    result = subprocess.run(
        [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_data_installs_the_repository_files(user_data):
    assert len(user_data.encode()) < MAX_USER_DATA
    document = yaml.safe_load(user_data)
    files = {f["path"]: f for f in document["write_files"]}
    assert files["/usr/local/sbin/fleet-boot"]["content"] == BOOT_SCRIPT.read_text()
    assert files["/usr/local/sbin/fleet-boot"]["permissions"] == "0755"
    assert document["runcmd"] == [["/usr/local/sbin/fleet-boot"]]


def test_boot_env_values_are_quoted():
    rendered = render_user_data(
        {"FLEET_ARTIFACT": "s3://b/a b/", "AWS_DEFAULT_REGION": "eu-west-1"}
    )
    content = yaml.safe_load(rendered)["write_files"][0]["content"]
    assert content == "AWS_DEFAULT_REGION=eu-west-1\nFLEET_ARTIFACT='s3://b/a b/'\n"


def test_boot_script_passes_shellcheck():
    shellcheck = need("shellcheck")
    result = subprocess.run([shellcheck, str(BOOT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
