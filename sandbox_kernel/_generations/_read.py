"""Small readers shared by the generations: answers are type-checked already (:mod:`._schema`),
so these only tell "absent" from present and convert units."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..protocol import EXECUTABLES, LIBRARY_CATEGORIES
from ._facts import NO_LIMIT, Inventory, Isolation, UserLoad

_DOCKER_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


def text(value: object) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def integer(value: object) -> int | None:
    found = number(value)
    return int(found) if found is not None and found.is_integer() else None


def mapping(value: object) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def size(value: object) -> int | None:
    """Bytes from 3.x numbers (-1: no limit) or 2.x Docker sizes (``"100m"``; ``"host"``: the
    host's disk, no limit of its own)."""
    if isinstance(value, str):
        if value.strip().lower() in ("host", "-1", "unlimited"):
            return NO_LIMIT
        match = _DOCKER_SIZE.fullmatch(value)
        if match is None:
            return None
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
        return int(size) if math.isfinite(size) else None  # "9999…9m" is no size
    found = integer(value)
    return NO_LIMIT if found is not None and found < 0 else found


def isolation(value: object) -> Isolation | None:
    if not isinstance(value, Mapping):
        return None
    network, isolated = value.get("network"), value.get("isolated")
    return Isolation(
        isolated=isolated if isinstance(isolated, bool) else None,
        method=text(value.get("method")),
        cgroups=text(value.get("cgroups")),
        network=network if isinstance(network, bool) else None,
    )


def user_load(value: object) -> UserLoad | None:
    """One user's share (``usages/``' ``user`` or an entry of ``users``); None when absent."""
    if not isinstance(value, Mapping):
        return None
    return UserLoad(
        name=value["name"] if isinstance(value.get("name"), str) else None,
        running=integer(value.get("running")),
        queued=integer(value.get("queued")),
        stored_bytes=integer(value.get("stored_bytes")),
    )


def user_loads(value: object) -> tuple[UserLoad, ...] | None:
    """Every user's share (``usages/``' ``users``); None when absent."""
    if not isinstance(value, list):
        return None
    return tuple(found for entry in value if (found := user_load(entry)) is not None)


def libraries(answer: Mapping[str, Any]) -> dict[str, dict[str, str | None]]:
    """Category -> name -> version; ``"?"`` (unknown, contract) and empty become None."""
    found = section(answer, "libraries")
    return {
        category: {
            str(name): (None if text(version) in (None, "?") else text(version))
            for name, version in section(found, category).items()
        }
        for category in LIBRARY_CATEGORIES
    }


def executables(
    answer: Mapping[str, Any],
) -> tuple[list[str] | dict[str, Any] | None, tuple[str, ...]]:
    """``bin`` as written, and its names sorted."""
    value = answer.get(EXECUTABLES)
    if isinstance(value, list):
        return [str(item) for item in value], tuple(sorted({str(item) for item in value}))
    if isinstance(value, Mapping):
        return dict(value), tuple(sorted(str(name) for name in value))
    return None, ()


def debian_upstream(version: object) -> str | None:
    """``"1:12.2.0-14+deb12u1"`` -> ``"12.2.0"``: drop the epoch, the Debian revision and any
    ``+``/``~`` suffix of the upstream version. ``"?"`` (unknown, contract) gives ``None``.
    """
    if not isinstance(version, str) or version.strip() in ("", "?"):
        return None
    upstream = re.sub(r"^\d+:", "", version.strip())
    if "-" in upstream:
        upstream = upstream.rsplit("-", 1)[0]
    match = re.match(r"\d+(?:\.\d+)*", upstream)
    return match.group(0) if match else upstream


#: The main tools whose versions the sandbox-api attributes give (``s.python3``...), with the
#: dpkg packages (regexes, in order of preference) that tell them on 3.x.
TOOL_PACKAGES: dict[str, tuple[str, ...]] = {
    "python3": (r"python3",),
    "python2": (r"python2", r"python2\.7"),
    "java": (r"default-jdk", r"default-jre", r"openjdk-\d+-jdk.*", r"openjdk-\d+-jre.*"),
    "gcc": (r"gcc",),
    "g++": (r"g\+\+",),
    "perl": (r"perl",),
    "postgres": (r"postgresql", r"postgresql-\d+"),
}


def inventory(answer: Mapping[str, Any]) -> Inventory:
    """The inventory of either generation: 2.x names the tools' versions, 3.x only lists dpkg
    packages, from which they are derived."""
    found = libraries(answer)
    system = found.get("system", {})
    tools: dict[str, str | None] = {}
    for tool, packages in TOOL_PACKAGES.items():
        given = text(answer.get(tool))
        tools[tool] = (None if given == "?" else given) or _from_packages(system, packages)
    raw, names = executables(answer)
    return Inventory(libraries=found, executables=names, tools=tools, raw_executables=raw)


def _from_packages(system: Mapping[str, str | None], packages: tuple[str, ...]) -> str | None:
    for pattern in packages:
        for name, version in system.items():
            if re.fullmatch(pattern, name) and (found := debian_upstream(version)):
                return found
    return None
