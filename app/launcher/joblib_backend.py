"""joblib on the fleet: `fleet.register_joblib()`, then

    with joblib.parallel_backend("fleet"):
        results = Parallel()(delayed(f)(x) for x in xs)

joblib cuts the calls into batches (its automatic batching, from how long batches take)
and hands each to the backend; here each call of a batch goes to the fleet's Executor,
which gathers calls into messages of its own. The functions must be importable by the
workers and the arguments JSON, as for every fleet call: nothing is pickled.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

from joblib.parallel import (
    AutoBatchingMixin,
    ParallelBackendBase,
    register_parallel_backend,
)

NAME = "fleet"


class FleetBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    supports_retrieve_callback = True
    supports_timeout = True
    uses_threads = False
    supports_sharedmem = False

    # app.fleet.Executor, given by register(): the launcher does not import the API.
    executor: Any = None

    def __init__(self, stack: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stack = stack
        self._executor: Any = None
        self._launcher: Any = None  # reads the slots online; made once, not per call

    def _ensure(self) -> Any:
        if self._executor is None:
            self._executor = self.executor(stack=self.stack)
        return self._executor

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """The slots online (at least one), or fewer if n_jobs asks for fewer."""
        from app.launcher import Launcher

        if self._launcher is None:
            self._launcher = Launcher(self._ensure()._config)
        slots = max(1, int(self._launcher.slots()))
        if n_jobs is not None and n_jobs > 0:
            return min(n_jobs, slots)
        return slots

    def configure(self, n_jobs: int = 1, parallel: Any = None, **kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Any, callback: Any = None) -> concurrent.futures.Future[Any]:
        executor = self._ensure()
        calls = [executor.submit(f, *args, **kwargs) for f, args, kwargs in func.items]
        batch: concurrent.futures.Future[Any] = concurrent.futures.Future()
        left = [len(calls)]
        lock = threading.Lock()

        def one_done(_: Any) -> None:
            with lock:
                left[0] -= 1
                if left[0] or batch.done():
                    return
            failed = next((c.exception() for c in calls if c.exception() is not None), None)
            if failed is not None:
                batch.set_exception(failed)
            else:
                batch.set_result([c.result() for c in calls])

        for call in calls:
            call.add_done_callback(one_done)
        if callback is not None:
            batch.add_done_callback(callback)
        return batch

    def retrieve_result_callback(self, future: concurrent.futures.Future[Any]) -> Any:
        return future.result()

    def retrieve_result(self, out: Any, timeout: float | None = None) -> Any:
        return out.result(timeout=timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        self.terminate()

    def terminate(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def get_nested_backend(self) -> Any:
        from joblib.parallel import SequentialBackend

        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register(executor: Any) -> None:
    """Make NAME a joblib backend whose calls go to `executor` (app.fleet.Executor)."""
    FleetBackend.executor = executor
    register_parallel_backend(NAME, FleetBackend)
