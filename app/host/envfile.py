"""The host's environment file: FLEET_* settings as systemd's EnvironmentFile reads them."""

from __future__ import annotations

import contextlib
import os
import string
from collections.abc import Mapping
from pathlib import Path

from app.settings import ConfigError

# The first line of every file app.boot writes.
HEADER = "Written by `python -m app.boot` (celery-fleet): edits are overwritten."

# Characters systemd's EnvironmentFile and read_env take without quotes.
_PLAIN = frozenset(string.ascii_letters + string.digits + "_@%+=:,./~?&!*^-")
# Inside double quotes systemd un-escapes exactly these after a backslash.
_ESCAPED = '\\"`$'


def render_env(env: Mapping[str, str]) -> str:
    lines = [f"# {HEADER}"]
    for key in sorted(env):
        value = env[key]
        if "\n" in value or "\r" in value:
            raise ConfigError(f"{key} holds a line break; an environment file cannot carry it.")
        if set(value) <= _PLAIN:
            lines.append(f"{key}={value}")
        else:
            quoted = "".join("\\" + c if c in _ESCAPED else c for c in value)
            lines.append(f'{key}="{quoted}"')
    return "\n".join(lines) + "\n"


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them (plain, or double-quoted with escapes)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key.startswith("export "):
            key = key[len("export ") :].strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            out, chars = [], iter(value[1:-1])
            for c in chars:
                out.append(next(chars, "") if c == "\\" else c)
            value = "".join(out)
        elif len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key] = value
    return env


def read_env(path: Path) -> dict[str, str]:
    try:
        return parse_env(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist; run `python -m app.boot` (configure) first."
        ) from None


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write `text` to `path` atomically unless it already holds exactly that; True if written."""
    try:
        if path.read_text() == text and path.stat().st_mode & 0o777 == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # Created with its final mode: the environment file holds secrets from the first byte.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # the umask may have taken bits away
    os.replace(tmp, path)
    return True
