"""The code the workers run, as one wheelhouse named by the content hash of that code.

A wheelhouse holds this kit's wheel, the wheel of each of the user's projects
and every dependency wheel for the workers' platform (Amazon Linux 2023:
CPython 3.11, manylinux up to glibc 2.34), beside a requirements file that
pins each of them by version and sha256 and a manifest (WHEELHOUSE_MANIFEST in
app/names.py). `fleet package` writes one, `fleet local --code` installs one
for the local fleet, `pulumi up` uploads one (infra/artifact.py), and every
host installs it offline with scripts/fleet-boot.sh, so what runs is exactly
what was resolved here, on every instance, whenever it boots.

A project is a directory with a pyproject.toml (built with its own build
backend; a uv.lock beside it pins the versions), or plain modules with a
requirements.txt (made into a wheel whose top-level modules are its task
modules). What a project must not ship stays out: version control, virtual
environments, caches, build output and whatever its .gitignore files ignore.

The version (content hash) covers the code inside the kit's and the projects'
wheels (their files and task entry points, their names and release numbers) and
the names of the dependency wheels (which carry their versions) for the target:
an unchanged project gives the same version, and no diff in `pulumi preview`,
even when a newer build backend writes its metadata otherwise; a changed file
that ships, or a new dependency version, gives a new one. A build is kept in a
cache (the user's cache directory) under the digest of its sources, so a second
preview neither rebuilds nor re-resolves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.names import DISTRIBUTION, TASK_ENTRY_POINTS, WHEELHOUSE_MANIFEST, WHEELHOUSE_REQUIREMENTS

# What setuptools packs of this kit (pyproject.toml); nothing else changes its wheel.
KIT_SOURCES = ("pyproject.toml", "README.md", "app", "scripts")
# The extras every worker installs with the kit: the SQS and S3 transports, and the
# PostgreSQL sink's driver.
WORKER_EXTRAS = ("aws", "postgres")
# The workers run Amazon Linux 2023: glibc 2.34 and the python3.11 package.
WORKER_PYTHON = "3.11"
WORKER_GLIBC_MINOR = 34
# --arch (the stack's instance architecture) -> the machine in wheel platform tags.
MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}
# 1980-01-01, the earliest time a zip entry can hold: builds of the same files repeat.
SOURCE_DATE_EPOCH = "315532800"
# Never shipped, wherever they are in a project: version control, environments, caches,
# editor state. A directory holding pyvenv.cfg (a virtualenv) neither, nor, at the top
# of a project, its build output (a package may well have a `build` subpackage).
LEFT_OUT_DIRS = frozenset(
    {
        ".git", ".hg", ".svn", "__pycache__", ".venv", ".tox", ".nox", ".eggs",
        ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints",
        "node_modules", ".idea", ".vscode",
    }
)  # fmt: skip
LEFT_OUT_AT_TOP = frozenset({"build", "dist"})
LEFT_OUT_SUFFIXES = (".pyc", ".pyo", ".egg-info")
LEFT_OUT_FILES = frozenset({".DS_Store"})
# Plain modules that are not task modules (in a project without a pyproject.toml).
NOT_TASK_MODULES = re.compile(r"^(test_.*|.*_test|conftest|setup|noxfile|manage)$")
# How many builds the cache keeps (the most recently used).
CACHE_KEEP = 8


class PackageError(Exception):
    """A project that cannot be packaged for the workers; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """The workers' platform: which wheels they can install."""

    arch: str = "x86_64"
    python: str = WORKER_PYTHON
    glibc_minor: int = WORKER_GLIBC_MINOR

    def __post_init__(self) -> None:
        if self.arch not in MACHINES:
            raise PackageError(
                f"unknown architecture {self.arch!r}: use one of {', '.join(MACHINES)}."
            )

    def pip_args(self) -> list[str]:
        # pip does not widen --platform to older glibc tags, so name them all:
        # manylinux2014 (2.17) up to the workers' own glibc.
        machine = MACHINES[self.arch]
        platforms = [
            arg
            for minor in range(17, self.glibc_minor + 1)
            for arg in ("--platform", f"manylinux_2_{minor}_{machine}")
        ]
        return ["--python-version", self.python, "--implementation", "cp", *platforms]

    def describe(self) -> str:
        return (
            f"CPython {self.python} on {MACHINES[self.arch]} Linux "
            f"(manylinux, glibc 2.{self.glibc_minor} or older)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"python": self.python, "arch": self.arch, "glibc": f"2.{self.glibc_minor}"}


# -- projects --------------------------------------------------------------------


def canonical(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Project:
    """One of the user's project directories, and what of it ships."""

    root: Path
    name: str
    kind: str  # "pyproject" or "modules"
    files: tuple[str, ...]  # what ships, relative to root, POSIX
    left_out: tuple[str, ...] = ()  # what was left out (paths relative to root)
    requirements: tuple[str, ...] = ()  # modules: the lines of requirements.txt
    pins: tuple[str, ...] = ()  # name==version from a uv.lock: constraints

    @property
    def size(self) -> int:
        return sum((self.root / f).stat().st_size for f in self.files)

    def digest_into(self, h: Any) -> None:
        h.update(f"{self.kind}\0{self.name}\0".encode())
        for rel in self.files:
            h.update(rel.encode() + b"\0" + (self.root / rel).read_bytes() + b"\0")


class _LeftOut:
    """What a project does not ship: LEFT_OUT_*, virtualenvs, and what each .gitignore
    ignores below its own directory. `enter` each directory as the walk reaches it."""

    def __init__(self) -> None:
        self.specs: list[tuple[Path, Any]] = []

    def enter(self, directory: Path) -> None:
        self.specs = [(base, spec) for base, spec in self.specs if directory.is_relative_to(base)]
        path = directory / ".gitignore"
        if path.is_file():
            import pathspec

            lines = path.read_text(errors="replace").splitlines()
            self.specs.append((directory, pathspec.GitIgnoreSpec.from_lines(lines)))

    def __call__(self, path: Path, is_dir: bool) -> bool:
        if path.is_symlink() and is_dir:
            return True
        if path.name in (LEFT_OUT_DIRS if is_dir else LEFT_OUT_FILES):
            return True
        if path.name.endswith(LEFT_OUT_SUFFIXES) or (is_dir and (path / "pyvenv.cfg").exists()):
            return True
        suffix = "/" if is_dir else ""
        return any(
            spec.match_file(path.relative_to(base).as_posix() + suffix) for base, spec in self.specs
        )


def shipped_files(root: Path) -> tuple[list[str], list[str]]:
    """(what ships, what was left out) of the directory `root`, as sorted relative paths
    (a directory left out as a whole ends with /)."""
    shipped: list[str] = []
    left_out: list[str] = []
    ignored = _LeftOut()
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        ignored.enter(here)
        for name in sorted(dirs):
            if ignored(here / name, is_dir=True) or (here == root and name in LEFT_OUT_AT_TOP):
                dirs.remove(name)  # not walked
                left_out.append(f"{(here / name).relative_to(root).as_posix()}/")
        for name in files:
            path = here / name
            rel = path.relative_to(root).as_posix()
            (left_out if ignored(path, is_dir=False) or not path.is_file() else shipped).append(rel)
    return sorted(shipped), sorted(left_out)


def _uv_pins(lock: Path) -> tuple[str, ...]:
    """name==version of each package a uv.lock resolved from an index, once: a name locked at
    two versions (different markers) is left to the resolver."""
    try:
        data = tomllib.loads(lock.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PackageError(f"{lock} cannot be read as a uv lock file: {exc}") from None
    versions: dict[str, set[str]] = {}
    for package in data.get("package", []):
        source = package.get("source") or {}
        if "registry" not in source or "version" not in package:
            continue  # the project itself, a path or git dependency
        versions.setdefault(canonical(package["name"]), set()).add(package["version"])
    return tuple(f"{name}=={v.pop()}" for name, v in sorted(versions.items()) if len(v) == 1)


def _requirement_lines(path: Path) -> tuple[str, ...]:
    lines = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise PackageError(
                f"{path}, line {n}: {line!r} is a pip option; a project's requirements.txt "
                "may only name requirements (numpy==2.1.0, requests>=2). Put the rest in a "
                "pyproject.toml, or set PIP_INDEX_URL / PIP_FIND_LINKS for other indexes."
            )
        lines.append(line)
    return tuple(lines)


def load_project(path: Path) -> Project:
    """The project in directory `path`; PackageError if it is not one."""
    root = path.expanduser().resolve()
    if not root.is_dir():
        raise PackageError(f"{path}: no such directory (a project directory is expected).")
    files, left_out = shipped_files(root)
    pyproject = root / "pyproject.toml"
    lock = root / "uv.lock"
    pins = _uv_pins(lock) if lock.is_file() else ()
    if pyproject.is_file():
        try:
            name = tomllib.loads(pyproject.read_text())["project"]["name"]
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise PackageError(
                f"{pyproject} has no [project] name ({exc}); a project needs one."
            ) from None
        return Project(root, str(name), "pyproject", tuple(files), tuple(left_out), (), pins)
    if not any(f.endswith(".py") for f in files):
        raise PackageError(
            f"{path} is not a project: no pyproject.toml and no Python module in it. Give the "
            "directory of your pyproject.toml (or of your modules and their requirements.txt)."
        )
    requirements = root / "requirements.txt"
    reqs = _requirement_lines(requirements) if requirements.is_file() else ()
    name = canonical(re.sub(r"[^A-Za-z0-9._-]+", "-", root.name)).strip("-.") or "project"
    return Project(root, name, "modules", tuple(files), tuple(left_out), reqs, pins)


def _modules_pyproject(project: Project) -> str:
    """The pyproject.toml of a project of plain modules: each top-level module (and package)
    ships, and each is a task module, found by the workers by entry point."""
    modules = sorted(f[:-3] for f in project.files if "/" not in f and f.endswith(".py"))
    packages = sorted(
        f.rpartition("/")[0].replace("/", ".")
        for f in project.files
        if f.endswith("/__init__.py")
        and all(p in project.files for p in _parent_inits(f.rpartition("/")[0]))
    )
    tasks = [m for m in (*modules, *(p for p in packages if "." not in p))]
    tasks = [m for m in tasks if not NOT_TASK_MODULES.match(m)]
    entry_points = "".join(f'"{m}" = "{m}"\n' for m in tasks)
    return (
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{project.name}"\nversion = "0"\n'
        f"dependencies = {json.dumps(list(project.requirements))}\n\n"
        f'[project.entry-points."{TASK_ENTRY_POINTS}"]\n{entry_points}\n'
        f"[tool.setuptools]\npy-modules = {json.dumps(modules)}\n"
        f"packages = {json.dumps(packages)}\n\n"
        '[tool.setuptools.package-data]\n"*" = ["*"]\n'
    )


def _parent_inits(package_dir: str) -> Iterator[str]:
    parts = package_dir.split("/")
    for n in range(1, len(parts) + 1):
        yield "/".join(parts[:n]) + "/__init__.py"


# -- the kit itself ------------------------------------------------------------------


def kit_root() -> Path:
    """The checkout of this kit that `fleet` runs from: its wheel is built from its sources."""
    root = Path(__file__).resolve().parent.parent
    try:
        name = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        name = None
    if name != DISTRIBUTION:
        raise PackageError(
            f"this {DISTRIBUTION} is installed from a wheel ({root}), not run from a checkout: "
            "the workers' wheelhouse is built from the kit's sources. Run `fleet` from a clone "
            "of the kit's repository (`make setup` there installs it)."
        )
    return root


def kit_project(root: Path) -> Project:
    files: list[str] = []
    for entry in KIT_SOURCES:
        path = root / entry
        if path.is_file():
            files.append(entry)
        elif path.is_dir():
            shipped, _ = shipped_files(path)
            files.extend(f"{entry}/{f}" for f in shipped)
    return Project(root, DISTRIBUTION, "kit", tuple(sorted(files)))


# -- the wheelhouse ------------------------------------------------------------------


@dataclass(frozen=True)
class Wheelhouse:
    """A built wheelhouse in `directory` (a cache entry, or where `write` copied it)."""

    directory: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def version(self) -> str:
        version: str = self.manifest["version"]
        return version

    @property
    def wheels(self) -> list[Path]:
        """The kit's wheel, the projects' wheels, then the dependencies."""
        return [self.directory / w["file"] for w in self.manifest["wheels"]]

    @property
    def files(self) -> list[Path]:
        """Everything a host needs, in upload order: the wheels, the requirements, the manifest."""
        return [
            *self.wheels,
            self.directory / WHEELHOUSE_REQUIREMENTS,
            self.directory / WHEELHOUSE_MANIFEST,
        ]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def write(self, out: Path) -> Wheelhouse:
        """Copy the wheelhouse into directory `out` (new, empty, or an earlier wheelhouse)."""
        out = out.expanduser()
        if out.exists() and not out.is_dir():
            raise PackageError(f"--out {out} is a file; give a directory.")
        if out.is_dir() and any(out.iterdir()):
            if not (out / WHEELHOUSE_MANIFEST).is_file():
                raise PackageError(
                    f"--out {out} holds files that are not a wheelhouse; give a new or empty "
                    "directory (or one an earlier `fleet package` wrote)."
                )
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for path in self.files:
            shutil.copy2(path, out / path.name)
        return Wheelhouse(out, self.manifest)


def read_wheelhouse(directory: Path) -> Wheelhouse:
    """The wheelhouse `fleet package` wrote into `directory`; PackageError if it is not one."""
    try:
        manifest = json.loads((directory / WHEELHOUSE_MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise PackageError(
            f"{directory} is not a wheelhouse (no readable {WHEELHOUSE_MANIFEST}: {exc}); "
            "make one with `fleet package PROJECT --out DIR`."
        ) from None
    house = Wheelhouse(directory, manifest)
    missing = [p.name for p in house.files if not p.is_file()]
    if missing:
        raise PackageError(f"the wheelhouse {directory} lacks {', '.join(missing)}.")
    return house


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "celery-fleet" / "wheelhouses"


def sources_digest(kit: Project, projects: Sequence[Project], target: Target, extras: str) -> str:
    """What a build depends on: the files of the kit and the projects, the target, the extras."""
    h = hashlib.sha256(f"{json.dumps(target.as_dict(), sort_keys=True)}\0{extras}\0".encode())
    for project in (kit, *projects):
        project.digest_into(h)
        h.update("\0".join(project.pins).encode() + b"\1")
    return h.hexdigest()[:24]


def build(
    paths: Sequence[Path],
    arch: str = "x86_64",
    *,
    target: Target | None = None,
    extras: Sequence[str] = WORKER_EXTRAS,
    kit: Path | None = None,
    cache: Path | None = None,
    say: Any = None,
) -> Wheelhouse:
    """The wheelhouse of the projects in `paths` with this kit (from `kit`, default: the
    checkout `fleet` runs from) for the workers on `arch` (or for `target`); from the cache
    when its sources are unchanged.

    `say(message)`, if given, hears each step of a build.
    """
    say = say or (lambda message: None)
    target = target or Target(arch)
    projects = [load_project(Path(p)) for p in paths]
    seen: dict[str, Path] = {}
    for project in projects:
        other = seen.setdefault(canonical(project.name), project.root)
        if canonical(project.name) == DISTRIBUTION or other != project.root:
            raise PackageError(
                f"two projects are named {project.name!r} ({other} and {project.root}); "
                f"each needs its own name, and none may be called {DISTRIBUTION}."
            )
    kit_files = kit_project(kit or kit_root())
    extras_text = ",".join(sorted(extras))
    cache = cache or cache_dir()
    entry = cache / sources_digest(kit_files, projects, target, extras_text)
    if (entry / WHEELHOUSE_MANIFEST).is_file():
        with contextlib.suppress(OSError):
            os.utime(entry)  # recently used: kept by the pruning
        return read_wheelhouse(entry)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        built = _build_into(Path(tmp), kit_files, projects, target, extras_text, say)
        with contextlib.suppress(OSError):  # another build got there first: same content
            built.rename(entry)
    prune(cache, CACHE_KEEP)
    return read_wheelhouse(entry)


def _build_into(
    tmp: Path,
    kit: Project,
    projects: Sequence[Project],
    target: Target,
    extras: str,
    say: Any,
) -> Path:
    out, deps = tmp / "wheelhouse", tmp / "deps"
    out.mkdir()
    say(f"building {DISTRIBUTION}'s wheel")
    # The operator's setuptools (no build isolation) for the kit, so its bytes repeat.
    kit_wheel = _build_wheel(kit, tmp / "src" / "kit", out, isolated=False)
    project_wheels = []
    for n, project in enumerate(projects):
        say(f"building {project.name} from {project.root} ({len(project.files)} files)")
        project_wheels.append(_build_wheel(project, tmp / "src" / str(n), out, isolated=True))
    constraints = tmp / "constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for p in projects for pin in p.pins))
    say(f"resolving the dependencies for {target.describe()}")
    # By path, not by name: a same-named project on PyPI must never be picked.
    wanted = [f"{kit_wheel}[{extras}]" if extras else str(kit_wheel), *map(str, project_wheels)]
    _pip(
        "download",
        "--only-binary=:all:",
        *target.pip_args(),
        "--dest",
        str(deps),
        "--find-links",
        str(out),
        "-c",
        str(constraints),
        *wanted,
        what="resolving the dependencies",
        target=target,
    )
    ours = {p.name for p in (kit_wheel, *project_wheels)}
    dependencies = sorted(p for p in deps.glob("*.whl") if p.name not in ours)
    for wheel in dependencies:
        os.replace(wheel, out / wheel.name)
    manifest = _manifest(
        out,
        kit_wheel,
        extras,
        projects,
        project_wheels,
        [out / p.name for p in dependencies],
        target,
    )
    (out / WHEELHOUSE_REQUIREMENTS).write_text(_requirements(manifest, extras))
    (out / WHEELHOUSE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _build_wheel(project: Project, src: Path, out: Path, isolated: bool) -> Path:
    """Build `project`'s wheel from a copy of what ships (an in-tree build would leave
    build/ and *.egg-info in the project, and could pick up what is left out)."""
    for rel in project.files:
        copy = src / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project.root / rel, copy)
    if project.kind == "modules":
        (src / "pyproject.toml").write_text(_modules_pyproject(project))
    before = set(out.glob("*.whl"))
    isolation = [] if isolated else ["--no-build-isolation"]
    _pip(
        "wheel",
        "--no-deps",
        *isolation,
        "--wheel-dir",
        str(out),
        str(src),
        what=f"building {project.name} ({project.root})",
    )
    new = set(out.glob("*.whl")) - before
    if len(new) != 1:
        raise PackageError(
            f"building {project.name} ({project.root}) made {len(new)} wheels, not one."
        )
    return new.pop()


# pip's words for a requirement it found no acceptable file of.
_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")
_NEEDED_BY = re.compile(
    r"Could not find a version that satisfies the requirement (\S+) \(from ([^)]+)\)"
)


def _pip(*args: str, what: str, target: Target | None = None) -> None:
    env = {
        **os.environ,
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode == 0:
        return
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    missing = _NO_MATCH.search(result.stderr)
    if missing and target is not None:
        needed = _NEEDED_BY.search(result.stderr)
        by = f" (needed by {needed.group(2)})" if needed else ""
        raise PackageError(
            f"no wheel of {missing.group(1)}{by} for the workers' platform, "
            f"{target.describe()}. The workers install wheels only and never build from "
            "source: pick a version that publishes such a wheel, or build one and offer it "
            "with PIP_FIND_LINKS=DIR (or a private index with PIP_INDEX_URL)."
        )
    tail = "\n".join(f"  {line}" for line in errors[-15:]) or "  (pip said nothing)"
    raise PackageError(f"{what} failed (pip {args[0]}):\n{tail}")


def wheel_name_version(wheel: str) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    name, version = wheel.split("-")[:2]
    return canonical(name), version


def content_digest(wheel: Path) -> str:
    """sha256 of the code in a wheel: its files (names and bytes, in name order) and, of its
    .dist-info, the entry points (the task modules). Not of the zip's bytes, which carry
    times and an order a build backend may not repeat, nor of METADATA and RECORD, which a
    newer backend writes otherwise for the same code (the name and version count through
    the wheel's file name, the dependencies through the wheels they resolved to)."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if ".dist-info/" in name and not name.endswith(".dist-info/entry_points.txt"):
                continue
            h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    return h.hexdigest()


def task_modules_of(wheel: Path) -> list[str]:
    """The task modules a wheel declares (its entry points in TASK_ENTRY_POINTS)."""
    import configparser

    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        if not names:
            return []
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(z.read(names[0]).decode())
    if not parser.has_section(TASK_ENTRY_POINTS):
        return []
    return sorted({v.partition(":")[0].strip() for v in parser[TASK_ENTRY_POINTS].values()})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(
    out: Path,
    kit: Path,
    extras: str,
    projects: Sequence[Project],
    project_wheels: Sequence[Path],
    dependencies: Sequence[Path],
    target: Target,
) -> dict[str, Any]:
    h = hashlib.sha256(json.dumps(target.as_dict(), sort_keys=True).encode() + b"\0")
    for wheel in (kit, *project_wheels):
        h.update("==".join(wheel_name_version(wheel.name)).encode() + b"\0")
        h.update(content_digest(wheel).encode() + b"\0")
    for wheel in dependencies:
        h.update(wheel.name.encode() + b"\0")
    return {
        # No absolute path and no time: the same code gives the same bytes, so an upload
        # of it shows no diff.
        "version": h.hexdigest()[:16],
        "target": target.as_dict(),
        "kit": {"wheel": kit.name, "extras": extras},
        "projects": [
            {
                "name": canonical(project.name),
                "directory": project.root.name,
                "kind": project.kind,
                "wheel": wheel.name,
                "files": len(project.files),
                "bytes": project.size,
                "left_out": list(project.left_out),
                "task_modules": task_modules_of(wheel),
            }
            for project, wheel in zip(projects, project_wheels, strict=True)
        ],
        # Ours first (the kit, the projects): scripts/fleet-boot.sh reinstalls these.
        "built": [wheel_name_version(w.name)[0] for w in (kit, *project_wheels)],
        "wheels": [
            {"file": w.name, "sha256": _sha256(w), "bytes": w.stat().st_size}
            for w in (kit, *project_wheels, *dependencies)
        ],
    }


def _requirements(manifest: dict[str, Any], extras: str) -> str:
    """Every wheel pinned by version and sha256: pip installs exactly these, or nothing."""
    lines = [
        "# Written by `fleet package` (app/wheelhouse.py): install with\n#   pip install "
        f"--no-index --find-links DIR --require-hashes -r {WHEELHOUSE_REQUIREMENTS}\n"
    ]
    kit = manifest["kit"]["wheel"]
    for wheel in manifest["wheels"]:
        name, version = wheel_name_version(wheel["file"])
        extra = f"[{extras}]" if wheel["file"] == kit and extras else ""
        lines.append(f"{name}{extra}=={version} --hash=sha256:{wheel['sha256']}\n")
    return "".join(lines)


def prune(directory: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` most recently used directories under `directory` (not those
    whose name starts with a dot: builds under way); the ones removed."""
    entries = sorted(
        (p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return entries[keep:]


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summary(house: Wheelhouse) -> list[str]:
    """What `fleet package` prints: the version, each project and what it left out, each wheel."""
    m = house.manifest
    wheels = m["wheels"]
    target = Target(m["target"]["arch"], m["target"]["python"], int(m["target"]["glibc"][2:]))
    lines = [
        f"wheelhouse {house.version}: {len(wheels)} wheels, "
        f"{human_size(sum(w['bytes'] for w in wheels))}, for {target.describe()}",
        f"  in {house.directory}",
    ]
    for p in m["projects"]:
        modules = ", ".join(p["task_modules"]) or (
            f"none declared (entry point group {TASK_ENTRY_POINTS}; or name them with "
            "FLEET_INCLUDE)"
        )
        lines.append(
            f"  project {p['name']} ({p['directory']}/): {p['files']} files, "
            f"{human_size(p['bytes'])}; task modules: {modules}"
        )
        if p["left_out"]:
            shown = ", ".join(p["left_out"][:6]) + (", ..." if len(p["left_out"]) > 6 else "")
            lines.append(f"    left out: {len(p['left_out'])} ({shown})")
    lines += [f"  {human_size(w['bytes']):>9}  {w['file']}" for w in wheels]
    return lines
