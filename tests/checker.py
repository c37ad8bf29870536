"""Check a job's output against its input and the workers' execution logs.

Per ID: lost (never in the output), duplicated (in the output more than
once), wrong (an error record, or a result other than the expected one), and
executed more than once (allowed: the fleet runs a batch again when it cannot
tell whether a lost worker finished it). A job passes with lost, duplicated
and wrong all 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
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
    wanted = set(ids)
    seen: Counter[str] = Counter()
    wrong: list[str] = []
    lines = out_path.read_bytes().splitlines() if out_path.exists() else []
    for raw in lines:
        record = json.loads(raw)
        item = record["id"]
        seen[item] += 1
        if "error" in record or record.get("result") != expected(item):
            wrong.append(item)
    lost = [i for i in ids if i not in seen]
    duplicated = [i for i, n in seen.items() if n > 1]
    unknown = [i for i in seen if i not in wanted]
    ran = executions(exec_dir, wanted)
    twice = [i for i, n in ran.items() if n > 1]
    return Report(
        ids=len(ids),
        output_lines=len(lines),
        lost=len(lost),
        duplicated=len(duplicated),
        wrong=len(wrong),
        unknown=len(unknown),
        executions=sum(ran.values()),
        executed_twice=len(twice),
        examples={
            "lost": lost[:10],
            "duplicated": duplicated[:10],
            "wrong": wrong[:10],
            "unknown": unknown[:10],
        },
    )
