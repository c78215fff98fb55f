"""Signals that end a program, named and described for people: one table for the server's
``cause``/``signal`` fields, the kernel's wording of a failed cell and the checking verdicts.

A shell reports a command killed by signal N as exit status ``128 + N`` (139 for SIGSEGV).
Only signals whose default action ends a process are *fatal* here: a status of 148
(128 + SIGTSTP) is not a death.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Final

#: What each fatal signal means, in the words a student can look up. The names are Linux's;
#: a name this platform lacks is simply never matched.
DESCRIPTIONS: Final[Mapping[str, str]] = {
    "SIGHUP": "hangup",
    "SIGINT": "interrupted",
    "SIGQUIT": "quit",
    "SIGILL": "illegal instruction",
    "SIGTRAP": "trace trap",
    "SIGABRT": "aborted",
    "SIGBUS": "bus error",
    "SIGFPE": "floating-point exception",
    "SIGKILL": "killed",
    "SIGUSR1": "user signal 1",
    "SIGSEGV": "segmentation fault",
    "SIGUSR2": "user signal 2",
    "SIGPIPE": "broken pipe",
    "SIGALRM": "alarm clock",
    "SIGTERM": "terminated",
    "SIGSTKFLT": "stack fault",
    "SIGXCPU": "CPU time limit exceeded",
    "SIGXFSZ": "file size limit exceeded",
    "SIGVTALRM": "virtual timer expired",
    "SIGPROF": "profiling timer expired",
    "SIGIO": "I/O possible",
    "SIGPWR": "power failure",
    "SIGSYS": "bad system call",
}

#: Exit statuses above this are ``128 + signal`` when a shell reports a killed command.
SHELL_SIGNAL_BASE: Final = 128


def signal_name(number: int) -> str | None:
    """``"SIGSEGV"`` for 11: the name of a signal that ends a process, or None for a number
    that is no such signal on this platform (0, 20 = SIGTSTP, 1000...)."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return None
    return name if name in DESCRIPTIONS else None


def signal_of_status(exit_status: int) -> str | None:
    """The fatal signal an exit status stands for as a shell reports it (139: ``"SIGSEGV"``),
    else None (0, 1, 127, 255...). Negative statuses are None: in the sandbox protocol they
    are the sandbox's own (-2 is a timeout, not SIGINT); for Python's ``returncode`` of -N,
    ask :func:`signal_name` for N."""
    if exit_status > SHELL_SIGNAL_BASE:
        return signal_name(exit_status - SHELL_SIGNAL_BASE)
    return None


def describe_signal(signal_or_name: int | str) -> str:
    """``"segmentation fault"`` for 11, ``"SIGSEGV"`` or ``"SEGV"``: what a signal means.

    Never fails: a signal without a description is described by its name (``"signal
    SIGWINCH"``), an unknown number or name by itself (``"signal 99"``)."""
    if isinstance(signal_or_name, int):
        try:
            name = signal.Signals(signal_or_name).name
        except ValueError:
            return f"signal {signal_or_name}"
    else:
        name = signal_or_name.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
    return DESCRIPTIONS.get(name, f"signal {name}")
