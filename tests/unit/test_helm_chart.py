"""The Helm chart, rendered and linted by the real Helm CLI (built from source, see tests/helmbin.py).

The chart and ``manifests/`` are two ways to install the same operator; these tests keep them
equal (RBAC rules, the operator container, the CRDs) and check that every metric a Grafana
dashboard queries is one the trainer or the operator really exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from helmbin import CHART, REPO, helm
from kubearch_operator import builders
from kubearch_operator.api import TrainingRunSpec

NS = "kubearch-system"


def render(*set_args: str, release: str = "kubearch") -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", NS, "--include-crds"]
    for s in set_args:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def manifest_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "manifests" / name).read_text()) if d]


def test_chart_lints_clean() -> None:
    proc = helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in proc.stdout


def test_rbac_rules_equal_the_plain_manifests() -> None:
    (chart_role,) = by_kind(render(), "ClusterRole")
    (manifest_role,) = by_kind(manifest_docs("rbac.yaml"), "ClusterRole")
    assert chart_role["rules"] == manifest_role["rules"]
    (binding,) = by_kind(render(), "ClusterRoleBinding")
    (sa,) = by_kind(render(), "ServiceAccount")
    assert binding["roleRef"]["name"] == chart_role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}
    ]


def test_operator_container_equals_the_plain_manifests() -> None:
    (chart_dep,) = by_kind(render(), "Deployment")
    (manifest_dep,) = by_kind(manifest_docs("operator.yaml"), "Deployment")
    chart_c = chart_dep["spec"]["template"]["spec"]["containers"][0]
    manifest_c = manifest_dep["spec"]["template"]["spec"]["containers"][0]
    for key in ("command", "args", "env", "ports", "livenessProbe", "securityContext", "resources"):
        assert chart_c[key] == manifest_c[key], key
    assert chart_dep["spec"]["selector"] == manifest_dep["spec"]["selector"]
    pod_sa = chart_dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert pod_sa == by_kind(render(), "ServiceAccount")[0]["metadata"]["name"]


def test_chart_crds_equal_the_generated_manifests() -> None:
    chart_crds = {d["metadata"]["name"]: d for d in by_kind(render(), "CustomResourceDefinition")}
    manifest_crds = {
        d["metadata"]["name"]: d
        for name in ("crd-trainingrun.yaml", "crd-architecturesearch.yaml", "peering.yaml")
        for d in by_kind(manifest_docs(name), "CustomResourceDefinition")
    }
    assert chart_crds == manifest_crds


def test_watch_namespaces_and_peering_values() -> None:
    """Defect 4: non-default values reach the operator's command line, and kopf's namespaced mode
    (--namespace) gets a KopfPeering of that name in every watched namespace."""
    docs = render("operator.watchNamespaces={team-a,team-b}", "operator.peeringName=other")
    (dep,) = by_kind(docs, "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    assert "--peering=other" in args
    assert "KUBEARCH_PEERING" not in {e["name"] for e in container["env"]}  # one source: --peering
    peerings = by_kind(docs, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", "other"),
        ("team-b", "other"),
    ]
    assert not by_kind(docs, "ClusterKopfPeering")


def test_default_values_make_a_cluster_peering_named_like_the_operator_flag() -> None:
    docs = render("operator.peeringName=elsewhere")
    (dep,) = by_kind(docs, "Deployment")
    assert "--peering=elsewhere" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    (peering,) = by_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "elsewhere" and not by_kind(docs, "KopfPeering")


def test_the_operator_keeps_the_peering_name_of_its_command_line() -> None:
    """The startup handler reset --peering=NAME to "kubearch" (kopf applies the flag first)."""
    import kopf
    from kubearch_operator.__main__ import build_args
    from kubearch_operator.peering import configure_peering

    (dep,) = by_kind(render("operator.peeringName=other"), "Deployment")
    argv = build_args(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    (flag,) = [a for a in argv if a.startswith("--peering=")]
    settings = kopf.OperatorSettings()
    settings.peering.mandatory, settings.peering.name = True, flag.split("=", 1)[1]  # as kopf run does
    configure_peering(settings, {"KUBEARCH_PEERING": "kubearch"})
    assert settings.peering.name == "other"
    plain = kopf.OperatorSettings()
    configure_peering(plain, {})
    assert plain.peering.name == "kubearch"


def test_monitoring_objects_only_when_enabled_and_they_select_trainer_pods() -> None:
    assert not by_kind(render(), "ServiceMonitor") and not by_kind(render(), "PodMonitor")
    docs = render("monitoring.serviceMonitor.enabled=true", "monitoring.podMonitor.enabled=true")
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}

    (pm,) = by_kind(docs, "PodMonitor")
    # The pods the operator builds for a run with a metrics port must match the PodMonitor.
    example = yaml.safe_load((REPO / "examples" / "trainingrun-dense.yaml").read_text())
    example["spec"].setdefault("training", {})["metricsPort"] = 9090
    spec = TrainingRunSpec.model_validate(example["spec"])
    pods = builders.build_pods("demo", "default", "uid-1", spec, builders.plan_run(spec).shape)
    assert pods
    (expr,) = pm["spec"]["selector"]["matchExpressions"]
    port_name = pm["spec"]["podMetricsEndpoints"][0]["port"]
    for pod in pods:
        assert expr["key"] in pod["metadata"]["labels"] and expr["operator"] == "Exists"
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert port_name in ports


def _exported_sample_names() -> set[str]:
    """Every sample name the trainer's and the operator's registries can expose."""
    import kubearch_operator.handlers  # noqa: F401 - registers the operator's metrics
    from kubearch_trainer.metrics import TrainMetrics
    from prometheus_client import REGISTRY

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for registry in (TrainMetrics("dense", "probe").registry, REGISTRY):
        for family in registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_dashboards_are_valid_and_query_only_real_metrics() -> None:
    docs = render()
    maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("kubearch-dashboard-")]
    assert {m["metadata"]["name"] for m in maps} == {
        "kubearch-dashboard-kubearch-training",
        "kubearch-dashboard-kubearch-operator",
        "kubearch-dashboard-kubearch-search",
    }
    exported = _exported_sample_names()
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((filename, body),) = cm["data"].items()
        dashboard = json.loads(body)
        assert dashboard["uid"] and dashboard["panels"]
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        used = {m for e in exprs for m in re.findall(r"\bkubearch_[a-z_]+", e)}
        assert used, filename
        assert used <= exported, f"{filename} queries metrics nobody exports: {sorted(used - exported)}"
    # the JSON files in the chart are the ones rendered
    for path in Path(CHART / "dashboards").glob("*.json"):
        json.loads(path.read_text())
