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
* **per-key back-off** (``retry``): exponential, reset by ``forget`` after a successful pass;
  ``retry(key, at_least=...)`` also *holds* the key: when the API server answered 429 with
  ``Retry-After``, no pass of that key runs sooner, not even one an event asks for (client-go's
  REST client honours Retry-After itself; the python client does not).

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
import datetime
import email.utils
import logging
import threading
import time
from collections.abc import Hashable, Iterable, Iterator
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
        self._held_until: dict[Key, float] = {}  # loop time before which the key must not run
        self.base_delay, self.max_delay = base_delay, max_delay
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: Key) -> None:
        """Reconcile ``key`` soon (once, however often it is added before a worker takes it);
        a held key (see :meth:`retry`) no sooner than its hold ends."""
        held = self._held_until.get(key)
        if held is not None:
            left = held - self._loop.time()
            if left > 0:
                self.add_after(key, left)
                return
            del self._held_until[key]
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

    def retry(self, key: Key, at_least: float = 0.0) -> float:
        """Re-add after an error with exponential back-off; returns the delay chosen.

        ``at_least``: the server's ``Retry-After``; the key is held that long (events that add
        it meanwhile wait for the hold to end), so a throttled API server sees no earlier try.
        """
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = max(at_least, min(self.max_delay, self.base_delay * 2**n))
        if at_least > 0:
            self._held_until[key] = self._loop.time() + at_least
            timer = self._timers.pop(key, None)  # an earlier wake-up would only be re-held
            if timer is not None:
                timer.cancel()
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
        self._held_until.pop(key, None)

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

    def observed(self, key: Key, name: str) -> bool:
        """The watch showed ``name`` (or its create call failed: it will never show); True if
        ``name`` was awaited."""
        with self._lock:
            entry = self._pending.get(key)
            if entry is None or name not in entry.names:
                return False
            entry.names.discard(name)
            if not entry.names:
                del self._pending[key]
            return True

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


class Versions:
    """The resourceVersion last seen of each object (by uid), to tell which objects of a
    re-listing changed while their watch was down.

    Why: after a watch stream breaks and cannot resume (410 Gone: its resourceVersion was
    compacted), kopf lists again and hands every object to the handlers as a listing event (type
    None), the same as at start-up. At start-up a child's listing needs no pass of its own (each
    run's listing queues the run); after a re-listing, a child that changed during the gap (a pod
    that went Running) has no other event that would ever queue its run. Event-loop only.
    """

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def changed(self, uid: str, version: str) -> bool:
        """Record ``version``; True if ``uid`` was seen before at another version."""
        before = self._seen.get(uid)
        self._seen[uid] = version
        return before is not None and before != version

    def forget(self, uid: str) -> None:
        self._seen.pop(uid, None)

    def seen(self, uid: str) -> bool:
        return uid in self._seen

    def version(self, uid: str) -> int:
        """The last version seen as an int (etcd's revision), -1 if unknown."""
        try:
            return int(self._seen.get(uid) or -1)
        except ValueError:
            return -1

    def __len__(self) -> int:
        return len(self._seen)


class EndlessBackoffs:
    """Delays for kopf's retries of API errors that never run out (``networking.error_backoffs``).

    Why: kopf retries a request failing with 5xx (or 403, a refused connection) with the delays
    it is given and then raises; for a watch stream that error ends the operator (kopf's default,
    1+1+2+...+21 s, is 54 s: measured, an API server answering 503 for 55 s made the operator
    exit 1). An API server that answers 5xx for a minute (etcd away, an overloaded apiserver) is
    an outage to wait out, as a refused connection already is. Iterable but not ``Sized``: kopf
    then counts no last attempt, and every request iterates afresh.
    """

    def __init__(self, first: Iterable[float] = (1, 1, 2, 3, 5, 8, 13, 21), then: float = 30.0) -> None:
        self.first, self.then = tuple(first), then

    def __iter__(self) -> Iterator[float]:
        yield from self.first
        while True:
            yield self.then


def find_ghosts(
    cached: Iterable[tuple[Key, str, int]], listed: Iterable[str], listed_at: int
) -> list[tuple[Key, str]]:
    """``(key, uid)`` of cached objects that a fresh LIST (at resourceVersion ``listed_at``)
    does not show and that are not newer than that LIST: deleted while their watch was down.

    Why: kopf re-lists after a watch cannot resume (410) but never drops from its indexes the
    objects that the re-listing no longer shows (client-go's informers do, with
    ``DeletedFinalStateUnknown``); a Service deleted during the gap would stay "present" in the
    cache for good and never be recreated. Objects newer than the LIST came after it: not ghosts.
    """
    shown = set(listed)
    return [(key, uid) for key, uid, version in cached if uid not in shown and 0 <= version <= listed_at]


def retry_after_seconds(value: str | None) -> float | None:
    """The ``Retry-After`` header's delay in seconds (delta-seconds or an HTTP date; RFC 9110),
    None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


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
