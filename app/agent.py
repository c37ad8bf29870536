"""The drain agent: runs beside the Celery worker on each EC2 instance.

    python -m app.agent          # as root, from the celery-fleet-agent systemd unit

It keeps three promises, polling every few seconds:

1. A busy instance is not picked for scale-in. While the worker holds a
   batch the instance is protected from scale-in (SetInstanceProtection);
   once it has held none for `idle_grace` seconds the protection is lifted,
   so the group takes idle instances first and a fleet with no work can
   still go to zero.
2. An instance the group terminates anyway (scale-in that raced a new
   batch, an instance refresh) finishes its batches first. The termination
   lifecycle hook holds it in Terminating:Wait, which instance metadata
   shows as autoscaling/target-lifecycle-state = Terminated. The agent then
   stops the worker with a warm shutdown (no new batch; anything received
   but not started is handed back; running batches finish), sends
   RecordLifecycleActionHeartbeat while the worker runs, and completes the
   action with CONTINUE once it has exited.
3. A Spot interruption does not wait for anything. On the notice
   (IMDSv2 spot/instance-action, two minutes ahead) the agent sends the
   worker a cold shutdown (SIGQUIT): Celery cancels its consumer at once,
   stops the running batches without acknowledging them, and hands every
   unacknowledged message back as it closes the channel: RabbitMQ requeues
   them at once, kombu's Redis transport pushes them back on the queue, and
   its SQS transport makes them visible again after `wait_time_seconds`
   (1 s, see Settings.transport_options) with the receipt handles only the
   worker holds, so nothing waits out the queue's visibility timeout. If
   the instance vanishes before the worker got that far, the launcher
   re-sends any batch whose lease lapsed (`lease_seconds`, 10 s). At most
   one batch per slot loses the work it had done, about two seconds each.

"Holds a batch" comes from the worker's heartbeat in the result store,
which advertises how many batches it has received and not finished
(app/worker.py `held_batches`), matched to this host's Celery node name.
Celery's remote control (`inspect().active()`) would say the same, but it
needs a broadcast exchange, which the SQS transport does not have; the
result store is there with every broker. Leases (`busy_slots`) do not say
which host runs a batch.

Settings, all from the worker's environment file:

    FLEET_AUTOSCALING_GROUP   the group (else DescribeAutoScalingInstances)
    FLEET_LIFECYCLE_HOOK      the termination hook (else DescribeLifecycleHooks)
    FLEET_*                   the result store, as for the worker
    AWS_EC2_METADATA_SERVICE_ENDPOINT  instance metadata (tests point it elsewhere)

Without a group or hook (a host outside an autoscaling group) the agent
still hands batches back on a Spot notice.

A worker that is up but has stopped consuming is not the agent's to find:
the worker's own watchdog (app/watchdog.py) sees it from inside the process,
exits, and the unit's Restart=always brings it back. A stop the agent asks
for (`systemctl stop`) is not restarted, so the two never fight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from app.boot import pid_alive
from app.settings import Settings
from app.store import Store, open_store

log = logging.getLogger("fleet.agent")

IMDS_ENDPOINT = "http://169.254.169.254"
WORKER_UNIT = "celery-fleet-worker.service"


class Imds:
    """An IMDSv2 client: a session token from PUT /latest/api/token, then GETs with it."""

    def __init__(self, endpoint: str | None = None, timeout: float = 2.0,
                 token_ttl: int = 21600) -> None:
        self.endpoint = (endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                         or IMDS_ENDPOINT).rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._token: tuple[str, float] | None = None

    def token(self, renew: bool = False) -> str:
        if renew or self._token is None or time.monotonic() > self._token[1]:
            request = urllib.request.Request(
                f"{self.endpoint}/latest/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                # Renewed a minute early, so a request never carries an expired token.
                self._token = (response.read().decode(),
                               time.monotonic() + self.token_ttl - 60)
        return self._token[0]

    def get(self, path: str) -> str | None:
        """The metadata at `path` (under /latest/meta-data/), or None where there is none (404)."""
        for renew in (False, True):
            request = urllib.request.Request(
                f"{self.endpoint}/latest/meta-data/{path}",
                headers={"X-aws-ec2-metadata-token": self.token(renew)})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code != 401 or renew:  # 401: the token expired; once more with a new one
                    raise
        return None

    def instance_id(self) -> str:
        value = self.get("instance-id")
        if not value:
            raise RuntimeError("instance metadata has no instance-id")
        return value

    def spot_action(self) -> dict[str, Any] | None:
        """The Spot interruption notice ({"action": "terminate", "time": ...}), or None."""
        raw = self.get("spot/instance-action")
        return json.loads(raw) if raw else None

    def target_lifecycle_state(self) -> str | None:
        """"InService", or "Terminated" once the group holds the instance for termination."""
        return self.get("autoscaling/target-lifecycle-state")


class Worker(Protocol):
    """The Celery worker on this host, as the agent sees and stops it."""

    def held(self) -> int: ...  # batches received and not finished
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

    def held(self) -> int:
        info = self._info()
        return int(info.get("reserved", info.get("active", 0))) if info else 0

    def alive(self) -> bool:
        if self.unit:
            return subprocess.run(["systemctl", "is-active", "--quiet", self.unit],
                                  check=False).returncode == 0
        if self.pid is None:
            self._info()
        return self.pid is not None and pid_alive(self.pid)

    def stop(self, cold: bool) -> None:
        sig = signal.SIGQUIT if cold else signal.SIGTERM
        if self.unit:
            if cold:
                subprocess.run(["systemctl", "kill", "--kill-whom=main",
                                f"--signal={sig.name}", self.unit], check=False)
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
    def __init__(self, imds: Imds, worker: Worker, autoscaling: Any | None, instance_id: str,
                 group: str | None, hook: str | None, *, idle_grace: float = 10.0,
                 heartbeat_every: float = 20.0, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = log.info) -> None:
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
            self.say(f"Spot interruption notice ({notice.get('action')} at {notice.get('time')}):"
                     " handing the worker's batches back")
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
        busy = self.worker.held() > 0
        if busy:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        want = busy or (self.protected is True and now - self.idle_since < self.idle_grace)
        if want != self.protected:
            self.set_protection(want)

    def set_protection(self, protected: bool) -> None:
        if self.autoscaling is not None:
            self.autoscaling.set_instance_protection(
                InstanceIds=[self.instance_id], AutoScalingGroupName=self.group,
                ProtectedFromScaleIn=protected)
            self.say(f"scale-in protection {'set' if protected else 'lifted'}")
        self.protected = protected

    def _hold_lifecycle(self, now: float) -> None:
        if self.completed or self.autoscaling is None or not self.hook:
            return
        action = dict(LifecycleHookName=self.hook, AutoScalingGroupName=self.group,
                      InstanceId=self.instance_id)
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
            except Exception:  # noqa: BLE001 - metadata or API blips: try again next poll
                log.warning("agent step failed", exc_info=True)
            stop.wait(poll)
        # A stopped agent must not leave the instance protected for ever.
        if self.protected and not self.draining:
            with contextlib.suppress(Exception):
                self.set_protection(False)


def discover(autoscaling: Any, instance_id: str, group: str | None,
             hook: str | None) -> tuple[str | None, str | None]:
    """The group and termination hook: as configured, else asked of the Auto Scaling API."""
    if not group:
        found = autoscaling.describe_auto_scaling_instances(
            InstanceIds=[instance_id])["AutoScalingInstances"]
        group = found[0]["AutoScalingGroupName"] if found else None
    if group and not hook:
        hooks = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group)["LifecycleHooks"]
        hook = next((h["LifecycleHookName"] for h in hooks
                     if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"), None)
    return group, hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--idle-grace", type=float, default=10.0,
                        help="seconds idle before scale-in protection is lifted")
    parser.add_argument("--unit", default=WORKER_UNIT, help="the worker's systemd unit")
    parser.add_argument("--node", default=f"celery@{socket.gethostname()}",
                        help="the worker's Celery node name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-agent: %(message)s")

    import boto3
    import botocore.exceptions

    settings = Settings.from_env()
    imds = Imds()
    instance_id = imds.instance_id()
    region = (os.environ.get("AWS_DEFAULT_REGION") or settings.aws_region
              or imds.get("placement/region"))
    autoscaling = boto3.client("autoscaling", region_name=region)
    try:
        group, hook = discover(autoscaling, instance_id,
                               os.environ.get("FLEET_AUTOSCALING_GROUP") or None,
                               os.environ.get("FLEET_LIFECYCLE_HOOK") or None)
    except botocore.exceptions.ClientError as exc:
        log.warning("cannot find this instance's group or hook (%s); handling Spot notices only",
                    exc)
        group = hook = None
    log.info("watching %s (%s) in group %s, hook %s", args.node, instance_id, group, hook)
    agent = Agent(imds, CeleryWorker(open_store(settings), args.node, args.unit), autoscaling,
                  instance_id, group, hook, idle_grace=args.idle_grace)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.run(stop, args.poll)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
