"""Boot time: from a bare host (no venv) to a worker consuming, with the wheelhouse local.

    python -m tests.bench.bench_boot [--runs 3]

Each run starts `fleet-boot --foreground` on an empty app directory (the
user-data's path, offline: the app wheel and every dependency wheel in a local
directory, as the stack's artifact prefix holds them for subnets without PyPI)
and times, from the start of the script:

  installed   the venv holds the app and its dependencies
  ready       the worker's heartbeat is in the result store
  consuming   the first batch of a job sent at that moment is done
  CPU time    user + system CPU seconds of it all (boot, worker, the job), which
              other load on the machine does not inflate as it does wall time

then the same from a venv that already holds the wheel (an image baked with
playbooks/bake-ami.yml, or a second boot), where installing is skipped.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from scripts.local.fleet import LocalFleet
from tests.support.worker_host import (
    BOOT_SCRIPT,
    host_env,
    run_job,
    wait_worker,
    wheelhouse,
    write_settings,
)


def one_boot(fleet: LocalFleet, root: Path, node: str) -> dict[str, float]:
    settings = write_settings(fleet.settings, root / "settings.env")
    env = host_env(
        root,
        byte_compile=True,
        FLEET_ARTIFACT=str(wheelhouse().directory),
        FLEET_SETTINGS_FILE=str(settings),
    )
    (root / "run").mkdir(exist_ok=True)
    log = root / "boot.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(BOOT_SCRIPT), "--foreground", "--node", node],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root / "run",
            start_new_session=True,
        )
    try:
        installed = None
        while installed is None and proc.poll() is None:
            text = log.read_text(errors="replace")
            if "fleet-boot: installed" in text or "fleet-boot: unchanged" in text:
                installed = time.monotonic() - t0
            time.sleep(0.02)
        wait_worker(fleet.settings, node, timeout=120, proc=proc)
        ready = time.monotonic() - t0
        summary = run_job(fleet.settings, root / "out.jsonl", n=8)
        assert summary.status == "ok", summary
        consuming = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole boot and the short job: what a busy machine cannot hide.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"installed": installed or 0.0, "ready": ready, "consuming": consuming, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    wheelhouse()  # built before any clock starts
    rows: dict[str, list[dict[str, float]]] = {"bare venv": [], "baked (installed)": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalFleet(0, "redis", workdir=Path(tmp, "fleet")) as fleet,
    ):
        for run in range(args.runs):
            root = Path(tmp, f"host{run}")
            rows["bare venv"].append(one_boot(fleet, root, f"bare{run}@bench"))
            rows["baked (installed)"].append(one_boot(fleet, root, f"baked{run}@bench"))
    print(f"fleet-boot to a consuming worker, median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"{'':<20}{'installed':>10}{'ready':>10}{'consuming':>11}{'CPU time':>10}")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{name:<20}{med['installed']:>9.1f}s{med['ready']:>9.1f}s{med['consuming']:>10.1f}s"
            f"{med['cpu']:>9.1f}s"
        )


if __name__ == "__main__":
    main()
