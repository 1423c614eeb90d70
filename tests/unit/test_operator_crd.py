"""The checked-in CRD is what the generator makes of the pydantic models, and it is structural."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubearch_operator import crd
from kubearch_trainer.config import BUILTIN_ARCHITECTURES, MODEL_SIZES

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "manifests" / "crd-trainingrun.yaml"
GENERATED = {"trainingrun": "crd-trainingrun.yaml", "architecturesearch": "crd-architecturesearch.yaml"}


def schema(build: Any = crd.build_crd) -> dict[str, Any]:
    return build()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_checked_in_crds_match_the_generator(name: str) -> None:
    for where in (REPO / "manifests", REPO / "charts" / "kubearch" / "crds"):
        assert (where / GENERATED[name]).read_text() == crd.render(name), (
            f"{where / GENERATED[name]} is stale: run `make crds`"
        )


@pytest.mark.parametrize(
    ("args", "crd_name"),
    [([], "trainingruns.kubearch.dev"), (["architecturesearch"], "architecturesearches.kubearch.dev")],
)
def test_cli_prints_the_crd(args: list[str], crd_name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubearch_operator.crd", *args], capture_output=True, text=True, check=True
    )
    assert yaml.safe_load(out.stdout)["metadata"]["name"] == crd_name


def test_cli_refuses_an_unknown_crd_name() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kubearch_operator.crd", "experiment"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "trainingrun|architecturesearch" in proc.stderr


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


@pytest.mark.parametrize("build", [crd.build_crd, crd.build_search_crd], ids=["trainingrun", "search"])
def test_schema_is_structural(build: Any) -> None:
    for path, node in _walk(schema(build)):
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        for banned in ("$ref", "anyOf", "allOf", "$defs", "title", "const"):
            assert banned not in node, f"{path} still has {banned}"
        # oneOf only as a value validation over fields the node declares (structural rule)
        for branch in node.get("oneOf", []):
            assert set(branch) == {"required"} and set(branch["required"]) <= set(node["properties"]), path
        assert node.get("additionalProperties", {}) is not False, f"{path}: additionalProperties false"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_enums_bounds_and_defaults_reach_the_api_server() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    model = spec["model"]["properties"]
    assert model["size"]["enum"] == list(MODEL_SIZES) and model["size"]["default"] == "tiny"
    # no enum: a plugin's name is resolved by the trainer; the schema checks the form, CEL the rest
    assert "enum" not in model["architecture"] and model["architecture"]["maxLength"] == 63
    assert all(re.fullmatch(model["architecture"]["pattern"], a) for a in BUILTIN_ARCHITECTURES)
    assert model["plugin"]["maxLength"] == 200 and "plugin" not in spec["model"].get("required", [])
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


@pytest.mark.parametrize("build", [crd.build_crd, crd.build_search_crd], ids=["trainingrun", "search"])
def test_every_string_and_number_of_the_spec_is_bounded(build: Any) -> None:
    """Issue 9: a 1 MB string or weightDecay 1e308 passed the schema. Every string now has a
    maxLength and every number a maximum; lists and maps a size limit (also CEL's cost bound).
    The search's own fields too (min/max/step, goalValue, rungs, gpuMemory), not only its template."""
    spec = schema(build)["properties"]["spec"]
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


# ------------------------------------------------------------------------------------------------
# ArchitectureSearch
# ------------------------------------------------------------------------------------------------
def search_props() -> dict[str, Any]:
    return schema(crd.build_search_crd)["properties"]


def test_untyped_values_are_kept_not_pruned() -> None:
    """``Any`` nodes must carry preserve-unknown-fields, or the API server prunes them to nothing."""
    spec = search_props()["spec"]["properties"]
    values = spec["searchSpace"]["items"]["properties"]["values"]
    assert values["type"] == "array" and values["items"] == {"x-kubernetes-preserve-unknown-fields": True}
    overrides = spec["algorithm"]["properties"]["rungOverrides"]["items"]
    assert overrides == {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "maxProperties": 32}
    status = search_props()["status"]["properties"]
    assert status["algorithmState"]["x-kubernetes-preserve-unknown-fields"] is True
    trial = status["trials"]["items"]["properties"]
    assert trial["parameters"]["x-kubernetes-preserve-unknown-fields"] is True
    assert trial["metrics"]["additionalProperties"] == {"type": "number"}  # typed maps stay typed


def test_untyped_translation_leaves_data_keywords_alone() -> None:
    node = {"type": "object", "properties": {"x": {"default": {}, "enum": [{}], "type": "object"}}}
    assert crd.to_openapi(node, {}) == node
    assert crd.to_openapi({"description": "anything"}, {}) == {
        "description": "anything",
        "x-kubernetes-preserve-unknown-fields": True,
    }


def test_trial_template_is_the_trainingrun_spec_schema() -> None:
    template = dict(search_props()["spec"]["properties"]["trialTemplate"])
    run_spec = dict(schema()["properties"]["spec"])
    for doc in (template, run_spec):
        doc.pop("description")
    assert template == run_spec  # enums, CEL rules and the GPU matrix's missing defaults included


def test_search_names_columns_and_status_subresource() -> None:
    doc = crd.build_search_crd()
    names = doc["spec"]["names"]
    assert (doc["metadata"]["name"], names["kind"], names["shortNames"]) == (
        "architecturesearches.kubearch.dev",
        "ArchitectureSearch",
        ["asearch", "asr"],
    )
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Algorithm"] == ".spec.algorithm.name"
    assert columns["Best"] == ".status.bestTrial.objective" and columns["Phase"] == ".status.phase"
    assert columns["Succeeded"] == ".status.trialCounts.succeeded"
    assert columns["Trials"] == ".status.trialCounts.total"
    status = search_props()["status"]["properties"]
    for path in (c["jsonPath"] for c in version["additionalPrinterColumns"]):
        head, _, rest = path.lstrip(".").partition(".")
        if head == "status":  # every column points at a field the status schema has
            node = {"properties": status}
            for part in rest.split("."):
                node = node["properties"][part]


def test_search_cross_field_rules_are_cel() -> None:
    spec = search_props()["spec"]["properties"]
    space = spec["searchSpace"]
    assert space["x-kubernetes-list-type"] == "map" and space["x-kubernetes-list-map-keys"] == ["path"]
    messages = [r["message"] for r in space["items"]["x-kubernetes-validations"]]
    assert "a range needs both min and max" in messages
    assert space["items"]["oneOf"] == [{"required": ["values"]}, {"required": ["min", "max"]}]
    algorithm = spec["algorithm"]
    rules = {r["message"]: r for r in algorithm["x-kubernetes-validations"]}
    asha = next(r for m, r in rules.items() if m.startswith("asha needs"))
    assert asha["fieldPath"] == ".rungs" and "size(self.rungs) >= 2" in asha["rule"]
    assert any("size(self.rungOverrides) == size(self.rungs)" in r["rule"] for r in rules.values())
    assert algorithm["properties"]["rungs"]["x-kubernetes-list-type"] == "set"
    assert algorithm["properties"]["name"]["enum"] == ["grid", "random", "asha", "tpe"]


def test_an_unknown_architecture_is_refused_by_cel_unless_a_plugin_names_its_module() -> None:
    """The enum became a CEL rule on spec.model naming spec.model.architecture; the API server
    evaluates it (tests/integration/test_bad_input_api.py runs the bad-input table against it)."""
    model = schema()["properties"]["spec"]["properties"]["model"]
    (rule,) = [r for r in model["x-kubernetes-validations"] if r.get("fieldPath") == ".architecture"]
    assert rule["rule"].startswith("has(self.plugin) || !has(self.architecture) || self.architecture in [")
    assert all(f"'{a}'" in rule["rule"] and a in rule["message"] for a in BUILTIN_ARCHITECTURES)
    assert "model.plugin" in rule["message"]
    # the family-option rules still read self.architecture, which keeps its schema default
    assert model["properties"]["architecture"]["default"] == "dense"
    assert sum("self.architecture in" in r["rule"] for r in model["x-kubernetes-validations"]) > 10
