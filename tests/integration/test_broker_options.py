"""Broker options that keep a worker alive through network faults.

tests/faults/test_partitions.py shows each fault on a fleet; these check the options
themselves, fast:

- kombu sets no socket timeout on its Redis connections: a command whose
  reply never comes (a partition, a rebooted broker host, a NAT that lost its
  state) waited forever (celery#9705);
- a worker that reconnects to RabbitMQ before the broker dropped its old
  connection found its exclusive mailbox queue locked, and exited.
"""

from __future__ import annotations

import json
import socket
import time

import kombu
import pytest

import app.settings
from app.launcher.launcher import Launcher
from app.settings import Settings

STORE = "redis://127.0.0.1:6379/1"


@pytest.mark.timeout(30)
def test_a_silent_redis_broker_times_out_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(app.settings, "REDIS_SOCKET_TIMEOUT", 0.5)
    # The kernel accepts the connection; nothing ever answers on it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        settings = Settings(f"redis://127.0.0.1:{port}/0", STORE)
        conn = kombu.Connection(settings.broker_url, transport_options=settings.transport_options)
        started = time.monotonic()
        with pytest.raises(conn.connection_errors):
            conn.channel()  # its first command is a PING
        assert time.monotonic() - started < 10
        conn.release()


def test_redis_batch_messages_carry_their_body_as_json_not_base64(make_fleet):
    import redis as redis_py

    # A Redis broker and no worker: the message stays to be looked at.
    settings = make_fleet(instances=0, broker="redis").settings
    launcher = Launcher(settings)
    body = launcher.encode("j-look", 0, "double", {"lines": "1\n2"})
    launcher.send("j-look", 0, body)
    client = redis_py.Redis.from_url(settings.broker_url)
    try:
        (raw,) = client.lrange(settings.queue, 0, -1)
        message = json.loads(raw)
        assert message["properties"]["body_encoding"] == "utf-8"
        # kombu's JSON form of bytes: the body itself, readable, not base64.
        assert message["body"] == {"__type__": "bytes", "__value__": body.decode()}
    finally:
        client.delete(settings.queue)
