"""The result of a check: what ``_`` holds after a ``%%sandbox_check`` cell in IPython, what
``sandbox-kernel grade`` reads, and what the views show."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class CaseResult:
    """One case: its verdict, the points it was worth and earned, and what was seen.

    ``detail``, ``got``, ``expected`` and ``stderr`` are kept for visible cases only: a
    hidden case's data never reaches the notebook, not even in ``_``.
    """

    name: str
    verdict: str
    points: float
    hidden: bool = False
    score: float = 0.0
    #: Seconds the case ran (None: it did not run).
    time: float | None = None
    exit_code: int | None = None
    #: The signal that ended it (``"SIGSEGV"``), for a ``runtime error``.
    signal: str | None = None
    #: Why it failed, in a few words (a diff for ``wrong output``).
    detail: str = ""
    got: str | None = None
    expected: str | None = None
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "verdict": self.verdict,
            "points": self.points,
            "score": self.score,
            "time": self.time,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "hidden": self.hidden,
            "detail": "" if self.hidden else self.detail,
        }
        if not self.hidden:
            data.update(got=self.got, expected=self.expected)
        return data

    def without_data(self) -> CaseResult:
        """This case as a hidden case may be shown: verdict, points, time."""
        return dataclasses.replace(self, detail="", got=None, expected=None, stderr="")


@dataclasses.dataclass
class CheckResult:
    """A table's verdicts: ``.score`` of ``.total`` points, ``.cases``, ``.passed``."""

    run: str
    cases: list[CaseResult]
    #: ``execute/`` requests the check took (the public server recycles a container for
    #: about 10 s after each one).
    requests: int = 0
    #: The seconds one request may take on the sandbox (the batches were planned on it).
    request_budget: float | None = None

    @property
    def score(self) -> float:
        return sum(case.score for case in self.cases)

    @property
    def total(self) -> float:
        return sum(case.points for case in self.cases)

    @property
    def passed(self) -> bool:
        """Every case passed."""
        return all(case.passed for case in self.cases)

    @property
    def score_line(self) -> str:
        return f"{_points(self.score)}/{_points(self.total)} points"

    def as_json(self) -> dict[str, Any]:
        """The JSON of the ``application/vnd.sandbox-kernel.check+json`` output."""
        return {
            "run": self.run,
            "score": self.score,
            "total": self.total,
            "passed": self.passed,
            "requests": self.requests,
            "cases": [case.as_json() for case in self.cases],
        }

    def __repr__(self) -> str:
        passed = sum(case.passed for case in self.cases)
        return f"<check of {self.run}: {self.score_line}, {passed}/{len(self.cases)} cases passed>"


def _points(value: float) -> str:
    return f"{value:g}"
