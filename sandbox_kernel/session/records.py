"""What the kernel remembers across restarts, beside the embedded server's data (the
Jupyter data directory):

- which environment each notebook last had, so that a reopened notebook can continue:
  Jupyter tells a kernel its notebook through ``JPY_SESSION_NAME``; after every cell the
  kernel records ``{server, environment, expire}`` under that name and the server's identity
  in ``notebooks.json``, and a new kernel for the same notebook on the same server reads it
  back and says how to continue (``%sandbox_use UUID``);
- which shell-state file this kernel wrote in which environment (``states.log``): the next
  cell restores shell state only from such a file, never from one an upload, a foreign
  environment or a hostile server put into ``.sandbox_kernel/``.

Both are keyed by the server's identity (:func:`server_identity`), not its URL: ``lab`` and a
kernel's private server listen on a random port, new at every start, while their environments
stay in the same data directory. An embedded server tells a random ``server_id`` kept in that
directory; a server that tells none (a public one, whose URL does not change) is known by its
URL.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .._errors import SandboxError
from ..discovery import default_data_dir

if TYPE_CHECKING:
    from ..client import Sandbox

_MAX_RECORDS = 500
#: ``states.log`` is cut back to its newest half past this many lines.
_MAX_STATES = 20_000
_STATE_NAME = re.compile(r"state-[0-9a-f]{16}-[ab]\.sh")


def server_identity(url: str, server_id: str | None) -> str:
    """What records are keyed by: ``id:SERVER_ID@scheme://host/path`` when the server tells a
    ``server_id`` in ``specifications/`` (the embedded server: the same data directory, the
    same id, whatever its port), else its ``url``.

    The host is kept, the port dropped: a restarted server on another port is the same, but
    a server elsewhere claiming the same id is not, so that it can never be handed this
    machine's records (a state file name it could then plant). ``url`` is a normalised
    sandbox URL (``Sandbox.url``).
    """
    if server_id is None:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    return f"id:{server_id}@{parts.scheme}://{host}{parts.path}"


def identity_of(client: Sandbox) -> str:
    """:func:`server_identity` of a client's server, from its specifications (fetched once
    when not cached yet); the URL when they cannot be read."""
    try:
        server_id = client.specs().server_id
    except SandboxError:
        server_id = None
    return server_identity(client.url, server_id)


def records_path() -> Path:
    return default_data_dir() / "notebooks.json"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _key(notebook: str, server: str) -> str:
    return f"{server}\t{notebook}"


def remember(notebook: str, server: str, environment: str, expire: str | None) -> None:
    """Record the notebook's latest environment on ``server`` (a :func:`server_identity`).
    Best effort: never fails a cell."""
    path = records_path()
    try:
        records = _load(path)
        key = _key(notebook, server)
        records.pop(key, None)
        records[key] = {"server": server, "environment": environment, "expire": expire}
        while len(records) > _MAX_RECORDS:
            records.pop(next(iter(records)))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(records))
        os.replace(temporary, path)
    except OSError:
        pass


def last_environment(notebook: str, server: str) -> dict[str, Any] | None:
    """The notebook's last environment on ``server`` (a :func:`server_identity`), if it has
    not expired yet. Records of earlier versions (keyed by the notebook alone, with the
    server's ``url``) still count for a server known by its URL."""
    records = _load(records_path())
    record = records.get(_key(notebook, server))
    if record is None:
        older = records.get(notebook)
        record = older if isinstance(older, dict) and older.get("url") == server else None
    if not isinstance(record, dict) or not isinstance(record.get("environment"), str):
        return None
    expire = record.get("expire")
    if isinstance(expire, str):
        try:
            when = datetime.datetime.fromisoformat(expire)
        except ValueError:
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.astimezone()
            if when <= datetime.datetime.now(datetime.timezone.utc):
                return None
    return record


def states_path() -> Path:
    return default_data_dir() / "states.log"


def remember_state(server: str, environment: str, state: str) -> None:
    """Record that this kernel wrote ``state`` (a file of ``.sandbox_kernel/``) for the
    environment ``environment`` of ``server`` (a :func:`server_identity`). Appends one line:
    cheap enough for every cell. Best effort: never fails a cell."""
    if not _STATE_NAME.fullmatch(state) or "\t" in server or "\n" in server:
        return
    path = states_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as log:
            log.write(f"{server}\t{environment}\t{state}\n")
            full = log.tell() > _MAX_STATES * 120
        if full:
            _compact(path)


def known_state(server: str, environment: str) -> str | None:
    """The state file this kernel wrote for that environment of ``server`` (a
    :func:`server_identity`), or None (never saved here)."""
    found = None
    with (
        contextlib.suppress(OSError),
        open(states_path(), encoding="utf-8", errors="replace") as log,
    ):
        for line in log:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 3 and fields[0] == server and fields[1] == environment:
                found = fields[2]
    return found if found is not None and _STATE_NAME.fullmatch(found) else None


def _compact(path: Path) -> None:
    """Keep the newest half of the log (under a lock: several kernels append to it)."""
    with open(path, "r+", encoding="utf-8", errors="replace") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        lines = log.readlines()
        if len(lines) > _MAX_STATES:
            log.seek(0)
            log.writelines(lines[-_MAX_STATES // 2 :])
            log.truncate()
