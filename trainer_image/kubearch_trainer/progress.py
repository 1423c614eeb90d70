"""What a person watching the run sees: log lines, and a status line on a terminal."""

from __future__ import annotations

import time
from typing import Any


def print_line(msg: str) -> None:
    print(msg, flush=True)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(frac: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, frac)) * width)
    return "#" * filled + "." * (width - filled)


class ProgressLine:
    """One self-overwriting status line on a terminal (``\\r`` + erase-line), between the log lines.

    Only on an interactive stdout: in a pod (kubectl logs) or a file, carriage returns would turn
    into thousands of lines, so there the regular ``log_every`` lines are all there is. Redraws
    are throttled to 10 per second; the loss shown is the last logged one (no extra host sync).
    """

    _ERASE = "\r\033[K"

    def __init__(self, stream: Any, min_interval_s: float = 0.1) -> None:
        self.stream = stream
        self.min_interval_s = min_interval_s
        self.active = False
        self._last = float("-inf")

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        import shutil

        width = shutil.get_terminal_size((100, 24)).columns
        self.stream.write(self._ERASE + text[: max(10, width - 1)])
        self.stream.flush()
        self.active = True

    def clear(self) -> None:
        if self.active:
            self.stream.write(self._ERASE)
            self.stream.flush()
            self.active = False
