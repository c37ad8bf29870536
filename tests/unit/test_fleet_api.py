"""The Python API's refusals, before any fleet is reached: what cannot run on the workers,
and where no fleet is configured."""

from __future__ import annotations

import functools

import pytest

from app import fleet
from app.launcher.stream import remote_exception
from tests.support import fleet_tasks as tasks


@pytest.fixture
def no_fleet(monkeypatch, tmp_path):
    for name in ("FLEET_BROKER_URL", "FLEET_RESULT_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "no-state"))


@pytest.fixture
def some_fleet(monkeypatch, tmp_path):
    """A fleet named by FLEET_* variables; nothing here connects to it."""
    monkeypatch.setenv("FLEET_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("FLEET_RESULT_URL", "redis://127.0.0.1:1/1")
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "no-state"))


def test_a_lambda_is_refused_saying_how_to_fix_it(some_fleet):
    with pytest.raises(fleet.BadInput, match=r"a lambda cannot run .* top level of a module"):
        fleet.map(lambda x: x, [1])


def test_a_closure_is_refused(some_fleet):
    def inner(x):
        return x

    with pytest.raises(fleet.BadInput, match="inside another function"):
        fleet.map(inner, [1])


def test_a_function_of_main_is_refused(some_fleet):
    namespace: dict = {"__name__": "__main__"}
    exec("def heavy(x):\n    return x\n", namespace)
    with pytest.raises(fleet.BadInput, match=r"heavy is defined in __main__ .* workers load"):
        fleet.Pool().imap_unordered(namespace["heavy"], [1])
    # Registered with @fleet_task there, it is still only this process's.
    exec(
        "from app.registry import fleet_task\n"
        "@fleet_task(name='test-fleet-api-main-only')\n"
        "def registered(x):\n    return x\n",
        namespace,
    )
    with pytest.raises(fleet.BadInput, match=r"registered is defined in __main__"):
        fleet.map(namespace["registered"], [1])


def test_other_callables_are_refused(some_fleet):
    with pytest.raises(fleet.BadInput, match="not a plain function"):
        fleet.map(functools.partial(tasks.plus, b=1), [1])
    with pytest.raises(fleet.BadInput, match="not a plain function"):
        fleet.Executor().submit(len, "abc")


def test_names_the_workers_know():
    assert fleet.task_name(tasks.double) == "double"  # registered with @fleet_task
    assert fleet.task_name(tasks.squared) == "tests.support.fleet_tasks:squared"
    assert fleet.task_name("mymod:f") == "mymod:f"


def test_a_non_json_item_is_refused_before_anything_is_sent(some_fleet):
    with pytest.raises(fleet.BadInput, match=r"item 0 .* travel as JSON"):
        fleet.map(tasks.squared, [object()])
    with pytest.raises(fleet.BadInput, match="cannot be sent"):
        fleet.Executor().submit(tasks.plus, 1, b=object())


def test_a_bad_chunksize_is_refused(some_fleet):
    with pytest.raises(fleet.BadInput, match="chunksize=0"):
        fleet.map(tasks.squared, [1], chunksize=0)


def test_no_fleet_is_unreachable_with_the_cli_words(no_fleet):
    for call in (
        lambda: fleet.map(tasks.squared, [1]),
        lambda: fleet.Pool(),
        lambda: fleet.Executor(),
        lambda: fleet.jobs(),
    ):
        with pytest.raises(fleet.Unreachable, match=r"no broker URL\. Start a local fleet"):
            call()


def test_an_empty_iterable_yields_nothing_and_starts_no_job(some_fleet):
    results = fleet.map(tasks.squared, [])
    assert list(results) == [] and results.job is None


def test_error_records_become_exceptions():
    own = remote_exception(
        {"type": "Odd", "module": "tests.support.fleet_tasks", "message": "m", "traceback": "tb"},
        5,
    )
    assert type(own) is tasks.Odd and own.item == 5 and own.remote_traceback == "tb"
    builtin = remote_exception({"type": "KeyError", "message": "'k'"}, "x")
    assert type(builtin) is KeyError
    # A type this process does not have: a RemoteError naming it.
    unknown = remote_exception({"type": "Gone", "module": "not.imported", "message": "m"}, 1)
    assert isinstance(unknown, fleet.RemoteError) and unknown.type == "not.imported.Gone"
