"""Inside `celery -A app worker`: the Celery app, the batch task, the heartbeat and the guards.

    celery_app.py   the worker's Celery application, configured from FLEET_* variables
    task.py         the batch task (fleet.batch) and its lease
    heartbeat.py    the worker's registration in the result store, started on worker_ready
    watchdog.py     the liveness rule: a worker that stops consuming while work waits exits
    guard.py        malformed messages are refused, never the end of the worker

Nothing here imports the launcher or the host daemons (tests/unit/test_imports.py).
"""
