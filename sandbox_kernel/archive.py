"""Environment archives (gzip-compressed tar), as the protocol carries them.

Both sides use this module: a client builds an upload from local files and unpacks a
downloaded environment; the server unpacks uploads (as the sandbox user, in a chroot: see
``server/unpacker.py``). It imports only the standard library, so that the server can run it
in a small child process.

Unpacking never trusts a path check. tarfile's ``data`` filter decides with
``os.path.realpath``, which gives up resolving symlinks past ``PATH_MAX``: a chain of links
through long names then points outside while the filter believes it is inside
(CVE-2025-4517), and Debian 12's Python 3.11.2 has no filter at all. Here every member is
created relative to a directory file descriptor, one path component at a time, and no
symlink is ever followed while creating (``O_NOFOLLOW`` on every component): links are
stored, never traversed. On top of that:

- names may not be absolute or hold ``..``; link targets may not either, except for leading
  ``..`` that stay within the member's own depth, so a stored link never points out;
- hard links only to regular files extracted earlier from the same archive;
- no devices, FIFOs or sockets; no set-id or sticky bits; no ownership from the archive;
- caps on entries and on bytes (decompressed, so that a gzip bomb stops early);
- ``reserved`` top-level names (the kernel's ``.sandbox_kernel``) are refused, naming the
  member.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import IO

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20
#: Directory descriptors kept open while unpacking (members usually come folder by folder).
_OPEN_DIRECTORIES = 64


class ArchiveError(ValueError):
    """An archive that cannot be accepted; the message is the reason, fit for a 400 body."""


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 20_000
    max_bytes: int = 1024**3


def build_archive(
    paths: Iterable[str | os.PathLike[str]],
    names: Iterable[str] | None = None,
    reserved: Collection[str] = (),
) -> io.BytesIO:
    """A ``.tgz`` of local files and folders, named by their base name (or ``names``).

    Only regular files and directories are taken (symlinks and special files are refused with
    :class:`ArchiveError`, so nothing outside what the user named is sent by accident). A name
    whose first component is in ``reserved`` is refused too.
    """
    buffer = io.BytesIO()
    local = [Path(path) for path in paths]
    arcnames = list(names) if names is not None else [path.name for path in local]
    if len(arcnames) != len(local):
        raise ValueError("give one name per path")
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, arcname in zip(local, arcnames, strict=True):
            parts = _parts(arcname)
            if parts and parts[0] in reserved:
                raise ArchiveError(f"{arcname!r}: {_reserved_reason(parts[0])}")
            _add_tree(archive, path, "/".join(parts))
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


def _parts(name: str) -> list[str]:
    """The components of a relative name; refuses absolute names, ``..`` and NUL bytes."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts or "\0" in name:
        raise ArchiveError(f"{name!r} must be a relative name inside the environment")
    return parts


def _reserved_reason(name: str) -> str:
    return (
        f"{name}/ belongs to the Sandbox kernel (its saved shell state), and an archive may "
        "not write there: remove it from the archive"
    )


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


def extract_archive(
    source: IO[bytes] | bytes,
    target: str | os.PathLike[str],
    limits: ArchiveLimits | None = None,
    *,
    reserved: Collection[str] = (),
) -> list[str]:
    """Unpack a ``.tgz`` into ``target`` (created if needed), safely; returns member names.

    Members replace what ``target`` already holds under their names (files of the archive
    win), but nothing is ever written through a symlink: a member whose folder is a symlink
    or a file in ``target`` is refused. On any refusal (:class:`ArchiveError`) the top-level
    entries this call created are removed again, so a bad archive leaves nothing
    half-extracted beside what was there.
    """
    limits = limits or ArchiveLimits()
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    Path(target).mkdir(parents=True, exist_ok=True)
    root = os.open(target, _DIRECTORY_FLAGS)
    try:
        before = set(os.listdir(root))
        extractor = _Extractor(root, limits, frozenset(reserved))
        try:
            extractor.run(source)
        except ArchiveError:
            extractor.close()
            for name in set(os.listdir(root)) - before:
                remove_entry(root, name)
            raise
        finally:
            extractor.close()
        return extractor.names
    finally:
        os.close(root)


class _Extractor:
    """Creates members under a root directory descriptor, component by component."""

    def __init__(self, root: int, limits: ArchiveLimits, reserved: frozenset[str]) -> None:
        self.root = root
        self.limits = limits
        self.reserved = reserved
        self.names: list[str] = []
        self.total = 0
        #: Regular files extracted so far (hard links may only point at these): identity.
        self.files: dict[tuple[str, ...], tuple[int, int]] = {}
        #: Folders this archive created or entered: a later member may not replace them.
        self.folders: set[tuple[str, ...]] = set()
        self._open: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def run(self, source: IO[bytes]) -> None:
        reader = io.BufferedReader(_CappedReader(source, self.limits.max_bytes + 10 * 1024**2))
        try:
            # Stream mode: one pass over the decompressed data; each member is checked, then
            # created, before the next one is read.
            with tarfile.open(fileobj=reader, mode="r|") as archive:
                for member in archive:
                    self.add(archive, member)
        except ArchiveError:
            raise
        except MemoryError:
            raise ArchiveError("the environment has a header too large to read") from None
        except (tarfile.TarError, EOFError) as error:
            raise ArchiveError(f"the environment is not a valid tar.gz archive ({error})") from None
        except OSError as error:
            raise ArchiveError(f"cannot unpack the environment ({error.strerror})") from None

    # -- one member ---------------------------------------------------------------------------

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        if name.strip("/") in ("", "."):
            return  # the root entry of archives made with `tar -C dir .`
        parts = self._checked_name(member.name)
        self._count(member)
        if member.isdir():
            self._directory(parts)
        elif member.isreg():
            self._file(parts, member, archive)
        elif member.issym():
            self._symlink(parts, member.linkname)
        elif member.islnk():
            self._hard_link(parts, member.linkname)
        else:
            raise ArchiveError(f"member {member.name!r} is a device, FIFO or other special file")
        self.names.append("/".join(parts))

    def _checked_name(self, name: str) -> list[str]:
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if name.startswith("/") or ".." in parts or "\0" in name:
            raise ArchiveError(f"member {name!r} points outside the environment")
        if parts[0] in self.reserved:
            raise ArchiveError(f"member {name!r}: {_reserved_reason(parts[0])}")
        return parts

    def _count(self, member: tarfile.TarInfo) -> None:
        if len(self.names) >= self.limits.max_entries:
            raise ArchiveError(f"the environment has more than {self.limits.max_entries} entries")
        if member.isreg():
            self.total += member.size
            if self.total > self.limits.max_bytes:
                raise ArchiveError(f"the environment holds more than {self.limits.max_bytes} bytes")

    def _directory(self, parts: list[str]) -> None:
        parent = self._folder(parts[:-1], parts)
        name = parts[-1]
        existing = _lstat(parent, name)
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            self._replace(parent, parts)
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(name, 0o755, dir_fd=parent)
        fd = self._enter(parent, parts)
        os.fchmod(fd, 0o755)

    def _file(self, parts: list[str], member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parent = self._folder(parts[:-1], parts)
        self._replace(parent, parts)
        mode = 0o755 if member.mode & 0o100 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, mode, dir_fd=parent)
        with os.fdopen(fd, "wb") as file:
            data = archive.extractfile(member)
            if data is not None:
                shutil.copyfileobj(data, file, _COPY_CHUNK)
            file.flush()
            os.fchmod(fd, mode)  # the umask does not decide
            # An absurd date leaves the file with the time of unpacking.
            with contextlib.suppress(OverflowError, ValueError, OSError):
                os.utime(fd, (member.mtime, member.mtime))
            info = os.fstat(fd)
        self.files[tuple(parts)] = (info.st_dev, info.st_ino)

    def _symlink(self, parts: list[str], target: str) -> None:
        _check_link_target("/".join(parts), target, depth=len(parts) - 1)
        parent = self._folder(parts[:-1], parts)
        self._replace(parent, parts)
        os.symlink(target, parts[-1], dir_fd=parent)

    def _hard_link(self, parts: list[str], target: str) -> None:
        name = "/".join(parts)
        if target.startswith("/"):
            raise ArchiveError(f"member {name!r} is a link to an absolute path ({target!r})")
        source = [part for part in target.split("/") if part not in ("", ".")]
        if ".." in source or not source:
            raise ArchiveError(
                f"member {name!r} is a hard link pointing outside the destination ({target!r})"
            )
        identity = self.files.get(tuple(source))
        if identity is None:
            raise ArchiveError(
                f"member {name!r} is a hard link to {target!r}, which is not a file unpacked "
                "earlier from this archive"
            )
        # Its own descriptor: the cache may close the shared one while the second is opened.
        source_parent = os.dup(self._folder(source[:-1], source))
        try:
            found = _lstat(source_parent, source[-1])
            if found is None or (found.st_dev, found.st_ino) != identity:
                raise ArchiveError(
                    f"member {name!r}: {target!r} was replaced after it was unpacked"
                )
            parent = self._folder(parts[:-1], parts)
            self._replace(parent, parts)
            os.link(source[-1], parts[-1], src_dir_fd=source_parent, dst_dir_fd=parent,
                    follow_symlinks=False)  # fmt: skip
        finally:
            os.close(source_parent)
        self.files[tuple(parts)] = identity

    # -- folders by descriptor ------------------------------------------------------------------

    def _folder(self, parts: list[str], member: list[str]) -> int:
        """The descriptor of folder ``parts``, creating missing folders; never via a link.

        The descriptor stays valid until the next call (a cache of open folders)."""
        fd = self._cached(tuple(parts))
        if fd is not None:
            return fd
        fd = self.root
        for depth in range(len(parts)):
            prefix = tuple(parts[: depth + 1])
            cached = self._cached(prefix)
            if cached is not None:
                fd = cached
                continue
            if _lstat(fd, parts[depth]) is None:
                os.mkdir(parts[depth], 0o755, dir_fd=fd)
            fd = self._enter(fd, list(prefix), member)
        return fd

    def _cached(self, key: tuple[str, ...]) -> int | None:
        fd = self._open.pop(key, None)
        if fd is not None:
            self._open[key] = fd  # the most recently used goes last
        return fd

    def _enter(self, parent: int, parts: list[str], member: list[str] | None = None) -> int:
        key = tuple(parts)
        cached = self._cached(key)
        if cached is not None:
            return cached
        try:
            fd = os.open(parts[-1], _DIRECTORY_FLAGS, dir_fd=parent)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            shown = "/".join(member or parts)
            raise ArchiveError(
                f"member {shown!r} would be written through {'/'.join(parts)!r}, which is a "
                "symbolic link or a file, not a folder"
            ) from None
        if len(self._open) >= _OPEN_DIRECTORIES:  # the least recently used goes
            os.close(self._open.pop(next(iter(self._open))))
        self._open[key] = fd
        self.folders.add(key)
        return fd

    def _replace(self, parent: int, parts: list[str]) -> None:
        """Make room for a member: what is there goes (a folder only if it came from before
        this archive: a member may not replace a folder of the same archive)."""
        key = tuple(parts)
        existing = _lstat(parent, parts[-1])
        if existing is None:
            return
        if stat.S_ISDIR(existing.st_mode):
            if key in self.folders:
                raise ArchiveError(
                    f"member {'/'.join(parts)!r} would replace a folder of the same archive"
                )
            for cached in [k for k in self._open if k[: len(key)] == key]:
                os.close(self._open.pop(cached))
        for gone in [k for k in self.files if k[: len(key)] == key]:
            del self.files[gone]
        remove_entry(parent, parts[-1])


def _check_link_target(name: str, target: str, depth: int) -> None:
    """A symlink may be stored only if it cannot point out, whatever the links around it.

    Leading ``..`` climb real folders (a member's folders are never links, see
    :meth:`_Extractor._enter`), so they are counted against the member's depth; a ``..``
    after a name could climb out of a link (``x -> .`` then ``x/../..``) and is refused.
    """
    if not target or "\0" in target:
        raise ArchiveError(f"member {name!r} is a link with an empty or invalid target")
    if target.startswith("/"):
        raise ArchiveError(f"member {name!r} is a link to an absolute path ({target!r})")
    parts = [part for part in target.split("/") if part not in ("", ".")]
    climbs = 0
    while climbs < len(parts) and parts[climbs] == "..":
        climbs += 1
    if ".." in parts[climbs:]:
        raise ArchiveError(
            f"member {name!r} is a link whose target {target!r} has '..' after a name: "
            "write it as a plain relative path"
        )
    if climbs > depth:
        raise ArchiveError(
            f"member {name!r} is a link pointing outside the destination ({target!r})"
        )


def _lstat(directory: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_entry(parent: int, name: str) -> None:
    """Remove ``name`` under the folder ``parent`` (a file, a link, or a whole tree).

    Never follows a link, never recurses (a tree of any depth goes), and holds two
    descriptors at most: it climbs back with ``..``, which is safe because nothing else
    writes in the tree meanwhile (the callers' sandboxes are stopped).
    """
    try:
        os.unlink(name, dir_fd=parent)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    except PermissionError:  # EPERM: unlink(2) of a folder on some file systems
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise
    path = [name]
    fd = _open_folder(parent, name)
    try:
        while path:
            child = _empty_files(fd)
            if child is not None:
                inner = _open_folder(fd, child)
                os.close(fd)
                fd, path = inner, [*path, child]
                continue
            done = path.pop()
            up = parent if not path else os.open("..", _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up if path else -1
            os.rmdir(done, dir_fd=up)
    finally:
        if fd >= 0 and fd != parent:
            os.close(fd)


def _open_folder(parent: int, name: str) -> int:
    try:
        fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    except PermissionError:  # a folder made unreadable (chmod 000) and we are not root
        os.chmod(name, 0o700, dir_fd=parent)
        return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    if os.geteuid() != 0 and not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
        os.fchmod(fd, 0o700)  # a read-only folder: its entries could not be removed
    return fd


def _empty_files(fd: int) -> str | None:
    """Remove the non-folders of a folder; return one subfolder's name, or None if empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            os.unlink(entry.name, dir_fd=fd)
    return None
