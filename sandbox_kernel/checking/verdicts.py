"""From what the harness recorded to a verdict, on this machine (the expected output never
leaves it).

The verdicts are the words teachers know from CodeRunner and Judge0, exactly:
``passed``, ``wrong output``, ``time limit``, ``memory limit``, ``runtime error``,
``output limit``, ``compilation error``, ``not found``, and ``not run`` for the cases after a
failure when the table says ``stop_on_failure``.
"""

from __future__ import annotations

import difflib
import math
import re
import signal as signals

import regex as patterns

from .._signals import describe_signal, signal_name
from .harness import Planned, RawCase
from .result import CaseResult
from .table import Case

PASSED = "passed"
WRONG_OUTPUT = "wrong output"
TIME_LIMIT = "time limit"
MEMORY_LIMIT = "memory limit"
RUNTIME_ERROR = "runtime error"
OUTPUT_LIMIT = "output limit"
COMPILATION_ERROR = "compilation error"
NOT_FOUND = "not found"
NOT_RUN = "not run"
VERDICTS = (PASSED, WRONG_OUTPUT, TIME_LIMIT, MEMORY_LIMIT, RUNTIME_ERROR, OUTPUT_LIMIT,
            COMPILATION_ERROR, NOT_FOUND, NOT_RUN)  # fmt: skip

#: What runtimes print when an allocation fails under ``ulimit -v`` or ``-Xmx``.
_OUT_OF_MEMORY = re.compile(
    rb"MemoryError|OutOfMemoryError|std::bad_alloc|Cannot allocate memory|out of memory"
    rb"|memory exhausted|failed to allocate|Killed process",
    re.IGNORECASE,
)
#: What interpreters print when the program they are given does not exist.
_MISSING_PROGRAM = re.compile(
    rb"can't open file .*No such file or directory|Could not find or load main class"
    rb"|Cannot find module"
)
#: Seconds past its timeout after which a case is over time even if the watchdog did not
#: stop it (a program can rewrite the watchdog's file; the watchdog ticks every 20 ms and
#: sends SIGKILL 0.1 s after SIGTERM).
_LATE = 0.25
#: Seconds a teacher's ``expect_regex`` may take on one output: a pattern that backtracks
#: exponentially must not hold the kernel (or ``grade``) for hours.
REGEX_TIMEOUT = 1.0
_KILLED = 128 + signals.SIGKILL
_FILE_TOO_LARGE = 128 + signals.SIGXFSZ
_COMMAND_NOT_FOUND = 127
#: Characters of got/expected kept for the table and the diff.
_SHOWN = 2000


def judge(planned: Planned, raw: RawCase | None, *, request_timed_out: bool) -> CaseResult:
    """The verdict of one case from its record (None: it never began)."""
    case = planned.case
    result = _blank(case)
    if raw is None or raw.status is None:
        if raw is not None and raw.began and request_timed_out:
            result.verdict, result.detail = TIME_LIMIT, "the sandbox's time limit was reached"
        else:
            result.verdict = NOT_RUN
            result.detail = "it began but left no record" if raw is not None else ""
        return result
    status, elapsed = raw.status, raw.time
    result.time, result.exit_code = elapsed, status
    got = raw.stdout.decode("utf-8", "replace")
    result.got = got[:_SHOWN]
    stderr = raw.stderr.decode("utf-8", "replace").strip()
    result.stderr = stderr[-_SHOWN:]
    signal = status - 128 if status > 128 else None
    if signal is not None:
        result.signal = signal_name(signal)
    if raw.timed_out or (elapsed is not None and elapsed > case.timeout + _LATE):
        result.verdict, result.detail = TIME_LIMIT, f"over {case.timeout:g} s"
        result.signal = None
    elif status == _FILE_TOO_LARGE or raw.stdout_size >= planned.output_limit:
        # Python ignores SIGXFSZ: its write fails (EFBIG) and it exits 1.
        result.verdict = OUTPUT_LIMIT
        result.detail = f"more than {planned.output_limit // 1024**2} MiB of output"
    elif status == _COMMAND_NOT_FOUND or (status != 0 and _MISSING_PROGRAM.search(raw.stderr)):
        result.verdict, result.detail = NOT_FOUND, _last_line(stderr) or "command not found"
    elif status != 0 and (status == _KILLED or _OUT_OF_MEMORY.search(raw.stderr)):
        result.verdict = MEMORY_LIMIT
        result.detail = f"over {case.memory} MiB" if case.memory else "out of memory"
    elif status != 0:
        result.verdict = RUNTIME_ERROR
        result.detail = _runtime_detail(status, result.signal, stderr)
    else:
        result.verdict, result.detail = compare(case, got, raw.stdout_size, planned.keep)
    if result.verdict == PASSED:
        result.score = case.points
    return result.without_data() if case.hidden else result


def compilation_failed(case: Case) -> CaseResult:
    result = _blank(case)
    result.verdict, result.detail = COMPILATION_ERROR, "the program did not compile"
    return result


def not_run(case: Case, why: str = "") -> CaseResult:
    result = _blank(case)
    result.verdict, result.detail = NOT_RUN, why
    return result


def _blank(case: Case) -> CaseResult:
    return CaseResult(
        name=case.name,
        verdict=NOT_RUN,
        points=case.points,
        hidden=case.hidden,
        expected=None if case.expect is None or case.hidden else case.expect[:_SHOWN],
    )


def _runtime_detail(status: int, signal: str | None, stderr: str) -> str:
    if signal is not None:
        detail = f"{describe_signal(signal)} ({signal})"
    else:
        detail = f"exit code {status}"
    last = _last_line(stderr)
    return f"{detail}: {last}" if last and signal is None else detail


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else ""


# -- comparisons -------------------------------------------------------------------------------


def compare(case: Case, got: str, size: int, kept: int) -> tuple[str, str]:
    """``(verdict, detail)`` of an output against the case's expectation."""
    if case.expect_regex is not None:
        if size > kept:
            return WRONG_OUTPUT, f"the output ({size} bytes) is longer than a check reads"
        try:
            matched = patterns.fullmatch(case.expect_regex, _trailing(got), timeout=REGEX_TIMEOUT)
        except TimeoutError:
            return WRONG_OUTPUT, (f"matching /{case.expect_regex}/ took over {REGEX_TIMEOUT:g} s "
                                  "(a pattern that backtracks: simplify it)")  # fmt: skip
        if matched:
            return PASSED, ""
        return WRONG_OUTPUT, f"the output does not match /{case.expect_regex}/"
    if case.expect is None:
        return PASSED, ""
    if size > kept:
        return WRONG_OUTPUT, (f"{size} bytes of output, {len(case.expect.encode())} "
                              "expected")  # fmt: skip
    same = {
        "exact": lambda: got == case.expect,
        "trailing": lambda: _trailing(got) == _trailing(case.expect or ""),
        "tokens": lambda: got.split() == (case.expect or "").split(),
        "float": lambda: _same_numbers(got, case.expect or "", case.tolerance),
    }[case.compare]()
    if same:
        return PASSED, ""
    return WRONG_OUTPUT, difference(case.expect, got, case.compare, case.tolerance)


def _trailing(text: str) -> str:
    """Trailing spaces, tabs and carriage returns of each line, and final newlines, dropped.

    Lines are split at ``\n`` only: ``str.splitlines`` would also split at ``\x1c``,
    ``\x85`` or U+2028, and an output with those would pass for one with newlines."""
    return "\n".join(line.rstrip(" \t\r") for line in text.split("\n")).rstrip("\n")


def _same_numbers(got: str, expected: str, tolerance: float) -> bool:
    mine, theirs = got.split(), expected.split()
    return len(mine) == len(theirs) and all(
        _same_token(a, b, tolerance) for a, b in zip(mine, theirs, strict=True)
    )


def _same_token(got: str, expected: str, tolerance: float) -> bool:
    a, b = _number(got), _number(expected)
    if a is None or b is None:
        return got == expected
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= tolerance


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def difference(expected: str, got: str, compare: str, tolerance: float = 0.0) -> str:
    """A compact difference: where it starts, then a few lines of a unified diff."""
    if compare in ("tokens", "float"):
        mine, theirs = got.split(), expected.split()
        for number, (a, b) in enumerate(zip(mine, theirs), 1):  # noqa: B905 (lengths differ)
            if a != b and not (compare == "float" and _same_token(a, b, tolerance)):
                return f"word {number}: expected {_short(b)}, got {_short(a)}"
        return f"{len(theirs)} words expected, got {len(mine)}"
    if compare == "trailing":
        expected, got = _trailing(expected), _trailing(got)
    lines_e, lines_g = expected.split("\n"), got.split("\n")
    for number, (e, g) in enumerate(zip(lines_e, lines_g), 1):  # noqa: B905
        if e != g:
            where = f"line {number}: expected {_short(e)}, got {_short(g)}"
            break
    else:
        shorter = "fewer" if len(lines_g) < len(lines_e) else "more"
        where = f"{len(lines_g)} lines, {shorter} than the {len(lines_e)} expected"
        if compare == "exact" and len(lines_g) == len(lines_e):
            where = "different whitespace or line endings (compare: exact)"
    if len(lines_e) == len(lines_g) == 1:
        return where
    diff = list(difflib.unified_diff(lines_e, lines_g, "expected", "got", n=1, lineterm=""))
    shown = diff[2:10] + (["…"] if len(diff) > 10 else [])
    return "\n".join([where, *shown])


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")
