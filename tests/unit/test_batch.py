"""The batch runner: one JSON line per ID, whatever the per-item function does."""

from __future__ import annotations

import json
import time

import pytest

from app import batch as batch_mod
from app.batch import expand, run_batch
from app.registry import FleetTask


def parse(outcome) -> list[dict]:
    text = outcome.lines.decode("utf-8")
    assert text == "" or text.endswith("\n"), "every line ends in a newline"
    lines = text.splitlines()
    assert len(lines) == outcome.items
    records = [json.loads(line) for line in lines]
    for r in records:
        assert set(r) in ({"id", "result"}, {"id", "error"}), r
    assert outcome.errors == sum("error" in r for r in records)
    return records


def task(fn, **kw) -> FleetTask:
    return FleetTask(fn, fn.__name__, **kw)


def square(x):
    return x * x


def test_one_record_per_id_in_order():
    ids = [3, "a", 1, 3, -7, "ü-ñ"]
    out = run_batch(task(lambda x: [x, str(x)]), ids)
    records = parse(out)
    assert [r["id"] for r in records] == ids
    assert [r["result"] for r in records] == [[i, str(i)] for i in ids]
    assert out.errors == 0
    assert out.seconds >= 0


def test_empty_batch():
    out = run_batch(task(square), [])
    assert (out.lines, out.items, out.errors) == (b"", 0, 0)


@pytest.mark.parametrize("result", [None, 0, "", 1.5, True, {"k": [1, 2]}, 2**63, "line\nbreak"])
def test_results_of_every_json_kind(result):
    records = parse(run_batch(task(lambda x: result), [1, 2]))
    assert [r["result"] for r in records] == [result, result]


def test_errors_do_not_stop_the_batch():
    def picky(x):
        if x % 3 == 0:
            raise ValueError(f"no multiples of three: {x}")
        if x == 4:
            raise KeyError("four")
        return x + 1

    out = run_batch(task(picky), list(range(10)))
    records = parse(out)
    assert [r["id"] for r in records] == list(range(10))
    assert out.errors == 5  # 0, 3, 6, 9 and 4
    error = records[3]["error"]
    assert {k: error[k] for k in ("type", "message")} == {
        "type": "ValueError",
        "message": "no multiples of three: 3",
    }
    # The end of the traceback, for the caller: where it was raised, and its line.
    assert error["traceback"].endswith("ValueError: no multiples of three: 3\n")
    assert 'raise ValueError(f"no multiples of three: {x}")' in error["traceback"]
    assert "module" not in error  # a built-in type
    assert records[4]["error"]["type"] == "KeyError"
    assert "attempts" not in records[3]["error"]
    assert [r["result"] for r in records if "result" in r] == [2, 3, 6, 8, 9]


def test_long_error_messages_are_truncated():
    def loud(x):
        raise RuntimeError("x" * 50_000)

    (record,) = parse(run_batch(task(loud), [1]))
    assert 0 < len(record["error"]["message"]) <= 1000
    assert 0 < len(record["error"]["traceback"]) <= 2000


def test_an_error_of_a_type_of_its_own_names_its_module():
    class Own(Exception):
        pass

    def raises(x):
        raise Own("mine")

    (record,) = parse(run_batch(task(raises), [1]))
    assert record["error"]["type"] == "Own" and record["error"]["module"] == __name__


def test_transient_error_is_retried_then_succeeds():
    calls: dict[int, int] = {}

    def flaky(x):
        calls[x] = calls.get(x, 0) + 1
        if calls[x] <= 2:
            raise TimeoutError("try again")
        return x * 10

    out = run_batch(task(flaky, transient=(TimeoutError,), retries=3), [1, 2])
    records = parse(out)
    assert records == [{"id": 1, "result": 10}, {"id": 2, "result": 20}]
    assert calls == {1: 3, 2: 3}
    assert out.errors == 0


def test_transient_error_that_persists_reports_the_attempts():
    calls = []

    def down(x):
        calls.append(x)
        raise ConnectionError("still down")

    start = time.monotonic()
    out = run_batch(task(down, transient=(ConnectionError,), retries=2), ["a", "b"])
    records = parse(out)
    assert out.errors == 2
    for r in records:
        assert r["error"]["type"] == "ConnectionError"
        assert r["error"]["message"] == "still down"
        # attempts counts every call of the function for that item.
        assert r["error"]["attempts"] == calls.count(r["id"])
    assert calls.count("a") >= 2
    assert time.monotonic() - start < 10  # short backoff


def test_transient_then_permanent_error_stops_retrying():
    calls = []

    def worse(x):
        calls.append(x)
        if len(calls) == 1:
            raise TimeoutError("slow")
        raise ValueError("broken for good")

    (record,) = parse(run_batch(task(worse, transient=(TimeoutError,), retries=5), [7]))
    assert record["error"]["type"] == "ValueError"
    assert len(calls) == 2
    assert record["error"].get("attempts", 1) == 2


def test_non_transient_errors_are_not_retried():
    calls = []

    def bad(x):
        calls.append(x)
        raise ValueError("bad")

    out = run_batch(task(bad, transient=(TimeoutError,), retries=5), [1])
    assert calls == [1]
    assert parse(out)[0]["error"]["type"] == "ValueError"


def test_zero_retries_means_no_retry():
    calls = []

    def down(x):
        calls.append(x)
        raise TimeoutError("t")

    out = run_batch(task(down, transient=(TimeoutError,), retries=0), [1])
    assert calls == [1]
    assert parse(out)[0]["error"]["type"] == "TimeoutError"


class NotJson:
    def __repr__(self) -> str:
        return "<NotJson>"


def test_unserialisable_result_becomes_an_error_record():
    def mixed(x):
        return NotJson() if x % 2 else {"ok": x}

    out = run_batch(task(mixed), list(range(6)))
    records = parse(out)  # still valid JSON lines, one per ID
    assert [r["id"] for r in records] == list(range(6))
    assert out.errors == 3
    for r in records[1::2]:
        assert r["error"]["type"] == "TypeError"
        assert "JSON" in r["error"]["message"]
    assert [r["result"] for r in records[0::2]] == [{"ok": 0}, {"ok": 2}, {"ok": 4}]


@pytest.mark.parametrize(
    "bad",
    [
        {object()},  # a set holding an object
        {(1, 2): "tuple key"},
        [1, {"deep": NotJson()}],
    ],
)
def test_various_unserialisable_results(bad):
    out = run_batch(task(lambda x: bad), [1, 2])
    records = parse(out)
    assert out.errors == 2
    assert [r["id"] for r in records] == [1, 2]


def test_self_referencing_result_is_an_error_not_a_crash():
    def loop(x):
        a: list = [x]
        a.append(a)
        return a

    out = run_batch(task(loop), [1, 2])
    records = parse(out)
    assert out.errors == 2
    assert [r["id"] for r in records] == [1, 2]


def test_id_that_is_not_json_is_written_by_repr():
    # Only Python callers can pass such an ID; the batch must still be valid JSON.
    def fails(x):
        raise ValueError("nope")

    out = run_batch(task(fails), [NotJson(), 5])
    records = parse(out)
    assert records[0]["id"] == "<NotJson>"
    assert records[0]["error"]["type"] == "ValueError"
    assert records[1]["id"] == 5
    assert out.errors == 2


def test_range_payload():
    out = run_batch(task(square), {"range": [5, 12]})
    records = parse(out)
    assert [r["id"] for r in records] == list(range(5, 12))
    assert [r["result"] for r in records] == [i * i for i in range(5, 12)]


def test_range_payload_with_string_bounds_from_json():
    assert list(expand({"range": ["3", "6"]})) == [3, 4, 5]
    assert list(expand({"range": [4, 4]})) == []
    assert list(expand(["x", "y"])) == ["x", "y"]


def test_packed_string_payload_round_trips():
    pack = getattr(batch_mod, "pack", None)
    if pack is None:
        pytest.skip("no packed payloads in this version")
    for ids in (["a", "b", ""], [""], ["x\ny", "z"], [1, 2], ["a", 1]):
        payload = json.loads(json.dumps(pack(ids)))  # as it travels
        assert list(expand(payload)) == ids


def test_keyboard_interrupt_is_not_swallowed():
    def interrupted(x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(task(interrupted), [1])


def test_bare_lines_hold_the_results_alone_and_the_errors_last():
    def picky(x):
        if x == 2:
            raise ValueError("two")
        return {1: object()}.get(x, x * 10)  # 1: a result JSON cannot hold

    out = run_batch(task(picky), [0, 1, 2, 3], bare=True)
    *values, trailer = [json.loads(line) for line in out.lines.splitlines()]
    assert values == [0, None, None, 30]
    assert out.errors == 2 and out.items == 4
    assert [i for i, _ in trailer["errors"]] == [1, 2]
    assert trailer["errors"][1][1]["message"] == "two"
    assert "not JSON-serialisable" in trailer["errors"][0][1]["message"]
    clean = run_batch(task(lambda x: x), ["a", "b"], bare=True)
    assert clean.lines == b'"a"\n"b"\n' and clean.errors == 0
