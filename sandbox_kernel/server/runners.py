"""Where commands run: isolated runners (bubblewrap) or, when nothing better exists, plain
process groups.

A runner serves one ``execute/`` request: its working directory is the request's, its ``/tmp``
and ``/dev/shm`` are its own and vanish with it. Isolated runners are started ahead of demand
(see :class:`RunnerPool`), the way the public server keeps its containers running, so that
isolation adds no latency to a request.

Inside a bubblewrap runner: no network, a read-only system, a private ``/tmp`` and ``/dev/shm``,
only ``/home/student`` writable, a new session and PID namespace, an unprivileged user with no
capabilities, a seccomp filter (see :mod:`.seccomp`), rlimits (CPU, file size, open files, no
core files), and per-run pids and memory cgroups where the machine allows. The runner dies with
the server.

Every runner has a stdin pipe for its commands: ``execute/`` closes it at once (programs read
end-of-file, as on the public server); a streamed run (``execute/stream/``) feeds it with what
the client types, and :meth:`Runner.stdin_wanted` tells when a process of the running command
waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import logging
import os
import platform
import pwd
import resource
import shutil
import signal
import struct
import tempfile
import termios
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Protocol

from ..protocol import MEMORY_NOTE, WORKING_DIR
from . import trees
from .cgroups import Cgroups, MemoryKills, RunCgroup, UserCpuShares
from .seccomp import SeccompFilter, load_filter
from .settings import ServerSettings, format_size
from .storage import searchable_by

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 18
#: fcntl's F_SETPIPE_SZ (Linux), and the pipe size asked for.
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20
_START_TIMEOUT = 10.0
#: A stopped command (Ctrl-C) gets SIGINT, then SIGKILL this many seconds later.
STOP_GRACE = 2.0
#: System calls that read a descriptor (read, pread64, readv, preadv), by architecture: a
#: process blocked in one of them on the run's stdin waits for input.
_READ_SYSCALLS = {
    "x86_64": frozenset({0, 17, 19, 295}),
    "aarch64": frozenset({63, 67, 65, 69}),
}.get(platform.machine(), frozenset())
#: ``/proc/PID/wchan`` of a process sleeping in a pipe read (the fallback when its
#: ``/proc/PID/syscall`` cannot be read).
_PIPE_READ_WCHANS = frozenset({"pipe_read", "pipe_wait", "pipe_wait_readable"})
#: Read-only inside a runner; /var/lib/dpkg lets commands (and libraries/) see the packages.
_SYSTEM_DIRS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/opt",
    "/var/lib/dpkg",
)
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A shell prefix run as root that puts itself into the runner's cgroups, then execs the rest.
_JOIN_CGROUPS = 'for f in $SK_CGROUP_PROCS; do echo $$ > "$f" || exit 98; done; exec "$@"'


class IsolationError(RuntimeError):
    """The requested isolation cannot be had on this machine."""


@dataclasses.dataclass
class CommandOutcome:
    """What one command did. ``exit_code`` is -2 on timeout and -1 when the sandbox failed."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    elapsed: float
    timed_out: bool = False
    #: Sentences for the command's stderr: memory cap reached...
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Output was read and thrown away: the request's output budget was spent.
    dropped: bool = False
    #: The client asked to stop the run (``{"stop": true}``) while this command ran.
    stopped: bool = False
    #: The memory cgroup killed a process of this command (its oom_kill counter moved).
    out_of_memory: bool = False


class OutputSink(Protocol):
    """Where a streamed run's output goes as it is read (see :class:`.executor.RunHooks`)."""

    def feed(self, stream: str, data: bytes) -> bytes:
        """Take a chunk of ``stream`` ("stdout" or "stderr"); return the bytes to keep for
        the final answer (what was streamed of it)."""

    def flush(self, stream: str) -> bytes:
        """The command ended: stream what a decoder still holds; return it as :meth:`feed`."""


@dataclasses.dataclass
class Live:
    """What a streamed run adds to a command: its output goes to ``sink`` as it is read,
    its stdin stays open, and ``stop`` being set interrupts it (SIGINT, then SIGKILL)."""

    sink: OutputSink
    stop: asyncio.Event


class _Keep:
    """How many more bytes the two streams of a command may keep, together."""

    def __init__(self) -> None:
        self.room = 0
        self.dropped = False


class _Stream:
    """Collects one output pipe, keeping what the request's budget (:class:`_Keep`) allows.

    Past it, output is read and thrown away: the program is never killed nor sent SIGPIPE
    for writing too much (it stops at its time limit, like any other).
    """

    def __init__(self, fd: int, keep: _Keep, name: str) -> None:
        self.fd, self.keep, self.name = fd, keep, name
        self.buffer = bytearray()
        #: A streamed command's sink: it decides what is kept, instead of ``keep``.
        self.sink: OutputSink | None = None
        with contextlib.suppress(OSError):  # fewer wake-ups for a program that floods
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self.read_available)

    def read_available(self) -> None:
        while self.fd >= 0:
            try:
                chunk = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            if self.sink is not None:
                self.buffer += self.sink.feed(self.name, chunk)
                continue
            room = self.keep.room
            if room > 0:
                kept = chunk[:room]
                self.buffer += kept
                self.keep.room -= len(kept)
            if len(chunk) > room:
                self.keep.dropped = True

    def take(self) -> bytes:
        self.read_available()
        if self.sink is not None:
            self.buffer += self.sink.flush(self.name)
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def close(self) -> None:
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class StdinPipe:
    """The stdin of a runner's commands: a pipe whose read end every command gets.

    The server keeps the read end too, to see how much is unread (``FIONREAD``) and to know
    the pipe's inode (how :meth:`Runner.stdin_wanted` recognises it in ``/proc``). What a
    client types is written without blocking; what the pipe cannot take yet waits here.
    """

    def __init__(self, make: bool = True) -> None:
        self.read_fd = self.write_fd = -1
        self.inode: int | None = None
        self.pending = bytearray()
        self.eof = False
        self._watching = False
        if make:
            self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
            self.inode = os.fstat(self.read_fd).st_ino
            os.set_blocking(self.write_fd, False)

    @property
    def open(self) -> bool:
        """Whether commands may still get input (no end-of-file yet)."""
        return self.write_fd >= 0

    def feed(self, data: bytes) -> None:
        """Queue ``data`` for the commands (dropped once end-of-file was given)."""
        if self.open and not self.eof:
            self.pending += data
            self._flush()

    def end(self) -> None:
        """End-of-file for the commands once what is queued has been written."""
        self.eof = True
        self._flush()

    def unread(self) -> int:
        """Bytes given and not read yet: queued here plus waiting in the pipe."""
        if self.read_fd < 0:
            return len(self.pending)
        try:
            raw = fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return len(self.pending)
        waiting: int = struct.unpack("i", raw)[0]
        return len(self.pending) + waiting

    def _flush(self) -> None:
        while self.pending and self.write_fd >= 0:
            try:
                written = os.write(self.write_fd, self.pending)
            except BlockingIOError:
                break
            except OSError:  # no reader can be left: the server holds the read end
                self.pending.clear()
                break
            del self.pending[:written]
        self._watch(bool(self.pending) and self.write_fd >= 0)
        if self.eof and not self.pending:
            self.close_input()

    def _watch(self, wanted: bool) -> None:
        """Be called back when the pipe has room again, while something is queued."""
        if wanted == self._watching:
            return
        loop = asyncio.get_running_loop()
        if wanted:
            loop.add_writer(self.write_fd, self._flush)
        else:
            loop.remove_writer(self.write_fd)
        self._watching = wanted

    def close_input(self) -> None:
        """End-of-file now: what is still queued is dropped."""
        if self.write_fd >= 0:
            self._watch(False)
            with contextlib.suppress(OSError):
                os.close(self.write_fd)
            self.write_fd = -1
        self.pending.clear()

    def close(self) -> None:
        self.close_input()
        if self.read_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.read_fd)
            self.read_fd = -1


class Runner:
    """One sandbox for one request. Subclasses say how a command is started and stopped."""

    def __init__(self, isolation: Isolation, workdir: Path) -> None:
        self.isolation = isolation
        self.workdir = workdir
        self.cgroup: RunCgroup | None = None
        self.spent = False
        self.input = StdinPipe()
        out_r, self._out_w = os.pipe2(os.O_CLOEXEC)
        err_r, self._err_w = os.pipe2(os.O_CLOEXEC)
        self._keep = _Keep()
        self.stdout = _Stream(out_r, self._keep, "stdout")
        self.stderr = _Stream(err_r, self._keep, "stderr")

    async def start(self) -> None:
        """Make the runner ready to run commands at once."""

    async def run(
        self,
        command: str,
        environ: Mapping[str, str],
        timeout: float,
        keep: int,
        live: Live | None = None,
    ) -> CommandOutcome:
        """Run one command with a wall-clock ``timeout``; nothing it started survives it.

        At most ``keep`` bytes of its output (stdout and stderr together) are kept. Without
        ``live`` its stdin is empty; with it, see :class:`Live`.
        """
        if live is None:
            self.input.close_input()
        self.stdout.take(), self.stderr.take()
        self._keep.room, self._keep.dropped = keep, False
        interrupter = None
        if live is not None:
            self.stdout.sink = self.stderr.sink = live.sink
            interrupter = asyncio.ensure_future(self._interrupt_when(live.stop))
        kills_before = self.cgroup.memory_kills() if self.cgroup is not None else None
        started = time.monotonic()
        try:
            try:
                code = await asyncio.wait_for(
                    self._execute(command, environ, grouped=live is not None), timeout
                )
            except asyncio.TimeoutError:  # the builtin one only from Python 3.11
                code = -2
                await self.stop()
            elapsed = time.monotonic() - started
            outcome = CommandOutcome(
                code, self.stdout.take(), self.stderr.take(), elapsed, code == -2
            )
        finally:
            if interrupter is not None:
                interrupter.cancel()
            self.stdout.sink = self.stderr.sink = None
        outcome.dropped, self._keep.room = self._keep.dropped, 0
        outcome.stopped = live is not None and live.stop.is_set()
        self._note_memory(outcome, kills_before)
        return outcome

    def _note_memory(self, outcome: CommandOutcome, kills_before: MemoryKills | None) -> None:
        """Mark a failed command whose process the memory cgroup killed meanwhile, and say so
        in its stderr. A timed-out command's cgroup is gone already: its cause is the time."""
        if kills_before is None or self.cgroup is None or outcome.exit_code in (0, -2):
            return
        kills = self.cgroup.memory_kills()
        if kills.count <= kills_before.count:
            return
        if not kills.exact and outcome.exit_code != 128 + signal.SIGKILL:
            return  # the cap was hit, but the command did not die of the OOM killer's SIGKILL
        self.spent = True
        outcome.out_of_memory = True
        limit = format_size(self.isolation.settings.memory_limit)
        outcome.notes.append(MEMORY_NOTE.format(limit=limit))

    async def _execute(self, command: str, environ: Mapping[str, str], grouped: bool) -> int:
        """Run the command; ``grouped``: in a process group of its own (a streamed run may
        be stopped: its Ctrl-C goes to that group)."""
        raise NotImplementedError

    def command_processes(self) -> list[int]:
        """PIDs (as the server sees them) of the running command's processes, and of what
        it left behind; empty between commands."""
        return []

    def command_leaders(self) -> list[int]:
        """The top process(es) of the running command: each leads its own process group."""
        return []

    def stdin_wanted(self) -> bool:
        """Whether a process of the running command is blocked reading stdin while nothing
        given is left unread (seen in ``/proc/PID/syscall``, else ``wchan``)."""
        pipe = self.input
        if not pipe.open or pipe.inode is None or pipe.unread():
            return False
        return any(_waits_on_pipe(pid, pipe.inode) for pid in self.command_processes())

    async def _interrupt_when(self, stop: asyncio.Event) -> None:
        """Once ``stop`` is set: Ctrl-C for the running command (SIGINT to each of its
        processes, so that a shell runs its EXIT trap), SIGKILL for what is left later."""
        await stop.wait()
        self._signal_command(signal.SIGINT)
        await asyncio.sleep(STOP_GRACE)
        self._signal_command(signal.SIGKILL)

    def _signal_command(self, signum: int) -> None:
        """``signum`` to the command's process group, at once (a process being forked gets
        it too), as a terminal's Ctrl-C does; each process at a time where there is no such
        group. SIGKILL also goes to what left the group."""
        grouped = False
        for leader in self.command_leaders():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(leader) == leader:
                    os.killpg(leader, signum)
                    grouped = True
        if grouped and signum != signal.SIGKILL:
            return  # a second SIGINT would interrupt the EXIT trap the first one started
        for pid in self.command_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    async def stop(self) -> None:
        """Kill everything the runner holds; safe to call twice."""
        self.spent = True
        if self.cgroup is not None:
            cgroup, self.cgroup = self.cgroup, None
            await asyncio.to_thread(_kill_and_remove, cgroup)

    async def close(self) -> None:
        await self.stop()
        for fd in (self._out_w, self._err_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out_w = self._err_w = -1
        self.stdout.close()
        self.stderr.close()
        self.input.close()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from ``/proc``."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    stack = [pid]
    while stack:
        children = _children(stack.pop())
        found += children
        stack += children
    return found


def _waits_on_pipe(pid: int, inode: int) -> bool:
    """Whether a thread of ``pid`` is blocked reading the pipe ``inode``: in a read system
    call on a descriptor of that pipe, or (when the system call cannot be read) sleeping in
    a pipe read with that pipe as its stdin."""
    target = f"pipe:[{inode}]"
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{task}/syscall").read_text().split()
        except OSError:
            fields = []
        if fields == ["running"]:
            continue
        if len(fields) > 1 and _READ_SYSCALLS and fields[0].lstrip("-").isdigit():
            if int(fields[0]) in _READ_SYSCALLS and _fd_target(pid, int(fields[1], 16)) == target:
                return True
            continue
        try:
            wchan = Path(f"/proc/{pid}/task/{task}/wchan").read_text().strip()
        except OSError:
            continue
        if wchan in _PIPE_READ_WCHANS and _fd_target(pid, 0) == target:
            return True
    return False


def _fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _kill_and_remove(cgroup: RunCgroup) -> None:
    cgroup.kill()
    cgroup.remove()


class BwrapRunner(Runner):
    """A bubblewrap sandbox with the agent (``agent.sh``) waiting for commands."""

    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        iso = self.isolation
        ctl_r, self._ctl_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        bind_fd = os.open(self.workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        seccomp_fd = iso.seccomp.fd() if iso.seccomp is not None else None
        extra = () if seccomp_fd is None else (seccomp_fd,)
        self._status = asyncio.StreamReader()
        try:
            self.cgroup = iso.new_cgroup()
            fds = (ctl_r, self._out_w, self._err_w, status_w, bind_fd, self.input.read_fd)
            argv = (
                iso.launcher(self.cgroup)
                + iso.bwrap_args(bind_fd, seccomp_fd)
                + [
                    "/bin/bash",
                    "--noprofile",
                    "--norc",
                    "-c",
                    iso.agent_script,
                    "agent",
                    *map(str, fds),
                    *iso.rlimit_args(),
                ]
            )
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._err_w,
                stderr=self._err_w,
                pass_fds=fds + extra,
                env=iso.launcher_env(self.cgroup),
                start_new_session=True,
            )
        finally:
            for fd in (ctl_r, status_w, bind_fd, *extra):
                os.close(fd)
        os.close(self._out_w)
        os.close(self._err_w)
        self._out_w = self._err_w = -1
        self._status_fd = status_r
        os.set_blocking(status_r, False)
        asyncio.get_running_loop().add_reader(status_r, self._read_status)
        try:
            line = await asyncio.wait_for(self._status.readline(), _START_TIMEOUT)
        except asyncio.TimeoutError:  # the builtin one only from Python 3.11
            line = b""
        if line != b"ready\n":
            message = self.stderr.take().decode(errors="replace").strip()
            await self.close()
            raise IsolationError(f"bubblewrap runner did not start: {message or 'no message'}")
        self._init_pid, self._pid_namespace = _namespace_of(self.process.pid)
        # The namespace's PID 1 has one child now, the agent; orphans join it later.
        agents = _children(self._init_pid) if self._init_pid else []
        self._agent_pid = agents[0] if len(agents) == 1 else None

    def command_processes(self) -> list[int]:
        """Everything in the sandbox but its PID 1 and the agent: the running command and
        what it left behind (orphans belong to PID 1)."""
        init, agent = getattr(self, "_init_pid", None), getattr(self, "_agent_pid", None)
        if self.process is None or init is None or agent is None:
            return []
        return [pid for pid in _descendants(init) if pid != agent]

    def command_leaders(self) -> list[int]:
        agent = getattr(self, "_agent_pid", None)
        return _children(agent) if self.process is not None and agent else []

    def _read_status(self) -> None:
        try:
            data = os.read(self._status_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._status.feed_data(data)
        else:
            asyncio.get_running_loop().remove_reader(self._status_fd)
            self._status.feed_eof()

    async def _execute(self, command: str, environ: Mapping[str, str], grouped: bool) -> int:
        count = f"{len(environ)}{'g' if grouped else ''}"  # agent.sh: "g" asks for setsid
        entries = [count, *(f"{k}={v}" for k, v in environ.items()), command]
        record = b"".join(entry.encode() + b"\0" for entry in entries)
        if len(record) > 60_000:  # more than a pipe holds: don't block the event loop
            await asyncio.to_thread(_write_all, self._ctl_w, record)
        else:
            _write_all(self._ctl_w, record)
        line = await self._status.readline()
        if not line.strip().lstrip(b"-").isdigit():
            self.spent = True
            self.stderr.buffer += b"\n[sandbox] the runner stopped unexpectedly."
            return -1
        return int(line)

    async def stop(self) -> None:
        """Kill the sandbox and wait until none of its processes is left.

        Callers rely on the wait: a command may fake the agent's "done" (it can reach the
        agent's pipes through /proc as the same user), so the working directory is read and
        saved only once nothing in the sandbox can write to it any more.
        """
        self.spent = True
        process, self.process = self.process, None
        if process is None:
            await super().stop()
            return
        for pid in (getattr(self, "_init_pid", None), process.pid):
            if pid:  # killing the namespace's PID 1 kills every process in it at once
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        counted = self.cgroup is not None  # then the cgroup tells when the sandbox is empty
        await super().stop()
        await process.wait()
        namespace = getattr(self, "_pid_namespace", None)
        if namespace is not None and not counted:
            await asyncio.to_thread(_wait_for_empty_namespace, namespace)

    async def close(self) -> None:
        await self.stop()
        for attribute in ("_ctl_w", "_status_fd"):
            fd = getattr(self, attribute, -1)
            if fd >= 0:
                if attribute == "_status_fd":
                    asyncio.get_running_loop().remove_reader(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attribute, -1)
        await super().close()


class PlainRunner(Runner):
    """No isolation: each command is a new process session in the working directory.

    Leftover processes are killed through the process group, and through a cgroup when the
    server may create one; a command that calls ``setsid`` escapes the group otherwise.
    """

    async def start(self) -> None:
        self.cgroup = self.isolation.new_cgroup()

    _command_pid: int | None = None

    def command_processes(self) -> list[int]:
        pid = self._command_pid
        return [] if pid is None else [pid, *_descendants(pid)]

    def command_leaders(self) -> list[int]:
        return [] if self._command_pid is None else [self._command_pid]

    async def _execute(self, command: str, environ: Mapping[str, str], grouped: bool) -> int:
        iso = self.isolation  # each command leads a session of its own here anyway
        # The request's variables are applied by `env -i` after privileges are dropped: a
        # PATH or LD_PRELOAD of the request must never reach the root launcher.
        wrapper = iso.rlimit_shell() + 'exec /bin/bash -c "$0"'
        process = await asyncio.create_subprocess_exec(
            *iso.launcher(self.cgroup),
            iso.env_program,
            "-i",
            *(f"{name}={value}" for name, value in environ.items()),
            "/bin/bash",
            "-c",
            wrapper,
            command,
            cwd=self.workdir,
            env=iso.launcher_env(self.cgroup),
            stdin=self.input.read_fd,
            stdout=self._out_w,
            stderr=self._err_w,
            start_new_session=True,
        )
        self._command_pid = process.pid
        try:
            code = await process.wait()
        finally:
            self._command_pid = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if self.cgroup is not None:
                await asyncio.to_thread(self.cgroup.kill)
            await process.wait()
        return 128 - code if code < 0 else code  # killed by a signal, as bash reports it


#: Where distributions put coreutils' ``libstdbuf.so`` (Debian, Fedora, Arch, Alpine...).
_STDBUF_PLACES = (
    "/usr/libexec/coreutils/libstdbuf.so",
    "/usr/lib/coreutils/libstdbuf.so",
    "/usr/lib64/coreutils/libstdbuf.so",
    f"/usr/lib/{platform.machine()}-linux-gnu/coreutils/libstdbuf.so",
    "/usr/local/libexec/coreutils/libstdbuf.so",
)


@functools.cache
def stdbuf_library() -> str | None:
    """coreutils' ``libstdbuf.so`` (what ``stdbuf`` preloads), or None if there is none.
    Under ``/usr``, so that a bubblewrap runner sees it at the same path."""
    for place in _STDBUF_PLACES:
        if os.path.isfile(place):
            return place
    return None


def _namespace_of(bwrap_pid: int) -> tuple[int | None, str | None]:
    """The PID (outside) and PID-namespace id of a bubblewrap sandbox's PID 1."""
    try:
        children = Path(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children").read_text().split()
        init = int(children[0])
        return init, os.readlink(f"/proc/{init}/ns/pid")
    except (OSError, IndexError, ValueError):
        return None, None


def _wait_for_empty_namespace(namespace: str, deadline: float = 5.0) -> None:
    """Until no process of that PID namespace is left (they die asynchronously)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        alive = False
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                        alive = True
                        break
                except OSError:
                    continue
        if not alive:
            return
        time.sleep(0.001)
    log.warning("processes of a stopped sandbox are still alive after %.0f s", deadline)


def _remove_workdir(workdir: Path) -> None:
    """Remove a working directory whatever a command left in it (any depth, any mode)."""
    try:
        trees.remove(workdir)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove the working directory %s: %s", workdir, error)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            time.sleep(0.001)


class Isolation:
    """What this machine allows, probed once at start, and the factory of runners."""

    def __init__(
        self,
        settings: ServerSettings,
        method: str,
        cgroups: Cgroups | None,
        seccomp: SeccompFilter | None = None,
    ) -> None:
        self.settings = settings
        self.method = method  # "bubblewrap" or "none"
        self.cgroups = cgroups
        #: The system-call filter given to bubblewrap (None: none could be built).
        self.seccomp = seccomp
        #: With --hub-auth: each user's runs in one cpu group of equal weight (set by probe).
        self.cpu_shares: UserCpuShares | None = None
        self.agent_script = resources.files(__package__).joinpath("agent.sh").read_text()
        self.as_root = os.geteuid() == 0
        self.uid, self.gid = os.geteuid(), os.getegid()
        if self.as_root:
            account = pwd.getpwnam(settings.run_as)
            self.uid, self.gid = account.pw_uid, account.pw_gid
        self._names = itertools.count()
        # Absolute paths: the launcher runs as root and must not search a request's PATH.
        self.setpriv_program = shutil.which("setpriv", path=_PATH) or "/usr/bin/setpriv"
        self.env_program = shutil.which("env", path=_PATH) or "/usr/bin/env"

    @property
    def isolated(self) -> bool:
        return self.method == "bubblewrap"

    @classmethod
    async def probe(cls, settings: ServerSettings) -> Isolation:
        """The strongest isolation available, tried for real; refuses unsafe fallbacks."""
        cgroups = await asyncio.to_thread(
            Cgroups.probe, settings.max_processes, settings.memory_limit
        )
        if settings.isolation != "none":
            seccomp = await asyncio.to_thread(load_filter)
            candidate = cls(settings, "bubblewrap", cgroups, seccomp)
            problem = await candidate._try_bwrap()
            if problem is None:
                if settings.hub_auth and cgroups is not None:
                    candidate.cpu_shares = await asyncio.to_thread(UserCpuShares.probe, cgroups)
                return candidate
            if settings.isolation == "bwrap":
                raise IsolationError(f"--isolation bwrap: {problem}")
            if os.geteuid() == 0:
                raise IsolationError(
                    f"refusing to run commands as root without isolation ({problem}). "
                    "Install bubblewrap (apt-get install -y bubblewrap), or pass "
                    "--isolation none to accept commands that can read and write this machine."
                )
            log.warning("NOT ISOLATED: %s; commands run as this user, unconfined", problem)
        return cls(settings, "none", cgroups)

    async def _try_bwrap(self) -> str | None:
        if shutil.which("bwrap") is None:
            return "bubblewrap is not installed (apt-get install -y bubblewrap)"
        with tempfile.TemporaryDirectory(
            prefix="sandbox-kernel-probe-", dir=self._probe_parent()
        ) as workdir:
            path = Path(workdir)
            os.chown(path, self.uid, self.gid)
            runner = BwrapRunner(self, path)
            try:
                await runner.start()
                outcome = await runner.run("echo ok > probe; echo ok", {"PATH": _PATH}, 10, 4096)
            except (IsolationError, OSError) as error:
                return str(error)
            finally:
                await runner.close()
            if outcome.exit_code != 0 or outcome.stdout.strip() != b"ok":
                return f"bubblewrap test command failed: {outcome.stderr.decode(errors='replace')}"
        return None

    def _probe_parent(self) -> str | None:
        """Where the probe's folder can go: bubblewrap binds it as the sandbox user, who must
        traverse every parent (a ``TMPDIR`` under a private folder would fail the probe)."""
        for parent in (tempfile.gettempdir(), "/var/tmp", "/tmp"):
            if searchable_by(Path(parent) / "probe", self.uid):
                return parent
        return None

    def share_cpu(self, runner: Runner, user: str) -> None:
        """Put a run's processes (its idle sandbox, before the command) in ``user``'s cpu
        group: everything the command starts stays there."""
        cgroup = getattr(runner, "cgroup", None)
        if self.cpu_shares is not None and isinstance(cgroup, RunCgroup):
            try:
                self.cpu_shares.join(user, cgroup)
            except OSError as error:  # the run goes on, with the server's CPU share
                log.warning("could not put a run of %s in their CPU group: %s", user, error)

    def new_runner(self, workdir: Path) -> Runner:
        if self.isolated:
            return BwrapRunner(self, workdir)
        return PlainRunner(self, workdir)

    def new_cgroup(self) -> RunCgroup | None:
        if self.cgroups is None:
            return None
        name = f"run-{next(self._names)}"
        return self.cgroups.create(name, self.settings.max_processes, self.settings.memory_limit)

    def launcher(self, cgroup: RunCgroup | None) -> list[str]:
        """argv prefix: join the cgroups, then drop to the unprivileged account (as root)."""
        prefix: list[str] = []
        if cgroup is not None:
            prefix += ["/bin/sh", "-c", _JOIN_CGROUPS, "sh"]
        if self.as_root:
            prefix += [
                self.setpriv_program,
                f"--reuid={self.uid}",
                f"--regid={self.gid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ]
        return prefix

    def launcher_env(self, cgroup: RunCgroup | None) -> dict[str, str]:
        env = {"PATH": _PATH, "LANG": "C.UTF-8"}
        if cgroup is not None:
            env["SK_CGROUP_PROCS"] = " ".join(map(str, cgroup.procs_files))
        return env

    def bwrap_args(self, bind_fd: int, seccomp_fd: int | None = None) -> list[str]:
        args = ["bwrap"]
        if seccomp_fd is not None:  # loaded by bubblewrap just before it runs the agent
            args += ["--seccomp", str(seccomp_fd)]
        args += [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
            "--clearenv",
        ]
        for directory in _SYSTEM_DIRS:
            args += ["--ro-bind-try", directory, directory]
        tmp_size = str(self.settings.workdir_quota)
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            tmp_size,
            "--tmpfs",
            "/tmp",
            "--size",
            tmp_size,
            "--tmpfs",
            "/dev/shm",
            "--dir",
            "/home",
            "--bind-fd",
            str(bind_fd),
            WORKING_DIR,
            "--chdir",
            WORKING_DIR,
            # bubblewrap's own root is a tmpfs: read-only too, so only the working directory,
            # /tmp and /dev/shm (separate mounts) stay writable.
            "--remount-ro",
            "/",
            "--",
        ]
        return args

    def rlimit_args(self) -> list[str]:
        settings = self.settings
        nproc = "" if self.cgroups else str(settings.max_processes)
        # Never above the server's own hard limit: an unprivileged ulimit could not raise it.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        open_files = settings.max_open_files if hard < 0 else min(settings.max_open_files, hard)
        return [
            str(settings.cpu_limit),
            str(max(1, settings.workdir_quota // 1024)),
            str(open_files),
            nproc,
        ]

    def rlimit_shell(self) -> str:
        cpu, fsize, nofile, nproc = self.rlimit_args()
        shell = f"ulimit -c 0 -t {cpu} -f {fsize} -n {nofile} || exit 97; "
        if nproc:
            shell += f"ulimit -u {nproc} || exit 97; "
        return shell

    def base_environ(self, workdir: Path) -> dict[str, str]:
        """Variables every command starts with, before the request's ``environ``."""
        home = WORKING_DIR if self.isolated else str(workdir)
        return {
            "HOME": home,
            "USER": "student",
            "LOGNAME": "student",
            "PATH": _PATH,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "TMPDIR": "/tmp",
        }

    def streaming_environ(self) -> dict[str, str]:
        """Variables a streamed run adds (before the request's ``environ``, which wins): the
        buffering of a terminal, so that lines appear as printed and a prompt without a
        newline is flushed when the program reads stdin (``stdbuf -i0 -oL -eL``, whose
        library is omitted where coreutils does not ship it)."""
        environ = {"PYTHONUNBUFFERED": "1"}
        library = stdbuf_library()
        if library is not None:
            environ |= {"LD_PRELOAD": library, "_STDBUF_I": "0", "_STDBUF_O": "L",
                        "_STDBUF_E": "L"}  # fmt: skip
        return environ

    def describe(self) -> dict[str, object]:
        """The ``container.isolation`` entry of ``specifications/``."""
        limits = ["cpu", "file size", "open files", "no core files", "output"]
        if self.cgroups:
            limits += ["processes", "memory"]
        elif self.isolated:
            limits += ["processes (rlimit)"]
        return {
            "isolated": self.isolated,
            "method": self.method,
            "network": not self.isolated,
            "user": pwd.getpwuid(self.uid).pw_name if self.as_root else "server's own user",
            "cgroups": self.cgroups.describe() if self.cgroups else None,
            "seccomp": self.seccomp.describe() if self.isolated and self.seccomp else None,
            "limits": limits,
            "warning": None if self.isolated else "NOT ISOLATED",
        }


class RunnerPool:
    """Runners started ahead of demand, one per execution slot."""

    def __init__(self, isolation: Isolation, workdirs: Path, size: int) -> None:
        self.isolation = isolation
        self.workdirs = workdirs
        self.size = size
        self._ready: asyncio.Queue[Runner] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # teardowns
        self._names = itertools.count()
        self._closing = False

    def fill(self) -> None:
        """Start runners in the background until ``size`` are ready or starting."""
        while self._ready.qsize() + len(self._starting) < self.size and not self._closing:
            task = asyncio.get_running_loop().create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        try:
            runner = await self.create()
        except (IsolationError, OSError) as error:
            log.error("could not start a runner: %s", error)
            await asyncio.sleep(1)
            return
        if self._closing:
            await self.discard(runner)
        else:
            self._ready.put_nowait(runner)

    async def create(self, workdir: Path | None = None) -> Runner:
        """A runner on ``workdir`` (a fresh empty one by default), started now."""
        if workdir is None:
            workdir = await asyncio.to_thread(self._new_workdir)
        runner = self.isolation.new_runner(workdir)
        try:
            await runner.start()
        except BaseException:
            await runner.close()
            await asyncio.to_thread(_remove_workdir, workdir)
            raise
        return runner

    def _new_workdir(self) -> Path:
        workdir = self.workdirs / f"{os.getpid()}-{next(self._names)}-{os.urandom(4).hex()}"
        workdir.mkdir(mode=0o700)
        if self.isolation.as_root:
            os.chown(workdir, self.isolation.uid, self.isolation.gid)
        return workdir

    async def take(self) -> Runner:
        """A ready runner if there is one, else one started now (cold, ~15 ms)."""
        try:
            runner = self._ready.get_nowait()
        except asyncio.QueueEmpty:
            runner = await self.create()
        self.fill()
        return runner

    def release(self, runner: Runner, remove_workdir: bool = True) -> None:
        """Tear a used runner down in the background; :meth:`close` waits for it."""
        task = asyncio.get_running_loop().create_task(self.discard(runner, remove_workdir))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def discard(self, runner: Runner, remove_workdir: bool = True) -> None:
        await runner.close()
        if remove_workdir:
            await asyncio.to_thread(_remove_workdir, runner.workdir)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, *self._tasks, return_exceptions=True)
        while not self._ready.empty():
            await self.discard(self._ready.get_nowait())
