"""The one table of fatal signals (``sandbox_kernel._signals``): names and descriptions that
the server's ``cause``, the kernel's wording and the check verdicts share."""

from __future__ import annotations

import signal

import pytest

from sandbox_kernel._signals import (
    DESCRIPTIONS,
    describe_signal,
    signal_name,
    signal_of_status,
)


@pytest.mark.parametrize(
    ("number", "name", "description"),
    [
        (signal.SIGSEGV, "SIGSEGV", "segmentation fault"),
        (signal.SIGABRT, "SIGABRT", "aborted"),
        (signal.SIGFPE, "SIGFPE", "floating-point exception"),
        (signal.SIGBUS, "SIGBUS", "bus error"),
        (signal.SIGILL, "SIGILL", "illegal instruction"),
        (signal.SIGKILL, "SIGKILL", "killed"),
        (signal.SIGXFSZ, "SIGXFSZ", "file size limit exceeded"),
        (signal.SIGXCPU, "SIGXCPU", "CPU time limit exceeded"),
        (signal.SIGTERM, "SIGTERM", "terminated"),
        (signal.SIGINT, "SIGINT", "interrupted"),
        (signal.SIGPIPE, "SIGPIPE", "broken pipe"),
        (signal.SIGSYS, "SIGSYS", "bad system call"),
    ],
)
def test_common_signals_are_named_and_described(number: int, name: str, description: str) -> None:
    assert signal_name(number) == name
    assert describe_signal(number) == description
    assert describe_signal(name) == description
    assert describe_signal(name.removeprefix("SIG").lower()) == description


@pytest.mark.parametrize("number", [0, signal.SIGTSTP, signal.SIGCHLD, signal.SIGCONT, 1000, -11])
def test_numbers_that_kill_nothing_have_no_name(number: int) -> None:
    assert signal_name(number) is None


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (139, "SIGSEGV"),  # bash: 128 + 11
        (134, "SIGABRT"),
        (137, "SIGKILL"),
        (159, "SIGSYS"),  # the seccomp filter's kill
        (0, None),
        (1, None),
        (127, None),
        (128, None),
        (148, None),  # 128 + SIGTSTP: a stop, not a death
        (255, None),
        (-1, None),  # the protocol's own statuses, not signals
        (-2, None),  # the timeout: not SIGINT
        (-11, None),
    ],
)
def test_exit_statuses_stand_for_fatal_signals(status: int, name: str | None) -> None:
    assert signal_of_status(status) == name


def test_descriptions_never_fail() -> None:
    assert describe_signal(signal.SIGWINCH) == "signal SIGWINCH"
    assert describe_signal(99) == "signal 99"
    assert describe_signal("SIGNOPE") == "signal SIGNOPE"
    assert describe_signal(" sigsegv ") == "segmentation fault"


def test_every_described_signal_that_exists_here_is_named_by_its_number() -> None:
    """The table and ``signal_name`` agree: no description is out of reach."""
    existing = [name for name in DESCRIPTIONS if hasattr(signal, name)]
    assert len(existing) >= 20
    for name in existing:
        assert signal_name(int(getattr(signal, name))) == name
