"""Saved environments, kept as plain directories under the data dir.

Layout of the data dir::

    environments/<uuid>/       the saved working directory (never modified once saved)
    environments/<uuid>.json   {"expire": <unix time>}
    work/<runner>/             working directories of runners (bound as /home/student)
    staging/<id>/              uploads being checked before they are merged
    cache/<uuid>.tgz           archives built for downloads

A run starts from a *copy* of its base environment (so saved environments stay immutable
whatever the commands do), and saving a run links every file it did not touch to the base's
file instead of storing it again: a notebook of 100 cells over a 50 MB environment stores the
50 MB once. Unchanged is decided by inode and ctime, which a command cannot set back.

All methods block on the file system: the server calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import threading
import time
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path

from ..protocol import is_uuid
from .settings import ServerSettings, format_size

log = logging.getLogger(__name__)

_CACHED_ARCHIVES = 16
#: A description without its directory is left alone this long (a save in progress).
_SAVE_GRACE = 60.0


class StorageFull(Exception):
    """Saving would exceed ``--max-storage`` or the working directory quota (HTTP 507)."""


class NotConfined(Exception):
    """A path that leaves its directory, crosses a symlink, or does not exist."""


@dataclasses.dataclass
class Snapshot:
    """What a working directory was filled with: relative path -> identity of the copy (see
    :func:`_identity`) and the saved file it was copied from."""

    files: dict[str, tuple[int, int, int, int, Path]] = dataclasses.field(default_factory=dict)


class Storage:
    def __init__(self, settings: ServerSettings, root: Path) -> None:
        self.settings = settings
        self.root = root
        self.environments = root / "environments"
        self.work = root / "work"
        self.staging = root / "staging"
        self.cache = root / "cache"
        self.used = 0
        self._lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------------

    def open(self, sandbox_uid: int) -> None:
        """Create the layout, drop what a previous server left half-done, count what is kept.

        ``sandbox_uid`` runs the commands: bubblewrap, running as that user, must be able to
        reach the working directories it binds (see :func:`_work_area`).
        """
        for directory in (self.root, self.environments, self.staging, self.cache):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Several servers may share a data dir (one per kernel, say): saved environments are
        # shared, working and staging directories belong to one server process each.
        work_area = _work_area(self.root, sandbox_uid)
        for area in (work_area, self.staging):
            for leftover in area.iterdir():
                if not _owned_by_live_server(leftover.name):
                    _remove(leftover)
        self.work = work_area / str(os.getpid())
        self.work.mkdir(mode=0o711, exist_ok=True)
        self.staging = self.staging / str(os.getpid())
        self.staging.mkdir(mode=0o700, exist_ok=True)
        self.sweep()
        seen: set[int] = set()
        total = 0
        for entry in self.environments.iterdir():
            if entry.is_dir():
                for path_stat in _walk_stats(entry):
                    if stat.S_ISREG(path_stat.st_mode) and path_stat.st_ino not in seen:
                        seen.add(path_stat.st_ino)
                        total += path_stat.st_size
        self.used = total

    def close(self) -> None:
        """Remove this server's working and staging folders (its runners are gone), and the
        shared work area outside the data dir once no server uses it any more."""
        for directory in (self.work, self.staging):
            _remove(directory)
        area = self.work.parent
        if area != self.root / "work":
            with contextlib.suppress(OSError):  # still used by another server: kept
                area.rmdir()

    def sweep(self) -> int:
        """Delete expired environments (and orphans of a crash). Returns how many went."""
        now = time.time()
        removed = 0
        names = {entry.name.removesuffix(".json") for entry in self.environments.iterdir()}
        for name in names:
            with self._lock:  # a save describes, then renames its directory under this lock
                expire = _read_expire(self.environments / f"{name}.json")
                if expire is not None and expire > now and (self.environments / name).is_dir():
                    continue
                if (
                    expire is not None
                    and expire > now
                    and _younger_than(self.environments / f"{name}.json", _SAVE_GRACE)
                ):
                    continue  # another server sharing the data dir is saving it right now
                doomed = self._detach(name)
            self._delete(doomed)
            removed += 1
        return removed

    def _detach(self, name: str) -> Path | None:
        """Take an environment out of sight at once; deleting it can then take its time."""
        with contextlib.suppress(FileNotFoundError):
            (self.environments / f"{name}.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.cache / f"{name}.tgz").unlink()
        doomed = self.staging / f"expired-{name}-{os.urandom(4).hex()}"
        try:
            os.rename(self.environments / name, doomed)
        except FileNotFoundError:
            return None
        return doomed

    def _delete(self, directory: Path | None) -> None:
        if directory is None:
            return
        freed = 0
        for path_stat in _walk_stats(directory):
            if stat.S_ISREG(path_stat.st_mode) and path_stat.st_nlink == 1:
                freed += path_stat.st_size
        _remove(directory)
        with self._lock:
            self.used = max(0, self.used - freed)

    # -- lookups ------------------------------------------------------------------------------

    def directory(self, uuid: str) -> Path | None:
        """The directory of a saved, unexpired environment, or None (unknown, expired, junk)."""
        if not is_uuid(uuid):
            return None
        uuid = uuid.lower()
        expire = _read_expire(self.environments / f"{uuid}.json")
        directory = self.environments / uuid
        if expire is None or expire <= time.time() or not directory.is_dir():
            return None
        return directory

    # -- a run's working directory --------------------------------------------------------------

    def populate(self, base: Path, workdir: Path, uid: int, gid: int) -> Snapshot:
        """Copy a saved environment into an empty working directory owned by ``uid``."""
        snapshot = Snapshot()
        chown = os.geteuid() == 0
        for source, relative, entry_stat in _walk(base):
            target = workdir / relative
            if stat.S_ISDIR(entry_stat.st_mode):
                target.mkdir(mode=stat.S_IMODE(entry_stat.st_mode) | 0o700)
                if chown:
                    os.chown(target, uid, gid)
            elif stat.S_ISLNK(entry_stat.st_mode):
                os.symlink(os.readlink(source), target)
                if chown:
                    os.lchown(target, uid, gid)
            elif stat.S_ISREG(entry_stat.st_mode):
                copied = _copy_file(source, target, entry_stat, uid if chown else -1, gid)
                snapshot.files[relative] = (*_identity(copied), source)
        return snapshot

    def usage_of(self, workdir: Path) -> int:
        """Bytes in a working directory (regular files, hard links counted once)."""
        seen: set[int] = set()
        total = 0
        for path_stat in _walk_stats(workdir):
            if stat.S_ISREG(path_stat.st_mode) and path_stat.st_ino not in seen:
                seen.add(path_stat.st_ino)
                total += path_stat.st_size
        return total

    def save(self, workdir: Path, snapshot: Snapshot) -> tuple[str, float]:
        """Turn a finished run's working directory into a new saved environment.

        The directory is moved, not copied; files the run did not change become links to the
        base environment's. Raises :class:`StorageFull` rather than evicting anything.
        """
        if os.geteuid() != 0:
            _make_readable(workdir)
        size = self.usage_of(workdir)
        if size > self.settings.workdir_quota:
            raise StorageFull(
                f"The run left {format_size(size)} in its working directory, more than the "
                f"quota of {format_size(self.settings.workdir_quota)} (--workdir-quota). "
                "Nothing was saved: remove files in the commands, or raise the quota."
            )
        new_bytes = self._deduplicate(workdir, snapshot)
        with self._lock:
            if self.used + new_bytes > self.settings.max_storage:
                raise StorageFull(
                    f"Saving this environment needs {format_size(new_bytes)} more, and the "
                    f"sandbox already stores {format_size(self.used)} of at most "
                    f"{format_size(self.settings.max_storage)} (--max-storage). Nothing was "
                    "saved and nothing was evicted: wait for environments to expire, or raise "
                    "--max-storage."
                )
            self.used += new_bytes
        name = str(uuid_module.uuid4())
        expire = time.time() + self.settings.expiration
        os.chmod(workdir, 0o700)
        if os.stat(workdir).st_dev != os.stat(self.environments).st_dev:
            moved = self.new_staging() / "environment"
            shutil.copytree(workdir, moved, symlinks=True)
            shutil.rmtree(workdir)
            workdir = moved
        with self._lock:  # description first: a sweep never sees a directory without one
            self._write_json(self.environments / f"{name}.json", {"expire": expire})
            os.rename(workdir, self.environments / name)
        return name, expire

    def _deduplicate(self, workdir: Path, snapshot: Snapshot) -> int:
        """Link unchanged files to the base; drop FIFOs and sockets; return the new bytes."""
        new_bytes = 0
        seen: set[int] = set()
        for path, relative, entry_stat in list(_walk(workdir)):
            mode = entry_stat.st_mode
            if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
                continue
            if not stat.S_ISREG(mode):
                path.unlink()
                continue
            recorded = snapshot.files.get(relative)
            if recorded and recorded[:4] == _identity(entry_stat):
                temporary = path.with_name(f".{path.name}.sk-link")
                try:
                    os.link(recorded[4], temporary)
                except OSError:  # another file system, or the base is gone: keep the copy
                    new_bytes += entry_stat.st_size
                    continue
                os.replace(temporary, path)
            elif entry_stat.st_ino not in seen:
                seen.add(entry_stat.st_ino)
                new_bytes += entry_stat.st_size
        return new_bytes

    # -- downloads ----------------------------------------------------------------------------

    def archive(self, uuid: str) -> Path | None:
        """The environment as a ``.tgz`` (built on first request, then kept a while)."""
        directory = self.directory(uuid)
        if directory is None:
            return None
        cached = self.cache / f"{directory.name}.tgz"
        if cached.exists():
            os.utime(cached)
            return cached
        temporary = cached.with_suffix(f".{os.urandom(4).hex()}.tmp")
        with tarfile.open(temporary, "w:gz", compresslevel=1) as archive:
            for path, relative, _ in _walk(directory):
                archive.add(path, arcname=relative, recursive=False, filter=_as_student)
        os.replace(temporary, cached)
        self._trim_cache()
        return cached

    def _trim_cache(self) -> None:
        archives = sorted(self.cache.glob("*.tgz"), key=lambda p: p.stat().st_mtime)
        for old in archives[:-_CACHED_ARCHIVES]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def _write_json(self, path: Path, data: object) -> None:
        temporary = self.staging / f"{path.name}.{os.urandom(4).hex()}.tmp"
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)

    def new_staging(self) -> Path:
        path = self.staging / uuid_module.uuid4().hex
        path.mkdir(mode=0o700)
        return path


def _work_area(root: Path, uid: int) -> Path:
    """A directory for working directories that ``uid`` can traverse.

    bubblewrap resolves bind sources as the unprivileged user it runs as, so every parent of a
    working directory must be searchable by that user. The data dir usually is (mode 0711);
    under an unsearchable home (``/root``) a root-owned 0711 folder in ``/var/tmp`` on the
    same file system is used instead, so that saving stays a rename.
    """
    work = root / "work"
    if uid == os.geteuid() or _searchable(root, uid):
        os.chmod(root, 0o711)
        work.mkdir(mode=0o711, exist_ok=True)
        return work
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    device = os.stat(root).st_dev
    candidates = [Path(base) / f"sandbox-kernel-work-{tag}" for base in ("/var/tmp", "/tmp")]
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if os.stat(candidate.parent).st_dev == device:
                return _private_area(candidate)
    log.warning("working directories are on another file system than %s: saving copies", root)
    return _private_area(candidates[0])


def _owned_by_live_server(name: str) -> bool:
    """Whether a ``work/`` or ``staging/`` entry is the folder of another running server."""
    return name.isdigit() and int(name) != os.getpid() and Path(f"/proc/{name}").exists()


def _private_area(path: Path) -> Path:
    path.mkdir(mode=0o711, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OSError(f"{path} exists and is not this server's: remove it")
    os.chmod(path, 0o711)
    return path


def _searchable(path: Path, uid: int) -> bool:
    """Whether ``uid`` may traverse every parent of ``path`` (``path`` itself gets 0711)."""
    for directory in path.resolve().parents:
        info = directory.stat()
        if not info.st_mode & (stat.S_IXUSR if info.st_uid == uid else stat.S_IXOTH):
            return False
    return True


def iso_expire(timestamp: float) -> str:
    """``expire`` as the 3.x server writes it: ISO 8601 with a UTC offset."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()


def open_beneath(root: Path, relative: str) -> int:
    """Open a regular file under ``root`` without leaving it or following any symlink.

    ``relative`` is a client's path: absolute paths, ``..`` and symlinks (anywhere on the
    way) are refused with :class:`NotConfined`. Returns a read-only file descriptor.
    """
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if relative.startswith("/") or not parts or ".." in parts or "\0" in relative:
        raise NotConfined(relative)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, flags | os.O_DIRECTORY, dir_fd=directory)
            except OSError as error:
                raise NotConfined(relative) from error
            os.close(directory)
            directory = child
        try:
            fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=directory)
        except OSError as error:
            raise NotConfined(relative) from error
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotConfined(relative)
    os.set_blocking(fd, True)
    return fd


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    """What tells that a copied file was not touched: same inode, ctime (a command cannot set
    it back), and, for kernels whose timestamps are coarse, same mtime and size."""
    return info.st_ino, info.st_ctime_ns, info.st_mtime_ns, info.st_size


def _younger_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def _make_readable(root: Path) -> None:
    """Give the owner read (and search) access everywhere (``chmod 000`` by a command).

    A server that is not root would otherwise fail to copy or archive such files later.
    """
    os.chmod(root, stat.S_IMODE(root.lstat().st_mode) | 0o700)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode) | 0o700)
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, stat.S_IMODE(mode) | 0o600)


def _as_student(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 1000
    info.uname = info.gname = "student"
    return info


def _walk(root: Path) -> Iterator[tuple[Path, str, os.stat_result]]:
    """``(path, path relative to root, lstat)`` of every entry, parents before children."""
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                relative = f"{prefix}{entry.name}"
                entry_stat = entry.stat(follow_symlinks=False)
                yield Path(entry.path), relative, entry_stat
                if stat.S_ISDIR(entry_stat.st_mode):
                    stack.append((Path(entry.path), relative + "/"))


def _walk_stats(root: Path) -> Iterator[os.stat_result]:
    for _, _, entry_stat in _walk(root):
        yield entry_stat


def _copy_file(
    source: Path, target: Path, source_stat: os.stat_result, uid: int, gid: int
) -> os.stat_result:
    """Copy in the kernel (reflinks where the file system has them); returns the copy's stat."""
    mode = stat.S_IMODE(source_stat.st_mode) | 0o600
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            remaining = source_stat.st_size
            while remaining > 0:
                copied = os.copy_file_range(src.fileno(), fd, remaining)
                if copied == 0:
                    break
                remaining -= copied
            if uid >= 0:
                os.fchown(fd, uid, gid)
            os.utime(fd, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))
            return os.fstat(fd)
        finally:
            os.close(fd)


def _read_expire(meta: Path) -> float | None:
    try:
        value = json.loads(meta.read_text())["expire"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as error:
        if error.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, error)
