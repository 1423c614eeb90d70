"""Generate the TrainingRun CRD from the pydantic models: ``python -m kubearch_operator.crd``.

Why generated: the CRD's schema, the operator's validation and the trainer's config are then the
same classes, and ``tests/unit/test_operator_crd.py`` fails when the checked-in
``manifests/crd-trainingrun.yaml`` drifts from them.

Kubernetes wants a *structural* OpenAPI v3 schema, which pydantic's JSON Schema is not quite:
``$ref``s are inlined, ``Optional[X]`` (``anyOf: [X, null]``) becomes ``X`` + ``nullable``,
``additionalProperties: false`` is dropped (the API server prunes unknown fields and ``kubectl``'s
strict field validation refuses them), JSON-Schema-2020 exclusive bounds become OpenAPI 3.0's
boolean form, and titles go. Enums, minimum/maximum, patterns and defaults stay, so ``kubectl
apply`` itself refuses ``size: huge``. Three training fields get no default on purpose: the GPU
matrix fills them when the user leaves them out (see ``builders.plan_run``).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from kubearch_trainer.config import BUILTIN_ARCHITECTURES, FAMILY_OPTIONS
from pydantic.alias_generators import to_camel

from .api import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, TrainingRunSpec, TrainingRunStatus

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
        "!has(self.model.hybridLocalWindow) || self.model.hybridLocalWindow <= self.data.seqLen",
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
        "!has(self.warmupSteps) || self.warmupSteps <= self.numEpochs * self.stepsPerEpoch",
        "warmupSteps exceeds the run's steps (numEpochs x stepsPerEpoch)",
        ".warmupSteps",
    )
]


def _family_rules() -> list[dict[str, str]]:
    """An option of another family, written explicitly, is refused (config.FAMILY_OPTIONS)."""
    rules = []
    for field, families in FAMILY_OPTIONS.items():
        name = to_camel(field)
        allowed = ", ".join(f"'{f}'" for f in families)
        rules.append(
            _rule(
                f"!has(self.{name}) || self.architecture in [{allowed}]",
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


def to_openapi(node: Any, defs: dict[str, Any], path: str = "") -> Any:
    """Translate a pydantic JSON Schema node into a structural OpenAPI v3 schema node."""
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
        merged = {**to_openapi(options[0], defs, path), **to_openapi(rest, defs, path), "nullable": True}
        if merged.get("default", 0) is None:
            del merged["default"]
        return merged
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
    props["model"]["x-kubernetes-validations"] = _family_rules()
    # The trainer checks plugin names at run time; the API server knows the built-in ones.
    props["model"]["properties"]["architecture"]["enum"] = list(BUILTIN_ARCHITECTURES)
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
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "kubearch"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["kubearch"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "One architecture at one size on one GPU shape.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m kubearch_operator.crd`; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=1000)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
