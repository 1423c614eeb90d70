"""Invalid ArchitectureSearch specs, each with the field the refusal must name (issue 9's bad-input
rule applied to the search CRD; the TrainingRun's table is ``tests/bad_inputs.py``).

One table for two layers: ``tests/unit/test_search_bounds.py`` checks that the operator's pydantic
models refuse every case naming the field, and ``tests/integration/test_bad_search_api.py`` that the
real API server (schema + CEL) refuses the ones marked ``SCHEMA`` the same way. ``OPERATOR`` marks
what the schema cannot express (a search value is untyped, so CEL cannot read it; a path must be
looked up in the TrainingRun models): the API server accepts it and the operator answers
``SpecValid=False`` naming the field, before any trial exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bad_inputs import MB, OPERATOR, SCHEMA

#: A valid search every case starts from (its own keys replaced by the case's).
BASE: dict[str, Any] = {
    "trialTemplate": {"resources": {"gpusPerNode": 0}},
    "searchSpace": [{"path": "model.size", "values": ["tiny", "small"]}],
}


@dataclass(frozen=True)
class BadSearch:
    id: str
    spec: dict[str, Any]  # merged over BASE (top-level keys replaced)
    field: str  # as the API server names it: spec.searchSpace[0].step
    layer: str = SCHEMA

    @property
    def whole(self) -> dict[str, Any]:
        return {**BASE, **self.spec}


def _range(**kw: Any) -> dict[str, Any]:
    """One range parameter (learning rate unless ``path`` says otherwise), random search."""
    return {"searchSpace": [{"path": "training.learningRate", **kw}], "algorithm": {"name": "random"}}


def _algo(**kw: Any) -> dict[str, Any]:
    return {"algorithm": kw}


def _budget(**kw: Any) -> dict[str, Any]:
    return {"budget": kw}


P0 = "spec.searchSpace[0]"
CASES: list[BadSearch] = [
    # --- search-space ranges -------------------------------------------------------------------
    BadSearch("min-minus-1e300", _range(min=-1e300, max=0.01), f"{P0}.min"),
    BadSearch("max-1e300", _range(min=1e-4, max=1e300), f"{P0}.max"),
    BadSearch("step-1e300", _range(path="model.nLayers", min=1, max=8, step=1e300), f"{P0}.step"),
    BadSearch("step-zero", _range(path="model.nLayers", min=1, max=8, step=0), f"{P0}.step"),
    BadSearch("step-negative", _range(path="model.nLayers", min=1, max=8, step=-1), f"{P0}.step"),
    BadSearch("step-over-range", _range(path="model.nLayers", min=1, max=4, step=8), f"{P0}.step"),
    BadSearch("step-1001-values", _range(path="training.seed", min=0, max=1000, step=1), f"{P0}.step"),
    BadSearch("min-equals-max", _range(min=0.01, max=0.01), f"{P0}.max"),
    BadSearch("min-above-max", _range(min=0.1, max=0.01), f"{P0}.max"),
    BadSearch("log-min-zero", _range(path="model.dropout", min=0, max=0.5, log=True), f"{P0}.min"),
    BadSearch("log-min-negative", _range(min=-1, max=0.5, log=True), f"{P0}.min"),
    BadSearch("log-with-step", _range(path="model.nLayers", min=1, max=8, step=1, log=True), f"{P0}.step"),
    BadSearch("int-fraction", _range(path="model.nLayers", min=1.5, max=8, type="int"), f"{P0}.type"),
    BadSearch(
        "int-fraction-step", _range(path="model.nLayers", min=1, max=8, step=0.5, type="int"), f"{P0}.type"
    ),
    BadSearch("range-without-max", _range(min=0.01), P0),
    BadSearch("values-and-range", _range(values=[0.01], min=0.001, max=0.1), P0),
    BadSearch("step-on-values", {"searchSpace": [{"path": "model.size", "values": ["tiny"], "step": 1}]}, P0),
    BadSearch(
        "type-on-values", {"searchSpace": [{"path": "model.size", "values": ["tiny"], "type": "int"}]}, P0
    ),
    BadSearch("values-empty", {"searchSpace": [{"path": "model.size", "values": []}]}, f"{P0}.values"),
    BadSearch(
        "values-257",
        {"searchSpace": [{"path": "training.seed", "values": list(range(257))}], "budget": {"maxTrials": 10}},
        f"{P0}.values",
    ),
    BadSearch("path-201", {"searchSpace": [{"path": "model." + "a" * 195, "values": [1]}]}, f"{P0}.path"),
    BadSearch("path-pattern", {"searchSpace": [{"path": "model..size", "values": ["tiny"]}]}, f"{P0}.path"),
    BadSearch("path-mb", {"searchSpace": [{"path": MB, "values": ["tiny"]}]}, f"{P0}.path"),
    BadSearch("space-empty", {"searchSpace": []}, "spec.searchSpace"),
    BadSearch(
        "space-33",
        {"searchSpace": [{"path": f"model.p{i}", "values": [1]} for i in range(33)]},
        "spec.searchSpace",
    ),
    # --- objective -------------------------------------------------------------------------------
    BadSearch(
        "goal-value-1e300",
        {"objective": {"metric": "valLoss", "goalValue": 1e300}},
        "spec.objective.goalValue",
    ),
    BadSearch(
        "goal-value-accuracy-percent",
        {"objective": {"metric": "valAccuracy", "goalValue": 95}},
        "spec.objective.goalValue",
    ),
    BadSearch(
        "goal-value-negative-loss",
        {"objective": {"metric": "valLoss", "goalValue": -0.5}},
        "spec.objective.goalValue",
    ),
    BadSearch(
        "goal-value-perplexity-below-1",
        {"objective": {"metric": "perplexity", "goalValue": 0.5}},
        "spec.objective.goalValue",
    ),
    BadSearch(
        "goal-value-negative-speed",
        {"objective": {"metric": "tokensPerSecond", "goalValue": -1}},
        "spec.objective.goalValue",
    ),
    BadSearch(
        "metric-101", {"objective": {"metric": "m" * 101, "goal": "minimize"}}, "spec.objective.metric"
    ),
    BadSearch(
        "metric-blank", {"objective": {"metric": "val loss", "goal": "minimize"}}, "spec.objective.metric"
    ),
    BadSearch("metric-without-goal", {"objective": {"metric": "bleu"}}, "spec.objective.goal"),
    BadSearch("goal-unknown", {"objective": {"goal": "best"}}, "spec.objective.goal"),
    # --- algorithm -------------------------------------------------------------------------------
    BadSearch("name-unknown", _algo(name="bayes"), "spec.algorithm.name"),
    BadSearch("rung-zero", _algo(rungs=[0, 10]), "spec.algorithm.rungs[0]"),
    BadSearch("rung-1e10", _algo(rungs=[10, 10**10]), "spec.algorithm.rungs[1]"),
    BadSearch("rungs-decreasing", _algo(rungs=[200, 50]), "spec.algorithm.rungs"),
    BadSearch("rungs-17", _algo(rungs=list(range(1, 18))), "spec.algorithm.rungs"),
    BadSearch("asha-one-rung", _algo(name="asha", rungs=[50]), "spec.algorithm.rungs"),
    BadSearch("eta-1", _algo(name="asha", rungs=[5, 10], eta=1), "spec.algorithm.eta"),
    BadSearch("eta-100", _algo(name="asha", rungs=[5, 10], eta=100), "spec.algorithm.eta"),
    BadSearch("seed-2e31", _algo(seed=2**31), "spec.algorithm.seed"),
    BadSearch("seed-negative", _algo(seed=-1), "spec.algorithm.seed"),
    BadSearch("startup-1e6", _algo(name="tpe", nStartupTrials=10**6), "spec.algorithm.nStartupTrials"),
    BadSearch(
        "overrides-per-rung",
        _algo(rungs=[50, 200], rungOverrides=[{"training.batchSize": 8}]),
        "spec.algorithm.rungOverrides",
    ),
    BadSearch(
        "overrides-33-paths",
        _algo(rungs=[50], rungOverrides=[{f"model.p{i}": 1 for i in range(33)}]),
        "spec.algorithm.rungOverrides[0]",
    ),
    BadSearch(
        "early-stopping-on-asha",
        _algo(name="asha", rungs=[5, 10], earlyStopping={"name": "medianStop"}),
        "spec.algorithm.earlyStopping",
    ),
    BadSearch(
        "early-stopping-one-rung",
        _algo(earlyStopping={"name": "medianStop"}),
        "spec.algorithm.earlyStopping.startRung",
    ),
    BadSearch(
        "early-stopping-at-last-rung",
        _algo(rungs=[5, 10], earlyStopping={"startRung": 1}),
        "spec.algorithm.earlyStopping.startRung",
    ),
    BadSearch(
        "min-trials-required-1e6",
        _algo(rungs=[5, 10], earlyStopping={"minTrialsRequired": 10**6}),
        "spec.algorithm.earlyStopping.minTrialsRequired",
    ),
    # --- budget ----------------------------------------------------------------------------------
    BadSearch("max-trials-zero", _budget(maxTrials=0), "spec.budget.maxTrials"),
    BadSearch("max-trials-201", _budget(maxTrials=201), "spec.budget.maxTrials"),
    BadSearch("max-trials-1e9", _budget(maxTrials=10**9), "spec.budget.maxTrials"),
    BadSearch(
        "parallel-over-max-trials", _budget(maxTrials=2, parallelTrials=4), "spec.budget.parallelTrials"
    ),
    BadSearch("parallel-1000", _budget(parallelTrials=1000), "spec.budget.parallelTrials"),
    BadSearch("parallel-zero", _budget(parallelTrials=0), "spec.budget.parallelTrials"),
    BadSearch("max-failed-1e6", _budget(maxFailedTrials=10**6), "spec.budget.maxFailedTrials"),
    BadSearch("max-gpus-1e6", _budget(maxGpus=10**6), "spec.budget.maxGpus"),
    # the status keeps a record per trial and rung: (maxTrials + maxFailedTrials) x rungs <= 250
    BadSearch(
        "records-two-rungs",
        {"budget": {"maxTrials": 200}, "algorithm": {"rungs": [50, 200]}},
        "spec.budget.maxTrials",
    ),
    BadSearch(
        "records-failures",
        {"budget": {"maxTrials": 200, "maxFailedTrials": 60}},
        "spec.budget.maxTrials",
    ),
    BadSearch(
        "records-defaults-16-rungs",  # no budget at all: 16 configurations + 3 failures x 16 rungs
        {"algorithm": {"name": "random", "rungs": list(range(1, 17))}},
        "spec.budget.maxTrials",
    ),
    # --- planning --------------------------------------------------------------------------------
    BadSearch("gpu-memory-words", {"planning": {"gpuMemory": "24 gigs"}}, "spec.planning.gpuMemory"),
    BadSearch("gpu-memory-mb", {"planning": {"gpuMemory": "1" * 1_000_000}}, "spec.planning.gpuMemory"),
    BadSearch("gpu-memory-33", {"planning": {"gpuMemory": "1" * 31 + "Gi"}}, "spec.planning.gpuMemory"),
    BadSearch("safety-margin-0.95", {"planning": {"safetyMargin": 0.95}}, "spec.planning.safetyMargin"),
    BadSearch("safety-margin-negative", {"planning": {"safetyMargin": -0.1}}, "spec.planning.safetyMargin"),
    # --- the trial template is a TrainingRun spec (its whole table: tests/bad_inputs.py) --------
    BadSearch(
        "template-weight-decay-1e308",
        {"trialTemplate": {"training": {"weightDecay": 1e308}}},
        "spec.trialTemplate.training.weightDecay",
    ),
    BadSearch(
        "template-cuda-without-gpus",
        {"trialTemplate": {"training": {"device": "cuda"}, "resources": {"gpusPerNode": 0}}},
        "spec.trialTemplate.training.device",
    ),
    BadSearch("unknown-field", {"budget": {"maxTrialCount": 3}}, "spec.budget.maxTrialCount"),
    # --- only the operator can tell ------------------------------------------------------------
    BadSearch(
        "value-the-run-refuses",
        {"searchSpace": [{"path": "model.size", "values": ["tiny", "huge"]}]},
        f"{P0}.values[1]",
        OPERATOR,
    ),
    BadSearch(
        "value-mb-string",
        {"searchSpace": [{"path": "data.path", "values": [MB]}]},
        f"{P0}.values[0]",
        OPERATOR,
    ),
    BadSearch(
        "value-not-a-scalar",
        {"searchSpace": [{"path": "model.size", "values": [{"a": 1}]}]},
        f"{P0}.values[0]",
        OPERATOR,
    ),
    BadSearch("range-the-run-refuses", _range(min=1e-4, max=3.0), f"{P0}.max", OPERATOR),
    BadSearch(
        "path-unknown",
        {"searchSpace": [{"path": "model.colour", "values": ["blue"]}]},
        f"{P0}.path",
        OPERATOR,
    ),
    BadSearch(
        "path-set-by-rungs",
        {"searchSpace": [{"path": "training.stepsPerEpoch", "values": [10]}]},
        f"{P0}.path",
        OPERATOR,
    ),
    BadSearch(
        "grid-range-without-step",
        {"searchSpace": [{"path": "training.learningRate", "min": 1e-4, "max": 1e-2}]},
        P0,
        OPERATOR,
    ),
    BadSearch(
        "grid-1000-configurations",  # no maxTrials: the whole grid (10 x 10 x 10) is over 200
        {
            "searchSpace": [
                {"path": "training.seed", "values": list(range(10))},
                {"path": "model.nLayers", "values": list(range(1, 11))},
                {"path": "training.batchSize", "values": list(range(1, 11))},
            ]
        },
        "spec.budget.maxTrials",
        OPERATOR,
    ),
    BadSearch(
        "status-too-large-for-long-values",  # 4 KB values in every record: 100 configurations do not fit
        {
            "searchSpace": [{"path": "data.path", "values": ["p" * 4000, "q" * 4000]}],
            "algorithm": {"name": "random"},
            "budget": {"maxTrials": 100},
        },
        "spec.budget.maxTrials",
        OPERATOR,
    ),
    BadSearch(
        "override-the-run-refuses",
        _algo(rungs=[5, 10], rungOverrides=[{"training.batchSize": 0}, {}]),
        "spec.algorithm.rungOverrides[0].training.batchSize",
        OPERATOR,
    ),
    BadSearch(
        "gpu-memory-too-small", {"planning": {"gpuMemory": "512Mi"}}, "spec.planning.gpuMemory", OPERATOR
    ),
    BadSearch(
        "gpu-memory-too-large", {"planning": {"gpuMemory": "5Ti"}}, "spec.planning.gpuMemory", OPERATOR
    ),
]

#: Valid searches near the edges: the rules above must not refuse them.
GOOD: list[dict[str, Any]] = [
    {**BASE, **extra}
    for extra in (
        {},
        _range(min=1e-4, max=1e-2, log=True),
        _range(path="model.nLayers", min=1, max=256, step=1),  # 256 values: the most
        _range(path="model.nLayers", min=1, max=8, step=7),  # step = the whole range
        _range(path="model.nLayers", min=2, max=8, step=2, type="int"),
        _range(path="training.seed", min=0, max=1000, log=False),  # unstepped: no value count
        {"objective": {"metric": "valAccuracy", "goalValue": 1.0}},
        {"objective": {"metric": "perplexity", "goalValue": 1.0}},
        {"objective": {"metric": "bleu", "goal": "maximize", "goalValue": 95}},  # any range
        {"algorithm": {"rungs": [5, 10], "earlyStopping": {"startRung": 0}}},
        {"algorithm": {"name": "asha", "rungs": [5, 10, 1_000_000_000], "eta": 16}},
        {"budget": {"maxTrials": 200, "maxFailedTrials": 50, "parallelTrials": 200}},  # 250 config-rungs
        {"budget": {"maxTrials": 122, "maxFailedTrials": 3}, "algorithm": {"rungs": [5, 10]}},
        {"planning": {"gpuMemory": "1Gi"}},
        {"planning": {"gpuMemory": "4Ti", "safetyMargin": 0.0}},
        {"planning": {"gpuMemory": "80GB"}},
    )
]
