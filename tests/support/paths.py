"""Where things are, for tests in any tier: the repository and the `fleet` command."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The console script of the virtualenv running the tests.
FLEET_BIN = Path(sys.executable).with_name("fleet")
