"""Helpers every test suite shares: processes seen through /proc, and environment variables.

One definition each, so that every suite follows the same rules:

- a process is alive while ``/proc/PID`` shows it in any state but ``Z`` (zombie) or ``X``
  (dead): a zombie has ended, it only waits for its parent (or init, which in a container
  may reap late) to collect its status, and counting it as alive would make every "nothing
  left behind" check wait for init;
- a child process (a kernel, JupyterLab, a CLI run) gets this process's environment without
  any ``SANDBOX_*`` variable of the user's shell, then exactly the sandbox settings the test
  gives: a developer's ``SANDBOX_URL`` never decides which server a test talks to;
- this process's own environment is changed only for a block, and restored after it.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# -- processes --------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (``R``, ``S``, ``Z``...), None if it is gone."""
    try:
        # The command name (in parentheses) may hold spaces and parentheses: split after it.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    """Whether ``pid`` still runs: it exists and is neither a zombie nor dead."""
    return process_state(pid) not in (None, "Z", "X")


def free_port() -> int:
    """A loopback port free right now (bound to 0, then closed): for a process that must be
    told its port, such as redis-server, whose ``--port 0`` turns TCP off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def living(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` still alive (see :func:`is_alive`), in their order."""
    return [pid for pid in pids if is_alive(pid)]


def processes_matching(marker: str) -> list[int]:
    """PIDs (host-wide, this one excepted) whose command line contains ``marker``.

    A zombie has an empty command line, so it never matches."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (by parent links in /proc), zombies included: take the
    list before stopping ``pid``, then wait until none of it is :func:`living`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` every 20 ms until it holds or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- environment variables ----------------------------------------------------------------------


def kernel_env(url: str | None = None, token: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child process (kernel, JupyterLab, CLI run): this process's,
    without any ``SANDBOX_*`` variable, then ``SANDBOX_URL``/``SANDBOX_TOKEN`` when given,
    then ``extra`` (which may set other ``SANDBOX_*`` variables on purpose)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SANDBOX_")}
    if url is not None:
        env["SANDBOX_URL"] = url
    if token is not None:
        env["SANDBOX_TOKEN"] = token
    env.update(extra)
    return env


@contextlib.contextmanager
def patched_environ(**values: str | None) -> Iterator[None]:
    """Set this process's variables for the block (None removes one), then put back exactly
    what was there, absent variables included.

    For what runs in this process and reads ``os.environ`` itself (the IPython extension, a
    suite that starts its kernel from this process's environment); pytest's ``monkeypatch``
    does the same for one test, this also serves module- and session-scoped fixtures."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous


def sandbox_environ(url: str, token: str | None) -> contextlib.AbstractContextManager[None]:
    """:func:`patched_environ` with this process's ``SANDBOX_URL``/``SANDBOX_TOKEN`` pointing
    at a server (an empty token when it has none)."""
    return patched_environ(SANDBOX_URL=url, SANDBOX_TOKEN=token or "")


# -- archives built member by member (hostile ones included) ---------------------------------

#: One member of an archive: its header, and its data (None for a folder, a link...).
Member = tuple[tarfile.TarInfo, "bytes | None"]


def member(
    name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0
) -> tarfile.TarInfo:
    """A tar header as an attacker would write it: any name, type, link target and mode."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode or (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = int(time.time())
    return info


def tgz(*members: Member) -> bytes:
    """A gzipped tar of ``members``, in order (GNU format: long names travel)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            if data is None:
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MiB = 1024**2


def raw_header(name: str, kind: bytes, size: int, form: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar header claiming ``size`` bytes of data (tarfile would check the size itself)."""
    info = member(name, kind)
    info.size = size
    return info.tobuf(form)


def gzip_bomb(header: bytes, size: int) -> bytes:
    """``header`` then ``size`` zero bytes, gzip-compressed on the fly (about 1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    pieces = [compressor.compress(header)]
    zeros = bytes(MiB)
    pieces += [compressor.compress(zeros) for _ in range(size // MiB)]
    pieces.append(compressor.flush())
    return b"".join(pieces)


def escape_chain(canary: Path) -> list[Member]:
    """The CVE-2025-4517 chain, aimed at ``canary``: folders with 247-character names and
    one-letter links to them, so that ``os.path.realpath`` of the final link passes
    ``PATH_MAX`` and stops resolving; a path filter then believes the link ``escape`` points
    inside. What follows it (a file, a hard link, a folder through ``escape``) is the
    caller's."""
    long_name, steps = "d" * 247, "abcdefghijklmnop"
    members: list[Member] = []
    path = ""
    for step in steps:
        members.append((member(os.path.join(path, long_name), tarfile.DIRTYPE), None))
        members.append((member(os.path.join(path, step), tarfile.SYMTYPE, long_name), None))
        path = os.path.join(path, long_name)
    link = os.path.join(*steps, "l" * 254)
    members.append((member(link, tarfile.SYMTYPE, "../" * len(steps)), None))
    climb = "../" * (len(str(canary).split("/")) + 5)
    target = f"{link}/{climb}{str(canary).lstrip('/')}"
    members.append((member("escape", tarfile.SYMTYPE, target), None))
    return members


@contextlib.contextmanager
def sandbox_ipython(url: str, token: str | None, folder: Path) -> Iterator[Any]:
    """The process's one IPython shell with the sandbox extension loaded in ``folder`` (its
    local folder), talking to ``url``. IPython's test shell is made once per process: every
    test module gets that same shell, the extension reloaded."""
    from IPython.terminal.interactiveshell import TerminalInteractiveShell
    from IPython.testing.globalipapp import start_ipython

    with sandbox_environ(url, token):
        ip = start_ipython() or TerminalInteractiveShell.instance()
        previous = os.getcwd()
        os.chdir(folder)
        try:
            ip.run_line_magic("load_ext", "sandbox_kernel")
        finally:
            os.chdir(previous)
        try:
            yield ip
        finally:
            ip.run_line_magic("unload_ext", "sandbox_kernel")
