"""Which code the workers online run, against each other and against what was deployed."""

from __future__ import annotations

import pytest

from app.launcher.versions import UNPACKAGED, CodeVersions


def workers(*codes: str | None, queue: str = "fleet") -> list[dict]:
    return [{"hostname": f"w{n}", "code": code, "queue": queue} for n, code in enumerate(codes)]


def test_workers_are_counted_per_version_most_first():
    found = CodeVersions.of(
        [*workers("b", "a", "b", None), *workers("c", queue="other")], "b", "fleet"
    )
    assert found.counts == {"b": 2, "a": 1, UNPACKAGED: 1}
    assert found.describe() == f"2 workers on b (deployed), 1 on a, 1 on {UNPACKAGED}"


@pytest.mark.parametrize(
    ("codes", "deployed", "agree"),
    [
        ((), "a", True),  # nobody to compare: new workers boot the deployed code
        (("a", "a"), "a", True),
        (("a", "a"), None, True),  # one version, nothing deployed to hold it to
        ((None, None), None, True),  # a local fleet from a checkout
        (("a", "b"), None, False),
        (("a", "b"), "a", False),
        (("b",), "a", False),
        ((None,), "a", False),
    ],
)
def test_they_agree_on_one_version_and_it_is_the_deployed_one(codes, deployed, agree):
    versions = CodeVersions.of(workers(*codes), deployed)
    assert versions.agree is agree
    assert (versions.problem() is None) is agree


def test_the_problem_says_what_runs_and_what_to_do():
    mixed = CodeVersions.of(workers("new", "old", "new"), "new").problem()
    assert mixed is not None
    assert "run 2 versions of the code: 2 workers on new (deployed), 1 on old" in mixed
    assert "fleet status" in mixed
    stale = CodeVersions.of(workers("old", "old"), "new").problem()
    assert stale is not None
    assert "run code 2 workers on old, not new, which was deployed" in stale
    assert "pulumi up" in stale and "fleet ops deploy" in stale
