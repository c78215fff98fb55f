"""Grading one notebook: its cells run in a Sandbox kernel of its own, each question's table
checked right after the cell tagged for it.

The kernel is always the Sandbox kernel of this Python, whatever kernel the notebook names,
started in an empty temporary folder with ``SANDBOX_GRADING=1`` (its magics then refuse to
read or write local files, or to change the sandbox) and without host-path permissions. A score
is taken only from the ``%%sandbox_check`` result of the request the grader sent: what the
submission's own cells display is never read, and of their messages only an error's name and
the start of its text are kept, so a cell printing megabytes costs no memory here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager

from ..checking import CHECK_MIME
from ..session.context import GRADING_VARIABLE
from ..settings import SandboxSettings
from .notebooks import CodeCell, InvalidNotebook, read_submission
from .results import CaseResult, CellFailure, NotebookResult, Question, QuestionResult, Status

#: Variables of the grader's environment that a graded kernel must not inherit.
_WITHHELD_VARIABLES = ("SANDBOX_ALLOW_HOST_PATHS", "SANDBOX_URL", "SANDBOX_TOKEN")
#: Characters kept of a failing cell's error text.
_ERROR_TEXT = 300
#: Characters kept of a case's detail (a diff of expected and got).
_DETAIL_TEXT = 2000
#: Seconds a kernel gets to start and answer.
_START_TIMEOUT = 60.0
#: Seconds between checks that the kernel still lives, while a cell runs.
_POLL = 0.5
#: Times a cell refused by a busy sandbox (nothing ran) is sent again.
_BUSY_RETRIES = 5
#: The client's text when ``execute/`` stayed 503 (``sandbox_kernel._wire.busy_advice``).
_BUSY_TEXT = "the sandbox stayed busy"


class NotebookTimedOut(Exception):
    """The notebook's ``--timeout`` is spent."""


class KernelDied(Exception):
    """The kernel process ended while the notebook was being graded."""


class GradingStopped(Exception):
    """Grading was interrupted (Ctrl-C): the kernel is being killed."""


class KernelRegistry:
    """The kernels running now, so that Ctrl-C or SIGTERM can kill them all from the main
    thread (each runs in its own process group, so a terminal's Ctrl-C does not reach it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self.stopping = threading.Event()

    def add(self, pid: int) -> None:
        with self._lock:
            self._groups.add(pid)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._groups.discard(pid)

    def kill_all(self) -> None:
        """Stop grading: every kernel's process group gets SIGKILL now."""
        self.stopping.set()
        with self._lock:
            groups = list(self._groups)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)


@dataclasses.dataclass
class Execution:
    """What the grader keeps of one request: its reply's status and error, and the check
    result it displayed (only looked for in the grader's own check requests)."""

    status: str = "ok"
    ename: str = ""
    evalue: str = ""
    check: dict[str, Any] | None = None


class _SpecOfThisPython(KernelSpecManager):
    """The Sandbox kernel of this very Python, installed kernelspec or not."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__()
        self.kernel_argv = argv

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(argv=self.kernel_argv, display_name="Sandbox (grading)",
                          language="bash", interrupt_mode="message")  # fmt: skip


def kernel_command(settings: SandboxSettings) -> list[str]:
    """The kernel's command line: the URL given explicitly (a teacher's ``c.SandboxKernel.url``
    must not send submissions elsewhere), the token left to the environment (never on a command
    line), host paths forbidden whatever the configuration says."""
    return [
        sys.executable, "-m", "sandbox_kernel", "-f", "{connection_file}",
        f"--SandboxKernel.url={settings.url}", "--SandboxKernel.token=",
        "--SandboxKernel.allow_host_paths=False",
    ]  # fmt: skip


def kernel_environment(settings: SandboxSettings) -> dict[str, str]:
    """The grader's environment, minus what would widen a submission's reach, plus the
    sandbox's URL and token and ``SANDBOX_GRADING=1``."""
    env = {name: value for name, value in os.environ.items() if name not in _WITHHELD_VARIABLES}
    env["SANDBOX_URL"] = settings.url
    env["SANDBOX_TOKEN"] = settings.token or ""
    env[GRADING_VARIABLE] = "1"
    return env


@dataclasses.dataclass
class NotebookGrader:
    """Grades notebooks one at a time (one grader per worker thread)."""

    settings: SandboxSettings
    questions: list[Question]
    timeout: float
    registry: KernelRegistry

    def grade(self, path: Path, label: str) -> NotebookResult:
        """The row of the notebook at ``path`` (named ``label`` in the report)."""
        started = time.monotonic()
        result = NotebookResult.empty(label, self.questions)
        try:
            cells = read_submission(path)
        except InvalidNotebook as error:
            result.status, result.problem = Status.INVALID, f"invalid notebook: {error}"
        else:
            known = {question.name for question in self.questions}
            result.unknown_tags = sorted(
                {f"check:{name}" for cell in cells for name in cell.checks if name not in known}
            )
            self._run(cells, result, started + self.timeout)
        result.seconds = time.monotonic() - started
        return result

    def _run(self, cells: list[CodeCell], result: NotebookResult, deadline: float) -> None:
        with _scratch_folder() as scratch:
            kernel = _Kernel(self.settings, scratch, self.registry)
            finished = False
            try:
                kernel.start(deadline)
                self._run_cells(kernel, cells, result, deadline)
                finished = True
            except NotebookTimedOut:
                result.status = Status.TIMEOUT
                result.problem = f"still running after {self.timeout:g} s (--timeout): stopped"
            except KernelDied:
                if self.registry.stopping.is_set():
                    raise GradingStopped() from None
                result.status = Status.KERNEL_DIED
                result.problem = f"the kernel died ({kernel.death()})"
            finally:
                kernel.stop(now=not finished)
        self._explain_unchecked(cells, result)

    def _run_cells(
        self, kernel: _Kernel, cells: list[CodeCell], result: NotebookResult, deadline: float
    ) -> None:
        for cell in cells:
            execution = kernel.execute_patiently(cell.source, deadline)
            if execution.status != "ok":
                result.cell_failures.append(
                    CellFailure(cell.position, execution.ename, execution.evalue)
                )
            for name in cell.checks:
                if name in result.questions:
                    self._check(kernel, result.questions[name], deadline)

    def _check(self, kernel: _Kernel, outcome: QuestionResult, deadline: float) -> None:
        """Run the question's table in the kernel; its result replaces any earlier one."""
        execution = kernel.execute_patiently(outcome.question.check_code, deadline, check=True)
        outcome.cases, outcome.checked, outcome.score = [], False, 0.0
        if execution.check is None:
            why = f"{execution.ename}: {execution.evalue}" if execution.status != "ok" else ""
            outcome.detail = f"the check gave no result ({why or 'nothing displayed'})"
            return
        outcome.score, outcome.cases = read_check(execution.check, outcome.question.points)
        outcome.checked, outcome.detail = True, ""

    def _explain_unchecked(self, cells: list[CodeCell], result: NotebookResult) -> None:
        """Say why a question has no check result (when nothing else said it)."""
        tagged = {name for cell in cells for name in cell.checks}
        for name, outcome in result.questions.items():
            if outcome.checked or outcome.detail or result.status is Status.INVALID:
                continue
            if name not in tagged:
                outcome.detail = f"no cell is tagged check:{name}"
            else:
                outcome.detail = f"its check did not run ({result.status})"


class _Kernel:
    """One Sandbox kernel, started in ``scratch/work`` (empty); its log and connection file
    (which holds its key) in ``scratch``, which only this user may enter."""

    def __init__(self, settings: SandboxSettings, scratch: Path, registry: KernelRegistry):
        self.settings = settings
        self.scratch = scratch
        self.registry = registry
        specs = _SpecOfThisPython(kernel_command(settings))
        self.manager = KernelManager(kernel_name="sandbox", kernel_spec_manager=specs,
                                     connection_file=str(scratch / "connection.json"))  # fmt: skip
        self.client: Any = None
        self._log: IO[bytes] | None = None
        self._pid: int | None = None

    def start(self, deadline: float) -> None:
        work = self.scratch / "work"
        work.mkdir(mode=0o700)
        self._log = open(self.scratch / "kernel.log", "wb")  # noqa: SIM115 (closed in stop)
        self.manager.start_kernel(
            env=kernel_environment(self.settings), cwd=str(work),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )  # fmt: skip
        self._pid = self.manager.provisioner.pid  # type: ignore[union-attr]
        if self._pid is not None:
            self.registry.add(self._pid)
        if self.registry.stopping.is_set():
            raise KernelDied()
        self.client = self.manager.client()
        self.client.start_channels()
        wait = min(_START_TIMEOUT, deadline - time.monotonic())
        if wait <= 0:
            raise NotebookTimedOut()
        try:
            self.client.wait_for_ready(timeout=wait)
        except RuntimeError:
            if not self.manager.is_alive():
                raise KernelDied() from None
            raise NotebookTimedOut() from None
        self._drain_iopub()

    def _drain_iopub(self) -> None:
        """Forget the start-up messages (status, the banner's stream)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.client.get_iopub_msg(timeout=0.2)

    def execute_patiently(self, code: str, deadline: float, check: bool = False) -> Execution:
        """Run ``code``, sending it again while the sandbox said it was busy (503: nothing
        ran), within the notebook's deadline."""
        for attempt in range(_BUSY_RETRIES + 1):
            execution = self.execute(code, deadline, check)
            if _BUSY_TEXT not in execution.evalue or attempt == _BUSY_RETRIES:
                break
        return execution

    def execute(self, code: str, deadline: float, check: bool = False) -> Execution:
        """Run ``code`` as one cell; keep its error, and (``check``) its check result."""
        msg_id = self.client.execute(code, store_history=not check, allow_stdin=False,
                                     stop_on_error=False)  # fmt: skip
        execution = Execution()
        while True:
            message = self._next(self.client.get_iopub_msg, deadline)
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message.get("msg_type"), message.get("content", {})
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "error":
                _keep_error(execution, content)
            elif check and kind == "display_data":
                found = _check_result(content)
                execution.check = found if found is not None else execution.check
        reply = self._reply(msg_id, deadline)
        execution.status = str(reply.get("status", "error"))
        if execution.status != "ok" and not execution.ename:
            _keep_error(execution, reply)
        return execution

    def _reply(self, msg_id: str, deadline: float) -> dict[str, Any]:
        while True:
            message = self._next(self.client.get_shell_msg, deadline)
            if message.get("parent_header", {}).get("msg_id") == msg_id:
                content: dict[str, Any] = message.get("content", {})
                return content

    def _next(self, receive: Any, deadline: float) -> dict[str, Any]:
        """The next message of a channel; raises when the deadline passes, the kernel dies
        or grading stops."""
        while True:
            if self.registry.stopping.is_set():
                raise KernelDied()
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotebookTimedOut()
            try:
                message: dict[str, Any] = receive(timeout=min(_POLL, left))
                return message
            except queue.Empty:
                if not self.manager.is_alive():
                    raise KernelDied() from None

    def death(self) -> str:
        """How the kernel ended, and the last line of its log, for the report."""
        process = getattr(self.manager.provisioner, "process", None)
        code = process.poll() if process is not None else None
        if code is not None and code < 0:
            how = f"killed by {_signal_name(-code)}"
        else:
            how = "ended" if code is None else f"exit status {code}"
        try:
            with open(self.scratch / "kernel.log", "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 400))
                tail = log.read().decode("utf-8", errors="replace").strip().splitlines()
        except OSError:
            tail = []
        return f"{how}; its log ends with: {tail[-1][:200]}" if tail else how

    def stop(self, now: bool) -> None:
        """Shut the kernel down (at once after a timeout or a death), whatever happens."""
        try:
            if self.client is not None:
                self.client.stop_channels()
            if self.manager.has_kernel:
                self.manager.shutdown_kernel(now=now)
        except Exception:  # the kernel is killed below anyway
            pass
        finally:
            if self._pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._pid, signal.SIGKILL)
                self.registry.discard(self._pid)
            with contextlib.suppress(Exception):
                self.manager.cleanup_resources()
            if self._log is not None:
                self._log.close()


@contextlib.contextmanager
def _scratch_folder() -> Iterator[Path]:
    """A private temporary folder, removed afterwards whatever is in it."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-kernel-grade-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _keep_error(execution: Execution, content: dict[str, Any]) -> None:
    execution.ename = _text(content.get("ename"), 80) or "Error"
    execution.evalue = _text(content.get("evalue"), _ERROR_TEXT)


def _check_result(content: dict[str, Any]) -> dict[str, Any] | None:
    """The check result in a display_data's bundle, if it has one."""
    data = content.get("data")
    value = data.get(CHECK_MIME) if isinstance(data, dict) else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return value if isinstance(value, dict) else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_check(data: dict[str, Any], points: float) -> tuple[float, list[CaseResult]]:
    """The score (within the question's ``points``) and the cases of a check result, every
    field type-checked: a value of the wrong type is dropped, never trusted."""
    return _score(data.get("score"), points), _cases(data.get("cases"))


def _cases(raw: object) -> list[CaseResult]:
    """The cases of a check result, type-checked field by field."""
    cases = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        cases.append(
            CaseResult(
                name=_text(item.get("name"), 200),
                verdict=_text(item.get("verdict"), 100),
                points=_number(item.get("points")) or 0.0,
                score=_number(item.get("score")) or 0.0,
                time=_number(item.get("time")),
                exit_code=_integer(item.get("exit_code")),
                signal=_text(item.get("signal"), 40) or None,
                hidden=item.get("hidden") is True,
                detail=_text(item.get("detail"), _DETAIL_TEXT),
            )
        )
    return cases


def _score(raw: object, points: float) -> float:
    """A check's score, within the question's points."""
    value = _number(raw) or 0.0
    return min(max(value, 0.0), points)


def _text(value: object, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
