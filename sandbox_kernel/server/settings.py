"""Settings of the embedded sandbox server, each written once with its command-line option.

A setting that ``sandbox-kernel serve`` accepts carries its option in its field
(:func:`setting`): :func:`add_setting_options` and :meth:`ServerSettings.from_args` are generated
from the fields, so that adding an option is one line in :class:`ServerSettings`, its default
and its help text stay together, and the help can never show another default than the one used.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .. import protocol
from .._units import format_size as format_size  # the server's modules import it here

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


def _positive_int(text: str) -> int:
    # The name shows in argparse's message for a non-number ("invalid _positive_int value").
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _size_as_written(size: int) -> str:
    """Bytes the way ``--max-storage`` and friends are written: ``10G``, ``256M``, ``1000``."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit.lower()]
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


#: ``--execute-timeout`` by default: a minute, so that a teaching cell (compiling, a slow
#: loop, a program waiting for typed input) is not cut; the public server keeps its own.
SERVE_EXECUTE_TIMEOUT = 60.0

_T = TypeVar("_T")
#: The key of a field's metadata that holds its :class:`Option`.
_OPTION = "sandbox_kernel.server.option"
#: What ``--isolation`` accepts.
ISOLATIONS = ("auto", "bwrap", "none")


@dataclasses.dataclass(frozen=True)
class Option:
    """How one setting is written on the command line of ``sandbox-kernel serve``.

    ``help`` may say ``{default}``: it becomes the field's default as a user would write it
    (``10G``, ``10``), so the help cannot drift from the default in use.
    """

    flag: str
    #: Text to value, as argparse's ``type`` (its name shows in argparse's error message).
    parse: Callable[[str], Any] = str
    help: str | None = None
    #: Title of the help section the option is listed in; None: the main one.
    group: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    #: Given once per value (``--allowed-host a --allowed-host b``); the setting is a list.
    repeatable: bool = False
    #: A flag without a value (``--hub-auth``); the setting is a bool.
    switch: bool = False

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value in (``--max-output`` -> ``max_output``)."""
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse._ActionsContainer, default: object) -> None:
        """Add this option, whose setting defaults to ``default``, to ``parser``."""
        if self.switch:
            parser.add_argument(self.flag, action="store_true", default=default, help=self.help)
            return
        parser.add_argument(
            self.flag,
            action="append" if self.repeatable else "store",
            type=self.parse,
            default=default,
            choices=self.choices,
            metavar=self.metavar,
            help=self.help.format(default=self.as_written(default)) if self.help else None,
        )

    def as_written(self, value: object) -> str:
        """``value`` as a user would write it after :attr:`flag`."""
        if self.parse is parse_size and isinstance(value, int):
            return _size_as_written(value)
        return f"{value:g}" if isinstance(value, float) else str(value)


def setting(
    default: _T,
    flag: str,
    parse: Callable[[str], Any] = str,
    help: str | None = None,
    *,
    group: str | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> _T:
    """A field of :class:`ServerSettings` that ``sandbox-kernel serve`` sets with ``flag``."""
    option = Option(flag, parse, help, group, metavar, choices)
    return dataclasses.field(default=default, metadata={_OPTION: option})


def switch_setting(flag: str, help: str, *, group: str | None = None) -> bool:
    """A bool field of :class:`ServerSettings`, False unless ``flag`` is given."""
    option = Option(flag, help=help, group=group, switch=True)
    return dataclasses.field(default=False, metadata={_OPTION: option})


def repeated_setting(flag: str, help: str, *, metavar: str | None = None) -> list[str]:
    """A list field of :class:`ServerSettings`, one ``flag`` per item, empty by default."""
    option = Option(flag, help=help, metavar=metavar, repeatable=True)
    return dataclasses.field(default_factory=list, metadata={_OPTION: option})


@dataclasses.dataclass
class ServerSettings:
    """Everything the server can be told. Caps are settings so that tests can use small ones.

    The fields with a :func:`setting` are the options of ``sandbox-kernel serve``, listed in
    this order in its help; the others are set by code (the token by the token options, which
    are written by hand since three options make one setting).
    """

    host: str = setting("127.0.0.1", "--host", help="address to bind (default: loopback only)")
    port: int = setting(7000, "--port", int, "port, 0 for a free one (default {default})")
    workers: int = setting(8, "--workers", int, "parallel executions (default {default})")
    execute_timeout: float = setting(
        SERVE_EXECUTE_TIMEOUT,
        "--execute-timeout",
        float,
        "time budget of one execute/ request, seconds (default {default})",
    )
    expiration: int = setting(
        86400, "--expiration", int, "lifetime of a saved environment, seconds (default {default})"
    )
    data_dir: Path | None = setting(  # noqa: RUF009 (setting() is a dataclasses.field)
        None,
        "--data-dir",
        Path,
        "where environments live (default: sandbox-kernel/ under the Jupyter data directory)",
    )
    # Storage: bytes of all stored environments together.
    max_storage: int = setting(
        10 * 1024**3,
        "--max-storage",
        parse_size,
        "bound on stored environments, e.g. 10G (default {default})",
    )
    token: str | None = None
    allowed_hosts: list[str] = repeated_setting(  # noqa: RUF009 (a dataclasses.field)
        "--allowed-host",
        "a Host/Origin name to accept besides loopback ones (repeatable)",
        metavar="NAME",
    )
    isolation: str = setting(
        "auto",
        "--isolation",
        help="bwrap: require bubblewrap; none: run commands unconfined (default: {default})",
        choices=ISOLATIONS,
    )

    # Storage of one run and of all, in bytes and inodes.
    workdir_quota: int = setting(1024**3, "--workdir-quota", parse_size, group="caps")
    workdir_inodes: int = setting(
        100_000,
        "--workdir-inodes",
        _positive_int,
        "files and directories a saved working directory may hold (default {default})",
        group="caps",
        metavar="N",
    )
    max_storage_inodes: int = setting(
        1_000_000,
        "--max-storage-inodes",
        _positive_int,
        "files and directories of all stored environments together (default {default})",
        group="caps",
        metavar="N",
    )
    # Uploads.
    max_upload: int = setting(256 * 1024**2, "--max-upload", parse_size, group="caps")
    max_archive_entries: int = setting(20_000, "--max-archive-entries", int, group="caps")
    max_archive_bytes: int = setting(1024**3, "--max-archive-bytes", parse_size, group="caps")
    max_config_bytes: int = 1024**2
    # Per request: stdout and stderr of all commands together, counted as JSON-escaped text;
    # the result file has its own bound.
    max_output: int = setting(
        1024**2,
        "--max-output",
        parse_size,
        "bytes of stdout and stderr of all commands of one request together, counted after "
        "JSON escaping (default {default})",
        group="caps",
    )
    max_result: int = setting(
        1024**2,
        "--max-result",
        parse_size,
        "bytes of the result file sent back (default {default})",
        group="caps",
        metavar="SIZE",
    )
    # Each process of a run.
    max_processes: int = setting(256, "--max-processes", int, group="caps")
    memory_limit: int = setting(1024**3, "--memory-limit", parse_size, group="caps")
    cpu_limit: int = setting(60, "--cpu-limit", int, "CPU seconds per process", group="caps")
    max_open_files: int = 1024
    max_parts: int = setting(8, "--max-parts", int, group="caps")
    # Connections: a request's headers must arrive within header_timeout seconds of the
    # connection (or of the previous answer); an idle keep-alive connection is closed after
    # keepalive_timeout seconds.
    header_timeout: float = setting(
        10.0,
        "--header-timeout",
        _positive_seconds,
        "a request's line and headers must arrive within this time of the connection (or of "
        "the request's first byte on a kept-alive connection), else it is closed "
        "(default {default})",
        group="connections",
        metavar="SECONDS",
    )
    keepalive_timeout: float = setting(
        15.0,
        "--keepalive-timeout",
        _positive_seconds,
        "an idle kept-alive connection is closed after this time (default {default})",
        group="connections",
        metavar="SECONDS",
    )
    # A cluster (docs/design/issue-14-cluster.md): ``serve --cluster`` runs a front, and
    # ``sandbox-kernel worker`` a worker; both take every option above.
    cluster: str | None = setting(
        None,
        "--cluster",
        help="run as part of a cluster on this Redis: redis://[USER:]PASSWORD@HOST:PORT/DB "
        "(rediss:// for TLS across machines). With it, serve runs a front (no runners of its "
        "own) and needs --storage",
        group="cluster",
        metavar="URL",
    )
    storage: str | None = setting(
        None,
        "--storage",
        help="where a cluster keeps environments: s3://BUCKET/PREFIX on an S3-API store (AWS "
        "S3, MinIO, Ceph RGW, Garage); credentials and region from the usual AWS variables",
        group="cluster",
        metavar="URL",
    )
    s3_endpoint: str | None = setting(
        None,
        "--s3-endpoint",
        help="the S3 API's endpoint (default: AWS_ENDPOINT_URL, else AWS itself)",
        group="cluster",
        metavar="URL",
    )
    queue_wait: float = setting(
        protocol.DEFAULT_QUEUE_WAIT,
        "--queue-wait",
        _positive_seconds,
        "a front: how long a request waits in the queue for a free slot before 503 "
        "(default {default})",
        group="cluster",
        metavar="SECONDS",
    )
    name: str | None = setting(
        None,
        "--name",
        help="this front's or worker's name in the cluster (default: HOSTNAME-PID-RANDOM)",
        group="cluster",
    )
    cache_size: int | None = setting(
        None,
        "--cache-size",
        parse_size,
        "a worker: bytes of recent environments kept on local disk (default: half of "
        "--max-storage)",
        group="cluster",
        metavar="SIZE",
    )
    # A class on JupyterHub (README.md, "For a class"): users known to the sandbox.
    hub_auth: bool = switch_setting(
        "--hub-auth",
        "authenticate each request with JupyterHub's service authentication: it carries the "
        "user's JupyterHub API token, and the user needs the scope "
        "access:services!service=NAME. For a server the Hub starts as a managed service",
        group="JupyterHub",
    )
    hub_service_name: str | None = setting(
        None,
        "--hub-service-name",
        help="the service's name in JupyterHub (default: JUPYTERHUB_SERVICE_NAME, else sandbox)",
        group="JupyterHub",
        metavar="NAME",
    )
    base_path: str | None = setting(
        None,
        "--base-path",
        help="serve the protocol under this path, e.g. /services/sandbox/ (default: "
        "JUPYTERHUB_SERVICE_PREFIX with --hub-auth, else /)",
        group="JupyterHub",
        metavar="PREFIX",
    )
    per_user_runs: int = setting(
        2,
        "--per-user-runs",
        _positive_int,
        "with --hub-auth: runs of one user at a time; more wait in the user's own queue "
        "(default {default})",
        group="JupyterHub",
        metavar="N",
    )
    per_user_storage: int | None = setting(
        None,
        "--per-user-storage",
        parse_size,
        "with --hub-auth: bytes of environments one user may keep saved (default: no cap "
        "but --max-storage)",
        group="JupyterHub",
        metavar="SIZE",
    )
    per_user_inodes: int | None = setting(
        None,
        "--per-user-inodes",
        _positive_int,
        "with --hub-auth: files and directories one user's saved environments may hold "
        "(default: no cap but --max-storage-inodes)",
        group="JupyterHub",
        metavar="N",
    )
    run_log: Path | None = setting(  # noqa: RUF009 (setting() is a dataclasses.field)
        None,
        "--run-log",
        Path,
        "append one JSON line per run (time, user, base and saved uuids, commands, duration, "
        "status) to this file",
        group="JupyterHub",
        metavar="PATH",
    )
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
        if self.isolation not in ISOLATIONS:
            raise ValueError("--isolation must be auto, bwrap or none")
        if self.cluster and not self.storage:
            raise ValueError(
                "--cluster needs --storage s3://BUCKET/PREFIX: a cluster keeps its "
                "environments in S3-API storage that every front and worker reaches"
            )
        if self.storage and not self.cluster:
            raise ValueError("--storage is for a cluster: give --cluster redis://... too")
        if self.hub_auth and self.cluster:
            raise ValueError(
                "--hub-auth is not supported by a cluster's fronts yet: run a single server "
                "(sandbox-kernel serve --hub-auth) for a class on JupyterHub"
            )
        if self.base_path is not None and not (
            self.base_path.startswith("/") and self.base_path.endswith("/")
        ):
            raise ValueError(
                f"--base-path {self.base_path!r} must start and end with '/', e.g. "
                "/services/sandbox/"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ServerSettings:
        """The settings ``args`` holds (parsed with :func:`add_setting_options`); ``overrides``
        win over them and give the settings that have no option (the token, say)."""
        values = {name: getattr(args, option.dest) for name, option in setting_options()}
        return cls(**(values | overrides))


def add_setting_options(
    parser: argparse.ArgumentParser,
    by_hand: Mapping[str, Callable[[argparse.ArgumentParser], None]] | None = None,
) -> None:
    """Add the option of every setting that has one, in the order of the fields.

    ``by_hand`` maps a field to a function adding options written by hand, called at that
    field's place so that ``--help`` lists them there (the token options, say).
    """
    defaults = ServerSettings()
    by_hand = by_hand or {}
    fields = dataclasses.fields(ServerSettings)
    unknown = set(by_hand) - {field.name for field in fields}
    if unknown:  # a misspelt name would silently drop options
        raise ValueError(f"ServerSettings has no field {', '.join(sorted(unknown))}")
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for field in fields:
        if field.name in by_hand:
            by_hand[field.name](parser)
        option = field.metadata.get(_OPTION)
        if option is None:
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        option.add_to(groups[option.group], getattr(defaults, field.name))


def setting_options() -> Iterator[tuple[str, Option]]:
    """The fields of :class:`ServerSettings` that have an option, with it (in help order)."""
    for field in dataclasses.fields(ServerSettings):
        if _OPTION in field.metadata:
            yield field.name, field.metadata[_OPTION]
