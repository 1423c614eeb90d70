"""The test-only crash points (kubearch_operator.crashpoint): parsing and when they fire."""

from __future__ import annotations

import pytest
from kubearch_operator.crashpoint import CrashAt


def test_fires_at_the_nth_hit_for_the_named_run_only() -> None:
    kills: list[int] = []
    armed = CrashAt.parse("pod-deleted#2@ns/run-a", kill=lambda: kills.append(armed.hits))
    armed.reached("pod-deleted", ("ns", "run-b"))  # another run: not counted
    armed.reached("pod-created", ("ns", "run-a"))  # another point: not counted
    armed.reached("pod-deleted", ("ns", "run-a"))
    assert kills == []
    armed.reached("pod-deleted", ("ns", "run-a"))
    assert kills == [2]
    armed.reached("pod-deleted", ("ns", "run-a"))  # once only
    assert kills == [2]


def test_defaults_to_the_first_hit_of_any_run() -> None:
    kills: list[str] = []
    armed = CrashAt.parse("status-write", kill=lambda: kills.append("x"))
    assert (armed.nth, armed.key) == (1, None)
    armed.reached("status-write", ("other", "run"))
    assert kills == ["x"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pod-exploded", "unknown point 'pod-exploded'; allowed: child-event, configmap-patched"),
        ("pod-created#0", "#N must be a positive integer, got '0'"),
        ("pod-created#x", "#N must be a positive integer, got 'x'"),
        ("pod-created@run-only", "the target must be NAMESPACE/RUN, got 'run-only'"),
    ],
)
def test_bad_values_name_the_variable_and_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="KUBEARCH_CRASH_AT") as err:
        CrashAt.parse(text)
    assert message in str(err.value)
