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
from kubearch_trainer.config import BUILTIN_ARCHITECTURES

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

#: Cross-field rules the API server checks itself (CEL), mirrored by the pydantic validators.
RESOURCES_RULES = [
    {
        "rule": "!self.auto || (!has(self.nodes) && !has(self.gpusPerNode))",
        "message": "auto: true chooses the shape; remove nodes and gpusPerNode or set auto: false",
    }
]

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
        else:
            out[key] = to_openapi(value, defs, f"{path}.{key}")
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = to_openapi(additional, defs, f"{path}[*]")
    return out


def _schema(model: type, mode: str) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[attr-defined]
    return to_openapi(raw, raw.get("$defs", {}), path="")


def spec_schema() -> dict[str, Any]:
    schema = _schema(TrainingRunSpec, "validation")
    resources = schema["properties"]["resources"]
    resources["x-kubernetes-validations"] = RESOURCES_RULES
    # The trainer checks plugin names at run time; the API server knows the built-in ones.
    schema["properties"]["model"]["properties"]["architecture"]["enum"] = list(BUILTIN_ARCHITECTURES)
    for name in MATRIX_FIELDS:
        schema["properties"]["training"]["properties"][name].pop("default", None)
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
