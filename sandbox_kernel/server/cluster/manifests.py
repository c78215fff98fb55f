"""Environment manifests (format 1): built from a saved directory, published, materialised.

A manifest lists an environment's entries in walk order (a folder before its content, as
:func:`..trees.walk` yields them), in compact JSON (design B5)::

    {"format": 1, "uuid": "…", "created": 1795000000.1, "expire": 1795086400.1,
     "base": "<uuid of the base environment, or null>", "bytes": 52000123, "inodes": 1003,
     "entries": [["d", "src", 493, 1795000000000000000],
                 ["f", "src/main.c", 420, 1795000000000000000, 1234, "9f86d0…"],
                 ["l", "latest", "src/main.c"],
                 ["h", "copy.c", "src/main.c"]]}

``d``: a folder (mode, mtime in ns); ``f``: a file (mode, mtime in ns, size, sha256 of the
content, stored as the blob ``blobs/<sha256>``); ``l``: a symlink (its target, kept as it was:
the sandbox may link anywhere, and nothing here ever follows a link); ``h``: a hard link to an
earlier ``f``. ``bytes`` and ``inodes`` count the ``f`` sizes and the entries but ``h``.

**A manifest read from the bucket is untrusted**, as an uploaded archive is: anyone who can
write to the bucket could have written it. :meth:`Manifest.parse` refuses, before anything is
downloaded or written, every path that is absolute, holds ``..``, ``.``, an empty component or
NUL, appears twice, or whose folder is not a ``d`` entry met just before in walk order (so no
entry can be written through a symlink or a file), ``h`` entries that do not name an earlier
``f``, and more entries or bytes than the limits. :func:`materialise` then creates every entry
by descriptor, one component at a time, with ``O_NOFOLLOW``/``O_EXCL``, in a fresh staging
folder renamed into place at the end: a refusal at any point leaves nothing behind, and
nothing is ever written outside the staging folder. Every blob's sha256 is checked as it is
downloaded; modes lose their set-id and sticky bits.

Files of materialised environments are hard links to a local **blob cache** (one file per
sha256), so that a session's successive environments and the environments of a class store
a file once, as :class:`..storage.Storage`'s own deduplication does. A cached blob carries the
mode and mtime of its first use; an entry with other ones, or a second entry with the same
content in one environment (hard links would change what a download shows), gets a copy.

All functions block on the file system and the network: call them from threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...protocol import is_uuid
from .. import trees
from ..storage import open_beneath
from .objects import ObjectStore, ObjectStoreError

FORMAT = 1
#: Parallel transfers of one publish or materialise (design B5: 8 threads measured 2.4x 1).
THREADS = 8
#: Blobs at least this large are looked up (HEAD) before being uploaded, to skip those another
#: environment stored (a shared course file). Smaller ones are simply put: on moto a HEAD
#: costs as much as the PUT of a small blob (3 ms each), a carried cell's new content is
#: almost never stored already, and a blob put again is the same object.
HEAD_FROM = 64 * 1024
_READ_CHUNK = 1024 * 1024
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIGEST_CHARS = frozenset("0123456789abcdef")
#: Bytes of a symlink target (Linux's PATH_MAX, with its NUL).
_MAX_LINK = 4095
_NAME_MAX = 255
_NS_LIMIT = 2**63


class ManifestError(ValueError):
    """A manifest that cannot be accepted; the message says which entry and why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one environment may hold (``--workdir-inodes`` and ``--workdir-quota``)."""

    entries: int = 100_000
    bytes: int = 1024**3


#: The defaults of ``sandbox-kernel serve``.
DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class Folder:
    path: str
    mode: int
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class File:
    path: str
    mode: int
    mtime_ns: int
    size: int
    digest: str


@dataclasses.dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclasses.dataclass(frozen=True)
class HardLink:
    path: str
    target: str  # the path of an earlier File


Entry = Folder | File | Symlink | HardLink


@dataclasses.dataclass(frozen=True)
class Manifest:
    uuid: str
    created: float
    expire: float
    base: str | None
    entries: tuple[Entry, ...]
    #: The limits :func:`check_entries` passed it with (by :meth:`parse`), if any.
    checked: Limits | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def stored_bytes(self) -> int:
        return sum(entry.size for entry in self.entries if isinstance(entry, File))

    @property
    def inodes(self) -> int:
        return sum(1 for entry in self.entries if not isinstance(entry, HardLink))

    def files(self) -> dict[str, File]:
        """Every file by path, hard links included (as the file they link to)."""
        files: dict[str, File] = {}
        for entry in self.entries:
            if isinstance(entry, File):
                files[entry.path] = entry
            elif isinstance(entry, HardLink) and entry.target in files:
                files[entry.path] = files[entry.target]
        return files

    def digests(self) -> set[str]:
        return {entry.digest for entry in self.entries if isinstance(entry, File)}

    @functools.cached_property
    def by_path(self) -> dict[str, Entry]:
        """Every entry by its path, made once (a front looks files up in cached manifests)."""
        return {entry.path: entry for entry in self.entries}

    def expired(self, now: float | None = None) -> bool:
        """Past its ``expire``: every reader treats it as absent (the server's rule)."""
        return self.expire <= (time.time() if now is None else now)

    def to_json(self) -> bytes:
        document = {
            "format": FORMAT,
            "uuid": self.uuid,
            "created": self.created,
            "expire": self.expire,
            "base": self.base,
            "bytes": self.stored_bytes,
            "inodes": self.inodes,
            "entries": [_entry_to_list(entry) for entry in self.entries],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def parse(
        cls, data: bytes, limits: Limits = DEFAULT_LIMITS, *, uuid: str | None = None
    ) -> Manifest:
        """Read and check an untrusted manifest (``uuid``: the one it must describe)."""
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as error:
            raise ManifestError(f"the manifest is not valid JSON ({error})") from None
        if not isinstance(document, dict):
            raise ManifestError("the manifest is not a JSON object")
        if document.get("format") != FORMAT:
            raise ManifestError(
                f"the manifest has format {document.get('format')!r}, and this server reads "
                f"format {FORMAT}: upgrade the workers and fronts together"
            )
        found = document.get("uuid")
        if not is_uuid(found) or (uuid is not None and str(found).lower() != uuid.lower()):
            raise ManifestError(f"the manifest names the environment {found!r}, not {uuid!r}")
        base = document.get("base")
        if base is not None and not is_uuid(base):
            raise ManifestError(f"the manifest's base {base!r} is not a uuid")
        raw = document.get("entries")
        if not isinstance(raw, list):
            raise ManifestError("the manifest has no list of entries")
        if len(raw) > limits.entries:
            raise ManifestError(
                f"the manifest lists {len(raw)} entries, more than the {limits.entries} an "
                "environment may hold (--workdir-inodes)"
            )
        manifest = cls(
            uuid=str(found).lower(),
            created=_number(document.get("created"), "created"),
            expire=_number(document.get("expire"), "expire"),
            base=base.lower() if isinstance(base, str) else None,
            entries=tuple(_entry_from_list(item) for item in raw),
        )
        check_entries(manifest.entries, limits)
        manifest = dataclasses.replace(manifest, checked=limits)
        if (document.get("bytes"), document.get("inodes")) != (
            manifest.stored_bytes,
            manifest.inodes,
        ):
            raise ManifestError(
                f"the manifest says {document.get('bytes')!r} bytes and "
                f"{document.get('inodes')!r} inodes, but its entries hold {manifest.stored_bytes} "
                f"and {manifest.inodes}: it is damaged"
            )
        return manifest


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"the manifest's {name!r} is not a time: {value!r}")
    return float(value)


def _entry_to_list(entry: Entry) -> list[Any]:
    if isinstance(entry, Folder):
        return ["d", entry.path, entry.mode, entry.mtime_ns]
    if isinstance(entry, File):
        return ["f", entry.path, entry.mode, entry.mtime_ns, entry.size, entry.digest]
    if isinstance(entry, Symlink):
        return ["l", entry.path, entry.target]
    return ["h", entry.path, entry.target]


_SHAPES: dict[str, tuple[type, ...]] = {
    "d": (str, int, int),
    "f": (str, int, int, int, str),
    "l": (str, str),
    "h": (str, str),
}


def _entry_from_list(item: object) -> Entry:
    shape = _SHAPES.get(item[0]) if isinstance(item, list) and item else None
    if shape is None or not isinstance(item, list) or len(item) != len(shape) + 1:
        raise ManifestError(f"the manifest has an entry of unknown shape: {_shown(item)}")
    values = item[1:]
    if any(
        isinstance(value, bool) or not isinstance(value, kind)
        for value, kind in zip(values, shape, strict=True)
    ):
        raise ManifestError(f"the manifest has an entry of unknown shape: {_shown(item)}")
    kind = item[0]
    if kind == "d":
        return Folder(values[0], values[1], values[2])
    if kind == "f":
        return File(values[0], values[1], values[2], values[3], values[4])
    if kind == "l":
        return Symlink(values[0], values[1])
    return HardLink(values[0], values[1])


def _shown(item: object) -> str:
    text = json.dumps(item)
    return text if len(text) <= 200 else text[:200] + "…"


def check_entries(entries: Sequence[Entry], limits: Limits) -> None:
    """Refuse entries that could write outside their environment, or hold too much.

    Walk order is required: an entry's folder is the root or a folder entered by a ``d``
    entry on the current chain (the folders met since, and not left). So every entry is
    created in a folder this manifest made, never through a symlink or a file, and a folder,
    once left, is never written again."""
    if len(entries) > limits.entries:
        raise ManifestError(
            f"the manifest lists {len(entries)} entries, more than the {limits.entries} an "
            "environment may hold (--workdir-inodes)"
        )
    seen: set[str] = set()
    files: set[str] = set()
    chain: list[str] = []
    total = 0
    for entry in entries:
        parts = checked_path(entry.path)
        if entry.path in seen:
            raise ManifestError(f"the manifest lists {entry.path!r} twice")
        seen.add(entry.path)
        folder = parts[:-1]
        if chain[: len(folder)] != folder:
            raise ManifestError(
                f"the manifest's entry {entry.path!r} is not in a folder listed just before it "
                "(entries go in walk order, each folder before its content)"
            )
        chain = folder
        if isinstance(entry, Folder):
            chain = parts
            _check_mode(entry.path, entry.mode)
            _check_time(entry.path, entry.mtime_ns)
        elif isinstance(entry, File):
            _check_mode(entry.path, entry.mode)
            _check_time(entry.path, entry.mtime_ns)
            _check_file(entry)
            total += entry.size
            if total > limits.bytes:
                raise ManifestError(
                    f"the manifest's files hold more than {limits.bytes} bytes, the most an "
                    "environment may (--workdir-quota)"
                )
            files.add(entry.path)
        elif isinstance(entry, Symlink):
            _check_link_target(entry)
        elif entry.target not in files:
            raise ManifestError(
                f"the manifest's hard link {entry.path!r} names {entry.target!r}, which is not "
                "a file listed before it"
            )


def checked_path(path: str) -> list[str]:
    """The components of an entry's path; refuses anything but a plain relative path."""
    parts = path.split("/")
    bad = (
        not path
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
        or any(len(os.fsencode(part)) > _NAME_MAX for part in parts)
    )
    if bad:
        raise ManifestError(
            f"the manifest's entry {path[:200]!r} is not a plain relative path inside the "
            "environment (absolute, '..', '.', an empty or too long name, or NUL)"
        )
    return parts


def _check_mode(path: str, mode: int) -> None:
    if not 0 <= mode <= 0o7777:
        raise ManifestError(f"the manifest's entry {path!r} has the mode {mode}, not a mode")


def _check_time(path: str, mtime_ns: int) -> None:
    if not -_NS_LIMIT < mtime_ns < _NS_LIMIT:
        raise ManifestError(f"the manifest's entry {path!r} has an impossible time")


def _check_file(entry: File) -> None:
    if entry.size < 0 or len(entry.digest) != 64 or not set(entry.digest) <= _DIGEST_CHARS:
        raise ManifestError(
            f"the manifest's file {entry.path!r} has a negative size or a sha256 that is not "
            "64 lower-case hex digits"
        )


def _check_link_target(entry: Symlink) -> None:
    if not entry.target or "\0" in entry.target or len(os.fsencode(entry.target)) > _MAX_LINK:
        raise ManifestError(
            f"the manifest's symlink {entry.path!r} has an empty, too long or invalid target"
        )


# -- building and publishing -----------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    """A manifest built from a directory, and where to read each of its new contents."""

    manifest: Manifest
    #: For each sha256 the base manifest does not have: one file holding it (relative path).
    new_blobs: dict[str, File]
    #: Files hashed (the others reused the base manifest's sha256).
    hashed: int = 0


def build(
    directory: Path,
    uuid: str,
    *,
    expire: float,
    created: float | None = None,
    base: Manifest | None = None,
    base_directory: Path | None = None,
    found: Callable[[File], None] | None = None,
) -> Built:
    """The manifest of a saved environment directory.

    ``found(entry)`` is told each new content as soon as it is hashed (once per sha256), so
    that uploads run while the walk goes on.

    A file keeps the base manifest's sha256 without being read when it is the same inode as
    the base environment's file at the same path (``base_directory``), with the same size and
    mtime: saving links every file a run did not change to its base's file (the identity
    :class:`..storage.Snapshot` records), and a saved environment is never modified.
    """
    known = base.files() if base is not None else {}
    old_digests = base.digests() if base is not None else set()
    entries: list[Entry] = []
    new_blobs: dict[str, File] = {}
    first_paths: dict[tuple[int, int], str] = {}
    hashed = 0
    shadow = trees.Shadow(base_directory) if base_directory is not None and known else None
    folder = trees.open_folder(directory)
    try:
        for item in trees.walk(folder, events=True):
            if shadow is not None:
                shadow.follow(item)
            info = item.info
            if info is None:
                continue
            mode, path = info.st_mode, item.relative
            if stat.S_ISDIR(mode):
                entries.append(Folder(path, stat.S_IMODE(mode), info.st_mtime_ns))
            elif stat.S_ISLNK(mode):
                entries.append(Symlink(path, os.readlink(item.name, dir_fd=item.folder)))
            elif stat.S_ISREG(mode):
                identity = (info.st_dev, info.st_ino)
                if info.st_nlink > 1 and identity in first_paths:
                    entries.append(HardLink(path, first_paths[identity]))
                    continue
                first_paths[identity] = path
                digest = _reused_digest(item, info, known.get(path), shadow)
                if digest is None:
                    digest = _sha256_of(item)
                    hashed += 1
                entry = File(path, stat.S_IMODE(mode), info.st_mtime_ns, info.st_size, digest)
                entries.append(entry)
                if digest not in old_digests and digest not in new_blobs:
                    new_blobs[digest] = entry
                    if found is not None:
                        found(entry)
            # FIFOs, sockets and devices are never saved (Storage drops them).
    finally:
        os.close(folder)
        if shadow is not None:
            shadow.close()
    made = time.time() if created is None else created
    base_uuid = base.uuid if base is not None else None
    manifest = Manifest(uuid.lower(), made, expire, base_uuid, tuple(entries))
    return Built(manifest, new_blobs, hashed)


def _reused_digest(
    item: trees.Entry, info: os.stat_result, known: File | None, shadow: trees.Shadow | None
) -> str | None:
    if known is None or shadow is None or shadow.here is None:
        return None
    if (known.size, known.mtime_ns) != (info.st_size, info.st_mtime_ns):
        return None
    try:
        there = os.stat(item.name, dir_fd=shadow.here, follow_symlinks=False)
    except OSError:
        return None
    same = (there.st_dev, there.st_ino) == (info.st_dev, info.st_ino)
    return known.digest if same else None


def _sha256_of(item: trees.Entry) -> str:
    fd = os.open(item.name, _FILE_FLAGS, dir_fd=item.folder)
    try:
        os.set_blocking(fd, True)
        hasher = hashlib.sha256()
        while chunk := os.read(fd, _READ_CHUNK):
            hasher.update(chunk)
        return hasher.hexdigest()
    finally:
        os.close(fd)


@dataclasses.dataclass
class Published:
    manifest: Manifest
    hashed: int  # files read to hash them
    uploaded: int  # blobs PUT
    present: int  # new blobs the bucket already had (found by HEAD)


def publish(
    directory: Path,
    uuid: str,
    base: Manifest | None,
    store: ObjectStore,
    *,
    expire: float,
    created: float | None = None,
    base_directory: Path | None = None,
    threads: int = THREADS,
    head_from: int = HEAD_FROM,
) -> Published:
    """Store a saved environment in the bucket: its missing blobs, then its manifest.

    Only contents the base manifest does not list are considered; of those, blobs of at least
    ``head_from`` bytes are looked up first (another environment, another student's, may have
    stored them), the rest are simply put, while the tree is still being hashed. The manifest
    is put last: a manifest in the bucket names only stored blobs, so a worker that dies in
    the middle of a save leaves no environment that cannot be read. Returns what was done
    (for logs and tests).
    """
    pool = _pool(threads)
    uploads: list[Future[bool]] = []

    def upload(entry: File) -> None:
        uploads.append(pool.submit(_upload, directory, entry, store, head_from))

    try:
        built = build(
            directory,
            uuid,
            expire=expire,
            created=created,
            base=base,
            base_directory=base_directory,
            found=upload,
        )
        outcomes = [future.result() for future in uploads]
    except BaseException:
        _settle(uploads)
        raise
    store.put_manifest(built.manifest.uuid, built.manifest.to_json())
    uploaded = sum(outcomes)
    return Published(built.manifest, built.hashed, uploaded, len(outcomes) - uploaded)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """The threads that talk to the bucket, kept for the process's life: a save on the hot
    path of every carried cell must not start threads."""
    return ThreadPoolExecutor(threads, thread_name_prefix="sk-blobs")


def _settle(futures: list[Future[Any]]) -> None:
    """Wait for uploads already started (their errors are the caller's to report)."""
    for future in futures:
        future.cancel()
    for future in futures:
        if not future.cancelled():
            with contextlib.suppress(BaseException):
                future.result()


def _upload(directory: Path, entry: File, store: ObjectStore, head_from: int) -> bool:
    """Put one blob unless the bucket has it; True if it was put."""
    if entry.size >= head_from and store.has_blob(entry.digest):
        return False
    fd = open_beneath(directory, entry.path)
    with os.fdopen(fd, "rb") as source:
        store.put_blob(entry.digest, source, entry.size)
    return True


def _in_threads(work: Any, items: list[Any], threads: int) -> list[Any]:
    """``work(item)`` for every item, ``threads`` at a time; the first error is raised."""
    if len(items) <= 1 or threads <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="sk-blobs") as pool:
        return list(pool.map(work, items))


# -- materialising ---------------------------------------------------------------------------------


def read_manifest(
    store: ObjectStore, uuid: str, limits: Limits = DEFAULT_LIMITS
) -> Manifest | None:
    """The checked manifest of ``uuid`` from the bucket; None if absent or expired."""
    data = store.get_manifest(uuid)
    if data is None:
        return None
    manifest = Manifest.parse(data, limits, uuid=uuid)
    return None if manifest.expired() else manifest


def materialise(
    manifest: Manifest,
    store: ObjectStore,
    target: Path,
    blob_cache: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    threads: int = THREADS,
) -> int:
    """Create the environment ``manifest`` describes as the new directory ``target``.

    Missing blobs are downloaded into ``blob_cache`` (checked against their sha256), the tree
    is built in a staging folder beside ``target`` and renamed into place: ``target`` appears
    whole or not at all. ``blob_cache`` must be on the file system of ``target`` (files are
    hard links to it). Returns the number of blobs downloaded. If ``target`` appears
    meanwhile (another thread materialised it), that one is kept.
    """
    if manifest.checked != limits:
        check_entries(manifest.entries, limits)
    blob_cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache = trees.open_folder(blob_cache)
    try:
        downloaded = _fetch_missing(manifest, store, cache, threads)
        staging = target.parent / f".{target.name}.{os.urandom(6).hex()}.staging"
        links = target.parent / f".{target.name}.{os.urandom(6).hex()}.links"
        staging.mkdir(mode=0o700)
        try:
            _Builder(manifest, cache, staging, links).build()
            try:
                os.rename(staging, target)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                    raise
        finally:
            trees.remove_quietly(staging)
            trees.remove_quietly(links)
    finally:
        os.close(cache)
    return downloaded


def _fetch_missing(manifest: Manifest, store: ObjectStore, cache: int, threads: int) -> int:
    wanted: dict[str, File] = {}
    for entry in manifest.entries:
        fresh = isinstance(entry, File) and entry.digest not in wanted
        if fresh and isinstance(entry, File) and _cached(cache, entry) is None:
            wanted[entry.digest] = entry
    _in_threads(lambda entry: _download(entry, store, cache), list(wanted.values()), threads)
    return len(wanted)


def _cached(cache: int, entry: File) -> os.stat_result | None:
    """The cached blob of ``entry`` if it is there, a regular file of the right size."""
    try:
        info = os.stat(entry.digest, dir_fd=cache, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return info if stat.S_ISREG(info.st_mode) and info.st_size == entry.size else None


def _download(entry: File, store: ObjectStore, cache: int) -> None:
    """Fetch a blob into the cache (checked), with the mode and mtime of ``entry``.

    Written under a temporary name, then linked in: a cached blob never changes once there
    (two workers or threads fetching one blob keep the first)."""
    partial = f".{entry.digest}.{os.urandom(6).hex()}.part"
    fd = os.open(partial, _NEW_FILE_FLAGS, 0o600, dir_fd=cache)
    try:
        try:
            with os.fdopen(os.dup(fd), "wb") as into:
                store.get_blob(entry.digest, into, size=entry.size)
            _set_file_attributes(fd, entry)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(partial, entry.digest, src_dir_fd=cache, dst_dir_fd=cache,
                    follow_symlinks=False)  # fmt: skip
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=cache)
    if _cached(cache, entry) is None:
        raise ObjectStoreError(
            "corrupt",
            f"the blob cache holds {entry.digest} with another size than {entry.size}: remove "
            "that file from the worker's blob cache",
        )


def _file_mode(entry: File) -> int:
    """No set-id or sticky bits, and the owner can always read and replace it."""
    return (entry.mode & 0o777) | 0o600


def _set_file_attributes(fd: int, entry: File) -> None:
    os.fchmod(fd, _file_mode(entry))
    with contextlib.suppress(OverflowError, OSError):  # an absurd time: left as it is
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


class _Builder:
    """Creates the entries of a checked manifest under ``staging``, by descriptor.

    One folder descriptor is held (climbing back with ``..``, which is safe: the staging
    folder is this process's own, fresh, and nobody else writes there), so any depth works.
    """

    def __init__(self, manifest: Manifest, cache: int, staging: Path, links: Path) -> None:
        self.manifest = manifest
        self.cache = cache
        self.staging = staging
        self.links_path = links
        self.links: int | None = None
        #: Cached blobs already linked into this environment (a second use is a copy).
        self.used: set[int] = set()
        #: Files some ``h`` entry links to: (folder descriptor, name) holding their inode.
        self.targets: dict[str, tuple[int, str]] = {}
        self.linked_to = {e.target for e in manifest.entries if isinstance(e, HardLink)}
        self.folders: list[Folder] = []  # the chain's own entries, to finish on the way up

    def build(self) -> None:
        current = trees.open_folder(self.staging)
        try:
            for entry in self.manifest.entries:
                parts = entry.path.split("/")
                current = self._climb(current, len(parts) - 1)
                current = self._create(current, entry, parts[-1])
            current = self._climb(current, 0)
        finally:
            os.close(current)
            if self.links is not None:
                os.close(self.links)

    def _climb(self, current: int, depth: int) -> int:
        while len(self.folders) > depth:
            above = os.open("..", trees.FOLDER_FLAGS, dir_fd=current)
            folder = self.folders.pop()
            os.fchmod(current, (folder.mode & 0o777) | 0o700)
            with contextlib.suppress(OverflowError, OSError):
                os.utime(current, ns=(folder.mtime_ns, folder.mtime_ns))
            os.close(current)
            current = above
        return current

    def _create(self, current: int, entry: Entry, name: str) -> int:
        try:
            if isinstance(entry, Folder):
                os.mkdir(name, 0o700, dir_fd=current)
                below = os.open(name, trees.FOLDER_FLAGS, dir_fd=current)
                os.close(current)
                self.folders.append(entry)
                return below
            if isinstance(entry, File):
                self._file(current, entry, name)
            elif isinstance(entry, Symlink):
                os.symlink(entry.target, name, dir_fd=current)
            else:
                source_folder, source_name = self.targets[entry.target]
                os.link(source_name, name, src_dir_fd=source_folder, dst_dir_fd=current,
                        follow_symlinks=False)  # fmt: skip
        except FileExistsError:
            raise ManifestError(f"the manifest lists {entry.path!r} twice") from None
        return current

    def _file(self, current: int, entry: File, name: str) -> None:
        if entry.path in self.linked_to:
            folder, source = self._link_target(entry)
            self.targets[entry.path] = (folder, source)
            os.link(source, name, src_dir_fd=folder, dst_dir_fd=current, follow_symlinks=False)
        elif not self._link_cached(entry, current, name):
            self._copy_cached(entry, current, name)

    def _link_cached(self, entry: File, folder: int, name: str) -> bool:
        """Link the cached blob if it has the entry's mode and mtime and is not used yet."""
        info = _cached(self.cache, entry)
        if (
            info is None
            or info.st_ino in self.used
            or stat.S_IMODE(info.st_mode) != _file_mode(entry)
            or info.st_mtime_ns != entry.mtime_ns
        ):
            return False
        try:
            os.link(entry.digest, name, src_dir_fd=self.cache, dst_dir_fd=folder,
                    follow_symlinks=False)  # fmt: skip
        except OSError as error:
            if error.errno in (errno.EMLINK, errno.ENOENT, errno.EXDEV):
                return False  # too many links already, evicted meanwhile, elsewhere
            raise
        linked = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if linked.st_ino != info.st_ino:  # evicted and fetched again in between
            os.unlink(name, dir_fd=folder)
            return False
        self.used.add(info.st_ino)
        return True

    def _copy_cached(self, entry: File, folder: int, name: str) -> None:
        source = os.open(entry.digest, _FILE_FLAGS, dir_fd=self.cache)
        try:
            copy = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=folder)
            try:
                remaining = entry.size
                while remaining > 0:
                    done = os.copy_file_range(source, copy, remaining)
                    if done == 0:
                        raise ObjectStoreError(
                            "corrupt",
                            f"the cached blob {entry.digest} is shorter than {entry.size} "
                            "bytes: remove it from the worker's blob cache",
                        )
                    remaining -= done
                _set_file_attributes(copy, entry)
            finally:
                os.close(copy)
        finally:
            os.close(source)

    def _link_target(self, entry: File) -> tuple[int, str]:
        """Where the inode of a file that ``h`` entries link to lives: the cached blob, or a
        copy in a side folder (removed at the end; the inode stays in the environment)."""
        if self.links is None:
            self.links_path.mkdir(mode=0o700)
            self.links = trees.open_folder(self.links_path)
        name = str(len(self.targets))
        if self._link_cached(entry, self.links, name):
            return self.links, name
        self._copy_cached(entry, self.links, name)
        return self.links, name
