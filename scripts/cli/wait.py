"""`fleet wait JOB` and `fleet watch JOB`: follow a job from any machine until it ends."""

from __future__ import annotations

import json
import sys

import click

from scripts.cli.common import fail, fleet_options, fleet_settings, open_fleet_store, store_errors


def follow(job, broker, backend, stack, queue, as_json, bar, timeout=None):
    from app.launcher.jobs import EXIT_CODES, wait

    settings = fleet_settings(broker, backend, stack, queue)
    store = open_fleet_store(settings)
    shown = {}

    def progress(v) -> None:
        if not bar:
            return
        if "bar" not in shown:
            from tqdm import tqdm

            shown["bar"] = tqdm(
                total=v.total,
                unit=" ids",
                unit_scale=True,
                file=sys.stderr,
                desc=job,
                dynamic_ncols=True,
                smoothing=0.05,
            )
        b = shown["bar"]
        b.update(v.items - b.n)
        b.set_postfix(state=v.state, errors=v.errors, refresh=True)

    try:
        with store_errors(settings, store):
            v = wait(store, settings, job, progress, timeout=timeout)
    finally:
        if "bar" in shown:
            shown["bar"].close()
    if as_json:
        click.echo(json.dumps(v.as_dict()))
    if v.state not in EXIT_CODES:  # --timeout passed
        fail(f"job {job} is still {v.state} ({v.items:,} items done).", 124)
    line = f"job {job}: {v.state}, {v.items:,} items, {v.errors:,} errors"
    if v.reason:
        line += f": {v.reason}"
    if v.state == "stopped":
        line += f"; its launcher is gone: resume with fleet run --resume {job}"
    click.echo(line, err=True)
    sys.exit(EXIT_CODES[v.state])


@click.command()
@click.argument("job")
@fleet_options
@click.option("--json", "as_json", is_flag=True, help="Print the job's final view as JSON.")
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds (exit 124)."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
def wait(job, broker, backend, stack, queue, as_json, timeout, progress):
    """Block until JOB ends; the exit code says how: 0 every item succeeded, 1 some items
    failed, 2 the job was refused (a bad task or input), 3 the result store is unreachable,
    5 cancelled, 130 a `fleet run` launcher gone before the end (resume it)."""
    bar = sys.stderr.isatty() if progress is None else progress
    follow(job, broker, backend, stack, queue, as_json, bar, timeout)


@click.command()
@click.argument("job")
@fleet_options
def watch(job, broker, backend, stack, queue):
    """Show JOB's progress bar until it ends (Ctrl-C leaves the job running); exit codes as
    `fleet wait`."""
    try:
        follow(job, broker, backend, stack, queue, False, True)
    except KeyboardInterrupt:
        fail(f"stopped watching; job {job} goes on.", 130)
