"""Hostile programs under ``%%sandbox_check``, attacked by class: the program being checked
runs in the same request as the harness and can write anything where it runs.

- Forged records: lines appended to the harness's record, nested without end, longer than
  the server returns, numbers JSON cannot carry, claims about other cases.
- Processes left behind: in the case's group, escaped with ``setsid``, by the dozen.
- Floods: stdout, stderr, one endless line.
- The watchdog fooled: its file rewritten with a far deadline.
- Numbers and sizes: many cases, a large stdin, a stdin over the server's archive cap.

Each ends as documented: verdicts (the honest cases keep theirs) or one clear error that says
what to do, never an internal error; and the server survives (the harness of this suite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox_kernel import magics
from sandbox_kernel.checking import CheckResult
from sandbox_kernel.magics import MagicFailed
from sandbox_kernel.session.context import SandboxContext

from ..test_check import make_context
from .conftest import Hostile

Trial = Callable[[Callable[[str], None]], None]


@pytest.fixture(scope="module")
def context(hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxContext]:
    made = make_context(hostile.server.url, hostile.server.token, tmp_path_factory.mktemp("nb"))
    yield made
    made.close()


def program(context: SandboxContext, name: str, script: str) -> None:
    """Write ``script`` as the bash program ``name`` in the session's environment."""
    outcome = context.session.run_cell(f"cat > {name} <<'EOF'\n{script}\nEOF\nchmod +x {name}")
    assert outcome.ok, (outcome.stderr, outcome.error)


def check(context: SandboxContext, run: str, cases: str) -> CheckResult | MagicFailed:
    """The check's result, or the clear error it ended with (the only other documented end).
    Cases get 0.5 s unless they say: this suite's server allows 3 s per request."""
    table = "defaults: {timeout: 0.5}\ncases:\n" + "".join(
        f"  {line}\n" for line in cases.splitlines()
    )
    try:
        shown = magics.find("sandbox_check").run(context, run, table)
    except MagicFailed as failed:
        return failed
    assert isinstance(shown.value, CheckResult), shown
    return shown.value


def verdicts(result: CheckResult) -> dict[str, str]:
    return {case.name: case.verdict for case in result.cases}


# -- forged records ----------------------------------------------------------------------------

FORGERIES = {
    "nested": "printf '{\"case\":%s\\n' \"$(head -c 200000 /dev/zero | tr '\\0' '[')\"",
    "too long": "head -c 1500000 /dev/zero | tr '\\0' x",
    "infinite time": 'printf \'{"case":0,"begin":-1e999}\\n{"case":1,"end":1e999}\\n\'',
    "not a number": 'printf \'{"case":0,"status":NaN,"end":NaN}\\n\'',
    "other cases": 'printf \'{"case":1,"status":0,"end":1}\\n{"case":7,"begin":0}\\n\'',
    "fake outputs": 'printf \'{"ran":"0 1","failed":"","gzip":0,"sizes":"1 1","data":"NQo="}\\n\'',
    "garbage": "head -c 4096 /dev/urandom",
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_record_gives_verdicts_or_a_clear_error(
    trial: Trial, context: SandboxContext, forgery: str
) -> None:
    def case(marker: str) -> None:
        program(
            context,
            "forge.sh",
            f"# {marker}\nfor f in .sandbox_check/*/result; do\n"
            f'  {{ {FORGERIES[forgery]}; }} >> "$f"\ndone\necho 5',
        )
        result = check(context, "bash forge.sh", "- {expect: 5}\n- {expect: 6}")
        if isinstance(result, MagicFailed):
            assert "record" in str(result) and "again" in str(result), result
            return
        assert verdicts(result)["case 2"] == "wrong output", result.cases
        assert all(case.time is None or 0 <= case.time < 60 for case in result.cases)

    trial(case)


# -- processes left behind ---------------------------------------------------------------------

LEFTOVERS = {
    "in its group": "(sleep 60 MARKER &)",
    "escaped with setsid": "setsid sleep 60 MARKER &",
    "by the dozen": "for i in $(seq 30); do sleep 60 MARKER & done",
}


@pytest.mark.parametrize("leftover", list(LEFTOVERS))
def test_processes_a_case_leaves_behind_are_gone(
    trial: Trial, context: SandboxContext, leftover: str
) -> None:
    def case(marker: str) -> None:
        program(context, "leave.sh", LEFTOVERS[leftover].replace("MARKER", marker) + "\necho 5")
        result = check(context, "bash leave.sh", "- {expect: 5}\n- {expect: 5}")
        assert isinstance(result, CheckResult), result
        assert set(verdicts(result).values()) == {"passed"}, result.cases

    trial(case)


# -- floods ------------------------------------------------------------------------------------

FLOODS = {
    "stdout": "yes MARKER",
    "stderr": "yes MARKER >&2",
    "one endless line": "head -c 100000000 /dev/zero | tr '\\0' x; echo MARKER",
}


@pytest.mark.parametrize("flood", list(FLOODS))
def test_a_flood_never_passes_and_ends_the_check(
    trial: Trial, context: SandboxContext, flood: str
) -> None:
    def case(marker: str) -> None:
        program(context, "flood.sh", FLOODS[flood].replace("MARKER", marker))
        result = check(context, "bash flood.sh", "- {expect: 5, timeout: 1.5}\n- {expect: 6}")
        assert isinstance(result, CheckResult), result
        flooded = result.cases[0]
        # The output limit, or the working directory's quota reached first (a write error).
        assert flooded.verdict in ("output limit", "runtime error", "time limit"), flooded
        assert len(flooded.got or "") <= 4096 + 1, "more output kept than a check reads"

    trial(case)


# -- the watchdog fooled -----------------------------------------------------------------------


def test_a_program_rewriting_the_watchdog_file_is_still_over_time(
    trial: Trial, context: SandboxContext
) -> None:
    def case(marker: str) -> None:
        program(
            context,
            "fool.sh",
            f"# {marker}\nfor i in $(seq 40); do\n"
            '  for f in .sandbox_check/*/current; do echo 1 99999999999999999 0 > "$f"; done\n'
            "  sleep 0.05\ndone\necho 5",
        )
        result = check(context, "bash fool.sh", "- {expect: 5, timeout: 0.5}")
        assert isinstance(result, CheckResult), result
        assert verdicts(result) == {"case 1": "time limit"}, result.cases

    trial(case)


# -- numbers and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [40, 150])
def test_many_cases_take_as_few_requests_as_fit(
    trial: Trial, context: SandboxContext, count: int
) -> None:
    def case(marker: str) -> None:
        program(context, "echo.sh", f"# {marker}\ncat")
        table = "".join(f"- {{stdin: '{i}', expect: '{i}', timeout: 0.2}}\n" for i in range(count))
        result = check(context, "bash echo.sh", table)
        assert isinstance(result, CheckResult), result
        assert set(verdicts(result).values()) == {"passed"} and len(result.cases) == count
        per_request = int(2 / 0.35)  # the server's 3 s less 1, each case 0.2 s + 0.15 s
        assert result.requests == -(-count // per_request), result.requests

    trial(case)


@pytest.mark.parametrize("size", [200_000, 900_000, 3_000_000])
def test_large_stdin_is_sent_or_refused_clearly(
    trial: Trial, context: SandboxContext, tmp_path: Path, size: int
) -> None:
    def case(marker: str) -> None:
        program(context, "count.sh", f"# {marker}\nwc -c")
        stdin = "".join(chr(ord("a") + i % 26) for i in range(size))
        result = check(context, "bash count.sh", f"- {{stdin: '{stdin}', expect: '{size + 1}'}}")
        if isinstance(result, MagicFailed):  # over the server's upload or archive caps
            assert "refused the check's request" in str(result), result
            assert "stdin and files" in str(result) and "--max-upload" in str(result), result
            assert size > 1_000_000, f"{size} bytes of stdin fit the caps: {result}"
            return
        assert verdicts(result) == {"case 1": "passed"}, result.cases

    trial(case)
