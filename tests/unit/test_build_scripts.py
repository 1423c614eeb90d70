"""The control-plane and Helm build scripts, run end to end with a fake Go toolchain.

Defect 6 of issue 9: after a full 453 s build, ``build.sh`` ended with ``etcd --version | head -1``
under ``pipefail`` and exited 141 (SIGPIPE); ``build-helm.sh`` called a bare ``go``, so on a
machine without Go the toolchain ``build.sh`` fetches was not used. A fake ``go`` that "builds"
stub binaries (whose ``--version`` prints many lines, as SIGPIPE needs) makes both paths cheap.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tests" / "controlplane" / "build.sh"
BUILD_HELM = REPO / "tests" / "helm" / "build-helm.sh"

STUB = """#!/bin/bash
if [[ "$1" == --version || "$1" == version ]]; then
  for i in $(seq 3000); do echo "$(basename "$0") Version: 9.9.$i"; done
fi
"""

FAKE_GO = """#!/bin/bash
echo "go $*" >> "$FAKE_GO_LOG"
stub() {{ cp "{stub}" "$1"; chmod +x "$1"; }}
case "$1" in
  env) echo go1.24.13 ;;
  version) echo "go version go1.24.13 fake/amd64" ;;
  build)
    out=""; prev=""
    for a in "$@"; do [[ "$prev" == -o ]] && out="$a"; prev="$a"; done
    for b in kube-apiserver kube-controller-manager kube-scheduler kubectl server; do stub "$out/$b"; done ;;
  install)
    last="${{@: -1}}"; name="${{last%@*}}"; stub "$GOBIN/$(basename "$name")" ;;
esac
"""


def fake_go(tmp_path: Path) -> tuple[Path, Path]:
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB)
    go = tmp_path / "fake-go"
    go.write_text(FAKE_GO.format(stub=stub))
    go.chmod(0o755)
    return go, tmp_path / "go.log"


def run(script: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    go, log = fake_go(tmp_path)
    # PATH without any real go: only the fake one (via KUBEARCH_GO) can build.
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "FAKE_GO_LOG": str(log)}
    return subprocess.run(
        ["bash", str(script)],
        env={**base, "KUBEARCH_GO": str(go), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_controlplane_build_succeeds_after_building_and_prints_the_directory(tmp_path: Path) -> None:
    dest = tmp_path / "cp" / "v0"
    proc = run(BUILD, tmp_path, KUBEARCH_CONTROLPLANE_DIR=str(dest), KUBEARCH_BUILD_JOBS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]  # was 141: `etcd --version | head -1`
    assert proc.stdout.strip().splitlines()[-1] == str(dest)
    assert "etcd Version: 9.9.1\n" in proc.stderr and "etcd Version: 9.9.2\n" not in proc.stderr
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "kwok"):
        assert os.access(dest / name, os.X_OK), name
    go_calls = (tmp_path / "go.log").read_text()
    assert "go build" in go_calls and "sigs.k8s.io/kwok/cmd/kwok@" in go_calls

    # second run: every binary is there, nothing is built, the directory is printed again
    (tmp_path / "go.log").unlink()
    again = run(BUILD, tmp_path, KUBEARCH_CONTROLPLANE_DIR=str(dest))
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(dest)
    assert "already built" in again.stderr and not (tmp_path / "go.log").exists()


def test_helm_build_uses_the_shared_toolchain_not_a_bare_go(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = run(BUILD_HELM, tmp_path, KUBEARCH_CACHE=str(cache), HELM_VERSION="v0.0.0")
    assert proc.returncode == 0, proc.stderr[-2000:]  # was: `go: command not found`
    assert os.access(cache / "helm" / "v0.0.0" / "helm", os.X_OK)
    assert "install -trimpath" in (tmp_path / "go.log").read_text()
    again = run(BUILD_HELM, tmp_path, KUBEARCH_CACHE=str(cache), HELM_VERSION="v0.0.0")
    assert again.returncode == 0 and "cached" in again.stdout
