"""The progress line of ``grade`` on stderr: ``12/40 notebooks · 1 min 20 s left``.

On a terminal the line is redrawn in place (``\\r``) and its estimate counts down between
notebooks; otherwise (a log, CI) one line is written per notebook graded, with its result.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Callable
from typing import TextIO

from .results import NotebookResult, Status


def format_duration(seconds: float) -> str:
    """``45 s``, ``1 min 20 s``, ``2 h 5 min``: rounded up to the second, as a wait is."""
    whole = max(0, math.ceil(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def estimate_left(durations: list[float], remaining: int, jobs: int) -> float | None:
    """Seconds until the ``remaining`` notebooks are graded, ``jobs`` at a time, each taking
    the mean of ``durations``; None before the first notebook is done (nothing to go by)."""
    if remaining <= 0:
        return 0.0
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    return mean * math.ceil(remaining / max(1, min(jobs, remaining)))


def result_text(result: NotebookResult) -> str:
    """``alice.ipynb: 7/10`` (and the status when it is not ok)."""
    text = f"{result.notebook}: {result.score:g}/{result.max:g}"
    return text if result.status is Status.OK else f"{text}, {result.status}"


class Progress:
    """Counts the notebooks graded and draws the line. Thread-safe: workers call :meth:`done`,
    the main thread may call :meth:`tick` to redraw a terminal's countdown."""

    def __init__(
        self,
        total: int,
        jobs: int,
        stream: TextIO,
        *,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.jobs = jobs
        self.stream = stream
        self.terminal = stream.isatty() if terminal is None else terminal
        self.clock = clock
        self.durations: list[float] = []
        self._lock = threading.Lock()
        self._estimated_at = clock()
        self._estimate: float | None = None
        self._last = ""

    @property
    def count(self) -> int:
        return len(self.durations)

    def line(self) -> str:
        """``12/40 notebooks · 1 min 20 s left`` (no estimate before the first is done)."""
        text = f"{self.count}/{self.total} notebooks"
        if self._estimate is None or self.count == self.total:
            return text
        left = max(0.0, self._estimate - (self.clock() - self._estimated_at))
        return f"{text} · {format_duration(left)} left"

    def start(self) -> None:
        if self.terminal:
            self._draw()

    def done(self, result: NotebookResult) -> None:
        with self._lock:
            self.durations.append(result.seconds)
            self._estimate = estimate_left(self.durations, self.total - self.count, self.jobs)
            self._estimated_at = self.clock()
            self._last = result_text(result)
            if self.terminal:
                self._draw()
            else:
                self._write(f"{self.line()} · {self._last}\n")

    def tick(self) -> None:
        """Redraw a terminal's line (its countdown moves between notebooks)."""
        if self.terminal:
            with self._lock:
                self._draw()

    def finish(self) -> None:
        """End a terminal's line, so that what follows starts on a new one."""
        if self.terminal:
            self._write("\n")

    def _draw(self) -> None:
        last = f" · last: {self._last}" if self._last else ""
        # Cut to the terminal's width: a line that wraps cannot be redrawn with \r.
        width = shutil.get_terminal_size().columns - 1
        self._write(f"\r{(self.line() + last)[:width]}\x1b[K")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: grading goes on
            pass
