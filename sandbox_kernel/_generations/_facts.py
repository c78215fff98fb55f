"""The facts a sandbox server tells, typed: what every front-end shows, whatever the server.

A server generation (:mod:`.v2`, :mod:`.v3`) turns its answers into these; nothing above the
client reads a server's JSON. ``None`` always means "the server does not tell"; ``-1`` in a
limit means "no limit" (the 3.x convention, kept because the contract uses it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Mapping
from typing import Any, Final

from ..protocol import EXECUTABLES, LIBRARY_CATEGORIES

#: A limit that is not one (3.x's ``-1``).
NO_LIMIT: Final = -1


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How our embedded server isolates commands (``container.isolation``, an extension)."""

    #: None when the server does not say.
    isolated: bool | None
    method: str | None = None
    cgroups: str | None = None
    network: bool | None = None


@dataclasses.dataclass(frozen=True)
class Host:
    """The server's machine (3.x ``host``)."""

    cores: int | None = None
    threads: int | None = None
    max_mhz: float | None = None
    ram: int | None = None
    #: Device -> bytes.
    disks: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunLimits:
    """What one run (one container) may use; bytes, ``NO_LIMIT`` or ``None``."""

    ram: int | None = None
    swap: int | None = None
    storage: int | None = None
    processes: int | None = None
    cpus: int | None = None
    cpu_name: str | None = None
    cpu_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Specs:
    """``specifications/``, read once for every generation."""

    #: 2 or 3: which reader made these facts (shown to nobody; tests and logs).
    generation: int
    sandbox_version: str | None = None
    #: None on servers without Docker (our embedded server) as well as on those that do not
    #: tell: a view leaves the row out.
    docker_version: str | None = None
    #: Containers (runs at once).
    containers: int | None = None
    execute_timeout: float | None = None
    expiration: int | None = None
    limits: RunLimits = dataclasses.field(default_factory=RunLimits)
    host: Host | None = None
    isolation: Isolation | None = None
    environ: Mapping[str, str] | None = None
    #: Protocol extensions the server offers (``{"stream", "stdin", "causes"}`` for the
    #: embedded one; none on PremierLangage servers). See docs/protocol-extensions.md.
    extensions: frozenset[str] = frozenset()
    #: Who the server is, whatever its port (the embedded server keeps it in its data
    #: directory); None when it does not say.
    server_id: str | None = None


@dataclasses.dataclass(frozen=True)
class UserLoad:
    """One user's share of a sandbox that knows its users (``sandbox-kernel serve
    --hub-auth``: ``usages/``' ``user``, and ``users`` for a teacher)."""

    #: The user's JupyterHub name; None when the server does not say.
    name: str | None = None
    #: Runs of this user going on now.
    running: int | None = None
    #: Runs of this user waiting for their share (``--per-user-runs``).
    queued: int | None = None
    #: Bytes of the environments this user saved.
    stored_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class Load:
    """The load at one moment: busy / total containers, and the host's CPU and memory."""

    busy: int | None = None
    total: int | None = None
    #: Host CPU use in [0, 1].
    cpu: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    #: When it was measured (``time.time()``).
    at: float = dataclasses.field(default_factory=time.time)
    #: The caller's own share, from a sandbox that knows its users; None elsewhere.
    user: UserLoad | None = None
    #: Every user's share, told to a teacher only (``custom:sandbox:teacher``); None elsewhere.
    users: tuple[UserLoad, ...] | None = None

    @property
    def fraction(self) -> float | None:
        """Busy / total in [0, 1]; None when either is unknown."""
        if self.busy is None or not self.total:
            return None
        return max(0.0, min(1.0, self.busy / self.total))


@dataclasses.dataclass(frozen=True)
class Library:
    """One row of the inventory: a package, a module or an executable."""

    category: str
    name: str
    #: None when the server does not tell (``"?"`` in its answer).
    version: str | None


#: Every category of an inventory, libraries then executables.
CATEGORIES: Final = (*LIBRARY_CATEGORIES, EXECUTABLES)


@dataclasses.dataclass(frozen=True)
class CategoryName:
    """How an entry of a category is called, one and many (``C library``, ``C libraries``)."""

    one: str
    many: str


#: The words for each category, on screen and in completion.
CATEGORY_NAMES: Final[Mapping[str, CategoryName]] = {
    "system": CategoryName("system package", "system packages"),
    "python": CategoryName("Python module", "Python modules"),
    "perl": CategoryName("Perl module", "Perl modules"),
    "c": CategoryName("C library", "C libraries"),
    EXECUTABLES: CategoryName("executable", "executables"),
}
assert set(CATEGORY_NAMES) == set(CATEGORIES), "every category needs its name"


@dataclasses.dataclass(frozen=True)
class Inventory:
    """``libraries/``: what the sandbox has installed."""

    #: Category (``protocol.LIBRARY_CATEGORIES``) -> name -> version (None: not told).
    libraries: Mapping[str, Mapping[str, str | None]]
    #: Every executable on the containers' PATH.
    executables: tuple[str, ...]
    #: Versions of the main tools (``python3``, ``gcc``, ``java``...), told (2.x) or derived
    #: from the system packages (3.x); None when unknown.
    tools: Mapping[str, str | None]
    #: ``bin`` as the server wrote it (the sandbox-api attribute).
    raw_executables: list[str] | dict[str, Any] | None = None

    def counts(self) -> dict[str, int]:
        """Rows per category, in :data:`CATEGORIES` order."""
        counts = {name: len(self.libraries.get(name, {})) for name in LIBRARY_CATEGORIES}
        counts[EXECUTABLES] = len(self.executables)
        return counts

    def rows(self, category: str | None = None, pattern: str = "") -> list[Library]:
        """Rows of ``category`` (every one when None) whose name matches ``pattern`` (a part of
        the name, or a glob with ``*?[``), sorted by category then name. An executable gets
        the version of the tool of the same name when the server tells it."""
        rows: list[Library] = []
        for name in LIBRARY_CATEGORIES:
            if category in (None, name):
                entries = self.libraries.get(name, {})
                rows += [Library(name, key, entries[key]) for key in sorted(entries)]
        if category in (None, EXECUTABLES):
            rows += [Library(EXECUTABLES, key, self.tools.get(key)) for key in self.executables]
        return [row for row in rows if matches(row.name, pattern)]


def matches(name: str, pattern: str) -> bool:
    """A part of the name (any case), or a glob when the pattern has ``*``, ``?`` or ``[``."""
    if not pattern:
        return True
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatch(name.lower(), pattern.lower())
    return pattern.lower() in name.lower()
