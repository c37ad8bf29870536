"""The broker and result store servers of a local fleet: redis-server and rabbitmq-server.

Each listens on a free loopback port (or a given address) with a random
password kept in a mode-0600 file, never on a command line; with TLS files
it speaks TLS only, as Amazon MQ and ElastiCache do.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from scripts.local.processes import (
    free_port,
    need_binary,
    private_file,
    stop_process,
    wait_port,
)
from scripts.local.tls import TlsFiles


@dataclass
class Server:
    """A broker or result store process with the URL that reaches it."""

    name: str
    port: int
    url: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen | None = None
    helpers: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.workdir,
        )
        log.close()
        wait_port(self.port, self.proc, self.name)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, timeout=30, sig=sig)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        for helper in self.helpers:
            stop_process(helper, timeout=5)


def redis_server(
    name: str,
    workdir: Path,
    password: str,
    tls: TlsFiles | None = None,
    bind: str = "127.0.0.1",
    port: int | None = None,
) -> Server:
    """redis-server on `bind`:`port` (a free loopback port by default); with `tls`, a TLS
    port only (rediss://)."""
    port = port or free_port()
    data = workdir / name
    data.mkdir(parents=True, exist_ok=True)
    listen = (
        [f"port {port}"]
        if tls is None
        else [
            # No plaintext port at all; clients need no certificate of their own,
            # as with ElastiCache.
            "port 0",
            f"tls-port {port}",
            f'tls-cert-file "{tls.cert}"',
            f'tls-key-file "{tls.key}"',
            f'tls-ca-cert-file "{tls.ca}"',
            "tls-auth-clients no",
        ]
    )
    # The password goes in a private config file: on the command line, any
    # user on the machine would read it in `ps`.
    config = private_file(
        workdir / f"{name}.conf",
        "\n".join(
            [
                *listen,
                f"bind {bind}",
                f'dir "{data}"',
                f"requirepass {password}",
                # An append-only file so a restart keeps queued batches and results.
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                "daemonize no",
                "loglevel warning",
                "",
            ]
        ),
    )
    scheme = "redis" if tls is None else "rediss"
    return Server(
        name,
        port,
        f"{scheme}://:{password}@{bind}:{port}",
        [need_binary("redis-server"), str(config)],
        dict(os.environ),
        workdir,
    )


def rabbitmq_server(
    workdir: Path,
    password: str,
    tls: TlsFiles | None = None,
    bind: str = "127.0.0.1",
    port: int | None = None,
    dist_port: int | None = None,
    epmd_port: int | None = None,
    start_epmd: bool = True,
) -> Server:
    """rabbitmq-server on `bind`:`port` (a free loopback port by default); with `tls`, an
    AMQPS listener only. Its epmd runs on `epmd_port`: started here in the foreground, or
    by the caller when not `start_epmd` (inside a network namespace, say)."""
    port, dist = port or free_port(), dist_port or free_port()
    epmd_port = epmd_port or free_port()
    home = workdir / "rabbitmq"
    home.mkdir(parents=True, exist_ok=True)
    if tls is None:
        listen = f"listeners.tcp.default = {bind}:{port}\n"
        node_env = {"RABBITMQ_NODE_IP_ADDRESS": bind, "RABBITMQ_NODE_PORT": str(port)}
    else:
        # AMQPS only, as Amazon MQ: no plaintext listener; no client certificates.
        listen = (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {bind}:{port}\n"
            f"ssl_options.cacertfile = {tls.ca}\n"
            f"ssl_options.certfile = {tls.cert}\n"
            f"ssl_options.keyfile = {tls.key}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
        node_env = {}
    private_file(
        home / "rabbitmq.conf",
        (
            listen + f"default_user = fleet\ndefault_pass = {password}\n"
            "loopback_users = none\n"
            # Celery's long batches must not trip the consumer-ack timeout.
            "consumer_timeout = 86400000\n"
        ),
    )
    env = dict(
        {
            k: v
            for k, v in os.environ.items()
            if k not in ("RABBITMQ_NODE_IP_ADDRESS", "RABBITMQ_NODE_PORT")
        },
        **node_env,
        HOME=str(home),
        RABBITMQ_NODENAME=f"fleet{port}@localhost",
        RABBITMQ_DIST_PORT=str(dist),
        ERL_EPMD_PORT=str(epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_MNESIA_BASE=str(home / "mnesia"),
        RABBITMQ_LOG_BASE=str(home / "log"),
        RABBITMQ_CONFIG_FILE=str(home / "rabbitmq"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(home / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(home / "pid"),
    )
    scheme = "amqp" if tls is None else "amqps"
    server = Server(
        "rabbitmq",
        port,
        f"{scheme}://fleet:{password}@{bind}:{port}//",
        [need_binary("rabbitmq-server")],
        env,
        workdir,
    )
    if start_epmd:
        # Our own epmd in the foreground: the one Erlang starts daemonises and would
        # outlive us.
        epmd = subprocess.Popen(
            [need_binary("epmd"), "-port", str(epmd_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(epmd_port, epmd, "epmd", timeout=10)
        server.helpers.append(epmd)
    return server
