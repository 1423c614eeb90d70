"""A fault-injecting reverse proxy between the operator and kube-apiserver (issue 9).

The operator is given a kubeconfig whose server is this proxy; everything it sends is forwarded to
the real API server (watch streams too, chunk by chunk, as they arrive) unless a rule says
otherwise. The test changes the rules while the operator runs:

* :meth:`FaultProxy.inject`: answer requests that match a method and a path regex with 409, 429
  (with ``Retry-After``), 500 or 503, worded as the API server words them (a ``Status`` object),
  ``times`` times or with a seeded ``probability``; optionally *after* forwarding the request (the
  API server did the work, the answer is lost: what a timeout looks like to a client);
* :meth:`FaultProxy.drop_watches`: cut every open watch stream mid-stream (the chunked body ends
  without its last chunk, as when a load balancer or the API server goes away); optionally refuse
  new watches for a while (503) and/or answer the next reconnection of each stream with
  ``410 Gone`` ("too old resource version", as after an etcd compaction), which forces the client
  to list again;
* :attr:`FaultProxy.log` / :meth:`FaultProxy.count`: every request seen, with its time, method,
  path, the status returned and whether it was injected.

Why a proxy and not mocks: the operator runs unchanged as a real process (kopf's aiohttp watches
and the kubernetes client's urllib3 requests both go through it), so what is tested is the
operator's real reaction to what a real API server under load or behind a flaky network sends.

aiohttp does the HTTP on both sides (server and client); TLS: the proxy serves the API server's
own certificate (valid for 127.0.0.1), so the kubeconfig keeps the same CA and token, and
forwards to the API server trusting that CA. The proxy runs its own event loop in a thread; every
public method is thread-safe.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

#: Headers that describe one hop's connection, not the message: never forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Host",
    )
)

#: reason and message of each injected status, as kube-apiserver words them.
STATUS_WORDING: dict[int, tuple[str, str]] = {
    409: (
        "Conflict",
        'Operation cannot be fulfilled on {resource} "{name}": the object has been modified;'
        " please apply your changes to the latest version and try again",
    ),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: {name}: injected by the fault proxy"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
}


def status_body(code: int, path: str, retry_after: int | None = None) -> dict[str, Any]:
    """A ``v1 Status`` for ``code`` on ``path`` (``/api/v1/namespaces/ns/pods/name``)."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    resource, name = _resource_and_name(parts)
    reason, message = STATUS_WORDING[code]
    details: dict[str, Any] = {"name": name, "kind": resource}
    if code == 429 and retry_after is not None:
        details["retryAfterSeconds"] = retry_after
    if code == 500:
        details["causes"] = [{"message": "injected by the fault proxy"}]
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.format(resource=resource, name=name),
        "reason": reason,
        "details": details,
        "code": code,
    }


def _posted_name(body: bytes | None) -> str:
    """``metadata.name`` of a JSON object being created ("" if none or not JSON)."""
    try:
        meta = json.loads(body or b"{}").get("metadata") or {}
    except (ValueError, AttributeError):
        return ""
    return str(meta.get("name") or meta.get("generateName") or "")


def _resource_and_name(parts: list[str]) -> tuple[str, str]:
    """``[api, v1, namespaces, ns, pods, name, status]`` -> ``("pods", "name")``."""
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2 :]
        if not rest:  # the namespace itself
            return "namespaces", parts[parts.index("namespaces") + 1]
    else:
        rest = parts[2:] if parts and parts[0] == "api" else parts[3:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    return resource, name


@dataclass
class Rule:
    """Answer requests matching ``method`` and ``path`` (a regex searched in the path without the
    query) with ``status``. ``times``: how many answers left (None: no limit)."""

    method: str
    path: re.Pattern[str]
    status: int
    times: int | None = None
    probability: float = 1.0
    retry_after: int | None = None
    after_forward: bool = False
    seen: int = 0
    injected: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.method in (method, "*") and self.path.search(path) is not None


@dataclass(frozen=True)
class Seen:
    """One request the proxy saw."""

    at: float  # time.monotonic()
    method: str
    path: str
    query: str
    status: int
    injected: bool
    name: str = ""  # metadata.name of a POSTed object (the path of a create does not name it)
    upstream: int = 0  # the API server's status when the request was forwarded (0: it was not)

    @property
    def watch(self) -> bool:
        return "watch=true" in self.query or "watch=1" in self.query


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Watch:
    request: web.Request
    upstream: aiohttp.ClientResponse
    path: str


@dataclass
class FaultProxy:
    """See the module docstring. ``start()`` it, point a kubeconfig at :attr:`server`."""

    upstream: str  # https://127.0.0.1:port of kube-apiserver
    pki: Path  # the control plane's pki directory: ca.crt, apiserver.crt, apiserver.key
    seed: int = 0
    port: int = 0
    log: list[Seen] = field(default_factory=list)
    _rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _watches: set[Any] = field(default_factory=set)  # _Watch objects; touched only in the loop
    _refuse_watches_until: float = 0.0
    _refuse_pattern: re.Pattern[str] = field(default_factory=lambda: re.compile(""))
    _expire_next: set[str] = field(default_factory=set)  # watch paths whose next resume gets 410
    _rng: random.Random = field(init=False)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # --------------------------------------------------------------------------------------------
    # life cycle
    # --------------------------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as err:  # reported to start()'s caller
                errors.append(err)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=main, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(30) or errors:
            raise RuntimeError(f"fault proxy did not start: {errors[0] if errors else 'timeout'}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
        self._loop = self._thread = None

    async def _serve(self) -> None:
        client_ssl = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl, limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(str(self.pki / "apiserver.crt"), str(self.pki / "apiserver.key"))
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=server_ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        self._cut_watches()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------------
    # rules (called from the test's thread)
    # --------------------------------------------------------------------------------------------
    def inject(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int | None = None,
        probability: float = 1.0,
        retry_after: int | None = None,
        after_forward: bool = False,
    ) -> Rule:
        """Answer matching requests with ``status`` (409/429/500/503) until :meth:`remove`."""
        if status not in STATUS_WORDING:
            raise ValueError(f"status: {status} is not one of {sorted(STATUS_WORDING)}")
        rule = Rule(method.upper(), re.compile(path), status, times, probability, retry_after, after_forward)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._refuse_watches_until = 0.0
            self._expire_next.clear()

    def drop_watches(self, path: str = "", *, refuse_for: float = 0.0, expire: bool = False) -> int:
        """Cut every open watch stream (whose path matches the regex ``path``) now; returns how
        many were cut.

        ``refuse_for``: answer new watch requests with 503 for that many seconds. ``expire``: the
        next watch request of each cut stream that resumes from a resourceVersion is answered
        with a ``410 Gone`` ERROR event, so the client must list again.
        """
        assert self._loop is not None
        pattern = re.compile(path)
        with self._lock:
            self._refuse_watches_until = time.monotonic() + refuse_for
            self._refuse_pattern = pattern
        future = asyncio.run_coroutine_threadsafe(self._drop(pattern, expire), self._loop)
        return future.result(timeout=10)

    async def _drop(self, pattern: re.Pattern[str], expire: bool) -> int:
        if expire:
            with self._lock:
                self._expire_next |= {w.path for w in self._watches if pattern.search(w.path)}
        return self._cut_watches(pattern)

    def _cut_watches(self, pattern: re.Pattern[str] | None = None) -> int:
        cut = 0
        for w in list(self._watches):
            if pattern is not None and not pattern.search(w.path):
                continue
            self._watches.discard(w)
            transport = w.request.transport
            if transport is not None:
                transport.abort()  # no last chunk: the client sees a broken chunked body
            w.upstream.close()
            cut += 1
        return cut

    def open_watches(self, path: str = "") -> int:
        """How many watch streams (whose path matches the regex ``path``) are open now."""
        assert self._loop is not None
        pattern = re.compile(path)
        return asyncio.run_coroutine_threadsafe(self._count_watches(pattern), self._loop).result(timeout=10)

    async def _count_watches(self, pattern: re.Pattern[str]) -> int:
        return sum(1 for w in self._watches if pattern.search(w.path))

    def watched_paths(self, path: str = "") -> set[str]:
        """Every path a watch was ever opened on (matching the regex ``path``)."""
        return {s.path for s in self.requests("GET", path) if s.watch}

    def requests(self, method: str = "*", path: str = "", since: float = 0.0) -> list[Seen]:
        """The requests seen since ``since`` (monotonic) whose method and path match."""
        pattern = re.compile(path)
        with self._lock:
            seen = list(self.log)
        return [
            s
            for s in seen
            if s.at >= since and method in ("*", s.method) and pattern.search(s.path) is not None
        ]

    def count(self, method: str = "*", path: str = "", since: float = 0.0) -> int:
        return len(self.requests(method, path, since))

    def iter_rules(self) -> Iterator[Rule]:
        with self._lock:
            yield from list(self._rules)

    # --------------------------------------------------------------------------------------------
    # the proxy (in the proxy's event loop)
    # --------------------------------------------------------------------------------------------
    def _decide(self, method: str, path: str, watch: bool) -> tuple[Rule | None, str | None]:
        """The rule that fires for this request, or a watch verdict ("refuse"/"expire")."""
        with self._lock:
            if watch and time.monotonic() < self._refuse_watches_until and self._refuse_pattern.search(path):
                return None, "refuse"
            for rule in self._rules:
                if not rule.matches(method, path):
                    continue
                rule.seen += 1
                if rule.times is not None and rule.times <= 0:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                rule.injected += 1
                return rule, None
        return None, None

    def _record(
        self, request: web.Request, status: int, injected: bool, name: str = "", upstream: int = 0
    ) -> None:
        with self._lock:
            self.log.append(
                Seen(
                    time.monotonic(),
                    request.method,
                    request.path,
                    request.query_string,
                    status,
                    injected,
                    name,
                    upstream,
                )
            )

    def _status_response(
        self,
        request: web.Request,
        code: int,
        retry_after: int | None = None,
        name: str = "",
        upstream: int = 0,
    ) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self._record(request, code, True, name, upstream)
        return web.json_response(status_body(code, request.path, retry_after), status=code, headers=headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "1")
        body = await request.read() if request.can_read_body else None
        name = _posted_name(body) if request.method == "POST" else ""
        rule, verdict = self._decide(request.method, request.path, watch)
        if verdict == "refuse":
            return self._status_response(request, 503)
        if rule is not None and not rule.after_forward:
            return self._status_response(request, rule.status, rule.retry_after, name)
        if watch and "resourceVersion" in request.query:
            with self._lock:
                expire = request.path in self._expire_next
                self._expire_next.discard(request.path)
            if expire:
                return self._expired(request)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = await self._session.request(
            request.method,
            f"{self.upstream}{request.path_qs}",
            headers=headers,
            data=body,
            allow_redirects=False,
            # The kubernetes client POSTs JSON without a Content-Type (the API server assumes
            # JSON); aiohttp would add application/octet-stream, which the API server refuses (415).
            skip_auto_headers=("Content-Type",),
        )
        if rule is not None:  # the API server did the work; its answer is lost
            await upstream.read()
            upstream.release()
            return self._status_response(request, rule.status, rule.retry_after, name, upstream.status)
        reply_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        if not watch or upstream.status != 200:
            payload = await upstream.read()
            upstream.release()
            self._record(request, upstream.status, False, name, upstream.status)
            return web.Response(body=payload, status=upstream.status, headers=reply_headers)
        return await self._stream(request, upstream, reply_headers)

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, headers: dict[str, str]
    ) -> web.StreamResponse:
        self._record(request, upstream.status, False, upstream=upstream.status)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        entry = _Watch(request, upstream, request.path)
        self._watches.add(entry)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, ConnectionError, RuntimeError, asyncio.CancelledError):
            pass  # cut by drop_watches(), or the client went away
        finally:
            self._watches.discard(entry)
            upstream.close()
        return response

    def _expired(self, request: web.Request) -> web.StreamResponse:
        """What kube-apiserver sends when a watch resumes from a compacted resourceVersion."""
        rv = request.query.get("resourceVersion", "")
        event = {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {rv} ({int(rv or 0) + 1})",
                "reason": "Expired",
                "code": 410,
            },
        }
        self._record(request, 410, True)
        return web.Response(
            body=(json.dumps(event) + "\n").encode(), status=200, content_type="application/json"
        )
