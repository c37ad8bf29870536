"""Where things are, for tests in any tier: the repository and the `fleet` command."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The console script of the virtualenv running the tests.
FLEET_BIN = Path(sys.executable).with_name("fleet")
# XDG_CACHE_HOME of the tests: the wheelhouses (and `fleet local --code`'s virtualenvs) of
# one run are there for the next, and nothing goes into the user's own cache.
CACHE_HOME = Path(tempfile.gettempdir()) / "celery-fleet-test-cache"
