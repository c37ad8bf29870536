"""celery-fleet: the package every worker runs.

    from app import celery_app      # the Celery application (celery -A app worker)
    from app import fleet_task      # register a per-item function for fleet jobs

The Celery application is created on first use, so the launcher can import
this package with URLs given on its command line instead of the environment.
"""

from typing import Any

from app.registry import fleet_task

__all__ = ["celery_app", "fleet_task"]


def __getattr__(name: str) -> Any:  # the Celery app; celery has no types
    # `celery -A app` looks for `app.app` or `app.celery`; Python code uses `celery_app`.
    if name in ("celery_app", "celery", "app"):
        from app.worker.celery_app import celery_app

        return celery_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
