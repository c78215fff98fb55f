"""What grading found, notebook by notebook: plain data that the report writes out.

A question's score comes only from the ``%%sandbox_check`` result the grader asked for (see
:mod:`.runner`); everything here is filled by the grader, never read from a submission.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Any


class Status(str, enum.Enum):
    """How grading a notebook ended (the ``status`` column)."""

    OK = "ok"
    TIMEOUT = "timeout"
    INVALID = "invalid notebook"
    KERNEL_DIED = "kernel died"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Question:
    """A test table of ``--tests``: ``tests/NAME.yaml`` grades the cell tagged ``check:NAME``."""

    name: str
    #: Points at most (the table's total).
    points: float
    #: The table's cases, by name (the count is what ``failed`` counts when nothing ran).
    case_names: tuple[str, ...]
    #: The body of the ``%%sandbox_check`` cell: the table with expected files inlined.
    table_text: str

    @property
    def check_code(self) -> str:
        """The cell the grader sends after the tagged cell."""
        return "%%sandbox_check\n" + self.table_text


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """One case of a check, as the kernel's ``%%sandbox_check`` reported it."""

    name: str
    verdict: str
    points: float
    score: float
    time: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    hidden: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


@dataclasses.dataclass
class QuestionResult:
    """A question of one notebook: scored when its check ran, else 0 with the reason."""

    question: Question
    score: float = 0.0
    #: Whether a check result came back (the last one counts when a cell is tagged twice).
    checked: bool = False
    cases: list[CaseResult] = dataclasses.field(default_factory=list)
    #: Why there is no score, or what the check said beside its cases.
    detail: str = ""

    @property
    def passed(self) -> int:
        return sum(case.passed for case in self.cases)

    def summary(self) -> str:
        """Why there is no score, or the verdicts of the cases not passed (``1 wrong output,
        2 time limit``); empty when every case passed."""
        if not self.checked:
            return self.detail
        counts = collections.Counter(case.verdict for case in self.cases if not case.passed)
        return ", ".join(f"{number} {verdict}" for verdict, number in counts.items())

    @property
    def failed(self) -> int:
        """Cases not passed; every case of the table when the check did not run."""
        count = len(self.cases) if self.checked else len(self.question.case_names)
        return count - self.passed


@dataclasses.dataclass(frozen=True)
class CellFailure:
    """A submission's cell that ended in error (1-based position among all cells)."""

    cell: int
    ename: str
    evalue: str

    def brief(self) -> str:
        return f"cell {self.cell}: {self.ename}: {self.evalue}"


@dataclasses.dataclass
class NotebookResult:
    """One row of the grades."""

    notebook: str
    questions: dict[str, QuestionResult]
    status: Status = Status.OK
    #: What went wrong with the notebook as a whole (invalid, timed out, kernel died).
    problem: str = ""
    cell_failures: list[CellFailure] = dataclasses.field(default_factory=list)
    #: Check tags naming no question of ``--tests`` (reported, otherwise ignored).
    unknown_tags: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def empty(cls, notebook: str, questions: list[Question]) -> NotebookResult:
        return cls(notebook, {q.name: QuestionResult(q) for q in questions})

    @property
    def score(self) -> float:
        return sum(result.score for result in self.questions.values())

    @property
    def max(self) -> float:
        return sum(result.question.points for result in self.questions.values())

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.questions.values())

    @property
    def failed(self) -> int:
        return sum(result.failed for result in self.questions.values())

    def notes(self, limit: int = 300) -> str:
        """One short line saying what the teacher should know about this row."""
        parts = [self.problem] if self.problem else []
        if self.status is not Status.INVALID:
            parts += [f"{r.question.name}: {r.summary()}" for r in self.questions.values()
                      if r.summary()]  # fmt: skip
        if self.cell_failures:
            count = len(self.cell_failures)
            first = self.cell_failures[0].brief()
            parts.append(f"{count} cell{'s' if count > 1 else ''} failed ({first})")
        if self.unknown_tags:
            parts.append("tags naming no question: " + ", ".join(self.unknown_tags))
        text = "; ".join(" ".join(part.split()) for part in parts)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` entry: everything the row sums up, case by case."""
        return {
            "notebook": self.notebook,
            "status": str(self.status),
            "problem": self.problem or None,
            "score": self.score,
            "max": self.max,
            "passed": self.passed,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "questions": {
                name: {
                    "score": result.score,
                    "points": result.question.points,
                    "checked": result.checked,
                    "detail": result.detail or None,
                    "cases": [dataclasses.asdict(case) for case in result.cases],
                }
                for name, result in self.questions.items()
            },
            "failed_cells": [dataclasses.asdict(failure) for failure in self.cell_failures],
            "unknown_tags": self.unknown_tags,
        }
