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
