"""A check's verdicts as a notebook shows them: a compact table and a score line.

Colours are for a projector: verdicts on solid green or red with white bold text (contrast
above 4.5:1), never pale tints that vanish on a washed-out screen. Hidden cases show their
verdict, points and time only. The bundle also carries the result as JSON
(:data:`sandbox_kernel.checking.CHECK_MIME`), which ``sandbox-kernel grade`` reads.
"""

from __future__ import annotations

import html
import re

from ..checking import CHECK_MIME, CaseResult, CheckResult
from .render import Bundle

_PASSED_COLOUR = "#116329"
_FAILED_COLOUR = "#b3261e"
_NOT_RUN_COLOUR = "#57606a"
#: Characters of got/expected shown in a cell of the table.
_CELL = 80


def check_bundle(result: CheckResult, note: str = "") -> Bundle:
    """The verdicts of ``result`` as plain text, HTML and JSON."""
    return {
        "text/plain": check_text(result, note),
        "text/html": _html(result, note),
        CHECK_MIME: result.as_json(),
    }


def check_text(result: CheckResult, note: str = "") -> str:
    rows = [("case", "verdict", "time", "got", "expected")]
    for case in result.cases:
        shown = _visible(case)
        rows.append(
            (
                case.name + (" (hidden)" if case.hidden else ""),
                ("✓ " if case.passed else "✗ ") + case.verdict,
                _time(case),
                _one_line(shown.got),
                _one_line(shown.expected),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    for case in result.cases:
        detail = _visible(case).detail
        if detail and not case.passed:
            lines.append(f"{case.name}: {detail}".replace("\n", "\n    "))
    lines.append(_summary(result, note))
    return "\n".join(lines)


def _summary(result: CheckResult, note: str) -> str:
    passed = sum(case.passed for case in result.cases)
    line = f"{result.score_line} · {passed}/{len(result.cases)} cases passed"
    if result.requests > 1:
        line += f" · {result.requests} requests ({_budget(result)})"
    return f"{line}\n{note}" if note else line


def _budget(result: CheckResult) -> str:
    if result.request_budget is None:
        return "the cases did not fit one request"
    return f"the cases' timeouts did not fit the sandbox's {result.request_budget:g} s per request"


def _html(result: CheckResult, note: str) -> str:
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{h}</th>"
                   for h in ("case", "verdict", "time", "got", "expected"))  # fmt: skip
    rows = "".join(_html_row(case) for case in result.cases)
    colour = _PASSED_COLOUR if result.passed else _FAILED_COLOUR
    summary = html.escape(_summary(result, note)).replace("\n", "<br>")
    return (
        "<div class='sandbox-check'>"
        f"<table style='border-collapse:collapse;font-size:1.05em'><thead><tr>{head}</tr>"
        f"</thead><tbody>{rows}</tbody></table>"
        f"<p style='font-weight:bold;font-size:1.2em;color:{colour}'>{summary}</p></div>"
    )


def _html_row(case: CaseResult) -> str:
    shown = _visible(case)
    colour = _colour(case)
    name = html.escape(case.name) + (" <i>(hidden)</i>" if case.hidden else "")
    verdict = (
        f"<span style='background:{colour};color:#fff;font-weight:bold;padding:1px 6px;"
        f"border-radius:3px;white-space:nowrap'>{html.escape(case.verdict)}</span>"
    )
    if shown.detail and not case.passed:
        detail = html.escape(shown.detail)
        verdict += f"<div style='white-space:pre-wrap;font-family:monospace'>{detail}</div>"
    cells = [
        name,
        verdict,
        html.escape(_time(case)),
        _code(shown.got),
        _code(shown.expected),
    ]
    tds = "".join(f"<td style='text-align:left;vertical-align:top;padding:2px 8px'>{c}</td>"
                  for c in cells)  # fmt: skip
    return f"<tr style='border-top:1px solid #d0d7de'>{tds}</tr>"


def _colour(case: CaseResult) -> str:
    if case.passed:
        return _PASSED_COLOUR
    return _NOT_RUN_COLOUR if case.verdict == "not run" else _FAILED_COLOUR


def _visible(case: CaseResult) -> CaseResult:
    return case.without_data() if case.hidden else case


def _time(case: CaseResult) -> str:
    if case.time is None:
        return ""
    return f"{case.time * 1000:.0f} ms" if case.time < 1 else f"{case.time:.2f} s"


def _printable(text: str) -> str:
    """Control characters of a program's output written as escapes (``\x1b``): a terminal
    must not obey them, nor a grader's log."""
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _one_line(text: str | None) -> str:
    if text is None:
        return ""
    shown = _printable(text.rstrip("\n")).replace("\n", "⏎")
    return shown if len(shown) <= _CELL else shown[: _CELL - 1] + "…"


def _code(text: str | None) -> str:
    if text is None:
        return ""
    shown = _printable(text if len(text) <= 400 else text[:399] + "…")
    return f"<pre style='margin:0;white-space:pre-wrap'>{html.escape(shown)}</pre>"
