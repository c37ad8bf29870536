"""Plain Celery tasks written as a user's module would write them, on the kit's own app:

    from app import celery_app

    @celery_app.task
    def cube(x): ...

Loaded by the test fleets beside tests.support.fleet_tasks (tests/support/fleets.py).
The name `app.celery_app` must be the Celery app here, in every worker process, not the
submodule of the same name.
"""

from app import celery_app


@celery_app.task(name="tests.cube")
def cube(x):
    return x * x * x


@celery_app.task(name="tests.sum_of")
def sum_of(values):
    return sum(values)
