"""The operator's CPU savings at scale, each checked against the slow path it replaces.

- ``rawapi.CoreWrites`` POSTs the builders' dicts as JSON (no pydantic model round trip): the
  API sees the same JSON, and errors raise the same ``ApiException`` subclasses with the body.
- ``builders.YAML_DUMPER`` (libyaml) renders the trainer config exactly as PyYAML's pure-Python
  SafeDumper, the fallback where libyaml is missing.
- ``handlers.NoDiffBase`` is only safe while no change-detecting handler exists:
  ``check_handler_kinds`` passes for the operator's registry and refuses one with ``on.update``.
- ``handlers._record_phase`` moves the per-phase gauge by the change, matching a recount.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import kopf
import kubernetes
import pytest
import yaml
from kubearch_operator import builders, handlers
from kubearch_operator.api import PHASES, parse_spec
from kubearch_operator.rawapi import CoreWrites
from kubernetes.client.rest import ApiException


class _Recorder(BaseHTTPRequestHandler):
    """Answers POSTs with the status the test queued; records path, headers and JSON body."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the API server: connections can be reused
    answers: ClassVar[list[tuple[int, dict[str, Any]]]] = []
    seen: ClassVar[list[tuple[str, dict[str, str], Any]]] = []
    clients: ClassVar[list[tuple[str, int]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        type(self).clients.append(self.client_address)
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        status, answer = type(self).answers.pop(0)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def api_server():
    _Recorder.answers, _Recorder.seen, _Recorder.clients = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    config.api_key = {"BearerToken": "token-123"}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    yield kubernetes.client.ApiClient(config), _Recorder
    server.shutdown()
    server.server_close()


def _plan() -> tuple[Any, Any]:
    spec = parse_spec({"model": {"architecture": "dense", "size": "tiny"}})
    return spec, builders.plan_run(spec)


def test_raw_create_sends_the_builders_json_with_the_token(api_server) -> None:
    api, recorder = api_server
    spec, plan = _plan()
    pod = builders.build_pods("r", "team-a", "uid-1", spec, plan.shape, 0)[0]
    recorder.answers.append((201, pod))
    CoreWrites(api).create_namespaced_pod("team-a", pod)
    path, headers, body = recorder.seen[0]
    assert path == "/api/v1/namespaces/team-a/pods"
    assert headers["authorization"] == "Bearer token-123"
    assert headers["content-type"] == "application/json"
    assert body == pod
    # what the generated client sends for the same dict after its V1Pod round trip: the same JSON
    assert api.sanitize_for_serialization(kubernetes.client.V1Pod.from_dict(pod)) == body


@pytest.mark.parametrize(
    ("status", "exc_name"),
    [(409, "ConflictException"), (422, "UnprocessableEntityException"), (500, "ServiceException")],
)
def test_raw_create_raises_the_generated_clients_exceptions(api_server, status: int, exc_name: str) -> None:
    api, recorder = api_server
    answer = {"kind": "Status", "status": "Failure", "code": status, "message": f"the message {status}"}
    recorder.answers.append((status, answer))
    body = builders.build_service("r", "team-a", "uid-1", _plan()[0])
    with pytest.raises(ApiException) as err:
        CoreWrites(api).create_namespaced_service("team-a", body)
    assert type(err.value).__name__ == exc_name
    assert err.value.status == status
    assert f"the message {status}" in err.value.body  # refusals.describe_refusal reads it
    assert recorder.seen[0][0] == "/api/v1/namespaces/team-a/services"


def test_the_connection_goes_back_to_the_pool(api_server) -> None:
    api, recorder = api_server
    writes = CoreWrites(api)
    cm = builders.build_configmap("r", "team-a", "uid-1", _plan()[1])
    for _ in range(5):
        recorder.answers.append((201, cm))
        writes.create_namespaced_config_map("team-a", cm)
    # every request came over one connection: each answer was read to its end and released
    assert len(recorder.clients) == 5 and len(set(recorder.clients)) == 1


def test_libyaml_renders_the_config_exactly_as_the_python_dumper() -> None:
    _, plan = _plan()
    data = builders.trainer_config(plan, "r", resume=True)
    fast = yaml.dump(data, Dumper=builders.YAML_DUMPER, sort_keys=False)
    slow = yaml.dump(data, Dumper=yaml.SafeDumper, sort_keys=False)
    assert fast == slow
    assert yaml.safe_load(fast) == data
    assert builders.build_configmap("r", "ns", "u", plan, resume=True)["data"][builders.CONFIG_KEY] == fast


def test_the_operator_registers_no_handler_that_needs_a_diff_base() -> None:
    handlers.check_handler_kinds(kopf.get_default_registry())  # raises if one were registered
    assert handlers.NoDiffBase().build(body={"spec": {"a": 1}}) is None


def test_a_change_detecting_handler_is_refused() -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.update("kubearch.dev", "v1alpha1", "trainingruns", registry=registry)
    def updated(**_: Any) -> None:
        return None

    with pytest.raises(RuntimeError, match="diff base"):
        handlers.check_handler_kinds(registry)


def test_phase_gauge_moves_by_the_change_and_matches_a_recount(monkeypatch) -> None:
    monkeypatch.setattr(handlers, "_state", handlers._State())
    moves = [
        (("a", "r1"), "Created"),
        (("a", "r2"), "Created"),
        (("a", "r1"), "Running"),
        (("a", "r1"), "Running"),
        (("a", "r3"), "Failed"),
        (("a", "r2"), None),
        (("a", "r4"), None),  # never tracked: forgetting it changes nothing
    ]
    for key, phase in moves:
        handlers._record_phase(key, phase)
    recount = {p: 0 for p in PHASES}
    for phase in handlers._state.phases.values():
        recount[phase] += 1
    assert handlers._state.phases == {("a", "r1"): "Running", ("a", "r3"): "Failed"}
    for phase in ("Created", "Running", "Failed"):
        assert handlers.RUNS.labels(phase=phase)._value.get() == recount[phase]


def test_the_echo_of_our_own_status_write_queues_no_pass(monkeypatch) -> None:
    """The run as our PATCH returned it is cached; its watch event (same resourceVersion) is not
    news. A newer version, or a new run of the same name, is."""
    monkeypatch.setattr(handlers, "_state", handlers._State())
    key = ("a", "r")

    def run(uid: str, rv: str, phase: str) -> dict[str, Any]:
        meta = {"name": "r", "namespace": "a", "uid": uid, "resourceVersion": rv, "managedFields": [{}]}
        return {"metadata": meta, "status": {"phase": phase}}

    assert handlers._store_run(key, run("u1", "10", "Created")) is True  # first sight
    assert handlers._store_run(key, run("u1", "12", "Running")) is True  # e.g. our PATCH's answer
    assert handlers._store_run(key, run("u1", "12", "Running")) is False  # its watch echo
    assert handlers._store_run(key, run("u1", "11", "Created")) is False  # a late, older event
    assert handlers._state.runs[key]["status"]["phase"] == "Running"
    assert "managedFields" not in handlers._state.runs[key]["metadata"]
    assert handlers._store_run(key, run("u1", "13", "Running")) is True  # someone else's change
    assert handlers._store_run(key, run("u2", "5", "")) is True  # replaced by a new run


def test_namespace_terminating_is_told_apart_from_other_403s() -> None:
    """The API server's words for a create in a namespace being deleted (a 403 with a cause)."""
    from kubearch_operator.refusals import namespace_terminating

    message = 'services "r" is forbidden: unable to create new content in namespace t'
    message += " because it is being terminated"
    cause = {
        "reason": "NamespaceTerminating",
        "message": "namespace t is being terminated",
        "field": "metadata.namespace",
    }
    terminating = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "Forbidden",
            "code": 403,
            "message": message,
            "details": {"name": "r", "kind": "services", "causes": [cause]},
        }
    )
    rbac = json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden", "message": "no", "details": {}})
    assert namespace_terminating(403, terminating) is True
    assert namespace_terminating(403, terminating.encode()) is True
    assert namespace_terminating(403, rbac) is False  # RBAC: a real error, keep warning
    assert namespace_terminating(409, terminating) is False
    assert namespace_terminating(403, "not json") is False
