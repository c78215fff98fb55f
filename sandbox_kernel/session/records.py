"""Which environment each notebook last had, so that a reopened notebook can continue.

Jupyter tells a kernel its notebook through ``JPY_SESSION_NAME``; after every cell the kernel
records ``{url, environment, expire}`` under that name in ``notebooks.json`` beside the
embedded server's data (the Jupyter data directory). A new kernel for the same notebook reads
it back and says how to continue (``%sandbox_use UUID``).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from ..discovery import default_data_dir

_MAX_RECORDS = 500


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
