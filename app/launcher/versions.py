"""Which code the workers online run: against each other, and against what was deployed.

Every worker's heartbeat carries the content hash of the wheelhouse its venv
was installed from (`code`; app/names.py `code_version`). What was deployed is
the stack's SSM parameter (`pulumi up`) or the local fleet's `--code`
(Settings.code_version). While an instance refresh or a rolling `fleet ops
deploy` is under way the two differ, and a job's batches may meet either code:
`fleet run` says so (and with --require-version refuses to start), and `fleet
status` shows the count of workers per version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# How a worker installed from no wheelhouse (a checkout, a single wheel) is counted.
UNPACKAGED = "unpackaged"


@dataclass(frozen=True)
class CodeVersions:
    """Workers online per code version, and the version deployed (None: not known)."""

    counts: dict[str, int]
    deployed: str | None = None

    @classmethod
    def of(
        cls, workers: Iterable[dict[str, Any]], deployed: str | None, queue: str | None = None
    ) -> CodeVersions:
        """From the store's worker registry (those of `queue`, if given)."""
        counts = Counter(
            str(w.get("code") or UNPACKAGED)
            for w in workers
            if queue is None or w.get("queue", queue) == queue
        )
        return cls(dict(counts.most_common()), deployed)

    @property
    def agree(self) -> bool:
        """One version online, and it is the one deployed (when that is known)."""
        if len(self.counts) > 1:
            return False
        return self.deployed is None or not self.counts or self.deployed in self.counts

    def describe(self) -> str:
        """'3 workers on 55d529fb309872c2 (deployed), 1 on 0c1d...'."""
        parts = []
        for n, (version, count) in enumerate(self.counts.items()):
            noun = ("worker" if count == 1 else "workers") if n == 0 else ""
            mark = " (deployed)" if version == self.deployed else ""
            parts.append(f"{count} {noun} on {version}{mark}".replace("  ", " "))
        return ", ".join(parts) or "no worker online"

    def problem(self) -> str | None:
        """What is wrong, in a sentence, or None when they agree."""
        if self.agree:
            return None
        if len(self.counts) > 1:
            return (
                f"the workers online run {len(self.counts)} versions of the code: "
                f"{self.describe()}. An instance refresh or a rolling `fleet ops deploy` may "
                "be under way (`fleet status`); until it ends a batch may meet either version."
            )
        return (
            f"the workers online run code {self.describe()}, not {self.deployed}, which was "
            "deployed. They were installed from another wheelhouse: deploy it again "
            "(`pulumi up`, `fleet ops deploy`), or wait for the instance refresh to replace them."
        )
