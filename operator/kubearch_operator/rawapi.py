"""Creates of the manifests the builders made, without the generated client's model round trip.

Why: kubernetes-client 37's generated methods are wrapped in pydantic's ``validate_call`` and type
their ``body`` as a model, so a dict passed to ``create_namespaced_pod`` is validated into a
``V1Pod`` model tree and projected back into a dict before it is sent — about 1 ms of CPU per
pod, the largest client cost of a run's first pass at 10,000 runs. The builders already produce
the exact JSON the API server wants, and the API server validates it anyway.

These methods go through the same :class:`kubernetes.client.ApiClient` (configuration, bearer
token, TLS, connection pool, retries), send the dict as JSON, read the answer to its end (the
connection goes back to the pool) and raise the same :class:`ApiException` subclasses for a
non-2xx answer as the generated methods with ``_preload_content=False``, so callers keep their
error handling (409 → "exists", 400/413/422 → refused, ...). Method names match the generated
ones, which also lets ``tests/unit/test_rbac.py`` see each call's verb and resource.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException

_HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}


class CoreWrites:
    """``create_namespaced_*`` for core/v1 objects given as plain dicts."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def _post(self, plural: str, namespace: str, body: dict[str, Any]) -> None:
        request = self.api.param_serialize(
            method="POST",
            resource_path=f"/api/v1/namespaces/{{namespace}}/{plural}",
            path_params={"namespace": namespace},
            header_params=dict(_HEADERS),
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request)
        try:
            response.read()
        finally:
            release = getattr(response.response, "release_conn", None)
            if release is not None:
                release()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)

    def create_namespaced_pod(self, namespace: str, body: dict[str, Any]) -> None:
        self._post("pods", namespace, body)

    def create_namespaced_service(self, namespace: str, body: dict[str, Any]) -> None:
        self._post("services", namespace, body)

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> None:
        self._post("configmaps", namespace, body)

    def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> None:
        self._post("events", namespace, body)
