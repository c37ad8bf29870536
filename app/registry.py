"""Which functions a job may name, and how the workers find them.

A job names its per-item function by a string that arrives over the broker,
so anyone who can publish to the broker controls that string. Resolving it
with a plain import would let them call `os:system`. Only functions
registered with `@fleet_task`, or defined (not merely imported) in a module
the workers were told to load, can be named.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload


class UnknownTask(LookupError):
    """The job named a function the workers may not run."""


@dataclass(frozen=True)
class FleetTask:
    fn: Callable[[Any], Any]
    name: str
    # Exceptions worth retrying for the same item (a flaky network call, say).
    transient: tuple[type[BaseException], ...] = ()
    retries: int = 3

    @property
    def qualified(self) -> str:
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


_REGISTRY: dict[str, FleetTask] = {}

F = TypeVar("F", bound=Callable[[Any], Any])


# Bare, it returns the function; with options, the decorator that does.
@overload
def fleet_task(
    fn: F,
    *,
    name: str | None = ...,
    transient: Iterable[type[BaseException]] = ...,
    retries: int = ...,
) -> F: ...
@overload
def fleet_task(
    fn: None = None,
    *,
    name: str | None = ...,
    transient: Iterable[type[BaseException]] = ...,
    retries: int = ...,
) -> Callable[[F], F]: ...
def fleet_task(
    fn: F | None = None,
    *,
    name: str | None = None,
    transient: Iterable[type[BaseException]] = (),
    retries: int = 3,
) -> F | Callable[[F], F]:
    """Register a per-item function for fleet jobs; usable bare or with options.

        @fleet_task
        def process_id(item): ...

        @fleet_task(transient=[TimeoutError], retries=5)
        def fetch(item): ...

    The function stays a plain function: calling it directly is unchanged.
    """

    def register(f: F) -> F:
        task = FleetTask(f, name or f.__name__, tuple(transient), retries)
        for key in (task.name, task.qualified):
            existing = _REGISTRY.get(key)
            if existing is not None and existing.qualified != task.qualified:
                raise ValueError(f"fleet task name {key!r} is already used by {existing.qualified}")
            _REGISTRY[key] = task
        return f

    return register(fn) if fn is not None else register


def registered_name(fn: Callable[..., Any]) -> str | None:
    """The name `fn` is registered under with @fleet_task, or None."""
    for task in _REGISTRY.values():
        if task.fn is fn:
            return task.name
    return None


def registered_names() -> list[str]:
    return sorted({t.name for t in _REGISTRY.values()})


# A task name's prefix says how each item is passed (app.fleet): "*" spreads it as the
# positional arguments (Pool.starmap), "**" as [args, kwargs] (Executor.submit).
STAR, STARSTAR = "*", "**"
_spread: dict[str, FleetTask] = {}


def _spread_call(task: FleetTask, kind: str) -> FleetTask:
    fn = task.fn
    if kind == STARSTAR:

        def call(item: Any) -> Any:
            args, kwargs = item
            return fn(*args, **kwargs)

    else:

        def call(item: Any) -> Any:
            return fn(*item)

    return FleetTask(call, kind + task.name, task.transient, task.retries)


def resolve(name: str, allowed_modules: Iterable[str]) -> FleetTask:
    """The task `name` refers to, or UnknownTask if the workers may not run it."""
    task = _REGISTRY.get(name)
    if task is not None:
        return task
    if name.startswith(STAR):
        task = _spread.get(name)
        if task is None:
            kind = STARSTAR if name.startswith(STARSTAR) else STAR
            task = _spread_call(resolve(name[len(kind) :], allowed_modules), kind)
            if len(_spread) < 1000:
                _spread[name] = task
        return task
    module_name, sep, attr = name.partition(":")
    allowed = set(allowed_modules)
    if sep and module_name in allowed and attr and not attr.startswith("_") and "." not in attr:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        # Defined in that module, not imported into it: `mymod:system` after
        # `from os import system` must not resolve.
        if inspect.isfunction(fn) and fn.__module__ == module_name:
            return FleetTask(fn, name)
    known = ", ".join(registered_names()) or "(none)"
    raise UnknownTask(
        f"unknown task {name!r}: the workers run only functions registered with @fleet_task "
        f"({known}) or defined in an included module ({', '.join(sorted(allowed)) or 'none'}) "
        f"named as module:function."
    )
