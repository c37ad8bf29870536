"""The stack's connection URLs (infra/parameters.py), read as the workers read them, give
Celery, kombu and the result store TLS that checks the certificate and the host name.

The RabbitMQ broker (Amazon MQ, amqps://) and the Redis result store (ElastiCache
Valkey, rediss:// with an AUTH token) are the stack's TLS services; their
certificates chain to public CAs, so no FLEET_TLS_CA_FILE is needed. The same
options were tried for real against TLS-only local servers in tests/faults/test_security.py.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import redis
from pulumi_mocks import REGION

from app.celery_config import celery_config, make_app
from app.settings import Settings
from app.stack import env_from_parameters
from app.store.redis import RedisStore
from infra.config import StackConfig


def test_the_stacks_tls_urls_get_verified_tls(run_stack):
    # The same configuration as one of test_program.py's, so the run is shared.
    run = run_stack(
        StackConfig(stack="test", broker="rabbitmq", result_store="redis", spot=True, nat="none")
    )
    prefix = "/celery-fleet/test/"
    params = {
        p.props["name"].removeprefix(prefix): p.props["value"]
        for p in run.of_type("aws:ssm/parameter:Parameter")
    }
    settings = Settings.from_env(env_from_parameters(params, REGION))
    broker, results = urlsplit(settings.broker_url), urlsplit(settings.result_url)
    assert (broker.scheme, results.scheme) == ("amqps", "rediss")
    assert settings.tls_ca_file is None  # the system's CAs

    conf = celery_config(settings)
    assert conf["broker_use_ssl"] == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": None,
        "server_hostname": broker.hostname,
    }
    assert conf["redis_backend_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": None,
        "ssl_check_hostname": True,
    }

    app = make_app(settings)  # nothing connects: the clients are only built
    connection = app.connection_for_write()
    assert connection.transport_cls == "amqps" and connection.ssl == conf["broker_use_ssl"]
    backend = app.backend.connparams
    assert backend["connection_class"] is redis.SSLConnection
    assert backend["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert backend["ssl_check_hostname"] is True and backend["host"] == results.hostname

    store = RedisStore(settings.result_url, settings.result_ttl, settings.tls_ca_file)
    pool = store.r.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] in ("required", ssl.CERT_REQUIRED)
    assert pool.connection_kwargs["ssl_check_hostname"] is True
    assert pool.connection_kwargs["password"] == results.password  # the AUTH token
