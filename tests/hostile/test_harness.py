"""The after-case checks are not vacuous: a case that leaves a process, writes to the canary
and to the host's /tmp, and leaves an upload in staging/ is caught on every count (and is not
counted in the tally)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import processes_matching, wait_until
from .conftest import TALLY, Hostile


def test_the_checks_catch_what_they_must(hostile: Hostile) -> None:
    leftovers: list[Path] = []
    processes: list[subprocess.Popen[bytes]] = []

    def case(marker: str) -> None:
        processes.append(subprocess.Popen(["sleep", marker], start_new_session=True))
        assert wait_until(lambda: bool(processes_matching(marker)), 5)
        leftovers.extend(
            [
                Path("/tmp") / f"hostile-self-test-{marker}",
                hostile.canary / f"hostile-self-test-{marker}",
                hostile.staging / f"hostile-self-test-{marker}",
            ]
        )
        for path in leftovers:
            path.write_text("left behind")
        raise AssertionError("the documented answer was not given")

    hostile.patience = 0.3
    try:
        with pytest.raises(pytest.fail.Exception) as failure:
            hostile.trial("self-test", case)
    finally:
        hostile.patience = 5.0
        TALLY.pop("self-test", None)
        for process in processes:
            process.kill()
            process.wait()
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    message = str(failure.value)
    for expected in (
        "wrong answer: the documented answer was not given",
        "processes of the case left running",
        "the canary changed",
        "files written on the host: ['/tmp/hostile-self-test-",
        "left in staging/: ['hostile-self-test-",
    ):
        assert expected in message, message
