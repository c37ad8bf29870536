"""A user's own sink for the tests (`--sink tests.support.sink_writers:save`), idempotent per
batch key as the kit asks: one file per key, replaced whole by a second write."""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.sinks import Record


def save(records: list[Record], key: str) -> None:
    """Write the batch's records to $FLEET_TEST_SINK_DIR/<job>-<batch>.jsonl."""
    directory = Path(os.environ["FLEET_TEST_SINK_DIR"])
    path = directory / (key.replace("/", "-") + ".jsonl")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r._asdict()) + "\n" for r in records))
    os.replace(tmp, path)  # whole or not at all, and the same file however often


def load(directory: Path, job: str) -> list[dict]:
    """Every record the writer kept for `job`."""
    return [
        json.loads(line)
        for path in sorted(directory.glob(f"{job}-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
