"""The worker's Celery application, configured from FLEET_* variables.

`celery -A app worker` finds it through `app/__init__.py`. A missing or bad
variable stops the worker with one line saying what to set (ConfigError).
"""

from app.celery_config import make_app
from app.settings import Settings

settings = Settings.from_env()
celery_app = make_app(settings)
