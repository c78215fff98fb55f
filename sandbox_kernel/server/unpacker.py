"""Unpacking an upload into a run's working directory, as the sandbox user, in a chroot.

:func:`sandbox_kernel.archive.extract_archive` already creates every member by descriptor
without following links; this module makes sure that even a mistake there could not act as
root or reach the host. The server (often root) starts this file as a small child process
(``python -I -S unpacker.py``: no site-packages, only the standard library and
``archive.py``), which:

1. imports what it needs, then ``chroot``s into the working directory (given as an open
   descriptor), so that nothing outside it exists any more;
2. drops to the sandbox user (no groups, no capabilities left: a plain ``setresuid``);
3. unpacks the archive from its stdin, refusing the kernel's ``.sandbox_kernel/``;
4. prints one JSON line: ``{"entries": N}`` or ``{"error": reason}``.

A server that is not root cannot ``chroot`` and already is the sandbox user: the child then
only unpacks (by descriptor, as everywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

#: Folders an upload may not write: the kernel keeps its shell state there.
RESERVED = (".sandbox_kernel",)
#: An upload is unpacked within this many seconds, or refused.
UNPACK_TIMEOUT = 120.0
#: Address space of the child: tarfile reads a header whole, whatever size it claims.
_CHILD_MEMORY = 512 * 1024**2


class UnpackFailed(Exception):
    """The archive was refused (the message is the reason, for a 400 answer)."""


async def unpack(
    archive: Path,
    workdir: Path,
    *,
    uid: int,
    gid: int,
    max_entries: int,
    max_bytes: int,
    timeout: float = UNPACK_TIMEOUT,
) -> int:
    """Unpack ``archive`` over ``workdir`` as ``uid``/``gid``; returns the number of members.

    Raises :class:`UnpackFailed` with the reason. Cancelling the caller kills the child.
    """
    folder = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    parameters = {
        "folder": folder,  # pass_fds keeps the number
        "uid": uid,
        "gid": gid,
        "max_entries": max_entries,
        "max_bytes": max_bytes,
        "reserved": list(RESERVED),
        "package": str(Path(__file__).resolve().parents[2]),
    }
    try:
        with open(archive, "rb") as source:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", __file__, json.dumps(parameters),
                stdin=source, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(folder,), env={"LANG": "C.UTF-8"}, start_new_session=True,
            )  # fmt: skip
    finally:
        os.close(folder)
    try:
        out, err = await asyncio.wait_for(child.communicate(), timeout)
    except asyncio.TimeoutError:  # the builtin one only from Python 3.11
        raise UnpackFailed(f"unpacking took longer than {timeout:g} s") from None
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await asyncio.shield(child.wait())
    return _outcome(out, err, child.returncode)


def _outcome(out: bytes, err: bytes, code: int | None) -> int:
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("entries"), int) and code == 0:
        return int(answer["entries"])
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise UnpackFailed(answer["error"])
    log.error("the unpacking child failed (status %s): %s", code, err.decode(errors="replace"))
    raise UnpackFailed("the archive could not be unpacked (an error of the sandbox; see its log)")


# -- the child ------------------------------------------------------------------------------------


def _child(arguments: list[str]) -> int:
    import resource
    import signal

    parameters = json.loads(arguments[0])
    sys.path.insert(0, parameters["package"])
    # Codecs tarfile may ask for by name once the standard library is out of reach.
    import encodings.ascii
    import encodings.latin_1
    import encodings.utf_8  # noqa: F401

    from sandbox_kernel.archive import ArchiveError, ArchiveLimits, extract_archive

    os.fchdir(parameters["folder"])
    os.close(parameters["folder"])
    if os.geteuid() == 0:
        os.chroot(".")
        os.setgroups([])
        os.setresgid(parameters["gid"], parameters["gid"], parameters["gid"])
        os.setresuid(parameters["uid"], parameters["uid"], parameters["uid"])
        if 0 in (*os.getresuid(), *os.getresgid()):
            raise SystemExit("could not drop root privileges")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file too big: EFBIG, not death
    resource.setrlimit(resource.RLIMIT_AS, (_CHILD_MEMORY, _CHILD_MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    limits = ArchiveLimits(parameters["max_entries"], parameters["max_bytes"])
    try:
        names = extract_archive(sys.stdin.buffer, ".", limits, reserved=parameters["reserved"])
    except ArchiveError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return 2
    print(json.dumps({"entries": len(names)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
