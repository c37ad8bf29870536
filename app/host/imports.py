"""Import a worker's task modules in a fresh interpreter, before the worker is started.

`python -m app.host.imports MODULE...` imports each module in turn and, at the
first that fails, prints one JSON line {"module": ..., "error": ...} and exits 1.
`app.boot` runs it with the worker's own Python and environment (`check_task_modules`),
so that a project whose module cannot be imported (a missing dependency, a syntax
error, a setting it reads at import) stops the boot, naming the module, instead of
leaving a worker that restarts for ever or consumes without the tasks.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence

from app.settings import ConfigError


def main(modules: Sequence[str]) -> int:
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # anything at import: SystemExit and the like too
            error = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
            print(json.dumps({"module": module, "error": error}), flush=True)
            return 1
    return 0


def check_task_modules(
    python: str, modules: Mapping[str, str], env: Mapping[str, str], timeout: float = 120
) -> None:
    """ConfigError naming the first of `modules` (module -> where it was declared) that the
    worker's interpreter `python` cannot import with the worker's environment `env`."""
    if not modules:
        return
    proc = subprocess.run(
        [python, "-m", "app.host.imports", *modules],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == 0:
        return
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"could not check the task modules with {python}: {tail}")
    failed = json.loads(lines[-1])
    module = failed["module"]
    raise ConfigError(
        f"task module {module} ({modules.get(module, 'declared')}) cannot be imported: "
        f"{failed['error']}. The worker was not started: add what the module needs to its "
        "project's dependencies (or fix the module) and deploy again."
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
