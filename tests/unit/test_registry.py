"""Which functions a job may name: registered ones, or ones defined in an allowed module."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import tests.support.fleet_tasks as fleet_tasks
from app import registry
from app import tasks as example_tasks
from app.registry import FleetTask, UnknownTask, fleet_task, registered_names, resolve

ALLOWED = ("tests.support.fleet_tasks",)


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test registers into a copy; the process-wide registry is restored after."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_bare_decorator_registers_and_keeps_the_function():
    def triple(item):
        return item * 3

    assert fleet_task(triple) is triple
    assert triple(2) == 6
    task = resolve("triple", ())
    assert isinstance(task, FleetTask)
    assert task.fn is triple
    assert task.name == "triple"
    assert (task.transient, task.retries) == ((), 3)
    assert "triple" in registered_names()


def test_decorator_with_options():
    @fleet_task(name="fetch_it", transient=[TimeoutError, ConnectionError], retries=5)
    def fetch(item):
        return f"got {item}"

    assert fetch(1) == "got 1"  # still a plain function
    task = resolve("fetch_it", ())
    assert task.fn is fetch
    assert task.transient == (TimeoutError, ConnectionError)
    assert task.retries == 5
    with pytest.raises(UnknownTask):
        resolve("fetch", ())  # registered under its given name only


def test_registered_under_module_qualname_too():
    @fleet_task
    def quad(item):
        return item * 4

    qualified = f"{__name__}:{quad.__qualname__}"
    assert resolve(qualified, ()).fn is quad
    assert resolve(qualified, ()).qualified == qualified


def test_registering_the_same_function_again_is_harmless():
    def again(item):
        return item

    fleet_task(again)
    fleet_task(again)
    assert resolve("again", ()).fn is again


def test_name_clash_is_an_error_naming_the_owner():
    with pytest.raises(ValueError) as info:

        @fleet_task(name="echo")
        def other_echo(item):
            return item

    assert "'echo'" in str(info.value)
    assert "tests.support.fleet_tasks:echo" in str(info.value)
    # The original stays registered.
    assert resolve("echo", ()).fn is fleet_tasks.echo


def test_name_clash_between_two_new_functions():
    @fleet_task(name="dup")
    def first(item):
        return 1

    with pytest.raises(ValueError, match="already used"):

        @fleet_task(name="dup")
        def second(item):
            return 2

    assert resolve("dup", ()).fn is first


def test_resolves_the_test_tasks():
    for name in ("echo", "double", "poison", "slow", "tests.support.fleet_tasks:echo"):
        assert resolve(name, ()).fn(4) is not None
    assert resolve("process_id", ("app.tasks",)).fn is example_tasks.process_id


def test_resolves_a_plain_function_defined_in_an_allowed_module():
    task = resolve("tests.support.fleet_tasks:defined_here", ALLOWED)
    assert task.fn is fleet_tasks.defined_here
    assert task.fn(3) == "plain-3"
    assert task.transient == ()


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("os:system", ()),
        ("os:system", ("os",)),  # a builtin, not a function defined there
        ("subprocess:run", ("tests.support.fleet_tasks",)),  # module not allowed
        # imported into an allowed module, not defined there
        ("tests.support.fleet_tasks:system", ALLOWED),
        ("tests.support.fleet_tasks:defined_here", ()),  # allowed list empty
        # a parent package is not the module
        ("tests.support.fleet_tasks:defined_here", ("tests.support",)),
        ("tests.support.fleet_tasks:shared_task", ALLOWED),  # imported from celery
        ("tests.support.fleet_tasks:fleet_task", ALLOWED),  # imported from app.registry
        ("tests.support.fleet_tasks:os", ALLOWED),  # a module, not a function
        ("tests.support.fleet_tasks:_private", ALLOWED),
        ("tests.support.fleet_tasks:__import__", ALLOWED),
        ("tests.support.fleet_tasks:defined_here.__globals__", ALLOWED),
        ("tests.support.fleet_tasks:missing", ALLOWED),
        ("tests.support.fleet_tasks:", ALLOWED),
        ("tests.support.fleet_tasks", ALLOWED),
        ("no_such_task", ALLOWED),
        ("", ALLOWED),
    ],
)
def test_refuses(name, allowed):
    with pytest.raises(UnknownTask) as info:
        resolve(name, allowed)
    msg = str(info.value)
    assert repr(name) in msg
    assert "@fleet_task" in msg


def test_private_name_in_an_allowed_module_is_refused_even_if_a_function(tmp_path, monkeypatch):
    (tmp_path / "fleet_reg_mod.py").write_text(
        textwrap.dedent("""
        def _helper(item):
            return item

        def public(item):
            return _helper(item)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert resolve("fleet_reg_mod:public", ("fleet_reg_mod",)).fn(5) == 5
        with pytest.raises(UnknownTask):
            resolve("fleet_reg_mod:_helper", ("fleet_reg_mod",))
    finally:
        sys.modules.pop("fleet_reg_mod", None)


def test_module_outside_the_allow_list_is_not_even_imported():
    sys.modules.pop("this", None)  # `import this` prints the Zen: a visible side effect
    with pytest.raises(UnknownTask):
        resolve("this:anything", ALLOWED)
    assert "this" not in sys.modules


def test_unknown_task_lists_what_is_available():
    with pytest.raises(UnknownTask) as info:
        resolve("nope", ALLOWED)
    msg = str(info.value)
    assert "echo" in msg and "double" in msg
    assert "tests.support.fleet_tasks" in msg


def test_refused_os_system_never_runs(monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda cmd: called.append(cmd))
    with pytest.raises(UnknownTask):
        resolve("os:system", ("os",)).fn("true")
    assert called == []
