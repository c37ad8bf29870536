"""Settings from the environment: clear errors that never show a password."""

from __future__ import annotations

import pytest

from app.settings import (
    BROKER_SCHEMES,
    ConfigError,
    Settings,
    check_url,
    query_options,
    redact,
)

SECRET = "s3cr3t-Pa55"
GOOD = {
    "FLEET_BROKER_URL": "redis://127.0.0.1:6379/0",
    "FLEET_RESULT_URL": "redis://127.0.0.1:6379/1",
}


def config_error(**kwargs) -> str:
    env = kwargs.pop("env", None)
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env, **kwargs)
    err = info.value
    # A SystemExit whose code is the whole one-line message: `celery worker` and
    # `fleet` print it alone.
    assert isinstance(err, SystemExit)
    assert err.code == f"fleet: {err.message}"
    assert "\n" not in err.message
    return err.message


# -- redact -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            f"amqp://fleet:{SECRET}@broker.internal:5672//",
            "amqp://fleet:***@broker.internal:5672//",
        ),
        (
            f"rediss://user:{SECRET}@cache.example.com/1?ssl_cert_reqs=required",
            "rediss://user:***@cache.example.com/1?ssl_cert_reqs=required",
        ),
        (f"redis://u:{SECRET}@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        # A password holding "@" is hidden whole.
        ("redis://:p@ss@host:6379", "redis://:***@host:6379"),
        # A bad port must not make redact itself fail.
        (f"redis://:{SECRET}@host:notaport/0", "redis://:***@host:notaport/0"),
    ],
)
def test_redact_hides_the_password(url, expected):
    assert redact(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "sqs://",
        "s3://bucket/prefix?region=eu-west-1",
        "redis://justuser@host:6379",
        "notaurl",
        "",
    ],
)
def test_redact_leaves_urls_without_password_alone(url):
    assert redact(url) == url


@pytest.mark.parametrize(
    "url",
    [
        f"redis//:{SECRET}@host:6379",  # "://" mistyped: no netloc for urlsplit
        f"redis:/user:{SECRET}@host",
        f"user:{SECRET}@host:6379",
    ],
)
def test_redact_hides_credentials_of_malformed_urls(url):
    out = redact(url)
    assert SECRET not in out
    assert out.endswith("@" + url.rpartition("@")[2])


# -- check_url ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, words",
    [
        ("notaurl", ["broker URL", "'notaurl'", "scheme", "redis://"]),
        ("http://127.0.0.1:6379", ["scheme 'http'", "use one of"]),
        ("redis://", ["names no host"]),
        ("redis:///0", ["names no host"]),
        ("redis://127.0.0.1:port/0", ["malformed"]),
        ("redis://127.0.0.1:99999/0", ["malformed"]),
    ],
)
def test_check_url_rejects_with_a_clear_message(url, words):
    with pytest.raises(ConfigError) as info:
        check_url("broker", url, BROKER_SCHEMES)
    for word in words:
        assert word in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:port/0",
        f"redis://:{SECRET}@127.0.0.1:99999/0",
        f"http://user:{SECRET}@127.0.0.1:6379",
        f"redis://user:{SECRET}@/0",
        f"redis//:{SECRET}@127.0.0.1:6379/0",
        f"redis:/:{SECRET}@127.0.0.1:6379/0",
        f"{SECRET}",
    ],
)
def test_check_url_errors_never_show_the_password(url):
    with pytest.raises(ConfigError) as info:
        check_url("broker", url, BROKER_SCHEMES)
    if url != SECRET:  # a bare word is not a password-bearing URL
        assert SECRET not in str(info.value.code)
        assert SECRET not in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@cache:6380/0",
        "amqp://u:p@mq:5672//",
        "amqps://u:p@b-1.mq.eu-west-1.amazonaws.com:5671",
        "sqs://",
        "sqs://key:secret@",
    ],
)
def test_check_url_accepts_broker_urls(url):
    assert check_url("broker", url, BROKER_SCHEMES) == url


def test_result_store_refuses_a_broker_only_scheme():
    msg = config_error(env={"FLEET_BROKER_URL": "redis://h/0", "FLEET_RESULT_URL": "amqp://h//"})
    assert "result store URL" in msg and "'amqp'" in msg


# -- from_env -----------------------------------------------------------------


def test_from_env_reads_the_fleet_variables():
    s = Settings.from_env(
        {
            **GOOD,
            "FLEET_QUEUE": "jobs",
            "FLEET_INCLUDE": "mod.a, mod.b,,mod.c ",
            "FLEET_CONCURRENCY": "3",
            "FLEET_MAX_BATCH_SECONDS": " 120 ",
            "FLEET_RESULT_TTL": "60",
            "FLEET_LEASE_SECONDS": "2.5",
        }
    )
    assert s.queue == "jobs"
    assert s.include == ("mod.a", "mod.b", "mod.c")
    assert (s.concurrency, s.max_batch_seconds, s.result_ttl, s.lease_seconds) == (3, 120, 60, 2.5)
    assert s.visibility_timeout > s.max_batch_seconds
    # as_env reproduces the same settings in another process.
    assert Settings.from_env(s.as_env()) == s


def test_from_env_defaults():
    s = Settings.from_env(dict(GOOD))
    assert (s.queue, s.include, s.concurrency) == ("fleet", (), None)
    assert s.message_limit == 1024 * 1024


def test_overrides_win_over_the_environment_unless_none():
    s = Settings.from_env(dict(GOOD), broker_url="amqp://h//", result_url=None, queue=None)
    assert s.broker_url == "amqp://h//"
    assert s.result_url == GOOD["FLEET_RESULT_URL"]
    assert s.queue == "fleet"
    assert s.broker_scheme == "amqp"


def test_sqs_broker_has_a_smaller_message_limit():
    s = Settings.from_env({**GOOD, "FLEET_BROKER_URL": "sqs://"})
    assert s.message_limit < 256 * 1024 * 3 // 4


def test_missing_broker_url_tells_what_to_do():
    msg = config_error(env={"FLEET_RESULT_URL": GOOD["FLEET_RESULT_URL"]})
    assert "no broker URL" in msg
    assert "fleet local" in msg and "--broker" in msg and "FLEET_BROKER_URL" in msg


def test_blank_broker_url_counts_as_missing():
    msg = config_error(env={**GOOD, "FLEET_BROKER_URL": "   "})
    assert "no broker URL" in msg


def test_missing_result_url_tells_what_to_do():
    msg = config_error(env={"FLEET_BROKER_URL": GOOD["FLEET_BROKER_URL"]})
    assert "no result store URL" in msg
    assert "--backend" in msg and "FLEET_RESULT_URL" in msg


def test_environment_is_read_from_os_environ(monkeypatch):
    for key in ("FLEET_BROKER_URL", "FLEET_RESULT_URL"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError):
        Settings.from_env()
    monkeypatch.setenv("FLEET_BROKER_URL", "redis://envhost:6379/0")
    monkeypatch.setenv("FLEET_RESULT_URL", "redis://envhost:6379/1")
    assert Settings.from_env().broker_url == "redis://envhost:6379/0"


def test_malformed_broker_url_in_env_hides_the_password():
    msg = config_error(env={**GOOD, "FLEET_BROKER_URL": f"redis://:{SECRET}@host:abc/0"})
    assert "broker URL" in msg and "malformed" in msg
    assert SECRET not in msg


@pytest.mark.parametrize(
    "name, raw, words",
    [
        ("FLEET_CONCURRENCY", "four", ["FLEET_CONCURRENCY='four'", "whole number"]),
        ("FLEET_CONCURRENCY", "0", ["FLEET_CONCURRENCY=0", "at least 1"]),
        ("FLEET_CONCURRENCY", "1.5", ["whole number"]),
        ("FLEET_MAX_BATCH_SECONDS", "-3", ["FLEET_MAX_BATCH_SECONDS=-3", "at least 1"]),
        ("FLEET_RESULT_TTL", "1e9", ["FLEET_RESULT_TTL", "whole number"]),
        ("FLEET_LEASE_SECONDS", "soon", ["FLEET_LEASE_SECONDS='soon'", "not a number"]),
        ("FLEET_LEASE_SECONDS", "0", ["FLEET_LEASE_SECONDS", "greater than zero"]),
        ("FLEET_LEASE_SECONDS", "-1", ["FLEET_LEASE_SECONDS", "greater than zero"]),
        ("FLEET_LEASE_SECONDS", "nan", ["FLEET_LEASE_SECONDS"]),
        ("FLEET_LEASE_SECONDS", "inf", ["FLEET_LEASE_SECONDS"]),
    ],
)
def test_bad_numbers_are_named(name, raw, words):
    msg = config_error(env={**GOOD, name: raw})
    for word in words:
        assert word in msg


@pytest.mark.parametrize("queue", ["has space", "tab\there"])
def test_bad_queue_name(queue):
    msg = config_error(env={**GOOD, "FLEET_QUEUE": "fleet"}, queue=queue)
    assert "queue name" in msg


def test_config_error_is_catchable_by_name_and_exits_non_zero():
    try:
        Settings.from_env({})
    except ConfigError as exc:
        assert exc.code not in (0, None)
    else:
        pytest.fail("no ConfigError")


def test_query_options():
    assert query_options("s3://b/p?region=eu-west-1&endpoint_url=http://x:9000") == {
        "region": "eu-west-1",
        "endpoint_url": "http://x:9000",
    }
