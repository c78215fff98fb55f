"""Server generations: the only place that knows how each one words its answers.

The client fetches ``specifications/``, ``usages/`` and ``libraries/``; this package checks them
(:mod:`._schema`) and turns them into typed facts (:mod:`._facts`): :class:`Specs`,
:class:`Load`, :class:`Inventory`. Nothing here does I/O, so every transport (the synchronous
client, an asyncio one) shares it. A new server generation is one module beside :mod:`.v2`
and :mod:`.v3` (``GENERATION``, ``NEEDS_USAGES``, ``matches``, ``specs``, ``load``,
``setting``), listed in :data:`_GENERATIONS`, newest first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..protocol import USER_FIELD, USERS_FIELD
from . import _read, v2, v3
from ._facts import (
    CATEGORIES,
    CATEGORY_NAMES,
    NO_LIMIT,
    CategoryName,
    Host,
    Inventory,
    Isolation,
    Library,
    Load,
    RunLimits,
    Specs,
    UserLoad,
    matches,
)
from ._read import inventory as read_inventory
from ._schema import checked

__all__ = [
    "CATEGORIES",
    "CATEGORY_NAMES",
    "NO_LIMIT",
    "CategoryName",
    "Host",
    "Inventory",
    "Isolation",
    "Library",
    "Load",
    "RunLimits",
    "Specs",
    "UserLoad",
    "checked",
    "container_setting",
    "generation_of",
    "matches",
    "needs_usages",
    "read_inventory",
    "read_load",
    "read_specs",
]

#: Newest first: the first whose ``matches`` accepts an answer reads it.
_GENERATIONS: tuple[ModuleType, ...] = (v3, v2)


def generation_of(specs: Mapping[str, Any]) -> ModuleType:
    """The module that reads a server whose ``specifications/`` answered ``specs``."""
    return next(module for module in _GENERATIONS if module.matches(specs))


def read_specs(specs: Mapping[str, Any]) -> Specs:
    """Typed facts of a (checked) ``specifications/`` answer. The top-level fields of our
    extensions are read alike for every generation (a server of any generation may add
    them)."""
    result: Specs = generation_of(specs).specs(specs)
    return dataclasses.replace(result, extensions=_extensions(specs), server_id=_server_id(specs))


#: A ``server_id`` worth keying records by: a token, not any text a server sends.
_SERVER_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")


def _extensions(specs: Mapping[str, Any]) -> frozenset[str]:
    """Empty when absent (PremierLangage servers) or malformed: a client then simply uses
    plain ``execute/``."""
    told = specs.get("extensions")
    if not isinstance(told, list) or not all(isinstance(name, str) for name in told):
        return frozenset()
    return frozenset(told)


def _server_id(specs: Mapping[str, Any]) -> str | None:
    told = specs.get("server_id")
    return told if isinstance(told, str) and _SERVER_ID.fullmatch(told) else None


def read_load(specs: Mapping[str, Any], usages: Mapping[str, Any] | None) -> Load:
    """The load from a (checked) ``specifications/`` answer and, on generations that need it
    (``NEEDS_USAGES``), a fresh ``usages/`` answer. The users' shares of a server that knows
    its users (``user``, ``users``: an extension) are read alike for every generation."""
    result: Load = generation_of(specs).load(specs, usages)
    if usages is None:
        return result
    user = _read.user_load(usages.get(USER_FIELD))
    users = _read.user_loads(usages.get(USERS_FIELD))
    return dataclasses.replace(result, user=user, users=users)


def container_setting(specs: Mapping[str, Any], key: str) -> Any:
    """A per-container setting of a (checked) ``specifications/`` answer, as the server wrote
    it: the raw attributes of the sandbox-api client (``s.cpu``, ``s.memory``...)."""
    return generation_of(specs).setting(specs, key)


def needs_usages(specs: Mapping[str, Any]) -> bool:
    """Whether the load of this server is in ``usages/`` (else ``specifications/`` tells it,
    and must be fetched anew for a fresh load)."""
    return bool(generation_of(specs).NEEDS_USAGES)
