"""A worker's storage: the single server's :class:`Storage` as a local cache of the bucket.

(Design B5, B8.) Saving works as on the single server (quota check, deduplication against the
base by hard links, ``environments/<uuid>/``), and then :meth:`ClusterStorage.save` publishes
the new environment (:func:`.manifests.publish`: the new blobs, then the manifest): **the uuid
is returned only once both are stored**, so an answered uuid can be run on any worker. The
worker then registers itself as a holder (``SADD sk:env:<uuid> <worker>``, expiring with the
environment), which the fronts use to route the session's next cell here.

Layout added to the data dir::

    manifests/<uuid>.json   the manifest of each local environment: the next save over it
                            reuses its hashes, so only changed files are read and uploaded.
                            Its mtime is the environment's last use (least recently used
                            eviction). Kept out of ``environments/``, whose sweep would take
                            it for an environment's description.
    blobs/<sha256>          file contents fetched from the bucket, hard-linked into the
                            environments materialised from it (a file is stored once)

A run over an environment this worker does not hold first **materialises** it from the bucket
(:meth:`ClusterStorage.make_local`, called in a thread): the manifest is read as untrusted, the
missing blobs fetched and checked, the tree built in staging and renamed into place. A
manifest missing or past its ``expire`` is absent: :class:`~..executor.EnvironmentNotFound`,
answered 404 with the single server's text.

The local cache is bounded by ``--cache-size`` (default half of ``--max-storage``): past it, the
least recently used environments that no run uses are removed (they stay in the bucket). The
storage quota is cluster-wide: ``--max-storage`` and ``--max-storage-inodes`` count in Redis
(``sk:quota``) what the cluster's saves added to the bucket, reserved atomically by a Lua
script before anything is published; the sweeper recounts it from the bucket.

All methods block: the worker calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ...protocol import is_uuid
from .. import trees
from ..executor import EnvironmentNotFound
from ..settings import ServerSettings, format_size
from ..storage import Snapshot, Storage, StorageFull
from . import keys, manifests
from .objects import ObjectStore

#: Parsed manifests kept in memory: a carried cell's save reads its base's (immutable).
MANIFESTS_KEPT: Final = 64

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ClusterLink:
    """What a worker's storage needs of the cluster: the bucket, Redis, and its own name."""

    store: ObjectStore
    #: A synchronous client (the storage runs in threads).
    redis: redis.Redis
    worker: str


def count_bucket(store: ObjectStore) -> tuple[int, int]:
    """What ``sk:quota`` counts: bytes of every blob and manifest in the bucket, and one inode
    per object (a blob is one file however many environments list it; a manifest stands for
    an environment's folder). The sweeper's recount must use the same rule."""
    size = inodes = 0
    for item in (*store.list_blobs(), *store.list_manifests()):
        size += item.size
        inodes += 1
    return size, inodes


class ClusterStorage(Storage):
    """:class:`Storage` whose saves are published to the bucket, and which fetches from it
    the environments it does not hold."""

    def __init__(self, settings: ServerSettings, root: Path, link: ClusterLink) -> None:
        super().__init__(settings, root)
        self.link = link
        self.manifests = root / "manifests"
        self.blobs = root / "blobs"
        self.cache_size = (
            settings.cache_size if settings.cache_size is not None else settings.max_storage // 2
        )
        self.limits = manifests.Limits(settings.workdir_inodes, settings.workdir_quota)
        #: Environments in use by a run (its base): never evicted meanwhile.
        self._pinned: collections.Counter[str] = collections.Counter()
        self._fetching: dict[str, threading.Lock] = {}
        self._cluster_lock = threading.Lock()
        #: Fetches running: unused blobs are only dropped while none is (a fetched blob
        #: has one link until the new environment links it).
        self._fetches = 0
        #: The quota reserved by the save running in this thread.
        self._saving = threading.local()
        #: Blobs fetched from the bucket since start (tests and logs).
        self.downloaded = 0
        #: The last manifests kept or read, newest last (:data:`MANIFESTS_KEPT`).
        self._recent: collections.OrderedDict[str, manifests.Manifest] = collections.OrderedDict()
        #: How many environments are cached; None: to count again.
        self._count: int | None = None

    def open(self, sandbox_uid: int) -> None:
        super().open(sandbox_uid)
        for folder in (self.manifests, self.blobs):
            folder.mkdir(mode=0o700, exist_ok=True)
        for manifest in self.manifests.glob("*.json"):  # of environments gone meanwhile
            if self.directory(manifest.stem) is None:
                manifest.unlink(missing_ok=True)

    # -- saving -----------------------------------------------------------------------------------

    def save(
        self, workdir: Path, snapshot: Snapshot, owner: str | None = None
    ) -> tuple[str, float]:
        """Save locally, then publish (blobs, then manifest); only then is the uuid returned.
        If publishing fails, the local copy is removed and the reservation given back.
        ``owner`` is always None: a cluster has no JupyterHub users yet."""
        self._saving.reserved = (0, 0)
        try:
            uuid, expire = super().save(workdir, snapshot)
        except BaseException:  # failed after _check_room reserved: give the room back
            self._release(self._saving.reserved)
            raise
        reserved: tuple[int, int] = self._saving.reserved
        directory = self.environments / uuid
        base = self._local_manifest(snapshot.base.name) if snapshot.base is not None else None
        try:
            published = manifests.publish(
                directory,
                uuid,
                base,
                self.link.store,
                expire=expire,
                base_directory=snapshot.base if base is not None else None,
            )
        except BaseException:
            self._forget(uuid)
            self._release(reserved)
            raise
        try:
            keys.commit_quota(self.link.redis, *reserved)
        except Exception as error:  # the sweeper's recount counts it anyway
            log.warning("environment %s: its quota reservation was not settled: %s", uuid, error)
        self._keep_manifest(published.manifest)
        self._register(uuid, expire)
        log.debug(
            "environment %s published: %d files hashed, %d blobs stored, %d already there",
            uuid,
            published.hashed,
            published.uploaded,
            published.present,
        )
        self.evict()
        return uuid, expire

    def _release(self, reserved: tuple[int, int]) -> None:
        """Give back a failed save's reservation (a lost one ends at the next recount)."""
        if reserved == (0, 0):
            return
        try:
            keys.release_quota(self.link.redis, *reserved)
        except Exception as error:
            log.warning("a failed save's quota reservation was not given back: %s", error)

    def _check_room(self, new: trees.Usage) -> None:
        """The cluster-wide quota: reserve the save's new bytes and inodes in ``sk:quota``
        (called under the storage's lock, before anything is stored)."""
        settings = self.settings
        inodes = new.inodes + 1
        outcome = keys.reserve_quota(
            self.link.redis, new.bytes, inodes, settings.max_storage, settings.max_storage_inodes
        )
        if outcome == keys.QUOTA_UNCOUNTED:
            keys.init_quota(self.link.redis, *count_bucket(self.link.store))
            outcome = keys.reserve_quota(
                self.link.redis,
                new.bytes,
                inodes,
                settings.max_storage,
                settings.max_storage_inodes,
            )
        if outcome != keys.QUOTA_RESERVED:
            raise self._full(new.bytes, inodes)
        self._saving.reserved = (new.bytes, inodes)

    def _full(self, size: int, inodes: int) -> StorageFull:
        settings = self.settings
        used, used_inodes = keys.quota_used(self.link.redis)
        if used + size > settings.max_storage:
            return StorageFull(
                f"Saving this environment needs {format_size(size)} more, and the cluster "
                f"already stores {format_size(used)} of at most "
                f"{format_size(settings.max_storage)} (--max-storage, a limit for the whole "
                "cluster, counted in its bucket). Nothing was saved and nothing was evicted: "
                "wait for environments to expire, or raise --max-storage on every worker."
            )
        return StorageFull(
            f"Saving this environment needs {inodes} more inodes, and the cluster already "
            f"stores {used_inodes} of at most {settings.max_storage_inodes} "
            "(--max-storage-inodes, a limit for the whole cluster, counted in its bucket). "
            "Nothing was saved and nothing was evicted: wait for environments to expire, or "
            "raise --max-storage-inodes on every worker."
        )

    def _register(self, uuid: str, expire: float) -> None:
        """Tell the fronts this worker holds ``uuid`` (until it expires)."""
        key = keys.env_key(uuid)
        try:
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.sadd(key, self.link.worker)
            pipe.expireat(key, int(expire) + 1)
            pipe.execute()
        except Exception as error:  # only a routing hint: the run goes on
            log.warning("could not register environment %s in Redis: %s", uuid, error)

    def register_cached(self) -> int:
        """Register again every environment held here (``sk:env:<uuid>``, until it expires):
        after a Redis restart lost the routing hints, the heartbeat calls this so that the
        fronts keep sending a session's cells where its environment is. Returns how many."""
        held: list[tuple[str, float]] = []
        for manifest in self.manifests.glob("*.json"):
            uuid = manifest.stem
            expire = _expire_of(self.environments / f"{uuid}.json")
            if expire is not None and self.directory(uuid) is not None:
                held.append((uuid, expire))
        if held:
            pipe = self.link.redis.pipeline(transaction=False)
            for uuid, expire in held:
                pipe.sadd(keys.env_key(uuid), self.link.worker)
                pipe.expireat(keys.env_key(uuid), int(expire) + 1)
            pipe.execute()
            log.info("registered %d cached environments in Redis again", len(held))
        return len(held)

    # -- materialising ----------------------------------------------------------------------------

    def make_local(self, uuid: str) -> Path:
        """The local directory of ``uuid``, fetched from the bucket if this worker lacks it,
        and pinned (never evicted) until :meth:`unpin`. Raises :class:`EnvironmentNotFound`
        for a uuid the bucket has not (or whose manifest expired), ``ObjectStoreError`` when
        the bucket fails, ``ManifestError`` for a manifest that cannot be trusted."""
        if not is_uuid(uuid):  # as the single server answers a junk uuid: not found
            raise EnvironmentNotFound(uuid)
        uuid = uuid.lower()
        with self._cluster_lock:
            self._pinned[uuid] += 1
            lock = self._fetching.setdefault(uuid, threading.Lock())
        try:
            with lock:
                directory = self.directory(uuid)
                if directory is None:
                    directory = self._fetch(uuid)
            self._touch(uuid)
            return directory
        except BaseException:
            self.unpin(uuid)
            raise

    def unpin(self, uuid: str) -> None:
        with self._cluster_lock:
            self._pinned[uuid.lower()] -= 1
            if self._pinned[uuid.lower()] <= 0:
                del self._pinned[uuid.lower()]
                self._fetching.pop(uuid.lower(), None)

    def _fetch(self, uuid: str) -> Path:
        manifest = manifests.read_manifest(self.link.store, uuid, self.limits)
        if manifest is None:
            raise EnvironmentNotFound(uuid)
        staging = self.new_staging()
        with self._cluster_lock:
            self._fetches += 1
        try:
            target = staging / uuid
            self.downloaded += manifests.materialise(
                manifest, self.link.store, target, self.blobs, limits=self.limits
            )
            usage = trees.usage(target, only_unshared=True)
            with self._lock:  # description first: a sweep never sees a directory without one
                self._write_json(self.environments / f"{uuid}.json", {"expire": manifest.expire})
                os.rename(target, self.environments / uuid)
                self.used += usage.bytes
                self.used_inodes += usage.inodes + 1
        finally:
            with self._cluster_lock:
                self._fetches -= 1
            trees.remove_quietly(staging)
        self._keep_manifest(manifest)
        self._register(uuid, manifest.expire)
        log.info("environment %s fetched from the bucket", uuid)
        self.evict()
        directory = self.directory(uuid)
        if directory is None:  # expired in between
            raise EnvironmentNotFound(uuid)
        return directory

    # -- local manifests and the cache ------------------------------------------------------------

    def _keep_manifest(self, manifest: manifests.Manifest) -> None:
        self._write_json_bytes(self.manifests / f"{manifest.uuid}.json", manifest.to_json())
        self._count = None
        self._remember(manifest)

    def _local_manifest(self, uuid: str) -> manifests.Manifest | None:
        with self._cluster_lock:
            known = self._recent.get(uuid)
        if known is not None:
            return known
        try:
            data = (self.manifests / f"{uuid}.json").read_bytes()
            manifest = manifests.Manifest.parse(data, self.limits, uuid=uuid)
        except (OSError, ValueError) as error:
            log.warning("no usable local manifest for %s (%s): hashing every file", uuid, error)
            return None
        self._remember(manifest)
        return manifest

    def _remember(self, manifest: manifests.Manifest) -> None:
        with self._cluster_lock:
            self._recent[manifest.uuid] = manifest
            self._recent.move_to_end(manifest.uuid)
            while len(self._recent) > MANIFESTS_KEPT:
                self._recent.popitem(last=False)

    def _write_json_bytes(self, path: Path, data: bytes) -> None:
        temporary = self.staging / f"{path.name}.{os.urandom(4).hex()}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, path)

    def _touch(self, uuid: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.manifests / f"{uuid}.json")

    def cached_environments(self) -> int:
        """How many environments this worker holds (the heartbeat and ``usages/`` show it):
        counted again only after a change, since every job asks."""
        count = self._count
        if count is None:
            count = sum(1 for _ in self.manifests.glob("*.json"))
            self._count = count
        return count

    def evict(self) -> int:
        """Remove least recently used environments no run uses until the local cache holds
        at most ``--cache-size`` (they stay in the bucket); blobs no environment links any
        more go too. Returns how many environments went."""
        removed = 0
        if self.used <= self.cache_size:
            return 0
        for uuid in self._by_last_use():
            if self.used <= self.cache_size:
                break
            with self._cluster_lock:
                if self._pinned[uuid] > 0:
                    continue
                self._pinned.pop(uuid, None)
            self._forget(uuid)
            removed += 1
        self._drop_unused_blobs()
        if removed:
            log.info("evicted %d environments from the local cache (--cache-size)", removed)
        return removed

    def _by_last_use(self) -> list[str]:
        used: list[tuple[float, str]] = []
        for manifest in self.manifests.glob("*.json"):
            with contextlib.suppress(OSError):
                used.append((manifest.stat().st_mtime, manifest.stem))
        return [uuid for _, uuid in sorted(used)]

    def _forget(self, uuid: str) -> None:
        """Remove the local copy of ``uuid`` and say so in Redis (the bucket keeps it)."""
        with self._lock:
            doomed = self._detach(uuid)
        self._delete(doomed)
        (self.manifests / f"{uuid}.json").unlink(missing_ok=True)
        self._count = None
        with self._cluster_lock:
            self._recent.pop(uuid, None)
        with contextlib.suppress(Exception):
            self.link.redis.srem(keys.env_key(uuid), self.link.worker)

    def _drop_unused_blobs(self) -> None:
        with self._cluster_lock:
            if self._fetches:
                return
        with contextlib.suppress(OSError), os.scandir(self.blobs) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_nlink == 1:
                        os.unlink(entry.path)

    def sweep(self) -> int:
        """Expired environments go, and their manifests and Redis entries with them."""
        removed = super().sweep()
        for manifest in self.manifests.glob("*.json"):
            if self.directory(manifest.stem) is None and self._pinned[manifest.stem] == 0:
                manifest.unlink(missing_ok=True)
                self._count = None
                with contextlib.suppress(Exception):
                    self.link.redis.srem(keys.env_key(manifest.stem), self.link.worker)
        return removed


def _expire_of(description: Path) -> float | None:
    """The ``expire`` of a local environment's description, None if it cannot be read."""
    try:
        value = json.loads(description.read_text())["expire"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None
