"""Run the Pulumi program under mocks: no cloud, no CLI, every resource recorded.

`run_stack(cfg)` builds the whole stack once per configuration (cached for the
session) and returns a `pulumi_mocks.StackRun`: each resource's type, name and
inputs (camelCase, as the engine and the policy pack see them), the resolved
stack outputs, the rendered user-data, and whether the generated secrets are
Pulumi secrets.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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

from infra.artifact import BuiltArtifact  # noqa: E402
from infra.config import StackConfig  # noqa: E402
from infra.program import build  # noqa: E402


@pytest.fixture(scope="session")
def fake_builder(tmp_path_factory) -> Callable[[Path, bool, str], BuiltArtifact]:
    """Stands in for the wheel build: a stub wheel (and a dependency when offline)."""
    wheels = tmp_path_factory.mktemp("wheels")
    app = wheels / "celery_fleet-0.1.0-py3-none-any.whl"
    dependency = wheels / "click-8.5.1-py3-none-any.whl"
    for wheel in (app, dependency):
        wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)

    def builder(repo_root: Path, offline: bool, arch: str) -> BuiltArtifact:
        return BuiltArtifact(
            digest=f"digest{int(offline)}{arch}",
            wheels=(app, dependency) if offline else (app,),
        )

    return builder


@pytest.fixture(scope="session")
def run_stack(fake_builder) -> Callable[[StackConfig], StackRun]:
    cache: dict[str, StackRun] = {}

    def run(cfg: StackConfig) -> StackRun:
        key = repr(cfg)
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
