"""The drain agent: beside the Celery worker on each EC2 instance, as root.

    python -m app.agent          # from the celery-fleet-agent systemd unit

It keeps a busy instance from scale-in (SetInstanceProtection), holds the
termination lifecycle hook until the worker has finished its batches, and
on a Spot notice stops the worker at once so its batches go back to the
queue. The promises, the settings it reads and why: docs/agent.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from app.host.imds import Imds
from app.host.service import pid_alive
from app.names import WORKER_UNIT
from app.settings import Settings
from app.store import Store, open_store

log = logging.getLogger("fleet.agent")


class Worker(Protocol):
    """The Celery worker on this host, as the agent sees and stops it."""

    def taken(self) -> int: ...  # batches received and not finished
    def alive(self) -> bool: ...
    def stop(self, cold: bool) -> None: ...


class CeleryWorker:
    """The worker seen through its heartbeat in the result store.

    Stopped through its systemd unit when `unit` is given (on EC2), else by
    signalling the pid it advertised (a local fleet, the tests).
    """

    def __init__(self, store: Store, node: str, unit: str | None = WORKER_UNIT) -> None:
        self.store = store
        self.node = node
        self.unit = unit
        self.pid: int | None = None

    def _info(self) -> dict[str, Any] | None:
        info = next((w for w in self.store.workers() if w.get("hostname") == self.node), None)
        if info is not None and info.get("pid"):
            self.pid = int(info["pid"])
        return info

    def taken(self) -> int:
        info = self._info()
        return int(info.get("reserved", info.get("active", 0))) if info else 0

    def alive(self) -> bool:
        if self.unit:
            return (
                subprocess.run(
                    ["systemctl", "is-active", "--quiet", self.unit], check=False
                ).returncode
                == 0
            )
        if self.pid is None:
            self._info()
        return self.pid is not None and pid_alive(self.pid)

    def stop(self, cold: bool) -> None:
        sig = signal.SIGQUIT if cold else signal.SIGTERM
        if self.unit:
            if cold:
                subprocess.run(
                    ["systemctl", "kill", "--kill-whom=main", f"--signal={sig.name}", self.unit],
                    check=False,
                )
            # A stopped unit is not restarted (Restart=always restarts only on
            # its own exit); for a warm stop this is the SIGTERM itself.
            subprocess.run(["systemctl", "stop", "--no-block", self.unit], check=False)
            return
        if self.pid is None:
            self._info()
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class Agent:
    def __init__(
        self,
        imds: Imds,
        worker: Worker,
        autoscaling: Any | None,
        instance_id: str,
        group: str | None,
        hook: str | None,
        *,
        idle_grace: float = 10.0,
        heartbeat_every: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = log.info,
    ) -> None:
        self.imds = imds
        self.worker = worker
        self.autoscaling = autoscaling if group else None
        self.instance_id = instance_id
        self.group = group
        self.hook = hook
        self.idle_grace = idle_grace
        # AWS's shortest hook heartbeat timeout is 30 s; every 20 s keeps any hook alive.
        self.heartbeat_every = heartbeat_every
        self.clock = clock
        self.say = say
        self.protected: bool | None = None  # unknown until the first step
        self.idle_since: float | None = None
        self.handed_back = False  # Spot notice acted on
        self.draining = False  # lifecycle hook acted on
        self.completed = False
        self.last_heartbeat: float | None = None
        self.heartbeats = 0

    def step(self) -> None:
        now = self.clock()
        if not self.handed_back and (notice := self.imds.spot_action()) is not None:
            self.say(
                f"Spot interruption notice ({notice.get('action')} at {notice.get('time')}):"
                " handing the worker's batches back"
            )
            self.worker.stop(cold=True)
            self.handed_back = True
        if not self.draining and self.imds.target_lifecycle_state() == "Terminated":
            self.draining = True
            if not self.handed_back:
                self.say("terminating: draining the worker (warm shutdown)")
                self.worker.stop(cold=False)
        if self.draining:
            self._hold_lifecycle(now)
        elif not self.handed_back:
            self._protect_while_busy(now)

    def _protect_while_busy(self, now: float) -> None:
        busy = self.worker.taken() > 0
        if busy:
            self.idle_since = None
            want = True
        else:
            if self.idle_since is None:
                self.idle_since = now
            want = self.protected is True and now - self.idle_since < self.idle_grace
        if want != self.protected:
            self.set_protection(want)

    def set_protection(self, protected: bool) -> None:
        if self.autoscaling is not None:
            self.autoscaling.set_instance_protection(
                InstanceIds=[self.instance_id],
                AutoScalingGroupName=self.group,
                ProtectedFromScaleIn=protected,
            )
            self.say(f"scale-in protection {'set' if protected else 'lifted'}")
        self.protected = protected

    def _hold_lifecycle(self, now: float) -> None:
        if self.completed or self.autoscaling is None or not self.hook:
            return
        action = dict(
            LifecycleHookName=self.hook,
            AutoScalingGroupName=self.group,
            InstanceId=self.instance_id,
        )
        if self.worker.alive():
            if self.last_heartbeat is None or now - self.last_heartbeat >= self.heartbeat_every:
                self.autoscaling.record_lifecycle_action_heartbeat(**action)
                self.last_heartbeat = now
                self.heartbeats += 1
            return
        self.autoscaling.complete_lifecycle_action(**action, LifecycleActionResult="CONTINUE")
        self.completed = True
        self.say("worker drained: lifecycle action completed (CONTINUE)")

    def run(self, stop: threading.Event, poll: float = 5.0) -> None:
        """Step every `poll` seconds until `stop` is set; on the way out, lift the protection."""
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.warning("agent step failed", exc_info=True)
            stop.wait(poll)
        # A stopped agent must not leave the instance protected for ever.
        if self.protected and not self.draining:
            with contextlib.suppress(Exception):
                self.set_protection(False)


def find_group_and_hook(
    autoscaling: Any, instance_id: str, group: str | None, hook: str | None
) -> tuple[str | None, str | None]:
    """The group and termination hook: as configured, else asked of the Auto Scaling API."""
    if not group:
        found = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])[
            "AutoScalingInstances"
        ]
        group = found[0]["AutoScalingGroupName"] if found else None
    if group and not hook:
        hooks = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group)["LifecycleHooks"]
        hook = next(
            (
                h["LifecycleHookName"]
                for h in hooks
                if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
            ),
            None,
        )
    return group, hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between polls")
    parser.add_argument(
        "--idle-grace",
        type=float,
        default=10.0,
        help="seconds idle before scale-in protection is lifted",
    )
    parser.add_argument("--unit", default=WORKER_UNIT, help="the worker's systemd unit")
    parser.add_argument(
        "--node", default=f"celery@{socket.gethostname()}", help="the worker's Celery node name"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-agent: %(message)s")

    import boto3
    import botocore.exceptions

    settings = Settings.from_env()
    imds = Imds()
    instance_id = imds.instance_id()
    region = (
        os.environ.get("AWS_DEFAULT_REGION") or settings.aws_region or imds.get("placement/region")
    )
    autoscaling = boto3.client("autoscaling", region_name=region)
    try:
        group, hook = find_group_and_hook(
            autoscaling,
            instance_id,
            os.environ.get("FLEET_AUTOSCALING_GROUP") or None,
            os.environ.get("FLEET_LIFECYCLE_HOOK") or None,
        )
    except botocore.exceptions.ClientError as exc:
        log.warning(
            "cannot find this instance's group or hook (%s); handling Spot notices only", exc
        )
        group = hook = None
    log.info("watching %s (%s) in group %s, hook %s", args.node, instance_id, group, hook)
    agent = Agent(
        imds,
        CeleryWorker(open_store(settings), args.node, args.unit),
        autoscaling,
        instance_id,
        group,
        hook,
        idle_grace=args.idle_grace,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.run(stop, args.poll)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
