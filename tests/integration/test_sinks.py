"""Sinks written by the workers, each exactly once per ID however often a batch runs: S3 (on
moto's server), PostgreSQL (Debian's server, started here) and a user's own writer.

Each job is 100,000 IDs of `paced` (every 7th ID an error) on two worker instances, one of
which is killed (`kill -9`, its pool processes with it) in the middle of a batch, then
brought back as `fleet local` would: its batch runs again, and the sink holds every ID
once, the errors as error records.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
from click.testing import CliRunner

from app.sinks import sink_spec
from scripts.cli import cli
from tests.support.checker import exactly_once
from tests.support.fleets import TASKS, settle
from tests.support.jobs import Background
from tests.support.postgres import Postgres
from tests.support.sink_writers import load
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)

N, BATCH = 100_000, 2_000
WRITERS = "tests.support.sink_writers"


def expected(i: int) -> dict:
    """The record of ID i, as the output file would hold it."""
    if i % 7 == 0:
        return {"id": i, "error": {"type": "ValueError", "message": f"poison id {i}"}}
    return {"id": i, "result": i + 1}


def as_expected(r: dict) -> bool:
    """`r` is ID i's record (an error's traceback aside: test_batch checks it)."""
    if "error" in r:
        r = {**r, "error": {k: v for k, v in r["error"].items() if k != "traceback"}}
    return r == expected(r["id"])


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres().start()
    yield pg
    pg.close()


@pytest.fixture
def sink_dir(tmp_path) -> Path:
    directory = tmp_path / "sink"
    directory.mkdir()
    return directory


@pytest.fixture
def fleet(make_fleet, sink_dir):
    """Two instances; the user's writer module loaded with the tasks."""
    return make_fleet(
        instances=2,
        include=(*TASKS, WRITERS),
        env={"FLEET_TEST_SINK_DIR": str(sink_dir)},
        lease_seconds=2,
    )


def kill_one_mid_batch(fleet, job: Background) -> None:
    """kill -9 instance 0 (and its pool) once it runs a batch of the job; restart it."""
    inst = fleet.instances[0]

    def running() -> bool:
        return any(p.cpu_times().user > 0.05 for p in psutil.Process(inst.proc.pid).children())

    wait_until(running, 30, "instance 0 running a batch")
    for p in [
        *psutil.Process(inst.proc.pid).children(recursive=True),
        psutil.Process(inst.proc.pid),
    ]:
        p.kill()
    inst.proc.wait(10)
    while job.thread.is_alive():
        fleet.supervise()
        job.thread.join(0.2)
    assert inst.restarts >= 1


def run_with_a_kill(fleet, sink: dict) -> object:
    job = Background(fleet, None, N, BATCH, task="paced", sink=sink)
    kill_one_mid_batch(fleet, job)
    summary = job.result(180)
    assert (summary.status, summary.items, summary.errors) == ("errors", N, len(range(0, N, 7)))
    settle(fleet)
    return summary


def test_s3_parts_hold_every_id_once_and_a_manifest(fleet, aws):
    _, endpoint = aws
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="fleet-out")
    summary = run_with_a_kill(fleet, sink_spec(f"s3://fleet-out/runs/?endpoint_url={endpoint}"))
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="fleet-out", Prefix=f"runs/{summary.job}/"
        )
        for o in page.get("Contents", [])
    ]
    parts = sorted(k for k in keys if k.endswith(".jsonl"))
    assert len(parts) == summary.batches
    records = [
        json.loads(line)
        for key in parts
        for line in s3.get_object(Bucket="fleet-out", Key=key)["Body"].read().splitlines()
    ]
    exactly_once(records, range(N))
    assert all(as_expected(r) for r in records)
    manifest = json.loads(
        s3.get_object(Bucket="fleet-out", Key=f"runs/{summary.job}/_manifest.json")["Body"].read()
    )
    assert manifest["items"] == N and manifest["errors"] == summary.errors
    assert [f"runs/{summary.job}/{p}" for p in manifest["parts"]] == parts


def test_postgres_rows_once_with_at_most_max_writers_connections(fleet, postgres):
    """Each batch's insert is made to last (a trigger sleeps), so without the cap the
    fleet's two slots would often hold two connections at once."""
    with postgres.connect() as conn:
        conn.execute(
            "CREATE TABLE scores (job text NOT NULL, id text NOT NULL, result jsonb, "
            "error jsonb, PRIMARY KEY (job, id))"
        )
        conn.execute(
            "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow AFTER INSERT ON scores FOR EACH STATEMENT "
            "EXECUTE FUNCTION slow_insert()"
        )
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(postgres.writers())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run_with_a_kill(fleet, sink_spec(postgres.url(table="scores"), max_writers=1))
    finally:
        stop.set()
        sampler.join(5)
    assert max(seen) == 1, f"the cap, and reached: {sorted(set(seen))}"
    rows = postgres.query("SELECT id, result, error FROM scores WHERE job = %s", summary.job)
    records = [
        {"id": int(i), **({"error": e} if e is not None else {"result": r})} for i, r, e in rows
    ]
    exactly_once(records, range(N))
    assert all(as_expected(r) for r in records)


def test_a_users_writer_gets_each_batch_by_its_key(fleet, sink_dir):
    summary = run_with_a_kill(fleet, sink_spec(None, f"{WRITERS}:save"))
    records = [
        {"id": r["id"], **({"error": r["error"]} if r["error"] else {"result": r["result"]})}
        for r in load(sink_dir, summary.job)
    ]
    exactly_once(records, range(N))
    assert all(as_expected(r) for r in records)
    assert len(list(sink_dir.glob(f"{summary.job}-*.jsonl"))) == summary.batches


# -- what cannot be a sink: one line each, exit code 2, nothing sent --------------------


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--out", "ftp://host/x"], "no sink for ftp://"),
        (["--out", "out.jsonl", "--max-writers", "2"], "--max-writers goes with --out postgresql"),
        (["--out", "s3://b/p/", "--sink", "m:f"], "give --out or --sink, not both"),
        (["--sink", "nocolon"], "give module:function"),
    ],
)
def test_a_sink_that_cannot_be_is_refused_before_anything_runs(fleet, tmp_path, args, said):
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    result = CliRunner().invoke(cli, ["run", "double", "--ids", "range:0:10", *args, *urls(fleet)])
    assert result.exit_code == 2, result.output
    assert said in result.stderr and "Traceback" not in result.output
    assert "job j" not in result.stderr


def urls(fleet) -> list[str]:
    return ["--broker", fleet.settings.broker_url, "--backend", fleet.settings.result_url]


def test_a_sink_the_launcher_cannot_write_is_refused(fleet, aws, postgres):
    _, endpoint = aws
    for out, said in (
        (
            f"s3://no-such-bucket/p/?endpoint_url={endpoint}",
            "s3://no-such-bucket/p/ refused a write",
        ),
        (postgres.url("reader", table="scores_ro"), "permission denied"),
        (postgres.url(table=""), "names no table"),
    ):
        result = CliRunner().invoke(
            cli, ["run", "double", "--ids", "range:0:10", "--out", out, *urls(fleet)]
        )
        assert result.exit_code == 2, result.output
        assert said in result.stderr, result.stderr
        assert postgres.password not in result.output
        assert "job j" not in result.stderr


def test_a_writer_the_workers_may_not_call_stops_the_job_naming_it(fleet):
    result = CliRunner().invoke(
        cli, ["run", "double", "--ids", "range:0:10", "--sink", "os:system", *urls(fleet)]
    )
    assert result.exit_code == 2, result.output
    assert "os is not one of the workers' task modules" in result.stderr


def test_a_sink_that_refuses_writes_pauses_the_job_until_it_takes_them(fleet, postgres):
    """The table's INSERT privilege revoked mid-job: the job (submitted, driven in the fleet)
    pauses, `fleet jobs` says why, nothing is marked written that was not; granted back,
    the job goes on and ends with every ID once."""
    from app.launcher import JobOptions, Launcher, Source
    from app.launcher.driver import submit
    from app.launcher.jobs import view, wait

    n = 20_000
    launcher = Launcher(fleet.settings)
    store, settings = launcher.store, fleet.settings
    job = submit(
        launcher,
        JobOptions(
            task="paced",
            source=Source.parse(f"range:0:{n}"),
            batch_size=500,
            sink=sink_spec(postgres.url(table="paused")),
            progress=False,
        ),
    )

    def rows() -> int:
        return int(postgres.query("SELECT count(*) FROM paused WHERE job = %s", job)[0][0])

    wait_until(lambda: rows() > 0, 60, "the first rows")
    with postgres.connect() as conn:
        conn.execute("REVOKE INSERT ON paused FROM fleet")
    try:
        paused = wait_until(
            lambda: (v := view(store, settings, job)) and v.state == "paused" and v,
            90,
            "the job to pause",
        )
        assert "permission denied" in paused.reason
        # Nothing more reaches the table, and the job's count is the table's.
        held = rows()
        time.sleep(2)
        assert rows() == held
        assert view(store, settings, job).items == held
    finally:
        with postgres.connect() as conn:
            conn.execute("GRANT INSERT ON paused TO fleet")
    end = wait(store, settings, job, timeout=150)
    assert (end.state, end.items) == ("errors", n), end
    got = postgres.query("SELECT id, result, error FROM paused WHERE job = %s", job)
    records = [
        {"id": int(i), **({"error": e} if e is not None else {"result": r})} for i, r, e in got
    ]
    exactly_once(records, range(n))
    settle(fleet)


def test_a_retry_replaces_the_error_rows_of_its_job(fleet, postgres, tmp_path):
    from app.launcher import JobOptions, Launcher, Source
    from app.launcher.driver import retry, submit
    from app.launcher.jobs import wait

    n, token = 2_000, uuid.uuid4().hex  # the markers of `flaky` outlive the test
    src = tmp_path / "ids.txt"
    src.write_text("".join(f"{token}:{i}\n" for i in range(n)))
    launcher = Launcher(fleet.settings)
    store, settings = launcher.store, fleet.settings
    opts = JobOptions(
        task="flaky",
        source=Source.parse(str(src)),
        batch_size=100,
        sink=sink_spec(postgres.url(table="retried")),
        progress=False,
    )
    job = submit(launcher, opts)
    assert wait(store, settings, job, timeout=120).state == "errors"
    errors = "SELECT count(*) FROM retried WHERE job = %s AND error IS NOT NULL"
    assert postgres.query(errors, job)[0][0] == len(range(0, n, 7))
    again, count = retry(launcher, job)
    assert count == len(range(0, n, 7))
    assert wait(store, settings, again, timeout=120).state == "ok"
    rows = postgres.query("SELECT id, result, error FROM retried")
    assert {r[0].partition(":")[0] for r in rows} == {token}
    assert all(e is None for _, _, e in rows)
    exactly_once(
        [{"id": i, "result": r} for i, r, _ in rows],
        [f"{token}:{i}" for i in range(n)],
        lambda i: int(i.partition(":")[2]) + 1,
    )
    assert {j for (j,) in postgres.query("SELECT DISTINCT job FROM retried")} == {job}


def test_the_sink_password_comes_from_fleet_sink_password_and_is_never_printed(
    make_fleet, postgres, tmp_path
):
    """A sink URL without a password (as on a command line it must be): the workers and
    `fleet submit` take it from FLEET_SINK_PASSWORD (a stack's SecureString parameter),
    and neither the commands' output nor the workers' logs nor the job's record hold it."""
    import os
    import subprocess

    from tests.support.paths import FLEET_BIN, ROOT

    secret = {"FLEET_SINK_PASSWORD": postgres.password}
    fleet = make_fleet(instances=2, env=secret, lease_seconds=2)
    url = postgres.url(table="nopass").replace(f":{postgres.password}@", "@")
    assert postgres.password not in url
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CELERY_"))}
    env.update(secret, FLEET_STATE_DIR=str(tmp_path / "no-local-fleet"))
    s = fleet.settings
    where = ["--broker", s.broker_url, "--backend", s.result_url]

    def fleet_cmd(*args: str, with_env: dict[str, str] = env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(FLEET_BIN), *args, *where],
            capture_output=True,
            timeout=120,
            env=with_env,
            cwd=ROOT,
        )

    # Without the variable the check at submit says the server wants a password.
    bare = {k: v for k, v in env.items() if k != "FLEET_SINK_PASSWORD"}
    refused = fleet_cmd("submit", "double", "--ids", "range:0:10", "--out", url, with_env=bare)
    assert refused.returncode == 2, refused.stderr.decode()
    p = fleet_cmd("submit", "double", "--ids", "range:0:3000", "--out", url)
    assert p.returncode == 0, p.stderr.decode()
    job = p.stdout.decode().strip()
    w = fleet_cmd("wait", job)
    assert w.returncode == 0, w.stderr.decode()
    rows = postgres.query("SELECT id, result FROM nopass WHERE job = %s", job)
    exactly_once([{"id": int(i), "result": r} for i, r in rows], range(3000), lambda i: 2 * i)
    listed = fleet_cmd("jobs", "--json")
    said = b"".join(c.stdout + c.stderr for c in (refused, p, w, listed))
    logs = b"".join(f.read_bytes() for f in fleet.workdir.glob("*.log"))
    from app.store import open_store

    record = json.dumps(open_store(s).get_meta(job)).encode()
    for text in (said, logs, record):
        assert postgres.password.encode() not in text
    settle(fleet)
