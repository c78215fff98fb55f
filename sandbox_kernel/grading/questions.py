"""The questions of ``--tests DIR``: every ``*.yaml`` in it is a test table, read and checked
before any notebook runs (a bad table is bad use: nothing is graded)."""

from __future__ import annotations

from pathlib import Path

from .results import Question


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
        names = tuple(case.name for case in table.cases)
        questions.append(Question(path.stem, float(table.total), names, table.inline()))
    return questions
