"""Running an ops task on many hosts: a few at a time, stopping after a failing group."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scripts.ops.hosts import Hosts

if TYPE_CHECKING:
    from fabric import Connection


@dataclass
class Outcome:
    host: str
    ok: bool | None  # None: not run (an earlier failure stopped the roll)
    result: Any = None
    error: str = ""
    started: float | None = None
    finished: float | None = None


def rolling(
    hosts: Hosts,
    task: Callable[..., Any],
    *args: Any,
    at_a_time: int = 1,
    say: Callable[[str], None] = lambda _: None,
    **kwargs: Any,
) -> list[Outcome]:
    """Run `task` on `at_a_time` hosts at once, group after group; stop after a failing group."""
    outcomes = [Outcome(h.address, None) for h in hosts.hosts]

    def one(index: int) -> None:
        outcome, host = outcomes[index], hosts.hosts[index]
        outcome.started = time.time()
        try:
            outcome.result = hosts.on(host, task, *args, **kwargs)
            outcome.ok = True
        except Exception as exc:
            outcome.ok, outcome.error = False, describe(exc)
        outcome.finished = time.time()
        say(f"{host.address}: {'ok' if outcome.ok else 'FAILED: ' + outcome.error}")

    for first in range(0, len(hosts.hosts), at_a_time):
        group = range(first, min(first + at_a_time, len(hosts.hosts)))
        with ThreadPoolExecutor(len(group)) as pool:
            list(pool.map(one, group))
        if any(outcomes[i].ok is False for i in group):
            left = len(hosts.hosts) - group[-1] - 1
            if left:
                say(f"stopping: {left} host(s) not touched")
            break
    return outcomes


def everywhere(hosts: Hosts, task: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Outcome]:
    """Run `task` on every host at once."""
    return rolling(hosts, task, *args, at_a_time=max(1, len(hosts.hosts)), **kwargs)


def describe(exc: Exception) -> str:
    result = getattr(exc, "result", None)  # invoke's UnexpectedExit carries the command's output
    if result is not None:
        text = [
            line for line in (result.stderr or result.stdout or "").splitlines() if line.strip()
        ]
        # The first line says what failed; the last ones (a log tail) say why.
        shown = text if len(text) <= 5 else [text[0], "...", *text[-3:]]
        return f"exit {result.exited}: " + (" | ".join(shown) if shown else result.command)
    return f"{type(exc).__name__}: {exc}"


def label(c: Connection) -> str:
    """The host as the operator named it: host, or host:port off port 22."""
    return c.original_host if c.port == 22 else f"{c.original_host}:{c.port}"


class Prefixed:
    """A stream that writes whole lines, each prefixed with the host, under one lock."""

    lock = threading.Lock()

    def __init__(self, host: str, out=None) -> None:
        self.host = host
        self.out = out or sys.stdout
        self.partial = ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        if lines:
            with self.lock:
                self.out.write("".join(f"{self.host} | {line}\n" for line in lines))
                self.out.flush()
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self.write("\n")
