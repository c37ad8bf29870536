"""Entry point for `pulumi up`: read the config, build the stack, export its outputs."""

import sys
from pathlib import Path

import pulumi

# Pulumi runs this directory as a script; put the repository root on the path
# so the program imports itself as the `infra` package, as the tests do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.config import load_config
from infra.program import build

stack = build(load_config())
for name, value in stack.outputs.items():
    pulumi.export(name, value)
