"""The celery-fleet policy pack; the rules themselves are in rules.py."""

import sys
from pathlib import Path

from pulumi_policy import EnforcementLevel, PolicyPack

# Pulumi runs this directory as a script; make rules.py importable by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# mypy cannot follow the sys.path line; it checks rules.py as infra.policy.rules.
from rules import POLICIES  # type: ignore[import-not-found]

PolicyPack(
    name="celery-fleet-security",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=POLICIES,
)
