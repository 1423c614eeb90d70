"""ArchitectureSearch spec validation: a bad path or value is refused before any trial exists, with
the field named the way the manifest spells it and the allowed fields or values listed."""

from __future__ import annotations

import pytest
from kubearch_operator.search.api import parse_bytes, parse_search_spec
from kubearch_trainer.config import ConfigError

SIZE = {"path": "model.size", "values": ["tiny", "small"]}


def _error(spec: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_search_spec(spec)
    return str(info.value)


def test_unknown_path_names_the_field_and_lists_the_section() -> None:
    msg = _error({"searchSpace": [SIZE, {"path": "model.sise", "values": ["tiny"]}]})
    assert msg.startswith("spec.searchSpace[1].path: 'model.sise' is not a field of a TrainingRun spec")
    assert "model has: " in msg and "size" in msg and "attention" in msg


def test_value_the_trainingrun_refuses_is_named_with_the_allowed_values() -> None:
    msg = _error({"searchSpace": [{"path": "model.size", "values": ["tiny", "huge"]}]})
    assert msg == (
        "spec.searchSpace[0].values[1]: 'huge' is not one of 'tiny', 'small', 'medium', 'large' "
        "(as model.size of a TrainingRun spec)"
    )
    msg = _error({"searchSpace": [{"path": "training.learningRate", "min": 0.1, "max": 3.0}]})
    assert msg.startswith("spec.searchSpace[0].max: ") and "training.learningRate" in msg


def test_rungs_overrides_and_budget_errors_name_their_field() -> None:
    assert _error({"searchSpace": [SIZE], "algorithm": {"rungs": [50, 20]}}) == (
        "spec.algorithm.rungs[1]: 20 must be larger than rungs[0] (50)"
    )
    msg = _error({"searchSpace": [SIZE], "algorithm": {"name": "asha"}})
    assert msg.startswith("spec.algorithm.rungs: asha needs at least two rungs")
    msg = _error(
        {
            "searchSpace": [SIZE],
            "algorithm": {"rungs": [5, 10], "rungOverrides": [{"training.batchSize": 0}, {}]},
        }
    )
    assert msg.startswith("spec.algorithm.rungOverrides[0].training.batchSize: ")
    assert _error({"searchSpace": [{"path": "training.stepsPerEpoch", "values": [10]}]}).startswith(
        "spec.searchSpace[0].path: 'training.stepsPerEpoch' is set by algorithm.rungs"
    )
    assert "'bayes' is not one of 'grid', 'random', 'asha', 'tpe'" in _error(
        {"searchSpace": [SIZE], "algorithm": {"name": "bayes"}}
    )
    assert _error({"searchSpace": [SIZE], "planning": {"gpuMemory": "24 gigs"}}) == (
        "spec.planning.gpuMemory: must be a byte quantity such as 24Gi, 80G or 25769803776 (got '24 gigs')"
    )


def test_ranges_and_quantities() -> None:
    spec = parse_search_spec(
        {
            "searchSpace": [
                {"path": "model.n_layers", "min": 2, "max": 8, "step": 2},
                {"path": "training.learningRate", "min": 1e-4, "max": 1e-2, "log": True},
            ],
            "algorithm": {"name": "random"},
        }
    )
    layers, lr = spec.search_space
    assert layers.path == "model.nLayers" and layers.type == "int" and layers.grid_values() == [2, 4, 6, 8]
    assert lr.type == "float" and lr.log
    assert (
        parse_bytes("24Gi") == 24 * 2**30 and parse_bytes("80G") == 80 * 10**9 and parse_bytes("1024") == 1024
    )
    assert "grid search needs values or a range with step" in _error(
        {"searchSpace": [{"path": "training.learningRate", "min": 1e-4, "max": 1e-2}]}
    )
