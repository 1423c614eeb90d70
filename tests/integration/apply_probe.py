"""Apply a kubearch object the way ``kubectl apply`` would and read the API server's refusal.

One helper for the bad-input tables of both CRDs (``test_bad_input_api.py`` for TrainingRuns,
``test_bad_search_api.py`` for ArchitectureSearches): strict field validation (kubectl's
default), a server-side dry run unless asked to store, and the refusal's message (400/422 only:
anything else is a test failure, not a refusal).
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client.rest import ApiException

GROUP, VERSION = "kubearch.dev", "v1alpha1"


def create(
    kube: Any, namespace: str, plural: str, kind: str, spec: dict[str, Any], *, dry_run: bool = True
) -> Any:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": "probe"}, "spec": spec}
    kw = {"dry_run": "All"} if dry_run else {}
    return kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, body, field_validation="Strict", **kw
    )


def refusal(kube: Any, namespace: str, plural: str, kind: str, spec: dict[str, Any]) -> str | None:
    """The API server's message if it refuses ``spec``; None if it accepts it (nothing stored)."""
    try:
        create(kube, namespace, plural, kind, spec)
    except ApiException as err:
        assert err.status in (400, 422), (err.status, err.body[:500])
        return json.loads(err.body)["message"]
    return None
