"""Search algorithms: grid's exact product, seeded random draws, ASHA promotion, median stop, and
TPE proposals that continue identically from persisted (JSON round-tripped) history."""

from __future__ import annotations

import json
import math

import pytest
from kubearch_operator.search import algorithms
from kubearch_operator.search.algorithms import ConfigView
from kubearch_operator.search.api import parse_search_spec

SIZES = ["tiny", "small", "medium", "large"]
VARIANTS = [
    "baseline",
    "lora_small",
    "lora_medium",
    "lora_large",
    "enhanced_small",
    "enhanced_medium",
    "enhanced_large",
    "rope_only",
    "bias_only",
]


def _spec(algorithm: dict, space: list[dict] | None = None, **extra):
    return parse_search_spec(
        {
            "searchSpace": space
            or [{"path": "model.size", "values": SIZES}, {"path": "model.attention", "values": VARIANTS}],
            "algorithm": algorithm,
            **extra,
        }
    )


def test_grid_enumerates_the_seed_product_in_a_stable_order() -> None:
    spec = _spec({"name": "grid", "rungs": [50, 200]})
    points, state = algorithms.propose(spec, [], 100, {})
    assert len(points) == 36 == spec.grid_size() == spec.max_trials()
    pairs = [(p["model.size"], p["model.attention"]) for p in points]
    assert set(pairs) == {(s, v) for s in SIZES for v in VARIANTS}
    assert pairs[0] == ("tiny", "baseline") and pairs[1] == ("tiny", "lora_small")
    assert pairs[9] == ("small", "baseline") and pairs[-1] == ("large", "bias_only")
    # continuing from a history of 10 proposes exactly the 11th point on
    history = [ConfigView(i, points[i], 0, "running") for i in range(10)]
    rest, _ = algorithms.propose(spec, history, 3, state)
    assert rest == points[10:13]
    assert state["proposed"] == 36
    assert json.loads(json.dumps(state)) == state


RANGES = [
    {"path": "training.learningRate", "min": 1e-4, "max": 1e-2, "log": True},
    {"path": "model.nLayers", "min": 1, "max": 6},
    {"path": "training.weightDecay", "min": 0.0, "max": 0.2},
    {"path": "model.attention", "values": ["baseline", "rope_only"]},
]


def test_random_is_seeded_reproducible_and_in_range() -> None:
    spec = _spec({"name": "random", "seed": 7}, RANGES, budget={"maxTrials": 200})
    a, _ = algorithms.propose(spec, [], 300, {})
    b, _ = algorithms.propose(spec, [], 300, {})
    assert a == b
    other, _ = algorithms.propose(_spec({"name": "random", "seed": 8}, RANGES), [], 300, {})
    assert other != a
    lrs = [p["training.learningRate"] for p in a]
    assert all(1e-4 <= x <= 1e-2 for x in lrs)
    # log-uniform: half the draws below the geometric middle 1e-3 (uniform would put ~9% there)
    assert 0.4 < sum(x < 1e-3 for x in lrs) / len(lrs) < 0.6
    layers = [p["model.nLayers"] for p in a]
    assert all(isinstance(x, int) for x in layers) and set(layers) == {1, 2, 3, 4, 5, 6}
    assert all(0.0 <= p["training.weightDecay"] <= 0.2 for p in a)
    assert {p["model.attention"] for p in a} == {"baseline", "rope_only"}
    # configuration k depends on (seed, k) only: proposing after a history gives the same draws
    history = [ConfigView(i, a[i], 0, "done", {0: 1.0}) for i in range(5)]
    more, _ = algorithms.propose(spec, history, 2, {})
    assert more == a[5:7]


def test_int_log_range_draws_integers_inside_the_range() -> None:
    spec = _spec({"name": "random"}, [{"path": "model.dModel", "min": 16, "max": 512, "log": True}])
    draws = [p["model.dModel"] for p in algorithms.propose(spec, [], 200, {})[0]]
    assert all(isinstance(x, int) and 16 <= x <= 512 for x in draws)
    assert sum(x < 90 for x in draws) / len(draws) > 0.35  # log-uniform: 16..90 is half the log-range


def _waiting(values: dict[int, float], rung: int = 0) -> list[ConfigView]:
    return [ConfigView(c, {}, rung, "waiting", {rung: v}) for c, v in values.items()]


def test_asha_promotes_the_top_third_of_a_closed_rung_and_stops_the_rest() -> None:
    spec = _spec({"name": "asha", "rungs": [10, 30, 90], "eta": 3})
    values = {0: 5.0, 1: 3.0, 2: 9.0, 3: 1.0, 4: 7.0, 5: 2.0, 6: 8.0, 7: 4.0, 8: 6.0}
    decisions = algorithms.advance(spec, _waiting(values), more_configs_coming=False)
    go = {d.config for d in decisions if d.action == "continue"}
    stop = {d.config for d in decisions if d.action == "stop"}
    assert go == {3, 5, 1}  # the three lowest losses (9 // 3)
    assert stop == {0, 2, 4, 6, 7, 8}
    assert all(d.reason == "NotPromoted" for d in decisions if d.action == "stop")

    # rung 1 of the same search: 3 finished there, closed -> max(1, 3 // 3) = 1 promoted
    views = [
        ConfigView(3, {}, 1, "waiting", {0: 1.0, 1: 0.9}),
        ConfigView(5, {}, 1, "waiting", {0: 2.0, 1: 0.5}),
        ConfigView(1, {}, 1, "waiting", {0: 3.0, 1: 0.7}),
        *[ConfigView(c, {}, 0, "stopped", {0: v}) for c, v in values.items() if c not in (1, 3, 5)],
    ]
    decisions = algorithms.advance(spec, views, more_configs_coming=False)
    assert {(d.config, d.action) for d in decisions} == {(5, "continue"), (3, "stop"), (1, "stop")}


def test_asha_is_asynchronous_while_configurations_keep_coming() -> None:
    spec = _spec({"name": "asha", "rungs": [10, 30], "eta": 3})
    values = {0: 4.0, 1: 2.0, 2: 3.0, 3: 1.0}
    # 4 finished, more to come: the top 4 // 3 = 1 is promoted at once, nobody is stopped yet
    decisions = algorithms.advance(spec, _waiting(values), more_configs_coming=True)
    assert [(d.config, d.action) for d in decisions] == [(3, "continue")]
    # a configuration still running at rung 0 keeps the rung open even with no newcomers
    running = [*_waiting(values), ConfigView(4, {}, 0, "running")]
    decisions = algorithms.advance(spec, running, more_configs_coming=False)
    assert [(d.config, d.action) for d in decisions] == [(3, "continue")]


def test_asha_maximize_promotes_the_highest() -> None:
    spec = _spec({"name": "asha", "rungs": [10, 30], "eta": 2}, objective={"metric": "valAccuracy"})
    decisions = algorithms.advance(
        spec, _waiting({0: 0.1, 1: 0.4, 2: 0.3, 3: 0.2}), more_configs_coming=False
    )
    assert {d.config for d in decisions if d.action == "continue"} == {1, 2}


def test_median_stop_stops_exactly_the_worse_than_median() -> None:
    stopping = {"earlyStopping": {"minTrialsRequired": 3}}
    spec = _spec({"name": "grid", "rungs": [10, 30], **stopping})
    values = {0: 1.0, 1: 5.0, 2: 3.0, 3: 4.0, 4: 2.0}  # median 3.0
    decisions = algorithms.advance(spec, _waiting(values), more_configs_coming=True)
    stopped = {d.config for d in decisions if d.action == "stop"}
    assert stopped == {1, 3}  # 5.0 and 4.0; 3.0 equals the median and continues
    assert {d.config for d in decisions if d.action == "continue"} == {0, 2, 4}
    assert all(d.reason == "MedianStop" for d in decisions if d.action == "stop")
    # too few finished: nobody stops
    spec6 = _spec({"name": "grid", "rungs": [10, 30], "earlyStopping": {"minTrialsRequired": 6}})
    assert all(
        d.action == "continue" for d in algorithms.advance(spec6, _waiting(values), more_configs_coming=True)
    )
    # before startRung: nobody stops
    late = _spec({"name": "random", "rungs": [10, 30, 90], "earlyStopping": {"startRung": 1}})
    assert all(
        d.action == "continue" for d in algorithms.advance(late, _waiting(values), more_configs_coming=True)
    )


def test_without_early_stopping_every_configuration_continues() -> None:
    spec = _spec({"name": "grid", "rungs": [50, 200]})
    decisions = algorithms.advance(spec, _waiting({0: 9.0, 1: 1.0}), more_configs_coming=False)
    assert {(d.config, d.action) for d in decisions} == {(0, "continue"), (1, "continue")}


TPE_SPACE = [
    {"path": "training.learningRate", "min": 1e-4, "max": 1e-1, "log": True},
    {"path": "model.nLayers", "min": 1, "max": 8},
    {"path": "model.attention", "values": ["baseline", "rope_only", "bias_only"]},
]


def _loss(p: dict) -> float:
    """A smooth objective with its optimum at lr 1e-2, 4 layers, rope_only."""
    penalty = {"baseline": 0.3, "rope_only": 0.0, "bias_only": 0.5}[p["model.attention"]]
    return (math.log10(p["training.learningRate"]) + 2) ** 2 + 0.1 * (p["model.nLayers"] - 4) ** 2 + penalty


def test_tpe_proposes_inside_the_space_and_continues_from_persisted_history() -> None:
    spec = _spec({"name": "tpe", "seed": 3, "nStartupTrials": 4}, TPE_SPACE)
    history: list[ConfigView] = []
    proposals = []
    for i in range(14):
        # persist and read back the history every time, as a restarted operator would
        stored = json.loads(json.dumps([v.__dict__ for v in history]))
        restored = [
            ConfigView(
                v["config"],
                v["params"],
                v["rung"],
                v["status"],
                {int(k): x for k, x in v["objectives"].items()},
            )
            for v in stored
        ]
        (params,), _ = algorithms.propose(spec, restored, 1, {})
        proposals.append(params)
        history.append(ConfigView(i, params, 0, "done", {0: _loss(params)}))
    for p in proposals:
        assert 1e-4 <= p["training.learningRate"] <= 1e-1
        assert isinstance(p["model.nLayers"], int) and 1 <= p["model.nLayers"] <= 8
        assert p["model.attention"] in ("baseline", "rope_only", "bias_only")
    # an uninterrupted run (history kept in memory, never serialised) proposes the same sequence
    again: list[ConfigView] = []
    for i in range(14):
        (params,), _ = algorithms.propose(spec, again, 1, {})
        assert params == proposals[i]
        again.append(ConfigView(i, params, 0, "done", {0: _loss(params)}))
    # proposing several at once (the constant liar sees the earlier ones as running) equals one by one
    batch, _ = algorithms.propose(spec, history[:6], 3, {})
    single = []
    hist = list(history[:6])
    for k in range(3):
        (p,), _ = algorithms.propose(spec, hist, 1, {})
        single.append(p)
        hist.append(ConfigView(6 + k, p, 0, "running"))
    assert batch == single


def test_tpe_after_startup_concentrates_near_the_optimum() -> None:
    spec = _spec({"name": "tpe", "seed": 1, "nStartupTrials": 5}, TPE_SPACE)
    history: list[ConfigView] = []
    for i in range(30):
        (params,), _ = algorithms.propose(spec, history, 1, {})
        history.append(ConfigView(i, params, 0, "done", {0: _loss(params)}))
    random_spec = _spec({"name": "random", "seed": 1}, TPE_SPACE)
    random_points, _ = algorithms.propose(random_spec, [], 30, {})
    tpe_late = sorted(_loss(v.params) for v in history[15:])
    random_late = sorted(_loss(p) for p in random_points[15:])
    assert tpe_late[len(tpe_late) // 2] < random_late[len(random_late) // 2]


@pytest.mark.parametrize("name", ["grid", "random", "tpe", "asha"])
def test_state_round_trips_through_json(name: str) -> None:
    rungs = {"rungs": [5, 10]}
    spec = _spec({"name": name, **rungs}, [{"path": "model.size", "values": SIZES}])
    _, state = algorithms.propose(spec, [], 2, {"earlier": 1})
    assert json.loads(json.dumps(state)) == state and state["earlier"] == 1 and state["proposed"] == 2
