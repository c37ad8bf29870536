"""A result store gone for good mid-job ends `fleet run` with exit code 3 and one line."""

from __future__ import annotations

from pathlib import Path

import botocore.exceptions
import pytest
import redis

from app.launcher.job import JobOptions, Unreachable
from app.launcher.launcher import Launcher
from app.launcher.sources import Source
from app.settings import Settings
from app.store.s3 import S3Store

SECRET = "s3cr3t-pw"


@pytest.fixture
def launcher(monkeypatch) -> Launcher:
    # Nothing listens on port 9: the clients are made, never connected.
    settings = Settings("redis://127.0.0.1:9/0", f"redis://:{SECRET}@127.0.0.1:9/1")
    launcher = Launcher(settings)
    monkeypatch.setattr(launcher, "check_connections", lambda: None)
    monkeypatch.setattr(launcher, "check_code", lambda require: None)
    monkeypatch.setattr(launcher, "_new_job", lambda opts, total: ("jtest-1", {}))
    return launcher


def lost(*_: object) -> None:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:9. Connection refused.")


def test_a_store_lost_mid_job_is_unreachable_with_how_to_resume(launcher, monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "_dispatch", lost)
    out = tmp_path / "out.jsonl"
    opts = JobOptions(task="slow", source=Source.parse("range:0:10"), out=out, progress=False)
    with pytest.raises(Unreachable) as caught:
        launcher.run(opts)
    message = str(caught.value)
    assert caught.value.exit_code == 3
    assert message.startswith("lost the result store at redis://:***@127.0.0.1:9/1 during job")
    assert "Connection refused. What was written" in message
    assert f"`fleet run --resume jtest-1 --out {out}`" in message
    assert SECRET not in message and "\n" not in message


def test_other_errors_are_not_taken_for_a_lost_store(launcher, monkeypatch, tmp_path):
    def broken(*_: object) -> None:
        raise ValueError("a bug, not the store")

    monkeypatch.setattr(launcher, "_dispatch", broken)
    opts = JobOptions(
        task="slow", source=Source.parse("range:0:10"), out=tmp_path / "o.jsonl", progress=False
    )
    with pytest.raises(ValueError, match="a bug"):
        launcher.run(opts)


def test_s3_store_counts_no_answer_from_s3_as_lost():
    store = S3Store("s3://bucket/results?region=us-east-1")
    no_route = botocore.exceptions.EndpointConnectionError(endpoint_url="https://s3")
    assert isinstance(no_route, store.connection_errors)
    denied = botocore.exceptions.ClientError({"Error": {"Code": "403"}}, "HeadObject")
    assert not isinstance(denied, store.connection_errors)


def test_output_path_is_named_as_given(launcher, monkeypatch):
    monkeypatch.setattr(launcher, "_dispatch", lost)
    opts = JobOptions(task="slow", source=Source.parse("range:0:3"), out=Path("-"), progress=False)
    with pytest.raises(Unreachable, match="What was written is in standard output"):
        launcher.run(opts)


def test_a_sink_job_is_resumed_without_an_output(launcher, monkeypatch):
    monkeypatch.setattr(launcher, "_dispatch", lost)
    monkeypatch.setattr(launcher, "sink", lambda spec, check=False: None)
    sink = {"kind": "postgresql", "url": f"postgresql://u:{SECRET}@h/db?table=t"}
    opts = JobOptions(task="slow", source=Source.parse("range:0:3"), sink=sink, progress=False)
    with pytest.raises(Unreachable) as caught:
        launcher.run(opts)
    message = str(caught.value)
    assert "What was written is in postgresql://u:***@h/db?table=t;" in message
    assert message.endswith("`fleet run --resume jtest-1` goes on from there.")
    assert SECRET not in message and "--out" not in message
