"""What a fleet is doing, from the APIs that know (`fleet status`, and `fleet ops` hosts).

- instances: the autoscaling group(s) tagged `celery-fleet:stack=<stack>`
  (type, zone, lifecycle state) and EC2 (Spot or on-demand, private address);
  for a local fleet, its instance processes;
- workers online: the result store's worker registry (each worker's heartbeat
  carries its concurrency, app version, the content hash of its code and the
  batches it holds), and how many run each code version against the one
  deployed (app/launcher/versions.py);
- queue depth: the broker (Redis list length and RabbitMQ message count through
  a passive declare in kombu; SQS queue attributes through boto3);
- in flight: the store's batch leases (running now, by job) and the batches
  launchers hold back;
- instance refresh: for a stack, the latest refresh of each of its groups
  (a code change replaces the instances through one), shown while it runs and
  when it failed, so instances left on the old code do not go unnoticed.
"""

from __future__ import annotations

from typing import Any

from app.launcher.versions import UNPACKAGED, CodeVersions
from app.names import BOOT_ERROR_TAG, STACK_TAG
from app.settings import Settings, redact


def stack_instances(stack: str, session: Any = None) -> list[dict[str, Any]]:
    """The instances of the stack's autoscaling group(s), found by tag, with EC2's details."""
    import boto3

    session = session or boto3.session.Session()
    autoscaling, ec2 = session.client("autoscaling"), session.client("ec2")
    members: list[dict[str, Any]] = []
    for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate(
        Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [stack]}]
    ):
        for group in page["AutoScalingGroups"]:
            members.extend(dict(i, group=group["AutoScalingGroupName"]) for i in group["Instances"])
    details: dict[str, dict[str, Any]] = {}
    ids = [m["InstanceId"] for m in members]
    for start in range(0, len(ids), 200):  # DescribeInstances takes at most 200 ids a call
        for page in ec2.get_paginator("describe_instances").paginate(
            InstanceIds=ids[start : start + 200]
        ):
            for reservation in page["Reservations"]:
                details.update({i["InstanceId"]: i for i in reservation["Instances"]})
    out = []
    for m in members:
        ec2_info = details.get(m["InstanceId"], {})
        tags = {t["Key"]: t["Value"] for t in ec2_info.get("Tags") or []}
        out.append(
            {
                "id": m["InstanceId"],
                "group": m["group"],
                "type": m.get("InstanceType") or ec2_info.get("InstanceType"),
                "zone": m.get("AvailabilityZone"),
                "state": m.get("LifecycleState"),
                "health": m.get("HealthStatus"),
                # EC2 says "spot" for Spot instances and nothing for on-demand ones.
                "market": "spot" if ec2_info.get("InstanceLifecycle") == "spot" else "on-demand",
                "private_ip": ec2_info.get("PrivateIpAddress"),
                # Why its boot failed, as the instance tagged itself (scripts/fleet-boot.sh).
                "boot_error": tags.get(BOOT_ERROR_TAG),
            }
        )
    return sorted(out, key=lambda i: i["id"])


# Refresh states (DescribeInstanceRefreshes) worth showing: still going, or ended short.
REFRESH_RUNNING = ("Pending", "InProgress", "Cancelling", "RollbackInProgress", "Baking")
REFRESH_FAILED = ("Failed", "Cancelled", "RollbackFailed", "RollbackSuccessful")


def stack_refreshes(stack: str, session: Any = None) -> list[dict[str, Any]]:
    """The latest instance refresh of each of the stack's groups (found by tag), if any."""
    import boto3

    session = session or boto3.session.Session()
    autoscaling = session.client("autoscaling")
    groups = [
        group["AutoScalingGroupName"]
        for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate(
            Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [stack]}]
        )
        for group in page["AutoScalingGroups"]
    ]
    out = []
    for group in sorted(groups):
        refreshes = autoscaling.describe_instance_refreshes(
            AutoScalingGroupName=group, MaxRecords=5
        )["InstanceRefreshes"]
        if not refreshes:
            continue
        # The newest; one not started yet (Pending) is newer than any started.
        latest = max(
            refreshes,
            key=lambda r: r["StartTime"].timestamp() if r.get("StartTime") else float("inf"),
        )
        out.append(
            {
                "group": group,
                "id": latest["InstanceRefreshId"],
                "status": latest["Status"],
                "reason": latest.get("StatusReason"),
                "percent": latest.get("PercentageComplete"),
                "to_update": latest.get("InstancesToUpdate"),
                "started": str(latest["StartTime"]) if latest.get("StartTime") else None,
                "ended": str(latest["EndTime"]) if latest.get("EndTime") else None,
            }
        )
    return out


def local_instances(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The instance processes of the local fleet in `state` (the local fleet's state file)."""
    from app.host.service import pid_alive

    return [
        {
            "id": f"instance{n}",
            "pid": i.get("pid"),
            "cpus": len(i.get("cpus") or []),
            "state": "running" if i.get("pid") and pid_alive(int(i["pid"])) else "stopped",
        }
        for n, i in enumerate(state.get("instances") or [])
    ]


def queue_depth(settings: Settings) -> dict[str, Any]:
    """Messages waiting on the broker for the fleet's queue (SQS: also those received)."""
    from app.queue_depth import SqsReady, ready_count

    reader = ready_count(settings)
    try:
        if isinstance(reader, SqsReady):
            waiting, received = reader.counts()
        else:
            waiting, received = reader.ready(), None
    finally:
        reader.close()
    return {"queue": settings.queue, "waiting": waiting, "received": received}


def collect(
    settings: Settings, instances: list[dict[str, Any]] | None, source: str
) -> dict[str, Any]:
    """The fleet's status; a part that cannot be read is reported in "errors", not raised."""
    from app.store import open_store

    status: dict[str, Any] = {
        "source": source,
        "broker": redact(settings.broker_url),
        "result_store": redact(settings.result_url),
        "instances": instances,
        "workers": [],
        "slots": 0,
        # Workers per code version, the version deployed, and what is wrong, if anything.
        "code": None,
        "queue": None,
        "running_batches": None,
        "jobs_in_flight": None,
        "held_back": None,
        # A deployed stack's latest instance refresh per group; None: not a stack.
        "refreshes": None,
        "errors": [],
    }
    if settings.stack:
        try:
            import boto3

            session = boto3.session.Session(region_name=settings.aws_region or None)
            status["refreshes"] = stack_refreshes(settings.stack, session)
        except Exception as exc:
            status["errors"].append(f"instance refresh: {exc}")
    try:
        store = open_store(settings)
        store.ping()
        workers = sorted(store.workers(), key=lambda w: str(w.get("hostname")))
        status["workers"] = [
            {
                "node": w.get("hostname"),
                "concurrency": w.get("concurrency"),
                "version": w.get("version"),
                "code": w.get("code"),
                "queue": w.get("queue"),
                "active": w.get("active"),
                "reserved": w.get("reserved"),
            }
            for w in workers
        ]
        status["slots"] = sum(int(w.get("concurrency") or 0) for w in workers)
        versions = CodeVersions.of(workers, settings.code_version, settings.queue)
        status["code"] = {
            "workers": versions.counts,
            "deployed": versions.deployed,
            "problem": versions.problem(),
        }
        running = store.busy_slots()  # "job/batch" of each batch with a live lease
        status["running_batches"] = len(running)
        status["jobs_in_flight"] = sorted({m.rpartition("/")[0] for m in running})
        status["held_back"] = store.backlog(settings.queue)
    except Exception as exc:
        status["errors"].append(f"result store: {exc}")
    try:
        status["queue"] = queue_depth(settings)
    except Exception as exc:
        status["errors"].append(f"broker: {exc}")
    return status


def render(status: dict[str, Any]) -> str:
    lines = [f"fleet from {status['source']}"]
    instances = status["instances"]
    if instances is not None:
        lines.append(f"instances: {len(instances)}")
        for i in instances:
            if "market" in i:
                lines.append(
                    f"  {i['id']}  {i['type'] or '?':<12} {i['zone'] or '?':<12} "
                    f"{i['state']:<18} {i['market']:<9} {i['private_ip'] or ''}"
                    + (f"  boot failed: {i['boot_error']}" if i.get("boot_error") else "")
                )
            else:
                lines.append(f"  {i['id']}  {i['cpus']} CPU  pid {i['pid']}  {i['state']}")
    lines.extend(_refresh_lines(status.get("refreshes") or []))
    lines.append(f"workers online: {len(status['workers'])} ({status['slots']} slots)")
    for w in status["workers"]:
        lines.append(
            f"  {w['node']}  concurrency {w['concurrency']}  version {w['version']}  "
            f"code {w.get('code') or UNPACKAGED}  running {w['active']}  holding {w['reserved']}"
        )
    lines.extend(_code_lines(status.get("code")))
    queue = status["queue"]
    if queue is not None:
        received = f", {queue['received']} received" if queue["received"] is not None else ""
        lines.append(f"queue {queue['queue']}: {queue['waiting']} waiting{received}")
    if status["running_batches"] is not None:
        jobs = status["jobs_in_flight"]
        lines.append(
            f"in flight: {status['running_batches']} batches running in {len(jobs)} "
            f"job(s){': ' + ', '.join(jobs) if jobs else ''}; "
            f"{status['held_back']} batches held back by launchers"
        )
    lines.extend(f"error: {e}" for e in status["errors"])
    return "\n".join(lines)


def _code_lines(code: dict[str, Any] | None) -> list[str]:
    """Workers per code version; a warning when they differ or are not what was deployed."""
    if not code or not code["workers"]:
        return []
    versions = CodeVersions(code["workers"], code["deployed"])
    if code["problem"]:
        return [f"code: {versions.describe()}", f"warning: {code['problem']}"]
    return [f"code: {versions.describe()}"]


def _refresh_lines(refreshes: list[dict[str, Any]]) -> list[str]:
    """A refresh that runs or ended short; a successful one is not news."""
    lines = []
    for r in refreshes:
        if r["status"] in REFRESH_RUNNING:
            done = f"{r['percent']}%" if r["percent"] is not None else "?%"
            left = f", {r['to_update']} instance(s) to replace" if r["to_update"] else ""
            lines.append(
                f"instance refresh {r['status']} on {r['group']}: {done} done{left} "
                f"(since {r['started']})"
            )
        elif r["status"] in REFRESH_FAILED:
            lines.append(
                f"instance refresh {r['status'].upper()} on {r['group']} ({r['ended']}): "
                f"{r['reason'] or 'no reason given'}; instances it did not replace run the "
                "previous code. Start another: aws autoscaling start-instance-refresh "
                f"--auto-scaling-group-name {r['group']} --preferences "
                """'{"SkipMatching": true, "ScaleInProtectedInstances": "Refresh"}'"""
            )
    return lines
