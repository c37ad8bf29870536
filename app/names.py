"""Names shared by the processes of a fleet and the stack that builds it.

A name typed in two places drifts apart; these are typed once. The Pulumi
program (infra/), the launcher, the host daemons and the operator's commands
all import them from here.
"""

from __future__ import annotations

import functools
import json
import sys
from importlib import metadata
from pathlib import Path

# The distribution that every worker installs (its wheel is celery_fleet-*.whl).
DISTRIBUTION = "celery-fleet"

# The tag on the autoscaling group (propagated to its instances) that names the stack.
STACK_TAG = "celery-fleet:stack"
# The tag an instance whose boot failed puts on itself: why (scripts/fleet-boot.sh fail_boot).
BOOT_ERROR_TAG = "celery-fleet:boot-error"

# CloudWatch: the namespace and dimension of the metrics launchers publish.
METRIC_NAMESPACE = "CeleryFleet"
METRIC_DIMENSION = "Stack"
# Batches a launcher holds back from the broker; the stack scales on queue depth plus these.
HELD_BATCHES_METRIC = "HeldBatches"
# Batches written since the last report, for the stack's dashboard.
BATCHES_COMPLETED_METRIC = "BatchesCompleted"
# What each worker publishes (FLEET_METRICS=cloudwatch, app/worker/heartbeat.py), every
# minute, per instance (dimensions Stack and InstanceId) and for the stack (Stack alone):
# its slots running a batch, and the batches it finished in that minute.
INSTANCE_DIMENSION = "InstanceId"
BUSY_SLOTS_METRIC = "BusySlots"
WORKER_BATCHES_METRIC = "WorkerBatchesFinished"

# systemd units on a worker host (app.host.units writes them).
WORKER_UNIT = "celery-fleet-worker.service"
AGENT_UNIT = "celery-fleet-agent.service"


def ssm_prefix(stack: str) -> str:
    """Where a stack keeps its connection settings in SSM Parameter Store."""
    return f"/celery-fleet/{stack}/"


def log_group(stack: str) -> str:
    """The CloudWatch log group of a stack's workers."""
    return f"/celery-fleet/{stack}/worker"


def app_version() -> str:
    """The installed version of this kit ("dev" when run from a checkout without metadata)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "dev"


# The AWS SDKs' (boto3, the aws CLI, the Go SDK of the CloudWatch agent) switch to
# dual-stack endpoints; a stack with `nat: ipv6` sets it on its worker hosts.
DUALSTACK_VARIABLE = "AWS_USE_DUALSTACK_ENDPOINT"

# The entry-point group where a user's project names its task modules
# ([project.entry-points."celery_fleet.tasks"] mytasks = "myproj.tasks").
TASK_ENTRY_POINTS = "celery_fleet.tasks"

# A wheelhouse (app/wheelhouse.py: `fleet package`, `pulumi up`) holds, beside its wheels,
# its manifest (what it holds, and the content hash of the code: its version) and the
# requirements file the hosts install from (every wheel, pinned, with its sha256).
# scripts/fleet-boot.sh copies the manifest into the venv it installs, where the
# worker reads its version (code_version).
WHEELHOUSE_MANIFEST = "celery-fleet-wheelhouse.json"
WHEELHOUSE_REQUIREMENTS = "celery-fleet-requirements.txt"


@functools.cache
def code_version(prefix: str | None = None) -> str | None:
    """The content hash of the code this interpreter's environment was installed from (the
    wheelhouse manifest in the venv), or None where it was not installed from a wheelhouse
    (a checkout, a single wheel). Read once: a new install restarts the worker."""
    try:
        manifest = json.loads(Path(prefix or sys.prefix, WHEELHOUSE_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return version if isinstance(version, str) and version else None
