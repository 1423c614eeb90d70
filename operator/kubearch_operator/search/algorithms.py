"""Search algorithms behind one interface: propose configurations, decide who continues to the next rung.

Every algorithm runs a configuration rung by rung (a rung = a number of training steps). Two
questions are asked of an algorithm, and both are pure functions of what is persisted in the
search's status (so an operator restart asks them again and gets the same answers):

* :func:`propose` — the parameters of configurations number ``n, n+1, ...`` given the history of
  every configuration proposed so far. ``grid`` walks the exact product in a stable order;
  ``random`` draws from ``random.Random`` seeded by (seed, configuration number), so configuration
  k is the same whatever happened before it; ``tpe`` rebuilds an Optuna study in memory from the
  history (finished configurations COMPLETE / PRUNED with their rung values, running ones RUNNING
  for the constant liar) and samples with a seed derived from (seed, configuration number).
* :func:`advance` — for each configuration that finished a rung and waits: continue to the next
  rung or stop. ``asha`` is asynchronous successive halving (Li et al., "A System for Massively
  Parallel Hyperparameter Tuning"; Optuna's SuccessiveHalvingPruner): a configuration in the top
  ``1/eta`` of those finished at its rung is promoted at once; when no configuration can reach a
  rung any more (the rung is *closed*), its top ``max(1, n // eta)`` are promoted and the rest
  stopped. The others continue every configuration, unless median stopping stops one that is
  worse than the median of its rung.

Nothing here does I/O; optuna is imported only by ``tpe``.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .api import ArchitectureSearchSpec, SearchParameter

ConfigStatus = Literal["running", "waiting", "done", "stopped", "failed"]


@dataclass(frozen=True)
class ConfigView:
    """One configuration as the algorithms see it.

    ``objectives``: rung -> objective of its finished trial at that rung. ``rung``: the highest
    rung it has a trial at. ``status``: ``running`` (a trial is planned or running), ``waiting``
    (finished ``rung`` < the last rung, no decision yet), ``done`` (finished the last rung),
    ``stopped`` (not continued), ``failed``.
    """

    config: int
    params: dict[str, Any]
    rung: int
    status: ConfigStatus
    objectives: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Advance:
    """The decision for a waiting configuration: continue to ``rung + 1`` or stop (with a reason)."""

    config: int
    rung: int
    action: Literal["continue", "stop"]
    reason: str = ""
    message: str = ""


# ------------------------------------------------------------------------------------- proposing
def grid_points(spec: ArchitectureSearchSpec) -> list[dict[str, Any]]:
    """The exact product of the search space, the last parameter varying fastest (a stable order)."""
    axes = [p.grid_values() for p in spec.search_space]
    paths = [p.path for p in spec.search_space]
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*axes)]


def grid_point(spec: ArchitectureSearchSpec, index: int) -> dict[str, Any] | None:
    """Point ``index`` of :func:`grid_points` without enumerating the product (a grid of 32 axes of
    256 values has 256**32 points; a search tries at most budget.maxTrials of them). None past the end."""
    axes = [p.grid_values() for p in spec.search_space]
    if index >= math.prod(len(a) for a in axes):
        return None
    out: dict[str, Any] = {}
    for param, values in zip(reversed(spec.search_space), reversed(axes), strict=True):
        index, digit = divmod(index, len(values))
        out[param.path] = values[digit]
    return {p.path: out[p.path] for p in spec.search_space}


def max_configurations(spec: ArchitectureSearchSpec) -> int | None:
    """How many configurations the algorithm can propose at all: the grid's size for grid, else
    unbounded (random and tpe may repeat a point of a finite space; that is allowed)."""
    return spec.grid_size() if spec.algorithm.name == "grid" else None


def sample_random(spec: ArchitectureSearchSpec, index: int) -> dict[str, Any]:
    """Configuration ``index`` of a random search: seeded by (seed, index) alone, so reproducible."""
    rng = random.Random(f"kubearch-random:{spec.algorithm.seed}:{index}")
    return {p.path: _sample_param(p, rng) for p in spec.search_space}


def _sample_param(p: SearchParameter, rng: random.Random) -> Any:
    if p.values is not None:
        return p.values[rng.randrange(len(p.values))]
    assert p.min is not None and p.max is not None
    if p.step is not None:
        choices = p.grid_values()
        return choices[rng.randrange(len(choices))]
    if p.type == "int":
        lo, hi = math.ceil(p.min), math.floor(p.max)
        if p.log:  # log-uniform over [lo, hi + 1), floored: each integer gets its log-width's share
            value = int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))
            return min(max(value, lo), hi)
        return rng.randint(lo, hi)
    if p.log:
        return math.exp(rng.uniform(math.log(p.min), math.log(p.max)))
    return rng.uniform(p.min, p.max)


def propose(
    spec: ArchitectureSearchSpec, history: list[ConfigView], count: int, state: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parameters of the next ``count`` configurations (numbered ``len(history)`` onwards).

    ``history`` holds every configuration proposed so far, in configuration order. ``state`` is the
    algorithm's persisted JSON state; the new state is returned (it only records what was proposed:
    every decision can be recomputed from the history, which is what makes restarts safe).
    """
    name = spec.algorithm.name
    start = len(history)
    out: list[dict[str, Any]] = []
    if name == "grid":
        points = (grid_point(spec, i) for i in range(start, start + count))
        out = [p for p in points if p is not None]
    elif name == "random":
        out = [sample_random(spec, start + k) for k in range(count)]
    elif name == "asha":
        out = [_asha_point(spec, start + k) for k in range(count)]
    elif name == "tpe":
        pending = list(history)
        for k in range(count):
            params = sample_tpe(spec, pending, start + k)
            out.append(params)
            pending.append(ConfigView(config=start + k, params=params, rung=0, status="running"))
    else:  # pragma: no cover - the API refuses other names
        raise ValueError(f"algorithm.name: {name!r} is not one of grid, random, asha, tpe")
    new_state = {**state, "name": name, "seed": spec.algorithm.seed, "proposed": start + len(out)}
    return out, new_state


def _asha_point(spec: ArchitectureSearchSpec, index: int) -> dict[str, Any]:
    """ASHA's configurations: the grid in order when the space is all value lists and the grid is
    not exhausted (the seed's 36), else random samples."""
    if all(p.values is not None or p.step is not None for p in spec.search_space):
        point = grid_point(spec, index)
        if point is not None:
            return point
    return sample_random(spec, index)


def _distributions(spec: ArchitectureSearchSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in spec.search_space:
        if p.values is not None:
            out[p.path] = CategoricalDistribution(p.values)
        elif p.type == "int":
            assert p.min is not None and p.max is not None
            step = int(p.step) if p.step is not None else 1
            out[p.path] = IntDistribution(int(p.min), int(p.max), log=p.log, step=step)
        else:
            assert p.min is not None and p.max is not None
            out[p.path] = FloatDistribution(p.min, p.max, log=p.log, step=p.step)
    return out


def tpe_seed(seed: int, index: int) -> int:
    """The sampler seed of configuration ``index``: a fixed function of (seed, index)."""
    return random.Random(f"kubearch-tpe:{seed}:{index}").randrange(2**31)


def sample_tpe(spec: ArchitectureSearchSpec, history: list[ConfigView], index: int) -> dict[str, Any]:
    """Configuration ``index`` by Optuna's TPE, from a study rebuilt from ``history``.

    Finished configurations are COMPLETE with the objective of the last rung (``done``) or PRUNED
    with their rung values (stopped early, Optuna ranks them by how far they got); failed ones FAIL;
    running or waiting ones RUNNING, which the constant liar treats as bad so that parallel
    proposals spread out. A fresh sampler seeded by (seed, index) makes the proposal a pure function
    of the history: a restarted operator proposes exactly what an uninterrupted one would.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = _distributions(spec)
    last_rung = len(spec.rung_steps()) - 1
    steps = spec.rung_steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant_liar is flagged experimental
        sampler = optuna.samplers.TPESampler(
            seed=tpe_seed(spec.algorithm.seed, index),
            n_startup_trials=spec.algorithm.n_startup_trials,
            constant_liar=True,
        )
        direction = "minimize" if spec.objective.minimize else "maximize"
        study = optuna.create_study(direction=direction, sampler=sampler)
        for view in history:
            params = {k: v for k, v in view.params.items() if k in dists}
            if set(params) != set(dists):
                continue  # a configuration from an older search space: not comparable
            inter = {steps[r]: v for r, v in view.objectives.items() if r < len(steps)}
            if view.status == "done" and last_rung in view.objectives:
                trial = create_trial(
                    params=params,
                    distributions=dists,
                    value=view.objectives[last_rung],
                    intermediate_values=inter,
                    state=TrialState.COMPLETE,
                )
            elif view.status == "stopped" and inter:
                trial = create_trial(
                    params=params, distributions=dists, intermediate_values=inter, state=TrialState.PRUNED
                )
            elif view.status == "failed" or view.status in ("stopped", "done"):
                trial = create_trial(params=params, distributions=dists, state=TrialState.FAIL)
            else:
                trial = create_trial(
                    params=params, distributions=dists, intermediate_values=inter, state=TrialState.RUNNING
                )
            study.add_trial(trial)
        asked = study.ask(dists)
    return {p.path: asked.params[p.path] for p in spec.search_space}


# ------------------------------------------------------------------------------------- advancing
def _better(minimize: bool):
    """Sort key: best first, ties broken by configuration number (deterministic)."""

    def key(item: tuple[int, float]) -> tuple[float, int]:
        config, value = item
        return (value if minimize else -value, config)

    return key


def advance(
    spec: ArchitectureSearchSpec, configs: list[ConfigView], *, more_configs_coming: bool
) -> list[Advance]:
    """Decisions for the configurations that finished a rung and wait (see the module docstring).

    ``more_configs_coming``: whether the search may still propose new configurations (then no rung
    is closed: a newcomer could still reach it and outrank the waiting ones).
    """
    n_rungs = len(spec.rung_steps())
    minimize = spec.objective.minimize
    if spec.algorithm.name == "asha":
        return _asha(spec, configs, n_rungs, minimize, more_configs_coming)
    decisions: list[Advance] = []
    stopping = spec.algorithm.early_stopping
    for view in sorted(configs, key=lambda v: v.config):
        if view.status != "waiting" or view.rung >= n_rungs - 1:
            continue
        r = view.rung
        if stopping is not None and r >= stopping.start_rung:
            finished = [c.objectives[r] for c in configs if r in c.objectives]
            if len(finished) >= stopping.min_trials_required:
                median = statistics.median(finished)
                value = view.objectives[r]
                worse = value > median if minimize else value < median
                if worse:
                    decisions.append(
                        Advance(
                            view.config,
                            r,
                            "stop",
                            "MedianStop",
                            f"{spec.objective.metric} {value:.6g} at rung {r} is worse than the median "
                            f"{median:.6g} of {len(finished)} finished configurations",
                        )
                    )
                    continue
        decisions.append(Advance(view.config, r, "continue"))
    return decisions


def _asha(
    spec: ArchitectureSearchSpec,
    configs: list[ConfigView],
    n_rungs: int,
    minimize: bool,
    more_configs_coming: bool,
) -> list[Advance]:
    eta = spec.algorithm.eta
    status = {c.config: c.status for c in configs}
    rung_of = {c.config: c.rung for c in configs}
    decisions: list[Advance] = []
    for r in range(n_rungs - 1):
        finished = sorted(
            ((c.config, c.objectives[r]) for c in configs if r in c.objectives), key=_better(minimize)
        )
        ranked = [cfg for cfg, _ in finished]
        waiting = {c for c in ranked if status[c] == "waiting" and rung_of[c] == r}
        # Closed: no configuration can still finish this rung (none running at or below it, none
        # waiting below it, no newcomers).
        closed = not more_configs_coming and not any(
            (status[c.config] == "running" and rung_of[c.config] <= r)
            or (status[c.config] == "waiting" and rung_of[c.config] < r)
            for c in configs
        )
        top = len(ranked) // eta
        if closed:
            top = max(1, top)
        for position, cfg in enumerate(ranked):
            if cfg not in waiting:
                continue
            if position < top:
                decisions.append(Advance(cfg, r, "continue", "Promoted"))
                status[cfg], rung_of[cfg] = "running", r + 1
            elif closed:
                decisions.append(
                    Advance(
                        cfg,
                        r,
                        "stop",
                        "NotPromoted",
                        f"rank {position + 1} of {len(ranked)} at rung {r}; asha promotes the top "
                        f"{top} (1/eta = 1/{eta})",
                    )
                )
                status[cfg] = "stopped"
    return decisions
