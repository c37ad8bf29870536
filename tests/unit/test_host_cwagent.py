"""The CloudWatch agent of a worker host: its configuration, the units' log files, the start.

The configuration is validated against the agent's own JSON schema (a copy in
tests/support/, see cloudwatch_agent_schema.NOTICE.md). systemctl and the
agent's ctl are stand-ins that record their calls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest

from app.host import boot, cwagent
from app.host.configure import configure, load_settings
from app.host.envfile import read_env
from app.host.paths import HostPaths
from app.host.service import Systemd, service_for
from app.names import AGENT_UNIT, DUALSTACK_VARIABLE, WORKER_UNIT, log_group
from app.settings import Settings

SCHEMA = Path(__file__).resolve().parents[1] / "support" / "cloudwatch_agent_schema.json"
SETTINGS = Settings("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1", queue="q", stack="dev")


def test_agent_config_is_valid_for_the_agent_and_ships_each_log_to_its_stream():
    config = cwagent.agent_config(log_group("dev"), Path("/var/log/celery-fleet"))
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft4Validator.check_schema(schema)
    jsonschema.Draft4Validator(schema).validate(config)
    collected = config["logs"]["logs_collected"]["files"]["collect_list"]
    assert [(c["file_path"], c["log_stream_name"]) for c in collected] == [
        ("/var/log/celery-fleet/worker.log", "{instance_id}/worker"),
        ("/var/log/celery-fleet/agent.log", "{instance_id}/agent"),
        ("/var/log/cloud-init-output.log", "{instance_id}/boot"),
    ]
    assert {c["log_group_name"] for c in collected} == {"/celery-fleet/dev/worker"}
    # The schema does refuse what the agent would not take.
    wrong = json.loads(json.dumps(config))
    wrong["logs"]["logs_collected"]["files"]["collect_list"][0]["stream"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(wrong)


def test_start_command_loads_the_rendered_file():
    assert cwagent.start_argv(Path("/etc/celery-fleet/cloudwatch-agent.json")) == [
        "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl",
        "-a",
        "fetch-config",
        "-m",
        "ec2",
        "-s",
        "-c",
        "file:/etc/celery-fleet/cloudwatch-agent.json",
    ]


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A host under tmp_path with stand-ins for systemctl and the agent's ctl (calls in `calls`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "active").mkdir()
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "systemctl $*" >>{tmp_path}/calls
        case "$1" in
        is-active) [[ -e {tmp_path}/active/${{@: -1}} ]] ;;
        start|restart) shift; for u in "$@"; do touch {tmp_path}/active/$u; done ;;
        esac
        """)
    )
    ctl = bin_dir / "amazon-cloudwatch-agent-ctl"
    ctl.write_text(
        f'#!/bin/bash\necho "ctl $*" >>{tmp_path}/calls\ntouch {tmp_path}/active/{cwagent.UNIT}\n'
    )
    for script in (systemctl, ctl):
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(cwagent, "CTL", ctl)
    paths = HostPaths(
        tmp_path / "opt",
        tmp_path / "etc" / "env",
        tmp_path / "units",
        tmp_path / "run",
        tmp_path / "log",
        tmp_path / "logrotate.d",
    )

    def calls() -> list[str]:
        path = tmp_path / "calls"
        lines = path.read_text().splitlines() if path.exists() else []
        path.unlink(missing_ok=True)
        return lines

    return paths, calls, tmp_path


def run(paths: HostPaths, shipped: bool = True):
    return configure(
        paths,
        SETTINGS,
        {},
        "test",
        concurrency=2,
        node="n@h",
        use_systemd=True,
        agent=True,
        user="root",
        log_group=log_group("dev") if shipped else None,
    )


def test_shipped_logs_go_to_files_rotated_and_the_agent_starts_once(host):
    paths, calls, root = host
    first = run(paths)
    worker = (paths.systemd_dir / WORKER_UNIT).read_text().splitlines()
    agent = (paths.systemd_dir / AGENT_UNIT).read_text().splitlines()
    for lines, name in ((worker, "worker.log"), (agent, "agent.log")):
        assert f"StandardOutput=append:{paths.log_dir / name}" in lines
        assert f"StandardError=append:{paths.log_dir / name}" in lines
    assert paths.log_dir.is_dir(), "systemd creates the files, not their directory"
    config = json.loads(paths.cwagent_config.read_text())
    assert config == cwagent.agent_config(log_group("dev"), paths.log_dir)
    rotate = (paths.logrotate_dir / "celery-fleet").read_text()
    assert f"{paths.log_dir}/*.log {{" in rotate and "maxsize 50M" in rotate
    assert set(first.files) >= {
        str(paths.cwagent_config),
        str(paths.logrotate_dir / "celery-fleet"),
    }
    assert calls()[-1] == f"ctl -a fetch-config -m ec2 -s -c file:{paths.cwagent_config}"
    assert first.actions[-1] == f"started the CloudWatch agent ({paths.cwagent_config})"
    # Nothing changed and the agent runs: nothing done; stopped, it is started again.
    again = run(paths)
    assert not again.changed and not any(c.startswith("ctl") for c in calls())
    (root / "active" / cwagent.UNIT).unlink()
    assert run(paths).actions == [f"started the CloudWatch agent ({paths.cwagent_config})"]


def test_without_the_agent_the_units_keep_the_journal(host):
    paths, calls, _ = host
    report = run(paths, shipped=False)
    assert "StandardOutput" not in (paths.systemd_dir / WORKER_UNIT).read_text()
    assert not paths.cwagent_config.exists() and not paths.logrotate_dir.exists()
    assert len(report.files) == 3 and not any(c.startswith("ctl") for c in calls())


def test_logrotate_takes_the_config(tmp_path):
    logrotate = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None
    )
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "worker.log").write_text("x\n")
    conf = tmp_path / "celery-fleet"
    conf.write_text(cwagent.logrotate_config(tmp_path / "log"))
    result = subprocess.run(
        [logrotate, "--debug", "--state", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def test_logs_read_the_file_where_the_unit_writes_one(tmp_path):
    paths = HostPaths(tmp_path, tmp_path / "env", tmp_path, tmp_path, tmp_path / "log")
    service = service_for(paths, use_systemd=True)
    assert isinstance(service, Systemd)
    assert service.logs_argv(5, False)[0] == "journalctl"
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "worker.log").write_text("hello\n")
    assert service.logs_argv(5, True) == ["tail", "-n", "5", "-F", str(tmp_path / "log/worker.log")]


class FakeImds:
    def __init__(self, instance_id: str | None) -> None:
        self.id = instance_id

    def instance_id(self) -> str:
        if self.id is None:
            raise OSError("timed out")
        return self.id


def test_on_ec2_the_worker_is_told_its_instance_and_to_publish_metrics():
    assert boot.ec2_env(None, {}) == {}, "not on EC2"
    found = boot.ec2_env(FakeImds("i-1"), {})  # type: ignore[arg-type]
    assert found == {"FLEET_INSTANCE_ID": "i-1", "FLEET_METRICS": "cloudwatch"}
    off = boot.ec2_env(FakeImds("i-1"), {"FLEET_METRICS": "off"})  # type: ignore[arg-type]
    assert off["FLEET_METRICS"] == "off"
    assert boot.ec2_env(FakeImds(None), {}) == {}  # type: ignore[arg-type]


def test_logs_are_shipped_only_by_an_installed_agent_on_ec2_with_a_stack(tmp_path, monkeypatch):
    monkeypatch.setattr(cwagent, "CTL", tmp_path / "ctl")
    assert boot.shipped_log_group(SETTINGS, True, True) is None, "not installed"
    (tmp_path / "ctl").write_text("")
    assert boot.shipped_log_group(SETTINGS, True, True) == "/celery-fleet/dev/worker"
    assert boot.shipped_log_group(SETTINGS, False, True) is None, "no systemd"
    assert boot.shipped_log_group(SETTINGS, True, False) is None, "not on EC2"
    no_stack = Settings("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1")
    assert boot.shipped_log_group(no_stack, True, True) is None


def test_a_dual_stack_boot_hands_the_switch_to_the_units_and_the_agent(host):
    """nat: ipv6: the boot's AWS_USE_DUALSTACK_ENDPOINT reaches the worker's and the drain
    agent's environment file and the CloudWatch agent's configuration."""
    paths, _, _ = host
    environ = {
        "FLEET_BROKER_URL": "redis://127.0.0.1:1/0",
        "FLEET_RESULT_URL": "redis://127.0.0.1:1/1",
        "FLEET_STACK": "dev",
        DUALSTACK_VARIABLE: "true",
    }

    def boot() -> dict:
        settings, extra, _ = load_settings(None, None, environ)
        configure(
            paths,
            settings,
            extra,
            "test",
            concurrency=2,
            node="n@h",
            agent=True,
            log_group=log_group("dev"),
        )
        return json.loads(paths.cwagent_config.read_text())

    config = boot()
    assert read_env(paths.env_file)[DUALSTACK_VARIABLE] == "true"
    assert config["agent"]["use_dualstack_endpoint"] is True
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text())).validate(config)
    # Without the switch (every other network option): neither.
    del environ[DUALSTACK_VARIABLE]
    assert "use_dualstack_endpoint" not in boot()["agent"]
    assert DUALSTACK_VARIABLE not in read_env(paths.env_file)
