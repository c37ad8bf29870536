"""Run the Pulumi program under the recording mocks and write what it asked for as JSON.

    python -m tests.support.record_stack OUT.json [--stack NAME] [--code PROJECT ...]

A process of its own: the Pulumi SDK's mock runtime is global to a process. The
artifact is built for real (infra/artifact.py's builder), so the recorded wheel
objects name files that exist. Each resource is written with its type, name,
inputs (secrets revealed) and the outputs the mocks computed for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pulumi

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "infra")]

from pulumi_mocks import RecordingMocks, _fake_outputs  # noqa: E402


def _plain(value: Any) -> Any:
    """JSON-ready: assets as their path."""
    if isinstance(value, pulumi.FileAsset):
        return {"file_asset": str(value.path)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def record(stack: str, code: tuple[str, ...] = ()) -> dict[str, Any]:
    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project="celery-fleet", stack=stack, preview=False)
    from infra.config import StackConfig
    from infra.program import build

    resolved: dict[str, Any] = {}

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def program() -> pulumi.Output[Any]:
        built = build(StackConfig(stack=stack, code=code))
        return pulumi.Output.all(
            outputs=pulumi.Output.all(**built.outputs), user_data=built.user_data
        ).apply(resolved.update)

    program()
    resources = []
    for r in mocks.resources:
        inputs = _plain(r.props)
        resources.append(
            {
                "type": r.typ,
                "name": r.name,
                "inputs": inputs,
                "outputs": _plain(_fake_outputs(r.typ, r.name, inputs)),
            }
        )
    return {"resources": resources, **_plain(resolved)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stack", default="e2e")
    parser.add_argument("--code", action="append", default=[], help="celery-fleet:code")
    args = parser.parse_args()
    recorded = record(args.stack, tuple(args.code))
    args.out.write_text(json.dumps(recorded, indent=1, default=str))


if __name__ == "__main__":
    main()
