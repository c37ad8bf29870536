"""Plain Celery on the fleet: group, chunks and chord with real workers, on both brokers.

The fleet is for batches, but the usual Celery API must keep working on it:
the workers load tests.support.fleet_tasks (tests.square, tests.total, shared tasks) and
tests.support.app_tasks (tests.cube, tests.sum_of, on `from app import celery_app` as a
user's module writes them), and the client app is the one the kit builds,
app.celery_config.make_app.
"""

from __future__ import annotations

import pytest
from celery import chord, chunks, group

from app.celery_config import make_app

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(fleet):
    import tests.support.fleet_tasks  # noqa: F401 - registers the shared tasks on every app

    app = make_app(fleet.settings)
    app.set_current()
    yield app
    app.close()


def test_the_client_knows_the_tasks(client):
    assert {"tests.square", "tests.total"} <= set(client.tasks)


def test_a_single_task_round_trips(client):
    assert client.signature("tests.square", args=(12,)).delay().get(timeout=30) == 144


def test_group_of_per_id_tasks(client):
    ids = list(range(200))
    result = group(client.signature("tests.square", args=(i,)) for i in ids).apply_async()
    assert result.get(timeout=60) == [i * i for i in ids]
    assert result.successful()


def test_chunks(client):
    square = client.tasks["tests.square"]
    ids = list(range(1000))
    result = square.chunks(((i,) for i in ids), 100).apply_async()
    parts = result.get(timeout=60)
    assert len(parts) == 10
    assert all(len(part) == 100 for part in parts)
    assert [v for part in parts for v in part] == [i * i for i in ids]


def test_chord_with_a_summarising_callback(client):
    square, total = client.tasks["tests.square"], client.tasks["tests.total"]
    ids = list(range(100))
    result = chord(square.s(i) for i in ids)(total.s())
    assert result.get(timeout=60) == sum(i * i for i in ids)


def test_chord_by_signature_names(client):
    header = [client.signature("tests.square", args=(i,)) for i in range(1, 11)]
    result = chord(header)(client.signature("tests.total"))
    assert result.get(timeout=60) == sum(i * i for i in range(1, 11))


def test_a_failing_plain_task_reports_its_error(client):
    # square(None) raises TypeError on the worker; get() re-raises it here.
    result = client.signature("tests.square", args=(None,)).delay()
    with pytest.raises(TypeError):
        result.get(timeout=30)
    assert result.state == "FAILURE"


# -- tasks of a module that uses `from app import celery_app` (tests/support/app_tasks.py) --


def test_app_celery_app_tasks_in_a_group_chunks_and_a_chord(client):
    ids = list(range(60))
    cubes = [i**3 for i in ids]
    assert group(client.signature("tests.cube", args=(i,)) for i in ids)().get(timeout=60) == cubes
    parts = chunks(client.signature("tests.cube"), ((i,) for i in ids), 20)().get(timeout=60)
    assert [v for part in parts for v in part] == cubes
    header = [client.signature("tests.cube", args=(i,)) for i in ids]
    assert chord(header)(client.signature("tests.sum_of")).get(timeout=60) == sum(cubes)
