"""The watch-driven controller's plumbing, without a cluster: work queue, expectations, outage
logging, and the pure rules for refused objects."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from kubearch_operator import refusals
from kubearch_operator.api import parse_status
from kubearch_operator.workqueue import (
    EndlessBackoffs,
    Expectations,
    Outage,
    Versions,
    WorkQueue,
    find_ghosts,
    retry_after_seconds,
)


def run(coro):
    return asyncio.run(coro)


def test_queue_dedups_keys_added_before_a_worker_takes_them() -> None:
    async def go() -> list:
        q = WorkQueue()
        for _ in range(5):
            q.add("a")
        q.add("b")
        got = [(await q.get())[0], (await q.get())[0]]
        assert len(q) == 0
        return got

    assert run(go()) == ["a", "b"]


def test_a_key_added_while_processing_is_not_handed_out_twice_but_requeued_after() -> None:
    async def go() -> None:
        q = WorkQueue()
        q.add("a")
        key, _ = await q.get()
        q.add("a")  # an event during the pass
        assert len(q) == 0  # not available to a second worker while "a" is processed
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(q.get(), 0.05)
        q.done(key)
        assert (await asyncio.wait_for(q.get(), 1))[0] == "a"  # ... but not lost either

    run(go())


def test_add_after_fires_once_and_the_earliest_wakeup_wins() -> None:
    async def go() -> None:
        q = WorkQueue()
        loop = asyncio.get_running_loop()
        start = loop.time()
        q.add_after("a", 5.0)
        q.add_after("a", 0.05)  # earlier: replaces
        q.add_after("a", 3.0)  # later: ignored
        key, _ = await asyncio.wait_for(q.get(), 1)
        assert key == "a" and loop.time() - start < 1
        assert q.pending_timers() == 0

    run(go())


def test_retry_backs_off_exponentially_and_forget_resets_it() -> None:
    async def go() -> None:
        q = WorkQueue(base_delay=1.0, max_delay=5.0)
        assert [q.retry("a") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
        q.forget("a")
        assert q.retry("a") == 1.0
        q.drop("a")
        assert q.pending_timers() == 0

    run(go())


def test_retry_after_holds_the_key_even_against_events() -> None:
    """A 429 with Retry-After: neither the back-off nor an event runs the key sooner."""

    async def go() -> None:
        q = WorkQueue(base_delay=0.01)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert q.retry("a", at_least=0.3) == 0.3
        q.add("a")  # e.g. the run's own status write comes back as a watch event
        q.add("b")
        assert (await asyncio.wait_for(q.get(), 1))[0] == "b"  # other keys are not held
        key, _ = await asyncio.wait_for(q.get(), 2)
        assert key == "a" and loop.time() - start >= 0.3
        q.done("a")
        q.add("a")  # the hold is over: at once
        assert (await asyncio.wait_for(q.get(), 0.05))[0] == "a"

    run(go())


def test_retry_without_retry_after_holds_nothing() -> None:
    async def go() -> None:
        q = WorkQueue(base_delay=5.0)
        q.retry("a")
        q.add("a")  # an event during the back-off runs the key now (client-go does the same)
        assert (await asyncio.wait_for(q.get(), 0.05))[0] == "a"

    run(go())


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), (" 7 ", 7.0), ("-3", 0.0), ("", None), (None, None), ("soon", None)],
)
def test_retry_after_header_in_seconds(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_header_as_an_http_date() -> None:
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30), usegmt=True)
    assert 28 <= (retry_after_seconds(when) or 0) <= 30
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


def test_versions_tell_a_relisted_object_that_changed_from_one_that_did_not() -> None:
    v = Versions()
    assert not v.changed("u1", "10")  # first sight (start-up listing): nothing to compare
    assert not v.changed("u1", "10")  # relisted unchanged
    assert v.changed("u1", "12")  # changed while the watch was down
    v.forget("u1")
    assert not v.changed("u1", "15") and len(v) == 1


def test_ghosts_are_cached_objects_a_fresh_list_no_longer_shows() -> None:
    cached = [
        ("run-a", "u1", 10),  # listed: alive
        ("run-a", "u2", 11),  # not listed, older than the list: deleted while the watch was down
        ("run-b", "u3", 30),  # not listed, newer than the list: created after it, alive
        ("run-b", "u4", -1),  # version unknown: not judged
    ]
    assert find_ghosts(cached, {"u1"}, listed_at=20) == [("run-a", "u2")]
    assert find_ghosts(cached, {"u1", "u2", "u3", "u4"}, listed_at=40) == []


def test_kopf_retries_api_errors_without_end_and_each_request_afresh() -> None:
    """kopf gives up after its last delay when the delays are Sized; a watch that gives up ends
    the operator (a 503 for 55 s did). The delays must not run out, nor be shared between
    requests (an iterator would be consumed by the first request)."""
    from collections.abc import Iterable, Sized
    from itertools import islice

    backoffs = EndlessBackoffs()
    assert isinstance(backoffs, Iterable) and not isinstance(backoffs, Sized)
    first = list(islice(backoffs, 200))
    assert len(first) == 200 and first[:8] == [1, 1, 2, 3, 5, 8, 13, 21] and max(first) == 30.0
    assert list(islice(backoffs, 3)) == [1, 1, 2]  # a second request starts from the beginning


def test_expectations_report_whether_a_name_was_awaited() -> None:
    exp = Expectations(timeout=30)
    exp.expect("run", ["p0"])
    assert not exp.observed("run", "other")
    assert exp.observed("run", "p0")
    assert not exp.observed("run", "p0")  # once


def test_expectations_wait_for_observed_names_or_the_timeout() -> None:
    exp = Expectations(timeout=30)
    exp.expect("run", ["p0", "p1"])
    assert exp.satisfied("run") is not None
    exp.observed("run", "p0")
    assert exp.satisfied("run") is not None
    exp.observed("run", "p1")
    assert exp.satisfied("run") is None
    expired = Expectations(timeout=-1)
    expired.expect("run", ["p0"])
    assert expired.satisfied("run") is None  # a lost event never blocks a run for good


def test_outage_logs_once_per_outage_and_once_on_reconnect(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.outage")
    outage = Outage(log)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        assert outage.ok() is False
        starts = [outage.failed(ConnectionRefusedError("refused")) for _ in range(1000)]
        ends = [outage.ok() for _ in range(3)]
        outage.failed(ConnectionRefusedError("again"))
    assert starts.count(True) == 1 and ends == [True, False, False]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "unreachable" in messages[0] and "reconnected" in messages[1] and "1000 failed" in messages[1]


# ------------------------------------------------------------------------------------------------
# refused objects
# ------------------------------------------------------------------------------------------------
STATUS_422 = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": 'Pod "bad-master-0" is invalid: spec.nodeSelector: Invalid value: "a b": a valid label '
    "must be an empty string or consist of alphanumeric characters",
    "reason": "Invalid",
    "details": {
        "name": "bad-master-0",
        "kind": "Pod",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "a b": a valid label must be ...',
                "field": "spec.nodeSelector",
            }
        ],
    },
    "code": 422,
}


def test_refusal_message_names_object_field_and_the_api_servers_words() -> None:
    text = refusals.describe_refusal("Pod", "bad-master-0", 422, json.dumps(STATUS_422))
    assert "Pod bad-master-0" in text and "(422)" in text
    assert "spec.nodeSelector" in text and 'Invalid value: "a b"' in text


def test_refusal_of_a_non_json_body_keeps_the_raw_text() -> None:
    text = refusals.describe_refusal("ConfigMap", "x-config", 413, b"request entity too large")
    assert "ConfigMap x-config (413)" in text and "request entity too large" in text


def test_refused_fails_the_run_with_an_object_rejected_condition() -> None:
    status = parse_status({"phase": "Created", "restartCount": 0})
    now = datetime(2026, 1, 1, tzinfo=UTC)
    st = refusals.refused(status, "the API server refused Pod p (422)", now)
    assert st.phase == "Failed" and st.completion_time == "2026-01-01T00:00:00Z"
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "ObjectRejected")
    assert "Pod p" in failed.message
    assert status.phase == "Created"  # the input is not modified


@pytest.mark.parametrize(
    ("code", "refused"), [(400, True), (413, True), (422, True), (409, False), (500, False)]
)
def test_only_requests_that_can_never_succeed_count_as_refused(code: int, refused: bool) -> None:
    assert refusals.is_refused(code) is refused


def test_owner_uid_prefers_the_controller_reference() -> None:
    obj = {"metadata": {"ownerReferences": [{"uid": "other"}, {"uid": "ctl", "controller": True}]}}
    assert refusals.owner_uid(obj) == "ctl"
    assert refusals.owner_uid({"metadata": {}}) is None
