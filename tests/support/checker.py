"""Check a job's output against its input: every ID exactly once, with its own result.

`exactly_once` is the assertion every test of a finished job uses. `check`
is the fault tier's report, which also reads the workers' execution logs.
Per ID: lost (never in the output), duplicated (in the output more than
once), wrong (an error record, or a result other than the expected one), and
executed more than once (allowed: the fleet runs a batch again when it cannot
tell whether a lost worker finished it). A job passes with lost, duplicated
and wrong all 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    ids: int
    output_lines: int
    lost: int
    duplicated: int
    wrong: int
    unknown: int  # IDs in the output that were never in the input
    executions: int
    executed_twice: int  # IDs that ran more than once
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.unknown)

    def line(self) -> str:
        return (
            f"ids={self.ids} lost={self.lost} duplicated={self.duplicated} "
            f"wrong={self.wrong} unknown={self.unknown} executions={self.executions} "
            f"executed_twice={self.executed_twice}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_output(path: Path) -> list[dict[str, Any]]:
    """A job's output: one JSON record per line (split on line ends only: an ID or a
    result may hold U+2028, which str.splitlines would cut at)."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@dataclass
class Tally:
    """Which IDs an output holds how often, against the IDs the job was given."""

    seen: Counter[Any]
    lost: list[Any]
    duplicated: list[Any]
    unknown: list[Any]


def tally(records: Iterable[dict[str, Any]], ids: Iterable[Any]) -> Tally:
    wanted = Counter(ids)
    seen = Counter(r["id"] for r in records)
    return Tally(
        seen=seen,
        lost=[i for i in wanted if i not in seen],
        duplicated=[i for i, n in seen.items() if n > 1],
        unknown=[i for i in seen if i not in wanted],
    )


def exactly_once(
    output: Path | list[dict[str, Any]],
    ids: Iterable[Any],
    result: Callable[[Any], Any] | None = None,
) -> dict[Any, dict[str, Any]]:
    """The records by ID, after asserting that every ID of `ids` is in `output` exactly once
    and nothing else is; with `result`, that each record is {"id", "result": result(id)}."""
    records = read_output(output) if isinstance(output, Path) else output
    found = tally(records, ids)
    assert not found.duplicated, f"written more than once: {found.duplicated[:20]}"
    assert not found.lost, f"lost: {found.lost[:20]} ({len(found.lost)} in all)"
    assert not found.unknown, f"never asked for: {found.unknown[:20]}"
    if result is not None:
        wrong = [r for r in records if r != {"id": r["id"], "result": result(r["id"])}]
        assert not wrong, f"wrong results: {wrong[:5]}"
    return {r["id"]: r for r in records}


def read_ids(path: Path) -> list[str]:
    return path.read_text().splitlines()


def executions(exec_dir: Path, wanted: set[str]) -> Counter[str]:
    """How many times each ID of `wanted` ran, over every worker process's log
    (the logs are shared by the jobs of a test module)."""
    counts: Counter[str] = Counter()
    for log in exec_dir.glob("*.log"):
        counts.update(i for i in log.read_text().splitlines() if i in wanted)
    return counts


def check(ids_path: Path, out_path: Path, exec_dir: Path, expected: Callable[[str], Any]) -> Report:
    ids = read_ids(ids_path)
    records = read_output(out_path) if out_path.exists() else []
    found = tally(records, ids)
    wrong = [r["id"] for r in records if "error" in r or r.get("result") != expected(r["id"])]
    ran = executions(exec_dir, set(ids))
    twice = [i for i, n in ran.items() if n > 1]
    return Report(
        ids=len(ids),
        output_lines=len(records),
        lost=len(found.lost),
        duplicated=len(found.duplicated),
        wrong=len(wrong),
        unknown=len(found.unknown),
        executions=sum(ran.values()),
        executed_twice=len(twice),
        examples={
            "lost": found.lost[:10],
            "duplicated": found.duplicated[:10],
            "wrong": wrong[:10],
            "unknown": found.unknown[:10],
        },
    )
