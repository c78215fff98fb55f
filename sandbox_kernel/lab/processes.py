"""Stopping like Ctrl-C: SIGTERM and SIGHUP raised as a KeyboardInterrupt, a child that dies
with ``lab``, and the processes of a tree that outlive their parent ended for good."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

#: Seconds a process left behind by JupyterLab gets after SIGTERM, before SIGKILL.
SURVIVOR_GRACE = 5.0


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that
    the three take the same way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM and SIGHUP raise :class:`StopSignal`; :meth:`ignore` then makes
    the shutdown itself (bounded in time) deaf to further signals, Ctrl-C included, so that
    it cannot be cut halfway, leaving kernels behind."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._saved = {signum: signal.getsignal(signum) for signum in self._SIGNALS}
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise StopSignal(signum)

    def ignore(self) -> None:
        for signum in self._SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def stopped_by(interrupt: KeyboardInterrupt) -> str:
    return interrupt.args[0] if isinstance(interrupt, StopSignal) else "Ctrl-C"


def exit_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` asking Linux to send SIGTERM to the child when ``lab`` dies, even
    killed outright (``PR_SET_PDEATHSIG``): JupyterLab then still shuts its kernels down."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # lab died before the call took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


#: A process as (pid, start time in clock ticks): a pid reused by a new process is not it.
_Process = tuple[int, int]


def process_tree(root: int) -> list[_Process]:
    """Every process below ``root``, by the parent links of /proc."""
    children: dict[int, list[_Process]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat_fields(int(entry))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append((int(entry), int(stat[19])))
    found: list[_Process] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(process: _Process) -> bool:
    """Still the same process, and not a zombie (a zombie holds nothing but its pid)."""
    stat = _stat_fields(process[0])
    return stat is not None and int(stat[19]) == process[1] and stat[0] not in ("Z", "X")


def end_survivors(tree: list[_Process]) -> None:
    for sig, grace in ((signal.SIGTERM, SURVIVOR_GRACE), (signal.SIGKILL, 1.0)):
        survivors = [process for process in tree if _running(process)]
        if not survivors:
            return
        for pid, _ in survivors:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(p) for p in survivors):
            time.sleep(0.05)
