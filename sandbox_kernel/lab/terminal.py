"""Talking to the user's terminal, which may be gone (SIGHUP) while ``lab`` shuts down."""

from __future__ import annotations

import contextlib
import os
import sys


def say(text: str, error: bool = False) -> None:
    """Print, even when the terminal is gone (after a SIGHUP): then nothing is shown, and the
    shutdown goes on."""
    stream = sys.stderr if error else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except OSError:
        with contextlib.suppress(OSError):
            devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
            sys.stdout = sys.stderr = devnull
