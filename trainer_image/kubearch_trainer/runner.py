"""The one trial runner: the trainer as a subprocess (plain, or under ``torchrun``) and its results.

Shared by ``kubearch compare`` (one run after the other, blocking, output on the terminal) and
``kubearch search`` (several trials at once, each logging to its own file, polled). Why a
subprocess per run: peak memory on CPU is the process's peak RSS, which only ever grows, so runs
sharing a process would inherit each other's peak; a crash, NaN abort or OOM also stays in its run.

This module imports neither torch nor the CLI (only :mod:`kubearch_trainer.args` for validation),
so ``cli`` -> ``compare`` -> ``runner`` has no cycle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from kubearch_trainer.config import TrainConfig

#: The trainer writes this into its output folder (kubearch_trainer.results.RESULTS_NAME).
RESULTS_NAME = "results.json"
#: Variables a parent torchrun may have set; a child run must start its own process group.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Exit code recorded when a run is stopped for running past its timeout (as coreutils' timeout).
TIMEOUT_EXIT = 124


def trainer_command(argv: list[str], nproc: int = 1, *, torchrun: bool | None = None) -> list[str]:
    """The trainer as a subprocess: under ``torchrun --standalone`` for several processes (or when
    ``torchrun`` is set, e.g. so a 1-process baseline pays the same launcher), else plain."""
    if not (nproc > 1 if torchrun is None else torchrun):
        return [sys.executable, "-m", "kubearch_trainer", *argv]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "kubearch_trainer", *argv]


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in _DIST_ENV:
        env.pop(key, None)
    return env


def check_trainer_argv(argv: list[str], prog: str = "kubearch") -> TrainConfig:
    """Validate trainer flags without starting anything; raises ConfigError naming the field."""
    from kubearch_trainer.args import _Parser, add_train_arguments, config_from_args

    parser = _Parser(prog=prog)
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def read_results(out: Path, code: int | None) -> dict[str, Any]:
    """The run's results.json, or a failed stand-in naming the exit code when there is none."""
    path = out / RESULTS_NAME
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        except ValueError:
            pass
    return {"status": "failed", "exit_code": code, "error": f"no results.json (exit {code})"}


def _clear(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stale = out / RESULTS_NAME
    if stale.exists():
        stale.unlink()  # never report a previous run's numbers


def run_trainer(
    argv: list[str], out: Path, nproc: int = 1, timeout: float | None = None
) -> tuple[dict[str, Any], float]:
    """Run the trainer to completion (output on this terminal); its results and the wall time."""
    _clear(out)
    t0 = time.time()
    try:
        code = subprocess.run(trainer_command(argv, nproc), env=trainer_env(), timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = TIMEOUT_EXIT
    return read_results(out, code), time.time() - t0


class TrialProcess:
    """One trainer run in the background, its output in ``log``; poll it, stop it, read its results."""

    def __init__(
        self,
        argv: list[str],
        out: Path,
        nproc: int = 1,
        log: Path | None = None,
        timeout: float | None = None,
    ) -> None:
        self.argv, self.out, self.nproc, self.timeout = argv, out, nproc, timeout
        self.log = log or out / "trainer.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._fh: IO[bytes] | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        _clear(self.out)
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed when the process is reaped
        self.started_at = time.time()
        self._proc = subprocess.Popen(
            trainer_command(self.argv, self.nproc),
            env=trainer_env(),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() signals torchrun and its workers together
        )

    def poll(self) -> int | None:
        """The exit code once the run has ended (a run past its timeout is stopped: 124)."""
        if self.returncode is not None or self._proc is None:
            return self.returncode
        code = self._proc.poll()
        started = self.started_at or 0.0
        if code is None and self.timeout is not None and time.time() - started > self.timeout:
            self.stop()
            code = TIMEOUT_EXIT
        if code is not None:
            self._reap(code)
        return self.returncode

    def _reap(self, code: int) -> None:
        self.returncode, self.ended_at = code, time.time()
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the run's process group (the trainer checkpoints and exits), SIGKILL after ``grace``."""
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None and self.returncode is None:
                self._reap(self._proc.returncode)
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        except ProcessLookupError:
            self._proc.wait()
        self._reap(self._proc.returncode)

    @property
    def running(self) -> bool:
        return self._proc is not None and self.poll() is None

    @property
    def wall_time(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    def results(self) -> dict[str, Any]:
        return read_results(self.out, self.returncode)
