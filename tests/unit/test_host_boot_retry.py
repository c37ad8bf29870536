"""app.boot's AWS calls retry: a throttled or failing SSM endpoint does not fail the boot.

A stand-in SSM endpoint on a loopback port answers 500 a few times, then the
stack's parameters; botocore's backoff is made instant so that nothing sleeps.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from botocore.retries import standard

from app.host.boot import note_failure
from app.host.configure import load_settings
from app.settings import ConfigError


class _Ssm(BaseHTTPRequestHandler):
    server: FlakySsm

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.calls += 1
        if self.server.calls <= self.server.failures:
            body = {"__type": "InternalServerError", "message": "try again"}
            return self._reply(500, body)
        prefix = "/celery-fleet/dev/"
        params = {
            "broker_url": "redis://127.0.0.1:6379/0",
            "result_url": "redis://127.0.0.1:6379/1",
        }
        answer = {
            "Parameters": [
                {"Name": prefix + k, "Value": v, "Type": "String"} for k, v in params.items()
            ]
        }
        self._reply(200, answer)

    def _reply(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class FlakySsm(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Ssm)
        self.calls = 0
        self.failures = 0


@pytest.fixture
def ssm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakySsm]:
    server = FlakySsm()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_SSM": f"http://127.0.0.1:{server.server_address[1]}",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    # No sleeping between the tries.
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0)
    yield server
    server.shutdown()


def test_ssm_reads_of_a_boot_are_retried_as_often_as_fleet_boot_attempts(ssm):
    # Six failures: more than botocore's default tries (legacy mode: 5), fewer than asked for.
    ssm.failures = 6
    settings, _, source = load_settings(None, "dev", {"FLEET_BOOT_ATTEMPTS": "8"})
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert source == "SSM Parameter Store (stack dev)"
    assert ssm.calls == 7


def test_ssm_reads_give_up_after_fleet_boot_attempts(ssm):
    ssm.failures = 100
    with pytest.raises(ConfigError, match="cannot read stack 'dev'"):
        load_settings(None, "dev", {"FLEET_BOOT_ATTEMPTS": "3"})
    assert ssm.calls == 3, "bounded: exactly FLEET_BOOT_ATTEMPTS tries"


def test_a_failure_is_handed_to_fleet_boot_on_one_line(tmp_path, monkeypatch):
    reason = tmp_path / "reason"
    monkeypatch.setenv("FLEET_BOOT_REASON_FILE", str(reason))
    note_failure(ConfigError("settings file /x does not exist.\nsecond line"))
    assert reason.read_text() == "app.boot: settings file /x does not exist. second line\n"
    monkeypatch.delenv("FLEET_BOOT_REASON_FILE")
    note_failure(RuntimeError("ignored"))  # not under fleet-boot: nothing written
    assert Path(reason).read_text().startswith("app.boot: settings")
