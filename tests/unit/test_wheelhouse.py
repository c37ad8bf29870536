"""A user's project as the workers get it: what ships, what is left out, and what the
wheelhouse's version covers. No pip here (tests/integration/test_wheelhouse.py builds)."""

from __future__ import annotations

import hashlib
import json
import tomllib
import zipfile
from pathlib import Path

import pytest

from app.names import TASK_ENTRY_POINTS, WHEELHOUSE_MANIFEST, WHEELHOUSE_REQUIREMENTS
from app.wheelhouse import (
    PackageError,
    Target,
    Wheelhouse,
    _manifest,
    _modules_pyproject,
    _requirements,
    content_digest,
    kit_project,
    load_project,
    read_wheelhouse,
    shipped_files,
    sources_digest,
    summary,
    task_modules_of,
)
from tests.support.paths import ROOT
from tests.support.projects import EXAMPLE, write_project


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_what_must_not_ship_stays_out(tmp_path):
    root = tree(
        tmp_path / "proj",
        {
            "pyproject.toml": '[project]\nname = "proj"\n',
            "proj/__init__.py": "",
            "proj/tasks.py": "X = 1\n",
            "proj/build/__init__.py": "# a subpackage named build ships\n",
            "proj/data/model.json": "{}\n",
            "proj/__pycache__/tasks.cpython-311.pyc": "",
            "proj/old.pyc": "",
            ".git/HEAD": "ref: refs/heads/main\n",
            ".venv/bin/python": "",
            "env/pyvenv.cfg": "home = /usr/bin\n",  # a virtualenv by any other name
            "env/lib/site.py": "",
            "build/lib/proj/tasks.py": "",
            "dist/proj-1.0.tar.gz": "",
            "proj.egg-info/PKG-INFO": "",
            ".gitignore": "*.csv\nresults/\n!keep.csv\n",
            "ids.csv": "1\n",
            "keep.csv": "1\n",
            "results/out.jsonl": "{}\n",
            "proj/.gitignore": "scratch.py\n",
            "proj/scratch.py": "",
            "notebooks/.ipynb_checkpoints/a.ipynb": "",
        },
    )
    shipped, left_out = shipped_files(root)
    assert shipped == [
        ".gitignore",
        "keep.csv",
        "proj/.gitignore",
        "proj/__init__.py",
        "proj/build/__init__.py",
        "proj/data/model.json",
        "proj/tasks.py",
        "pyproject.toml",
    ]
    assert left_out == [
        ".git/",
        ".venv/",
        "build/",
        "dist/",
        "env/",
        "ids.csv",
        "notebooks/.ipynb_checkpoints/",
        "proj.egg-info/",
        "proj/__pycache__/",
        "proj/old.pyc",
        "proj/scratch.py",
        "results/",
    ]


def test_a_pyproject_project_is_named_by_it_and_a_uv_lock_pins_it(tmp_path):
    root = write_project(tmp_path / "p", "My_Project", {"mp/__init__.py": "", "mp/t.py": ""})
    (root / "uv.lock").write_text(
        "version = 1\n"
        '[[package]]\nname = "my-project"\nversion = "1.0"\nsource = { editable = "." }\n'
        '[[package]]\nname = "NumPy"\nversion = "2.4.6"\n'
        'source = { registry = "https://pypi.org/simple" }\n'
        # Locked at two versions under different markers: left to the resolver.
        '[[package]]\nname = "pandas"\nversion = "2.2.0"\nsource = { registry = "x" }\n'
        '[[package]]\nname = "pandas"\nversion = "2.3.1"\nsource = { registry = "x" }\n'
        '[[package]]\nname = "helper"\nversion = "0.1"\nsource = { git = "https://x/y" }\n'
    )
    project = load_project(root)
    assert (project.name, project.kind) == ("My_Project", "pyproject")
    assert project.pins == ("numpy==2.4.6",)
    assert "uv.lock" in project.files and project.size > 0


def test_plain_modules_are_a_project_named_by_their_directory(tmp_path):
    root = tree(
        tmp_path / "Heavy Work",
        {
            "score.py": "import numpy\n",
            "helpers/__init__.py": "",
            "helpers/sub/__init__.py": "",
            "helpers/sub/m.py": "",
            "test_score.py": "",
            "conftest.py": "",
            "notes.txt": "",
            "requirements.txt": "# pinned\nnumpy==2.4.6  # the math\n\nrequests>=2\n",
        },
    )
    project = load_project(root)
    assert (project.name, project.kind) == ("heavy-work", "modules")
    assert project.requirements == ("numpy==2.4.6", "requests>=2")
    made = tomllib.loads(_modules_pyproject(project))
    assert made["project"]["name"] == "heavy-work"
    assert made["project"]["dependencies"] == ["numpy==2.4.6", "requests>=2"]
    assert made["tool"]["setuptools"]["py-modules"] == ["conftest", "score", "test_score"]
    assert made["tool"]["setuptools"]["packages"] == ["helpers", "helpers.sub"]
    # Every top-level module and package is a task module, but tests and the like.
    tasks = made["project"]["entry-points"][TASK_ENTRY_POINTS]
    assert tasks == {"score": "score", "helpers": "helpers"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no such directory"),
        ({"README.md": "hi\n"}, "is not a project: no pyproject.toml and no Python module"),
        ({"pyproject.toml": "[tool.x]\n"}, "has no [project] name"),
        ({"pyproject.toml": "[project\n"}, "has no [project] name"),
        (
            {"t.py": "", "requirements.txt": "numpy\n-r other.txt\n"},
            "requirements.txt, line 2: '-r other.txt' is a pip option",
        ),
        ({"t.py": "", "uv.lock": "[[package\n"}, "cannot be read as a uv lock file"),
    ],
)
def test_what_is_not_a_project_is_refused_saying_why(tmp_path, files, message):
    root = tmp_path / "p"
    if files:
        tree(root, files)
    with pytest.raises(PackageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_project(root)


def test_an_unknown_architecture_is_refused():
    with pytest.raises(PackageError, match="unknown architecture 'armv7': use one of"):
        Target("armv7")


def test_the_target_names_every_glibc_up_to_the_workers():
    args = Target("arm64").pip_args()
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms[0] == "manylinux_2_17_aarch64" and platforms[-1] == "manylinux_2_34_aarch64"
    assert len(platforms) == 34 - 17 + 1
    assert args[:4] == ["--python-version", "3.11", "--implementation", "cp"]


def test_the_kit_ships_its_package_sources_only():
    kit = kit_project(ROOT)
    assert "pyproject.toml" in kit.files and "app/wheelhouse.py" in kit.files
    assert "scripts/fleet-boot.sh" in kit.files
    assert not [f for f in kit.files if f.startswith(("infra/", "tests/", "examples/"))]
    assert not [f for f in kit.files if "__pycache__" in f or f.endswith(".pyc")]


def test_the_sources_digest_follows_what_ships(tmp_path):
    root = write_project(tmp_path / "p", "p", {"p/__init__.py": "", "p/t.py": "X = 1\n"})
    kit, target = kit_project(ROOT), Target()

    def digest() -> str:
        return sources_digest(kit, [load_project(root)], target, "aws")

    before = digest()
    tree(root, {".git/index": "x", "p/__pycache__/t.pyc": "x", ".venv/pyvenv.cfg": ""})
    assert digest() == before, "what does not ship changes nothing"
    (root / "p" / "t.py").write_text("X = 2\n")
    changed = digest()
    assert changed != before
    assert sources_digest(kit, [load_project(root)], Target("arm64"), "aws") != changed
    assert sources_digest(kit, [load_project(root)], target, "aws,operator") != changed


def wheel(path: Path, members: dict[str, str], date=(1980, 1, 1, 0, 0, 0)) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=date), text)
    return path


def test_content_digest_is_the_code_not_the_zip(tmp_path):
    members = {
        "p/__init__.py": "",
        "p/t.py": "X = 1\n",
        "p-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: p\n",
        "p-1.0.dist-info/RECORD": "a",
        "p-1.0.dist-info/entry_points.txt": f"[{TASK_ENTRY_POINTS}]\nt = p.t\n",
    }
    first = wheel(tmp_path / "a.whl", members)
    # Other times, another order, the METADATA and RECORD of a newer backend: the same code.
    newer = {
        **members,
        "p-1.0.dist-info/METADATA": "Metadata-Version: 2.4\nName: p\nLicense-File: x\n",
        "p-1.0.dist-info/RECORD": "b",
    }
    second = wheel(tmp_path / "b.whl", dict(reversed(list(newer.items()))), (2026, 12, 6, 1, 2, 3))
    assert first.read_bytes() != second.read_bytes()
    assert content_digest(first) == content_digest(second)
    for change in ({"p/t.py": "X = 2\n"}, {"p-1.0.dist-info/entry_points.txt": ""}):
        other = wheel(tmp_path / "c.whl", {**members, **change})
        assert content_digest(other) != content_digest(first), change


def test_task_modules_are_read_from_the_wheels_entry_points(tmp_path):
    points = (
        f"[console_scripts]\np = p.cli:main\n\n"
        f"[{TASK_ENTRY_POINTS}]\nT = p.tasks:ignored\nu = p.more\n"
    )
    built = wheel(tmp_path / "p.whl", {"p-1.0.dist-info/entry_points.txt": points})
    assert task_modules_of(built) == ["p.more", "p.tasks"]
    assert task_modules_of(wheel(tmp_path / "q.whl", {"q/__init__.py": ""})) == []


def fake_house(
    tmp_path: Path, numpy: str = "2.4.6", code: str = "X = 1\n", release: str = "1.0"
) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    kit = wheel(tmp_path / "celery_fleet-0.1.0-py3-none-any.whl", {"app/__init__.py": ""})
    proj_root = write_project(tmp_path / "src", "proj", {"proj/__init__.py": code})
    proj = wheel(tmp_path / f"proj-{release}-py3-none-any.whl", {"proj/__init__.py": code})
    dep = wheel(tmp_path / f"numpy-{numpy}-cp311-cp311-manylinux_2_28_x86_64.whl", {"n": ""})
    return _manifest(tmp_path, kit, "aws", [load_project(proj_root)], [proj], [dep], Target())


def test_the_version_covers_the_code_and_the_resolved_versions(tmp_path):
    base = fake_house(tmp_path / "a")
    assert fake_house(tmp_path / "b")["version"] == base["version"], "same code, same version"
    assert fake_house(tmp_path / "c", code="X = 2\n")["version"] != base["version"]
    assert fake_house(tmp_path / "d", numpy="2.4.7")["version"] != base["version"]
    assert fake_house(tmp_path / "e", release="1.1")["version"] != base["version"]
    assert base["built"] == ["celery-fleet", "proj"]
    # No path of this machine and no time: the manifest of the same code is the same bytes.
    assert str(tmp_path) not in json.dumps(base)
    assert base["projects"][0]["directory"] == "src"


def test_the_requirements_pin_every_wheel_by_sha256(tmp_path):
    manifest = fake_house(tmp_path)
    lines = [line for line in _requirements(manifest, "aws").splitlines() if line[:1] != "#"]
    digests = {
        w["file"]: hashlib.sha256((tmp_path / w["file"]).read_bytes()).hexdigest()
        for w in manifest["wheels"]
    }
    assert lines == [
        f"celery-fleet[aws]==0.1.0 --hash=sha256:{digests['celery_fleet-0.1.0-py3-none-any.whl']}",
        f"proj==1.0 --hash=sha256:{digests['proj-1.0-py3-none-any.whl']}",
        "numpy==2.4.6 --hash=sha256:"
        + digests["numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl"],
    ]


def house_at(tmp_path: Path) -> Wheelhouse:
    manifest = fake_house(tmp_path)
    (tmp_path / WHEELHOUSE_MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / WHEELHOUSE_REQUIREMENTS).write_text(_requirements(manifest, "aws"))
    return read_wheelhouse(tmp_path)


def test_a_wheelhouse_is_written_only_where_nothing_else_is(tmp_path):
    house = house_at(tmp_path / "built")
    other = tmp_path / "other"
    tree(other, {"mine.txt": "keep me\n"})
    with pytest.raises(PackageError, match="holds files that are not a wheelhouse"):
        house.write(other)
    assert (other / "mine.txt").read_text() == "keep me\n"
    out = tmp_path / "out"
    written = house.write(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in house.files)
    (out / "stale-1.0-py3-none-any.whl").write_text("")
    house.write(out)  # over an earlier wheelhouse: replaced whole
    assert not (out / "stale-1.0-py3-none-any.whl").exists()
    assert read_wheelhouse(out).version == written.version == house.version
    (out / house.wheels[1].name).unlink()
    with pytest.raises(PackageError, match=f"lacks {house.wheels[1].name}"):
        read_wheelhouse(out)
    with pytest.raises(PackageError, match="is not a wheelhouse"):
        read_wheelhouse(other)


def test_the_summary_names_the_version_the_projects_and_each_wheel(tmp_path):
    house = house_at(tmp_path)
    lines = summary(house)
    assert lines[0].startswith(f"wheelhouse {house.version}: 3 wheels, ")
    assert "CPython 3.11 on x86_64 Linux" in lines[0]
    assert any(line.startswith("  project proj (src/): ") for line in lines)
    assert "none declared" in "\n".join(lines), "the project declares no task module"
    for w in house.manifest["wheels"]:
        assert any(line.endswith(f"  {w['file']}") for line in lines)


def test_the_example_project_declares_its_task_module():
    project = load_project(EXAMPLE)
    assert (project.name, project.kind) == ("fleet-sieve", "pyproject")
    points = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    assert points[TASK_ENTRY_POINTS] == {"sieve": "sieve.tasks"}
