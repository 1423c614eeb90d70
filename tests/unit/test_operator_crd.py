"""The checked-in CRD is what the generator makes of the pydantic models, and it is structural."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from kubearch_operator import crd
from kubearch_trainer.config import BUILTIN_ARCHITECTURES, MODEL_SIZES

CHECKED_IN = Path(__file__).resolve().parents[2] / "manifests" / "crd-trainingrun.yaml"


def schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_matches_the_generator() -> None:
    assert CHECKED_IN.read_text() == crd.render(), (
        "manifests/crd-trainingrun.yaml is stale: run "
        "`python -m kubearch_operator.crd > manifests/crd-trainingrun.yaml`"
    )


def test_cli_prints_the_crd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubearch_operator.crd"], capture_output=True, text=True, check=True
    )
    assert yaml.safe_load(out.stdout)["metadata"]["name"] == "trainingruns.kubearch.dev"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            found += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_schema_is_structural() -> None:
    for path, node in _walk(schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"):
            assert banned not in node, f"{path} still has {banned}"
        assert node.get("additionalProperties", {}) is not False, f"{path}: additionalProperties false"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_enums_bounds_and_defaults_reach_the_api_server() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    model = spec["model"]["properties"]
    assert model["size"]["enum"] == list(MODEL_SIZES) and model["size"]["default"] == "tiny"
    assert model["architecture"]["enum"] == list(BUILTIN_ARCHITECTURES)
    policy = spec["runPolicy"]["properties"]
    assert policy["cleanPodPolicy"]["enum"] == ["None", "Running", "All"]
    assert policy["backoffLimit"] == {
        "default": 3,
        "description": policy["backoffLimit"]["description"],
        "minimum": 0,
        "maximum": 1000,
        "type": "integer",
    }
    assert spec["training"]["properties"]["learningRate"]["exclusiveMinimum"] is True
    # the GPU matrix fills these under auto, so the API server must not default them
    for name in crd.MATRIX_FIELDS:
        assert "default" not in spec["training"]["properties"][name], name
    rules = spec["resources"]["x-kubernetes-validations"]
    assert "auto" in rules[0]["rule"] and "remove nodes" in rules[0]["message"]


def test_names_columns_and_status_subresource() -> None:
    doc = crd.build_crd()
    names = doc["spec"]["names"]
    assert (doc["spec"]["group"], names["kind"], names["shortNames"]) == (
        "kubearch.dev",
        "TrainingRun",
        ["tr"],
    )
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Architecture", "Size", "GPUs", "Phase", "Step", "Loss", "Age"]
    status = schema()["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [
        "Pending",
        "Created",
        "Running",
        "Restarting",
        "Succeeded",
        "Failed",
        "Suspended",
    ]
    assert {
        "conditions",
        "replicaStatuses",
        "chosenShape",
        "progress",
        "restartCount",
        "observedGeneration",
    } <= set(status)


def _strings_and_numbers(node: Any, path: str = "spec") -> list[tuple[str, dict]]:
    out = []
    if isinstance(node, dict):
        if node.get("type") in ("string", "integer", "number") and "enum" not in node:
            out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _strings_and_numbers(value, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out += _strings_and_numbers(node[key], f"{path}[{key}]")
    return out


def test_every_string_and_number_of_the_spec_is_bounded() -> None:
    """Issue 9: a 1 MB string or weightDecay 1e308 passed the schema. Every string now has a
    maxLength and every number a maximum; lists and maps a size limit (also CEL's cost bound)."""
    spec = schema()["properties"]["spec"]
    leaves = _strings_and_numbers(spec)
    assert len(leaves) > 60
    for path, node in leaves:
        bound = "maxLength" if node["type"] == "string" else "maximum"
        assert bound in node, f"{path} has no {bound}"
    for path, node in _walk(spec):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


def test_family_options_and_warmup_have_no_schema_default() -> None:
    """CEL's has() must mean "the user wrote it" for the cross-family rules."""
    spec = schema()["properties"]["spec"]["properties"]
    for name in crd.NO_DEFAULT_MODEL_FIELDS:
        assert "default" not in spec["model"]["properties"][name], name
    assert "default" not in spec["training"]["properties"]["warmupSteps"]
    for section in crd.SECTIONS:
        assert spec[section]["default"] == {}, section  # nested defaults then apply
