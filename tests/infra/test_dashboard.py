"""The dashboard shows what the workers publish: busy slots and finished batches, per instance
and for the stack, under the names, namespace and dimensions app/worker/heartbeat.py uses."""

from __future__ import annotations

import json
import re

import pytest
from pulumi_mocks import REGION, StackRun

from app.names import (
    BUSY_SLOTS_METRIC,
    INSTANCE_DIMENSION,
    METRIC_DIMENSION,
    METRIC_NAMESPACE,
    WORKER_BATCHES_METRIC,
)
from app.worker.heartbeat import metric_data
from infra.config import StackConfig


@pytest.fixture(params=["sqs", "rabbitmq"])
def run(request, run_stack) -> StackRun:
    return run_stack(StackConfig(stack="test", broker=request.param))


def widgets(run: StackRun) -> dict[str, dict]:
    body = json.loads(run.one("aws:cloudwatch/dashboard:Dashboard").props["dashboardBody"])
    return {w["properties"]["title"]: w for w in body["widgets"]}


SEARCH = re.compile(
    r"^SEARCH\('\{([^}]*)\} MetricName=\"(\w+)\" (\w+)=\"([^\"]*)\"', '(\w+)', 60\)$"
)


@pytest.mark.parametrize(
    ("title", "metric", "stat"),
    [
        ("Busy slots (running batches)", BUSY_SLOTS_METRIC, "Average"),
        ("Batches finished per minute, by the workers", WORKER_BATCHES_METRIC, "Sum"),
    ],
)
def test_worker_metrics_per_instance_and_total(run, title, metric, stat):
    widget = widgets(run)[title]
    props = widget["properties"]
    assert props["region"] == REGION and props["period"] == 60
    total, each = props["metrics"]
    # The stack's total: the Stack-only series every worker publishes, summed.
    assert total[:-1] == [METRIC_NAMESPACE, metric, METRIC_DIMENSION, "test"]
    assert total[-1]["stat"] == "Sum"
    # One line per instance: a SEARCH of the schema {namespace, InstanceId, Stack}.
    (options,) = each
    match = SEARCH.match(options["expression"])
    assert match, options["expression"]
    schema, name, dimension, stack, search_stat = match.groups()
    assert schema.split(",") == [METRIC_NAMESPACE, INSTANCE_DIMENSION, METRIC_DIMENSION]
    assert (name, dimension, stack, search_stat) == (metric, METRIC_DIMENSION, "test", stat)


def test_the_dashboard_reads_exactly_what_a_worker_publishes(run):
    """Every dimension set the dashboard reads is one the worker's request carries."""
    published = {
        (d["MetricName"], tuple(sorted(x["Name"] for x in d["Dimensions"])))
        for d in metric_data("test", "i-1", 1, 1)["MetricData"]
    }
    read = set()
    for widget in widgets(run).values():
        for row in widget["properties"]["metrics"]:
            if row[0] == METRIC_NAMESPACE and row[1] in (BUSY_SLOTS_METRIC, WORKER_BATCHES_METRIC):
                read.add((row[1], tuple(sorted(row[2:-1:2]))))
            expression = row[-1].get("expression", "") if isinstance(row[-1], dict) else ""
            if match := SEARCH.match(expression):
                read.add((match[2], tuple(sorted(match[1].split(",")[1:]))))
    assert read == published


def test_widgets_fill_a_grid_two_wide(run):
    placed = [(w["x"], w["y"]) for w in widgets(run).values()]
    assert placed == [(12 * (i % 2), 6 * (i // 2)) for i in range(len(placed))]
    assert len(placed) == 6
