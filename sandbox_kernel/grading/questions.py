"""The questions of ``--tests DIR``: every ``*.yaml`` in it is a test table, read and checked
before any notebook runs (a bad table is bad use: nothing is graded)."""

from __future__ import annotations

from pathlib import Path

from .report import SUMMARY_COLUMNS
from .results import Question

#: The CSV's own columns: a question may not take one of these names.
RESERVED_COLUMNS = frozenset({"notebook", *SUMMARY_COLUMNS})


class BadTests(ValueError):
    """``--tests`` cannot be used; the message says what to fix."""


def load_questions(folder: Path) -> list[Question]:
    """The questions of ``folder``, sorted by name (the order of the CSV's columns).

    Only the grader's process reads these files: the kernels get each table's text in the
    check cell, after the submission's cells have run."""
    from ..checking.table import TableError, load_table

    if not folder.is_dir():
        raise BadTests(f"--tests {folder}: no such folder; give the folder of the NAME.yaml tables")
    paths = sorted(folder.glob("*.yaml"), key=lambda path: path.stem)
    ignored = sorted(path.name for path in folder.glob("*.yml"))
    if ignored:
        raise BadTests(f"--tests {folder}: {', '.join(ignored)}: name tables NAME.yaml (the "
                       "questions are the *.yaml files)")  # fmt: skip
    if not paths:
        raise BadTests(
            f"--tests {folder}: no *.yaml table in it; write one table per question, "
            "NAME.yaml, checked after the cell tagged check:NAME"
        )
    questions = []
    for path in paths:
        try:
            table = load_table(path)
        except TableError as error:  # its message names the file, the case and the key
            raise BadTests(str(error)) from None
        if not table.run:
            raise BadTests(
                f"{path}: the table has no 'run': write the program to run at its top "
                "(run: ./sum), as a grading table is not under a %%sandbox_check line"
            )
        if path.stem in RESERVED_COLUMNS:
            raise BadTests(f"{path}: {path.stem!r} is a column of grades.csv already: rename "
                           "the table (and the check: tag)")  # fmt: skip
        names = tuple(case.name for case in table.cases)
        questions.append(Question(path.stem, float(table.total), names, table.inline()))
    return questions


def fit_budget(questions: list[Question], execute_timeout: float | None, folder: Path) -> None:
    """Refuse, before anything runs, a table whose case cannot run on this sandbox (its
    timeout is over the sandbox's time per request): every student would get 0 for it."""
    from ..checking.check import plan_requests
    from ..checking.table import TableError, parse_table

    for question in questions:
        table = parse_table(question.table_text, source=question.name, resolve=_no_files)
        try:
            plan_requests(table, execute_timeout)
        except TableError as error:
            raise BadTests(f"{folder / question.name}.yaml: {error}") from None


def _no_files(name: str) -> Path:
    raise ValueError("an inlined table names no file")
