"""Security, tried for real against local brokers configured as the stack configures them.

The fleets here speak TLS only, with a password, as the stack's Amazon MQ
(amqps://) and ElastiCache Valkey (rediss://, AUTH token) do: a Redis broker
and a RabbitMQ broker, each with a Redis result store, real servers and a
real `celery worker`, certificates from a throwaway CA (`LocalFleet(tls=True)`).
Each test then tries what an outsider or a mistake would:

- no password or a wrong one, from raw clients and from `fleet run`;
- plaintext where TLS is required, an unknown CA, the wrong host name;
- a pickled message (code execution if it were ever unpickled), unknown
  tasks, malformed and oversized batches published straight to the queue;

and looks for the password everywhere it must not be: process listings,
logs, `fleet run` output and error messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import amqp
import kombu
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.celery_config import broker_ssl, make_app
from app.host.command import worker_argv
from app.launcher.job import JobOptions
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.queue_depth import ready_count as autoscaler_queue_depth
from app.settings import Settings
from app.store.redis import RedisStore, _keys
from scripts.local.fleet import LocalFleet
from scripts.local.processes import free_port, stop_process
from scripts.status import queue_depth as status_queue_depth
from tests.support.checker import read_output
from tests.support.fleets import TASKS
from tests.support.paths import FLEET_BIN, ROOT
from tests.support.wait import wait_until

FLEET = str(FLEET_BIN)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def fleet(request, tmp_path_factory):
    """A TLS-only fleet with a random password, one worker instance; one per broker."""
    workdir = tmp_path_factory.mktemp(f"security-{request.param}")
    with LocalFleet(
        1, request.param, include=TASKS, workdir=workdir, lease_seconds=3, tls=True
    ) as f:
        yield f


def password(fleet: LocalFleet) -> str:
    pw = urlsplit(fleet.settings.broker_url).password
    assert pw and len(pw) >= 20 and pw in fleet.settings.result_url
    return pw


def swap_password(url: str, new: str) -> str:
    head, _, tail = url.rpartition("@")
    user = head.split("://", 1)[1].partition(":")[0]
    return f"{head.split('://', 1)[0]}://{user}:{new}@{tail}"


def clean_env(tmp_path: Path, **fleet_vars: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "CELERY_")) and k != "XDG_STATE_HOME"
    }
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return {**env, "FLEET_STATE_DIR": str(state), **fleet_vars}


def fleet_env(fleet: LocalFleet, tmp_path: Path, **changes: str) -> dict[str, str]:
    """The environment `fleet run` needs for `fleet` (URLs in the environment, never in argv)."""
    s = fleet.settings
    urls = {
        "FLEET_BROKER_URL": s.broker_url,
        "FLEET_RESULT_URL": s.result_url,
        "FLEET_TLS_CA_FILE": s.tls_ca_file or "",
    }
    return clean_env(tmp_path, **{**urls, **changes})


def instance_log(fleet: LocalFleet) -> str:
    return (fleet.workdir / "instance0.log").read_text(errors="replace")


def error_text(call) -> str:
    """The message of what `call()` raised (it must raise)."""
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("the call succeeded; it had to be refused")


def raw_redis(port: int, **kwargs) -> redis.Redis:
    """A redis-py client that tries once (its default retries would hide nothing, slowly)."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=5,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )


def connect_once(conn: kombu.Connection) -> None:
    conn.ensure_connection(max_retries=0)


def listening_ports(pid: int) -> set[int]:
    proc = psutil.Process(pid)
    ports = set()
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            ports |= {
                c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            }
    return ports


def normal_job(fleet: LocalFleet, out: Path, timeout: float = 30) -> float:
    """Run a small job on the fleet; its wall time (it must finish within `timeout`)."""
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = Launcher(fleet.settings).run(
                JobOptions(
                    task="double",
                    source=Source.parse("range:0:2000"),
                    batch_size=250,
                    out=out,
                    progress=False,
                )
            )
        except BaseException as exc:
            result["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"a normal job did not finish within {timeout} s"
    if "error" in result:
        raise result["error"]
    summary = result["summary"]
    assert (summary.status, summary.items, summary.errors) == ("ok", 2000, 0)
    assert sorted(r["id"] for r in read_output(out)) == list(range(2000))
    return time.monotonic() - started


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def publish(fleet: LocalFleet, messages: list[tuple[bytes, str, dict]]) -> None:
    """Publish raw messages (body, content type, headers) straight to the fleet's queue."""
    s = fleet.settings
    queue = kombu.Queue(s.queue, kombu.Exchange(s.queue, "direct"), routing_key=s.queue)
    with kombu.Connection(
        s.broker_url, ssl=broker_ssl(s), transport_options=s.transport_options
    ) as conn:
        producer = conn.Producer()
        for body, content_type, headers in messages:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=s.queue,
                declare=[queue],
                content_type=content_type,
                content_encoding="binary"
                if "pickle" in content_type or "serialize" in content_type
                else "utf-8",
                headers=headers,
            )


def task_headers(task: object = "fleet.batch", **changes: object) -> dict:
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "argsrepr": "forged",
        "kwargsrepr": "{}",
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not ...}  # ...: leave the header out


def pool_pids(fleet: LocalFleet) -> set[int]:
    return {p.pid for p in psutil.Process(fleet.instances[0].proc.pid).children(recursive=True)}


def assert_worker_unharmed(fleet: LocalFleet, pids_before: set[int]) -> None:
    inst = fleet.instances[0]
    assert inst.proc.poll() is None, "the worker process died"
    assert pool_pids(fleet) == pids_before, "a pool process was replaced"
    log = instance_log(fleet)
    for fatal in ("Unrecoverable error", "WorkerLostError", "Restoring"):
        assert fatal not in log, f"{fatal!r} in the worker log"


def assert_nothing_held(fleet: LocalFleet) -> None:
    """No message left unacknowledged or queued: nothing was requeued for ever."""
    s = fleet.settings
    store = RedisStore(s.result_url, tls_ca_file=s.tls_ca_file)

    def idle() -> bool:
        workers = store.workers()
        return bool(workers) and all(
            w.get("reserved") == 0 and w.get("active") == 0 for w in workers
        )

    wait_until(idle, 15, "the worker to hold no message")
    with kombu.Connection(
        s.broker_url, ssl=broker_ssl(s), transport_options=s.transport_options
    ) as conn:
        if fleet.broker_kind == "redis":
            client = conn.default_channel.client
            assert client.llen(s.queue) == 0
            assert client.hlen("unacked") == 0, "a message is still unacknowledged"
        else:
            declared = conn.default_channel.queue_declare(s.queue, passive=True)
            assert declared.message_count == 0


# -- TLS --------------------------------------------------------------------------


def test_only_tls_is_served_and_certificates_and_host_names_are_checked(fleet):
    s = fleet.settings
    ca = s.tls_ca_file
    # Only the TLS ports listen: no plaintext port at all.
    assert listening_ports(fleet.results.proc.pid) == {fleet.results.port}
    if fleet.broker_kind == "redis":
        assert listening_ports(fleet.broker.proc.pid) == {fleet.broker.port}
    else:  # the AMQPS listener and Erlang's distribution port, no AMQP port (5672)
        dist = int(fleet.broker.env["RABBITMQ_DIST_PORT"])
        assert listening_ports(fleet.broker.proc.pid) == {fleet.broker.port, dist}

    # The right CA and host name: the product's clients connect.
    RedisStore(s.result_url, tls_ca_file=ca).ping()
    app = make_app(s)
    with app.connection_for_write() as conn:
        connect_once(conn)
    assert app.backend.client.ping()
    # ... and so do `fleet status` and the local autoscaler, which read the queue directly.
    assert status_queue_depth(s)["waiting"] == 0
    depth = autoscaler_queue_depth(s)
    try:
        assert depth.ready() == 0
    finally:
        depth.close()

    # Plaintext to a TLS port is refused (no password sent: the refusal is TLS's).
    for server in (fleet.results, *([fleet.broker] if fleet.broker_kind == "redis" else [])):
        plain = raw_redis(server.port)
        with pytest.raises(redis.ConnectionError) as caught:
            plain.ping()
        assert not isinstance(caught.value, redis.AuthenticationError), caught.value
    if fleet.broker_kind == "rabbitmq":
        plain = amqp.Connection(
            f"127.0.0.1:{fleet.broker.port}", userid="fleet", password="not-sent", connect_timeout=5
        )
        started = time.monotonic()
        with pytest.raises((OSError, amqp.exceptions.AMQPError)):
            plain.connect()
        assert time.monotonic() - started < 10

    # The system's CAs do not know the throwaway CA: refused, for every client.
    system_cas = Settings(broker_url=s.broker_url, result_url=s.result_url)
    text = error_text(lambda: RedisStore(system_cas.result_url).ping())
    assert "certificate verify failed" in text, text
    unverified = make_app(system_cas)
    with unverified.connection_for_write() as conn:
        text = error_text(lambda: connect_once(conn))
    assert "certificate verify failed" in text, text
    text = error_text(unverified.backend.client.ping)
    assert "certificate verify failed" in text, text

    # The right CA but another host name (the certificate names 127.0.0.1 only).
    other = Settings(
        broker_url=s.broker_url.replace("@127.0.0.1:", "@localhost:"),
        result_url=s.result_url.replace("@127.0.0.1:", "@localhost:"),
        tls_ca_file=ca,
    )
    text = error_text(lambda: RedisStore(other.result_url, tls_ca_file=ca).ping())
    assert "certificate verify failed" in text and "mismatch" in text.lower(), text
    with make_app(other).connection_for_write() as conn:
        text = error_text(lambda: connect_once(conn))
    assert "certificate verify failed" in text and "mismatch" in text.lower(), text


# -- passwords ----------------------------------------------------------------------


def test_no_password_or_a_wrong_one_is_refused_by_broker_and_store(fleet):
    s = fleet.settings
    ca = s.tls_ca_file
    right = password(fleet)
    redis_servers = [fleet.results, *([fleet.broker] if fleet.broker_kind == "redis" else [])]
    for server in redis_servers:

        def client(pw: str | None, port: int = server.port) -> redis.Redis:
            return raw_redis(port, password=pw, ssl=True, ssl_ca_certs=ca)

        assert client(right).ping()  # the right one works: the refusals below are real
        with pytest.raises(redis.AuthenticationError):
            client(None).ping()
        with pytest.raises(redis.AuthenticationError):
            client("wrong-" + right).ping()
    if fleet.broker_kind == "redis":
        with kombu.Connection(swap_password(s.broker_url, "wrong-pw"), ssl=broker_ssl(s)) as c:
            assert "invalid username-password pair" in error_text(lambda: connect_once(c))
    else:
        tls = broker_ssl(s)

        def amqp_login(user: str, pw: str) -> amqp.Connection:
            return amqp.Connection(
                f"127.0.0.1:{fleet.broker.port}",
                userid=user,
                password=pw,
                ssl=dict(tls),
                connect_timeout=5,
            )

        ok = amqp_login("fleet", right)
        ok.connect()
        ok.close()
        for user, pw in (("fleet", ""), ("fleet", "wrong-" + right), ("guest", "guest")):
            with pytest.raises(amqp.exceptions.AccessRefused):
                amqp_login(user, pw).connect()
        with kombu.Connection(swap_password(s.broker_url, "wrong-pw"), ssl=broker_ssl(s)) as c:
            assert "ACCESS_REFUSED" in error_text(lambda: connect_once(c))


def run_fleet(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [FLEET, "run", *args],
        env=env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_fleet_run_over_tls_and_its_failures_say_why_without_the_password(fleet, tmp_path):
    s = fleet.settings
    right = password(fleet)
    wrong = "Wr0ng-" + uuid.uuid4().hex
    closed = f"127.0.0.1:{free_port()}"
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"id-{i:08d}\n" for i in range(100_000)))  # 1.3 MB of IDs
    runs = {
        # A job over TLS, with the progress bar and the JSON summary.
        "ok": run_fleet(
            fleet_env(fleet, tmp_path),
            "double",
            "--ids",
            "range:0:3000",
            "--out",
            str(tmp_path / "ok.jsonl"),
            "--progress",
            "--json",
        ),
        "both wrong": run_fleet(
            fleet_env(
                fleet,
                tmp_path,
                FLEET_BROKER_URL=swap_password(s.broker_url, wrong),
                FLEET_RESULT_URL=swap_password(s.result_url, wrong),
            ),
            "double",
            "--ids",
            "range:0:10",
            "--out",
            str(tmp_path / "a.jsonl"),
        ),
        "no password": run_fleet(
            fleet_env(fleet, tmp_path, FLEET_RESULT_URL=s.result_url.replace(f":{right}@", "@")),
            "double",
            "--ids",
            "range:0:10",
            "--out",
            str(tmp_path / "e.jsonl"),
        ),
        "broker wrong": run_fleet(
            fleet_env(fleet, tmp_path, FLEET_BROKER_URL=swap_password(s.broker_url, wrong)),
            "double",
            "--ids",
            "range:0:10",
            "--out",
            str(tmp_path / "b.jsonl"),
        ),
        "broker unreachable": run_fleet(
            fleet_env(
                fleet,
                tmp_path,
                FLEET_BROKER_URL=s.broker_url.replace(f"127.0.0.1:{fleet.broker.port}", closed),
            ),
            "double",
            "--ids",
            "range:0:10",
            "--out",
            str(tmp_path / "c.jsonl"),
        ),
        # One batch bigger than a batch message may be: the launcher refuses it
        # before sending (the workers would refuse it too: see the raw messages).
        "oversized": run_fleet(
            fleet_env(fleet, tmp_path),
            "echo",
            "--ids",
            str(ids),
            "--batch-size",
            "100000",
            "--out",
            str(tmp_path / "d.jsonl"),
        ),
    }
    results = {name: finish(proc) for name, proc in runs.items()}
    for name, (_code, out, err) in results.items():
        for secret in (right, wrong):
            assert secret not in out + err, f"{name}: the password was printed:\n{out}\n{err}"
        assert "Traceback" not in err, f"{name}:\n{err}"

    code, out, err = results["ok"]
    assert code == 0, err
    assert json.loads(out)["items"] == 3000
    assert re.search(r"3\.00k/3\.00k", err), err  # the progress bar was shown
    assert len(read_output(tmp_path / "ok.jsonl")) == 3000

    code, _, err = results["both wrong"]
    assert code == 3, err
    assert "cannot reach the result store at rediss://:***@127.0.0.1:" in err, err
    assert "it refused the password" in err and "invalid username-password pair" in err, err
    code, _, err = results["no password"]
    assert code == 3, err
    assert "cannot reach the result store at rediss://@127.0.0.1:" in err, err
    assert "it refused the password (none given, or a wrong one)" in err, err
    code, _, err = results["broker wrong"]
    scheme = s.broker_url.split("://")[0]
    assert code == 3, err
    assert f"cannot reach the broker at {scheme}://" in err and ":***@127.0.0.1:" in err, err
    assert (
        "ACCESS_REFUSED" if fleet.broker_kind == "rabbitmq" else "invalid username-password pair"
    ) in err, err
    code, _, err = results["broker unreachable"]
    assert code == 3, err
    assert f"cannot reach the broker at {scheme}://" in err and f":***@{closed}" in err, err

    code, _, err = results["oversized"]
    assert code == 2, err
    assert "more than the 1,048,576 a batch message may hold" in err, err
    assert "batch 0 takes" in err, err  # the launcher's check, before anything was sent


def test_a_worker_with_a_wrong_password_says_so_without_it(fleet, tmp_path):
    """The worker's own error messages (Celery's banner, connection errors, heartbeat)."""
    s = fleet.settings
    wrong = "Wr0ng-" + uuid.uuid4().hex
    env = {
        **fleet.worker_env(),
        "FLEET_BROKER_URL": swap_password(s.broker_url, wrong),
        "FLEET_RESULT_URL": swap_password(s.result_url, wrong),
    }
    log_path = fleet.workdir / "wrong-password-worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            worker_argv(sys.executable, "unused-queue", 1, "wrongpw@%h"),
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    refusal = (
        "ACCESS_REFUSED" if fleet.broker_kind == "rabbitmq" else "invalid username-password pair"
    )
    try:
        # Redis: "consumer: Cannot connect to ...", retried for ever; RabbitMQ: the
        # refused login is an "Unrecoverable error" that ends the worker.
        wait_until(
            lambda: refusal in log_path.read_text(errors="replace"),
            30,
            "the worker to report the refused login",
        )
    finally:
        stop_process(proc, timeout=15)  # then its whole process group
    text = log_path.read_text(errors="replace")
    assert wrong not in text and password(fleet) not in text, text
    scheme = s.broker_url.split("://")[0]
    assert re.search(rf"transport: +{scheme}://(fleet)?:\*\*@127\.0\.0\.1", text), text
    assert re.search(r"(Cannot connect to|Unrecoverable error: AccessRefused)", text), text


# -- messages an outsider could publish ------------------------------------------------


class Exploit:
    """Unpickling this creates the file `path`: code execution, made visible."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_message_is_refused_and_never_unpickled(fleet, tmp_path):
    def body(path: Path) -> bytes:  # a fleet.batch message whose unpickling makes `path`
        return pickle.dumps(
            ((f"jsec-{uuid.uuid4().hex[:8]}", 0, "echo", [Exploit(str(path))]), {}, EMBED)
        )

    # The payload works: unpickled here, it makes its file.
    control = tmp_path / "control"
    pickle.loads(body(control))
    assert control.exists()
    marker = tmp_path / "unpickled"
    pids = pool_pids(fleet)
    before = instance_log(fleet).count("Refusing to deserialize untrusted content of type pickle")
    publish(fleet, [(body(marker), "application/x-python-serialize", task_headers())])
    wait_until(
        lambda: (
            instance_log(fleet).count("Refusing to deserialize untrusted content of type pickle")
            > before
        ),
        20,
        "the worker to refuse the pickled message",
    )
    assert normal_job(fleet, tmp_path / "after.jsonl") < 20
    assert not marker.exists(), "the pickled message was unpickled: code ran on the worker"
    assert_worker_unharmed(fleet, pids)
    assert_nothing_held(fleet)


def test_unknown_malformed_and_oversized_messages_are_refused_and_the_worker_goes_on(
    fleet, tmp_path
):
    s = fleet.settings
    job = f"jsec-{uuid.uuid4().hex[:8]}"

    def batch(number: int, payload: object) -> bytes:
        return json.dumps([[job, number, "echo", payload], {}, EMBED]).encode()

    json_type = "application/json"
    refused_batches = {  # batch number: payload the worker must refuse and announce
        1: "abc",
        2: 42,
        3: None,
        4: {"range": "ab"},
        5: {"lines": 5},
        6: {"ids": [1, 2]},
        7: {"range": [0, 10**12]},  # a tiny message naming a trillion IDs
        8: {"lines": "x" * (s.message_limit + 1)},  # more bytes than a message may hold
    }
    messages = [(batch(n, p), json_type, task_headers()) for n, p in refused_batches.items()]
    wrong_args = task_headers()
    wrong_types = task_headers()
    messages += [
        (json.dumps([[1], {}, EMBED]).encode(), json_type, task_headers("no.such.task")),
        (json.dumps([[], {}, EMBED]).encode(), json_type, wrong_args),
        (json.dumps([[123, "x", None, [1]], {}, EMBED]).encode(), json_type, wrong_types),
        (b"\xff\x00{not json", json_type, task_headers()),
        # Shapes that, unguarded, end Celery's worker process (app/worker/guard.py).
        (b'{"a": 1}', json_type, task_headers()),
        (json.dumps([[job, 20, "echo", [1]], 5, EMBED]).encode(), json_type, task_headers()),
        (json.dumps([[job, 21, "echo", [1]], {}, 7]).encode(), json_type, task_headers()),
        (batch(22, [1]), json_type, task_headers(timelimit="abc")),
        (batch(23, [1]), json_type, task_headers(id=[1, 2])),
        (json.dumps([[1], {}, EMBED]).encode(), json_type, task_headers("no.such", id=...)),
        (json.dumps([[1], {}, EMBED]).encode(), json_type, task_headers(["x"])),
    ]
    expected_log = [
        "Received unregistered task of type 'no.such.task'",
        f"fleet.batch[{wrong_args['id']}] raised unexpected: TypeError",
        "refused a batch message: the job ID must be a non-empty string, not 123",
        f"fleet.batch[{wrong_types['id']}] succeeded",
        "Can't decode message body: DecodeError",
        "malformed task message: ValueError('not enough values to unpack",
        "malformed task message: the keyword arguments must be an object, not 5",
        "malformed task message: the message options must be an object, not 7",
        "malformed task message: timelimit must be [hard, soft] in seconds, not 'abc'",
        "malformed task message: the task name and id must be strings, not 'fleet.batch' "
        "and [1, 2]",
        "malformed task message: the task name and id must be strings, not 'no.such' and None",
        "malformed task message: the task name and id must be strings, not ['x']",
    ]
    pids = pool_pids(fleet)
    log_before = len(instance_log(fleet))
    publish(fleet, messages)
    wall = normal_job(fleet, tmp_path / "after.jsonl")
    assert wall < 20, f"the normal job after the bad messages took {wall:.1f} s"

    def new_log() -> str:
        return instance_log(fleet)[log_before:]

    wait_until(
        lambda: all(line in new_log() for line in expected_log),
        20,
        f"the worker to log every refusal: missing "
        f"{[line for line in expected_log if line not in new_log()]}",
    )
    store = RedisStore(s.result_url, tls_ca_file=s.tls_ca_file)
    announced: dict[int, str] = {}
    wait_until(
        lambda: (
            announced.update({d.batch: d.refused for d in store.wait_done(job, 0.5)})
            or set(announced) >= set(refused_batches)
        ),
        20,
        "every refusal to be announced",
    )
    assert set(announced) == set(refused_batches), announced
    assert all(announced.values()), announced
    assert "a batch payload is a list of IDs" in announced[1]
    assert "1,000,000,000,000 IDs, more than the 10,000,000" in announced[7]
    assert f"more than the {s.message_limit:,} a batch message may hold" in announced[8]
    assert store.committed(job, range(30)) == [], "a refused batch was run"
    assert not store.r.exists(_keys(job)["result"] + "20")
    # Each message was taken once: none was requeued to be taken again.
    log = new_log()
    for headers in (wrong_args, wrong_types):
        assert log.count(f"fleet.batch[{headers['id']}] received") == 1
    assert_worker_unharmed(fleet, pids)
    assert_nothing_held(fleet)


# -- secrets ---------------------------------------------------------------------------


def test_the_password_is_in_no_process_listing_log_or_file_but_the_private_ones(fleet):
    """Run last for each fleet: its logs hold the jobs and the refusals of the tests above."""
    secret = password(fleet)
    started = (
        fleet.broker.proc,
        fleet.results.proc,
        *fleet.broker.helpers,
        fleet.instances[0].proc,
    )
    # What each process was started with: redis-server retitles itself at once
    # (`ps` then shows "redis-server 127.0.0.1:PORT"), which would hide a
    # password on its command line from a late look but not from an early one.
    for proc in started:
        assert secret not in " ".join(map(str, proc.args)), proc.args
    listing = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    leaked = [line for line in listing.splitlines() if secret in line]
    assert not leaked, f"the password is in `ps`: {leaked}"
    # Not vacuous: every process of the fleet is in that listing.
    listed = {int(line.split(None, 1)[0]) for line in listing.splitlines()[1:]}
    ours = set()
    for proc in started:
        ours |= {proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))}
    assert ours <= listed
    names = {psutil.Process(pid).name() for pid in ours}
    assert "redis-server" in names, names
    if fleet.broker_kind == "rabbitmq":
        assert {"beam.smp", "epmd"} <= names, names

    # Every file the fleet wrote: logs, data, certificates. Only the servers'
    # config files hold the password, and only their owner can read them.
    holders = []
    for path in fleet.workdir.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            holders.append(path)
            assert path.stat().st_mode & 0o777 == 0o600, path
    expected = {
        fleet.workdir / "results.conf",
        fleet.broker.workdir
        / ("broker.conf" if fleet.broker_kind == "redis" else "rabbitmq/rabbitmq.conf"),
    }
    assert set(holders) == expected
    assert (fleet.tls_files.key.stat().st_mode & 0o777) == 0o600
    log = instance_log(fleet)
    scheme = fleet.settings.broker_url.split("://")[0]
    assert f".> transport:   {scheme}://" in log and ":**@127.0.0.1:" in log  # the banner


# -- fleet local --tls ------------------------------------------------------------------


def test_fleet_local_tls_end_to_end(tmp_path):
    """`fleet local --tls`: the state file and `fleet local --env` carry the CA; `fleet run`
    needs nothing else."""
    env = clean_env(tmp_path, TMPDIR=str(tmp_path))
    log_path = tmp_path / "fleet-local.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [FLEET, "local", "--tls", "--instances", "1", "--include", "tests.support.fleet_tasks"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    state_file = tmp_path / "state" / "local.json"
    started: list[psutil.Process] = []
    try:
        wait_until(
            lambda: state_file.exists() and "local fleet up" in log_path.read_text(),
            60,
            "fleet local --tls to come up",
        )
        started = psutil.Process(proc.pid).children(recursive=True)
        assert state_file.stat().st_mode & 0o777 == 0o600
        state = json.loads(state_file.read_text())["env"]
        assert state["FLEET_BROKER_URL"].startswith("rediss://")
        assert state["FLEET_RESULT_URL"].startswith("rediss://")
        ca = state["FLEET_TLS_CA_FILE"]
        assert Path(ca).is_file()
        assert f"TLS only, certificates from the throwaway CA {ca}" in log_path.read_text()
        exports = subprocess.run(
            [FLEET, "local", "--env"], env=env, cwd=ROOT, text=True, capture_output=True, timeout=60
        )
        assert f"export FLEET_TLS_CA_FILE={ca}" in exports.stdout
        done = subprocess.run(
            [FLEET, "run", "double", "--ids", "range:0:500", "--out", str(tmp_path / "out.jsonl")],
            env=env,
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr
        assert len(read_output(tmp_path / "out.jsonl")) == 500
        secret = urlsplit(state["FLEET_BROKER_URL"]).password
        assert secret not in log_path.read_text() + done.stdout + done.stderr
        for p in (psutil.Process(proc.pid), *started):
            assert secret not in " ".join(p.cmdline())
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for p in started:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
    assert "stopping the local fleet" in log_path.read_text()
