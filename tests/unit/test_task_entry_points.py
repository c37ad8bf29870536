"""A user's project names its task modules in the entry-point group celery_fleet.tasks.

An installed distribution is stood up under tmp_path (a package and its
.dist-info with entry_points.txt, as pip installs them) and put on sys.path.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from app.celery_config import entry_point_modules, make_app, task_module_origins, task_modules
from app.registry import resolve
from app.settings import Settings

SETTINGS = Settings("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1", include=("extra_mod",))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    package = tmp_path / "myproj_fleet"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(
        textwrap.dedent("""\
        def triple(x):
            return 3 * x
        """)
    )
    info = tmp_path / "myproj_fleet-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myproj-fleet\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[celery_fleet.tasks]\nmytasks = myproj_fleet.tasks\nalso = myproj_fleet.tasks:triple\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_point_modules.cache_clear()
    yield
    entry_point_modules.cache_clear()
    sys.modules.pop("myproj_fleet.tasks", None)
    sys.modules.pop("myproj_fleet", None)


def test_declared_modules_join_the_kits_and_fleet_include_once_each(installed):
    assert task_module_origins(SETTINGS) == {
        "app.tasks": "this kit",
        "myproj_fleet.tasks": "project myproj-fleet, entry point group celery_fleet.tasks",
        "extra_mod": "FLEET_INCLUDE",
    }
    assert task_modules(SETTINGS) == ("app.tasks", "myproj_fleet.tasks", "extra_mod")
    # Workers import them at start, and a job may name their functions.
    assert "myproj_fleet.tasks" in make_app(SETTINGS).conf.include
    assert resolve("myproj_fleet.tasks:triple", task_modules(SETTINGS)).fn(2) == 6


def test_without_a_declaring_project_only_the_kit_and_fleet_include():
    entry_point_modules.cache_clear()
    assert task_modules(SETTINGS) == ("app.tasks", "extra_mod")
