"""A code change reaches every instance: the refresh, its order, and the old artifact.

The engine orders the steps of `pulumi up` by the dependencies each resource
is registered with (its `depends_on` and the resources its inputs come from):
a resource is created or updated only after all of them. The recording mocks
see only a resource's inputs, so the program runs here once more under a mock
monitor that also keeps what the SDK sends with each registration: those
dependencies (URNs) and the resource options the mocks never see
(retainOnDelete). That the group's dependencies hold the policy granting the
artifact is then what guarantees that, on a code change, the new grant is in
place before the group's update starts the instance refresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import botocore.session
import pulumi
import pytest
from pulumi.runtime.mocks import MockMonitor
from pulumi_mocks import RecordingMocks

from infra.config import StackConfig
from infra.program import build

ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
GROUP = "aws:autoscaling/group:Group"
TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
OBJECT = "aws:s3/bucketObjectv2:BucketObjectv2"


@dataclass
class Registration:
    typ: str
    name: str
    urn: str
    dependencies: set[str]
    retain_on_delete: bool
    inputs: dict = field(default_factory=dict)


class RegistrationMonitor(MockMonitor):
    """The SDK's mock monitor, keeping each registration's dependencies and options."""

    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request):  # the gRPC method's name
        response = super().RegisterResource(request)
        if request.custom:
            self.registrations.append(
                Registration(
                    typ=request.type,
                    name=request.name,
                    urn=response.urn,
                    dependencies=set(request.dependencies),
                    retain_on_delete=bool(request.retainOnDelete),
                )
            )
        return response


@pytest.fixture(scope="module")
def registered(fake_builder) -> list[Registration]:
    mocks = RecordingMocks()
    monitor = RegistrationMonitor(mocks)
    pulumi.runtime.set_mocks(
        mocks, project="celery-fleet", stack="test", preview=False, monitor=monitor
    )

    @pulumi.runtime.test
    def program():
        return pulumi.Output.all(**build(StackConfig(stack="test"), builder=fake_builder).outputs)

    program()
    # Registrations may arrive on several threads: inputs by (type, name), once all are in.
    inputs = {(r.typ, r.name): r.props for r in mocks.resources}
    for registration in monitor.registrations:
        registration.inputs = inputs[(registration.typ, registration.name)]
    return monitor.registrations


def only(registered: list[Registration], typ: str) -> Registration:
    (found,) = [r for r in registered if r.typ == typ]
    return found


def statements(policy: Registration) -> list[dict]:
    return json.loads(policy.inputs["policy"])["Statement"]


def test_refresh_replaces_protected_and_standby_instances(registered):
    preferences = only(registered, GROUP).inputs["instanceRefresh"]["preferences"]
    # The drain agent protects every busy instance; Wait (AWS's default) fails the refresh.
    assert preferences["scaleInProtectedInstances"] == "Refresh"
    assert preferences["standbyInstances"] == "Terminate"
    # Values AWS accepts (botocore's model of StartInstanceRefresh's Preferences).
    shape = botocore.session.get_session().get_service_model("autoscaling")
    members = shape.shape_for("RefreshPreferences").members
    assert preferences["scaleInProtectedInstances"] in members["ScaleInProtectedInstances"].enum
    assert preferences["standbyInstances"] in members["StandbyInstances"].enum
    # What a replaced busy instance relies on: the termination hook the agent holds.
    hook = only(registered, "aws:autoscaling/lifecycleHook:LifecycleHook").inputs
    assert hook["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["defaultResult"] == "CONTINUE"


def test_group_and_template_wait_for_the_grant_of_the_artifact(registered):
    group, template = only(registered, GROUP), only(registered, TEMPLATE)
    policies = [r for r in registered if r.typ == ROLE_POLICY]
    (grants,) = [p for p in policies if "ReadArtifact" in {s["Sid"] for s in statements(p)}]
    assert grants.urn in group.dependencies, "the group may start a refresh before the grant"
    assert grants.urn in template.dependencies
    # Created before the group, so it cannot name the group's ARN: what does is elsewhere.
    assert group.urn not in grants.dependencies
    sids = {s["Sid"] for s in statements(grants)}
    assert {"ListArtifact", "ReadArtifact", "UseWorkQueue", "ReadWriteResults"} <= sids
    assert {"ListResults", "ReadStackParameters", "TagOwnBootError"} <= sids
    (after,) = [p for p in policies if p is not grants]
    assert group.urn in after.dependencies
    assert {s["Sid"] for s in statements(after)} == {
        "DrainOnTermination",
        "MarkOwnInstanceUnhealthy",
    }


def test_new_wheels_are_uploaded_before_the_template_names_them(registered):
    template = only(registered, TEMPLATE)
    objects = [r for r in registered if r.typ == OBJECT]
    assert objects and all(o.urn in template.dependencies for o in objects)


def test_a_new_digest_keeps_the_previous_artifact(registered):
    objects = [r for r in registered if r.typ == OBJECT]
    assert objects
    for obj in objects:
        assert obj.inputs["key"].startswith("artifacts/codex86_64/")
        # Replaced by the next digest's object (another key), never deleted by `pulumi up`.
        assert obj.retain_on_delete, f"{obj.name} would be deleted with its digest"
    # No rule expires artifacts by age: S3 counts from the upload, so it would take the
    # current wheels of a stack whose code has not changed for that long.
    (lifecycle,) = [
        r
        for r in registered
        if r.typ == "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"
        and r.name.startswith("artifacts")
    ]
    assert not [rule for rule in lifecycle.inputs["rules"] if rule.get("expiration")]
