"""Debian's PostgreSQL server for the sink tests: on a free loopback port, in a directory
of its own, run as the `postgres` user (initdb and the server refuse root).

Two roles: `fleet` (owns the database `results`, password in this object only) and
`reader` (may connect and read, not write): the refused-privilege case.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from scripts.local.processes import free_port


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("no PostgreSQL server: install Debian's postgresql (the Makefile does)")
    return Path(found[-1]).parent


class Postgres:
    def __init__(self) -> None:
        self.password = secrets.token_urlsafe(18)
        self.port = free_port()
        # Outside pytest's private temporary directories, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="celery-fleet-pg-"))
        self.root.chmod(0o755)
        self.proc: subprocess.Popen | None = None

    def _as_postgres(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            text=True,
            cwd=self.root,
            **kw,
        )

    def start(self) -> Postgres:
        bindir = _bindir()
        user = pwd.getpwnam("postgres")
        data = self.root / "data"
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        for path in (self.root, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
        self._as_postgres(
            str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
            f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        pwfile.unlink()
        self.log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(bindir / "postgres"), "-D", str(data),
             "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.root}", "-c", "fsync=off",
             "-c", "max_connections=60"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url("postgres", "postgres"), connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not start: {(self.root / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.2)
        with psycopg.connect(self.url("postgres", "postgres"), autocommit=True) as conn:
            for role, extra in (("fleet", "CREATEDB"), ("reader", "")):
                conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{self.password}' {extra}")
            conn.execute("CREATE DATABASE results OWNER fleet")
        with psycopg.connect(self.url("fleet"), autocommit=True) as conn:
            conn.execute("GRANT CONNECT ON DATABASE results TO reader")
            conn.execute("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO reader")
        return self

    def url(self, role: str = "fleet", db: str = "results", table: str | None = None) -> str:
        query = f"?table={table}" if table else ""
        return f"postgresql://{role}:{self.password}@127.0.0.1:{self.port}/{db}{query}"

    def connect(self) -> psycopg.Connection:
        """A connection as the `fleet` role, in autocommit."""
        return psycopg.connect(self.url(), autocommit=True)

    def query(self, sql: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.url()) as conn:
            return conn.execute(sql, args).fetchall()

    def writers(self) -> int:
        """Connections the fleet's workers hold now (application_name celery-fleet)."""
        return int(
            self.query(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'celery-fleet'"
            )[0][0]
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # a "smart" shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
