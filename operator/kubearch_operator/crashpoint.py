"""Test-only crash points: SIGKILL the operator at a named point of a reconcile, on purpose.

Why: the kill tests (``tests/integration/test_operator_kills.py``) must crash the operator at
*every* stage of a group restart: after it saw the failure, after the status write, between two
pod deletions, between two pod creations... Several of those stages last microseconds, so a
SIGKILL from outside, timed by watching the API, cannot hit them deterministically. Here the
operator kills itself (SIGKILL: no clean-up, no ``finally``, exactly like ``kill -9``) when it
reaches the point the test names.

Off by default: with ``KUBEARCH_CRASH_AT`` unset (always, outside those tests) :func:`reached`
returns at once. Its value is ``POINT[#N][@NAMESPACE/RUN]``: die the N-th time (default 1) POINT
is reached for that run (default: any run), counting from the process start. The points, in the
order a group restart reaches them (``handlers.py``):

* ``child-event``     a watch event of a run's pod, Service or ConfigMap arrived (before queueing)
* ``status-write``    a pass is about to PATCH a changed status
* ``status-written``  the status PATCH returned
* ``pod-deleted``     one pod deletion returned
* ``configmap-patched`` the ConfigMap was brought up to date before a group is created
* ``pod-created``     one pod creation returned
* ``event-posted``    one Kubernetes Event was posted
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("kubearch.operator")

ENV = "KUBEARCH_CRASH_AT"
POINTS = frozenset(
    {
        "child-event",
        "status-write",
        "status-written",
        "pod-deleted",
        "configmap-patched",
        "pod-created",
        "event-posted",
    }
)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class CrashAt:
    """One armed crash point: ``point``, the ``nth`` hit, for ``key`` = (namespace, run) or any."""

    point: str
    nth: int = 1
    key: tuple[str, str] | None = None
    kill: Callable[[], None] = _sigkill_self
    hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def parse(cls, text: str, kill: Callable[[], None] = _sigkill_self) -> CrashAt:
        """``POINT[#N][@NAMESPACE/RUN]``; a clear error for anything else."""
        rest, _, target = text.strip().partition("@")
        point, _, nth = rest.partition("#")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r}; allowed: {', '.join(sorted(POINTS))}")
        if nth and (not nth.isdigit() or int(nth) < 1):
            raise ValueError(f"{ENV}: #N must be a positive integer, got {nth!r}")
        key = None
        if target:
            namespace, slash, run = target.partition("/")
            if not (namespace and slash and run):
                raise ValueError(f"{ENV}: the target must be NAMESPACE/RUN, got {target!r}")
            key = (namespace, run)
        return cls(point, int(nth or 1), key, kill)

    def reached(self, point: str, key: tuple[str, str]) -> None:
        if point != self.point or (self.key is not None and key != self.key):
            return
        with self._lock:
            self.hits += 1
            due = self.hits == self.nth
        if due:
            # Flushed by the logging handler before the kill: the test reads which point it was.
            log.warning("crash point %s#%d reached for %s/%s: SIGKILL", point, self.nth, *key)
            self.kill()


_armed: CrashAt | None = CrashAt.parse(os.environ[ENV]) if os.environ.get(ENV) else None


def reached(point: str, key: tuple[str, str]) -> None:
    """Called by the handlers at each named point; a no-op unless ``KUBEARCH_CRASH_AT`` is set."""
    if _armed is not None:
        _armed.reached(point, key)
