"""The worker artifact: named by the content of its sources, and byte-for-byte repeatable."""

from __future__ import annotations

import hashlib
import tempfile
import textwrap
from pathlib import Path

import pytest

from infra.artifact import build_artifact, digest_of, source_files


@pytest.fixture
def project(tmp_path) -> Path:
    """A minimal stand-in for this repository's package."""
    root = tmp_path / "repo"
    (root / "app").mkdir(parents=True)
    (root / "app" / "__init__.py").write_text("ANSWER = 42\n")
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["setuptools>=68", "wheel"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "celery-fleet"
            version = "0.1.0"

            [tool.setuptools.packages.find]
            include = ["app*"]
            """
        )
    )
    (root / "infra").mkdir()
    (root / "infra" / "x.py").write_text("not part of the wheel\n")
    return root


def test_digest_follows_the_package_sources_only(project):
    before = digest_of(project)
    (project / "infra" / "x.py").write_text("changed, but not shipped\n")
    (project / "app" / "__pycache__").mkdir()
    (project / "app" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    assert digest_of(project) == before
    assert [p.name for p in source_files(project)] == ["__init__.py", "pyproject.toml"]
    (project / "app" / "__init__.py").write_text("ANSWER = 43\n")
    assert digest_of(project) != before
    assert digest_of(project, "offline=True") != digest_of(project, "offline=False")


def test_same_sources_build_the_same_bytes(project, tmp_path, monkeypatch):
    """Two clean builds (no shared cache) give one digest and identical wheels: no diff."""
    built = []
    for attempt in ("first", "second"):
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / attempt))
        (tmp_path / attempt).mkdir()
        built.append(build_artifact(project, offline=False, arch="x86_64"))
    first, second = built
    assert first.digest == second.digest
    assert [w.name for w in first.wheels] == ["celery_fleet-0.1.0-py3-none-any.whl"]
    hashes = {hashlib.sha256(b.wheels[0].read_bytes()).hexdigest() for b in built}
    assert len(hashes) == 1, "wheel bytes differ between builds"
    assert not (project / "build").exists(), "the build must not touch the repository"
    # A rebuild of unchanged sources comes from the cache.
    assert build_artifact(project, offline=False, arch="x86_64") == second
