"""The grades as files: ``grades.csv`` (one row per notebook) and ``--json`` (every case).

Both are written whole to a temporary file beside the target, then renamed over it, so that an
interrupted run never leaves half a file where the last good one was.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .results import NotebookResult, Question

#: The columns after the questions'.
SUMMARY_COLUMNS = ("total", "max", "passed", "failed", "status", "notes")


def points(value: float) -> str:
    """A score as people write it: ``2``, ``1.5``, ``0``."""
    return f"{value:g}"


def csv_header(questions: list[Question]) -> list[str]:
    return ["notebook", *(question.name for question in questions), *SUMMARY_COLUMNS]


def csv_row(result: NotebookResult, questions: list[Question]) -> list[str]:
    scores = [points(result.questions[question.name].score) for question in questions]
    return [
        _not_a_formula(result.notebook),
        *scores,
        points(result.score),
        points(result.max),
        str(result.passed),
        str(result.failed),
        str(result.status),
        _not_a_formula(result.notes()),
    ]


def _not_a_formula(text: str) -> str:
    """A text a submission chose (its file name, its error) as a spreadsheet shows it:
    ``=HYPERLINK(...)`` would be a formula, so a leading ``= + - @`` gets a ``'``."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def csv_text(results: list[NotebookResult], questions: list[Question]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(questions))
    writer.writerows(csv_row(result, questions) for result in results)
    return buffer.getvalue()


def json_document(
    results: list[NotebookResult], questions: list[Question], tests: Path
) -> dict[str, Any]:
    """Everything graded: the questions (points, cases), then each notebook's details."""
    return {
        "tests": str(tests),
        "max": sum(question.points for question in questions),
        "questions": {
            question.name: {"points": question.points, "cases": list(question.case_names)}
            for question in questions
        },
        "notebooks": [result.to_json() for result in results],
    }


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a temporary file renamed over it)."""
    folder = path.parent
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.chmod(temporary, 0o644 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_reports(
    results: list[NotebookResult],
    questions: list[Question],
    tests: Path,
    output: Path,
    json_path: Path | None,
) -> None:
    write_atomically(output, csv_text(results, questions))
    if json_path is not None:
        document = json_document(results, questions, tests)
        write_atomically(json_path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
