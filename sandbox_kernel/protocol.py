"""Definitions of the sandbox HTTP protocol, shared by the client and the embedded server.

The contract is ``shared/reference/sandbox-protocol.md`` (the PremierLangage sandbox, 2.x and
3.x). Everything both sides must agree on lives here and nowhere else: endpoint paths (they
all end with a slash), the status codes of an execution, the fixed texts clients match on and
the rules a ``config`` must follow.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from typing import Any, Final

#: Endpoint paths, relative to the server's base URL. The trailing slash is part of the
#: contract: the public server answers 404 (or redirects) without it.
EXECUTE: Final = "execute/"
#: The streamed ``execute/``, a WebSocket (our extension, docs/protocol-extensions.md).
EXECUTE_STREAM: Final = "execute/stream/"
SPECIFICATIONS: Final = "specifications/"
USAGES: Final = "usages/"
LIBRARIES: Final = "libraries/"
ENVIRONMENT: Final = "environments/{uuid}/"
FILE: Final = "files/{uuid}/{path}/"

#: What ``libraries/`` lists under ``libraries`` (contract), in the order shown to users.
LIBRARY_CATEGORIES: Final = ("system", "python", "perl", "c")
#: The key of ``libraries/`` that lists the executables on PATH.
EXECUTABLES: Final = "bin"

#: ``status`` values below zero are errors of the sandbox itself, not of the commands.
STATUS_OK: Final = 0
STATUS_UNKNOWN_ERROR: Final = -1
STATUS_TIMEOUT: Final = -2
STATUS_RESULT_NOT_FOUND: Final = -3
STATUS_RESULT_NOT_UTF8: Final = -4

STATUS_MEANINGS: Final[Mapping[int, str]] = {
    STATUS_UNKNOWN_ERROR: "unknown error of the sandbox",
    STATUS_TIMEOUT: "execution timed out",
    STATUS_RESULT_NOT_FOUND: "result file not found",
    STATUS_RESULT_NOT_UTF8: "result file is not UTF-8",
}

#: The body of a 503 answer, word for word as the public server sends it.
OVERLOADED_TEXT: Final = "Sandbox overloaded, retry after a few seconds."
#: stderr of a command that hit an internal error (public server, under churn).
UNKNOWN_ERROR_TEXT: Final = "An unknown error occurred on the sandbox\n"
#: How the embedded server's own lines in a command's stderr begin (docs/protocol-extensions.md).
SERVER_NOTE: Final = "[sandbox] "
#: The line of a command whose output was cut at ``--max-output``, and how to read it back
#: (group 1: the limit in bytes).
OUTPUT_CUT_NOTE: Final = SERVER_NOTE + "output cut after {limit} (--max-output)"
OUTPUT_CUT_PATTERN: Final = r"\[sandbox\] output cut after ([0-9]+) \(--max-output\)"
#: The line a command the memory cgroup killed gets at the end of its stderr.
MEMORY_NOTE: Final = SERVER_NOTE + "killed: memory limit of {limit} reached."
MEMORY_NOTE_PATTERN: Final = r"\[sandbox\] killed: memory limit of .* reached\.?"

#: The line a streamed run's stopped command gets at the end of its stderr (our extension,
#: docs/protocol-extensions.md: "execute/stream/").
STOPPED_NOTE = "[sandbox] stopped on request"
#: The extensions our server names in ``specifications/`` (docs/protocol-extensions.md):
#: ``execute/stream/``, its ``stdin`` events, and why a command was killed.
EXTENSION_STREAM: Final = "stream"
EXTENSION_STDIN: Final = "stdin"
#: ``cause`` (and ``signal``) in the ``execution`` entries of killed or cut commands.
EXTENSION_CAUSES: Final = "causes"
#: The fields and values of that extension (docs/protocol-extensions.md, "Causes").
CAUSE_FIELD: Final = "cause"
SIGNAL_FIELD: Final = "signal"
CAUSE_TIMEOUT: Final = "timeout"
CAUSE_MEMORY: Final = "memory"
CAUSE_SIGNAL: Final = "signal"
CAUSE_OUTPUT: Final = "output"
#: A cluster front's ``{"queue": N}`` frames on ``execute/stream/`` (N jobs ahead of this one),
#: sent only to a client that opened the stream with :data:`QUEUE_EVENTS_QUERY`: older clients
#: refuse frames they do not know (docs/protocol-extensions.md, "Queue events").
EXTENSION_QUEUE: Final = "queue"
#: A server behind JupyterHub (``serve --hub-auth``): ``usages/`` has the caller's ``user``
#: share (and a teacher's ``users``), environments belong to their users
#: (docs/protocol-extensions.md, "Users").
EXTENSION_USERS: Final = "users"
USER_FIELD: Final = "user"
USERS_FIELD: Final = "users"
QUEUE_EVENTS_QUERY: Final = "events=queue"
QUEUE_FIELD: Final = "queue"
#: How long a front keeps a request in its queue before 503 (``--queue-wait``'s default): a
#: client allows that much more time for a run on a server that lists the extension.
DEFAULT_QUEUE_WAIT: Final = 30.0
#: The ``cluster`` object a front adds to ``specifications/``: ``{"workers": N, "slots": M}``.
CLUSTER_FIELD: Final = "cluster"
#: The status and body of a run a cluster lost after it may have started (a worker or Redis
#: went down): never 503, which a client may retry because nothing ran.
CLUSTER_LOST_STATUS: Final = 502
CLUSTER_LOST_TEXT: Final = (
    "Bad gateway: the cluster lost this request; it may have run (a worker or Redis went down "
    "before answering). Check what the commands do before running them again: the session's "
    "last saved environment is intact."
)

#: How long the server waits for a free execution slot before answering 503.
SLOT_WAIT_SECONDS: Final = 2.0
#: Working directory of the commands (user ``student`` on the public server).
WORKING_DIR: Final = "/home/student"

# Matched with fullmatch: "$" would also accept a trailing newline ("FOO\n").
_UUID_RE: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)
#: The largest integer a float holds (beyond it, ``float()`` overflows).
_LARGEST_FLOAT: Final = int(sys.float_info.max)
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_finite_number(value: object) -> bool:
    """An int or float a float can hold, not a bool: what a number of the protocol may be.
    JSON allows integers of any length, which ``math.isfinite`` cannot even look at."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return abs(value) <= _LARGEST_FLOAT
    return math.isfinite(value)


def is_uuid(text: object) -> bool:
    """Whether ``text`` is a uuid as the server writes them (anything else is a 404)."""
    return isinstance(text, str) and bool(_UUID_RE.fullmatch(text))


def environment_path(uuid: str) -> str:
    return ENVIRONMENT.format(uuid=uuid)


def file_path(uuid: str, path: str) -> str:
    return FILE.format(uuid=uuid, path=path.strip("/"))


def format_seconds(seconds: float) -> str:
    """A timeout as the public server prints it: Python's ``str()`` of the number, so an int
    timeout prints ``1``, a float ``0.2`` or ``10.0`` (contract, "Execution semantics")."""
    return str(seconds)


def timeout_message(seconds: float) -> str:
    """stderr of a command that timed out; the trailing newline is part of the contract."""
    return f"Command timed out after {format_seconds(seconds)} seconds\n"


def split_command(item: str | Mapping[str, Any]) -> tuple[str, float | None, bool]:
    """``(command, own timeout, may_fail)`` for one item of ``config.commands``.

    A command starting with ``-`` may fail without stopping the run; the ``-`` is removed
    before running it and in the response (contract, "config keys"). The timeout keeps its
    JSON type (int or float) because it is printed back in the timeout message.
    """
    if isinstance(item, str):
        command, timeout = item, None
    else:
        command, timeout = item["command"], item.get("timeout")
    may_fail = command.startswith("-")
    return (command[1:] if may_fail else command), timeout, may_fail


def _type_name(value: object) -> str:
    """How the public server (Python) names a JSON value's type in its 400 texts."""
    return str(type(value))


def validate_config(config: object) -> tuple[bool, str]:
    """Check a ``config`` object as the server does before running anything.

    Returns ``(True, "")`` or ``(False, reason)``; the reason is the text of the 400 answer,
    word for word the public server's where it has one. Unknown keys are ignored, as there.
    A few checks go beyond the public server (NUL bytes, variable names, null values, bad
    timeouts) because such a config could never run as the user meant.
    """
    if not isinstance(config, Mapping):
        return False, f"config must be an object, not {_type_name(config)}"
    if "commands" not in config:
        return False, "Missing field 'commands' in config"
    ok, reason = _validate_commands(config["commands"])
    if ok and "environ" in config:
        ok, reason = _validate_environ(config["environ"])
    if not ok:
        return ok, reason
    if "environment" in config and not isinstance(config["environment"], str):
        return False, f"environment must be a string, not {_type_name(config['environment'])}"
    if "result_path" in config:
        path = config["result_path"]
        if not isinstance(path, str):
            return False, f"result_path must be a string, not {_type_name(path)}"
    if "save" in config and not isinstance(config["save"], bool):
        return False, f"save must be a boolean, not {_type_name(config['save'])}"
    return True, ""


def _validate_commands(commands: object) -> tuple[bool, str]:
    if not isinstance(commands, list):
        return False, f"commands must be a list, not {_type_name(commands)}"
    if not commands:
        return False, "Command list cannot be empty"
    for item in commands:
        bad = f"Command badly formatted : '{item}'"
        if isinstance(item, Mapping):
            command, timeout = item.get("command"), item.get("timeout")
            if set(item) - {"command", "timeout"}:
                return False, bad
            if timeout is not None and (not is_finite_number(timeout) or timeout <= 0):
                return False, bad
        else:
            command = item
        if not isinstance(command, str) or not command.lstrip("-").strip():
            return False, bad
        if "\0" in command:
            return False, f"{bad} (it contains a NUL byte, which bash cannot run)"
    return True, ""


def _validate_environ(environ: object) -> tuple[bool, str]:
    if not isinstance(environ, Mapping):
        return False, f"environ must be an object, not {_type_name(environ)}"
    for name, value in environ.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            return False, f"environ: {name!r} is not a valid variable name"
        if isinstance(value, Mapping | list) or value is None:
            return False, f"environ[{name!r}] must be a string or a number, not {_type_name(value)}"
        if "\0" in str(value):
            return False, f"environ[{name!r}] contains a NUL byte"
    return True, ""
