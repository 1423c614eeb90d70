"""A "process kubelet": runs the pods of one TrainingRun as local processes, for end-to-end tests.

The operator's integration tests have a real API server but no kubelet, so nothing ever runs the
pods it creates. This class plays the node agent for the pods of one run (label selector
``kubearch.dev/run=<name>``) in one namespace, closely enough that the real contract is exercised:
operator -> pod spec -> trainer under torchrun -> termination message -> pod status -> run status.

What it does, like a kubelet:

* **Volumes.** A ConfigMap volume becomes a directory holding one file per key (read from the API
  at pod start, so a restarted group sees the operator's updated config; container paths in the
  files' text are remapped like args, as there is no mount namespace); an emptyDir a fresh
  directory per pod; a persistentVolumeClaim a directory per claim, shared by every pod that
  mounts it (a ReadWriteMany volume, so a restarted group resumes from its checkpoint). Every
  ``volumeMounts[].mountPath`` (and the ``terminationMessagePath``) is a path prefix remapped to
  those directories wherever it appears in args or env values.
* **``$(VAR)``** in env values, command and args is expanded from the container's env with
  Kubernetes' rules (``$$`` escapes, unknown names stay as they are); ``fieldRef`` env resolves
  ``metadata.name``/``metadata.namespace``.
* **Init containers** run in order, then the container; stdout+stderr go to a log file per
  container; the pod's status subresource goes Pending -> Running -> Succeeded/Failed with the
  container's ``state.terminated`` (exitCode, reason, message = the termination-message file,
  truncated to 4096 bytes; ``FallbackToLogsOnError`` = the log's last 80 lines / 2048 bytes when
  the file is empty and the container failed). A signal death reads as 128 + signal, as from a
  container runtime.
* **Deletion.** A pod that is deleted (group restart, suspend, cleanPodPolicy) has its process
  group sent SIGTERM, then SIGKILL after ``grace_seconds``; when a container's main process exits,
  the rest of its process group is killed too (a container dies with its PID 1).

Deliberate deviations (no images, no containers, no cluster DNS, no GPUs): commands run from this
Python environment (its ``bin`` first on PATH, so ``python``/``torchrun`` are this venv's; ``torchrun``
falls back to ``python -m torch.distributed.run``) with the test process's environment underneath
the pod's env; and ``MASTER_ADDR``/``PET_MASTER_ADDR`` are replaced by 127.0.0.1 with a free
``MASTER_PORT``/``PET_MASTER_PORT`` per attempt of the run, because the pod's stable DNS name
(hostname + subdomain + headless Service) resolves only through cluster DNS. No resource limits,
probes, or restartPolicy other than ``Never`` (the operator's pods use Never).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controlplane import free_port
from kubernetes.client.rest import ApiException

TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a termination-message file
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # FallbackToLogsOnError's tail
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` -> ``$``, an undefined ``$(VAR)`` stays verbatim."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def remap(text: str, mounts: dict[str, str]) -> str:
    """Replace each container path prefix in ``text`` with its local directory.

    A prefix counts only as a whole path: not preceded or followed by a name character, so
    ``/checkpoints`` matches in ``--out=/checkpoints/run`` and ``outputDir: /checkpoints`` but not
    in ``/data/checkpoints-old`` (nor inside a directory this class already substituted).
    """
    for inside in sorted(mounts, key=len, reverse=True):  # the longest (most specific) mount wins
        pattern = r"(?<![\w./-])" + re.escape(inside.rstrip("/")) + r"(?![\w.-])"
        text = re.sub(pattern, lambda m, p=mounts[inside]: p, text)
    return text


class ProcessKubelet:
    """Runs the pods of run ``run`` in ``namespace`` as process groups under ``workdir``.

    ``selector`` widens that to any pods (e.g. ``kubearch.dev/run`` for every run of a search's
    trials in a test namespace); each run and attempt still gets its own master port.
    """

    def __init__(
        self,
        core: Any,
        namespace: str,
        run: str,
        workdir: Path,
        *,
        poll: float = 0.3,
        grace_seconds: float = 5,
        selector: str | None = None,
    ) -> None:
        self.core, self.namespace, self.run, self.workdir = core, namespace, run, Path(workdir)
        self.poll, self.grace_seconds = poll, grace_seconds
        self.selector = selector or f"kubearch.dev/run={run}"
        self.ports: dict[tuple[str, str], int] = {}  # (run label, attempt label) -> MASTER_PORT
        self.procs: dict[str, subprocess.Popen] = {}  # pod uid -> the container process running now
        self.deleted: set[str] = set()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._watch, name=f"kubelet-{run}", daemon=True)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> ProcessKubelet:
        self._loop.start()
        return self

    def stop(self) -> None:
        """Stop watching, kill every container still running, wait for the pod threads."""
        self._stop.set()
        self._loop.join(timeout=10)
        for uid in list(self.procs):
            self.deleted.add(uid)
            self._kill(uid)
        for thread in list(self._threads.values()):
            thread.join(timeout=self.grace_seconds + 5)

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pod_dir(self, pod_name: str, attempt: int = 0) -> Path:
        """The local directory of pod ``pod_name`` of ``attempt`` (logs are ``<container>.log``)."""
        return self.workdir / f"{pod_name}-a{attempt}"

    def claim_dir(self, claim: str) -> Path:
        return self.workdir / "pvc" / claim

    # ----------------------------------------------------------------------------- the watch loop
    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
            except ApiException:  # a blip of the API server: try again at the next poll
                self._stop.wait(self.poll)
                continue
            live = {p.metadata.uid: p for p in pods if p.metadata.deletion_timestamp is None}
            for uid in set(self._threads) - set(live):
                if uid not in self.deleted:  # deleted: kill it without holding up the watch
                    self.deleted.add(uid)
                    threading.Thread(target=self._kill, args=(uid,), daemon=True).start()
            for uid, pod in live.items():
                if uid not in self._threads and uid not in self.deleted:
                    body = self.core.api_client.sanitize_for_serialization(pod)
                    thread = threading.Thread(target=self._run_pod, args=(body,), daemon=True)
                    self._threads[uid] = thread
                    thread.start()
            self._stop.wait(self.poll)

    def _kill(self, uid: str) -> None:
        """SIGTERM the container's process group, SIGKILL it after the grace period."""
        proc = self.procs.get(uid)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.grace_seconds), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    # ----------------------------------------------------------------------------- one pod
    def _run_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, attempt = meta["uid"], meta["labels"].get("kubearch.dev/attempt", "0")
        root = self.pod_dir(meta["name"], int(attempt))
        root.mkdir(parents=True, exist_ok=True)
        try:
            volumes = self._volumes(spec.get("volumes") or [], root)
        except ApiException as err:  # e.g. the ConfigMap is missing: a real pod would wait
            self._patch(pod, {"phase": "Failed", "reason": "ConfigError", "message": str(err.reason)})
            return
        with self._lock:
            port = self.ports.setdefault((meta["labels"].get("kubearch.dev/run", ""), attempt), free_port())
        self._patch(
            pod, {"phase": "Pending", "startTime": _now(), "hostIP": "127.0.0.1", "podIP": "127.0.0.1"}
        )
        for init in spec.get("initContainers") or []:
            code, _ = self._run_container(uid, meta, init, volumes, root, port)
            if uid in self.deleted:
                return
            if code != 0:
                state = self._terminated(code, init, root)
                self._patch(pod, {"phase": "Failed", "initContainerStatuses": [_cstatus(init, state)]})
                return
        container = spec["containers"][0]
        started = _now()
        self._patch(
            pod,
            {
                "phase": "Running",
                "containerStatuses": [_cstatus(container, {"running": {"startedAt": started}})],
            },
        )
        code, _ = self._run_container(uid, meta, container, volumes, root, port)
        if uid in self.deleted:
            return  # a deleted pod's status is nobody's business any more
        state = self._terminated(code, container, root, started)
        phase = "Succeeded" if code == 0 else "Failed"
        self._patch(pod, {"phase": phase, "containerStatuses": [_cstatus(container, state)]})

    def _volumes(self, volumes: list[dict[str, Any]], root: Path) -> dict[str, tuple[Path, dict[str, str]]]:
        """Volume name -> (local directory, the files a ConfigMap puts there; {} for other kinds)."""
        out: dict[str, tuple[Path, dict[str, str]]] = {}
        for vol in volumes:
            files: dict[str, str] = {}
            if "configMap" in vol:
                cm = self.core.read_namespaced_config_map(vol["configMap"]["name"], self.namespace)
                path, files = root / "volumes" / vol["name"], dict(cm.data or {})
            elif "persistentVolumeClaim" in vol:
                path = self.claim_dir(vol["persistentVolumeClaim"]["claimName"])
            else:  # emptyDir (and anything else): scratch space that lives as long as the pod
                path = Path(tempfile.mkdtemp(prefix=f"{vol['name']}-", dir=root))
            path.mkdir(parents=True, exist_ok=True)
            out[vol["name"]] = (path, files)
        return out

    def _run_container(
        self, uid: str, meta: dict, container: dict, volumes: dict, root: Path, port: int
    ) -> tuple[int, Path]:
        if uid in self.deleted:
            return 128 + signal.SIGKILL, root
        used = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or []}
        mounts = {inside: str(path) for inside, (path, _) in used.items()}
        term = container.get("terminationMessagePath", "/dev/termination-log")
        mounts[term] = str(root / f"{container['name']}.termination-log")
        Path(mounts[term]).write_text("")
        for path, files in used.values():  # container paths inside config files are remapped too
            for key, text in files.items():
                (path / key).write_text(remap(text, mounts))
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = remap(expand(item["value"], env), mounts)
            elif ref := (item.get("valueFrom") or {}).get("fieldRef"):
                env[item["name"]] = {"metadata.name": meta["name"], "metadata.namespace": self.namespace}.get(
                    ref["fieldPath"], ""
                )
        for name in ("MASTER_ADDR", "PET_MASTER_ADDR"):  # no cluster DNS: see the module docstring
            if name in env:
                env[name] = "127.0.0.1"
        for name in ("MASTER_PORT", "PET_MASTER_PORT"):
            if name in env:
                env[name] = str(port)
        argv = [
            remap(expand(a, env), mounts) for a in [*container.get("command", []), *container.get("args", [])]
        ]
        bindir = str(Path(sys.executable).parent)
        path = bindir + os.pathsep + os.environ.get("PATH", "")
        exe = shutil.which(argv[0], path=path)
        if exe is None and argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        elif exe is not None:
            argv[0] = exe
        log_path = root / f"{container['name']}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=root, env={**os.environ, "PATH": path, **env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.procs[uid] = proc
            if uid in self.deleted:  # deleted while this container was being started
                self._kill(uid)
            code = proc.wait()
        with contextlib.suppress(ProcessLookupError):  # a container dies with its main process
            os.killpg(proc.pid, signal.SIGKILL)
        return (128 - code if code < 0 else code), log_path

    def _terminated(self, code: int, container: dict, root: Path, started: str | None = None) -> dict:
        """``state.terminated`` as the kubelet writes it, message included."""
        term = root / f"{container['name']}.termination-log"
        message = (
            term.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace") if term.exists() else ""
        )
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = (root / f"{container['name']}.log").read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            message = b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        state = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": _now()}
        state["startedAt"] = started or state["finishedAt"]
        if message:
            state["message"] = message
        return {"terminated": state}

    def _patch(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        # metadata.uid is a precondition: never write into a same-named pod of the next attempt.
        body = {"metadata": {"uid": pod["metadata"]["uid"]}, "status": status}
        try:
            self.core.patch_namespaced_pod_status(pod["metadata"]["name"], self.namespace, body)
        except ApiException as err:
            if err.status not in (404, 409):  # a pod deleted (or replaced) meanwhile: nothing to write
                raise


def _cstatus(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    running = "running" in state
    return {
        "name": container["name"], "image": container.get("image", ""), "imageID": "",
        "ready": running, "started": running, "restartCount": 0, "state": state,
    }  # fmt: skip
