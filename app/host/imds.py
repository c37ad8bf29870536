"""An IMDSv2 client: what the drain agent reads of its instance (id, Spot notice, lifecycle)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

IMDS_ENDPOINT = "http://169.254.169.254"


class Imds:
    """An IMDSv2 client: a session token from PUT /latest/api/token, then GETs with it."""

    def __init__(
        self, endpoint: str | None = None, timeout: float = 2.0, token_ttl: int = 21600
    ) -> None:
        self.endpoint = (
            endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_ENDPOINT
        ).rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._token: tuple[str, float] | None = None

    def token(self, renew: bool = False) -> str:
        if renew or self._token is None or time.monotonic() > self._token[1]:
            request = urllib.request.Request(
                f"{self.endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)},
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                # Renewed a minute early, so a request never carries an expired token.
                self._token = (response.read().decode(), time.monotonic() + self.token_ttl - 60)
        return self._token[0]

    def get(self, path: str) -> str | None:
        """The metadata at `path` (under /latest/meta-data/), or None where there is none (404)."""
        for renew in (False, True):
            request = urllib.request.Request(
                f"{self.endpoint}/latest/meta-data/{path}",
                headers={"X-aws-ec2-metadata-token": self.token(renew)},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body: bytes = response.read()
                    return body.decode()
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
        """ "InService", or "Terminated" once the group holds the instance for termination."""
        return self.get("autoscaling/target-lifecycle-state")
