"""What a worker refuses before it runs a batch: payloads and addresses no launcher builds."""

from __future__ import annotations

import pytest

from app.batch import MAX_BATCH_ITEMS, BadPayload, check_address, check_payload


@pytest.mark.parametrize(
    ("payload", "items"),
    [
        ([1, 2, 3], 3),
        ({"lines": "a\nb"}, 2),
        ({"range": [5, 10]}, 5),
        ({"range": [9, 1]}, 0),
        ([], 0),
    ],
)
def test_payloads_the_launcher_builds_pass(payload, items):
    assert check_payload(payload, 1024 * 1024) == items


@pytest.mark.parametrize(
    "payload",
    [
        "abc",
        42,
        None,
        {"lines": 5},
        {"range": [0]},
        {"range": [0, "9"]},
        {"range": [0, True]},
        {"range": [0, 1], "lines": "x"},
        {"other": 1},
        {"range": [0, MAX_BATCH_ITEMS + 1]},
        {"lines": "x" * 101},
        ["x" * 50, "y" * 50],
    ],
)
def test_payloads_the_launcher_never_builds_are_refused(payload):
    with pytest.raises(BadPayload):
        check_payload(payload, 100)


@pytest.mark.parametrize(
    ("job", "batch", "task"),
    [
        (123, 0, "echo"),
        ("", 0, "echo"),
        ("j", -1, "echo"),
        ("j", True, "echo"),
        ("j", 2**32, "echo"),
        ("j", "0", "echo"),
        ("j", 0, None),
        ("j", 0, ["echo"]),
    ],
)
def test_malformed_batch_addresses_are_refused(job, batch, task):
    with pytest.raises(BadPayload):
        check_address(job, batch, task)
    check_address("j1", 0, "echo")
