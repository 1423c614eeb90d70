"""The real API server refuses the bad searches of ``tests/bad_search_inputs.py`` with the field named,
and stores the largest status a valid search can write.

Table-driven like ``test_bad_input_api.py``: every case marked ``SCHEMA`` must be refused by the
ArchitectureSearch CRD's schema or its CEL rules at ``kubectl apply`` time (server-side dry run,
strict field validation), the error naming the field; ``OPERATOR`` cases pass the API server and the
operator's models refuse them; the valid edge cases pass.

The status bound (issue: ``status.trials`` keeps a record per trial) is checked for real: a search
at the CEL rule's maximum ((maxTrials + maxFailedTrials) x rungs = 250) gets the largest status its
records can reach (every trial OOM-retried, every text at its clip length), and the API server and
etcd store it; twice as many records are refused by etcd's request limit, which is what the bound
protects against.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import apply_probe
import pytest
from kubearch_operator import search_builders as sb
from kubearch_operator.search.api import (
    STATUS_BUDGET_BYTES,
    ArchitectureSearchStatus,
    json_size,
    largest_trial_record,
    parse_search_spec,
    records_bound,
    status_size_bound,
)
from kubearch_trainer.config import ConfigError
from kubernetes.client.rest import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bad_inputs import OPERATOR, SCHEMA
from bad_search_inputs import CASES, GOOD, BadSearch

GROUP, VERSION, PLURAL = "kubearch.dev", "v1alpha1", "architecturesearches"
#: The largest search the CEL record rule allows: (200 + 50) x 1 rung.
AT_MAX = {**GOOD[0], "budget": {"maxTrials": 200, "maxFailedTrials": 50, "parallelTrials": 8}}


def _create(kube: Any, namespace: str, spec: dict[str, Any], *, dry_run: bool = True) -> Any:
    return apply_probe.create(kube, namespace, PLURAL, "ArchitectureSearch", spec, dry_run=dry_run)


def _refusal(kube: Any, namespace: str, spec: dict[str, Any]) -> str | None:
    return apply_probe.refusal(kube, namespace, PLURAL, "ArchitectureSearch", spec)


@pytest.mark.parametrize("case", [c for c in CASES if c.layer == SCHEMA], ids=lambda c: c.id)
def test_the_api_server_refuses_naming_the_field(installed: Any, namespace: str, case: BadSearch) -> None:
    message = _refusal(installed, namespace, case.whole)
    assert message is not None, f"{case.id}: the API server accepted {str(case.spec)[:300]}"
    assert case.field in message, message[:1500]


@pytest.mark.parametrize("case", [c for c in CASES if c.layer == OPERATOR], ids=lambda c: c.id)
def test_what_the_schema_cannot_express_the_operator_refuses(
    installed: Any, namespace: str, case: BadSearch
) -> None:
    assert _refusal(installed, namespace, case.whole) is None
    with pytest.raises(ConfigError) as info:
        parse_search_spec(case.whole)
    assert case.field in str(info.value)


@pytest.mark.parametrize("spec", GOOD, ids=range(len(GOOD)))
def test_valid_edge_cases_pass_the_api_server(installed: Any, namespace: str, spec: dict[str, Any]) -> None:
    created = _create(installed, namespace, spec)
    parse_search_spec(created["spec"])  # the API server's defaults still make a valid search


def _status_with(records: int, spec: Any) -> dict[str, Any]:
    record = largest_trial_record(spec)
    trials = [record.model_copy(update={"index": i, "config": i // 2}) for i in range(records)]
    return sb.status_dict(ArchitectureSearchStatus(phase="Running", trials=trials))


def _write_status(kube: Any, namespace: str, status: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "probe",
        [{"op": "add", "path": "/status", "value": status}],
        _content_type="application/json-patch+json",
    )


def test_the_largest_status_of_the_largest_search_is_stored(installed: Any, namespace: str) -> None:
    spec = parse_search_spec(AT_MAX)
    assert records_bound(spec) == 500
    _create(installed, namespace, AT_MAX, dry_run=False)
    status = _status_with(records_bound(spec), spec)
    assert json_size(status) <= status_size_bound(spec) <= STATUS_BUDGET_BYTES
    _write_status(installed, namespace, status)
    stored = installed.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "probe")
    assert len(stored["status"]["trials"]) == 500
    print(f"largest status: {json_size(stored['status'])} bytes, whole object {json_size(stored)} bytes")
    # Without the bound: twice the records (e.g. maxTrials 500) is more than etcd takes in one object.
    with pytest.raises(ApiException) as info:
        _write_status(installed, namespace, _status_with(2 * records_bound(spec), spec))
    assert "too large" in (info.value.body or "").lower(), info.value.body[:500]
