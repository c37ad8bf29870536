"""TLS settings as workers and launcher build them: verified, and refused when turned off."""

from __future__ import annotations

import ssl

import pytest
import redis

from app.celery_config import broker_ssl, celery_config, make_app
from app.settings import ConfigError, Settings
from app.store.redis import RedisStore

# What the stack writes for Amazon MQ and ElastiCache (infra/broker.py, infra/result_store.py),
# with the secrets put in as app/stack.py does; tests/infra/test_connection_tls.py takes
# them from the Pulumi program itself.
STACK_BROKER = "amqps://fleet:pw123@b-1234.mq.us-east-1.amazonaws.com:5671//"
STACK_RESULTS = (
    "rediss://:tok456@master.fleet.abc.use1.cache.amazonaws.com:6379/0?ssl_cert_reqs=required"
)


def test_stack_urls_get_verified_tls_with_the_system_cas():
    s = Settings(broker_url=STACK_BROKER, result_url=STACK_RESULTS)
    conf = celery_config(s)
    assert conf["broker_use_ssl"] == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": None,
        "server_hostname": "b-1234.mq.us-east-1.amazonaws.com",
    }
    assert conf["redis_backend_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": None,
        "ssl_check_hostname": True,
    }
    app = make_app(s)
    params = app.backend.connparams  # Celery's own result backend (no connection made)
    assert params["connection_class"] is redis.SSLConnection
    assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED and params["ssl_check_hostname"] is True
    assert app.connection_for_write().ssl == conf["broker_use_ssl"]
    store = RedisStore(s.result_url, tls_ca_file=None)
    kwargs = store.r.connection_pool.connection_kwargs
    assert store.r.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_cert_reqs"] in (ssl.CERT_REQUIRED, "required")
    assert kwargs["ssl_check_hostname"] is True and kwargs["ssl_ca_certs"] is None
    # Plain URLs get no TLS options at all.
    plain = Settings(broker_url="amqp://u:p@h:5672//", result_url="redis://:p@h:6379/0")
    assert not ({"broker_use_ssl", "redis_backend_use_ssl"} & celery_config(plain).keys())
    assert broker_ssl(plain) is False


def test_tls_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="turns TLS verification off"):
        Settings(broker_url=STACK_BROKER, result_url=STACK_RESULTS.replace("=required", "=none"))
    with pytest.raises(ConfigError, match="turns TLS verification off"):
        Settings(
            broker_url="rediss://:p@h:6379/0?ssl_check_hostname=false", result_url=STACK_RESULTS
        )
    with pytest.raises(ConfigError, match=r"FLEET_TLS_CA_FILE=.*not a readable PEM"):
        Settings.from_env(
            {
                "FLEET_BROKER_URL": STACK_BROKER,
                "FLEET_RESULT_URL": STACK_RESULTS,
                "FLEET_TLS_CA_FILE": str(tmp_path / "missing.pem"),
            }
        )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a readable PEM"):
        Settings(broker_url=STACK_BROKER, result_url=STACK_RESULTS, tls_ca_file=str(garbage))
    ca = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    s = Settings.from_env(
        {
            "FLEET_BROKER_URL": STACK_BROKER,
            "FLEET_RESULT_URL": STACK_RESULTS,
            "FLEET_TLS_CA_FILE": ca,
        }
    )
    assert s.tls_ca_file == ca and Settings.from_env(s.as_env()) == s
    assert celery_config(s)["broker_use_ssl"]["ca_certs"] == ca


def test_plaintext_store_urls_get_no_tls():
    store = RedisStore("redis://:p@127.0.0.1:1/0", tls_ca_file="/unused.pem")
    assert store.r.connection_pool.connection_class is redis.Connection
    assert not any(k.startswith("ssl") for k in store.r.connection_pool.connection_kwargs)
