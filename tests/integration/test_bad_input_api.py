"""The real API server refuses the bad inputs of ``tests/bad_inputs.py`` with the field named.

Table-driven (issue 9, "Bad input and faults"): every case marked ``SCHEMA`` must be refused by
the CRD's OpenAPI schema or its CEL rules at ``kubectl apply`` time, the error naming the field
(``spec.resources.gpuType``), so no operator ever sees it. Cases marked ``OPERATOR`` are what
the schema cannot express: the API server accepts them and the operator's models refuse them
(``SpecValid=False``). The valid edge cases must pass. Server-side dry run: nothing is stored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import apply_probe
import pytest
from kubearch_operator.api import parse_spec
from kubearch_trainer.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bad_inputs import CASES, GOOD, OPERATOR, SCHEMA, Bad

GROUP, VERSION, PLURAL = "kubearch.dev", "v1alpha1", "trainingruns"


def _create(kube: Any, namespace: str, spec: dict[str, Any]) -> Any:
    return apply_probe.create(kube, namespace, PLURAL, "TrainingRun", spec)


def _refusal(kube: Any, namespace: str, spec: dict[str, Any]) -> str | None:
    return apply_probe.refusal(kube, namespace, PLURAL, "TrainingRun", spec)


@pytest.mark.parametrize("case", [c for c in CASES if c.layer == SCHEMA], ids=lambda c: c.id)
def test_the_api_server_refuses_naming_the_field(installed: Any, namespace: str, case: Bad) -> None:
    message = _refusal(installed, namespace, case.spec)
    assert message is not None, f"{case.id}: the API server accepted {case.spec}"
    assert case.field in message, message[:1000]


@pytest.mark.parametrize("case", [c for c in CASES if c.layer == OPERATOR], ids=lambda c: c.id)
def test_what_the_schema_cannot_express_the_operator_refuses(
    installed: Any, namespace: str, case: Bad
) -> None:
    assert _refusal(installed, namespace, case.spec) is None
    with pytest.raises(ConfigError, match=case.field.replace(".", r"\.")):
        parse_spec(case.spec)


@pytest.mark.parametrize("spec", GOOD)
def test_valid_edge_cases_pass_the_api_server(installed: Any, namespace: str, spec: dict[str, Any]) -> None:
    created = _create(installed, namespace, spec)
    # the API server's defaults, as the operator will read them, are still a valid spec
    parse_spec(created["spec"])
