"""Running a table against the session's environment: batches, requests, verdicts.

A check runs where the last cell left off (the session's environment and shell state) and
changes nothing there: its requests are never saved (``save`` false), so the next cell
continues from the same environment. All cases share one ``execute/`` request when their
timeouts fit the server's ``execute_timeout`` less a second; otherwise they take as few
requests as fit (the public server recycles a container for about 10 s after each request, so
one request per case would cost minutes).
"""

from __future__ import annotations

from .. import protocol
from .._errors import Sandbox404, SandboxHTTPError
from ..session.session import Session
from . import verdicts
from .harness import HarnessError, Planned, build_request, plan_batches, read_record
from .result import CaseResult, CheckResult
from .table import CheckTable, TableError

#: The public server's ``execute_timeout`` when its specifications do not say (3.x does not).
PUBLIC_EXECUTE_TIMEOUT = 10.0


class CheckFailed(Exception):
    """The check could not be run to its end (the sandbox failed, the record was garbled);
    the message says what happened and what to do. The session is unchanged."""


def run_check(session: Session, table: CheckTable) -> CheckResult:
    """Run every case of ``table`` in the session's environment and judge it.

    Raises :class:`TableError` for a table that cannot run (no ``run``, a timeout that fits
    no request), :class:`CheckFailed` when the sandbox cannot run it, and lets
    :class:`SandboxError` of an interrupt (``SandboxCancelled``) through.
    """
    if not table.run:
        raise TableError(
            "name the program to check on the first line (%%sandbox_check ./sum), or give "
            "run: in the table"
        )
    limit = session.server_timeout() or PUBLIC_EXECUTE_TIMEOUT
    batches = plan_requests(table, limit)
    results: dict[int, CaseResult] = {}
    requests = 0
    for batch in batches:
        if table.stop_on_failure and any(not r.passed for r in results.values()):
            break
        results.update(_run_batch(session, table, batch, limit))
        requests += 1
    cases = [
        results.get(index) or verdicts.not_run(case, "an earlier case failed")
        for index, case in enumerate(table.cases)
    ]
    if table.stop_on_failure:
        cases = _hide_after_failure(cases, table)
    return CheckResult(str(table.run), cases, requests=requests, request_budget=limit)


def plan_requests(table: CheckTable, execute_timeout: float | None) -> list[list[Planned]]:
    """The requests ``table`` takes on a server whose ``execute_timeout`` is this (None: it
    does not tell, the public server's default); a case that fits none raises
    :class:`TableError`."""
    budget = (execute_timeout or PUBLIC_EXECUTE_TIMEOUT) - 1  # a second for the harness
    try:
        return plan_batches(table.cases, budget)
    except ValueError as error:
        raise TableError(str(error)) from None


def compilation_failed(table: CheckTable) -> CheckResult:
    """Every case of ``table`` failed to compile (a teaching cell's ``--check``)."""
    cases = [verdicts.compilation_failed(case) for case in table.cases]
    return CheckResult(str(table.run or ""), cases)


def _run_batch(
    session: Session, table: CheckTable, batch: list[Planned], limit: float
) -> dict[int, CaseResult]:
    request = build_request(
        batch,
        str(table.run),
        state_file=session.state_file,
        environment=session.environment,
        environ=dict(session.environ),
        request_timeout=limit,
        stop_on_failure=table.stop_on_failure,
    )
    try:
        answer = session.client.execute(request.config, request.archive)
    except Sandbox404 as error:
        if session.environment and session.environment in error.response.text:
            raise CheckFailed(
                f"The environment {session.environment} is gone from the sandbox (expired or "
                "lost): run the cells that build the program again, then the check."
            ) from None
        raise CheckFailed(f"The sandbox could not run the check: {error}") from None
    except SandboxHTTPError as error:
        if error.status_code not in (400, 413):
            raise
        # The config is ours and valid: what the server refuses is the size of the request,
        # which carries every case's stdin and files.
        raise CheckFailed(
            f"The sandbox refused the check's request ({error.status_code}: "
            f"{error.response.text[:200]!r}): the cases' stdin and files travel with it, and "
            "are more than this sandbox accepts. Make them smaller, or split the table; on "
            "the embedded server, --max-upload and --max-archive-bytes set the limits."
        ) from None
    try:
        raws = read_record(answer.get("result"), batch)
    except HarnessError as error:
        raise CheckFailed(f"{str(error).capitalize()}. Run the check again.") from None
    if not raws and answer.get("status") not in (0, protocol.STATUS_TIMEOUT):
        raise CheckFailed(_no_record(answer))
    timed_out = any(
        entry.get("exit_code") == protocol.STATUS_TIMEOUT for entry in answer.get("execution", [])
    )
    return {
        planned.index: verdicts.judge(planned, raws.get(planned.index), request_timed_out=timed_out)
        for planned in batch
    }


def _hide_after_failure(cases: list[CaseResult], table: CheckTable) -> list[CaseResult]:
    """CodeRunner's "hide rest if fail": the cases after the first failure are not run."""
    shown: list[CaseResult] = []
    for case, result in zip(table.cases, cases, strict=True):
        if any(not earlier.passed for earlier in shown):
            result = verdicts.not_run(case, "an earlier case failed (stop_on_failure)")
        shown.append(result)
    return shown


def _no_record(answer: dict[str, object]) -> str:
    status = answer.get("status")
    meaning = protocol.STATUS_MEANINGS.get(status, "unexpected answer")  # type: ignore[call-overload]
    return (
        f"The check's record did not come back (status {status}: {meaning}): the sandbox "
        "failed, or the program checked wrote over the record or filled it past what the "
        "sandbox returns (--max-result). Run the check again; if it persists, look at the "
        "program, then at the sandbox's log."
    )
