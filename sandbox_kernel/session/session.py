"""A sandbox session: the environment and shell state carried from cell to cell.

One :class:`Session` per notebook (the kernel's, or the IPython extension's ``%%sandbox``
cells). A cell is one ``execute/`` request (contract, "POST execute/") with ``save: true`` and
the latest environment uuid; the answer's new uuid replaces it. Everything a front-end needs to
show the cell comes back as a :class:`CellOutcome`, whatever went wrong: the session never
raises for a failing cell, an unreachable sandbox, or an interrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import signal
from collections.abc import Callable, Mapping
from typing import Any

from .. import protocol
from .._errors import (
    Sandbox404,
    Sandbox503,
    SandboxCancelled,
    SandboxError,
    SandboxHTTPError,
    SandboxProtocolError,
)
from ..client import Cancellation, Sandbox
from . import records
from .cellscript import (
    DISPLAY_DIR,
    RESULT_PATH,
    Bookkeeping,
    build_script,
    next_state_file,
    parse_bookkeeping,
    unframe,
)

#: MIME types the front-ends display, by file extension (anything else: plain text).
DISPLAY_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".html": "text/html",
    ".htm": "text/html",
    ".md": "text/markdown",
    ".json": "application/json",
}
_MAX_DISPLAY = 20 * 1024**2
_BASH_LINE = re.compile(r"^(\S*bash: )(?:-c: )?line (\d+):", re.MULTILINE)
#: How ``display`` names its copies: ``<index>-<the file's base name>``.
_DISPLAY_NAME = re.compile(r"[0-9]+-[^/\x00]+")

BusyCallback = Callable[[int, float, float], object]


@dataclasses.dataclass
class CellError:
    """Why a cell failed, worded for a notebook: ``ename: evalue``, then advice lines."""

    ename: str
    evalue: str
    advice: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Display:
    mime: str
    data: bytes
    name: str


@dataclasses.dataclass
class CellOutcome:
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    error: CellError | None = None
    #: Things the user must know that are not the cell's output (lost environment...).
    notices: list[str] = dataclasses.field(default_factory=list)
    displays: list[Display] = dataclasses.field(default_factory=list)
    #: The server's answer, as it came (``%%sandbox --out``).
    answer: dict[str, Any] | None = None
    state_saved: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def environment(self) -> str | None:
        """The environment this cell saved (None if it never reached the sandbox)."""
        return (self.answer or {}).get("environment")

    def __repr__(self) -> str:
        state = "ok" if self.error is None else f"{self.error.ename}: {self.error.evalue}"
        return (
            f"<sandbox cell {state}, exit code {self.exit_code}, "
            f"{len(self.stdout)} chars of stdout, {len(self.stderr)} of stderr>"
        )


@dataclasses.dataclass
class ShellState:
    """What the last completed cell left: for completion and ``%sandbox_status``."""

    cwd: str | None = None
    files: list[str] = dataclasses.field(default_factory=list)
    variables: list[str] = dataclasses.field(default_factory=list)
    functions: list[str] = dataclasses.field(default_factory=list)
    aliases: list[str] = dataclasses.field(default_factory=list)


class Session:
    """Environment uuid, shell state, ``environ`` and per-cell time limit of one notebook."""

    def __init__(self, client: Sandbox) -> None:
        self.client = client
        self.environment: str | None = None
        self.expire: str | None = None
        #: Variables sent as ``environ`` with every cell (``%sandbox_env``).
        self.environ: dict[str, str] = {}
        #: Per-cell limit in seconds (``%sandbox_timeout``); None: the server's budget.
        self.timeout: float | None = None
        self.state = ShellState()
        #: The file of ``.sandbox_kernel/`` holding the current shell state: one this kernel
        #: wrote for the current environment (see cellscript and records), or None.
        self.state_file: str | None = None
        #: Names this session's state files (random: nothing prepared in advance matches).
        self._state_token = secrets.token_hex(8)
        self.cells = 0

    # -- the environment -------------------------------------------------------------------------

    def reset(self) -> str | None:
        """Start the next cell in a fresh environment; returns the uuid left behind."""
        previous = self.environment
        self.environment = self.expire = self.state_file = None
        self.state = ShellState()
        return previous

    def use(self, uuid: str) -> str:
        """Continue from a saved environment (``%sandbox_use``); raises if it is unknown.

        Returns the one line to show the user: the shell state comes back only if this
        kernel's records say it saved it there (see :mod:`.records`).
        """
        if not protocol.is_uuid(uuid):
            raise ValueError(f"{uuid!r} is not an environment uuid")
        if self.client.check(uuid) == 0:
            raise LookupError(
                f"environment {uuid} is not on the sandbox at {self.client.url} "
                "(expired, or never saved there)"
            )
        self.environment, self.expire = uuid, None
        self.state_file = records.known_state(self.client.url, uuid)
        self.state = ShellState()
        if self.state_file is not None:
            return f"The next cell continues from environment {uuid}: its files and shell state."
        return (
            f"The next cell continues from environment {uuid} with its files, but not its shell "
            "state (variables, functions, aliases, directory): this kernel did not save it there."
        )

    def adopt(self, answer: Mapping[str, Any], state_file: str | None = None) -> bool:
        """Continue from the environment an ``execute/`` answer saved (a cell's, an upload's):
        the only writer of environment, expiry and state file after a run. False when the
        answer names no environment; nothing changes then.

        ``state_file``: the state file the run wrote (a completed cell's bookkeeping). Without
        one, the current state file carries over: the run cannot have replaced it (a cell that
        ended early never touches the previous one; an upload may not write
        ``.sandbox_kernel/``, and the file's name is random). The records remember which state
        file belongs to the new environment, for ``%sandbox_use``.
        """
        environment, expire = answer.get("environment"), answer.get("expire")
        if not isinstance(environment, str) or not protocol.is_uuid(environment):
            return False
        self.environment = environment
        self.expire = expire if isinstance(expire, str) else None
        if state_file is not None:
            self.state_file = state_file
        if self.state_file:
            records.remember_state(self.client.url, self.environment, self.state_file)
        return True

    def server_timeout(self) -> float | None:
        """The server's ``execute_timeout``, if it tells (cached specifications)."""
        try:
            return self.client.execute_timeout
        except SandboxError:
            return None

    # -- a cell ----------------------------------------------------------------------------------

    def run_cell(
        self,
        code: str,
        *,
        cancel: Cancellation | None = None,
        on_busy: BusyCallback | None = None,
    ) -> CellOutcome:
        """Run ``code`` as one bash script in the sandbox; never raises for the cell's sake."""
        self.cells += 1
        nonce = secrets.token_hex(8)
        next_state = next_state_file(self._state_token, self.state_file)
        script = build_script(code, nonce, self.environ, self.state_file, next_state)
        try:
            answer = self._execute(script, cancel, on_busy)
        except Sandbox404 as error:
            # Only the server's own sentence about this uuid means the environment is gone
            # (contract: "No environment with UUID '<uuid>' found"); any other 404 (a wrong
            # URL, a proxy's page) keeps the environment.
            if self.environment is None or self.environment not in error.response.text:
                return CellOutcome(error=_unreachable(error, self))
            lost = self.reset()  # the next run_cell's answer is adopted as usual
            outcome = self.run_cell(code, cancel=cancel, on_busy=on_busy)
            outcome.notices.insert(0, _lost_environment(lost))
            return outcome
        except SandboxCancelled:
            return CellOutcome(error=_interrupted())
        except SandboxError as error:
            return CellOutcome(error=_unreachable(error, self))
        prologue_lines = script[: len(script) - len(code) - 1].count("\n")
        return self._outcome(answer, nonce, next_state, prologue_lines)

    def _execute(
        self, script: str, cancel: Cancellation | None, on_busy: BusyCallback | None
    ) -> dict[str, Any]:
        command: Any = script
        if self.timeout is not None:
            command = {"command": script, "timeout": self.timeout}
        config: dict[str, Any] = {
            "commands": [command],
            "save": True,
            "result_path": RESULT_PATH,
            "environ": self.environ,
        }
        if self.environment:
            config["environment"] = self.environment
        return self.client.execute(config, cancel=cancel, on_busy=on_busy)

    def _outcome(
        self, answer: dict[str, Any], nonce: str, next_state: str, offset: int
    ) -> CellOutcome:
        outcome = CellOutcome(answer=answer)
        executions = answer.get("execution") or []
        if not executions:
            self.adopt(answer)  # saved whatever the outcome (contract)
            outcome.error = _sandbox_failure(answer.get("status"))
            return outcome
        entry = executions[0]
        stdout, stderr = (
            unframe(str(entry.get("stdout", ""))),
            unframe(str(entry.get("stderr", ""))),
        )
        outcome.stdout = stdout.text
        outcome.stderr = _user_line_numbers(stderr.text, offset)
        outcome.exit_code = code = int(entry.get("exit_code", -1))
        added = stderr.added
        if code == protocol.STATUS_TIMEOUT:
            outcome.stderr = _drop_timeout_sentence(outcome.stderr)
            outcome.error = _timed_out(self)
        elif code == protocol.STATUS_UNKNOWN_ERROR:
            outcome.error = _sandbox_failure(code)
        elif code != 0:
            outcome.error = _exit_code(code)
        if added and code != protocol.STATUS_TIMEOUT:
            outcome.notices.append(added)
        book = parse_bookkeeping(answer.get("result"), nonce)
        if book is not None and book.state != next_state:
            book = None  # not what this cell's script writes
        # Saved whatever the outcome (contract).
        self.adopt(answer, book.state if book is not None else None)
        if book is None:
            if self.environment:
                outcome.notices.append(
                    "The shell state (variables, functions, aliases, directory) was not updated "
                    "by this cell: it ended before saving it (killed, timed out, or replaced by "
                    "exec). The next cell starts from the state of the last completed one; "
                    "files written by this cell are kept."
                )
        else:
            outcome.state_saved = True
            self._remember(book)
            outcome.displays = self._fetch_displays(book, outcome)
        return outcome

    def _remember(self, book: Bookkeeping) -> None:
        self.state = ShellState(
            cwd=book.cwd,
            files=book.files,
            variables=book.variables,
            functions=book.functions,
            aliases=book.aliases,
        )

    def _fetch_displays(self, book: Bookkeeping, outcome: CellOutcome) -> list[Display]:
        """The files ``display`` recorded in the cell's shell, each within the size the
        server announced (a server sending more is cut off: the client raises)."""
        displays = []
        for name in book.display:
            if not _DISPLAY_NAME.fullmatch(name):
                continue
            original = name.split("-", 1)[-1]
            try:
                size = self.client.check(self.environment or "", f"{DISPLAY_DIR}/{name}")
                if size > _MAX_DISPLAY:
                    outcome.notices.append(f"display: {original} is too large to show ({size} B)")
                    continue
                data = self.client.download(
                    self.environment or "", f"{DISPLAY_DIR}/{name}", max_bytes=size
                )
            except SandboxError as error:
                outcome.notices.append(f"display: could not fetch {original}: {error}")
                continue
            displays.append(Display(mime_type(original), data.getvalue(), original))
        return displays


def mime_type(name: str) -> str:
    """The MIME type a file is displayed as (by extension; plain text otherwise)."""
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    return DISPLAY_TYPES.get(suffix, "text/plain")


# -- wording of failures ----------------------------------------------------------------------


def _exit_code(code: int) -> CellError:
    evalue = f"command exited with status {code}"
    if code > 128:
        with contextlib.suppress(ValueError):  # not a signal number
            evalue += f" (killed by {signal.Signals(code - 128).name})"
    return CellError("ExitCode", evalue)


def _timed_out(session: Session) -> CellError:
    server = session.server_timeout()
    server_text = f"{server:g} s" if server is not None else "its execute_timeout"
    if session.timeout is not None and server is None:  # which one struck is not known
        limit = (f"the limit in force: {session.timeout:g} s (%sandbox_timeout) or the "
                 "server's own execute_timeout, whichever is shorter")  # fmt: skip
    elif session.timeout is not None and session.timeout < server:  # type: ignore[operator]
        limit = f"{session.timeout:g} s, set with %sandbox_timeout"
    else:
        limit = f"{server_text}, the server's execute_timeout"
    return CellError(
        "Timeout",
        f"the cell ran longer than {limit}, and was killed",
        [
            f"Change the per-cell limit with %sandbox_timeout SECONDS, up to the server's "
            f"execute_timeout ({server_text}); beyond that the server's own setting governs "
            "(sandbox-kernel serve --execute-timeout).",
            "Files the cell wrote before it was killed are kept; its shell state is not.",
        ],
    )


def _sandbox_failure(status: object) -> CellError:
    meaning = protocol.STATUS_MEANINGS.get(status, "unexpected answer")  # type: ignore[call-overload]
    return CellError(
        "SandboxError",
        f"the sandbox could not run the cell (status {status}: {meaning})",
        [
            "This is an error of the sandbox, not of the cell: run the cell again. Public "
            "sandbox servers answer so now and then while a container is being reset; if it "
            "persists, look at the server's log."
        ],
    )


def _interrupted() -> CellError:
    return CellError(
        "Interrupted",
        "the cell was interrupted",
        [
            "Its connection was closed: the embedded sandbox server killed the command; a "
            "public sandbox server cannot cancel and may run it until its own timeout.",
            "The next cell starts from the last completed environment.",
        ],
    )


def _unreachable(error: SandboxError, session: Session) -> CellError:
    if isinstance(error, Sandbox503):
        name = "SandboxBusy"
    elif isinstance(error, SandboxProtocolError):
        name = "SandboxBadAnswer"
    elif isinstance(error, SandboxHTTPError):
        name = f"SandboxHTTP{error.status_code}"
    else:
        name = "SandboxUnreachable"
    advice = [
        "The kernel is fine and keeps the environment of the last good cell"
        + (f" ({session.environment})" if session.environment else "")
        + ": the next cell continues from it once the sandbox answers again."
    ]
    return CellError(name, str(error), advice)


def _lost_environment(uuid: str | None) -> str:
    return (
        f"The environment {uuid} is gone from the sandbox (expired, or the server lost it): "
        "this cell ran in a fresh environment. Files and shell state of the earlier cells "
        "were lost."
    )


def _user_line_numbers(stderr: str, offset: int) -> str:
    """``bash: line 80:`` -> ``bash: line 3:``: count lines from the cell's first line."""

    def shift(match: re.Match[str]) -> str:
        line = int(match.group(2)) - offset
        return f"{match.group(1)}line {line}:" if line > 0 else match.group(0)

    return _BASH_LINE.sub(shift, stderr)


def _drop_timeout_sentence(stderr: str) -> str:
    """The server's own timeout sentence: the kernel reports the timeout in its own words.

    It ends stderr, or comes just before the line saying the output was cut."""
    found = _TIMEOUT_SENTENCE.search(stderr)
    if found is None:
        return stderr
    before, cut = stderr[: found.start()], found.group(1)
    return f"{before}\n{cut}" if before and cut else before + cut


_TIMEOUT_SENTENCE = re.compile(
    r"\n?Command timed out after [0-9.]+ seconds\n?"
    r"(\[sandbox\] output cut after [0-9]+ \(--max-output\)|)$"
)
