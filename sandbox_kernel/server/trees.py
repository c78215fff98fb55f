"""File trees handled by descriptor: walk, measure, copy, archive and remove, at any depth.

Commands can leave trees that path-based code cannot handle: 1,500 nested folders overflow
Python's recursion (``shutil.rmtree``), and long names push paths past ``PATH_MAX``, where
every ``open(path)`` fails. Everything here works from folder descriptors, one component at a
time, without recursion and without following a symlink, holding two or three descriptors
whatever the depth: a walk climbs back with ``..``, which is safe because the trees are
never changed by anyone else meanwhile (a run's sandbox is stopped before its working
directory is read; saved environments are immutable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..archive import remove_entry

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of a walk. ``folder`` (the descriptor of its folder) is valid until the
    walk moves on; ``up`` marks the walk leaving a folder (then only ``parts`` is set)."""

    folder: int
    parts: tuple[str, ...]
    info: os.stat_result | None
    up: bool = False

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def relative(self) -> str:
        return "/".join(self.parts)

    @property
    def is_folder(self) -> bool:
        return self.info is not None and stat.S_ISDIR(self.info.st_mode)


def open_folder(path: Path) -> int:
    """A descriptor of a folder of our own layout (short path), never through a final link."""
    return os.open(path, FOLDER_FLAGS)


def walk(root: int, *, events: bool = False) -> Iterator[Entry]:
    """Every entry under the folder ``root``, each folder right before its content.

    With ``events``, an ``up`` entry follows the content of each folder: a caller mirroring
    the walk elsewhere (a copy) goes down with each folder entry and back up with each ``up``.
    """
    current = os.dup(root)
    parts: list[str] = []
    pending = [_listing(current)]
    try:
        while pending:
            level = pending[-1]
            if not level:
                pending.pop()
                if parts:
                    leaving = tuple(parts)
                    above = os.open("..", FOLDER_FLAGS, dir_fd=current)
                    os.close(current)
                    current = above
                    parts.pop()
                    if events:
                        yield Entry(current, leaving, None, up=True)
                continue
            name, info = level.pop()
            yield Entry(current, (*parts, name), info)
            if stat.S_ISDIR(info.st_mode):
                below = _enter(current, name)
                os.close(current)
                current = below
                parts.append(name)
                pending.append(_listing(current))
    finally:
        os.close(current)


def _listing(folder: int) -> list[tuple[str, os.stat_result]]:
    with os.scandir(folder) as entries:
        found = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
    found.reverse()  # popped from the end: walked in directory order
    return found


def _enter(folder: int, name: str) -> int:
    try:
        return os.open(name, FOLDER_FLAGS, dir_fd=folder)
    except PermissionError:  # chmod 000 by a command, and the server is not root
        os.chmod(name, 0o700, dir_fd=folder)
        return os.open(name, FOLDER_FLAGS, dir_fd=folder)


@dataclasses.dataclass
class Usage:
    """What a tree holds: bytes of regular files and inodes, hard links counted once."""

    bytes: int = 0
    inodes: int = 0


def usage(root: Path, *, only_unshared: bool = False, seen: set[int] | None = None) -> Usage:
    """Bytes and inodes under ``root`` (``only_unshared``: files no other tree links to).

    ``seen``: inodes of files counted already (in other trees), updated here."""
    total = Usage()
    seen = set() if seen is None else seen
    folder = open_folder(root)
    try:
        for entry in walk(folder):
            info = entry.info
            assert info is not None
            if stat.S_ISREG(info.st_mode):
                if info.st_ino in seen or (only_unshared and info.st_nlink > 1):
                    continue
                seen.add(info.st_ino)
                total.bytes += info.st_size
            total.inodes += 1
    finally:
        os.close(folder)
    return total


def remove(path: Path) -> None:
    """Remove ``path`` (a file, a link or a tree of any depth) without following links."""
    parent = os.open(path.parent, FOLDER_FLAGS)
    try:
        remove_entry(parent, path.name)
    finally:
        os.close(parent)


FileCopied = Callable[[Entry, os.stat_result], None]


def copy_tree(
    source: Path,
    target: Path,
    owner: tuple[int, int] | None = None,
    copied: FileCopied | None = None,
) -> None:
    """Copy the content of ``source`` into the empty folder ``target``.

    Folders keep their mode (plus owner rwx), files their mode, times and content (copied
    in the kernel, as reflinks where the file system has them), symlinks their target.
    ``owner``: (uid, gid) of everything created. ``copied(entry, copy's stat)`` is told
    every regular file copied.
    """
    from_folder = open_folder(source)
    into = open_folder(target)
    try:
        for entry in walk(from_folder, events=True):
            if entry.up:
                above = os.open("..", FOLDER_FLAGS, dir_fd=into)
                os.close(into)
                into = above
                continue
            info = entry.info
            assert info is not None
            if stat.S_ISDIR(info.st_mode):
                os.mkdir(entry.name, stat.S_IMODE(info.st_mode) | 0o700, dir_fd=into)
                below = os.open(entry.name, FOLDER_FLAGS, dir_fd=into)
                if owner is not None:
                    os.fchown(below, *owner)
                os.close(into)
                into = below
            elif stat.S_ISLNK(info.st_mode):
                link = os.readlink(entry.name, dir_fd=entry.folder)
                os.symlink(link, entry.name, dir_fd=into)
                if owner is not None:
                    os.chown(entry.name, *owner, dir_fd=into, follow_symlinks=False)
            elif stat.S_ISREG(info.st_mode):
                result = _copy_file(entry, into, info, owner)
                if copied is not None:
                    copied(entry, result)
    finally:
        os.close(from_folder)
        os.close(into)


def _copy_file(
    entry: Entry, into: int, info: os.stat_result, owner: tuple[int, int] | None
) -> os.stat_result:
    mode = stat.S_IMODE(info.st_mode) | 0o600
    source = os.open(entry.name, _FILE_FLAGS, dir_fd=entry.folder)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        copy = os.open(entry.name, flags, mode, dir_fd=into)
        try:
            remaining = info.st_size
            while remaining > 0:
                done = os.copy_file_range(source, copy, remaining)
                if done == 0:
                    break
                remaining -= done
            if owner is not None:
                os.fchown(copy, *owner)
            os.utime(copy, ns=(info.st_atime_ns, info.st_mtime_ns))
            return os.fstat(copy)
        finally:
            os.close(copy)
    finally:
        os.close(source)


class Shadow:
    """A cursor in a second tree that follows a walk where the same folders exist there.

    Used to find, for a file of a run's working directory, the file of the base environment
    at the same place, without building paths (which may be longer than ``PATH_MAX``).
    """

    def __init__(self, root: Path) -> None:
        self.folder = open_folder(root)
        self._lost = 0  # levels the walk went down where the shadow tree has no folder

    def follow(self, entry: Entry) -> None:
        """Call with every entry of a walk made with ``events=True``."""
        if entry.up:
            if self._lost:
                self._lost -= 1
            else:
                self._move("..")
        elif entry.is_folder and (self._lost or not self._move(entry.name)):
            self._lost += 1

    def _move(self, name: str) -> bool:
        try:
            moved = os.open(name, FOLDER_FLAGS, dir_fd=self.folder)
        except OSError:
            return False
        os.close(self.folder)
        self.folder = moved
        return True

    @property
    def here(self) -> int | None:
        """The shadow of the walk's current folder, if the shadow tree has it."""
        return None if self._lost else self.folder

    def close(self) -> None:
        os.close(self.folder)


def make_owner_accessible(root: Path) -> None:
    """Give the owner rwx on folders and rw on files (after a command's ``chmod 000``), so
    that a server that is not root can copy, archive and remove them later."""
    folder = open_folder(root)
    try:
        os.fchmod(folder, stat.S_IMODE(os.fstat(folder).st_mode) | 0o700)
        for entry in walk(folder):
            info = entry.info
            assert info is not None
            wanted = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
            if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                mode = stat.S_IMODE(info.st_mode)
                if mode & wanted != wanted:
                    os.chmod(entry.name, mode | wanted, dir_fd=entry.folder)
    finally:
        os.close(folder)


def add_to_archive(archive: tarfile.TarFile, root: Path, owner: tuple[int, str]) -> None:
    """Add every entry under ``root`` to ``archive``, named relative to it (contract:
    ``file1.txt``, ``dir/file1.txt``), owned by ``owner`` (uid, name); hard links within
    the tree stay hard links."""
    folder = open_folder(root)
    first_names: dict[int, str] = {}
    try:
        for entry in walk(folder):
            info = entry.info
            assert info is not None
            member = tarfile.TarInfo(entry.relative)
            member.mode = stat.S_IMODE(info.st_mode)
            member.mtime = int(info.st_mtime)
            member.uid = member.gid = owner[0]
            member.uname = member.gname = owner[1]
            if stat.S_ISDIR(info.st_mode):
                member.type = tarfile.DIRTYPE
                archive.addfile(member)
            elif stat.S_ISLNK(info.st_mode):
                member.type = tarfile.SYMTYPE
                member.linkname = os.readlink(entry.name, dir_fd=entry.folder)
                archive.addfile(member)
            elif stat.S_ISREG(info.st_mode):
                if info.st_nlink > 1 and info.st_ino in first_names:
                    member.type = tarfile.LNKTYPE
                    member.linkname = first_names[info.st_ino]
                    archive.addfile(member)
                    continue
                first_names.setdefault(info.st_ino, entry.relative)
                member.size = info.st_size
                fd = os.open(entry.name, _FILE_FLAGS, dir_fd=entry.folder)
                with os.fdopen(fd, "rb") as data:
                    archive.addfile(member, data)
    finally:
        os.close(folder)


def remove_quietly(path: Path) -> None:
    """:func:`remove`, for clean-ups: a path already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        remove(path)
