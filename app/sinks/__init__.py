"""Sinks: where a job's results go when its workers write them, not the launcher.

    spec = sink_spec(out, sink, max_writers)   # None: a local file, as before
    sink = open_sink(spec, settings, store, task_modules)

The contract is base.py; one module per backend: s3.py (`--out s3://...`),
postgres.py (`--out postgresql://...?table=NAME`), user.py (`--sink
module:function`). The spec travels with the job's metadata in the result
store, where each worker reads it once per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from app.settings import redact
from app.sinks.base import BadSink, Record, Sink, SinkError, SinkRefused

if TYPE_CHECKING:
    from app.settings import Settings
    from app.store.base import Store

__all__ = [
    "BadSink",
    "Record",
    "Sink",
    "SinkError",
    "SinkRefused",
    "open_sink",
    "sink_label",
    "sink_spec",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def sink_spec(
    out: str | None, sink: str | None = None, max_writers: int | None = None
) -> dict[str, Any] | None:
    """The sink `--out`/`--sink`/`--max-writers` name, or None for a local file (or stdout)."""
    scheme = urlsplit(out).scheme if out and "://" in out else ""
    if sink:
        if out:
            raise BadSink("give --out or --sink, not both: a --sink writes the results itself.")
        spec: dict[str, Any] = {"kind": "python", "name": sink}
    elif not scheme:
        spec = {}
    elif scheme == "s3":
        spec = {"kind": "s3", "url": out}
    elif scheme in POSTGRES_SCHEMES:
        url = out or ""
        if max_writers is not None:
            parts = urlsplit(url)
            query = dict(parse_qsl(parts.query), max_writers=str(max_writers))
            url = urlunsplit(parts._replace(query=urlencode(query)))
        spec = {"kind": "postgresql", "url": url}
    else:
        raise BadSink(
            f"--out {redact(out or '')}: no sink for {scheme}://. Give a file, "
            "s3://BUCKET/PREFIX/, postgresql://USER@HOST/DB?table=NAME, or --sink "
            "module:function."
        )
    if max_writers is not None and spec.get("kind") != "postgresql":
        raise BadSink("--max-writers goes with --out postgresql://...")
    return spec or None


def sink_label(spec: dict[str, Any]) -> str:
    """The sink as it may be printed: no password."""
    return str(spec.get("name") or redact(spec.get("url", "")))


def open_sink(
    spec: dict[str, Any],
    settings: Settings,
    store: Store | None = None,
    modules: Sequence[str] = (),
) -> Sink:
    """The sink of `spec`. `store`: the fleet's result store, whose semaphore caps the
    PostgreSQL writers; `modules`: the task modules a user's writer may come from."""
    kind = spec.get("kind")
    # Each backend imports its client library (boto3, psycopg) only when chosen.
    if kind == "s3":
        from app.sinks.s3 import S3Sink

        return S3Sink(spec["url"], settings.aws_region)
    if kind == "postgresql":
        try:
            from app.sinks.postgres import PostgresSink
        except ImportError:
            raise BadSink(
                "the PostgreSQL sink needs psycopg: install celery-fleet[postgres]."
            ) from None
        return PostgresSink(spec["url"], store, spec.get("replace_job", ""), settings.sink_password)
    if kind == "python":
        from app.sinks.user import UserSink

        return UserSink(spec["name"], modules)
    raise BadSink(f"unknown sink {spec!r}")
