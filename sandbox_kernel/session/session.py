"""A sandbox session: the environment and shell state carried from cell to cell.

One :class:`Session` per notebook (the kernel's, or the IPython extension's ``%%sandbox``
cells). A cell is one ``execute/`` request (contract, "POST execute/") with ``save: true`` and
the latest environment uuid; the answer's new uuid replaces it. Everything a front-end needs to
show the cell comes back as a :class:`CellOutcome`, whatever went wrong: the session never
raises for a failing cell, an unreachable sandbox, or an interrupt.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
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
    with_advice,
)
from .._signals import describe_signal, signal_of_status
from .._units import format_size
from .._wire import is_cluster_lost
from ..client import Cancellation, Sandbox
from ..protocol import STOPPED_NOTE
from . import records
from .cellscript import (
    DISPLAY_DIR,
    RESULT_PATH,
    Bookkeeping,
    LiveFrames,
    build_script,
    next_state_file,
    parse_bookkeeping,
    server_notes,
    unframe,
    user_line_numbers,
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
    #: Files ``display`` recorded, not fetched yet (see :meth:`Session.fetch_displays`).
    pending_displays: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ran(self) -> bool:
        """Whether the cell reached the sandbox and ran (False: unreachable, refused, or
        interrupted before an answer)."""
        return self.error is None or self.exit_code is not None

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
class PreparedCell:
    """A cell made ready to send: its ``execute/`` config, and what reading its answer needs."""

    config: dict[str, Any]
    nonce: str
    next_state: str
    #: Lines of the script before the cell's code (bash's line numbers are shifted back).
    prologue_lines: int


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
        #: Set by :meth:`failed` when the environment was gone; shown with the rerun cell.
        self.lost_notice = ""
        self._told_about_tmp = False

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
        self.state_file = records.known_state(records.identity_of(self.client), uuid)
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
            records.remember_state(
                records.identity_of(self.client), self.environment, self.state_file
            )
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
        """Run ``code`` as one bash script in the sandbox; never raises for the cell's sake.

        The synchronous front-ends' way (IPython's ``%%sandbox``, ``run``); the kernel runs
        the same steps (:meth:`prepare`, :meth:`failed`, :meth:`finish`) in its event loop.
        """
        cell = self.prepare(code)
        try:
            answer = self.client.execute(cell.config, cancel=cancel, on_busy=on_busy)
        except SandboxError as error:
            failed = self.failed(error)
            if failed is not None:
                return failed
            outcome = self.run_cell(code, cancel=cancel, on_busy=on_busy)
            outcome.notices.insert(0, self.lost_notice)
            return outcome
        outcome = self.finish(cell, answer)
        self.fetch_displays(outcome)
        return outcome

    def prepare(self, code: str) -> PreparedCell:
        """The script and ``execute/`` config of the next cell."""
        self.cells += 1
        nonce = secrets.token_hex(8)
        next_state = next_state_file(self._state_token, self.state_file)
        script = build_script(code, nonce, self.environ, self.state_file, next_state)
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
        prologue_lines = script[: len(script) - len(code) - 1].count("\n")
        return PreparedCell(config, nonce, next_state, prologue_lines)

    def failed(self, error: SandboxError) -> CellOutcome | None:
        """The outcome of a cell whose request failed, or None when the environment is gone
        and the cell must run again in a fresh one (then :attr:`lost_notice` says so).

        Only the server's own sentence about this uuid means the environment is gone (contract:
        "No environment with UUID '<uuid>' found"); any other 404 (a wrong URL, a proxy's page)
        keeps the environment. An error of another client (the kernel's asyncio one) gets the
        advice of this session's client (a refused JupyterHub token names the Hub's settings).
        """
        error = with_advice(error, self.client.advise)
        if isinstance(error, SandboxCancelled):
            return CellOutcome(error=_interrupted())
        environment = self.environment
        if isinstance(error, Sandbox404) and environment and environment in error.response.text:
            self.lost_notice = _lost_environment(self.reset())
            return None
        return CellOutcome(error=_unreachable(error, self))

    def finish(
        self, cell: PreparedCell, answer: dict[str, Any], live: LiveFrames | None = None
    ) -> CellOutcome:
        """The outcome of an answered cell; the environment it saved is adopted.

        ``live``: the cell's output was streamed through it and already shown, so the outcome
        carries only what the user has not seen (notices, the error).
        """
        outcome = CellOutcome(answer=answer)
        executions = answer.get("execution") or []
        if not executions:
            self.adopt(answer)  # saved whatever the outcome (contract)
            outcome.error = _sandbox_failure(answer.get("status"))
            return outcome
        entry = executions[0]
        outcome.exit_code = code = int(entry.get("exit_code", -1))
        raw_stderr = str(entry.get("stderr", ""))
        stderr = unframe(raw_stderr)
        added = stderr.added
        if live is None:
            outcome.stdout = unframe(str(entry.get("stdout", ""))).text
            outcome.stderr = user_line_numbers(stderr.text, cell.prologue_lines)
            if code == protocol.STATUS_TIMEOUT:
                outcome.stderr = _drop_timeout_sentence(outcome.stderr)
        elif not stderr.complete:  # killed before its end marker: the server's notes end it
            added = "\n".join(server_notes(raw_stderr))
        stopped = STOPPED_NOTE in added
        if code == protocol.STATUS_TIMEOUT:
            outcome.error = _timed_out(self)
        elif stopped:
            outcome.error = _stopped()
        elif entry.get(protocol.CAUSE_FIELD) == protocol.CAUSE_MEMORY:
            outcome.error = _memory_limit(self)
        elif code == protocol.STATUS_UNKNOWN_ERROR:
            outcome.error = _sandbox_failure(code)
        elif code != 0:
            outcome.error = _exit_code(code, entry, self)
        if code != protocol.STATUS_TIMEOUT:
            outcome.notices += _readable_notes(added, outcome.error)
        if live is not None and live.dropped:
            outcome.notices.append(_kernel_cut(live))
        book = parse_bookkeeping(answer.get("result"), cell.nonce)
        if book is not None and book.state != cell.next_state:
            book = None  # not what this cell's script writes
        # Saved whatever the outcome (contract).
        self.adopt(answer, book.state if book is not None else None)
        if book is None:
            if self.environment and code != protocol.STATUS_TIMEOUT and not stopped:
                outcome.notices.append(_STATE_NOT_SAVED)
            elif stopped and outcome.error is not None:
                outcome.error.advice = [_STATE_NOT_SAVED]
        else:
            outcome.state_saved = True
            self._remember(book)
            outcome.pending_displays = book.display
            if book.cwd and _under_tmp(book.cwd) and not self._told_about_tmp:
                self._told_about_tmp = True
                outcome.notices.append(_TMP_NOTICE)
        return outcome

    def _remember(self, book: Bookkeeping) -> None:
        self.state = ShellState(
            cwd=book.cwd,
            files=book.files,
            variables=book.variables,
            functions=book.functions,
            aliases=book.aliases,
        )

    def fetch_displays(self, outcome: CellOutcome) -> None:
        """Fetch the files ``display`` recorded in the cell's shell into ``outcome.displays``,
        each within the size the server announced (a server sending more is cut off: the
        client raises)."""
        for name in outcome.pending_displays:
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
            outcome.displays.append(Display(mime_type(original), data.getvalue(), original))
        outcome.pending_displays = []


def mime_type(name: str) -> str:
    """The MIME type a file is displayed as (by extension; plain text otherwise)."""
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    return DISPLAY_TYPES.get(suffix, "text/plain")


# -- wording of failures ----------------------------------------------------------------------


def _exit_code(code: int, entry: Mapping[str, Any], session: Session) -> CellError:
    """A failed command: the signal the server names (extension ``causes``), or what its
    exit status suggests when the server names none (a PremierLangage server)."""
    named = entry.get(protocol.SIGNAL_FIELD)
    if (
        entry.get(protocol.CAUSE_FIELD) == protocol.CAUSE_SIGNAL
        and isinstance(named, str)
        and named
    ):
        return _killed_by(named, code)
    evalue = f"command exited with status {code}"
    if entry.get(protocol.CAUSE_FIELD) is None:  # the server did not say why: guess from the status
        evalue += _probable_signal(code, session)
    return CellError("ExitCode", evalue)


def _probable_signal(code: int, session: Session) -> str:
    """What a status of ``128 + N`` probably means, said as a guess: a script may also
    ``exit 137`` itself. Empty for any other status."""
    name = signal_of_status(code)
    if name == "SIGKILL":
        return f": probably killed (SIGKILL), often the {_memory_limit_words(session)}"
    if name == "SIGSEGV":
        return ": probably a segmentation fault (SIGSEGV)"
    if name is not None:
        return f" (probably killed by {name}: {describe_signal(name)})"
    return ""


def _killed_by(name: str, code: int) -> CellError:
    """A program of the cell died of signal ``name``, as the server says."""
    advice = _SIGNAL_ADVICE.get(name)
    return CellError(
        "Signal",
        f"killed by {name} ({describe_signal(name)}), exit status {code}",
        [advice] if advice else [],
    )


_SIGNAL_ADVICE = {
    "SIGSEGV": "The program read or wrote memory it does not own (a bad pointer, an index "
    "out of bounds, a runaway recursion): a debugger or `gcc -g -fsanitize=address` shows where.",
    "SIGABRT": "The program aborted itself (a failed assert, abort(), an uncaught C++ "
    "exception, or the C library found its memory corrupted): its message, if any, is above.",
    "SIGFPE": "An arithmetic error: most often an integer division by zero.",
    "SIGBUS": "A bad memory access (a misaligned pointer, or a mapped file that shrank).",
    "SIGILL": "The program ran an invalid instruction (a corrupted function pointer, or code "
    "built for another processor).",
    "SIGXCPU": "The program used up the sandbox's CPU time limit (an endless loop?).",
    "SIGXFSZ": "The program wrote a file larger than the sandbox allows.",
    "SIGKILL": "Something killed the program outright (not the memory cap: the server says "
    "when it is).",
    "SIGPIPE": "The program wrote to a pipe whose reader had ended (`| head`): often harmless.",
}


def _memory_limit(session: Session) -> CellError:
    """The memory cgroup killed a program of the cell (extension ``causes``)."""
    return CellError(
        "MemoryLimit",
        f"{_memory_limit_words(session)} reached: a program of the cell was killed",
        [_MEMORY_ADVICE],
    )


_MEMORY_ADVICE = (
    "Use less memory (smaller data, fewer processes at once); the embedded server's limit per "
    "cell is its --memory-limit."
)


def _memory_limit_words(session: Session) -> str:
    """``memory limit (64 MiB)``, the sandbox's limit as its cached specifications say (and
    ``memory limit`` when they do not tell or cannot be read)."""
    try:
        limit = session.client.specs().limits.ram
    except SandboxError:
        limit = None
    if limit is None or limit <= 0:
        return "memory limit"
    mebibytes, rest = divmod(limit, 1024**2)
    return f"memory limit ({mebibytes} MiB)" if not rest else f"memory limit ({format_size(limit)})"


def _timed_out(session: Session) -> CellError:
    server = session.server_timeout()
    if session.timeout is not None and (server is None or session.timeout < server):
        limit = f"after {session.timeout:g} s (%sandbox_timeout)"
    elif server is not None:
        limit = f"after {server:g} s (the server's limit)"
    else:
        limit = "at the server's time limit"
    return CellError(
        "Timeout",
        f"the cell was stopped {limit}",
        ["Its files are kept, its shell state is not. %sandbox_timeout SECONDS sets the limit."],
    )


def _stopped() -> CellError:
    return CellError("Interrupted", "stopped; the output above and the cell's files are kept")


def _sandbox_failure(status: object) -> CellError:
    meaning = protocol.STATUS_MEANINGS.get(status, "unexpected answer")  # type: ignore[call-overload]
    return CellError(
        "SandboxError",
        f"the sandbox could not run the cell (status {status}: {meaning})",
        ["Not an error of the cell: run it again; if it persists, see the server's log."],
    )


def _interrupted() -> CellError:
    return CellError(
        "Interrupted",
        "the cell was stopped",
        ["The next cell starts from the last completed environment."],
    )


def _unreachable(error: SandboxError, session: Session) -> CellError:
    kept = f" ({session.environment})" if session.environment else ""
    if isinstance(error, SandboxHTTPError) and is_cluster_lost(
        error.status_code, error.response.text
    ):
        return _cluster_lost(error, kept)
    if isinstance(error, Sandbox503):
        name = "SandboxBusy"
    elif isinstance(error, SandboxProtocolError):
        name = "SandboxBadAnswer"
    elif isinstance(error, SandboxHTTPError):
        name = f"SandboxHTTP{error.status_code}"
    else:
        name = "SandboxUnreachable"
    advice = [f"The kernel keeps the environment of the last good cell{kept}: the next cell "
              "continues from it."]  # fmt: skip
    return CellError(name, str(error), advice)


def _cluster_lost(error: SandboxHTTPError, kept: str) -> CellError:
    """A cluster front lost the run after it may have started (502): said whole, never run
    again by the kernel; the environment stays the last one saved."""
    return CellError(
        "SandboxClusterLost",
        _said(error.response.text) or str(error),
        [
            "The kernel did not run the cell again: its commands may have run, in part. Check "
            "what they do (the files they write, anything they change elsewhere) before "
            "running it again.",
            f"The kernel keeps the environment of the last good cell{kept}: the next cell "
            "continues from it, on another worker.",
        ],
    )


#: Characters of a server's own error text shown at most (a hostile one could send megabytes).
_SAID_LIMIT = 2000


def _said(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SAID_LIMIT else text[:_SAID_LIMIT] + "…"


def _lost_environment(uuid: str | None) -> str:
    return (
        f"The environment {uuid} is gone from the sandbox (expired or lost): this cell ran in a "
        "fresh environment, and the files and shell state of earlier cells were lost."
    )


_STATE_NOT_SAVED = (
    "The shell state was not saved (the cell was killed or replaced by exec); its files are kept."
)
_TMP_NOTICE = (
    "Note: /tmp is emptied after every cell; only /home/student carries over to the next one."
)


def _under_tmp(cwd: str) -> bool:
    return cwd == "/tmp" or cwd.startswith("/tmp/")


_OUTPUT_CUT = re.compile(protocol.OUTPUT_CUT_PATTERN)
#: The embedded server's line for a command its memory cgroup killed.
_MEMORY_NOTE = re.compile(protocol.MEMORY_NOTE_PATTERN)


def _readable_notes(added: str, error: CellError | None = None) -> list[str]:
    """The server's notes as one short line each; its stop note, and its memory note when the
    error is the memory limit, are said by the error."""
    notes = []
    memory_said = error is not None and error.ename == "MemoryLimit"
    for line in added.splitlines():
        cut = _OUTPUT_CUT.fullmatch(line.strip())
        if cut:
            size = format_size(int(cut.group(1)))
            line = f"Output cut after {size} (the sandbox's --max-output); the cell ran on."
        elif line.strip() in (STOPPED_NOTE, "") or (memory_said and _MEMORY_NOTE.match(line)):
            continue
        notes.append(line)
    return notes


def _kernel_cut(live: LiveFrames) -> str:
    return (
        f"Output cut after {format_size(live.limit)}: {format_size(live.dropped)} more not shown "
        "(c.SandboxKernel.max_output)."
    )


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
    f"({protocol.OUTPUT_CUT_PATTERN}|)$"
)
