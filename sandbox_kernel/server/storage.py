"""Saved environments, kept as plain directories under the data dir.

Layout of the data dir::

    environments/<uuid>/       the saved working directory (never modified once saved)
    environments/<uuid>.json   {"expire": <unix time>}
    work/<pid>/<runner>/       working directories of runners (bound as /home/student); in a
                               private /var/tmp folder instead when the sandbox user cannot
                               reach the data dir
    staging/<pid>/<id>/        uploads waiting for a slot, saves crossing file systems
    cache/<uuid>.tgz           archives built for downloads
    server-id                  the server's identity (``specifications/``' ``server_id``)

A run starts from a *copy* of its base environment (so saved environments stay immutable
whatever the commands do), and saving a run links every file it did not touch to the base's
file instead of storing it again: a notebook of 100 cells over a 50 MB environment stores the
50 MB once. Unchanged is decided by inode and ctime, which a command cannot set back.

Trees are handled by descriptor (:mod:`.trees`): a command may leave folders of any depth and
paths longer than ``PATH_MAX``. Quotas count bytes and inodes.

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
import stat
import tarfile
import tempfile
import threading
import time
import uuid as uuid_module
from pathlib import Path

from ..protocol import is_uuid
from . import trees
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
    """What a working directory was filled with: the base environment, and for each copied
    file (by relative path) the identity of the copy (see :func:`_identity`)."""

    base: Path | None = None
    files: dict[str, tuple[int, int, int, int]] = dataclasses.field(default_factory=dict)


class Storage:
    def __init__(self, settings: ServerSettings, root: Path) -> None:
        self.settings = settings
        self.root = root
        self.environments = root / "environments"
        self.work = root / "work"
        self.staging = root / "staging"
        self.cache = root / "cache"
        #: Bytes and inodes of all saved environments (files linked between them once).
        self.used = 0
        self.used_inodes = 0
        #: With --hub-auth: [bytes, inodes] of each user's saved environments (what each save
        #: added, as --max-storage counts it; recounted at start).
        self.used_by: dict[str, list[int]] = {}
        #: Random, made once per data dir: clients key what they remember of this server by
        #: it (its port changes at each start). Set by :meth:`open`.
        self.server_id = ""
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
        self.work = _work_area(self.root, sandbox_uid)
        for leftover in self.staging.iterdir():
            if not _owned_by_live_server(leftover.name):
                _remove(leftover)
        own_staging = _own_folder(self.staging / str(os.getpid()), 0o700)
        self.staging = own_staging or _new_private_folder(self.staging, "")
        self.sweep()
        self.used, self.used_inodes = _stored(self.environments)
        self.used_by = _stored_by_owner(self.environments)
        self.server_id = _server_id(self.root / "server-id")

    def close(self) -> None:
        """Remove this server's working and staging folders (its runners are gone)."""
        for directory in (self.work, self.staging):
            _remove(directory)

    def sweep(self) -> int:
        """Delete expired environments (and orphans of a crash). Returns how many went."""
        now = time.time()
        removed = 0
        names = {entry.name.removesuffix(".json") for entry in self.environments.iterdir()}
        for name in names:
            with self._lock:  # a save describes, then renames its directory under this lock
                expire, owner = _read_description(self.environments / f"{name}.json")
                if expire is not None and expire > now and (self.environments / name).is_dir():
                    continue
                if (
                    expire is not None
                    and expire > now
                    and _younger_than(self.environments / f"{name}.json", _SAVE_GRACE)
                ):
                    continue  # another server sharing the data dir is saving it right now
                doomed = self._detach(name)
            self._delete(doomed, owner)
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

    def _delete(self, directory: Path | None, owner: str | None = None) -> None:
        if directory is None:
            return
        freed = trees.usage(directory, only_unshared=True)
        _remove(directory)
        with self._lock:
            self.used = max(0, self.used - freed.bytes)
            self.used_inodes = max(0, self.used_inodes - freed.inodes - 1)
            if owner in self.used_by:
                account = self.used_by[owner]
                account[0] = max(0, account[0] - freed.bytes)
                account[1] = max(0, account[1] - freed.inodes - 1)

    # -- lookups ------------------------------------------------------------------------------

    def directory(self, uuid: str, user: str | None = None) -> Path | None:
        """The directory of a saved, unexpired environment, or None (unknown, expired, junk,
        or, for a JupyterHub ``user``, another user's: as unknown to them as a wrong uuid)."""
        if not is_uuid(uuid):
            return None
        uuid = uuid.lower()
        expire, owner = _read_description(self.environments / f"{uuid}.json")
        directory = self.environments / uuid
        if expire is None or expire <= time.time() or not directory.is_dir():
            return None
        if user is not None and owner != user:
            return None
        return directory

    def stored_by(self, user: str) -> int:
        """Bytes of ``user``'s saved environments (``usages/``)."""
        with self._lock:
            return self.used_by.get(user, [0, 0])[0]

    # -- a run's working directory --------------------------------------------------------------

    def populate(self, base: Path, workdir: Path, uid: int, gid: int) -> Snapshot:
        """Copy a saved environment into an empty working directory owned by ``uid``."""
        snapshot = Snapshot(base=base)

        def remember(entry: trees.Entry, copy: os.stat_result) -> None:
            snapshot.files[entry.relative] = _identity(copy)

        owner = (uid, gid) if os.geteuid() == 0 else None
        trees.copy_tree(base, workdir, owner, remember)
        return snapshot

    def usage_of(self, workdir: Path) -> trees.Usage:
        """Bytes and inodes in a working directory (hard links counted once)."""
        return trees.usage(workdir)

    def save(
        self, workdir: Path, snapshot: Snapshot, owner: str | None = None
    ) -> tuple[str, float]:
        """Turn a finished run's working directory into a new saved environment, ``owner``'s
        (a JupyterHub user's) if given.

        The directory is moved, not copied; files the run did not change become links to the
        base environment's. Raises :class:`StorageFull` rather than evicting anything.
        """
        if os.geteuid() != 0:
            trees.make_owner_accessible(workdir)
        self._check_quota(self.usage_of(workdir))
        new = self._deduplicate(workdir, snapshot)
        with self._lock:
            self._check_room(new)
            if owner is not None:
                self._check_share(owner, new)
                account = self.used_by.setdefault(owner, [0, 0])
                account[0] += new.bytes
                account[1] += new.inodes + 1
            self.used += new.bytes
            self.used_inodes += new.inodes + 1
        name = str(uuid_module.uuid4())
        expire = time.time() + self.settings.expiration
        os.chmod(workdir, 0o700)
        if os.stat(workdir).st_dev != os.stat(self.environments).st_dev:
            moved = self.new_staging() / "environment"
            moved.mkdir(mode=0o700)
            trees.copy_tree(workdir, moved)
            _remove(workdir)
            workdir = moved
        with self._lock:  # description first: a sweep never sees a directory without one
            meta: dict[str, object] = {"expire": expire}
            if owner is not None:
                meta["owner"] = owner
            self._write_json(self.environments / f"{name}.json", meta)
            os.rename(workdir, self.environments / name)
        return name, expire

    def _check_quota(self, used: trees.Usage) -> None:
        settings = self.settings
        if used.bytes > settings.workdir_quota:
            raise StorageFull(
                f"The run left {format_size(used.bytes)} in its working directory, more than "
                f"the quota of {format_size(settings.workdir_quota)} (--workdir-quota). "
                "Nothing was saved: remove files in the commands, or raise the quota."
            )
        if used.inodes > settings.workdir_inodes:
            raise StorageFull(
                f"The run left {used.inodes} files, folders and links in its working "
                f"directory, more than the quota of {settings.workdir_inodes} "
                "(--workdir-inodes). Nothing was saved: remove files in the commands (an "
                "archive holds many as one), or raise the quota."
            )

    def _check_room(self, new: trees.Usage) -> None:
        settings = self.settings
        if self.used + new.bytes > settings.max_storage:
            raise StorageFull(
                f"Saving this environment needs {format_size(new.bytes)} more, and the "
                f"sandbox already stores {format_size(self.used)} of at most "
                f"{format_size(settings.max_storage)} (--max-storage). Nothing was "
                "saved and nothing was evicted: wait for environments to expire, or raise "
                "--max-storage."
            )
        if self.used_inodes + new.inodes + 1 > settings.max_storage_inodes:
            raise StorageFull(
                f"Saving this environment needs {new.inodes + 1} more inodes, and the sandbox "
                f"already stores {self.used_inodes} of at most {settings.max_storage_inodes} "
                "(--max-storage-inodes). Nothing was saved and nothing was evicted: wait for "
                "environments to expire, or raise --max-storage-inodes."
            )

    def _check_share(self, owner: str, new: trees.Usage) -> None:
        """--per-user-storage and --per-user-inodes: one user's saves together."""
        settings = self.settings
        stored, inodes = self.used_by.get(owner, [0, 0])
        if settings.per_user_storage is not None and stored + new.bytes > settings.per_user_storage:
            raise StorageFull(
                f"Saving this environment needs {format_size(new.bytes)} more, and you already "
                f"keep {format_size(stored)} of your share of "
                f"{format_size(settings.per_user_storage)} (--per-user-storage). Nothing was "
                "saved: remove files in the commands, or wait for your older environments to "
                "expire."
            )
        inodes_cap = settings.per_user_inodes
        if inodes_cap is not None and inodes + new.inodes + 1 > inodes_cap:
            raise StorageFull(
                f"Saving this environment needs {new.inodes + 1} more inodes, and you already "
                f"keep {inodes} of your share of {inodes_cap} "
                "(--per-user-inodes). Nothing was saved: remove files in the commands (an "
                "archive holds many as one), or wait for your older environments to expire."
            )

    def _deduplicate(self, workdir: Path, snapshot: Snapshot) -> trees.Usage:
        """Link unchanged files to the base; drop FIFOs and sockets; return what is new."""
        new = trees.Usage()
        seen: set[int] = set()
        shadow = None
        if snapshot.base is not None:
            with contextlib.suppress(OSError):  # the base expired meanwhile: nothing to link
                shadow = trees.Shadow(snapshot.base)
        folder = trees.open_folder(workdir)
        try:
            for entry in trees.walk(folder, events=True):
                if shadow is not None:
                    shadow.follow(entry)
                info = entry.info
                if info is None:  # leaving a folder
                    continue
                mode = info.st_mode
                if not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode) or stat.S_ISREG(mode)):
                    os.unlink(entry.name, dir_fd=entry.folder)
                    continue
                recorded = snapshot.files.get(entry.relative)
                base_folder = shadow.here if shadow is not None else None
                if (
                    stat.S_ISREG(mode)
                    and recorded == _identity(info)
                    and base_folder is not None
                    and _link_to_base(entry, base_folder)
                ):
                    continue
                if not stat.S_ISREG(mode) or info.st_ino not in seen:
                    seen.add(info.st_ino)
                    new.inodes += 1
                    new.bytes += info.st_size if stat.S_ISREG(mode) else 0
        finally:
            os.close(folder)
            if shadow is not None:
                shadow.close()
        return new

    # -- downloads ----------------------------------------------------------------------------

    def archive(self, uuid: str, user: str | None = None) -> Path | None:
        """The environment as a ``.tgz`` (built on first request, then kept a while)."""
        directory = self.directory(uuid, user)
        if directory is None:
            return None
        cached = self.cache / f"{directory.name}.tgz"
        if cached.exists():
            os.utime(cached)
            return cached
        temporary = cached.with_suffix(f".{os.urandom(4).hex()}.tmp")
        try:
            with tarfile.open(temporary, "w:gz", compresslevel=1) as archive:
                trees.add_to_archive(archive, directory, (1000, "student"))
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, cached)
        self._trim_cache()
        return cached

    def _trim_cache(self) -> None:
        # Downloads build and trim in several threads at once: an archive may go between
        # the listing and its stat (a 500 for a class downloading together, before).
        archives = []
        for path in self.cache.glob("*.tgz"):
            with contextlib.suppress(FileNotFoundError):
                archives.append((path.stat().st_mtime, path))
        archives.sort()
        for _mtime, old in archives[:-_CACHED_ARCHIVES]:
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


def _server_id(path: Path) -> str:
    """The id kept in ``path``, made (a uuid4 in hex) the first time. Created atomically: two
    servers starting on one data dir agree on it; a damaged file is replaced."""
    kept = _read_server_id(path)
    if kept:
        return kept
    made = uuid_module.uuid4().hex
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(made + "\n")
    try:
        os.link(temporary, path)  # fails if another server made it meanwhile
    except FileExistsError:
        kept = _read_server_id(path)
        if kept:
            return kept
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return made


def _read_server_id(path: Path) -> str | None:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        kept = path.read_text().strip()
        if len(kept) == 32 and all(char in "0123456789abcdef" for char in kept):
            return kept
    return None


def _work_area(root: Path, uid: int) -> Path:
    """This server's folder for working directories, which ``uid`` can traverse.

    bubblewrap resolves bind sources as the unprivileged user it runs as, so every parent of a
    working directory must be searchable by that user. The data dir usually is (mode 0711):
    then ``work/<pid>``. Under an unsearchable home (``/root``) the folder is made in
    ``/var/tmp`` on the same file system (saving stays a rename), with a random name
    (``mkdtemp``): a folder another user made there in advance is never used, and never
    stops the server from starting.
    """
    shared = _own_folder(root / "work", 0o711)
    if shared is not None:  # what crashed servers left, whichever way they went
        for leftover in shared.iterdir():
            if not _owned_by_live_server(leftover.name):
                _remove(leftover)
    if uid == os.geteuid() or searchable_by(root, uid):
        os.chmod(root, 0o711)
        if shared is not None:
            own = _own_folder(shared / str(os.getpid()), 0o711)
            if own is not None:
                return own
        return _new_private_folder(root, "work-")
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    prefix = f"sandbox-kernel-work-{tag}-"
    device = os.stat(root).st_dev
    for base in (Path("/var/tmp"), Path("/tmp")):
        with contextlib.suppress(OSError):
            if os.stat(base).st_dev == device:
                _sweep_private_folders(base, prefix)
                return _new_private_folder(base, prefix)
    log.warning("working directories are on another file system than %s: saving copies", root)
    _sweep_private_folders(Path("/var/tmp"), prefix)
    return _new_private_folder(Path("/var/tmp"), prefix)


def _own_folder(path: Path, mode: int) -> Path | None:
    """``path`` as a folder of this user with ``mode``, or None if someone else's is there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        log.warning("%s exists and is not this server's: not using it", path)
        return None
    os.chmod(path, mode)
    return path


def _new_private_folder(base: Path, prefix: str) -> Path:
    """A new folder (0711) with a random name, made atomically: ``<prefix><pid>-<random>``."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    os.chmod(path, 0o711)
    return path


def _sweep_private_folders(base: Path, prefix: str) -> None:
    """Remove the folders of crashed servers of this user (their pid is in the name)."""
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            pid = entry.name.removeprefix(prefix).split("-", 1)[0]
            if not entry.name.startswith(prefix) or not pid.isdigit():
                continue
            with contextlib.suppress(OSError):
                info = entry.lstat()
                mine = stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                if mine and not Path(f"/proc/{pid}").exists():
                    _remove(entry)


def _owned_by_live_server(name: str) -> bool:
    """Whether a ``work/`` or ``staging/`` entry is the folder of another running server."""
    return name.isdigit() and int(name) != os.getpid() and Path(f"/proc/{name}").exists()


def _stored(environments: Path) -> tuple[int, int]:
    """Bytes and inodes of all saved environments (a file linked from several once)."""
    seen: set[int] = set()
    stored = trees.Usage()
    for environment in environments.iterdir():
        if environment.is_symlink() or not environment.is_dir():
            continue
        used = trees.usage(environment, seen=seen)
        stored.bytes += used.bytes
        stored.inodes += used.inodes + 1  # and the environment's own folder
    return stored.bytes, stored.inodes


def _stored_by_owner(environments: Path) -> dict[str, list[int]]:
    """[bytes, inodes] of each owner's environments (the files an environment shares with
    another counted with the older one, roughly as saves counted them)."""
    accounts: dict[str, list[int]] = {}
    for meta in environments.glob("*.json"):
        _expire, owner = _read_description(meta)
        directory = environments / meta.name.removesuffix(".json")
        if owner is None or directory.is_symlink() or not directory.is_dir():
            continue
        used = trees.usage(directory, only_unshared=True)
        account = accounts.setdefault(owner, [0, 0])
        account[0] += used.bytes
        account[1] += used.inodes + 1
    return accounts


def _link_to_base(entry: trees.Entry, base_folder: int) -> bool:
    """Replace an unchanged copy by a hard link to the base's file; False if it cannot be."""
    temporary = f".sk-link-{os.urandom(6).hex()}"
    try:
        os.link(entry.name, temporary, src_dir_fd=base_folder, dst_dir_fd=entry.folder,
                follow_symlinks=False)  # fmt: skip
    except OSError:  # another file system, or the base is gone: keep the copy
        return False
    try:
        os.replace(temporary, entry.name, src_dir_fd=entry.folder, dst_dir_fd=entry.folder)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=entry.folder)
        return False
    return True


def searchable_by(path: Path, uid: int) -> bool:
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


def _read_description(meta: Path) -> tuple[float | None, str | None]:
    """An environment's description, read once: when it expires (None: unreadable or junk)
    and the JupyterHub user who saved it (None: saved without --hub-auth)."""
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    expire, owner = data.get("expire"), data.get("owner")
    return (
        float(expire) if isinstance(expire, int | float) else None,
        owner if isinstance(owner, str) else None,
    )


def _remove(path: Path) -> None:
    """Remove a file or a tree of any depth (never following links); log what cannot go."""
    try:
        trees.remove(path)
    except OSError as error:
        if error.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, error)
