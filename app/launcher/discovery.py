"""Which fleet a launcher talks to: one answer for `fleet run`, `fleet status` and Python.

In order: a deployed stack (its SSM parameters), then the URLs given as
arguments, then FLEET_* variables, then the local fleet that `fleet local`
runs on this machine (its state file, mode 0600, written by scripts/local).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.settings import Settings


def state_file(env: Mapping[str, str] | None = None) -> Path:
    """Where `fleet local` keeps the running local fleet's state."""
    env = os.environ if env is None else env
    base = env.get("FLEET_STATE_DIR") or os.path.join(
        env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "celery-fleet"
    )
    return Path(base) / "local.json"


def read_local_state() -> dict[str, Any] | None:
    """The running local fleet's state, or None if there is none (or it died)."""
    path = state_file()
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def resolve_settings(
    broker: str | None = None,
    backend: str | None = None,
    stack: str | None = None,
    **overrides: object,
) -> Settings:
    """A stack's SSM parameters; else `broker`/`backend`, then FLEET_* variables, then the
    local fleet. `overrides` (queue=..., say) win where they are not None."""
    if stack:
        from app.stack import settings_from_stack

        return settings_from_stack(stack, **overrides)
    env = dict(os.environ)
    if not (broker or env.get("FLEET_BROKER_URL")):
        state = read_local_state()
        if state is not None:
            env = {**state["env"], **{k: v for k, v in env.items() if k.startswith("FLEET_")}}
    return Settings.from_env(env, broker_url=broker, result_url=backend, **overrides)
