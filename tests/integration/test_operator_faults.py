"""The operator under faults, as a real process against a real kube-apiserver (issue 9).

Each test reproduces one failure an outside review found: an object the API server refuses, a
child left by an earlier run of the same name, a deleted child, a deletion while the operator is
down, a spec too large for kopf's annotations. No test sleeps in place of a condition. SIGKILLs:
test_operator_kills.py; API-server and etcd outages, mass deletion: test_operator_outages.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from controlplane import wait_for
from kubearch_operator.api import LABEL_VALUE_MAX, MAX_NODE_SELECTOR
from kubernetes.client.rest import ApiException
from test_operator_integration import (
    GROUP,
    PLURAL,
    VERSION,
    cond,
    create_run,
    gone,
    pods,
    set_pod,
    spec,
    wait_phase,
    wait_pods,
)


def uid_of(kube, ns: str, run: str) -> str:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run)["metadata"]["uid"]


def owner_uids(obj: Any) -> list[str]:
    return [o.uid for o in obj.metadata.owner_references or []]


def children_owned_by(kube, ns: str, run: str, uid: str) -> bool:
    svc = kube.core.read_namespaced_service(run, ns)
    cm = kube.core.read_namespaced_config_map(f"{run}-config", ns)
    return owner_uids(svc) == [uid] and owner_uids(cm) == [uid]


# ------------------------------------------------------------------------------------------------
# the API server refuses an object the operator built
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def pod_policy(installed, namespace: str):
    """A ValidatingAdmissionPolicy that refuses (422) pods whose nodeSelector has the key
    ``kubearch.dev/refuse``: an object the schema and the operator accept, the API server not."""
    name = f"refuse-{namespace}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": "!has(object.spec.nodeSelector)"
                    " || !('kubearch.dev/refuse' in object.spec.nodeSelector)",
                    "message": "spec.nodeSelector: the key kubearch.dev/refuse is not allowed here",
                    "reason": "Invalid",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([policy, binding]))
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {"nodeSelector": {"kubearch.dev/refuse": "yes"}, "containers": [{"name": "c", "image": "x"}]},
    }

    def enforced() -> bool:
        proc = installed.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(probe), check=False
        )
        return proc.returncode != 0 and "kubearch.dev/refuse" in proc.stderr

    wait_for(enforced, timeout=60, interval=0.5, what="the admission policy to be enforced")
    yield
    installed.kubectl(
        "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False
    )


def test_a_refused_pod_fails_the_run_at_once_naming_object_field_and_message(
    installed, operator, namespace: str, pod_policy
) -> None:
    kube, ns, run = installed, namespace, "refused"
    body = spec(nodes=1)
    body["resources"]["nodeSelector"] = {"kubearch.dev/refuse": "yes"}
    create_run(kube, ns, run, body)
    status = wait_phase(kube, ns, run, "Failed", timeout=30)
    failed = cond(status, "Failed")
    assert failed["reason"] == "ObjectRejected"
    assert f"Pod {run}-master-0" in failed["message"]
    assert (
        "spec.nodeSelector" in failed["message"] and "kubearch.dev/refuse is not allowed" in failed["message"]
    )
    events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={run}").items
    assert any(e.reason == "ObjectRejected" and "spec.nodeSelector" in e.message for e in events)
    # No retry loop: the verdict stays, and the operator does not create the pod again.
    restarts = {e.reason for e in events}
    assert "Restarting" not in restarts and not pods(kube, ns, run)


# ------------------------------------------------------------------------------------------------
# children: owner checked on 409, ensured on every pass
# ------------------------------------------------------------------------------------------------
def test_children_of_another_owner_are_replaced_not_adopted(installed, operator, namespace: str) -> None:
    """A Service and ConfigMap named like the run's, left by someone else (as after `kubectl
    replace --force` when the garbage collector has not caught up): 409 on create is not "ours"."""
    kube, ns, run = installed, namespace, "namesake"
    decoy = kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "decoy"}})
    owner = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "decoy", "uid": decoy.metadata.uid}]
    labels = {"app.kubernetes.io/name": "kubearch", "kubearch.dev/run": run}
    kube.core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": run, "labels": labels, "ownerReferences": owner},
            "spec": {"clusterIP": "None", "ports": [{"port": 1}]},
        },
    )
    kube.core.create_namespaced_config_map(
        ns,
        {
            "metadata": {"name": f"{run}-config", "labels": labels, "ownerReferences": owner},
            "data": {"x": "y"},
        },
    )
    create_run(kube, ns, run, spec(nodes=1))
    uid = uid_of(kube, ns, run)
    wait_for(
        lambda: children_owned_by(kube, ns, run, uid), timeout=30, what="the run's own Service and ConfigMap"
    )
    config = yaml.safe_load(kube.core.read_namespaced_config_map(f"{run}-config", ns).data["config.yaml"])
    assert config["training"]["stepsPerEpoch"] == 10  # the run's config, not the decoy's data
    wait_pods(kube, ns, run, 1)


def test_a_deleted_service_and_configmap_are_recreated_while_the_group_runs(
    installed, operator, namespace: str
) -> None:
    kube, ns, run = installed, namespace, "mended"
    create_run(kube, ns, run, spec(nodes=1))
    (pod,) = wait_pods(kube, ns, run, 1)
    set_pod(kube, ns, pod.metadata.name, "Running")
    wait_phase(kube, ns, run, "Running")
    uid = uid_of(kube, ns, run)
    old_svc = kube.core.read_namespaced_service(run, ns).metadata.uid
    kube.core.delete_namespaced_service(run, ns)
    kube.core.delete_namespaced_config_map(f"{run}-config", ns)
    wait_for(
        lambda: (
            kube.core.read_namespaced_service(run, ns).metadata.uid != old_svc
            and children_owned_by(kube, ns, run, uid)
        ),
        timeout=30,
        what="Service and ConfigMap recreated",
    )
    assert [p.metadata.uid for p in pods(kube, ns, run)] == [pod.metadata.uid]  # the group was left alone


def test_replace_force_gives_every_new_run_its_own_children(installed, operator, namespace: str) -> None:
    kube, ns = installed, namespace
    names = [f"again-{i}" for i in range(8)]
    docs = [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": n},
            "spec": spec(nodes=1),
        }
        for n in names
    ]
    text = yaml.safe_dump_all(docs)
    installed.kubectl("apply", "-n", ns, "-f", "-", stdin=text)
    for n in names:
        wait_pods(kube, ns, n, 1)
    old = {n: uid_of(kube, ns, n) for n in names}
    installed.kubectl("replace", "--force", "--wait=false", "-n", ns, "-f", "-", stdin=text)

    def all_new() -> bool:
        for n in names:
            uid = uid_of(kube, ns, n)
            if uid == old[n] or not children_owned_by(kube, ns, n, uid):
                return False
            found = pods(kube, ns, n)
            if len(found) != 1 or owner_uids(found[0]) != [uid]:
                return False
        return True

    wait_for(
        all_new, timeout=60, interval=0.5, what="every replaced run with its own pod, Service, ConfigMap"
    )


# ------------------------------------------------------------------------------------------------
# no finalizer, no kopf annotations
# ------------------------------------------------------------------------------------------------
def test_deleting_a_run_completes_while_the_operator_is_down(installed, operator, namespace: str) -> None:
    kube, ns, run = installed, namespace, "orphaned"
    create_run(kube, ns, run, spec(nodes=1))
    wait_pods(kube, ns, run, 1)
    body = kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run)
    assert not body["metadata"].get("finalizers")
    operator.stop()
    try:
        kube.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run)
        wait_for(
            lambda: gone(kube.custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, run),
            timeout=20,
            what="the run deleted with no operator running",
        )
        wait_for(lambda: not pods(kube, ns, run, live=False), timeout=40, what="its pod garbage-collected")
        wait_for(
            lambda: gone(kube.core.read_namespaced_service, run, ns), timeout=40, what="its Service collected"
        )
    finally:
        operator.start()


def test_the_finalizer_of_an_older_operator_version_is_removed(installed, operator, namespace: str) -> None:
    """Runs created under the daemon-based operator carry kopf's finalizer; the watch-driven one
    needs none and lets kopf take it off, so those runs become deletable without an operator."""
    kube, ns, run = installed, namespace, "legacy"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": run, "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"]},
        "spec": spec(nodes=1),
    }
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for(
        lambda: (
            not kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run)["metadata"].get(
                "finalizers"
            )
        ),
        timeout=30,
        what="kopf's legacy finalizer removed",
    )


def test_a_spec_larger_than_the_annotation_limit_is_refused_or_handled(
    installed, operator, namespace: str
) -> None:
    """kopf used to copy the spec into an annotation (256 KiB limit for all of them): a 300 KB
    spec made every handling of the run fail. Two layers keep that from coming back: the schema
    bounds every string, list and map (the 300 KB spec is refused, naming the field), and the
    operator keeps no copy of the spec on the run (the largest spec the schema admits runs and
    leaves no annotation)."""
    kube, ns = installed, namespace
    huge = spec(nodes=1)
    huge["resources"]["nodeSelector"] = {f"example.com/key-{i:05d}": "v" * 60 for i in range(3500)}
    with pytest.raises(ApiException) as refused:
        create_run(kube, ns, "huge", huge)
    assert refused.value.status == 422
    assert "spec.resources.nodeSelector" in (refused.value.body or ""), refused.value.body

    run = "bulky"
    body = spec(nodes=1)
    body["resources"]["nodeSelector"] = {
        f"example.com/{'k' * 50}-{i:03d}": "v" * LABEL_VALUE_MAX for i in range(MAX_NODE_SELECTOR)
    }
    create_run(kube, ns, run, body)
    wait_pods(kube, ns, run, 1)
    status = wait_phase(kube, ns, run, "Created")
    assert cond(status, "SpecValid")["status"] == "True"
    annotations = kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run)["metadata"].get(
        "annotations"
    )
    assert not annotations  # kopf keeps neither progress nor a diff base on runs
    log = operator.log_tail(400)
    assert "Too long" not in log and "must have at most 262144 bytes" not in log


# ------------------------------------------------------------------------------------------------
# the API server goes away
# ------------------------------------------------------------------------------------------------
