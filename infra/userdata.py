"""The workers' user-data: a cloud-config that installs the boot script from scripts/ and runs it.

User-data is readable by anything on the instance and by anyone with
ec2:DescribeInstanceAttribute, so it carries only where to find things (the
SSM prefix, the artifact's S3 URI, the region); the boot script fetches
settings and secrets from Parameter Store at boot. The systemd units are
written by the app itself (app/host/), the same way on every kind of host.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BOOT_SCRIPT = SCRIPTS / "fleet-boot.sh"

BOOT_ENV_PATH = "/etc/celery-fleet/boot.env"
BOOT_SCRIPT_PATH = "/usr/local/sbin/fleet-boot"
# EC2 refuses user-data above 16 KiB (before base64).
MAX_USER_DATA = 16 * 1024


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as YAML literal blocks, so the scripts stay readable in the console."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def render_user_data(boot_env: Mapping[str, str]) -> str:
    """The #cloud-config document; `boot_env` becomes /etc/celery-fleet/boot.env."""
    env_file = "".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(boot_env.items()))
    document = {
        "write_files": [
            {"path": BOOT_ENV_PATH, "permissions": "0644", "content": env_file},
            {"path": BOOT_SCRIPT_PATH, "permissions": "0755", "content": BOOT_SCRIPT.read_text()},
        ],
        "runcmd": [[BOOT_SCRIPT_PATH]],
    }
    rendered = "#cloud-config\n" + yaml.dump(
        document, Dumper=_BlockDumper, sort_keys=False, width=1000
    )
    if len(rendered.encode()) > MAX_USER_DATA:
        raise ValueError(
            f"user-data is {len(rendered.encode())} bytes; EC2 accepts {MAX_USER_DATA}."
        )
    return rendered
