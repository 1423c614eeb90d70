"""Process exit codes of the trainer, shared with the operator's retry policy.

Why a table of our own: Kubernetes only sees a container's exit code, and the operator must tell
a run that will fail the same way again (bad config, out of memory, diverged) from one worth
restarting (preempted, node lost). Codes follow sysexits.h where one fits.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # an unexpected exception: retried while restarts remain
    CONFIG_ERROR = 64  # EX_USAGE: invalid configuration; never retried
    DATA_ERROR = 65  # EX_DATAERR: the data could not be read; never retried
    NAN_ABORT = 66  # too many non-finite losses in a row; never retried
    CUDA_OOM = 67  # CUDA out of memory; never retried (needs a smaller batch or more GPUs)


#: Exit codes after which restarting the group cannot help.
PERMANENT_EXIT_CODES = frozenset(
    {ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR, ExitCode.NAN_ABORT, ExitCode.CUDA_OOM}
)
#: SIGINT/SIGKILL/SIGTERM (128+n): preemption, eviction, node shutdown; worth a restart.
RETRYABLE_SIGNAL_EXIT_CODES = frozenset({130, 137, 143})
