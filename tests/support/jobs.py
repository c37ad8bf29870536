"""Jobs in tests: run one to the end, or in a thread while the test injects a fault."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from app.launcher import JobOptions, JobSummary, Launcher, Source
from scripts.local.fleet import LocalFleet


def run_job(fleet: LocalFleet, task: str, spec: str, out: Path, **kwargs: Any) -> JobSummary:
    """Run `task` over the IDs of `spec` on `fleet` and return its summary; kwargs: the
    JobOptions fields, and fmt/column/field for the source."""
    source = Source.parse(
        spec, kwargs.pop("fmt", None), kwargs.pop("column", None), kwargs.pop("field", None)
    )
    opts = JobOptions(task=task, source=source, out=out, progress=False, **kwargs)
    return Launcher(fleet.settings).run(opts)


class Recording(Launcher):
    """A launcher that tells the test its job's ID as soon as the job exists."""

    def __init__(self, settings, sends: int = 1) -> None:
        super().__init__(settings)
        self.job: str | None = None
        self.known = threading.Event()
        self.sends = sends

    def _new_job(self, *args, **kwargs):
        job, meta = super()._new_job(*args, **kwargs)
        self.job = job
        self.known.set()
        return job, meta

    def send_many(self, job: str, batches) -> None:
        for _ in range(self.sends):  # sends > 1: every batch is published that many times
            super().send_many(job, batches)


class Background:
    """A job run by the launcher in a thread while the test injects a fault."""

    def __init__(
        self,
        fleet: LocalFleet,
        out: Path | None,
        n: int,
        batch: int,
        sends: int = 1,
        task: str = "slow",
        sink: dict[str, Any] | None = None,
    ) -> None:
        self.launcher = Recording(fleet.settings, sends)
        self.opts = JobOptions(
            task=task,
            source=Source.parse(f"range:0:{n}"),
            batch_size=batch,
            out=out,
            sink=sink,
            progress=False,
        )
        self.summary: JobSummary | None = None
        self.error: BaseException | None = None
        self.finished: float | None = None  # time.time() when the launcher returned
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.launcher.known.wait(0.05) and self.thread.is_alive():
            assert time.monotonic() < deadline, "the job did not start within 30 s"
        if self.error is not None:
            raise self.error
        self.job = self.launcher.job

    def _run(self) -> None:
        try:
            self.summary = self.launcher.run(self.opts)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished = time.time()

    def result(self, timeout: float) -> JobSummary:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"job {self.job} did not finish within {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary
