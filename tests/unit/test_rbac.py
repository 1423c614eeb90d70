"""RBAC checked against the code: every Kubernetes API call the operator makes is allowed by the
ClusterRole (manifests/rbac.yaml, equal to the chart's, see test_helm_chart), and the role grants
nothing that neither the code nor kopf uses (least privilege).

The operator's calls are found by scanning its source for kubernetes-client methods
(``create_namespaced_pod``, ``patch_namespaced_custom_object_status`` ...), so a new call without
its verb fails here rather than as a 403 in a cluster. What kopf itself does is listed in
``KOPF_NEEDS`` with the reason.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "kubearch_operator"

#: (apiGroup, resource, verb) kopf needs on its own, beyond the calls in our code.
KOPF_NEEDS = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf scans resources",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf follows CRD changes",
    ("", "namespaces", "list"): "kopf resolves namespace patterns",
    ("", "namespaces", "watch"): "kopf follows namespaces",
    ("kopf.dev", "clusterkopfpeerings", "get"): "peering",
    ("kopf.dev", "clusterkopfpeerings", "list"): "peering",
    ("kopf.dev", "clusterkopfpeerings", "watch"): "peering",
    ("kopf.dev", "clusterkopfpeerings", "patch"): "peering: kopf writes its heartbeat",
    ("kopf.dev", "kopfpeerings", "get"): "namespaced peering (watchNamespaces)",
    ("kopf.dev", "kopfpeerings", "list"): "namespaced peering",
    ("kopf.dev", "kopfpeerings", "watch"): "namespaced peering",
    ("kopf.dev", "kopfpeerings", "patch"): "namespaced peering heartbeat",
    ("kubearch.dev", "trainingruns", "list"): "kopf watches TrainingRuns",
    ("kubearch.dev", "trainingruns", "watch"): "kopf watches TrainingRuns",
    ("kubearch.dev", "trainingruns", "patch"): "kopf's annotations (progress, diff base) and finalizer",
    ("kubearch.dev", "trainingruns/finalizers", "update"): (
        "ownerReferences with blockOwnerDeletion need update on the owner's finalizers"
    ),
    ("kubearch.dev", "architecturesearches", "list"): "kopf indexes ArchitectureSearches",
    ("kubearch.dev", "architecturesearches", "watch"): "kopf indexes ArchitectureSearches",
    ("kubearch.dev", "architecturesearches/finalizers", "update"): (
        "trials' ownerReferences to their search set blockOwnerDeletion"
    ),
    ("", "pods", "list"): "kopf watches the runs' pods",
    ("", "pods", "watch"): "kopf watches the runs' pods",
    ("", "events", "create"): "kopf posts events",
    ("events.k8s.io", "events", "create"): "events through the events.k8s.io API",
}

#: kubernetes-client method verbs -> RBAC verbs.
VERBS = {"create": "create", "delete": "delete", "patch": "patch", "read": "get", "get": "get",
         "list": "list", "replace": "update"}  # fmt: skip
#: CoreV1Api method nouns -> resources.
CORE = {"pod": "pods", "service": "services", "config_map": "configmaps", "event": "events",
        "persistent_volume_claim": "persistentvolumeclaims", "secret": "secrets",
        "node": "nodes", "namespace": "namespaces"}  # fmt: skip
#: plural -> API groups for custom objects whose group is computed at run time.
DYNAMIC_GROUPS = {"podgroups": {"scheduling.volcano.sh", "scheduling.x-k8s.io"}}
#: Modules of the package that the operator never runs: ``kubearch search`` / ``kubearch report``
#: (run by a user with the user's own kubeconfig, not with the operator's ServiceAccount).
NOT_OPERATOR = {Path("search/local.py")}

_CORE_CALL = re.compile(
    r"^(create|delete|patch|read|list|replace)_(namespaced_)?(\w+?)(_status|_for_all_namespaces)?$"
)
_CUSTOM_CALL = re.compile(
    r"^(get|create|delete|patch|list|replace)_(namespaced|cluster)_custom_object(_status)?$"
)


_DYNAMIC_CALL = re.compile(r"^(create|delete|patch|read|list|replace)_namespaced_$")
#: kopf decorators that make kopf list and watch a resource.
_KOPF_WATCHERS = {"index", "event", "create", "update", "delete", "resume", "field", "daemon", "timer"}


def _is_kopf_watch(func: ast.expr) -> bool:
    """``kopf.index(...)``, ``kopf.on.event(...)``, ``kopf.daemon(...)`` ..."""
    if not isinstance(func, ast.Attribute) or func.attr not in _KOPF_WATCHERS:
        return False
    base = func.value
    if isinstance(base, ast.Attribute) and base.attr == "on":
        base = base.value
    return isinstance(base, ast.Name) and base.id == "kopf"


def _value(node: ast.expr, module: object) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), str):
        return getattr(module, node.id)
    return None


def calls_in_code() -> dict[tuple[str, str, str], list[str]]:
    """(apiGroup, resource, verb) -> where the operator's code calls it."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE) in NOT_OPERATOR:
            continue
        module = importlib.import_module(".".join(path.relative_to(REPO / "operator").with_suffix("").parts))
        tree = ast.parse(path.read_text())
        # Nouns passed as string arguments (``_ensure_child(..., "config_map")``): what a
        # ``getattr(core, f"create_namespaced_{resource}")`` in the same module may resolve to.
        nouns = {
            a.value
            for call in ast.walk(tree)
            if isinstance(call, ast.Call)
            for a in [*call.args, *(k.value for k in call.keywords)]
            if isinstance(a, ast.Constant) and a.value in CORE
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                if m := _DYNAMIC_CALL.match(str(node.values[0].value)):
                    for noun in nouns:
                        where = f"{path.name}:{node.lineno} getattr {m.group(1)}_namespaced_<{noun}>"
                        found.setdefault(("", CORE[noun], VERBS[m.group(1)]), []).append(where)
                continue
            if isinstance(node, ast.Call) and _is_kopf_watch(node.func):
                # kopf lists and watches what a handler or index is registered for
                watched = [_value(a, module) for a in node.args]
                if len(watched) >= 2 and all(watched):
                    group = "" if watched[0] == "v1" else watched[0]
                    plural = watched[-1]
                    where = f"{path.name}:{node.lineno} kopf watch {plural}"
                    for verb in ("list", "watch"):
                        found.setdefault((group, plural, verb), []).append(where)
                continue
            # CoreV1Api methods count wherever they are named (called, or passed on as
            # `_create_if_absent(core.create_namespaced_pod, ...)`); custom-object calls need
            # their arguments to tell the resource.
            if isinstance(node, ast.Attribute) and (m := _CORE_CALL.match(node.attr)) and m.group(3) in CORE:
                resource = CORE[m.group(3)] + ("/status" if m.group(4) == "_status" else "")
                where = f"{path.name}:{node.lineno} {node.attr}"
                found.setdefault(("", resource, VERBS[m.group(1)]), []).append(where)
                continue
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, where = node.func.attr, f"{path.name}:{node.lineno} {node.func.attr}"
            if m := _CUSTOM_CALL.match(name):
                verb = VERBS[m.group(1)]
                plural_arg = 3 if m.group(2) == "namespaced" else 2
                if len(node.args) <= plural_arg:
                    continue
                plural = _value(node.args[plural_arg], module)
                group = _value(node.args[0], module)
                assert plural, f"{where}: cannot tell which resource this call touches"
                groups = {group} if group is not None else DYNAMIC_GROUPS[plural]
                resource = plural + ("/status" if m.group(3) else "")
                for g in groups:
                    found.setdefault((g, resource, verb), []).append(where)
    return found


def granted() -> set[tuple[str, str, str]]:
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_the_scan_finds_the_operators_calls() -> None:
    found = calls_in_code()
    assert ("", "pods", "create") in found and ("kubearch.dev", "trainingruns/status", "patch") in found
    assert ("scheduling.volcano.sh", "podgroups", "create") in found


def test_every_call_of_the_code_is_allowed() -> None:
    missing = {k: v for k, v in calls_in_code().items() if k not in granted()}
    assert not missing, f"the ClusterRole lacks: {missing}"


def test_the_role_grants_nothing_unused() -> None:
    used = set(calls_in_code()) | set(KOPF_NEEDS)
    extra = granted() - used
    assert not extra, f"granted but used by neither the code nor kopf: {sorted(extra)}"
