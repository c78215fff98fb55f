"""What the kernel remembers across restarts, beside the embedded server's data (the
Jupyter data directory):

- which environment each notebook last had, so that a reopened notebook can continue:
  Jupyter tells a kernel its notebook through ``JPY_SESSION_NAME``; after every cell the
  kernel records ``{url, environment, expire}`` under that name in ``notebooks.json``, and a
  new kernel for the same notebook reads it back and says how to continue
  (``%sandbox_use UUID``);
- which shell-state file this kernel wrote in which environment (``states.log``): the next
  cell restores shell state only from such a file, never from one an upload, a foreign
  environment or a hostile server put into ``.sandbox_kernel/``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any

from ..discovery import default_data_dir

_MAX_RECORDS = 500
#: ``states.log`` is cut back to its newest half past this many lines.
_MAX_STATES = 20_000
_STATE_NAME = re.compile(r"state-[0-9a-f]{16}-[ab]\.sh")


def records_path() -> Path:
    return default_data_dir() / "notebooks.json"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(notebook: str, url: str, environment: str, expire: str | None) -> None:
    """Record the notebook's latest environment (best effort: never fails a cell)."""
    path = records_path()
    try:
        records = _load(path)
        records.pop(notebook, None)
        records[notebook] = {"url": url, "environment": environment, "expire": expire}
        while len(records) > _MAX_RECORDS:
            records.pop(next(iter(records)))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(records))
        os.replace(temporary, path)
    except OSError:
        pass


def last_environment(notebook: str, url: str) -> dict[str, Any] | None:
    """The notebook's last environment on this sandbox, if it has not expired yet."""
    record = _load(records_path()).get(notebook)
    if not isinstance(record, dict) or record.get("url") != url:
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


def remember_state(url: str, environment: str, state: str) -> None:
    """Record that this kernel wrote ``state`` (a file of ``.sandbox_kernel/``) for the
    environment ``environment`` of the sandbox at ``url``. Appends one line: cheap enough
    for every cell. Best effort: never fails a cell."""
    if not _STATE_NAME.fullmatch(state) or "\t" in url or "\n" in url:
        return
    path = states_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as log:
            log.write(f"{url}\t{environment}\t{state}\n")
            full = log.tell() > _MAX_STATES * 120
        if full:
            _compact(path)


def known_state(url: str, environment: str) -> str | None:
    """The state file this kernel wrote for that environment, or None (never saved here)."""
    found = None
    with (
        contextlib.suppress(OSError),
        open(states_path(), encoding="utf-8", errors="replace") as log,
    ):
        for line in log:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 3 and fields[0] == url and fields[1] == environment:
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
