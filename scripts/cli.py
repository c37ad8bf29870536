"""`fleet`: the command line. One sub-command per verb; status to stderr, results to stdout.

Exit codes: 0 every item succeeded; 1 some items failed; 2 bad input, usage or
unknown task; 3 broker or result store unreachable; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from app.settings import ConfigError, Settings


def _fail(message: str, code: int) -> None:
    click.echo(f"fleet: {message}", err=True)
    sys.exit(code)


# Set by main(), the console script: the process is ours to end.
_CONSOLE = False


def _finish(code: int) -> None:
    """End a finished command; as the console script, without the interpreter's teardown.

    Tearing down celery, kombu, redis-py and their modules takes about 0.1 s,
    a tenth of a million-ID no-op job. Everything the command wrote is closed
    by now, so flush the standard streams and the logs and leave. Called from
    Python (tests, CliRunner), it is a plain sys.exit.
    """
    if not _CONSOLE:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def resolve_settings(broker: str | None, backend: str | None, stack: str | None = None,
                     **overrides: object) -> Settings:
    """A stack's SSM parameters; else flags, then FLEET_* variables, then the local fleet."""
    from scripts.local import read_state

    if stack:
        from app.stack import settings_from_stack

        return settings_from_stack(stack, **overrides)

    env = dict(os.environ)
    if not (broker or env.get("FLEET_BROKER_URL")):
        state = read_state()
        if state is not None:
            env = {**state["env"], **{k: v for k, v in env.items() if k.startswith("FLEET_")}}
    return Settings.from_env(env, broker_url=broker, result_url=backend, **overrides)


class LazyGroup(click.Group):
    """A group whose listed sub-commands are imported only when called.

    `fleet run` is timed as a whole process; the ops, status and cost
    commands (Fabric, boto3, price tables) cost it 35 ms of imports.
    """

    LAZY = {"cost": "scripts.cost:cost", "ops": "scripts.ops:ops",
            "status": "scripts.status:status"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY:
            import importlib

            module, _, name = self.LAZY[cmd_name].partition(":")
            return getattr(importlib.import_module(module), name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="celery-fleet")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Spread a Python function over every core of a Celery fleet."""
    if ctx.invoked_subcommand != "run":  # `run` says when its imports are done
        _imports_done()


class BatchSize(click.ParamType):
    name = "auto|N"

    def convert(self, value, param, ctx):
        if value in (None, "auto") or isinstance(value, int):
            return None if value == "auto" else value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)
        if n < 1:
            self.fail("must be at least 1", param, ctx)
        return n


@cli.command()
@click.argument("task", required=False)
@click.option("--ids", "ids", metavar="SOURCE",
              help="A file (one ID per line; .csv with --column; .jsonl with --field), "
                   "'-' for stdin, s3://BUCKET/KEY, or range:START:STOP.")
@click.option("--column", help="The ID column of a CSV source (by header name).")
@click.option("--field", "field_", help="The ID field of a JSON-lines source.")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "jsonl"]),
              help="Input format when the file name does not say (e.g. for stdin).")
@click.option("--batch-size", type=BatchSize(), default="auto", show_default=True,
              help="IDs per batch; auto calibrates on the first IDs.")
@click.option("--target-seconds", type=click.FloatRange(min=0.01), default=2.0,
              show_default=True, help="With --batch-size auto: aimed-at run time of one batch.")
@click.option("--max-in-flight", type=click.IntRange(min=1),
              help="Batches on the broker at once (default: twice the worker slots).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON lines here instead of stdout.")
@click.option("--resume", metavar="JOB",
              help="Finish an earlier job: re-send only what is missing.")
@click.option("--broker", metavar="URL",
              help="Broker URL (default: FLEET_BROKER_URL or the local fleet).")
@click.option("--backend", metavar="URL",
              help="Result store URL (default: FLEET_RESULT_URL or the local fleet).")
@click.option("--stack", metavar="NAME",
              help="A deployed stack: read its broker and result store from SSM Parameter Store.")
@click.option("--queue", help="Queue the workers consume (default: FLEET_QUEUE or 'fleet').")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON (on stdout with --out, else on stderr).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def run(task, ids, column, field_, fmt, batch_size, target_seconds, max_in_flight, out, resume,
        broker, backend, stack, queue, as_json, progress):
    """Run TASK over every ID of --ids on the fleet.

    TASK is a function registered with @fleet_task, or module:function from a
    module the workers load (FLEET_INCLUDE / fleet local --include).
    """
    from app.jobs import JobError, JobOptions, Launcher
    from app.sources import InputError, Source

    _imports_done()
    if not resume and not (task and ids):
        _fail("give a TASK and --ids SOURCE (or --resume JOB). See `fleet run --help`.", 2)
    try:
        source = Source.parse(ids, fmt, column, field_) if ids else None
    except InputError as exc:
        _fail(str(exc), 2)
    if stack and (broker or backend):
        _fail("give either --stack or --broker/--backend, not both.", 2)
    settings = resolve_settings(broker, backend, stack, queue=queue)
    opts = JobOptions(
        task=task, source=source, batch_size=batch_size, target_seconds=target_seconds,
        max_in_flight=max_in_flight, out=out, resume=resume,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    try:
        summary = Launcher(settings).run(opts)
    except JobError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; batches already committed are kept for --resume.", 130)
    report = summary.as_dict()
    if as_json:
        click.echo(json.dumps(report), err=out is None)
    click.echo(
        f"job {summary.job}: {summary.status}, {summary.items:,} items, {summary.errors:,} "
        f"errors, {summary.wall_seconds:.2f} s, {summary.items_per_second:,.0f} items/s"
        + (f", {summary.resent} batches re-sent" if summary.resent else "")
        + (f"; resume with: fleet run --resume {summary.job}"
           if summary.status == "interrupted" else ""),
        err=True,
    )
    _finish({"ok": 0, "errors": 1, "interrupted": 130}[summary.status])


@cli.command()
@click.option("--instances", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker instances, each pinned to its share of this machine's CPUs.")
@click.option("--broker", "broker_kind", type=click.Choice(["redis", "rabbitmq"]),
              default="redis", show_default=True)
@click.option("--include", multiple=True, metavar="MODULE",
              help="Extra module with tasks for the workers to load (repeatable).")
@click.option("--queue", default="fleet", show_default=True)
@click.option("--env", "print_env", is_flag=True,
              help="Print `export` lines for the running local fleet and exit.")
@click.option("--autoscale", is_flag=True,
              help="Start and drain instances on the queue depth (app/autoscale.py), between "
                   "--min-instances and --max-instances; --instances is then not used.")
@click.option("--max-instances", type=click.IntRange(min=1),
              help="With --autoscale: the most instances (default: one per usable CPU).")
@click.option("--min-instances", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --autoscale: instances kept with no work.")
@click.option("--flower", is_flag=True,
              help="Also start Flower (Celery's web monitor) on a free loopback port.")
@click.option("--tls", is_flag=True,
              help="Broker and result store speak TLS only (rediss://, amqps://), with a "
                   "certificate from a throwaway CA (FLEET_TLS_CA_FILE), as on AWS.")
def local(instances, broker_kind, include, queue, print_env, autoscale, max_instances,
          min_instances, flower, tls):
    """Run a fleet on this machine until Ctrl-C.

    `fleet run` in another terminal finds it without flags; any Celery client
    can use it after `eval "$(fleet local --env)"`.
    """
    from scripts.local import LocalFleet, LocalFleetError, read_state

    if print_env:
        state = read_state()
        if state is None:
            _fail("no local fleet is running; start one with `fleet local`.", 1)
        env = state["env"]
        env = {**env, "CELERY_BROKER_URL": env["FLEET_BROKER_URL"],
               "CELERY_RESULT_BACKEND": env["FLEET_RESULT_URL"]}
        for key, value in env.items():
            click.echo(f"export {key}={shlex.quote(value)}")
        return
    if read_state() is not None:
        _fail("a local fleet is already running (see `fleet local --env`).", 1)
    fleet = LocalFleet(0 if autoscale else instances, broker_kind, tuple(include), queue,
                       write_state=True, tls=tls)
    scaler = None
    flower_proc = None
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        click.echo("starting the local fleet...", err=True)
        fleet.start()
        click.echo(fleet.describe(), err=True)
        if autoscale:
            from app.autoscale import Policy
            from scripts.autoscaler import local_autoscaler

            try:
                policy = Policy(min_instances=min_instances,
                                max_instances=max_instances or len(fleet.cpus))
            except ValueError as exc:
                _fail(str(exc), 2)
            scaler = local_autoscaler(fleet, policy, say=lambda m: click.echo(m, err=True))
            click.echo(f"  autoscaling between {policy.min_instances} and "
                       f"{policy.max_instances} instances", err=True)
        if flower:
            from scripts.flower import start_flower

            flower_proc, url = start_flower(fleet.settings, fleet.workdir)
            click.echo(f"  flower: {url}", err=True)
        click.echo("run a job from another terminal, e.g.\n"
                   "  fleet run process_id --ids range:0:100000 --out results.jsonl\n"
                   "plain Celery clients: eval \"$(fleet local --env)\"\n"
                   "Ctrl-C stops everything.", err=True)
        while not stopping:
            for index in fleet.supervise():
                click.echo(f"instance{index} died; restarted it", err=True)
            if scaler is not None:
                scaler.tick()
            time.sleep(0.5)
    except LocalFleetError as exc:
        _fail(str(exc), 1)
    finally:
        click.echo("stopping the local fleet...", err=True)
        if flower_proc is not None:
            from scripts.local import stop_process

            stop_process(flower_proc, timeout=10)
        fleet.stop()


def _serial_seconds_per_item(fn, rounds: int = 5, n: int = 4000) -> float:
    """The fastest of a few short serial loops over `fn`: the first calls (cold caches) and
    a busy moment of the machine would make the serial time, and the efficiency, too high."""
    best = float("inf")
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(r * n, (r + 1) * n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


@cli.command()
@click.option("--ids", "n_ids", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="How many IDs to run the example task over.")
@click.option("--instances", "-n", type=click.IntRange(min=1), default=None,
              help="Worker instances (default: one per usable CPU).")
@click.option("--broker", "broker_kind", type=click.Choice(["redis", "rabbitmq"]),
              default="redis", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep the results here (default: a temporary file, removed).")
def demo(n_ids, instances, broker_kind, out):
    """Start a local fleet, run the example task over --ids IDs, report, tear down."""
    from app import tasks  # noqa: F401 - registers process_id (the launcher does not import it)
    from app.cpus import available_cpus
    from app.jobs import JobError, JobOptions, Launcher
    from app.registry import resolve
    from app.sources import Source
    from scripts.local import LocalFleet, LocalFleetError

    task = resolve("process_id", ["app.tasks"])
    per_item = _serial_seconds_per_item(task.fn)
    cpus = available_cpus()
    click.echo(f"example task: {per_item * 1e6:.1f} us per ID on one core here; "
               f"{n_ids:,} IDs is {per_item * n_ids:.1f} s of CPU over {cpus} CPUs", err=True)
    with tempfile.TemporaryDirectory() as tmp:
        target = out or Path(tmp) / "results.jsonl"
        try:
            click.echo("starting a local fleet...", err=True)
            with LocalFleet(instances or cpus, broker_kind) as fleet:
                click.echo(fleet.describe(), err=True)
                summary = Launcher(fleet.settings).run(JobOptions(
                    task="process_id", source=Source.parse(f"range:0:{n_ids}"), out=target,
                    progress=True))
        except (JobError, LocalFleetError) as exc:
            _fail(str(exc), getattr(exc, "exit_code", 1))
        # Timed again after the job: a shared machine's speed drifts, and the
        # fastest serial time seen gives the fairest (lowest) efficiency.
        per_item = min(per_item, _serial_seconds_per_item(task.fn))
        ideal = per_item * n_ids / cpus
        click.echo(
            f"\n{summary.items:,} IDs in {summary.wall_seconds:.2f} s: "
            f"{summary.items_per_second:,.0f} IDs/s, {summary.errors} errors\n"
            f"parallel efficiency {ideal / summary.wall_seconds:.0%} "
            f"(ideal {ideal:.2f} s = serial time / {cpus} CPUs)"
            + (f"\nresults in {target}" if out else ""),
            err=True,
        )
    sys.exit(0 if summary.status == "ok" else 1)



@cli.command()
@click.option("--items", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option("--seconds-per-item", type=click.FloatRange(min=0, min_open=True), default=0.05,
              show_default=True)
@click.option("--cores", type=click.IntRange(min=1), default=16, show_default=True,
              help="Worker slots per instance.")
@click.option("--boot", "boot_seconds", type=click.FloatRange(min=0), default=60.0,
              show_default=True, help="Seconds from launch to a consuming worker.")
@click.option("--spot-rate", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Spot interruptions per instance-hour.")
@click.option("--no-agent", is_flag=True,
              help="Spot without the drain agent: batches come back when their lease lapses.")
@click.option("--broker-depth-only", is_flag=True,
              help="The policy sees only the broker's queue, not the batches launchers hold back.")
@click.option("--price", type=click.FloatRange(min=0), default=0.714, show_default=True,
              help="Price per instance-hour (the default is only an example).")
@click.option("--max-instances", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--min-instances", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--backlog-per-slot", type=click.FloatRange(min=0, min_open=True),
              default=1.0, show_default=True, help="The policy's target.")
@click.option("--scale-out-cooldown", type=click.FloatRange(min=0), default=5.0,
              show_default=True)
@click.option("--scale-in-delay", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between policy decisions.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--plot", "png", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG of queue depth and instance count over time.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def simulate(items, seconds_per_item, cores, boot_seconds, spot_rate, no_agent,
             broker_depth_only, price, max_instances, min_instances, backlog_per_slot,
             scale_out_cooldown, scale_in_delay, interval, seed, png, as_json):
    """Simulate a job on an autoscaled fleet against a static fleet and the ideal bound."""
    from app.autoscale import Policy
    from scripts.simulate import Scenario
    from scripts.simulate import run as run_simulation

    try:
        policy = Policy(min_instances, max_instances, backlog_per_slot, scale_out_cooldown,
                        scale_in_delay)
    except ValueError as exc:
        _fail(str(exc), 2)
    scenario = Scenario(items=items, seconds_per_item=seconds_per_item, cores=cores,
                        boot_seconds=boot_seconds, spot_rate=spot_rate, price=price,
                        agent=not no_agent, held_visible=not broker_depth_only,
                        interval=interval, seed=seed)
    text, results = run_simulation(scenario, policy, png)
    if as_json:
        click.echo(json.dumps([
            {"fleet": r.name, "makespan_seconds": round(r.makespan, 2),
             "instance_hours": round(r.instance_hours, 4), "cost": round(r.cost, 4),
             "peak_instances": r.peak_instances, "interruptions": r.interruptions,
             "batches_rerun": r.resent} for r in results]))
    else:
        click.echo(text)
    if png:
        click.echo(f"plot written to {png}", err=True)


def _imports_done() -> None:
    """Turn the garbage collector back on, with what the imports made frozen.

    main() turns it off: the imports of celery, kombu and redis-py make
    objects by the hundred thousand and no garbage, and the collections they
    set off cost `fleet run` about 40 ms. Frozen, those objects are never
    scanned again (gc.freeze).
    """
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main() -> None:
    global _CONSOLE
    import gc

    gc.disable()  # until the command's imports are done (_imports_done)
    _CONSOLE = True
    try:
        cli()
    except ConfigError as exc:
        click.echo(str(exc.code), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
