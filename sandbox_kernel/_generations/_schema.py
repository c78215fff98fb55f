"""Type checks of the answers of ``execute/``, ``specifications/``, ``usages/`` and ``libraries/``.

Every answer is checked before any reader looks at it, so that a field of the wrong type
(``"cpu": {"usage": "lots"}``) raises one :class:`SandboxProtocolError` naming the endpoint and
the field, never a ``TypeError`` or ``AttributeError`` in whatever shows it. The schemas are the
union of the fields the generations' readers use; a new generation adds its own fields here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from .._errors import SandboxProtocolError
from ..protocol import (
    EXECUTABLES,
    EXECUTE,
    LIBRARIES,
    SPECIFICATIONS,
    USAGES,
    USER_FIELD,
    USERS_FIELD,
    is_finite_number,
)


class Kind(NamedTuple):
    """What a field must hold: ``accepts(value)``, described as ``expected``."""

    accepts: Callable[[object], bool]
    expected: str


def is_number(value: object) -> bool:
    return is_finite_number(value)


def is_whole(value: object) -> bool:
    return is_number(value) and float(value).is_integer()  # type: ignore[arg-type]


NUMBER: Final = Kind(is_number, "a number")
WHOLE: Final = Kind(is_whole, "a whole number")
COUNT: Final = Kind(lambda value: is_whole(value) and value >= 0, "a whole number, 0 or more")  # type: ignore[operator]
STRING: Final = Kind(lambda value: isinstance(value, str), "a string")
TEXT: Final = Kind(lambda value: isinstance(value, str) or is_number(value), "text")
BOOLEAN: Final = Kind(lambda value: isinstance(value, bool), "true or false")
BYTES: Final = Kind(lambda value: is_whole(value) and value >= 0, "a number of bytes")  # type: ignore[operator]
OBJECT: Final = Kind(lambda value: isinstance(value, Mapping), "an object")
#: 3.x gives bytes (-1: no limit), 2.x Docker's '100m'-style strings.
LIMIT: Final = Kind(lambda value: isinstance(value, str) or is_number(value), "a size")
NUMBERS: Final = Kind(
    lambda value: isinstance(value, list) and all(map(is_number, value)), "a list of numbers"
)
NAMES: Final = Kind(
    lambda value: (
        isinstance(value, Mapping)
        or (isinstance(value, list) and all(isinstance(item, str) for item in value))
    ),
    "a list of names",
)


class Items(NamedTuple):
    """A list whose every item is an object of ``schema`` (``execution`` of ``execute/``)."""

    schema: Schema


#: A schema maps a field to its kind, to the schema of the object it must hold, or to
#: :class:`Items`; ``"*"`` stands for every field of that object. ``None`` is always accepted:
#: the server does not tell. Only the fields that the readers use are listed.
Schema = Mapping[str, "Kind | Items | Schema"]

_SIZES: Final[Schema] = {"*": BYTES}
#: Settings of one container: under ``container`` on 3.x, at the top level on 2.x.
_CONTAINER_SETTINGS: Final[Schema] = {
    "cpu": {
        "count": WHOLE,
        "period": NUMBER,
        "shares": NUMBER,
        "quota": NUMBER,
        "name": TEXT,
        "time_limit": NUMBER,
    },
    "memory": {"ram": LIMIT, "swap": LIMIT, "storage": LIMIT},
    "environ": OBJECT,
    "execute_timeout": NUMBER,
    "expiration": NUMBER,
    "isolation": {"isolated": BOOLEAN, "method": TEXT, "cgroups": TEXT, "network": BOOLEAN},
}
#: One user's share in ``usages/`` (``user``, and each of ``users``), from a server with
#: ``--hub-auth``.
_USER: Final[Schema] = {"name": STRING, "running": COUNT, "queued": COUNT, "stored_bytes": BYTES}
SCHEMAS: Final[Mapping[str, Schema]] = {
    SPECIFICATIONS: {
        **_CONTAINER_SETTINGS,
        "sandbox_version": TEXT,
        "docker_version": TEXT,
        "containers": {"total": COUNT, "running": COUNT, "available": WHOLE},
        "host": {
            "cpu": {"core": WHOLE, "logical": WHOLE, "freq_min": NUMBER, "freq_max": NUMBER},
            "memory": {"ram": BYTES, "swap": BYTES, "storage": _SIZES},
            "sandbox_version": TEXT,
            "docker_version": TEXT,
        },
        "container": {
            **_CONTAINER_SETTINGS,
            "count": COUNT,
            "process": WHOLE,
            "io": OBJECT,
            "working_dir_device": TEXT,
        },
    },
    EXECUTE: {
        "status": WHOLE,
        "environment": STRING,
        "expire": STRING,
        "result": STRING,
        "execution": Items(
            {"exit_code": WHOLE, "stdout": STRING, "stderr": STRING, "time": NUMBER}
        ),
    },
    USAGES: {
        "cpu": {"frequency": NUMBER, "usage": NUMBER, "usage_avg": NUMBERS},
        "memory": {"ram": BYTES, "swap": BYTES, "storage": _SIZES},
        "io": OBJECT,
        "network": OBJECT,
        "process": WHOLE,
        "container": COUNT,
        USER_FIELD: _USER,
        USERS_FIELD: Items(_USER),
    },
    LIBRARIES: {
        "libraries": {"*": {"*": TEXT}},
        EXECUTABLES: NAMES,
        **dict.fromkeys(("python3", "python2", "java", "gcc", "g++", "perl", "postgres"), TEXT),
    },
}


def checked(endpoint: str, answer: dict[str, Any], base: str) -> dict[str, Any]:
    """``answer`` if every field its schema lists has the right type; else one
    :class:`SandboxProtocolError` naming the endpoint and the field."""
    schema = SCHEMAS.get(endpoint)
    if schema is not None:
        _check_fields(endpoint, answer, schema, "", base)
    return answer


def _check_fields(
    endpoint: str, value: Mapping[str, Any], schema: Schema, path: str, base: str
) -> None:
    for key, kind in schema.items():
        keys = list(value) if key == "*" else [key] if key in value else []
        for name in keys:
            field, where = value[name], f"{path}{name}"
            if field is None:
                continue
            if isinstance(kind, Kind):
                if not kind.accepts(field):
                    raise malformed(endpoint, where, field, kind.expected, base)
            elif isinstance(kind, Items):
                _check_items(endpoint, field, kind.schema, where, base)
            elif isinstance(field, Mapping):
                _check_fields(endpoint, field, kind, f"{where}.", base)
            else:
                raise malformed(endpoint, where, field, "an object", base)


def _check_items(endpoint: str, value: object, schema: Schema, where: str, base: str) -> None:
    if not isinstance(value, list):
        raise malformed(endpoint, where, value, "a list", base)
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise malformed(endpoint, f"{where}[{index}]", item, "an object", base)
        _check_fields(endpoint, item, schema, f"{where}[{index}].", base)


def malformed(
    endpoint: str, where: str, value: object, expected: str, base: str
) -> SandboxProtocolError:
    """The error of a field that the protocol types otherwise."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return SandboxProtocolError(
        f"{endpoint} answered {where} = {shown}, which is not {expected} as the sandbox "
        f"protocol says; the client cannot use this answer. Check that {base} is a sandbox "
        "server (of a version this client knows) and that no proxy in between rewrites its "
        "answers."
    )
