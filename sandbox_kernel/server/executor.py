"""One ``execute/`` request, from a checked config to the response dict.

Execution rules (contract, "POST execute/"): commands run one after the other in the same
working directory, within one time budget (``execute_timeout``); a command's own ``timeout`` is
capped by what is left; a failing command stops the run unless it starts with ``-``; stdout and
stderr are stripped; the result file is read whatever happened; with ``save`` the directory is
kept as a *new* environment whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import protocol
from ..archive import ArchiveLimits, extract_archive
from .runners import CommandOutcome, Isolation, Runner, RunnerPool
from .settings import ServerSettings
from .storage import NotConfined, Snapshot, Storage, iso_expire, open_beneath

log = logging.getLogger(__name__)

_MAX_RESULT = 16 * 1024**2


class EnvironmentNotFound(Exception):
    """``config.environment`` names no saved environment (HTTP 404)."""


class Overloaded(Exception):
    """No execution slot became free in time (HTTP 503)."""


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

    async def execute(self, config: Mapping[str, Any], upload: Path | None) -> dict[str, Any]:
        """Run a validated config; ``upload`` is a staging directory with the unpacked upload."""
        base = None
        if "environment" in config:
            base = self.storage.directory(config["environment"])
            if base is None:
                raise EnvironmentNotFound(config["environment"])
        try:
            await asyncio.wait_for(self._slots.acquire(), protocol.SLOT_WAIT_SECONDS)
        except asyncio.TimeoutError:  # the builtin one only from Python 3.11
            raise Overloaded() from None
        self.busy += 1
        try:
            return await self._execute_in_slot(config, base, upload)
        finally:
            self.busy -= 1
            self._slots.release()

    async def _execute_in_slot(
        self, config: Mapping[str, Any], base: Path | None, upload: Path | None
    ) -> dict[str, Any]:
        started = time.monotonic()
        current = _Current(await self.pool.take())
        workdir = current.runner.workdir
        saved = False
        try:
            snapshot = await self._prepare(workdir, base, upload)
            status, execution = await self._run_commands(current, config)
            runner = current.runner
            # Nothing may write to the directory while it is read and saved: stop the
            # sandbox and wait until it is empty (see BwrapRunner.stop).
            await runner.stop()
            response: dict[str, Any] = {"status": status, "execution": execution}
            if "result_path" in config:
                result, error = await asyncio.to_thread(_read_result, workdir, config)
                if error:
                    response["status"] = error
                else:
                    response["result"] = result
            response["total_time"] = time.monotonic() - started
            if config.get("save", False):
                name, expire = await asyncio.to_thread(self.storage.save, workdir, snapshot)
                saved = True
                response["environment"], response["expire"] = name, iso_expire(expire)
            return response
        finally:
            # Torn down in the background (also when the client went away and this handler
            # is cancelled): the answer does not wait for it.
            self.pool.release(current.runner, remove_workdir=not saved)

    async def _prepare(self, workdir: Path, base: Path | None, upload: Path | None) -> Snapshot:
        iso = self.isolation
        try:
            snapshot = Snapshot()
            if base is not None:
                snapshot = await asyncio.to_thread(
                    self.storage.populate, base, workdir, iso.uid, iso.gid
                )
        except FileNotFoundError as error:  # it expired while being copied
            raise EnvironmentNotFound(base.name if base else "") from error
        if upload is not None:
            await asyncio.to_thread(_merge, upload, workdir)
        return snapshot

    async def _run_commands(
        self, current: _Current, config: Mapping[str, Any]
    ) -> tuple[int, list[dict[str, Any]]]:
        # The budget is spent by the commands' own times, as on the public server (3.x); the
        # effective timeout keeps its type because it is printed back ("after 1 seconds").
        budget: float = self.settings.execute_timeout
        environ = self.isolation.base_environ(current.runner.workdir)
        environ.update({name: str(value) for name, value in config.get("environ", {}).items()})
        execution: list[dict[str, Any]] = []
        status = protocol.STATUS_OK
        for item in config["commands"]:
            command, own_timeout, may_fail = protocol.split_command(item)
            timeout = budget if own_timeout is None or own_timeout > budget else own_timeout
            if current.runner.spent:  # the previous command timed out or flooded its output
                workdir = current.runner.workdir
                await self.pool.discard(current.runner, remove_workdir=False)
                current.runner = await self.pool.create(workdir)
            outcome = await self._run_one(current.runner, command, environ, timeout)
            execution.append(_entry(command, outcome, timeout))
            budget -= outcome.elapsed
            code = outcome.exit_code
            # A timeout of a "-" command lets the run go on; a sandbox error never does.
            if (code < 0 and code != protocol.STATUS_TIMEOUT) or (code != 0 and not may_fail):
                status = code
                break
        return status, execution

    async def _run_one(
        self, runner: Runner, command: str, environ: Mapping[str, str], timeout: float
    ) -> CommandOutcome:
        if timeout <= 0:
            return CommandOutcome(protocol.STATUS_TIMEOUT, b"", b"", 0.0, timed_out=True)
        try:
            return await runner.run(command, environ, timeout)
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


@dataclasses.dataclass
class _Current:
    """The runner of a request: a timed-out command replaces it midway, and whoever cleans
    up (also after a cancellation) must see the latest one."""

    runner: Runner


def _entry(command: str, outcome: CommandOutcome, timeout: float) -> dict[str, Any]:
    stdout = outcome.stdout.decode("utf-8", errors="replace").strip()
    stderr = outcome.stderr.decode("utf-8", errors="replace").strip()
    notes = "\n".join(outcome.notes)
    if notes:
        stderr = f"{stderr}\n{notes}" if stderr else notes
    if outcome.timed_out:
        # The contract's text, newline included; output printed before the timeout is kept.
        message = protocol.timeout_message(timeout)
        stderr = f"{stderr}\n{message}" if stderr else message
    return {
        "command": command,
        "exit_code": outcome.exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "time": outcome.elapsed,
    }


def _read_result(workdir: Path, config: Mapping[str, Any]) -> tuple[str | None, int]:
    """``(text, 0)`` or ``(None, -3 | -4)``; the path is confined to the working directory."""
    try:
        fd = open_beneath(workdir, config["result_path"])
    except NotConfined:
        return None, protocol.STATUS_RESULT_NOT_FOUND
    with os.fdopen(fd, "rb") as file:
        data = file.read(_MAX_RESULT + 1)
    if len(data) > _MAX_RESULT:
        return None, protocol.STATUS_UNKNOWN_ERROR
    try:
        return data.decode("utf-8"), protocol.STATUS_OK
    except UnicodeDecodeError:
        return None, protocol.STATUS_RESULT_NOT_UTF8


def _merge(source: Path, target: Path) -> None:
    """Move an unpacked upload over a working directory: files of the upload win.

    Nothing in ``target`` is followed: a symlink there is replaced, never written through.
    """
    with os.scandir(source) as entries:
        for entry in entries:
            destination = target / entry.name
            try:
                existing = destination.lstat().st_mode
            except FileNotFoundError:
                existing = None
            if entry.is_dir(follow_symlinks=False) and existing and stat.S_ISDIR(existing):
                _merge(Path(entry.path), destination)
                continue
            if existing is not None:
                if stat.S_ISDIR(existing):
                    shutil.rmtree(destination)
                else:
                    destination.unlink()
            shutil.move(entry.path, destination)  # a rename, or a copy across file systems
    with contextlib.suppress(OSError):
        source.rmdir()


def unpack_upload(
    archive: Path, staging: Path, settings: ServerSettings, uid: int, gid: int
) -> None:
    """Check and unpack an uploaded ``.tgz`` into ``staging``, owned by the sandbox user.

    Raises :class:`~sandbox_kernel.archive.ArchiveError` (HTTP 400) with the reason.
    """
    limits = ArchiveLimits(settings.max_archive_entries, settings.max_archive_bytes)
    with open(archive, "rb") as source:
        extract_archive(source, staging, limits)
    if os.geteuid() == 0:
        os.chown(staging, uid, gid)
        for root, directories, files in os.walk(staging):
            for name in directories + files:
                os.lchown(os.path.join(root, name), uid, gid)
