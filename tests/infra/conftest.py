"""Run the Pulumi program under mocks: no cloud, no CLI, every resource recorded.

`run_stack(cfg)` builds the whole stack once per configuration (cached for the
session) and returns a `pulumi_mocks.StackRun`: each resource's type, name and
inputs (camelCase, as the engine and the policy pack see them), the resolved
stack outputs, the rendered user-data, and whether the generated secrets are
Pulumi secrets.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pulumi
import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# The program as the `infra` package, and the mocks by their own (unique) name,
# whatever import mode pytest runs in.
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from pulumi_mocks import RecordingMocks, StackRun  # noqa: E402


def pytest_configure(config):
    # pulumi_aws imports its own deprecated V2 aliases on the way in; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:pulumi_aws")


# Mocks first, then the program (the pulumi/examples testing-unit-py order).
pulumi.runtime.set_mocks(RecordingMocks(), project="celery-fleet", stack="test", preview=False)

from app.names import WHEELHOUSE_MANIFEST, WHEELHOUSE_REQUIREMENTS  # noqa: E402
from app.wheelhouse import Wheelhouse, read_wheelhouse  # noqa: E402
from infra.config import StackConfig  # noqa: E402
from infra.program import build  # noqa: E402

# What the program asks of its builder: (project directories, architecture) -> a wheelhouse.
FakeBuilder = Callable[[Sequence[Path], str], Wheelhouse]


@pytest.fixture(scope="session")
def fake_builder(tmp_path_factory) -> FakeBuilder:
    """Stands in for the wheelhouse build (app/wheelhouse.py, tested on its own): stub wheels
    and a manifest, versioned `code<arch>`, plus a hash of the project paths if any."""
    root = tmp_path_factory.mktemp("wheelhouses")

    def builder(projects: Sequence[Path], arch: str) -> Wheelhouse:
        named = "\0".join(map(str, projects))
        version = f"code{arch}" + (
            f"-{hashlib.sha256(named.encode()).hexdigest()[:6]}" if named else ""
        )
        directory = root / version
        if not directory.is_dir():
            directory.mkdir()
            wheels = ["celery_fleet-0.1.0-py3-none-any.whl", "click-8.5.1-py3-none-any.whl"]
            for wheel in wheels:
                (directory / wheel).write_bytes(b"PK\x05\x06" + b"\0" * 18)
            manifest = {
                "version": version,
                "wheels": [{"file": w, "sha256": "0" * 64, "bytes": 22} for w in wheels],
            }
            (directory / WHEELHOUSE_MANIFEST).write_text(json.dumps(manifest))
            (directory / WHEELHOUSE_REQUIREMENTS).write_text("celery-fleet==0.1.0\n")
        return read_wheelhouse(directory)

    return builder


@pytest.fixture(scope="session")
def run_stack(fake_builder) -> Callable[[StackConfig], StackRun]:
    cache: dict[str, StackRun] = {}

    def run(cfg: StackConfig) -> StackRun:
        key = f"{cfg!r} sink_password={cfg.sink_password is not None}"
        if key in cache:
            return cache[key]
        mocks = RecordingMocks()
        pulumi.runtime.set_mocks(mocks, project="celery-fleet", stack=cfg.stack, preview=False)
        resolved: dict = {}

        @pulumi.runtime.test
        def program():
            stack = build(cfg, builder=fake_builder)
            secrets = {
                name: getattr(component, attr)
                for name, component, attr in (
                    ("broker", stack.broker, "password"),
                    ("results", stack.results, "auth_token"),
                )
                if hasattr(component, attr)
            }
            return pulumi.Output.all(
                outputs=pulumi.Output.all(**stack.outputs),
                user_data=stack.user_data,
                values=pulumi.Output.all(**secrets),
                secret=pulumi.Output.all(
                    **{k: pulumi.Output.from_input(v.is_secret()) for k, v in secrets.items()}
                ),
            ).apply(resolved.update)

        program()
        cache[key] = StackRun(
            cfg=cfg,
            resources=mocks.resources,
            outputs=resolved["outputs"],
            user_data=resolved["user_data"],
            secrets={resolved["values"][k]: resolved["secret"][k] for k in resolved["values"]},
        )
        return cache[key]

    return run
