"""Users' projects for the tests, written as a user would: a pyproject.toml with its
dependencies and its task modules declared by entry point, and the modules."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.names import TASK_ENTRY_POINTS
from tests.support.paths import ROOT

# The example project of examples/, as shipped.
EXAMPLE = ROOT / "examples" / "sieve"


def write_project(
    root: Path,
    name: str,
    modules: Mapping[str, str],
    tasks: Sequence[str] = (),
    dependencies: Sequence[str] = (),
) -> Path:
    """A project in `root`: `modules` (relative path -> source) under a pyproject.toml named
    `name`, its `tasks` declared as task modules by entry point."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, source in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    packages = sorted({rel.split("/")[0] for rel in modules if "/" in rel})
    entry_points = "".join(f'"{m.replace(".", "-")}" = "{m}"\n' for m in tasks)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\n'
        f"dependencies = {json.dumps(list(dependencies))}\n\n"
        f'[project.entry-points."{TASK_ENTRY_POINTS}"]\n{entry_points}\n'
        f"[tool.setuptools]\npackages = {json.dumps(packages)}\n"
    )
    return root


def copy_example(target: Path) -> Path:
    """A copy of the example project to change, without what a build left in it."""
    shutil.copytree(
        EXAMPLE, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    )
    return target
