"""Which sink `--out`/`--sink`/`--max-writers` name, and what a sink reads of a batch."""

from __future__ import annotations

import pytest

from app.sinks import BadSink, Record, sink_label, sink_spec
from app.sinks.base import records
from app.sinks.postgres import split_url
from app.sinks.user import resolve_writer


@pytest.mark.parametrize("out", [None, "out.jsonl", "/tmp/r.jsonl", "-"])
def test_a_file_or_stdout_is_no_sink(out):
    assert sink_spec(out) is None


def test_urls_and_writers_name_their_sink():
    assert sink_spec("s3://b/p/") == {"kind": "s3", "url": "s3://b/p/"}
    pg = sink_spec("postgresql://u:pw@h/db?table=t", max_writers=3)
    assert pg == {"kind": "postgresql", "url": "postgresql://u:pw@h/db?table=t&max_writers=3"}
    assert sink_label(pg) == "postgresql://u:***@h/db?table=t&max_writers=3"
    assert sink_spec("postgres://h/db?table=t")["kind"] == "postgresql"
    assert sink_spec(None, "proj.sinks:save") == {"kind": "python", "name": "proj.sinks:save"}


@pytest.mark.parametrize(
    ("out", "sink", "writers", "said"),
    [
        ("ftp://h/x", None, None, "no sink for ftp://"),
        ("s3://b/p/", "m:f", None, "not both"),
        ("out.jsonl", None, 2, "--max-writers goes with --out postgresql"),
        ("s3://b/p/", None, 2, "--max-writers goes with --out postgresql"),
    ],
)
def test_what_names_no_sink_is_refused(out, sink, writers, said):
    with pytest.raises(BadSink, match=said.replace("(", r"\(")):
        sink_spec(out, sink, writers)


def test_the_postgres_url_gives_its_table_and_writers():
    dsn, table, writers = split_url(
        "postgresql://u:pw@h:5433/db?table=s.t&max_writers=2&sslmode=require"
    )
    assert (dsn, table, writers) == ("postgresql://u:pw@h:5433/db?sslmode=require", "s.t", 2)
    assert split_url("postgresql://h/db?table=t")[2] == 4
    for url, said in (
        ("postgresql://u:pw@h/db", "names no table"),
        ("postgresql://h/db?table=t&max_writers=0", "at least 1"),
        ("postgresql://h/db?table=t&max_writers=x", "whole number"),
    ):
        with pytest.raises(BadSink, match=said) as caught:
            split_url(url)
        assert "pw" not in str(caught.value)


def test_a_batchs_lines_are_its_records():
    lines = (
        b'{"id":1,"result":{"a":1}}\n'
        b'{"id":"x","error":{"type":"E","message":"m"}}\n'
        b'{"id":2,"result":null}\n'
    )
    assert records(lines) == [
        Record(1, {"a": 1}, None),
        Record("x", None, {"type": "E", "message": "m"}),
        Record(2, None, None),
    ]


def test_a_writer_comes_only_from_the_task_modules():
    modules = ("tests.support.sink_writers",)
    assert resolve_writer("tests.support.sink_writers:save", modules).__name__ == "save"
    for name, said in (
        ("os:system", "os is not one of the workers' task modules"),
        ("tests.support.sink_writers:load_nothing", "defines no function load_nothing"),
        ("tests.support.sink_writers:json", "defines no function json"),  # imported there
        ("tests.support.sink_writers", "give module:function"),
    ):
        with pytest.raises(BadSink, match=said):
            resolve_writer(name, modules)
