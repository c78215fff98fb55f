"""Uploaded archives staged on disk until a slot unpacks them (``execute/`` and
``execute/stream/`` alike)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from . import trees


class StagingPlaces:
    """How many uploads may wait on disk at once (two per slot), and how many do."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0


class Upload:
    """The archive of one request, staged on disk until a slot unpacks it.

    Staging is bounded: at most two uploads per slot wait on disk; beyond that a request is
    answered 503 before anything is unpacked (its client retries, as for a busy sandbox).
    """

    def __init__(self, places: StagingPlaces, staging: Path) -> None:
        self.places, self.staging = places, staging
        self.archive: Path | None = None
        self.reserved = False

    def reserve(self) -> bool:
        """Take a staging place before the archive comes; False when too many are taken."""
        if not self.reserved:
            if self.places.taken >= self.places.limit:
                return False
            self.places.taken += 1
            self.reserved = True
        return True

    def stage(self) -> Path | None:
        """Where to save the upload; None when too many are staged already."""
        if self.archive is not None:
            return self.archive  # a second environment part replaces the first
        if not self.reserve():
            return None
        self.staging.mkdir(mode=0o700)
        self.archive = self.staging / "upload.tgz"
        return self.archive

    def release(self) -> bool:
        """Give the staging place back; True if there is a folder to remove."""
        if not self.reserved:
            return False
        self.places.taken -= 1
        self.reserved = False
        staged, self.archive = self.archive is not None, None
        return staged

    async def discard(self) -> None:
        """Give the staging place back and remove its folder (even if the caller is being
        cancelled: the removal is shielded)."""
        if self.release():
            await asyncio.shield(asyncio.to_thread(trees.remove_quietly, self.staging))
