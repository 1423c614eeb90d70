"""Generate the CRDs from the pydantic models: ``python -m kubearch_operator.crd [architecturesearch]``.

Why generated: the CRD's schema, the operator's validation and the trainer's config are then the
same classes, and ``tests/unit/test_operator_crd.py`` fails when the checked-in
``manifests/crd-trainingrun.yaml`` or ``manifests/crd-architecturesearch.yaml`` drifts from them.

Kubernetes wants a *structural* OpenAPI v3 schema, which pydantic's JSON Schema is not quite:
``$ref``s are inlined, ``Optional[X]`` (``anyOf: [X, null]``) becomes ``X`` + ``nullable``,
``additionalProperties: false`` is dropped (the API server prunes unknown fields and ``kubectl``'s
strict field validation refuses them), JSON-Schema-2020 exclusive bounds become OpenAPI 3.0's
boolean form, and titles go. Enums, minimum/maximum, patterns and defaults stay, so ``kubectl
apply`` itself refuses ``size: huge``. ``Any`` (a search's values, parameter maps, the algorithm's
state) becomes ``x-kubernetes-preserve-unknown-fields``, the one untyped node a structural schema
allows. Three training fields get no default on purpose: the GPU matrix fills them when the user
leaves them out (see ``builders.plan_run``).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from kubearch_trainer.config import BUILTIN_ARCHITECTURES, FAMILY_OPTIONS, ModelConfig, TrainingConfig
from pydantic.alias_generators import to_camel

from .api import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, TrainingRunSpec, TrainingRunStatus
from .search.api import (
    GOAL_VALUE_RANGES,
    KNOWN_GOALS,
    MAX_CONFIG_RUNGS,
    MAX_VALUES,
    NUMBER_LIMIT,
    ArchitectureSearchSpec,
    ArchitectureSearchStatus,
    Budget,
)
from .search.api import KIND as SEARCH_KIND
from .search.api import PLURAL as SEARCH_PLURAL
from .search.api import SHORT_NAMES as SEARCH_SHORT_NAMES
from .search.api import SINGULAR as SEARCH_SINGULAR

#: spec.training fields the GPU matrix chooses under ``resources.auto``: no schema default.
MATRIX_FIELDS = frozenset({"batchSize", "gradientAccumulationSteps", "useAmp"})

PRINTER_COLUMNS = [
    {"name": "Architecture", "type": "string", "jsonPath": ".spec.model.architecture"},
    {"name": "Size", "type": "string", "jsonPath": ".spec.model.size"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.chosenShape.gpus"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _default(model: type, field: str) -> Any:
    return model.model_fields[field].default  # type: ignore[attr-defined]


def _rule(rule: str, message: str, field: str | None = None) -> dict[str, str]:
    """A CEL rule; ``fieldPath`` makes the API server name the field (``spec.data.seqLen``)."""
    out = {"rule": rule, "message": message}
    if field:
        out["fieldPath"] = field
        out["reason"] = "FieldValueInvalid"
    return out


# Cross-field rules the API server checks itself (CEL, ``x-kubernetes-validations``). Each has a
# pydantic twin with the same field path (api.spec_cross_checks, Resources, SchedulingPolicy,
# Toleration, config.trainer_cross_checks): the operator says the same if one gets past (a CRD
# installed before the rule, or a plugin architecture). Every string and list is bounded
# (maxLength/maxItems/maxProperties), which keeps the rules' estimated cost within the API
# server's budget.
SPEC_RULES = [
    _rule("self.data.seqLen <= self.model.maxSeqLen", "data.seqLen exceeds model.maxSeqLen", ".data.seqLen"),
    _rule(
        "self.model.architecture != 'hybrid' || !has(self.model.hybridLocalWindow) "
        f"|| self.model.hybridLocalWindow == {_default(ModelConfig, 'hybrid_local_window')} "
        "|| self.model.hybridLocalWindow <= self.data.seqLen",
        "hybridLocalWindow exceeds data.seqLen: a window longer than the sequence is full attention",
        ".model.hybridLocalWindow",
    ),
    _rule(
        "self.training.device != 'cuda' || self.resources.auto || !has(self.resources.gpusPerNode) "
        "|| self.resources.gpusPerNode > 0",
        "cuda needs GPUs; resources.gpusPerNode is 0",
        ".training.device",
    ),
    _rule(
        "!has(self.training.metricsPort) || self.training.metricsPort != self.resources.masterPort",
        "metricsPort is resources.masterPort (torchrun's rendezvous port)",
        ".training.metricsPort",
    ),
]
RESOURCES_RULES = [
    _rule(
        "!self.auto || (!has(self.nodes) && !has(self.gpusPerNode))",
        "auto: true chooses the shape; remove nodes and gpusPerNode or set auto: false",
    ),
    _rule(
        "self.auto || !has(self.nprocPerNode) || (has(self.gpusPerNode) ? "
        "(self.gpusPerNode == 0 || self.nprocPerNode <= self.gpusPerNode) : self.nprocPerNode <= 1)",
        "at most one process per GPU (gpusPerNode: 0 runs any number on CPU)",
        ".nprocPerNode",
    ),
]
TOLERATION_RULES = [
    _rule(
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "must be empty when operator is Exists",
        ".value",
    ),
    _rule(
        "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        "must be Exists when key is empty (it matches every taint)",
        ".operator",
    ),
    _rule(
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "is only allowed with effect NoExecute",
        ".tolerationSeconds",
    ),
]
SCHEDULING_RULES = [
    _rule(
        f"has(self.schedulerName) || !has(self.{f})",
        "needs schedulerName: only a gang scheduler reads it",
        f".{f}",
    )
    for f in ("queue", "minAvailable")
]
TRAINING_RULES = [
    _rule(
        f"!has(self.warmupSteps) || self.warmupSteps == {_default(TrainingConfig, 'warmup_steps')} "
        "|| self.warmupSteps <= self.numEpochs * self.stepsPerEpoch",
        "warmupSteps exceeds the run's steps (numEpochs x stepsPerEpoch)",
        ".warmupSteps",
    )
]


#: "A built-in architecture unless model.plugin names the module that registers it" (the pydantic
#: twin is ModelConfig._known_architecture). ``architecture`` has a schema default, so it is set
#: in every stored object; ``!has`` is for the API server's check of ``model``'s own default ({}),
#: which it validates without applying the nested defaults.
ARCHITECTURE_RULE = _rule(
    "has(self.plugin) || !has(self.architecture) || self.architecture in ["
    + ", ".join(f"'{a}'" for a in BUILTIN_ARCHITECTURES)
    + "]",
    f"must be one of {', '.join(BUILTIN_ARCHITECTURES)}, or set model.plugin to the Python module "
    "that registers it",
    ".architecture",
)


def _family_rules() -> list[dict[str, str]]:
    """An option of another family, chosen explicitly (written, not the default), is refused
    (config.FAMILY_OPTIONS; the pydantic twin is api.spec_cross_checks with api.chosen)."""
    rules = []
    for field, families in FAMILY_OPTIONS.items():
        name = to_camel(field)
        allowed = ", ".join(f"'{f}'" for f in families)
        default = ModelConfig.model_fields[field].default
        literal = f"'{default}'" if isinstance(default, str) else repr(default)
        rules.append(
            _rule(
                f"!has(self.{name}) || self.{name} == {literal} || self.architecture in [{allowed}]",
                f"applies to architecture {', '.join(families)} only",
                f".{name}",
            )
        )
    return rules


#: Fields without a schema default, so that CEL's has() means "the user wrote it" (pydantic
#: applies the defaults in the operator and the trainer).
NO_DEFAULT_MODEL_FIELDS = frozenset(to_camel(f) for f in FAMILY_OPTIONS)
NO_DEFAULT_TRAINING_FIELDS = frozenset({"warmupSteps"})
#: Spec sections defaulted to {} so their fields' defaults apply and spec-level rules can read them.
SECTIONS = ("model", "data", "training", "resources", "runPolicy")

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}
#: Keywords that give a node a type (or lead to one); a node with none of them is ``Any``.
_TYPED = ("type", "$ref", "anyOf", "allOf", "oneOf", "enum", "const", "properties")
#: Keywords whose value is data (not a schema node) and is never translated.
_VALUES = {"default", "enum", "examples", "x-kubernetes-validations"}


def _untyped(node: dict[str, Any]) -> bool:
    """``Any`` (``{}``) or ``dict[str, Any]`` (``additionalProperties: true``) in pydantic's schema."""
    if node.get("additionalProperties") is True and "properties" not in node:
        return True
    return not any(k in node for k in _TYPED)


def to_openapi(node: Any, defs: dict[str, Any], path: str = "", *, partial: bool = False) -> Any:
    """Translate a pydantic JSON Schema node into a structural OpenAPI v3 schema node.

    ``partial``: ``node`` holds only the keywords next to an ``anyOf`` (description, default), not a
    whole schema, so its lack of a type means nothing.
    """
    if isinstance(node, list):
        return [to_openapi(n, defs, path) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return to_openapi(merged, defs, path)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"{path}: a union of {len(options)} types is not structural")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        merged = {
            **to_openapi(options[0], defs, path),
            **to_openapi(rest, defs, path, partial=True),
            "nullable": True,
        }
        if merged.get("default", 0) is None:
            del merged["default"]
        return merged
    if not partial and _untyped(node):
        # ``Any`` (a search value, a parameter map): no type, so the API server must keep what it
        # gets rather than prune it. A node with this marker and no type is still structural.
        node = {k: v for k, v in node.items() if k != "additionalProperties"}
        out_any: dict[str, Any] = {k: v for k, v in node.items() if k not in _DROP}
        if node.get("type") == "object" or "additionalProperties" in node:
            out_any["type"] = "object"
        out_any["x-kubernetes-preserve-unknown-fields"] = True
        return out_any
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: to_openapi(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "default" and value is None:
            continue
        elif key == "propertyNames":  # not structural: the map's keys are checked by CEL
            out.setdefault("x-kubernetes-validations", []).append(_key_rule(value))
        elif key == "patternProperties":  # pydantic's form of a key pattern: same, as CEL
            ((pattern, values),) = value.items()
            out["additionalProperties"] = to_openapi(values, defs, f"{path}[*]")
            out.setdefault("x-kubernetes-validations", []).append(_key_rule({"pattern": pattern}))
        elif key in _VALUES:  # data, not schema: copied as is
            out[key] = value
        else:
            out[key] = to_openapi(value, defs, f"{path}.{key}")
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = to_openapi(additional, defs, f"{path}[*]")
    return out


def _key_rule(names: dict[str, Any]) -> dict[str, str]:
    checks = []
    if "maxLength" in names:
        checks.append(f"size(k) <= {names['maxLength']}")
    if "pattern" in names:
        checks.append(f"k.matches(r'{names['pattern']}')")
    return _rule(f"self.all(k, {' && '.join(checks)})", "keys must be label keys")


def _schema(model: type, mode: str) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[attr-defined]
    return to_openapi(raw, raw.get("$defs", {}), path="")


def spec_schema() -> dict[str, Any]:
    schema = _schema(TrainingRunSpec, "validation")
    props = schema["properties"]
    for section in SECTIONS:
        props[section]["default"] = {}
    schema["x-kubernetes-validations"] = SPEC_RULES
    props["resources"]["x-kubernetes-validations"] = RESOURCES_RULES
    props["resources"]["properties"]["tolerations"]["items"]["x-kubernetes-validations"] = TOLERATION_RULES
    policy = props["runPolicy"]["properties"]["schedulingPolicy"]
    policy["x-kubernetes-validations"] = SCHEDULING_RULES
    props["training"]["x-kubernetes-validations"] = TRAINING_RULES
    # The API server knows the built-in names; a plugin's (model.plugin) only the trainer can
    # resolve, after importing the module, so the schema checks its form (pattern) and CEL the rest.
    props["model"]["x-kubernetes-validations"] = [ARCHITECTURE_RULE, *_family_rules()]
    for name in NO_DEFAULT_MODEL_FIELDS:
        props["model"]["properties"][name].pop("default", None)
    for name in MATRIX_FIELDS | NO_DEFAULT_TRAINING_FIELDS:
        props["training"]["properties"][name].pop("default", None)
    return schema


def build_crd() -> dict[str, Any]:
    spec = spec_schema()
    spec["description"] = (
        "A training run: the trainer's model/data/training sections, resources and run policy."
    )
    status = _schema(TrainingRunStatus, "serialization")
    status["description"] = "Written by the kubearch operator."
    return _crd(
        kind=KIND,
        plural=PLURAL,
        singular=SINGULAR,
        short_names=SHORT_NAMES,
        columns=PRINTER_COLUMNS,
        description="One architecture at one size on one GPU shape.",
        spec=spec,
        status=status,
    )


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: tuple[str, ...],
    columns: list[dict[str, Any]],
    description: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    required: list[str] | None = None,
) -> dict[str, Any]:
    """The CustomResourceDefinition around a kind's spec and status schemas (both kinds share it)."""
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if required:
        root["required"] = required
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/name": "kubearch"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": ["kubearch"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


# ------------------------------------------------------------------------------------------------
# ArchitectureSearch
# ------------------------------------------------------------------------------------------------
SEARCH_PRINTER_COLUMNS = [
    {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm.name"},
    {
        "name": "Succeeded",
        "type": "integer",
        "jsonPath": ".status.trialCounts.succeeded",
        "description": "Trials (TrainingRuns) that finished successfully.",
    },
    {
        "name": "Trials",
        "type": "integer",
        "jsonPath": ".status.trialCounts.total",
        "description": "Trials planned or created so far (a configuration's rungs count once each).",
    },
    {"name": "Best", "type": "number", "jsonPath": ".status.bestTrial.objective"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Best-Trial", "type": "string", "jsonPath": ".status.bestTrial.trial", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

#: Cross-field rules of a search parameter (mirrors ``SearchParameter._values_or_range``).
_RANGE = "has(self.min) && has(self.max)"
SEARCH_PARAMETER_RULES = [
    _rule("has(self.min) == has(self.max)", "a range needs both min and max"),
    _rule(f"!({_RANGE}) || self.min < self.max", "must be above min", ".max"),
    _rule(
        "!has(self.log) || !self.log || !has(self.min) || self.min > 0.0", "log: true needs min > 0", ".min"
    ),
    _rule("!has(self.log) || !self.log || !has(self.step)", "log and step exclude each other", ".step"),
    _rule(
        "has(self.min) || (!has(self.step) && !has(self.type) && (!has(self.log) || !self.log))",
        "log, step and type apply to ranges (min/max), not to values",
    ),
    _rule(
        f"!has(self.step) || !({_RANGE}) || self.max <= self.min || self.step <= self.max - self.min",
        "must not be larger than the range (max - min)",
        ".step",
    ),
    _rule(
        f"!has(self.step) || !({_RANGE}) || self.max <= self.min || (self.max - self.min) / self.step "
        f"< {float(MAX_VALUES)}",
        f"makes more than {MAX_VALUES} values of [min, max]; use a larger step",
        ".step",
    ),
    _rule(
        f"!has(self.type) || self.type != 'int' || !({_RANGE}) || (double(int(self.min)) == self.min "
        "&& double(int(self.max)) == self.max && (!has(self.step) || double(int(self.step)) == self.step))",
        "int needs whole numbers for min, max and step",
        ".type",
    ),
]
#: A parameter lists ``values`` or gives ``min`` and ``max``, never both (checked with the rules above).
SEARCH_PARAMETER_ONE_OF = [{"required": ["values"]}, {"required": ["min", "max"]}]
#: Cross-field rules of ``spec.algorithm`` (mirrors ``Algorithm``'s validators).
SEARCH_ALGORITHM_RULES = [
    _rule(
        "!has(self.rungOverrides) || size(self.rungOverrides) == 0 || "
        "(has(self.rungs) && size(self.rungOverrides) == size(self.rungs))",
        "rungOverrides needs one entry per rung (as many entries as rungs)",
        ".rungOverrides",
    ),
    _rule(
        "!has(self.name) || self.name != 'asha' || (has(self.rungs) && size(self.rungs) >= 2)",
        "asha needs at least two rungs (training steps), e.g. rungs: [50, 200]",
        ".rungs",
    ),
    _rule(
        "!has(self.rungs) || self.rungs.isSorted()",
        "rungs must be increasing training steps, e.g. [50, 200]",
        ".rungs",
    ),
    _rule(
        "!has(self.earlyStopping) || !has(self.name) || self.name != 'asha'",
        "applies to grid, random and tpe; asha stops by not promoting",
        ".earlyStopping",
    ),
    _rule(
        "!has(self.earlyStopping) || (has(self.rungs) && (has(self.earlyStopping.startRung) ? "
        "self.earlyStopping.startRung : 0) <= size(self.rungs) - 2)",
        "median stop acts after a rung that has a next one: startRung must be at most "
        "size(rungs) - 2 (so earlyStopping needs at least two rungs)",
        ".earlyStopping.startRung",
    ),
]
SEARCH_BUDGET_RULES = [
    _rule(
        "!has(self.maxTrials) || !has(self.parallelTrials) || self.parallelTrials <= self.maxTrials",
        "exceeds maxTrials: at most maxTrials trials can ever run at once",
        ".parallelTrials",
    ),
]


def _search_spec_rules() -> list[dict[str, str]]:
    """Rules across sections of a search spec (twins in ``ArchitectureSearchSpec._fits_in_one_object``).

    The status keeps a record per trial, so (maxTrials + maxFailedTrials) x rungs is bounded (the
    CEL form of the record budget; the operator also checks the parameters' own sizes). Where the
    CEL rule cannot know a default (a grid's size), it assumes the smallest, so it never refuses
    what the operator accepts.
    """
    budget = "has(self.budget) && has(self.budget.{0}) ? self.budget.{0} : {1}"
    grid = "has(self.algorithm) && has(self.algorithm.name) && self.algorithm.name == 'grid'"
    trials = budget.format("maxTrials", f"({grid} ? 1 : 16)")
    failed = budget.format("maxFailedTrials", Budget.model_fields["max_failed_trials"].default)
    rungs = (
        "has(self.algorithm) && has(self.algorithm.rungs) && size(self.algorithm.rungs) > 0 "
        "? size(self.algorithm.rungs) : 1"
    )
    return [
        _rule(
            f"((({trials}) + ({failed})) * ({rungs})) <= {MAX_CONFIG_RUNGS}",
            f"(maxTrials + maxFailedTrials) x rungs must be at most {MAX_CONFIG_RUNGS}: the status keeps "
            "a record of every trial (two with an OOM retry) and must fit in one object (etcd's 1.5 MiB)",
            ".budget.maxTrials",
        )
    ]


def _objective_rules() -> list[dict[str, str]]:
    known = ", ".join(f"'{m}'" for m in KNOWN_GOALS)
    rules = [
        _rule(
            f"has(self.goal) || !has(self.metric) || self.metric in [{known}]",
            "goal: this metric has no implied direction; set goal to minimize or maximize",
            ".goal",
        )
    ]
    for metric, (lo, hi) in GOAL_VALUE_RANGES.items():
        bounded = hi < NUMBER_LIMIT
        allowed = f"between {lo:g} and {hi:g}" if bounded else f">= {lo:g}"
        check = f"self.goalValue >= {float(lo)}" + (f" && self.goalValue <= {float(hi)}" if bounded else "")
        rules.append(
            _rule(
                f"!has(self.goalValue) || !has(self.metric) || self.metric != '{metric}' || ({check})",
                f"is never reached: {metric} is {allowed}",
                ".goalValue",
            )
        )
    return rules


def search_spec_schema() -> dict[str, Any]:
    """``spec`` of an ArchitectureSearch; ``trialTemplate`` is the TrainingRun spec schema itself."""
    schema = _schema(ArchitectureSearchSpec, "validation")
    props = schema["properties"]
    template = spec_schema()
    template["description"] = props["trialTemplate"].get(
        "description", "The TrainingRun spec every trial starts from."
    )
    props["trialTemplate"] = template
    space = props["searchSpace"]
    # One entry per path: the API server refuses a duplicate path with the path named.
    space["x-kubernetes-list-type"] = "map"
    space["x-kubernetes-list-map-keys"] = ["path"]
    space["items"]["x-kubernetes-validations"] = SEARCH_PARAMETER_RULES
    # values XOR a range. CEL cannot see ``values`` (its items are untyped, so the field has no CEL
    # type); a structural oneOf of required fields can, and the CEL rule above pairs min with max.
    space["items"]["oneOf"] = SEARCH_PARAMETER_ONE_OF
    algorithm = props["algorithm"]
    algorithm["x-kubernetes-validations"] = SEARCH_ALGORITHM_RULES
    # Rungs are distinct training steps (with isSorted() above: strictly increasing).
    algorithm["properties"]["rungs"]["x-kubernetes-list-type"] = "set"
    props["objective"]["x-kubernetes-validations"] = _objective_rules()
    props["budget"]["x-kubernetes-validations"] = SEARCH_BUDGET_RULES
    schema["x-kubernetes-validations"] = _search_spec_rules()
    return schema


def build_search_crd() -> dict[str, Any]:
    """The ArchitectureSearch CRD (``kubectl get asearch``)."""
    spec = search_spec_schema()
    spec["description"] = (
        "A search: trials are TrainingRuns made from trialTemplate with searchSpace's values, "
        "chosen by algorithm within budget and ranked by objective."
    )
    status = _schema(ArchitectureSearchStatus, "serialization")
    status["description"] = "Written by the kubearch operator (or `kubearch search` locally)."
    return _crd(
        kind=SEARCH_KIND,
        plural=SEARCH_PLURAL,
        singular=SEARCH_SINGULAR,
        short_names=SEARCH_SHORT_NAMES,
        columns=SEARCH_PRINTER_COLUMNS,
        description="An architecture search run as child TrainingRuns (trials).",
        spec=spec,
        status=status,
        required=["spec"],
    )


#: ``python -m kubearch_operator.crd [NAME]``: which CRD to print (default: trainingrun).
CRDS = {"trainingrun": build_crd, "architecturesearch": build_search_crd}


def render(name: str = "trainingrun") -> str:
    command = "python -m kubearch_operator.crd" + ("" if name == "trainingrun" else f" {name}")
    header = f"# Generated by `{command}`; do not edit by hand.\n"
    return header + yaml.safe_dump(CRDS[name](), sort_keys=False, width=1000)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "trainingrun"
    if name not in CRDS or len(args) > 1:
        sys.stderr.write(f"usage: python -m kubearch_operator.crd [{'|'.join(CRDS)}]\n")
        return 2
    sys.stdout.write(render(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
