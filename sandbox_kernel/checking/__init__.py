"""Checking students' code: test tables, verdicts and scores.

A table (:mod:`.table`) is read and checked on this machine; a generated harness
(:mod:`.harness`) runs its cases in the sandbox and records raw outputs; the verdicts
(:mod:`.verdicts`) are decided here, so expected outputs never enter the sandbox. The magic
``%%sandbox_check``, teaching cells' ``--check`` and ``sandbox-kernel grade`` all go through
:func:`run_check`.
"""

from .check import CheckFailed, compilation_failed, run_check
from .result import CaseResult, CheckResult
from .table import Case, CheckTable, TableError, load_table, parse_table
from .verdicts import VERDICTS

#: The MIME type of a check's result in a notebook's outputs (its JSON is
#: :meth:`CheckResult.as_json`): what ``sandbox-kernel grade`` reads.
CHECK_MIME = "application/vnd.sandbox-kernel.check+json"

__all__ = [
    "CHECK_MIME",
    "VERDICTS",
    "Case",
    "CaseResult",
    "CheckFailed",
    "CheckResult",
    "CheckTable",
    "TableError",
    "compilation_failed",
    "load_table",
    "parse_table",
    "run_check",
]
