"""One redis-server and one rabbitmq-server for a whole test run, shared by the fleets.

Starting RabbitMQ costs about ten seconds on a 2-core machine, so a fleet
that does not need servers of its own (to restart them, or to speak TLS)
takes a namespace on the shared ones instead: two Redis databases (broker
and result store) or a RabbitMQ virtual host, used by no other fleet. Queues,
results, worker registrations, Celery's broadcast and events are all kept
apart by them (kombu scopes Redis fanout by database).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import secrets
import threading
from pathlib import Path

from scripts.local.servers import Server, rabbitmq_server, redis_server

REDIS_DATABASES = 1024  # two per fleet
RABBITMQ_VHOSTS = 24  # one per fleet; each costs boot time


def _rabbit_password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class SharedServers:
    """The servers, started on first use; `namespace(broker)` gives a fleet its URLs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.password = secrets.token_urlsafe(18)
        self._lock = threading.Lock()
        self._redis: Server | None = None
        self._rabbit: Server | None = None
        self._databases = itertools.count(0, 2)
        self._vhosts = itertools.count(1)

    def namespace(self, broker: str) -> tuple[str, str]:
        """(broker URL, result store URL) that no other fleet of this run uses."""
        with self._lock:
            redis = self._start_redis()
            db = next(self._databases)
            if db + 1 >= REDIS_DATABASES:
                raise RuntimeError(f"more than {REDIS_DATABASES // 2} shared fleets in one run")
            results = f"{redis.url}/{db + 1}"
            if broker == "redis":
                return f"{redis.url}/{db}", results
            if broker != "rabbitmq":
                raise ValueError(f"no shared {broker} server")
            vhost = next(self._vhosts)
            if vhost > RABBITMQ_VHOSTS:
                raise RuntimeError(f"more than {RABBITMQ_VHOSTS} shared RabbitMQ fleets in one run")
            return self._start_rabbit().url.removesuffix("//") + f"/fleet{vhost}", results

    def _start_redis(self) -> Server:
        if self._redis is None:
            server = redis_server("shared-redis", self.workdir, self.password)
            config = Path(server.argv[1])
            config.write_text(config.read_text() + f"databases {REDIS_DATABASES}\n")
            server.start()
            self._redis = server
        return self._redis

    def _start_rabbit(self) -> Server:
        if self._rabbit is None:
            server = rabbitmq_server(self.workdir, self.password)
            home = self.workdir / "rabbitmq"
            # The virtual hosts exist from the start: imported at boot, no rabbitmqctl.
            vhosts = [f"fleet{i}" for i in range(1, RABBITMQ_VHOSTS + 1)]
            definitions = {
                "users": [
                    {
                        "name": "fleet",
                        "password_hash": _rabbit_password_hash(self.password),
                        "hashing_algorithm": "rabbit_password_hashing_sha256",
                        "tags": ["administrator"],
                    }
                ],
                "vhosts": [{"name": v} for v in ["/", *vhosts]],
                "permissions": [
                    {"user": "fleet", "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}
                    for v in ["/", *vhosts]
                ],
            }
            defs = home / "definitions.json"
            defs.write_text(json.dumps(definitions))
            os.chmod(defs, 0o600)
            conf = home / "rabbitmq.conf"
            conf.write_text(conf.read_text() + f"load_definitions = {defs}\n")
            server.start()
            self._rabbit = server
        return self._rabbit

    def close(self) -> None:
        for server in (self._rabbit, self._redis):
            if server is not None:
                server.close()
