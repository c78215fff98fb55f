"""The bucket's sweep: expired environments, unused blobs, and the cluster's quota (design B8).

Every front runs :meth:`Sweeper.sweep` every ``--sweep-interval`` (in a thread); one at a time
does the work, under ``SET sk:sweep-lock NX PX``. A sweep:

1. lists ``envs/`` and reads each manifest once (they are immutable: kept in memory by uuid);
   those expired more than :data:`GRACE_SECONDS` ago are deleted (every reader already treats
   an expired manifest as absent), and so are objects there that are no manifest at all, once
   older than the grace;
2. marks the blobs the remaining manifests name, **expired ones included**, lists ``envs/``
   again after listing the blobs (a manifest published meanwhile marks its blobs too), and
   deletes the other blobs older than the grace. A save uploads only the blobs its base lacks
   in the bucket, so it may reuse the blobs of an environment that expires while it runs; the
   grace (longer than any run) keeps them until the new manifest names them, and a new save's
   own blobs, uploaded before its manifest, are younger than the grace;
3. deletes uploads (``uploads/``) older than the grace, left by fronts that died mid-run (a
   bucket lifecycle rule does the same, where the storage has them);
4. recounts ``sk:quota`` from what remains: ``bytes`` = the blobs' and manifests' sizes,
   ``inodes`` = the number of blobs and manifests (the reservations of saves in progress are
   separate fields, which the recount leaves alone). This also restores the count after a
   Redis restart, until which workers cannot reserve room for a save;
5. deletes the Redis keys of workers and fronts gone for :data:`~.keys.DEAD_NAME_SECONDS`
   (their ``sk:seen`` time): a worker's queue ``sk.w.<name>`` and control stream, a front's
   inbox, and the name in ``sk:workers`` and ``sk:seen``.

Deleting is safe against readers: a manifest is deleted only once expired, and a blob only
once no manifest, live or expired less than the grace ago, names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import redis.exceptions

from . import keys
from .manifests import Limits, Manifest, ManifestError
from .objects import ObjectStore, ObjectStoreError, StoredObject

if TYPE_CHECKING:
    import redis as redis_sync

    from ..settings import ServerSettings
    from .settings import RedisTarget

log = logging.getLogger(__name__)

#: A blob, an upload or a damaged manifest younger than this is never deleted.
GRACE_SECONDS: Final = 3600.0
#: The sweep lock outlives any sweep; a sweep that overruns it lets another one start, which
#: is harmless (both delete only what is unused).
LOCK_MS: Final = 10 * 60 * 1000
#: Structural checks only: a manifest beyond today's ``--workdir-*`` limits is still an
#: environment whose blobs must stay.
_SWEEP_LIMITS: Final = Limits(entries=10**8, bytes=2**62)
_RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclasses.dataclass(frozen=True)
class _Summary:
    """What a sweep needs of one manifest."""

    expire: float
    digests: frozenset[str]


@dataclasses.dataclass
class SweepReport:
    """What one sweep did (for logs and tests)."""

    expired: int = 0
    junk: int = 0
    blobs_deleted: int = 0
    uploads_deleted: int = 0
    #: Names gone for DEAD_NAME_SECONDS whose keys were deleted.
    names_forgotten: int = 0
    bytes: int = 0
    inodes: int = 0


class Sweeper:
    """A front's sweep of the cluster's bucket (blocking: run it in a thread)."""

    def __init__(
        self,
        store: ObjectStore,
        target: RedisTarget,
        settings: ServerSettings,
        name: str,
        *,
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.store = store
        self.target = target
        self.settings = settings
        self.name = keys.name(name)
        self.grace = grace
        self._client: redis_sync.Redis | None = None
        self._summaries: dict[str, _Summary] = {}
        self.last: SweepReport | None = None

    @property
    def client(self) -> redis_sync.Redis:
        if self._client is None:
            self._client = self.target.client()
        return self._client

    def sweep(self) -> int:
        """One sweep if no other front is sweeping; the number of environments removed.
        Failures are logged (the next sweep tries again), never raised."""
        try:
            if not self.client.set(keys.SWEEP_LOCK, self.name, nx=True, px=LOCK_MS):
                return 0
        except redis.exceptions.RedisError as error:
            log.warning("no sweep of the bucket: Redis cannot be reached (%s)", error)
            return 0
        try:
            self.last = self.sweep_locked()
            return self.last.expired
        except Exception as error:  # the bucket or Redis: the next sweep tries again
            log.warning("the sweep of the bucket failed: %s: %s", type(error).__name__, error)
            return 0
        finally:
            with contextlib.suppress(redis.exceptions.RedisError):  # else it expires
                self.client.register_script(_RELEASE_SCRIPT)([keys.SWEEP_LOCK], [self.name])

    def sweep_locked(self, now: float | None = None) -> SweepReport:
        """The sweep itself (the caller holds the lock)."""
        now = time.time() if now is None else now
        report = SweepReport()
        live: set[str] = set()
        doomed: list[str] = []
        kept_bytes = kept_inodes = 0
        listed = list(self.store.list_manifests())
        for item in listed:
            summary = self._summary(item)
            if summary is None:
                if self._old(item, now):
                    doomed.append(item.name)
                    report.junk += 1
                    continue
            elif summary.expire <= now - self.grace:
                doomed.append(item.name)
                report.expired += 1
                self._summaries.pop(item.uuid, None)
                continue
            else:  # live, or expired so recently that a save in progress may reuse its blobs
                live |= summary.digests
            kept_bytes += item.size
            kept_inodes += 1
        self.store.delete(doomed)
        blobs = list(self.store.list_blobs())
        seen = {item.uuid for item in listed}
        for item in self.store.list_manifests():  # published while the blobs were listed
            if item.uuid not in seen and (summary := self._summary(item)) is not None:
                live |= summary.digests
        unused: list[str] = []
        for blob in blobs:
            if blob.digest not in live and self._old(blob, now):
                unused.append(blob.name)
            else:
                kept_bytes += blob.size
                kept_inodes += 1
        self.store.delete(unused)
        report.blobs_deleted = len(unused)
        report.uploads_deleted = self._delete_old_uploads(now)
        report.bytes, report.inodes = kept_bytes, kept_inodes
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.QUOTA, mapping={"bytes": kept_bytes, "inodes": kept_inodes})
        pipe.execute()
        report.names_forgotten = self.forget_dead_names(now)
        if report.expired or report.junk or report.blobs_deleted or report.uploads_deleted:
            log.info(
                "swept the bucket: %d expired environments, %d damaged manifests, %d unused "
                "blobs, %d stale uploads removed; %d bytes in %d objects remain",
                report.expired,
                report.junk,
                report.blobs_deleted,
                report.uploads_deleted,
                kept_bytes,
                kept_inodes,
            )
        return report

    def forget_dead_names(self, now: float) -> int:
        """Delete the keys of the names not seen for :data:`~.keys.DEAD_NAME_SECONDS` (their
        queue, control stream and inbox): a worker or front started under a new name each
        time would otherwise leave them for ever. Returns how many names went."""
        seen: dict[Any, Any] = self.client.hgetall(keys.SEEN)
        dead: list[str] = []
        for raw_name, raw_time in seen.items():
            owner = _text(raw_name)
            try:
                last = float(_text(raw_time))
            except ValueError:
                last = 0.0
            if last < now - keys.DEAD_NAME_SECONDS:
                if keys.NAME_RE.fullmatch(owner):
                    dead.append(owner)
                else:  # junk: only the entry goes
                    self.client.hdel(keys.SEEN, raw_name)
        forgotten = [owner for owner in dead if not self.client.exists(keys.worker_key(owner))]
        for owner in forgotten:  # (a name that beats has a clock far off: not dead)
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*keys.keys_of_name(owner))
            pipe.srem(keys.WORKERS, owner)
            pipe.hdel(keys.SEEN, owner)
            pipe.execute()
        if forgotten:
            log.info(
                "forgot %d names gone for %d s: %s",
                len(forgotten),
                keys.DEAD_NAME_SECONDS,
                ", ".join(forgotten),
            )
        return len(forgotten)

    def _summary(self, item: StoredObject) -> _Summary | None:
        """The manifest's expiry and blobs (read once), or None if it is no manifest."""
        summary = self._summaries.get(item.uuid)
        if summary is not None:
            return summary
        try:
            data = self.store.get_manifest(item.uuid)
            if data is None:  # deleted since the listing
                return None
            manifest = Manifest.parse(data, _SWEEP_LIMITS, uuid=item.uuid)
        except (ManifestError, ObjectStoreError) as error:
            if isinstance(error, ObjectStoreError) and error.kind != "corrupt":
                raise
            log.warning("the bucket holds a damaged manifest %s: %s", item.name, error)
            return None
        summary = _Summary(manifest.expire, frozenset(manifest.digests()))
        self._summaries[item.uuid] = summary
        return summary

    def _old(self, item: StoredObject, now: float) -> bool:
        return item.modified.timestamp() < now - self.grace

    def _delete_old_uploads(self, now: float) -> int:
        old = [key for key, modified in self._uploads() if modified < now - self.grace]
        bucket = self.store.location.bucket
        for start in range(0, len(old), 1000):
            batch = old[start : start + 1000]
            self.store.client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
            )
        return len(old)

    def _uploads(self) -> Iterator[tuple[str, float]]:
        prefix = self.store.location.key("uploads/")
        paginator = self.store.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.store.location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"].timestamp()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
