"""One ``execute/`` request, from a checked config to the response dict.

Execution rules (contract, "POST execute/"): commands run one after the other in the same
working directory, within one time budget (``execute_timeout``); a command's own ``timeout`` is
capped by what is left; a failing command stops the run unless it starts with ``-``; stdout and
stderr are stripped; the result file is read whatever happened; with ``save`` the directory is
kept as a *new* environment whatever the outcome.

Beyond the contract, one request cannot exhaust the server: an upload is unpacked only in a
slot (as the sandbox user, see :mod:`.unpacker`); the time budget is also kept by the wall
clock, so that what commands cause (replacing a sandbox after a timeout) counts too; and the
output of all commands together is bounded by ``--max-output``, counted as the JSON-escaped
text the answer will carry.

A streamed run (``execute/stream/``, see :mod:`.streaming`) is the same run with
:class:`RunHooks`: output is handed over as it is read (and what was handed over is what the
answer keeps), stdin stays open for the client, and the client may stop the run.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import protocol
from .._signals import signal_of_status
from .live import LiveRun, RunHooks
from .runners import (
    CommandOutcome,
    Isolation,
    IsolationError,
    Live,
    Runner,
    RunnerPool,
    StdinPipe,
)
from .settings import ServerSettings
from .storage import NotConfined, Snapshot, Storage, StorageFull, iso_expire, open_beneath
from .unpacker import UnpackFailed, unpack

if TYPE_CHECKING:
    from .live import LiveControl

log = logging.getLogger(__name__)

#: A timed-out sandbox is replaced within this, or the rest of the request fails.
_REPLACE_TIMEOUT = 5.0


class EnvironmentNotFound(Exception):
    """``config.environment`` names no saved environment (HTTP 404)."""


class Overloaded(Exception):
    """No execution slot became free in time (HTTP 503)."""


class Runs(Protocol):
    """What the HTTP application needs of whatever runs its requests: the single server's
    :class:`Executor`, or a cluster front's executor, which hands them to workers."""

    #: Runs in progress (``usages/``).
    busy: int

    async def execute(
        self,
        config: Mapping[str, Any],
        upload: Path | None,
        hooks: RunHooks | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """``user``: the JupyterHub user asking (``--hub-auth``), who owns what is saved and
        may start only from their own environments."""
        ...

    def live(self, send: Callable[[dict[str, Any]], None]) -> LiveControl:
        """The controls of one streamed run whose frames go to ``send``."""
        ...


class Refused(Exception):
    """A run refused with a status and text of its own: a cluster front answers so what a
    worker refused (its ``error`` event), and 502 for a run the cluster lost."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


#: What :meth:`Runs.execute` raises when a run is refused or cannot be saved.
RUN_REFUSALS = (UnpackFailed, EnvironmentNotFound, Overloaded, StorageFull, Refused)


def refusal_answer(error: Exception) -> tuple[int, str]:
    """The HTTP status and text of one of :data:`RUN_REFUSALS`: the same for ``execute/``
    and for the error frame of ``execute/stream/``."""
    if isinstance(error, UnpackFailed):
        return 400, f"Invalid environment archive: {error}"
    if isinstance(error, EnvironmentNotFound):
        return 404, f"No environment with UUID '{error}' found"
    if isinstance(error, Overloaded):
        return 503, protocol.OVERLOADED_TEXT
    if isinstance(error, Refused):
        return error.status, error.text
    return 507, str(error)


class Executor:
    def __init__(
        self, settings: ServerSettings, storage: Storage, isolation: Isolation, pool: RunnerPool
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.isolation = isolation
        self.pool = pool
        self._slots = asyncio.Semaphore(settings.workers)
        self.busy = 0

    def live(self, send: Callable[[dict[str, Any]], None]) -> LiveRun:
        """The controls of a streamed run in this server's sandboxes."""
        return LiveRun(send)

    async def execute(
        self,
        config: Mapping[str, Any],
        upload: Path | None,
        hooks: RunHooks | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Run a validated config; ``upload`` is the uploaded ``.tgz``, unpacked in the slot;
        ``hooks`` make it a streamed run; ``user`` (with --hub-auth) owns the saved
        environment, and another user's base environment is not found.

        Raises :class:`EnvironmentNotFound`, :class:`Overloaded`,
        :class:`~.unpacker.UnpackFailed` (a refused archive) or ``StorageFull``.
        """
        base = None
        if "environment" in config:
            base = self.storage.directory(config["environment"], user)
            if base is None:
                raise EnvironmentNotFound(config["environment"])
        try:
            await asyncio.wait_for(self._slots.acquire(), protocol.SLOT_WAIT_SECONDS)
        except asyncio.TimeoutError:  # the builtin one only from Python 3.11
            raise Overloaded() from None
        self.busy += 1
        try:
            return await self._execute_in_slot(config, base, upload, hooks, user)
        finally:
            self.busy -= 1
            self._slots.release()

    async def _execute_in_slot(
        self,
        config: Mapping[str, Any],
        base: Path | None,
        upload: Path | None,
        hooks: RunHooks | None,
        user: str | None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        current = _Current(await self.pool.take())
        workdir = current.runner.workdir
        saved = False
        try:
            if user is not None:
                await asyncio.to_thread(self.isolation.share_cpu, current.runner, user)
            snapshot = await self._prepare(workdir, base, upload)
            status, execution = await self._run_commands(current, config, hooks)
            runner = current.runner
            # Nothing may write to the directory while it is read and saved: stop the
            # sandbox and wait until it is empty (see BwrapRunner.stop).
            await runner.stop()
            response: dict[str, Any] = {"status": status, "execution": execution}
            if "result_path" in config:
                result, error = await asyncio.to_thread(
                    _read_result, workdir, config, self.settings.max_result
                )
                if error:
                    response["status"] = error
                else:
                    response["result"] = result
            response["total_time"] = time.monotonic() - started
            if config.get("save", False):
                name, expire = await asyncio.to_thread(self.storage.save, workdir, snapshot, user)
                saved = True
                response["environment"], response["expire"] = name, iso_expire(expire)
            return response
        finally:
            # Torn down in the background (also when the client went away and this handler
            # is cancelled): the answer does not wait for it.
            self.pool.release(current.runner, remove_workdir=not saved)

    async def _prepare(self, workdir: Path, base: Path | None, upload: Path | None) -> Snapshot:
        iso, settings = self.isolation, self.settings
        try:
            snapshot = Snapshot()
            if base is not None:
                snapshot = await asyncio.to_thread(
                    self.storage.populate, base, workdir, iso.uid, iso.gid
                )
        except FileNotFoundError as error:  # it expired while being copied
            raise EnvironmentNotFound(base.name if base else "") from error
        if upload is not None:  # over the base: files of the upload win (contract)
            await unpack(upload, workdir, uid=iso.uid, gid=iso.gid,
                         max_entries=settings.max_archive_entries,
                         max_bytes=settings.max_archive_bytes)  # fmt: skip
        return snapshot

    async def _run_commands(
        self, current: _Current, config: Mapping[str, Any], hooks: RunHooks | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        # The budget is spent by the commands' own times, as on the public server (3.x); the
        # effective timeout keeps its type because it is printed back ("after 1 seconds").
        # The wall clock bounds it too: replacing a sandbox after a timeout takes time.
        budget: float = self.settings.execute_timeout
        deadline = time.monotonic() + budget
        output = _OutputBudget(self.settings.max_output)
        environ = self.isolation.base_environ(current.runner.workdir)
        live = None
        if hooks is not None:
            environ.update(self.isolation.streaming_environ())
            live = Live(_LiveOutput(output.limit, hooks.on_output), hooks.stop)
        environ.update({name: str(value) for name, value in config.get("environ", {}).items()})
        execution: list[dict[str, Any]] = []
        status = protocol.STATUS_OK
        for item in config["commands"]:
            if live is not None and live.stop.is_set():
                _note_stop(execution)  # stopped between two commands: the rest does not run
                break
            command, own_timeout, may_fail = protocol.split_command(item)
            timeout = budget if own_timeout is None or own_timeout > budget else own_timeout
            outcome = None
            if current.runner.spent and deadline > time.monotonic():
                outcome = await self._replace_runner(current)
            if outcome is None:
                timeout = 0.0 if current.runner.spent else _within(timeout, deadline)
                if hooks is not None:
                    hooks.on_command(current.runner)
                outcome = await self._run_one(
                    current.runner, command, environ, timeout, output, live
                )
            execution.append(output.entry(command, outcome, timeout))
            budget -= outcome.elapsed
            code = outcome.exit_code
            if outcome.stopped:
                status = code
                break
            # A timeout of a "-" command lets the run go on; a sandbox error never does.
            if (code < 0 and code != protocol.STATUS_TIMEOUT) or (code != 0 and not may_fail):
                status = code
                break
        return status, execution

    async def _replace_runner(self, current: _Current) -> CommandOutcome | None:
        """A fresh sandbox on the same directory (the previous command timed out or broke
        it); the outcome of a sandbox error if none could be had, else None. Only asked for
        while the budget lasts: past it, commands time out without a sandbox."""
        workdir = current.runner.workdir
        started = time.monotonic()
        await self.pool.discard(current.runner, remove_workdir=False)
        try:
            current.runner = await asyncio.wait_for(self.pool.create(workdir), _REPLACE_TIMEOUT)
        except (asyncio.TimeoutError, IsolationError, OSError) as error:
            log.error("could not replace a sandbox: %s", error or "timed out")
            current.runner = _Broken(self.isolation, workdir)
            note = f"{protocol.UNKNOWN_ERROR_TEXT.strip()} (no new sandbox: {error or 'timeout'})"
            elapsed = time.monotonic() - started
            return CommandOutcome(protocol.STATUS_UNKNOWN_ERROR, b"", b"", elapsed, notes=[note])
        return None

    async def _run_one(
        self,
        runner: Runner,
        command: str,
        environ: Mapping[str, str],
        timeout: float,
        output: _OutputBudget,
        live: Live | None = None,
    ) -> CommandOutcome:
        if timeout <= 0:
            return CommandOutcome(protocol.STATUS_TIMEOUT, b"", b"", 0.0, timed_out=True)
        try:
            outcome = await runner.run(command, environ, timeout, output.raw_room(), live)
            if live is not None and isinstance(live.sink, _LiveOutput):
                outcome.dropped = outcome.dropped or live.sink.take_dropped()
            return outcome
        except OSError as error:
            log.exception("command failed in the sandbox")
            runner.spent = True
            return CommandOutcome(
                protocol.STATUS_UNKNOWN_ERROR,
                b"",
                b"",
                0.0,
                notes=[f"{protocol.UNKNOWN_ERROR_TEXT.strip()} ({error})"],
            )


def _within(timeout: float, deadline: float) -> float:
    """The timeout, unless the wall clock leaves noticeably less (then what it leaves)."""
    left = deadline - time.monotonic()
    if left <= 0:
        return 0.0
    if left >= timeout - _CLOCK_SLACK:
        return timeout
    return round(left, 3)


#: The wall clock may run this much behind the commands' own times before it decides.
_CLOCK_SLACK = 0.25


class _Broken(Runner):
    """Stands for a sandbox that could not be replaced: releasing it only removes nothing."""

    def __init__(self, isolation: Isolation, workdir: Path) -> None:
        self.isolation, self.workdir, self.cgroup, self.spent = isolation, workdir, None, True
        self.input = StdinPipe(make=False)

    async def close(self) -> None:
        return None


class _OutputBudget:
    """``--max-output`` for a whole request: stdout and stderr of every command together,
    counted as JSON-escaped text (a non-UTF-8 byte costs 6: ``\ufffd``). Past it, output is
    dropped and the command's stderr ends with one line saying so."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def raw_room(self) -> int:
        """Bytes a command may keep: escaping never makes text shorter than its bytes."""
        return self.left

    def entry(self, command: str, outcome: CommandOutcome, timeout: float) -> dict[str, Any]:
        stdout, cut_out = self._fit(outcome.stdout.decode("utf-8", errors="replace").strip())
        stderr, cut_err = self._fit(outcome.stderr.decode("utf-8", errors="replace").strip())
        lines = [stderr] if stderr else []
        lines += outcome.notes
        if outcome.timed_out:
            # The contract's text, newline included; output printed before the timeout is kept.
            lines.append(protocol.timeout_message(timeout))
        cut = outcome.dropped or cut_out or cut_err
        if cut:
            lines.append(protocol.OUTPUT_CUT_NOTE.format(limit=self.limit))
        if outcome.stopped:
            lines.append(protocol.STOPPED_NOTE)
        entry: dict[str, Any] = {
            "command": command,
            "exit_code": outcome.exit_code,
            "stdout": stdout,
            "stderr": "\n".join(
                line.rstrip("\n") if line is not lines[-1] else line for line in lines
            ),
            "time": outcome.elapsed,
        }
        entry.update(cause_fields(outcome, cut))
        return entry

    def _fit(self, text: str) -> tuple[str, bool]:
        """``text`` within what is left (and what is left then), and whether it was cut."""
        size = _escaped_size(text)
        if size <= self.left:
            self.left -= size
            return text, False
        fitted = _longest_prefix_within(text, self.left)
        self.left = 0
        return fitted, True


def cause_fields(outcome: CommandOutcome, output_cut: bool) -> dict[str, str]:
    """Why a command was killed or cut, for its entry (extension ``causes``,
    docs/protocol-extensions.md): ``{"cause": "timeout" | "memory" | "output"}``, or
    ``{"cause": "signal", "signal": "SIGSEGV"}``; nothing for a command that ended by itself
    uncut, so that such an entry keeps the contract's five keys.

    One cause, the first that applies: the time limit, the memory cgroup (its SIGKILL is no
    plain signal), a fatal signal (the process's own, or ``128 + N`` reported by bash for a
    child), the output cut. A command the client stopped has none (its stderr says so).
    """
    if outcome.stopped:
        return {}
    if outcome.timed_out:
        return {protocol.CAUSE_FIELD: protocol.CAUSE_TIMEOUT}
    if outcome.out_of_memory:
        return {protocol.CAUSE_FIELD: protocol.CAUSE_MEMORY}
    name = signal_of_status(outcome.exit_code)
    if name is not None:
        return {protocol.CAUSE_FIELD: protocol.CAUSE_SIGNAL, protocol.SIGNAL_FIELD: name}
    if output_cut:
        return {protocol.CAUSE_FIELD: protocol.CAUSE_OUTPUT}
    return {}


def _note_stop(execution: list[dict[str, Any]]) -> None:
    """The client stopped the run after its last command ended: that command's stderr says
    why nothing more ran."""
    if execution:
        last = execution[-1]
        last["stderr"] = "\n".join(filter(None, (last["stderr"], protocol.STOPPED_NOTE)))


class _LiveOutput:
    """The output of a streamed run, handed to :attr:`RunHooks.on_output` as it is read.

    Each stream is decoded incrementally (a character split between two reads waits for its
    end; a byte that is not UTF-8 becomes U+FFFD) and the chunks count against
    ``--max-output`` as the answer's text does (JSON-escaped); past it nothing more is
    streamed. What is streamed is what is kept for the answer, so a client sees the same text
    live and in the final object (stripped there).
    """

    def __init__(self, limit: int, on_output: Callable[[str, str], None]) -> None:
        self.left = limit
        self.on_output = on_output
        self.dropped = False
        self._decoders = {name: _decoder() for name in ("stdout", "stderr")}

    def feed(self, stream: str, data: bytes) -> bytes:
        if self.left <= 0:  # spent: not even decoded
            self.dropped = True
            return b""
        return self._emit(stream, self._decoders[stream].decode(data))

    def flush(self, stream: str) -> bytes:
        decoder, self._decoders[stream] = self._decoders[stream], _decoder()
        tail = decoder.decode(b"", final=True)
        if tail and self.left <= 0:
            self.dropped = True
            return b""
        return self._emit(stream, tail)

    def take_dropped(self) -> bool:
        """Whether output was dropped during the last command (and forget it)."""
        dropped, self.dropped = self.dropped, False
        return dropped

    def _emit(self, stream: str, text: str) -> bytes:
        if not text:
            return b""
        size = _escaped_size(text)
        if size > self.left:
            text = _longest_prefix_within(text, self.left)
            self.left, self.dropped = 0, True
        else:
            self.left -= size
        if text:
            self.on_output(stream, text)
        return text.encode()


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _longest_prefix_within(text: str, room: int) -> str:
    """The longest prefix of ``text`` whose JSON-escaped size is at most ``room``."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if _escaped_size(text[:middle]) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def _escaped_size(text: str) -> int:
    """Characters ``text`` takes in the JSON answer (quotes aside)."""
    return len(json.dumps(text)) - 2


@dataclasses.dataclass
class _Current:
    """The runner of a request: a timed-out command replaces it midway, and whoever cleans
    up (also after a cancellation) must see the latest one."""

    runner: Runner


def _read_result(workdir: Path, config: Mapping[str, Any], limit: int) -> tuple[str | None, int]:
    """``(text, 0)`` or ``(None, -3 | -4 | -1)``; the path is confined to the working
    directory, and a file over ``--max-result`` is not returned (-1)."""
    try:
        fd = open_beneath(workdir, config["result_path"])
    except NotConfined:
        return None, protocol.STATUS_RESULT_NOT_FOUND
    with os.fdopen(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        return None, protocol.STATUS_UNKNOWN_ERROR
    try:
        return data.decode("utf-8"), protocol.STATUS_OK
    except UnicodeDecodeError:
        return None, protocol.STATUS_RESULT_NOT_UTF8
