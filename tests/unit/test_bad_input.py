"""The operator's models refuse every bad input of ``tests/bad_inputs.py`` naming the field, accept
the valid edge cases, and never raise anything but ConfigError (property-based, hypothesis)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubearch_operator import crd
from kubearch_operator.api import TrainingRunSpec, parse_spec
from kubearch_operator.builders import build_configmap, build_pods, plan_run
from kubearch_trainer.config import FAMILY_OPTIONS, ConfigError, load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bad_inputs import CASES, GOOD, Bad


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_operator_refuses_naming_the_field(case: Bad) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(case.spec)
    message = str(info.value)
    assert case.field in message, message  # the API server's path: .key for a map entry, [i] for an item
    assert len(message) < 2000  # a 1 MB input is not echoed back


@pytest.mark.parametrize("spec", GOOD)
def test_valid_edge_cases_are_accepted_and_build(spec: dict[str, Any]) -> None:
    parsed = parse_spec(spec)
    plan = plan_run(parsed)
    build_pods("demo", "ns", "uid", parsed, plan.shape)
    cm = build_configmap("demo", "ns", "uid", plan)
    import yaml

    load_config(yaml.safe_load(cm["data"]["config.yaml"]))  # the trainer accepts what it is given


def test_every_cel_rule_has_a_case_that_the_operator_also_refuses() -> None:
    """Each CEL rule's fieldPath appears among the table's fields (the pydantic twin exists)."""
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    paths = {c.field for c in CASES}
    rules: list[tuple[str, dict]] = []

    def walk(node: dict, path: str) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            rules.append((path, rule))
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[0]")

    walk(schema, "spec")
    assert len(rules) >= 20
    for path, rule in rules:
        target = path + rule.get("fieldPath", "")
        covered = target in paths or any(p.startswith(target) for p in paths)
        if rule["rule"].startswith("!has(self.") and "architecture in" in rule["rule"]:
            covered = covered or target.rsplit(".", 1)[-1] in {f for f in _camel_family_fields()}
        assert covered, f"no bad input exercises {target}: {rule['rule']}"


def _camel_family_fields() -> set[str]:
    from pydantic.alias_generators import to_camel

    return {to_camel(f) for f in FAMILY_OPTIONS}


# --- property-based: anything either validates or is a ConfigError naming a spec field ----------
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)


def _section(fields: list[str]) -> st.SearchStrategy[dict]:
    keys = st.sampled_from([*fields, "unknownField"])
    values = st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=5,
    )
    return st.dictionaries(keys, values, max_size=6)


def _aliases(model: type) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _section_model(annotation: Any) -> type:
    """The section's pydantic class, also for an optional one (``PodTemplate | None``)."""
    if isinstance(annotation, type):
        return annotation
    return next(a for a in get_args(annotation) if isinstance(a, type) and hasattr(a, "model_fields"))


_sections = {
    name: _section(_aliases(_section_model(field.annotation)))
    for name, field in [(f.alias or n, f) for n, f in TrainingRunSpec.model_fields.items()]
}
specs = st.fixed_dictionaries({}, optional=_sections)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_any_spec_validates_or_raises_a_config_error(spec: dict[str, Any]) -> None:
    try:
        parsed = parse_spec(spec)
    except ConfigError as err:
        assert str(err).startswith("spec"), str(err)
        return
    plan = plan_run(parsed)  # a valid spec also plans and builds without surprises
    build_pods("demo", "ns", "uid", parsed, plan.shape)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "data", "training", "x"]),
        st.dictionaries(st.text(max_size=12), _scalars, max_size=4),
        max_size=3,
    )
)
def test_any_trainer_config_validates_or_raises_a_config_error(data: dict[str, Any]) -> None:
    try:
        load_config(data)
    except ConfigError as err:
        assert str(err), data
