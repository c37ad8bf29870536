"""`--out postgresql://USER@HOST/DB?table=NAME`: one row per ID, exactly once.

Rows are (job, id, result jsonb, error jsonb) with the primary key (job, id);
the table is created if it is missing. Each batch is one transaction: its
rows are copied (COPY) into a temporary table, then inserted with ON CONFLICT
DO NOTHING, so a batch that runs twice adds no row and a batch cut off half
way adds none. At most `max_writers` connections are open across the whole
fleet (`--max-writers`, a semaphore in the result store): a worker process
takes a writer's slot, connects, writes its batch and lets the slot go, so a
fleet of hundreds of cores does not flatten the database.

The password comes from the URL, else FLEET_SINK_PASSWORD (on a stack, the
SecureString parameter of `celery-fleet:sinkPassword`, so it is on no command
line), else libpq's own PGPASSWORD and ~/.pgpass on the workers; it is never
printed.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import psycopg
from psycopg import sql

from app.settings import redact
from app.sinks.base import BadSink, SinkError, SinkRefused, records, retrying
from app.store.base import Store

_encode = msgspec.json.Encoder().encode
DEFAULT_MAX_WRITERS = 4
# How long a writer's slot lives without being taken again: longer than any one batch's write.
SLOT_SECONDS = 120
# SQLSTATE classes that no retry mends: privileges, a missing or wrong table, bad data.
REFUSING = ("42", "22", "23", "28")


def split_url(url: str) -> tuple[str, str, int]:
    """(libpq connection URL, table, max writers) of a sink URL's query."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    table = query.pop("table", "")
    if not table:
        raise BadSink(
            f"{redact(url)} names no table: add ?table=NAME (created if missing), e.g. "
            "postgresql://fleet@db.example.com/results?table=scores."
        )
    try:
        writers = int(query.pop("max_writers", DEFAULT_MAX_WRITERS))
    except ValueError:
        raise BadSink(f"{redact(url)}: max_writers must be a whole number.") from None
    if writers < 1:
        raise BadSink(f"{redact(url)}: max_writers must be at least 1.")
    dsn = urlunsplit(parts._replace(query=urlencode(query)))
    return dsn, table, writers


class PostgresSink:
    def __init__(
        self,
        url: str,
        store: Store | None = None,
        replace_job: str = "",
        password: str | None = None,
    ) -> None:
        """`replace_job`: this job retries that one's errors (`fleet retry`): its rows go
        under that job's key and replace the error rows there (a row that holds a result
        is left alone, so a batch run twice still writes once). `password`: for a URL
        that holds none (FLEET_SINK_PASSWORD)."""
        self.replace_job = replace_job
        self.dsn, table, self.max_writers = split_url(url)
        self.table = sql.Identifier(*table.split(".", 1))
        self.label = f"{redact(self.dsn)} table {table}"
        self.store = store
        parts = urlsplit(self.dsn)
        self.slot_name = f"postgresql:{parts.hostname}:{parts.port or 5432}{parts.path}:{table}"
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        # The URL's own password wins; libpq's PGPASSWORD and ~/.pgpass come after both.
        self.password = None if parts.password else password

    def _connect(self) -> Any:
        extra: dict[str, Any] = {"password": self.password} if self.password else {}
        return psycopg.connect(
            self.dsn,
            connect_timeout=10,
            application_name="celery-fleet",
            autocommit=False,
            **extra,
        )

    def _refused(self, exc: Exception, what: str, cls: type[BadSink] = BadSink) -> BadSink | None:
        state = getattr(exc, "sqlstate", None) or ""
        if not state.startswith(REFUSING):
            return None
        return cls(f"{self.label} refused {what}: {_said(exc)} (SQLSTATE {state}).")

    def check(self) -> None:
        """Connect, create the table if it is missing, and try an insert of no row: a missing
        privilege or a table without the (job, id) key stops the job before it starts."""
        create = sql.SQL(
            "CREATE TABLE {} (job text NOT NULL, id text NOT NULL, "
            "result jsonb, error jsonb, PRIMARY KEY (job, id))"
        ).format(self.table)
        probe = sql.SQL(
            "INSERT INTO {} (job, id, result, error) SELECT NULL, NULL, NULL, NULL WHERE false "
            "ON CONFLICT (job, id) DO NOTHING"
        ).format(self.table)
        name = self.table.as_string()  # quoted, as to_regclass reads it
        try:
            with self._connect() as conn:
                if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is None:
                    conn.execute(create)
                    conn.commit()
                conn.execute(probe)
                conn.rollback()
        except psycopg.OperationalError as exc:
            raise BadSink(f"cannot reach {self.label}: {_said(exc)}") from None
        except psycopg.Error as exc:
            raise self._refused(exc, "the job's table") or BadSink(
                f"{self.label}: {_said(exc)}"
            ) from None

    def write(self, job: str, batch: int, lines: bytes) -> None:
        key = self.replace_job or job
        rows = [
            (
                key,
                str(r.id),
                None if r.error is not None else _encode(r.result).decode(),
                None if r.error is None else _encode(r.error).decode(),
            )
            for r in records(lines)
        ]
        conflict = (
            "DO UPDATE SET result = EXCLUDED.result, error = EXCLUDED.error "
            "WHERE {table}.error IS NOT NULL"
            if self.replace_job
            else "DO NOTHING"
        )
        insert = sql.SQL(
            "INSERT INTO {table} (job, id, result, error) SELECT job, id, result, error FROM "
            "fleet_batch ON CONFLICT (job, id) " + conflict
        ).format(table=self.table)

        def attempt() -> None:
            self._take_slot()
            try:
                with self._connect() as conn, conn.cursor() as cur:
                    cur.execute(
                        "CREATE TEMP TABLE fleet_batch (job text, id text, result jsonb, "
                        "error jsonb) ON COMMIT DROP"
                    )
                    with cur.copy("COPY fleet_batch (job, id, result, error) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(insert)
                    conn.commit()
            except psycopg.OperationalError:
                raise  # the server went away: tried again
            except psycopg.Error as exc:
                raise self._refused(exc, f"batch {batch} of job {job}", SinkRefused) or SinkRefused(
                    f"{self.label}: batch {batch} of job {job}: {_said(exc)}"
                ) from None
            finally:
                self._let_slot_go()

        retrying(
            attempt,
            (psycopg.OperationalError, _NoSlot),
            f"writing batch {batch} of job {job} to {self.label}",
        )

    def _take_slot(self, wait: float = 30.0) -> None:
        """One of the fleet's `max_writers` slots for this table, waited for `wait` seconds."""
        if self.store is None:
            return
        deadline = time.monotonic() + wait
        pause = 0.02
        while not self.store.acquire_slot(
            self.slot_name, self.holder, self.max_writers, SLOT_SECONDS
        ):
            if time.monotonic() > deadline:
                raise _NoSlot(f"all {self.max_writers} writers' slots stayed taken for {wait} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _let_slot_go(self) -> None:
        if self.store is not None:
            self.store.release_slot(self.slot_name, self.holder)

    def finish(self, job: str, batches: int, items: int, errors: int) -> None:
        """Nothing to add: the rows are the result."""


def _said(exc: Exception) -> str:
    """The server's one-line message (no LINE/caret lines), or the client's."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return str(primary or str(exc).strip().splitlines()[0] if str(exc).strip() else exc)


class _NoSlot(SinkError):
    """No writer's slot came free in time: tried again, like a lost connection."""
