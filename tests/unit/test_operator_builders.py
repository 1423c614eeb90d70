"""Pure builders: spec -> Pods, Service, ConfigMap, PodGroup (no cluster needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from kubearch_operator import builders as b
from kubearch_operator.__main__ import build_args
from kubearch_operator.api import check_run_name, parse_spec
from kubearch_trainer.config import ConfigError, load_config

NS, UID = "research", "0000-uid"


def group(spec_dict: dict, run: str = "demo", attempt: int = 0) -> tuple[list[dict], b.RunPlan]:
    spec = parse_spec(spec_dict)
    plan = b.plan_run(spec)
    return b.build_pods(run, NS, UID, spec, plan.shape, attempt), plan


def env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_one_pod_per_node_with_deterministic_names_and_labels() -> None:
    pods, _ = group({"resources": {"nodes": 3, "gpusPerNode": 2}}, attempt=2)
    assert [p["metadata"]["name"] for p in pods] == ["demo-master-0", "demo-worker-1", "demo-worker-2"]
    for i, pod in enumerate(pods):
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubearch" and labels["kubearch.dev/run"] == "demo"
        assert labels["kubearch.dev/role"] == ("master" if i == 0 else "worker")
        assert labels["kubearch.dev/replica-index"] == str(i) and labels["kubearch.dev/attempt"] == "2"
        (owner,) = pod["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "kubearch.dev/v1alpha1",
            "kind": "TrainingRun",
            "name": "demo",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_env_has_torchruns_meanings_and_agrees_across_pods() -> None:
    pods, plan = group({"resources": {"nodes": 2, "gpusPerNode": 4}})
    envs = [env(p) for p in pods]
    assert {e["WORLD_SIZE"] for e in envs} == {"8"}  # total processes, the same in every pod
    assert [e["NODE_RANK"] for e in envs] == ["0", "1"]
    for e in envs:
        assert "RANK" not in e and "LOCAL_RANK" not in e  # torchrun sets them per process
        assert e["NNODES"] == e["PET_NNODES"] == "2" and e["NPROC_PER_NODE"] == e["PET_NPROC_PER_NODE"] == "4"
        assert e["PET_NODE_RANK"] == e["NODE_RANK"]
        assert e["MASTER_ADDR"] == e["PET_MASTER_ADDR"] == "demo-master-0.demo.research.svc"
        assert e["MASTER_PORT"] == "29500" and e["KUBEARCH_TERMINATION_LOG"] == "/dev/termination-log"
    assert int(envs[0]["WORLD_SIZE"]) == plan.shape.world_size


def test_torchrun_command_line() -> None:
    pods, _ = group({"resources": {"nodes": 2, "gpusPerNode": 4}})
    worker = pods[1]["spec"]["containers"][0]
    assert worker["command"] == ["torchrun"]
    assert worker["args"] == [
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=1",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",
        "-m",
        "kubearch_trainer",
        "--config",
        "/etc/kubearch/config.yaml",
    ]
    # every $(VAR) the args use is defined in the container's env (else Kubernetes leaves it literal)
    assert {"MASTER_ADDR", "MASTER_PORT"} <= set(env(pods[1]))


def test_a_plugin_is_passed_to_every_pods_trainer_and_kept_in_its_config() -> None:
    spec = {"model": {"architecture": "bigram", "plugin": "my_pkg.bigram"}, "resources": {"nodes": 2}}
    pods, plan = group(spec)
    for pod in pods:
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("kubearch_trainer") + 1 :] == [
            "--config",
            "/etc/kubearch/config.yaml",
            "--plugin",
            "my_pkg.bigram",
        ]
    cm = b.build_configmap("demo", NS, UID, plan)
    model = yaml.safe_load(cm["data"]["config.yaml"])["model"]
    assert (model["plugin"], model["architecture"]) == ("my_pkg.bigram", "bigram")


def test_no_plugin_flag_without_a_plugin() -> None:
    pods, _ = group({"model": {"architecture": "moe"}})
    assert "--plugin" not in pods[0]["spec"]["containers"][0]["args"]


def test_gpu_limits_shm_volumes_and_termination_message() -> None:
    pods, _ = group(
        {"resources": {"nodes": 1, "gpusPerNode": 4, "cpu": "8", "memory": "64Gi", "shmSize": "8Gi"}}
    )
    spec = pods[0]["spec"]
    c = spec["containers"][0]
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "4"},
    }
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["config"]["configMap"]["name"] == "demo-config"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {
        "/etc/kubearch",
        "/dev/shm",
        "/checkpoints",
        "/scratch",
    }
    assert (
        spec["restartPolicy"] == "Never"
        and spec["hostname"] == "demo-master-0"
        and spec["subdomain"] == "demo"
    )
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_cpu_run_asks_for_no_gpu() -> None:
    pods, plan = group({"resources": {"nodes": 1, "gpusPerNode": 0, "nprocPerNode": 2}})
    c = pods[0]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    assert "tolerations" not in pods[0]["spec"]
    assert "--nproc-per-node=2" in c["args"] and plan.shape.world_size == 2


def test_node_selector_gpu_type_and_tolerations() -> None:
    spec = {
        "resources": {
            "gpusPerNode": 1,
            "gpuType": "NVIDIA-A100-SXM4-80GB",
            "nodeSelector": {"pool": "train"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        }
    }
    pod = group(spec)[0][0]["spec"]
    assert pod["nodeSelector"] == {"pool": "train", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0] == {
        "key": "dedicated",
        "operator": "Equal",
        "value": "ml",
        "effect": "NoSchedule",
    }


def test_every_pod_waits_for_the_masters_dns_before_torchrun() -> None:
    pods, _ = group({"resources": {"nodes": 2}})
    for pod in pods:
        (init,) = pod["spec"]["initContainers"]
        assert init["name"] == "wait-for-master" and init["env"][0]["name"] == "MASTER_ADDR"
    script = pods[1]["spec"]["initContainers"][0]["command"][2]
    ok = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "MASTER_ADDR": "localhost"}, timeout=30
    )
    assert ok.returncode == 0
    env_ = {**os.environ, "MASTER_ADDR": "no-such-master.invalid", "KUBEARCH_DNS_TIMEOUT": "0"}
    bad = subprocess.run([sys.executable, "-c", script], env=env_, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "did not resolve" in bad.stderr


def test_headless_service_publishes_not_ready_pods() -> None:
    spec = parse_spec({})
    svc = b.build_service("demo", NS, UID, spec)
    assert svc["metadata"]["name"] == "demo" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "kubearch", "kubearch.dev/run": "demo"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == UID


@pytest.mark.parametrize("resume", [False, True])
def test_configmap_is_a_valid_trainer_config(resume: bool) -> None:
    spec = parse_spec({"model": {"architecture": "moe", "numExperts": 4}, "resources": {"auto": True}})
    cm = b.build_configmap("demo", NS, UID, b.plan_run(spec), resume=resume)
    data = yaml.safe_load(cm["data"]["config.yaml"])
    cfg = load_config(data)  # what the trainer does with --config
    assert cfg.model.architecture == "moe" and cfg.model.num_experts == 4
    assert cfg.training.output_dir == "/checkpoints/demo" and cfg.training.resume is resume
    assert cfg.training.batch_size == 128 and cfg.training.use_amp  # from the GPU matrix


def test_gang_scheduling() -> None:
    spec = parse_spec(
        {
            "resources": {"nodes": 2},
            "runPolicy": {
                "schedulingPolicy": {"schedulerName": "volcano", "queue": "q", "priorityClass": "high"}
            },
        }
    )
    shape = b.plan_run(spec).shape
    pod = b.build_pod("demo", NS, UID, spec, shape, 1)
    assert pod["spec"]["schedulerName"] == "volcano" and pod["spec"]["priorityClassName"] == "high"
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "demo"
    assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "demo"
    pg = b.build_pod_group("demo", NS, UID, spec, shape)
    assert pg["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert pg["spec"] == {"minMember": 2, "queue": "q", "priorityClassName": "high"}
    plugins = parse_spec(
        {
            "runPolicy": {
                "schedulingPolicy": {"schedulerName": "scheduler-plugins-scheduler", "minAvailable": 1}
            }
        }
    )
    pg2 = b.build_pod_group("demo", NS, UID, plugins, b.plan_run(plugins).shape)
    assert pg2["apiVersion"] == "scheduling.x-k8s.io/v1alpha1" and pg2["spec"] == {"minMember": 1}
    assert b.build_pod_group("demo", NS, UID, parse_spec({}), shape) is None


def test_priority_class_alone_sets_the_pods_priority_and_makes_no_pod_group() -> None:
    """Defect 5: {priorityClass: x} alone made a scheduler-plugins PodGroup (and pod-group labels)
    while the pods kept the default scheduler, which ignores PodGroups. A PodGroup is made only for
    a named (gang) scheduler; priorityClass alone is the pods' priorityClassName."""
    spec = parse_spec(
        {"resources": {"nodes": 2}, "runPolicy": {"schedulingPolicy": {"priorityClass": "high"}}}
    )
    shape = b.plan_run(spec).shape
    assert b.build_pod_group("demo", NS, UID, spec, shape) is None
    for pod in b.build_pods("demo", NS, UID, spec, shape):
        assert pod["spec"]["priorityClassName"] == "high" and "schedulerName" not in pod["spec"]
        assert "scheduling.x-k8s.io/pod-group" not in pod["metadata"]["labels"]
        assert "scheduling.k8s.io/group-name" not in pod["metadata"].get("annotations", {})


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"spec\.model\.size: 'huge' is not one of 'tiny', 'small'"):
        parse_spec({"model": {"size": "huge"}})
    with pytest.raises(ConfigError, match="remove nodes"):
        parse_spec({"resources": {"auto": True, "nodes": 2}})
    with pytest.raises(ConfigError, match=r"spec\.runPolicy\.cleanPodPolicy"):
        parse_spec({"runPolicy": {"cleanPodPolicy": "Sometimes"}})
    # camelCase paths as in the CRD (issue 9: the operator said data.seq_len)
    with pytest.raises(ConfigError, match=r"^spec\.data\.seqLen: 8192 exceeds model\.maxSeqLen \(1024\)$"):
        parse_spec({"data": {"seqLen": 8192}, "model": {"maxSeqLen": 1024}})
    with pytest.raises(ConfigError, match=r"^spec\.resources\.nodes: auto: true chooses the shape"):
        parse_spec({"resources": {"auto": True, "nodes": 2}})


def test_auto_with_more_processes_than_the_chosen_gpus_is_refused() -> None:
    spec = parse_spec({"resources": {"auto": True, "nprocPerNode": 4}})  # the matrix picks 1 GPU
    with pytest.raises(ConfigError, match=r"spec\.resources\.nprocPerNode: 4 processes for the 1 GPU"):
        b.plan_run(spec)


@pytest.mark.parametrize("name", ["Demo", "1run", "a" * 53, "has.dot"])
def test_run_names_that_cannot_name_pods_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="DNS-1035"):
        check_run_name(name)


def test_main_defaults_to_all_namespaces_and_liveness() -> None:
    assert build_args([]) == [
        "run",
        "-m",
        "kubearch_operator.handlers",
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
    ]
    assert "--all-namespaces" not in build_args(["--namespace=ml", "--liveness=http://x:1/h"])


def test_status_writes_skip_no_op_patches() -> None:
    from kubearch_operator.handlers import _prune

    stored = {"phase": "Running", "message": "", "restartCount": 0, "metrics": {}, "conditions": []}
    new = {"phase": "Running", "message": "", "restartCount": 0, "startTime": None, "progress": None}
    assert _prune(new) == _prune(stored)  # nothing to write
    assert _prune({**new, "restartCount": 1}) != _prune(stored)


def test_pods_run_restricted_with_writable_volumes_only() -> None:
    """Issue 9: non-root, no privilege escalation, seccomp RuntimeDefault, read-only root
    filesystem; everything the trainer writes goes to a volume (output dir under /checkpoints,
    TMPDIR/HOME/caches under /scratch, /dev/shm)."""
    pods, plan = group({"resources": {"nodes": 2, "checkpointClaim": "ckpt"}})
    for pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0 and spec["securityContext"]["fsGroup"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in [*spec["initContainers"], *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
        (trainer,) = spec["containers"]
        writable = {m["mountPath"] for m in trainer["volumeMounts"] if not m.get("readOnly")}
        assert all(
            "emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]]
            for m in trainer["volumeMounts"]
            if not m.get("readOnly")
        )
        e = env(pod)
        for var in ("TMPDIR", "HOME", "XDG_CACHE_HOME"):
            assert any(e[var].startswith(w) for w in writable), (var, e[var])
        cm = b.build_configmap("demo", NS, UID, plan)
        output_dir = yaml.safe_load(cm["data"]["config.yaml"])["training"]["outputDir"]
        assert any(output_dir.startswith(w + "/") for w in writable)
