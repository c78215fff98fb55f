"""``sandbox-kernel grade``: the arguments, the checks made before anything runs, and the run.

Everything that can be wrong with the command line (a missing notebook, a bad table, a folder
that does not exist) is found before the first kernel starts, and ends with status 2. Once
grading started, a notebook's problems only show in its row: the status is 0 when every
notebook was graded, whatever the scores.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from .._errors import SandboxConfigError, SandboxError
from ..lab import StopSignals, given_token
from ..lab.prerequisites import require
from ..lab.processes import stopped_by
from ..settings import COMMAND_NAMES, Resolved, SandboxSettings, Source, resolve
from .batch import grade_all
from .progress import Progress, format_duration
from .questions import BadTests, fit_budget, load_questions
from .report import write_reports
from .results import NotebookResult, Question

PROG = "sandbox-kernel grade"
DEFAULT_TIMEOUT = 300.0
#: Exit statuses: graded, the sandbox failed, bad use, interrupted.
EXIT_GRADED, EXIT_SANDBOX, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageProblem(Exception):
    """Bad use, found before grading: the message says what to fix."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``grade`` beside ``--url`` and the token options (added by the caller)."""
    parser.add_argument(
        "notebooks", nargs="+", type=Path, metavar="NOTEBOOK", help="the submissions (.ipynb)"
    )
    parser.add_argument(
        "--tests", type=Path, required=True, metavar="DIR",
        help="folder of the test tables: NAME.yaml is checked after the cell tagged check:NAME",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, default=Path("grades.csv"), metavar="PATH",
        help="the CSV of grades, one row per notebook (default: grades.csv)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write every case's details as JSON"
    )
    parser.add_argument(
        "--jobs", type=_positive_int, default=1, metavar="N",
        help="notebooks graded at once, each in its own kernel (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"time a notebook may take, checks included (default: {DEFAULT_TIMEOUT:g})",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Grade, write the reports, say where they are; the exit status."""
    if not require("nbformat"):
        return EXIT_USAGE
    # A submission's odd fields (cells without ids...) would print warnings over the progress
    # line; what makes a notebook invalid is said in its row instead.
    warnings.filterwarnings("ignore", module=r"nbformat(\.|$)")
    try:
        notebooks = _submissions(args.notebooks)
        _check_writable(args.output, "--output")
        if args.json is not None:
            _check_writable(args.json, "--json")
        questions = load_questions(args.tests)
        token = given_token(args)
    except (UsageProblem, BadTests, ValueError) as problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    resolved: Resolved | None = None
    with StopSignals() as signals:
        try:
            resolved = resolve(args.url, token, names=COMMAND_NAMES)
            fit_budget(questions, _check_sandbox(resolved.settings), args.tests)
            return _grade(args, notebooks, questions, resolved.settings)
        except BadTests as problem:  # a table this sandbox cannot run: nothing was graded
            print(f"{PROG}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt as interrupt:
            signals.ignore()
            print(f"\n{PROG}: {stopped_by(interrupt)}: grading stopped, kernels killed; "
                  "no grades were written", file=sys.stderr)  # fmt: skip
            return EXIT_INTERRUPTED
        except SandboxConfigError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return EXIT_USAGE
        except (SandboxError, RuntimeError) as error:  # unreachable, or the server did not start
            print(f"{PROG}: {error}", file=sys.stderr)
            return EXIT_SANDBOX
        finally:
            signals.ignore()
            if resolved is not None:
                resolved.close()


def _submissions(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, label as given) of each notebook; files that do not exist are bad use (a shell
    pattern that matched nothing arrives as is)."""
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise UsageProblem(
            f"no such notebook: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
            "Give the submissions' files (e.g. submissions/*.ipynb)."
        )
    return [(path, str(path)) for path in paths]


def _check_writable(path: Path, option: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageProblem(f"{option} {path}: the folder {folder} does not exist; create it first")
    if path.is_dir():
        raise UsageProblem(f"{option} {path} is a folder: give a file name")


def _check_sandbox(settings: SandboxSettings) -> float | None:
    """Fail now, before any notebook, when the sandbox cannot be reached: otherwise every
    row would be a zero for a reason that has nothing to do with the students. Its
    ``execute_timeout``, when it tells."""
    from ..client import Sandbox

    with Sandbox(settings.url, timeout=settings.side_timeout, token=settings.token,
                 timeout_setting=settings.side_timeout_setting,
                 advise=settings.refusal_advice) as sandbox:  # fmt: skip
        try:
            return sandbox.specs().execute_timeout
        except SandboxError as error:
            raise SandboxError(
                f"the sandbox at {settings.url} cannot be used ({error}); nothing was graded"
            ) from None


def _grade(
    args: argparse.Namespace,
    notebooks: list[tuple[Path, str]],
    questions: list[Question],
    settings: SandboxSettings,
) -> int:
    jobs = min(args.jobs, len(notebooks))
    print(_announcement(notebooks, questions, settings, jobs, args.timeout), file=sys.stderr)
    started = time.monotonic()
    progress = Progress(len(notebooks), jobs, sys.stderr)
    results = grade_all(notebooks, questions, settings, jobs=jobs, timeout=args.timeout,
                        progress=progress)  # fmt: skip
    write_reports(results, questions, args.tests, args.output, args.json)
    print(_summary(results, time.monotonic() - started, args.output, args.json))
    return EXIT_GRADED


def _announcement(
    notebooks: list[tuple[Path, str]],
    questions: list[Question],
    settings: SandboxSettings,
    jobs: int,
    timeout: float,
) -> str:
    tables = ", ".join(f"{q.name} ({q.points:g} pt{'s' if q.points != 1 else ''})"
                       for q in questions)  # fmt: skip
    where = settings.describe()
    if settings.source is Source.EMBEDDED:
        where = "a private embedded server, started for this grading and stopped at its end"
    count = len(notebooks)
    return (
        f"Grading {count} notebook{'s' if count != 1 else ''}; questions: {tables}\n"
        f"sandbox: {settings.url} ({where}); {jobs} at a time, {timeout:g} s each at most"
    )


def _summary(
    results: list[NotebookResult], seconds: float, output: Path, json_path: Path | None
) -> str:
    statuses = Counter(str(result.status) for result in results)
    counts = ", ".join(f"{number} {status}" for status, number in sorted(statuses.items()))
    where = f"Grades written to {output}" + (f", details to {json_path}" if json_path else "")
    graded = f"{len(results)} notebook{'s' if len(results) != 1 else ''}"
    return f"Graded {graded} in {format_duration(seconds)} ({counts}). {where}."
