"""Pure rules for an object the API server refused, and for telling transient errors apart.

The operator builds Services, ConfigMaps, pods and PodGroups from a spec that passed the CRD
schema and the pydantic models; the API server can still refuse one (a label value it does not
accept, a ConfigMap over 1 MiB, a toleration that contradicts itself). Retrying such a request
can never succeed, so the run fails at once with a condition that names the object, the field and
the API server's own words, instead of retrying forever with nothing to show but a log line.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .api import TrainingRunStatus
from .status import rfc3339, set_condition

#: HTTP codes that mean "this request can never succeed as sent": 400 Bad Request, 413 Request
#: Entity Too Large, 422 Invalid (validation). 403/404/409/429/5xx are not here: they depend on
#: RBAC, timing or load, and are retried.
REFUSED_CODES = frozenset({400, 413, 422})

#: 429 Too Many Requests and 5xx: the server is overloaded or restarting; retried with back-off.
TRANSIENT_CODES = frozenset({429, 500, 502, 503, 504})

REFUSED_REASON = "ObjectRejected"


def namespace_terminating(status: int, body: str | bytes | None) -> bool:
    """A create refused because the run's namespace is being deleted (403 with the status cause
    ``NamespaceTerminating``). The namespace controller deletes the run next; retrying (and
    warning) until then is noise — client-go controllers skip this error the same way."""
    if status != 403 or not body:
        return False
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        data = json.loads(body)
    except ValueError:
        return False
    causes = ((data.get("details") or {}).get("causes") or []) if isinstance(data, dict) else []
    return any(isinstance(c, dict) and c.get("reason") == "NamespaceTerminating" for c in causes)


def api_error_details(body: str | bytes | None) -> tuple[str, list[tuple[str, str]]]:
    """(message, [(field, message)...]) from a ``kind: Status`` body; the raw text if not JSON."""
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if not body:
        return "", []
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500], []
    if not isinstance(data, dict):
        return str(data)[:500], []
    causes = (data.get("details") or {}).get("causes") or []
    fields = [
        (str(c.get("field") or ""), str(c.get("message") or c.get("reason") or ""))
        for c in causes
        if isinstance(c, dict)
    ]
    return str(data.get("message") or ""), fields


def describe_refusal(kind: str, name: str, code: int, body: str | bytes | None) -> str:
    """One line naming the object, the field(s) and the API server's message."""
    message, fields = api_error_details(body)
    where = "; ".join(f"{f or '(object)'}: {m}" for f, m in fields) if fields else ""
    text = f"the API server refused {kind} {name} ({code})"
    if where:
        text += f" at {where}"
    if message and message not in where:
        text += f" - {message}"
    return text[:1000]


def refused(status: TrainingRunStatus, message: str, now: datetime) -> TrainingRunStatus:
    """The run failed because an object built from its spec was refused: terminal, like any
    other permanent failure (fixing the spec means creating the run again)."""
    st = status.model_copy(deep=True)
    st.phase = "Failed"  # type: ignore[assignment]
    st.message = message
    st.completion_time = rfc3339(now)
    set_condition(st, "Running", "False", REFUSED_REASON, message, now)
    if any(c.type == "Restarting" for c in st.conditions):
        set_condition(st, "Restarting", "False", REFUSED_REASON, message, now)
    set_condition(st, "Failed", "True", REFUSED_REASON, message, now)
    return st


def is_refused(code: int | None) -> bool:
    return code in REFUSED_CODES


def owner_uid(obj: dict[str, Any]) -> str | None:
    """The uid of an object's controller (or first) ownerReference, None if it has none."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return ref.get("uid")
    return refs[0].get("uid") if refs else None
