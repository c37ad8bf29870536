"""A user's project on the fleet, end to end: `fleet package` writes the wheelhouse, a host
installs it offline as fleet-boot does and runs its tasks, `fleet local --code` runs them
on a local fleet, workers that run other code are reported, and the stack's artifact
changes exactly when the code does (the program under Pulumi's mocks).

The example project (examples/sieve, with numpy) is the user's code throughout. The first
build of a source downloads the dependency wheels (pip's cache keeps them); every build is
kept in the tests' cache, named by its sources.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from app.celery_config import make_app
from app.host.command import worker_argv
from app.names import WHEELHOUSE_MANIFEST, WHEELHOUSE_REQUIREMENTS
from app.wheelhouse import Target, build, load_project, read_wheelhouse
from scripts.local.fleet import LocalFleet
from tests.support.checker import read_output
from tests.support.paths import CACHE_HOME, FLEET_BIN, ROOT
from tests.support.projects import EXAMPLE, copy_example, write_project
from tests.support.worker_host import (
    BOOT_SCRIPT,
    CACHE,
    host_env,
    run_job,
    wait_worker,
    wheelhouse,
)

pytestmark = [
    pytest.mark.timeout(300),
    # The program under the mocks imports pulumi_aws's deprecated aliases; not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pulumi_aws"),
]


def primes_below(n: int) -> int:
    """The example's count, computed here without numpy."""
    return sum(all(k % d for d in range(2, int(k**0.5) + 1)) for k in range(2, n))


def fleet(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 300):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    return subprocess.run(
        [str(FLEET_BIN), *args],
        env={**base, "XDG_CACHE_HOME": str(CACHE_HOME), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- fleet package ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("package") / "wheelhouse"
    result = fleet("package", "examples/sieve", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_fleet_package_writes_the_wheelhouse_the_workers_install(packaged):
    out, result = packaged
    house = read_wheelhouse(out)
    assert result.stdout.splitlines()[0].startswith(f"wheelhouse {house.version}: ")
    assert "for CPython 3.11 on x86_64 Linux (manylinux, glibc 2.34 or older)" in result.stdout
    assert (
        f"project fleet-sieve (sieve/): {len(load_project(EXAMPLE).files)} files" in result.stdout
    )
    assert "task modules: sieve.tasks" in result.stdout
    names = [w.name for w in house.wheels]
    assert names[:2] == [
        "celery_fleet-0.1.0-py3-none-any.whl",
        "fleet_sieve-0.1.0-py3-none-any.whl",
    ]
    numpy = next(n for n in names if n.startswith("numpy-2.4.6-cp311-cp311-manylinux"))
    assert numpy.endswith("_x86_64.whl")
    assert all(f"  {name}" in result.stdout for name in names), "every wheel, with its size"
    # Every wheel pinned by version and by the sha256 of the file in the wheelhouse.
    pins = {
        line.split("==")[0].split("[")[0]: line.split("--hash=sha256:")[1]
        for line in (out / WHEELHOUSE_REQUIREMENTS).read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert len(pins) == len(names)
    for path in house.wheels:
        name = path.name.split("-")[0].replace("_", "-").lower()
        assert pins[name] == hashlib.sha256(path.read_bytes()).hexdigest(), path.name
    # The project's wheel holds its package, not its tests or its .gitignore.
    with zipfile.ZipFile(out / "fleet_sieve-0.1.0-py3-none-any.whl") as z:
        shipped = {n for n in z.namelist() if not n.startswith("fleet_sieve-0.1.0.dist-info/")}
    assert shipped == {"sieve/__init__.py", "sieve/primes.py", "sieve/tasks.py"}


def test_graviton_workers_get_arm_wheels(tmp_path):
    """The kit alone: its compiled dependencies (msgspec, pycurl, ...) make the point."""
    house = build([], "arm64", cache=CACHE / "wheelhouses")
    machines = {w.name.rsplit("_", 1)[-1] for w in house.wheels if "manylinux" in w.name}
    assert machines == {"aarch64.whl"}, [w.name for w in house.wheels]
    assert house.manifest["target"] == Target("arm64").as_dict()
    assert house.version != build([], "x86_64", cache=CACHE / "wheelhouses").version


def test_the_same_code_builds_the_same_version_and_bytes_and_junk_changes_nothing(
    tmp_path, packaged
):
    """A clean build (a cache of its own) of a copy strewn with what must not ship: the
    version of the packaged example, and the same bytes for the wheels built here."""
    out, _ = packaged
    house = read_wheelhouse(out)
    copy = copy_example(tmp_path / "sieve")
    for rel in (".git/HEAD", ".venv/pyvenv.cfg", "sieve/__pycache__/tasks.cpython-311.pyc"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_text("junk\n")
    (copy / "results").mkdir()
    (copy / "results" / "a.jsonl").write_text("{}\n")  # ignored by the project's .gitignore
    fresh = build([copy], cache=tmp_path / "cache")
    assert fresh.version == house.version
    for name in ("celery_fleet-0.1.0-py3-none-any.whl", "fleet_sieve-0.1.0-py3-none-any.whl"):
        built = [
            hashlib.sha256((h.directory / name).read_bytes()).hexdigest() for h in (fresh, house)
        ]
        assert built[0] == built[1], f"{name}: its bytes differ between builds"
    left_out = fresh.manifest["projects"][0]["left_out"]
    assert {".git/", ".venv/", "results/", "sieve/__pycache__/"} <= set(left_out)


def test_a_dependency_without_a_wheel_for_the_workers_is_named(tmp_path):
    """Offline: the index is this machine's wheels (PIP_FIND_LINKS, as a user with a private
    wheelhouse would set it) and a dependency that exists only as a source archive."""
    links = tmp_path / "links"
    links.mkdir()
    with tarfile.open(links / "sdist_only_dep-1.0.tar.gz", "w:gz") as archive:
        data = b"Metadata-Version: 2.1\nName: sdist-only-dep\nVersion: 1.0\n"
        info = tarfile.TarInfo("sdist_only_dep-1.0/PKG-INFO")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    project = write_project(
        tmp_path / "needs", "needs-sdist", {"needs/__init__.py": ""}, ["needs"],
        dependencies=["sdist-only-dep==1.0"],
    )  # fmt: skip
    # The kit's own dependencies, and setuptools for building the project, are found here.
    local = wheelhouse(extras=("aws", "operator")).directory
    out = tmp_path / "out"
    result = fleet(
        "package", str(project), "--out", str(out),
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": f"{local} {links}",
             "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("fleet: no wheel of sdist-only-dep==1.0 (needed by needs-sdist")
    assert "for the workers' platform, CPython 3.11 on x86_64 Linux" in message
    assert "never build from source" in message and "PIP_FIND_LINKS" in message
    assert "Traceback" not in result.stderr and not out.exists()


def test_an_unknown_project_directory_is_refused(tmp_path):
    result = fleet("package", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr or "no such directory" in result.stderr


# -- installed offline on a host, run by its worker ------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A broker and a result store, and no worker of their own."""
    with LocalFleet(0, "redis", workdir=tmp_path_factory.mktemp("servers")) as f:
        yield f


def install(house_dir: Path, root: Path) -> Path:
    """The wheelhouse installed as fleet-boot installs it on a host; the venv's Python."""
    result = subprocess.run(
        ["bash", str(BOOT_SCRIPT), "install", str(house_dir)],
        env=host_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return root / "opt" / "venv" / "bin" / "python"


def start_worker(python: Path, servers: LocalFleet, node: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "PYTHON"))}
    env.update(servers.settings.as_env(), FLEET_CONCURRENCY="1")
    with open(log, "wb") as out:
        return subprocess.Popen(
            worker_argv(str(python), servers.settings.queue, 1, node),
            env=env,
            cwd=python.parent,  # nothing of this checkout on its path
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def example_host(tmp_path_factory) -> Path:
    """The example's wheelhouse (for this machine) installed on a host; the venv's Python."""
    return install(wheelhouse(EXAMPLE).directory, tmp_path_factory.mktemp("example-host"))


def test_a_host_runs_the_projects_tasks_from_the_offline_wheelhouse(
    servers, example_host, tmp_path
):
    house, python = wheelhouse(EXAMPLE), example_host
    # Nothing of the checkout: the kit, the project and numpy all come from the venv.
    where = subprocess.run(
        [str(python), "-c", "import app, sieve, numpy; print(app.__file__, sieve.__file__)"],
        cwd=python.parent, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(python.parents[2]) for p in where), where
    worker = start_worker(python, servers, "sieve@test", tmp_path / "worker.log")
    try:
        beat = wait_worker(servers.settings, "sieve@test", timeout=90, proc=worker)
        assert beat["code"] == house.version, "the worker reports the wheelhouse it runs"
        results = tmp_path / "out.jsonl"
        summary = run_job(servers.settings, results, n=1500, task="count_primes")
        assert summary.status == "ok" and summary.items == 1500
        records = sorted(read_output(results), key=lambda r: r["id"])
        assert [r["id"] for r in records] == list(range(1500))
        assert all(r["result"] == {"n": r["id"], "primes": primes_below(r["id"])} for r in records)
        # The project's plain Celery task runs too.
        client = make_app(servers.settings)
        assert client.send_task("sieve.primes_below", args=[1000]).get(timeout=60) == 168
    finally:
        stop(worker)


# -- fleet local --code -----------------------------------------------------------------


def test_fleet_local_code_runs_the_project(local_fleet, tmp_path):
    f = local_fleet("-n", "2", "--code", "examples/sieve")
    state = f.wait_up(timeout=240)
    house = wheelhouse(EXAMPLE)
    assert state["env"]["FLEET_CODE_VERSION"] == house.version
    assert f"code: wheelhouse {house.version} (fleet-sieve)" in f.output()
    ran = f.cmd("run", "count_primes", "--ids", "range:0:2000", "--out", str(tmp_path / "o.jsonl"))
    assert ran.returncode == 0, ran.stderr
    assert "warning" not in ran.stderr
    records = {r["id"]: r["result"]["primes"] for r in read_output(tmp_path / "o.jsonl")}
    assert records == {n: primes_below(n) for n in range(2000)}
    status = f.cmd("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert {w["code"] for w in report["workers"]} == {house.version}
    assert report["code"] == {
        "workers": {house.version: 2},
        "deployed": house.version,
        "problem": None,
    }
    assert f.stop(signal.SIGINT) == 0


def test_fleet_local_code_refuses_what_is_not_a_project(local_fleet, tmp_path):
    (tmp_path / "empty").mkdir()
    f = local_fleet("--code", str(tmp_path / "empty"))
    assert f.proc.wait(120) == 1
    assert "is not a project: no pyproject.toml and no Python module" in f.output()
    assert not f.state_file.exists()


def test_fleet_local_code_explains_a_worker_that_cannot_import_its_tasks(local_fleet, tmp_path):
    project = write_project(
        tmp_path / "proj",
        "forgetful-proj",
        {"forgetful/__init__.py": "", "forgetful/tasks.py": "import not_a_dependency\n"},
        tasks=["forgetful.tasks"],
    )
    f = local_fleet("--code", str(project))
    assert f.proc.wait(240) == 1, f.output()
    said = f.output()
    assert "instance 0 exited with code 1 while starting" in said and ", kept):" in said
    assert "No module named 'not_a_dependency'" in said


# -- one version across the fleet -------------------------------------------------------


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, servers, example_host):
    """One worker on the example, one on a changed copy, against the same servers."""
    changed = copy_example(tmp_path_factory.mktemp("changed") / "sieve")
    primes = changed / "sieve" / "primes.py"
    primes.write_text(primes.read_text() + "\n# a change that ships\n")
    houses = [wheelhouse(EXAMPLE), wheelhouse(changed)]
    assert houses[0].version != houses[1].version
    root = tmp_path_factory.mktemp("changed-host")
    pythons = [example_host, install(houses[1].directory, root)]
    workers = []
    try:
        for n, python in enumerate(pythons):
            workers.append(start_worker(python, servers, f"v{n}@test", root / f"v{n}.log"))
            wait_worker(servers.settings, f"v{n}@test", timeout=90, proc=workers[-1])
        yield houses, workers
    finally:
        for worker in workers:
            stop(worker)


def test_workers_on_two_versions_are_reported_and_can_stop_a_job(servers, two_versions, tmp_path):
    (old, new), _ = two_versions
    env = {**servers.settings.as_env(), "FLEET_CODE_VERSION": old.version}
    out = tmp_path / "o.jsonl"
    warned = fleet("run", "count_primes", "--ids", "range:0:200", "--out", str(out), env=env)
    assert warned.returncode == 0, warned.stderr
    warning = next(line for line in warned.stderr.splitlines() if line.startswith("warning:"))
    assert warning.startswith("warning: the workers online run 2 versions of the code: 1 ")
    assert f"{old.version} (deployed)" in warning and f"on {new.version}" in warning
    refused = fleet(
        "run", "count_primes", "--ids", "range:0:200", "--out", str(tmp_path / "r.jsonl"),
        "--require-version", env=env,
    )  # fmt: skip
    assert refused.returncode == 4, refused.stderr
    assert "Not started (--require-version)" in refused.stderr and "job j" not in refused.stderr
    assert not (tmp_path / "r.jsonl").exists()
    status = fleet("status", env=env)
    assert f"code {old.version}" in status.stdout and f"code {new.version}" in status.stdout
    assert "warning: the workers online run 2 versions of the code" in status.stdout


def test_a_fleet_on_other_code_than_deployed_is_refused(servers, two_versions, tmp_path):
    (old, new), workers = two_versions
    stop(workers[0])  # only the changed code is online now
    env = {**servers.settings.as_env(), "FLEET_CODE_VERSION": old.version}
    refused = fleet("run", "count_primes", "--ids", "range:0:10", "--require-version", env=env)
    assert refused.returncode == 4
    assert f"run code 1 worker on {new.version}, not {old.version}, which was deployed" in (
        refused.stderr
    )
    agreed = {**env, "FLEET_CODE_VERSION": new.version}
    ran = fleet("run", "count_primes", "--ids", "range:0:10", "--require-version", env=agreed)
    assert ran.returncode == 0, ran.stderr


# -- the stack's artifact: changed exactly when the code is -----------------------------


def record(project: Path) -> dict:
    """What the program under the mocks uploads (each key, with its file's sha256), its
    launch template's user-data and the version, with celery-fleet:code = [project]."""
    from tests.support.record_stack import record as record_stack

    recorded = record_stack("e2e", (str(project),))
    objects = {
        r["inputs"]["key"]: r["inputs"]["source"]["file_asset"]
        for r in recorded["resources"]
        if r["type"] == "aws:s3/bucketObjectv2:BucketObjectv2"
    }
    template = next(r for r in recorded["resources"] if r["type"].endswith("LaunchTemplate"))
    return {
        "objects": {
            k: hashlib.sha256(Path(p).read_bytes()).hexdigest() for k, p in objects.items()
        },
        "user_data": template["inputs"]["userData"],
        "version": recorded["outputs"]["codeVersion"],
    }


def test_pulumi_preview_changes_the_artifact_exactly_when_the_code_changes(tmp_path, monkeypatch):
    """The program under Pulumi's mocks (tests/support/record_stack.py) with the real build:
    the example as is, a copy with junk beside it (no diff: the same objects and user-data),
    and a changed copy (a new artifact, so a new launch template version and a refresh)."""
    junk = copy_example(tmp_path / "junk" / "sieve")
    (junk / ".git").mkdir()
    (junk / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (junk / "ids.jsonl").write_text("{}\n")
    changed = copy_example(tmp_path / "changed" / "sieve")
    (changed / "sieve" / "tasks.py").write_text(
        (changed / "sieve" / "tasks.py").read_text() + "\nANSWER = 42\n"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(CACHE_HOME))  # the builds of the other tests
    same, again, other = (record(p) for p in (EXAMPLE, junk, changed))
    house = wheelhouse(EXAMPLE)
    assert same["version"] == house.version
    assert set(same["objects"]) == {f"artifacts/{house.version}/{p.name}" for p in house.files}
    assert again == same, "an unchanged project shows no diff"
    assert other["version"] != same["version"]
    assert set(other["objects"]).isdisjoint(same["objects"]), "a new artifact, under a new key"
    assert other["user_data"] != same["user_data"], "a new template version: a refresh"
    manifest = next(k for k in other["objects"] if k.endswith(WHEELHOUSE_MANIFEST))
    assert manifest == f"artifacts/{other['version']}/{WHEELHOUSE_MANIFEST}"
