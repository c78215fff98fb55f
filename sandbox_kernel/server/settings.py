"""Settings of the embedded sandbox server, with the defaults of ``sandbox-kernel serve``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..protocol import DEFAULT_EXECUTE_TIMEOUT

_SIZE_RE = re.compile(r"[ \t]*(\d+(?:\.\d+)?)[ \t]*([kmgt]?)i?b?[ \t]*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """``"512M"`` -> bytes. Accepts plain bytes and K/M/G/T suffixes (binary, with or without
    ``iB``/``B``), the way ``--max-storage`` and friends are written on a command line."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size: write bytes or a number with K, M, G or T")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(size: float) -> str:
    """Bytes as a short human text (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclasses.dataclass
class ServerSettings:
    """Everything the server can be told. Caps are settings so that tests can use small ones."""

    host: str = "127.0.0.1"
    port: int = 7000
    workers: int = 8
    execute_timeout: float = DEFAULT_EXECUTE_TIMEOUT
    expiration: int = 86400
    data_dir: Path | None = None
    token: str | None = None
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    isolation: str = "auto"  # auto | bwrap | none

    # Storage: bytes and inodes, per run and in all.
    max_storage: int = 10 * 1024**3
    max_storage_inodes: int = 1_000_000
    workdir_quota: int = 1024**3
    workdir_inodes: int = 100_000
    # Uploads.
    max_upload: int = 256 * 1024**2
    max_archive_entries: int = 20_000
    max_archive_bytes: int = 1024**3
    max_config_bytes: int = 1024**2
    max_parts: int = 8
    # Per request: stdout and stderr of all commands together, counted as JSON-escaped text;
    # the result file has its own bound.
    max_output: int = 1024**2
    max_result: int = 1024**2
    max_processes: int = 256
    memory_limit: int = 1024**3
    cpu_limit: int = 60
    max_open_files: int = 1024
    # Connections: a request's headers must arrive within header_timeout seconds of the
    # connection (or of the previous answer); an idle keep-alive connection is closed after
    # keepalive_timeout seconds.
    header_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    # Unprivileged account the commands run as when the server runs as root.
    run_as: str = "nobody"
    sweep_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.execute_timeout <= 0:
            raise ValueError("--execute-timeout must be a positive number of seconds")
        if self.expiration <= 0:
            raise ValueError("--expiration must be a positive number of seconds")
        if self.isolation not in {"auto", "bwrap", "none"}:
            raise ValueError("--isolation must be auto, bwrap or none")
