"""Environment archives (gzip-compressed tar), as the protocol carries them.

Both sides use this module: a client builds an upload from local files and unpacks a
downloaded environment; the server checks and unpacks uploads. Unpacking is safe whoever
calls it: nothing is written outside the target, no link points out of it, no device or FIFO
is made, and caps on entries and bytes (decompressed, so a gzip bomb stops early) hold. It
relies on tarfile's ``data`` extraction filter and refuses outright what that filter would
silently rewrite (absolute names).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO

#: tarfile's extraction filters (PEP 706) exist from Python 3.10.12 and 3.11.4; Debian 12's
#: Python 3.11.2 lacks them. There, :func:`_legacy_checks` refuses what the filter would.
_HAS_FILTERS = hasattr(tarfile, "data_filter")
_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if _HAS_FILTERS else ()  # type: ignore[attr-defined,unused-ignore]
)


class ArchiveError(ValueError):
    """An archive that cannot be accepted; the message is the reason, fit for a 400 body."""


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 20_000
    max_bytes: int = 1024**3


def build_archive(
    paths: Iterable[str | os.PathLike[str]], names: Iterable[str] | None = None
) -> io.BytesIO:
    """A ``.tgz`` of local files and folders, named by their base name (or ``names``).

    Only regular files and directories are taken (symlinks and special files are refused with
    :class:`ArchiveError`, so nothing outside what the user named is sent by accident).
    """
    buffer = io.BytesIO()
    local = [Path(path) for path in paths]
    arcnames = list(names) if names is not None else [path.name for path in local]
    if len(arcnames) != len(local):
        raise ValueError("give one name per path")
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, arcname in zip(local, arcnames, strict=True):
            _check_relative(arcname)
            _add_tree(archive, path, arcname.strip("/"))
    buffer.seek(0)
    return buffer


def _add_tree(archive: tarfile.TarFile, path: Path, arcname: str) -> None:
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        archive.add(path, arcname, recursive=False)
    elif stat.S_ISDIR(mode):
        archive.add(path, arcname, recursive=False)
        for child in sorted(path.iterdir()):
            _add_tree(archive, child, f"{arcname}/{child.name}")
    else:
        raise ArchiveError(f"{path} is not a regular file or folder; only those can be uploaded")


def _check_relative(name: str) -> None:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or not name.strip("/."):
        raise ArchiveError(f"{name!r} must be a relative name inside the environment")


class _CappedReader(io.RawIOBase):
    """Decompressed bytes, stopping with :class:`ArchiveError` past ``limit`` (gzip bombs)."""

    def __init__(self, source: IO[bytes], limit: int) -> None:
        self._gzip = gzip.GzipFile(fileobj=source, mode="rb")
        self._limit = limit
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._gzip.read(len(buffer))
        except (OSError, EOFError, zlib.error) as error:
            raise ArchiveError(f"the environment is not a valid gzip file ({error})") from None
        self._count += len(data)
        if self._count > self._limit:
            raise ArchiveError(
                f"the environment decompresses to more than {self._limit} bytes (the cap)"
            )
        buffer[: len(data)] = data
        return len(data)


def _checked(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """The member with a clean name, None for a root entry (``""``, ``.``); refuses the rest."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    if name in ("", ".", "./"):
        return None
    if name.startswith("/") or ".." in name.split("/"):
        raise ArchiveError(f"member {member.name!r} points outside the environment")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise ArchiveError(f"member {member.name!r} is a device, FIFO or other special file")
    member.name = name.rstrip("/")
    return member


def _legacy_checks(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """What the ``data`` filter does, for Pythons without it: no link may point out (absolute
    or ``..`` targets), no set-id bits, no ownership from the archive."""
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            raise ArchiveError(f"{member.name!r} is a link pointing outside the environment")
    if member.isreg() or member.islnk():
        member.mode &= 0o755 if member.mode & 0o100 else 0o644
        member.mode |= 0o600
    else:  # directories get the usual mode, as with the filter
        member.mode = 0o755
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


def extract_archive(
    source: IO[bytes] | bytes, target: str | os.PathLike[str], limits: ArchiveLimits | None = None
) -> list[str]:
    """Unpack a ``.tgz`` into ``target`` (created if needed), safely; returns member names.

    On any refusal (:class:`ArchiveError`) everything this call wrote is removed again, so a
    bad archive leaves nothing half-extracted; files that were already in ``target`` are kept.
    """
    limits = limits or ArchiveLimits()
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(target))
    reader = io.BufferedReader(_CappedReader(source, limits.max_bytes + 10 * 1024**2))
    names: list[str] = []
    total = 0
    try:
        # Stream mode: one pass over the decompressed data, each member checked before it is
        # written; a refusal midway is undone below.
        with tarfile.open(fileobj=reader, mode="r|") as archive:
            for raw in archive:
                member = _checked(raw)
                if member is None:
                    continue
                total += member.size
                if len(names) >= limits.max_entries:
                    raise ArchiveError(
                        f"the environment has more than {limits.max_entries} entries"
                    )
                if total > limits.max_bytes:
                    raise ArchiveError(f"the environment holds more than {limits.max_bytes} bytes")
                if _HAS_FILTERS:
                    archive.extract(member, target, filter="data")
                else:
                    archive.extract(_legacy_checks(member), target)
                names.append(member.name)
    except ArchiveError:
        _undo(target, before)
        raise
    except _FILTER_ERRORS as error:
        _undo(target, before)
        raise ArchiveError(str(error)) from None
    except (tarfile.TarError, EOFError, OSError) as error:
        _undo(target, before)
        raise ArchiveError(f"the environment is not a valid tar.gz archive ({error})") from None
    return names


def _undo(target: Path, before: set[str]) -> None:
    for name in set(os.listdir(target)) - before:
        path = target / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
