"""``%%sandbox_check``: run a test table against a program of the environment.

The verdicts are the magic's value (a :class:`~sandbox_kernel.checking.CheckResult`: ``_``
after the cell in IPython) and its output. A check whose cases fail is a result, not an
error; only bad use is (a table that cannot be read, an unknown key, no program named).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .._errors import SandboxCancelled, SandboxError
from ..checking import CheckFailed, CheckResult, CheckTable, TableError, parse_table, run_check
from ..checking.table import Resolver, load_table
from ..session.context import SandboxContext
from ..views.checks import check_bundle
from .core import MagicFailed, MagicResult, MagicUsageError, _Parser, magic

_TABLE_HELP = (
    "The cell is a YAML list of cases, or a mapping {run, stop_on_failure, defaults, cases}. "
    "Case keys: name, stdin, args, env, files, expect | expect_file | expect_regex, "
    "compare (exact, trailing, tokens, float), tolerance, points, hidden, timeout (s), "
    "memory (MiB)."
)


def _check_arguments(parser: _Parser) -> None:
    parser.add_argument(
        "--tests",
        metavar="PATH",
        help="read the table from this local file instead of the cell (hidden tests)",
    )
    parser.add_argument(
        "run",
        nargs=argparse.REMAINDER,
        help="the command to check, like ./sum or python3 sum.py (default: the table's run)",
    )
    parser.epilog = _TABLE_HELP


@magic(
    "sandbox_check",
    "check a program of the environment against a table of cases (verdicts and score)",
    kind="line_cell",  # %sandbox_check --tests PATH ./sum has no body
    arguments=_check_arguments,
)
def sandbox_check(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    table = read_table(context, cell or "", args.tests, _command(args), "%%sandbox_check")
    return check_result(context, table)


#: Words of shell syntax that ``shlex`` splits off: their meaning is lost once split.
_SHELL_WORDS = frozenset({"&&", "||", "|", ";", "&", "<", ">", ">>", "2>", "2>&1", "|&"})


def _command(args: argparse.Namespace) -> str | None:
    """The command of the first line, as written (``cd sub && ./prog`` stays shell syntax).

    After ``--tests PATH`` the words are joined back, so shell syntax there is refused
    rather than quoted into arguments.
    """
    if not args.run:
        return None
    if any(word == "--tests" or word.startswith("--tests=") for word in args.run):
        raise MagicUsageError(
            "%%sandbox_check: put --tests PATH before the command (%%sandbox_check --tests "
            "t.yaml ./sum): everything after the command is its own"
        )
    if args.tests is None:
        return str(args.line).strip()
    if any(word in _SHELL_WORDS or word.endswith(";") for word in args.run):
        raise MagicUsageError(
            "%%sandbox_check: after --tests PATH the command is read word by word, so its "
            "shell syntax (&&, |, ;) would be lost: put the command in the table's run:, or "
            "in a script"
        )
    return shlex.join(args.run)


def read_table(
    context: SandboxContext, body: str, tests: str | None, run: str | None, magic_name: str
) -> CheckTable:
    """The table of the cell's body or of ``--tests PATH`` (a local file, by the local path
    rules); bad use raises :class:`MagicUsageError`."""
    has_body = bool(body.strip())
    if tests is not None and has_body:
        raise MagicUsageError(f"{magic_name}: give the table in the cell or with --tests, "
                              "not both")  # fmt: skip
    try:
        if tests is not None:
            context.refuse_while_grading(f"{magic_name} --tests")
            path = context.local_path(tests, f"{magic_name} --tests reads")
            return load_table(path, run=run)
        if not has_body:
            raise MagicUsageError(f"{magic_name}: write the table of cases in the cell, or "
                                  f"give --tests PATH. {_TABLE_HELP}")  # fmt: skip
        return parse_table(body, source="the table", run=run, resolve=_resolver(context))
    except TableError as error:
        raise MagicUsageError(f"{magic_name}: {error}") from None


def _resolver(context: SandboxContext) -> Resolver:
    """``expect_file`` of a table in a cell: a local file, by the local path rules."""

    def resolve(name: str) -> Path:
        context.refuse_while_grading("expect_file")
        return context.local_path(name, "expect_file reads")

    return resolve


def check_result(context: SandboxContext, table: CheckTable) -> MagicResult:
    """Run ``table`` in the session's environment: the result and its table."""
    try:
        result = run_check(context.session, table)
    except TableError as error:
        raise MagicUsageError(f"%%sandbox_check: {error}") from None
    except CheckFailed as error:
        raise MagicFailed(str(error)) from None
    except SandboxCancelled:
        raise
    except SandboxError as error:
        raise MagicFailed(f"The check could not run: {error}") from None
    return shown(result)


def shown(result: CheckResult) -> MagicResult:
    return MagicResult(value=result, bundles=[check_bundle(result)])
