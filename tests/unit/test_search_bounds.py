"""ArchitectureSearch bad input (issue 9's rule on the search CRD): the operator's models refuse every
case of ``tests/bad_search_inputs.py`` naming the field, each CEL rule of the search CRD has a case,
the bounds refuse nothing a TrainingRun accepts, and the status of any valid search fits in one etcd
object (records clipped, their number bounded)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubearch_operator import crd
from kubearch_operator.search import algorithms
from kubearch_operator.search.api import (
    MAX_CONFIG_RUNGS,
    NUMBER_LIMIT,
    STATUS_BUDGET_BYTES,
    TrialRecord,
    json_size,
    largest_trial_record,
    parse_search_spec,
    records_bound,
    status_overhead_bound,
    status_size_bound,
)
from kubearch_trainer.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bad_search_inputs import CASES, GOOD, BadSearch

#: etcd's default request limit (--max-request-bytes): the whole object must stay below it.
ETCD_LIMIT = 1_572_864


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_operator_refuses_naming_the_field(case: BadSearch) -> None:
    with pytest.raises(ConfigError) as info:
        parse_search_spec(case.whole)
    message = str(info.value)
    assert case.field in message, message
    assert len(message) < 3000  # a 1 MB input is not echoed back


@pytest.mark.parametrize("spec", GOOD, ids=range(len(GOOD)))
def test_valid_edge_cases_are_accepted(spec: dict[str, Any]) -> None:
    parsed = parse_search_spec(spec)
    assert status_size_bound(parsed) <= STATUS_BUDGET_BYTES


def _rules(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, r) for r in node.get("x-kubernetes-validations", [])]
    for name, sub in node.get("properties", {}).items():
        if name != "trialTemplate":  # the TrainingRun's rules: tests/unit/test_bad_input.py
            out += _rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _rules(node["items"], f"{path}[0]")
    return out


def test_every_search_cel_rule_has_a_case() -> None:
    """Each CEL rule of the search's own fields is exercised by a SCHEMA case naming its field."""
    schema = crd.build_search_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = _rules(schema["properties"]["spec"], "spec")
    assert len(rules) >= 20
    fields = {c.field for c in CASES if c.layer == "schema"}
    for path, rule in rules:
        target = path + rule.get("fieldPath", "")
        assert any(f == target or f.startswith(target) for f in fields), f"no case for {target}: {rule}"


def _maxima(node: Any) -> list[float]:
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("maximum"), int | float):
            out.append(node["maximum"])
        for value in node.values():
            out += _maxima(value)
    elif isinstance(node, list):
        for value in node:
            out += _maxima(value)
    return out


def test_the_range_bound_refuses_no_value_a_trainingrun_accepts() -> None:
    """|min|, |max| <= 1e15: at least every TrainingRun number's own maximum."""
    run_spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert max(_maxima(run_spec)) <= NUMBER_LIMIT


def test_the_cel_record_budget_fits_the_status_budget() -> None:
    """MAX_CONFIG_RUNGS configuration-rungs, two records each, of the largest record a search with
    one short parameter can write, plus everything else in the status: under the budget, and the
    budget plus the largest spec under etcd's limit."""
    spec = parse_search_spec(GOOD[0])
    record = json_size(largest_trial_record(spec).model_dump(mode="json", by_alias=True, exclude_none=True))
    assert MAX_CONFIG_RUNGS * 2 * (record + 1) + status_overhead_bound(spec) <= STATUS_BUDGET_BYTES
    at_max = parse_search_spec(
        {**GOOD[0], "budget": {"maxTrials": 200, "maxFailedTrials": 50, "parallelTrials": 8}}
    )
    assert records_bound(at_max) == 2 * MAX_CONFIG_RUNGS
    assert status_size_bound(at_max) <= STATUS_BUDGET_BYTES < ETCD_LIMIT - 400_000


_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=3000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=_texts,
    reason=_texts,
    plan_reason=_texts,
    metrics=st.dictionaries(
        st.text(max_size=300), st.floats(allow_nan=False, allow_infinity=False), max_size=40
    ),
)
def test_no_record_outgrows_the_largest_one(
    message: str, reason: str, plan_reason: str, metrics: dict
) -> None:
    """Any text (escapes, 4-byte characters) and any metrics, at creation or assigned later: the
    record stays within the size the bound assumes."""
    spec = parse_search_spec(GOOD[0])
    largest = json_size(largest_trial_record(spec).model_dump(mode="json", by_alias=True, exclude_none=True))
    rec = TrialRecord(
        index=99_999,
        name="n" * 52,
        config=99_999,
        rung=15,
        steps=10**9,
        parameters={"model.size": "small"},
        message=message,
        plan={"reason": plan_reason, "batchSize": 8},
    )
    rec.reason = reason
    rec.metrics = metrics
    rec.message = message + message
    assert json_size(rec.model_dump(mode="json", by_alias=True, exclude_none=True)) <= largest


def test_grid_points_are_decoded_not_enumerated() -> None:
    """A grid of 2**32 points (32 axes of 2 values) is valid with maxTrials; its first points come
    at once and in the same order as the product."""
    small = parse_search_spec(
        {
            **GOOD[0],
            "searchSpace": [
                {"path": "model.size", "values": ["tiny", "small"]},
                {"path": "model.nLayers", "min": 1, "max": 3, "step": 1},
            ],
        }
    )
    product = algorithms.grid_points(small)
    assert [algorithms.grid_point(small, i) for i in range(len(product))] == product
    assert algorithms.grid_point(small, len(product)) is None
    paths = [
        f"training.{p}" for p in ("seed", "batchSize", "evalBatches", "logEvery", "gradientAccumulationSteps")
    ]
    paths += [f"model.{p}" for p in ("nLayers", "nHeads", "dFf", "dropout", "vocabSize")]
    huge = {
        **GOOD[0],
        "searchSpace": [
            {"path": p, "values": [16, 32] if p != "model.dropout" else [0.0, 0.1]} for p in paths
        ],
        "budget": {"maxTrials": 5},
    }
    spec = parse_search_spec(huge)
    assert spec.grid_size() == 2 ** len(paths)
    started = time.perf_counter()
    points, _ = algorithms.propose(spec, [], 5, {})
    assert len(points) == 5 and points[1] == {**points[0], paths[-1]: 32}
    assert time.perf_counter() - started < 5  # sanity, not a benchmark: the product has 2048 points


# --- property-based: any search either validates or raises a ConfigError naming a spec field -----
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_param = st.fixed_dictionaries(
    {"path": st.sampled_from(["model.size", "training.learningRate", "model.nLayers", "x", "model.colour"])},
    optional={
        "values": st.lists(_scalars, max_size=4),
        "min": _scalars,
        "max": _scalars,
        "step": _scalars,
        "log": _scalars,
        "type": st.sampled_from(["int", "float", "x"]),
    },
)
_searches = st.fixed_dictionaries(
    {"searchSpace": st.lists(_param, max_size=3)},
    optional={
        "algorithm": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["grid", "random", "asha", "tpe", "x"]),
                "rungs": st.lists(_scalars, max_size=4),
                "eta": _scalars,
                "earlyStopping": st.fixed_dictionaries({}, optional={"startRung": _scalars}),
            },
        ),
        "objective": st.fixed_dictionaries(
            {}, optional={"metric": _scalars, "goal": _scalars, "goalValue": _scalars}
        ),
        "budget": st.dictionaries(
            st.sampled_from(["maxTrials", "parallelTrials", "maxFailedTrials", "maxGpus"]), _scalars
        ),
        "planning": st.dictionaries(st.sampled_from(["gpuMemory", "safetyMargin", "enabled"]), _scalars),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_searches)
def test_any_search_validates_or_raises_a_config_error(spec: dict[str, Any]) -> None:
    try:
        parsed = parse_search_spec(spec)
    except ConfigError as err:
        assert str(err).startswith("spec"), str(err)
        return
    assert status_size_bound(parsed) <= STATUS_BUDGET_BYTES
    json.dumps(parsed.model_dump(mode="json"))
