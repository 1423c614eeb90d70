"""spec.podTemplate: the cluster user's additions are merged into every pod; the contract stays."""

from __future__ import annotations

from typing import Any

import pytest
from kubearch_operator import builders as b
from kubearch_operator.api import parse_spec
from kubearch_operator.pod_template import PodTemplateError
from kubearch_trainer.config import ConfigError

NS, UID = "team-a", "uid-1"


def pods(template: dict[str, Any] | None, **resources: Any) -> list[dict]:
    spec_dict: dict[str, Any] = {
        "resources": {"nodes": 2, "gpusPerNode": 0, **resources},
        "training": {"device": "cpu"},
    }
    if template is not None:
        spec_dict["podTemplate"] = template
    spec = parse_spec(spec_dict)
    plan = b.plan_run(spec)
    return b.build_pods("demo", NS, UID, spec, plan.shape)


def trainer(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")


def env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


DATA_PVC_TEMPLATE = {
    "metadata": {"labels": {"team": "a"}, "annotations": {"cost-center": "42"}},
    "spec": {
        "serviceAccountName": "trainer-sa",
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": "research",
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "securityContext": {"fsGroupChangePolicy": "OnRootMismatch"},
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "corpus", "readOnly": True}}],
        "containers": [
            {
                "name": "trainer",
                "env": [{"name": "HF_HOME", "value": "/data/cache"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                "securityContext": {"privileged": False},
            }
        ],
        "initContainers": [
            {"name": "wait-for-master", "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}}
        ],
    },
}


def test_every_pod_gets_the_users_fields_next_to_kubearchs_own() -> None:
    group = pods(DATA_PVC_TEMPLATE)
    assert len(group) == 2
    for index, pod in enumerate(group):
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["team"] == "a" and meta["labels"]["kubearch.dev/run"] == "demo"
        assert meta["annotations"] == {"cost-center": "42"}
        assert spec["serviceAccountName"] == "trainer-sa"
        assert spec["imagePullSecrets"] == [{"name": "registry"}]
        assert spec["priorityClassName"] == "research"
        assert spec["affinity"]["nodeAffinity"] == {"preferredDuringSchedulingIgnoredDuringExecution": []}
        # Added next to kubearch's restricted settings, which stay.
        assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        assert spec["securityContext"]["runAsNonRoot"] is True
        names = [v["name"] for v in spec["volumes"]]
        assert names[-1] == "data" and {"config", "dshm", "checkpoints"} <= set(names[:-1])
        container = trainer(pod)
        paths = [m["mountPath"] for m in container["volumeMounts"]]
        assert paths[-1] == "/data" and {"/etc/kubearch", "/dev/shm", "/checkpoints"} <= set(paths[:-1])
        values = env(container)
        assert values["HF_HOME"] == "/data/cache"
        assert values["NODE_RANK"] == str(index) and values["WORLD_SIZE"] == "2"  # the contract is intact
        assert container["command"] == ["torchrun"]
        assert container["securityContext"]["privileged"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        wait = spec["initContainers"][0]
        assert wait["resources"] == {"requests": {"cpu": "10m", "memory": "32Mi"}}


def test_rank_is_left_to_torchrun_per_process_and_pods_carry_node_rank() -> None:
    """The RANK decision: a pod holds nproc processes, so only torchrun can give each its RANK."""
    for index, pod in enumerate(pods(None, nprocPerNode=2)):
        values = env(trainer(pod))
        assert "RANK" not in values and "LOCAL_RANK" not in values
        assert values["NODE_RANK"] == values["PET_NODE_RANK"] == str(index)
        assert values["WORLD_SIZE"] == "4" and values["NPROC_PER_NODE"] == "2"


@pytest.mark.parametrize(
    ("template", "field"),
    [
        (
            {"spec": {"containers": [{"name": "trainer", "env": [{"name": "MASTER_ADDR", "value": "x"}]}]}},
            "spec.podTemplate.spec.containers[trainer].env[MASTER_ADDR]",
        ),
        (
            {"spec": {"containers": [{"name": "trainer", "env": [{"name": "WORLD_SIZE", "value": "1"}]}]}},
            "spec.podTemplate.spec.containers[trainer].env[WORLD_SIZE]",
        ),
        (
            {"spec": {"volumes": [{"name": "config", "emptyDir": {}}]}},
            "spec.podTemplate.spec.volumes[config]",
        ),
        (
            {"spec": {"volumes": [{"name": "x", "emptyDir": {}}], "containers": [
                {"name": "trainer", "volumeMounts": [{"name": "x", "mountPath": "/checkpoints"}]}]}},
            "spec.podTemplate.spec.containers[trainer].volumeMounts[/checkpoints]",
        ),
        (
            {"metadata": {"labels": {"kubearch.dev/run": "other"}}},
            "spec.podTemplate.metadata.labels.kubearch.dev/run",
        ),
        (
            {"spec": {"containers": [{"name": "trainer", "resources": {"limits": {"memory": "1Gi"}}}]}},
            "spec.podTemplate.spec.containers[trainer].resources",
        ),
        ({"spec": {"containers": [{"name": "sidecar"}]}}, "spec.podTemplate.spec.containers[sidecar]"),
        (
            {"spec": {"containers": [
                {"name": "trainer", "securityContext": {"readOnlyRootFilesystem": False}}]}},
            "spec.podTemplate.spec.containers[trainer].securityContext.readOnlyRootFilesystem",
        ),
        (
            {"spec": {"securityContext": {"runAsUser": 0}}},
            "spec.podTemplate.spec.securityContext.runAsUser",
        ),
        (
            {"spec": {"containers": [
                {"name": "trainer", "volumeMounts": [{"name": "nope", "mountPath": "/d"}]}]}},
            "spec.podTemplate.spec.containers[trainer].volumeMounts[/d]",
        ),
    ],
)  # fmt: skip
def test_an_override_that_breaks_the_contract_is_refused_with_the_field_named(template, field) -> None:
    with pytest.raises(PodTemplateError) as err:
        pods(template)
    assert str(err.value).startswith(field + ":"), str(err.value)
    assert isinstance(err.value, ConfigError)  # the operator reports it as InvalidSpec, creating no pod


def test_the_trainer_command_is_not_an_override_field() -> None:
    with pytest.raises(ConfigError) as err:
        pods({"spec": {"containers": [{"name": "trainer", "command": ["bash"]}]}})
    assert "spec.podTemplate.spec.containers[0].command: unknown field" in str(err.value)


def test_priority_class_set_twice_differently_is_refused() -> None:
    spec_dict = {
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "training": {"device": "cpu"},
        "runPolicy": {"schedulingPolicy": {"priorityClass": "high"}},
        "podTemplate": {"spec": {"priorityClassName": "low"}},
    }
    spec = parse_spec(spec_dict)
    with pytest.raises(PodTemplateError, match=r"^spec.podTemplate.spec.priorityClassName: already 'high'"):
        b.build_pods("demo", NS, UID, spec, b.plan_run(spec).shape)


@pytest.mark.parametrize("resource", ["amd.com/gpu", "nvidia.com/mig-1g.10gb"])
def test_the_gpu_resource_name_replaces_nvidia_gpu_in_limits_and_tolerations(resource: str) -> None:
    spec = parse_spec(
        {"resources": {"nodes": 1, "gpusPerNode": 2}, "podTemplate": {"gpuResourceName": resource}}
    )
    pod = b.build_pods("demo", NS, UID, spec, b.plan_run(spec).shape)[0]
    limits = trainer(pod)["resources"]["limits"]
    assert limits[resource] == "2" and "nvidia.com/gpu" not in limits
    assert [t["key"] for t in pod["spec"]["tolerations"]] == [resource]


def test_a_malformed_gpu_resource_name_is_refused_by_the_schema() -> None:
    with pytest.raises(ConfigError, match=r"spec.podTemplate.gpuResourceName"):
        parse_spec({"podTemplate": {"gpuResourceName": "GPU"}})


def test_the_data_pvc_example_mounts_its_claim_in_every_trainer() -> None:
    from pathlib import Path

    import yaml

    example = Path(__file__).resolve().parents[2] / "examples" / "trainingrun-data-pvc.yaml"
    spec = parse_spec(yaml.safe_load(example.read_text())["spec"])
    for pod in b.build_pods("dense-own-text", NS, UID, spec, b.plan_run(spec).shape):
        data = next(v for v in pod["spec"]["volumes"] if v["name"] == "data")
        assert data["persistentVolumeClaim"]["claimName"] == "corpus"
        mount = next(m for m in trainer(pod)["volumeMounts"] if m["name"] == "data")
        assert spec.data.path is not None and spec.data.path.startswith(mount["mountPath"] + "/")
