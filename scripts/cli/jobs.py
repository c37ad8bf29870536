"""`fleet jobs`: every job the fleet's result store holds, submitted or run attached."""

from __future__ import annotations

import json

import click

from scripts.cli.common import fleet_options, fleet_settings, open_fleet_store, store_errors


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def render(rows: list[dict]) -> str:
    if not rows:
        return "no jobs in the result store."
    head = ("JOB", "STATE", "DONE", "ERRORS", "RATE/s", "ETA", "TASK", "RESULTS")
    table = [head]
    for r in rows:
        total = "?" if r["total"] is None else f"{r['total']:,}"
        state = r["state"] + (" (see below)" if r["reason"] else "")
        table.append(
            (
                r["job"],
                state,
                f"{r['items']:,}/{total}",
                f"{r['errors']:,}",
                f"{r['rate']:,.0f}",
                duration(r["eta_seconds"]),
                r["task"],
                r["out"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in table
    ]
    lines.extend(f"{r['job']}: {r['reason']}" for r in rows if r["reason"])
    return "\n".join(lines)


@click.command()
@fleet_options
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
def jobs(broker, backend, stack, queue, as_json):
    """Every job in the fleet's result store: state, items done of total, errors, rate, ETA
    and where its results are. A job's record expires with FLEET_RESULT_TTL."""
    from app.launcher.jobs import views

    settings = fleet_settings(broker, backend, stack, queue)
    store = open_fleet_store(settings)
    with store_errors(settings, store):
        rows = [v.as_dict() for v in views(store, settings)]
    click.echo(json.dumps(rows, indent=2) if as_json else render(rows))
