"""The `fleet` command in tests: a process of its own, pointed at a fleet's servers."""

from __future__ import annotations

import os
import subprocess

from app.settings import Settings
from tests.support.paths import FLEET_BIN, ROOT


def fleet_cmd(
    settings: Settings, *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`fleet ARGS --broker --backend` of `settings`; never a local fleet's state, nor the
    FLEET_*/CELERY_* variables of the test's own environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env["FLEET_STATE_DIR"] = "/nonexistent/celery-fleet-test"
    return subprocess.run(
        [str(FLEET_BIN), *args, "--broker", settings.broker_url, "--backend", settings.result_url],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
