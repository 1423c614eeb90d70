"""A controller-runtime style work queue and the bookkeeping a watch-driven controller needs.

Why not one loop per object: a loop that re-reads its object every N seconds costs requests in
proportion to the number of idle objects. A controller built on watches instead keeps the
objects in a cache fed by watch streams, puts the *key* of an object on a queue whenever one of
its watch events arrives, and lets a fixed number of workers reconcile keys from that queue.

:class:`WorkQueue` gives the same guarantees as client-go's ``workqueue``:

* **dedup**: a key added many times before a worker takes it is reconciled once;
* **serialisation**: a key is never handed to two workers at once; a key added while it is being
  processed is queued again when that pass ends (so the event is never lost);
* **delayed adds** (``add_after``): deadline and TTL wake-ups, and error back-off, without a
  periodic resync;
* **per-key back-off** (``retry``): exponential, reset by ``forget`` after a successful pass.

:class:`Expectations` is the Job controller's guard against a stale cache: a pass that created
pods records their names; the key's next pass waits until the watch has shown them (or a
timeout passes), so it never mistakes "not in the cache yet" for "missing".

:class:`Outage` turns connection failures into one log line per outage and one when the API
server is back, instead of a traceback per object per retry.

Everything here is asyncio- and thread-safe where it says so, and has no Kubernetes imports, so
it is unit-tested without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

Key = Hashable


class WorkQueue:
    """Dedup + per-key serialisation + delayed adds (see the module docstring). Loop-bound: call
    every method from the event loop that created it (use ``add_threadsafe`` from threads)."""

    def __init__(self, *, base_delay: float = 0.5, max_delay: float = 60.0) -> None:
        self._ready: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()  # waiting in _ready
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()  # added while processing: queue again when done
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}
        self._enqueued_at: dict[Key, float] = {}
        self.base_delay, self.max_delay = base_delay, max_delay
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: Key) -> None:
        """Reconcile ``key`` soon (once, however often it is added before a worker takes it)."""
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._enqueued_at.setdefault(key, time.monotonic())
        self._ready.put_nowait(key)

    def add_threadsafe(self, key: Key) -> None:
        self._loop.call_soon_threadsafe(self.add, key)

    def add_after(self, key: Key, delay: float) -> None:
        """Reconcile ``key`` in ``delay`` seconds; an earlier pending wake-up of the key wins."""
        if delay <= 0:
            self.add(key)
            return
        due = self._loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled():
            if timer.when() <= due:
                return
            timer.cancel()
        self._timers[key] = self._loop.call_at(due, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: Key) -> float:
        """Re-add after an error with exponential back-off; returns the delay chosen."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.max_delay, self.base_delay * 2**n)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        """A pass succeeded: the key's next error starts its back-off from the beginning."""
        self._failures.pop(key, None)

    def drop(self, key: Key) -> None:
        """The object is gone: no wake-up, no back-off state (a queued pass still runs, and finds
        nothing)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._failures.pop(key, None)

    async def get(self) -> tuple[Key, float]:
        """The next key to reconcile and how long it waited in the queue; marks it processing."""
        key = await self._ready.get()
        self._queued.discard(key)
        self._processing.add(key)
        waited = time.monotonic() - self._enqueued_at.pop(key, time.monotonic())
        return key, waited

    def done(self, key: Key) -> None:
        """The pass over ``key`` ended; if it was added meanwhile, queue it again."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def pending_timers(self) -> int:
        return len(self._timers)

    def processing(self) -> int:
        return len(self._processing)


@dataclass
class _Expected:
    names: set[str]
    deadline: float


@dataclass
class Expectations:
    """Names a key's last pass created and the watch has not shown yet (thread-safe)."""

    timeout: float = 30.0
    _pending: dict[Key, _Expected] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, key: Key, names: Iterable[str]) -> None:
        """Call *before* creating: the watch event may arrive before the create call returns."""
        names = set(names)
        if not names:
            return
        with self._lock:
            entry = self._pending.get(key)
            deadline = time.monotonic() + self.timeout
            if entry is None:
                self._pending[key] = _Expected(names, deadline)
            else:
                entry.names |= names
                entry.deadline = deadline

    def observed(self, key: Key, name: str) -> None:
        """The watch showed ``name`` (or its create call failed: it will never show)."""
        with self._lock:
            entry = self._pending.get(key)
            if entry is not None:
                entry.names.discard(name)
                if not entry.names:
                    del self._pending[key]

    def satisfied(self, key: Key) -> float | None:
        """None when the cache can be trusted for ``key``; else seconds until the wait times out."""
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                return None
            left = entry.deadline - time.monotonic()
            if left <= 0:
                del self._pending[key]
                return None
            return left

    def clear(self, key: Key) -> None:
        with self._lock:
            self._pending.pop(key, None)


class Outage:
    """One WARNING when the API server becomes unreachable, one INFO when it answers again.

    Thread-safe: reconcile passes run in worker threads and report here.
    """

    def __init__(self, logger: logging.Logger, what: str = "the API server") -> None:
        self._log, self._what = logger, what
        self._since: float | None = None
        self._failed_calls = 0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, err: BaseException) -> bool:
        """Record a connection failure; True if it starts a new outage (and was logged)."""
        with self._lock:
            self._failed_calls += 1
            if self._since is not None:
                return False
            self._since = time.monotonic()
        self._log.warning("%s is unreachable (%s); backing off until it answers", self._what, _short(err))
        return True

    def ok(self) -> bool:
        """Record a successful call; True if it ends an outage (and was logged)."""
        if self._since is None:  # the common case, without the lock
            return False
        with self._lock:
            if self._since is None:
                return False
            lasted, calls = time.monotonic() - self._since, self._failed_calls
            self._since, self._failed_calls = None, 0
        self._log.info(
            "reconnected to %s after %.1fs (%d failed call(s) meanwhile)", self._what, lasted, calls
        )
        return True


def _short(err: BaseException) -> str:
    """The innermost reason of a urllib3/requests error, not its whole repr chain."""
    reason = getattr(err, "reason", None)
    text = str(reason if reason is not None else err)
    return text if len(text) <= 200 else text[:200] + "..."
