"""`fleet run` on bad input: one clear line on stderr, no traceback, the documented exit code.

Exit codes (scripts/cli/): 2 bad input, usage or unknown task; 3 broker or
result store unreachable. Every command runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.local.processes import free_port
from tests.support.paths import FLEET_BIN, ROOT

FLEET = str(FLEET_BIN)
CELERY = str(Path(sys.executable).with_name("celery"))
SECRET = "Sup3r-s3cret-pw"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of a user with no FLEET_* settings and no local fleet running."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "CELERY_")) and k != "XDG_STATE_HOME"
    }
    state = tmp_path / "state"
    state.mkdir()
    clean["FLEET_STATE_DIR"] = str(state)
    return clean


def fleet_cmd(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLEET, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The single stderr line of a failed command, checked for a clean failure."""
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, detail
    assert proc.returncode == code, detail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("fleet: "), detail
    for word in words:
        assert word in line, detail
    assert proc.stdout == "", detail
    return line


def with_password(url: str, password: str) -> str:
    """`url` with its password replaced."""
    scheme, rest = url.split("://", 1)
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:{password}@{host}"


def urls(fleet) -> list[str]:
    return ["--broker", fleet.settings.broker_url, "--backend", fleet.settings.result_url]


redis_only = pytest.mark.parametrize("fleet", ["redis"], indirect=True)


# -- no servers needed ------------------------------------------------------------


def test_missing_file(env, tmp_path):
    missing = tmp_path / "nope.txt"
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", str(missing)),
        2,
        str(missing),
        "does not exist",
    )


def test_directory_as_ids(env, tmp_path):
    one_line_error(fleet_cmd(env, "run", "process_id", "--ids", str(tmp_path)), 2, "not a file")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--ids", "range:5:1"], ["is empty"]),
        (["--ids", "ids.csv"], ["--column"]),
    ],
)
def test_bad_source_spec(env, tmp_path, args, words):
    (tmp_path / "ids.csv").write_text("id\n1\n")
    args = [str(tmp_path / a) if a.endswith(".csv") else a for a in args]
    one_line_error(fleet_cmd(env, "run", "process_id", *args), 2, *words)


def test_no_task_or_ids_is_a_usage_error(env):
    one_line_error(fleet_cmd(env, "run", "process_id"), 2, "TASK", "--ids")


def test_bad_option_value_is_a_usage_error(env):
    proc = fleet_cmd(env, "run", "process_id", "--ids", "range:10", "--batch-size", "lots")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "'lots'" in proc.stderr


def test_no_broker_and_no_local_fleet_says_start_fleet_local(env):
    line = one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", "range:0:10"), 2, "no broker URL"
    )
    assert "`fleet local`" in line


def test_stale_local_fleet_state_is_ignored(env):
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = Path(env["FLEET_STATE_DIR"]) / "local.json"
    state.write_text(
        json.dumps(
            {
                "pid": dead.pid,
                "env": {
                    "FLEET_BROKER_URL": "redis://127.0.0.1:1/0",
                    "FLEET_RESULT_URL": "redis://127.0.0.1:1/1",
                },
            }
        )
    )
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", "range:0:10"),
        2,
        "no broker URL",
        "fleet local",
    )


def test_no_result_store(env):
    env = {**env, "FLEET_BROKER_URL": "redis://127.0.0.1:1/0"}
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", "range:0:10"),
        2,
        "no result store URL",
        "--backend",
    )


# More malformed URLs are covered without a subprocess in test_settings.py.
@pytest.mark.parametrize(
    "broker, words",
    [
        ("notaurl", ["broker URL", "'notaurl'", "scheme", "redis://"]),
        (f"redis://:{SECRET}@127.0.0.1:notaport/0", ["malformed"]),
        (f"redis//:{SECRET}@127.0.0.1:6379/0", ["broker URL", "scheme"]),
        (f"amqp:/fleet:{SECRET}@127.0.0.1:5672//", ["broker URL", "names no host"]),
    ],
)
def test_malformed_broker_url(env, broker, words):
    proc = fleet_cmd(
        env,
        "run",
        "process_id",
        "--ids",
        "range:0:10",
        "--broker",
        broker,
        "--backend",
        "redis://127.0.0.1:1/1",
    )
    one_line_error(proc, 2, *words)
    assert SECRET not in proc.stderr


def test_malformed_url_from_the_environment(env):
    env = {
        **env,
        "FLEET_BROKER_URL": "redis://127.0.0.1:6379/0",
        "FLEET_RESULT_URL": f"redis://:{SECRET}@127.0.0.1:port/1",
    }
    proc = fleet_cmd(env, "run", "process_id", "--ids", "range:0:10")
    one_line_error(proc, 2, "result store URL", "malformed")
    assert SECRET not in proc.stderr


def test_bad_number_in_the_environment(env):
    env = {
        **env,
        "FLEET_BROKER_URL": "redis://127.0.0.1:6379/0",
        "FLEET_RESULT_URL": "redis://127.0.0.1:6379/1",
        "FLEET_LEASE_SECONDS": "soon",
    }
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", "range:0:10"), 2, "FLEET_LEASE_SECONDS"
    )


def test_unreachable_result_store(env):
    port = free_port()
    proc = fleet_cmd(
        env,
        "run",
        "process_id",
        "--ids",
        "range:0:10",
        "--broker",
        f"redis://127.0.0.1:{free_port()}/0",
        "--backend",
        f"redis://:{SECRET}@127.0.0.1:{port}/1",
        timeout=60,
    )
    line = one_line_error(proc, 3, "result store", f"127.0.0.1:{port}")
    assert SECRET not in line


def test_worker_without_broker_url_prints_one_line(env):
    proc = subprocess.run(
        [CELERY, "-A", "app", "worker", "--loglevel", "WARNING"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode != 0, detail
    assert "Traceback" not in proc.stderr + proc.stdout, detail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("fleet: no broker URL"), detail
    assert "FLEET_BROKER_URL" in lines[0]


def test_worker_with_malformed_broker_url_hides_the_password(env):
    env = {
        **env,
        "FLEET_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:port/0",
        "FLEET_RESULT_URL": "redis://127.0.0.1:6379/1",
    }
    proc = subprocess.run(
        [CELERY, "-A", "app", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "malformed" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


# -- against a real fleet ---------------------------------------------------------


@redis_only
def test_malformed_line_names_the_line(env, fleet, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n3\n\n5\n")
    out = tmp_path / "out.jsonl"
    proc = fleet_cmd(env, "run", "process_id", "--ids", str(ids), "--out", str(out), *urls(fleet))
    one_line_error(proc, 2, str(ids), "line 4", "empty line")
    assert not out.exists() or out.read_text() == ""  # nothing sent, nothing written


@redis_only
def test_malformed_jsonl_names_the_line(env, fleet, tmp_path):
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"id": 1}\n{"id": 2}\n{"id": [3]}\n')
    proc = fleet_cmd(env, "run", "process_id", "--ids", str(ids), "--field", "id", *urls(fleet))
    one_line_error(proc, 2, "line 3", "'id'")


@redis_only
def test_invalid_utf8_names_the_line(env, fleet, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"1\n2\n\xff\n")
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", str(ids), *urls(fleet)), 2, "line 3", "UTF-8"
    )


@redis_only
def test_empty_file(env, fleet, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("")
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", str(ids), *urls(fleet)), 2, str(ids), "no IDs"
    )


@redis_only
def test_csv_without_the_column(env, fleet, tmp_path):
    ids = tmp_path / "ids.csv"
    ids.write_text("user,value\n1,2\n")
    one_line_error(
        fleet_cmd(env, "run", "process_id", "--ids", str(ids), "--column", "id", *urls(fleet)),
        2,
        "no column 'id'",
        "user, value",
    )


def test_unknown_task(env, fleet):
    """The workers refuse it (on either broker) and the launcher stops with their reason."""
    proc = fleet_cmd(env, "run", "no_such_task", "--ids", "range:0:50", *urls(fleet))
    line = one_line_error(proc, 2, "unknown task", "'no_such_task'")
    assert "echo" in line  # lists what the workers can run


@redis_only
@pytest.mark.parametrize("task", ["os:system", "tests.support.fleet_tasks:system"])
def test_task_outside_the_allow_list(env, fleet, task):
    one_line_error(
        fleet_cmd(env, "run", task, "--ids", "range:0:50", *urls(fleet)),
        2,
        "unknown task",
        repr(task),
    )


@redis_only
@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_unreachable_broker(env, fleet, scheme):
    port = free_port()
    broker = (
        f"redis://:{SECRET}@127.0.0.1:{port}/0"
        if scheme == "redis"
        else f"amqp://fleet:{SECRET}@127.0.0.1:{port}//"
    )
    proc = fleet_cmd(
        env,
        "run",
        "process_id",
        "--ids",
        "range:0:10",
        "--broker",
        broker,
        "--backend",
        fleet.settings.result_url,
        timeout=60,
    )
    line = one_line_error(proc, 3, "cannot reach the broker", f"127.0.0.1:{port}")
    assert SECRET not in line


@redis_only
def test_wrong_password_for_the_result_store(env, fleet):
    backend = with_password(fleet.settings.result_url, SECRET)
    proc = fleet_cmd(
        env,
        "run",
        "process_id",
        "--ids",
        "range:0:10",
        "--broker",
        fleet.settings.broker_url,
        "--backend",
        backend,
        timeout=60,
    )
    one_line_error(proc, 3, "result store")
    assert SECRET not in proc.stderr


@redis_only
def test_unwritable_output(env, fleet, tmp_path):
    out = tmp_path / "no-such-dir" / "out.jsonl"
    proc = fleet_cmd(
        env,
        "run",
        "echo",
        "--ids",
        "range:0:10",
        "--batch-size",
        "5",
        "--out",
        str(out),
        *urls(fleet),
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot write {out}" in proc.stderr


@redis_only
def test_success_never_prints_the_password(env, fleet, tmp_path):
    out = tmp_path / "out.jsonl"
    password = fleet.settings.broker_url.split("://:", 1)[1].split("@", 1)[0]
    assert len(password) > 8
    proc = fleet_cmd(
        env, "run", "double", "--ids", "range:0:100", "--out", str(out), "--json", *urls(fleet)
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert password not in proc.stderr + proc.stdout
    assert len(out.read_text().splitlines()) == 100
