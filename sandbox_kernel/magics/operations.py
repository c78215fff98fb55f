"""The sandbox magics. Each is registered once (see :mod:`.core`); both front-ends use them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import math
import os
import posixpath
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import protocol
from .._errors import SandboxError, SandboxProtocolError
from ..archive import ArchiveError, build_archive
from ..client import Sandbox
from ..protocol import WORKING_DIR
from ..session import mime_type
from ..session.cellscript import STATE_DIR
from ..session.connection import SandboxContext
from ..views import render
from .core import REGISTRY, MagicFailed, MagicResult, MagicUsageError, _Parser, magic

#: What ``libraries/`` answers with (contract): four library categories, then executables.
LIBRARY_CATEGORIES = ("system", "python", "perl", "c")
CATEGORIES = (*LIBRARY_CATEGORIES, "bin")
_LIBRARY_ROWS = 200


def _sandbox_error(action: str, error: SandboxError) -> MagicFailed:
    return MagicFailed(f"Could not {action}: {error}")


# -- connection and status ---------------------------------------------------------------------


def _connect_arguments(parser: _Parser) -> None:
    parser.add_argument("url", help="base URL of the sandbox server")
    parser.add_argument("--token", help="its token, if it needs one")


@magic(
    "sandbox_connect",
    "use another sandbox server (a fresh environment there)",
    arguments=_connect_arguments,
)
def sandbox_connect(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    try:
        connection = context.connect(args.url, args.token)
    except SandboxError as error:
        raise _sandbox_error(f"connect to {args.url}", error) from None
    version = connection.background.sandbox_version or "unknown version"
    return MagicResult(
        value=connection.url,
        bundles=[
            render.text(
                f"Connected to {connection.url} ({version}); the next cell starts "
                "in a fresh environment there."
            )
        ],
    )


@magic("sandbox_status", "URL, environment uuid and expiry, isolation, limits")
def sandbox_status(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    connection, session = context.connection, context.session
    try:
        isolation = render.isolation_text(connection.background.isolation)
        server_timeout = connection.background.execute_timeout
    except SandboxError as error:
        isolation, server_timeout = f"unknown (sandbox unreachable: {error})", None
    status = {
        "url": connection.url,
        "private embedded server": "yes" if connection.private else "no",
        "environment": session.environment or "none yet (the next cell starts a fresh one)",
        "expires": session.expire or render.UNKNOWN,
        "isolation": isolation,
        "cell time limit": _timeout_text(session.timeout, server_timeout),
        "environ": ", ".join(f"{k}={v}" for k, v in session.environ.items()) or "none",
        "current directory": session.state.cwd or WORKING_DIR,
        "cells run": session.cells,
    }
    return MagicResult(
        value=status,
        bundles=[render.table(["", "value"], list(status.items()), caption="Sandbox status")],
    )


def _timeout_text(own: float | None, server: float | None) -> str:
    if server is None:  # a 3.x public server does not tell its execute_timeout
        server_text = "its own execute_timeout, which it does not tell"
    else:
        server_text = f"{server:g} s"
    if own is None:
        return f"the server's execute_timeout ({server_text})"
    return f"{own:g} s (%sandbox_timeout; the server allows up to {server_text})"


@magic("sandbox_reset", "start the next cell in a fresh environment")
def sandbox_reset(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    previous = context.session.reset()
    message = "The next cell starts in a fresh environment."
    if previous:
        message += f" The previous one was {previous} (%sandbox_use {previous} goes back to it)."
    return MagicResult(value=previous, bundles=[render.text(message)])


def _use_arguments(parser: _Parser) -> None:
    parser.add_argument("uuid", help="a saved environment of this sandbox")


@magic("sandbox_use", "continue from a saved environment", arguments=_use_arguments)
def sandbox_use(context: SandboxContext, args: argparse.Namespace, cell: str | None) -> MagicResult:
    if not protocol.is_uuid(args.uuid):
        raise MagicUsageError(
            f"%sandbox_use: {args.uuid!r} is not an environment uuid "
            "(like e8c5995b-7049-4b04-8440-5d9d914360fc)"
        )
    try:
        line = context.session.use(args.uuid.lower())
    except LookupError as error:
        raise MagicFailed(f"Cannot continue from it: {error}.") from None
    except SandboxError as error:
        raise _sandbox_error(f"check environment {args.uuid}", error) from None
    return MagicResult(value=args.uuid, bundles=[render.text(line)])


@magic("sandbox_help", "every sandbox magic with a one-line description")
def sandbox_help(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    rows = [
        (
            f"%%{context.teaching_prefix}{m.name}" if m.kind == "cell" else f"%{m.name}",
            m.summary,
            m.usage.replace(f"%%{m.name}", f"%%{context.teaching_prefix}{m.name}"),
        )
        for m in REGISTRY.values()
    ]
    bundle = render.table(["magic", "what it does", "usage"], rows, caption="Sandbox magics")
    return MagicResult(value=None, bundles=[bundle])


# -- what the sandbox is ---------------------------------------------------------------------------


def _specs_arguments(parser: _Parser) -> None:
    parser.add_argument("--refresh", action="store_true", help="fetch them again")


@magic("sandbox_specs", "the sandbox's specifications as a table", arguments=_specs_arguments)
def sandbox_specs(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    client = context.connection.background
    if args.refresh:
        del client.sandbox_version  # every specification attribute goes with it
    try:
        facts = {
            name: getattr(client, name)
            for name in (
                "sandbox_version",
                "docker_version",
                "containers",
                "memory",
                "cpu",
                "execute_timeout",
                "expiration",
                "isolation",
            )
        }
        specs = client.cached_specifications()
    except SandboxError as error:
        raise _sandbox_error("read the specifications", error) from None
    return MagicResult(value=dict(specs), bundles=[render.specifications(client.url, specs, facts)])


def _libraries_arguments(parser: _Parser) -> None:
    parser.add_argument("pattern", nargs="?", default="", help="part of a name, or a glob")
    parser.add_argument("--category", choices=list(CATEGORIES), help="only this category")


@magic("sandbox_libraries", "search what the sandbox has installed", arguments=_libraries_arguments)
def sandbox_libraries(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    client = context.connection.background
    try:
        libraries: Any = client.libraries or {}
        executables: Any = client.bin or []
    except SandboxError as error:
        raise _sandbox_error("list the libraries", error) from None
    rows = [
        row
        for row in library_rows(libraries, executables, args.category)
        if matches(row[1], args.pattern)
    ]
    shown = rows[:_LIBRARY_ROWS]
    return MagicResult(value=rows, bundles=[render.libraries(shown, len(rows), _LIBRARY_ROWS)])


def library_rows(
    libraries: Any, executables: Any, category: str | None
) -> list[tuple[str, str, str]]:
    """(category, name, version) rows of a ``libraries/`` answer; parts of the wrong shape (a
    server's mistake) are left out rather than failing the search."""
    rows: list[tuple[str, str, str]] = []
    for name in LIBRARY_CATEGORIES:
        if category in (None, name):
            entries = libraries.get(name) if isinstance(libraries, Mapping) else None
            if isinstance(entries, Mapping):
                rows += sorted((name, str(k), str(v)) for k, v in entries.items())
    if category in (None, "bin"):
        names = executables if isinstance(executables, list | Mapping) else []
        rows += [("bin", name, "") for name in sorted(str(name) for name in names)]
    return rows


def matches(name: str, pattern: str) -> bool:
    if not pattern:
        return True
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatch(name.lower(), pattern.lower())
    return pattern.lower() in name.lower()


@magic("sandbox_usage", "the sandbox's load now: busy/total, CPU, memory")
def sandbox_usage(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    try:
        sample = sample_load(context.connection.background)
    except SandboxError as error:
        raise _sandbox_error("read the load", error) from None
    return MagicResult(value=sample.load, bundles=[sample.line()])


@dataclasses.dataclass
class LoadSample:
    """The load at one moment: busy / total containers, and the host's CPU and memory."""

    busy: int | None
    total: int | None
    cpu: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    at: float = dataclasses.field(default_factory=time.time)

    @property
    def load(self) -> float:
        if not self.busy or not self.total:
            return 0.0
        return max(0.0, min(1.0, self.busy / self.total))

    def line(self) -> render.Bundle:
        memory = None
        if self.memory_used is not None:
            memory = (
                f"{render.human_bytes(self.memory_used)} / {render.human_bytes(self.memory_total)}"
            )
        return render.usage_line(self.load, self.busy, self.total, self.cpu, memory)


def sample_load(client: Sandbox, specs: Mapping[str, Any] | None = None) -> LoadSample:
    """One load sample: ``usages/`` on 3.x servers, ``specifications/`` counts on 2.x.

    ``specs``: the (cached) specifications, when the caller has them already. A field of the
    wrong type (``"cpu": {"usage": "lots"}``) raises :class:`SandboxProtocolError` naming it,
    so that ``%sandbox_usage`` and the panel say what is wrong instead of failing somewhere
    in the formatting.
    """
    if specs is None:
        specs = client.cached_specifications()
    if "host" in specs or "container" in specs:  # 3.x shapes
        usages = client.usages()
        read_usages = _FieldReader(client.url, "usages/", usages)
        read_specs = _FieldReader(client.url, "specifications/", specs)
        return LoadSample(
            busy=read_usages.count("container"),
            total=read_specs.count("container.count"),
            cpu=read_usages.number("cpu.usage"),
            memory_used=read_usages.count("memory.ram"),
            memory_total=read_specs.count("host.memory.ram"),
        )
    read = _FieldReader(client.url, "specifications/", client.specifications())
    return LoadSample(busy=read.count("containers.running"), total=read.count("containers.total"))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class _FieldReader:
    """Reads dotted fields of a server's answer; absent is None, a wrong type is an error."""

    url: str
    endpoint: str
    answer: Mapping[str, Any]

    def count(self, path: str) -> int | None:
        value = self._get(path)
        if value is None:
            return None
        if _is_number(value) and float(value).is_integer() and value >= 0:
            return int(value)
        raise self._malformed(path, value, "a count (a whole number, 0 or more)")

    def number(self, path: str) -> float | None:
        value = self._get(path)
        if value is None:
            return None
        if _is_number(value):
            return float(value)
        raise self._malformed(path, value, "a number")

    def _get(self, path: str) -> Any:
        value: Any = self.answer
        walked: list[str] = []
        for key in path.split("."):
            if value is None:
                return None
            if not isinstance(value, Mapping):
                raise self._malformed(".".join(walked), value, "an object")
            walked.append(key)
            value = value.get(key)
        return value

    def _malformed(self, path: str, value: object, expected: str) -> SandboxProtocolError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:60] + "…"
        return SandboxProtocolError(
            f"The sandbox at {self.url} answered {self.endpoint} with {path} = {shown}, where "
            f"the protocol has {expected}. It may not be a sandbox server, or a different "
            "version: check the URL, or the server's version and log."
        )


# -- the environment's files ---------------------------------------------------------------------


def environment_path(context: SandboxContext, path: str) -> str:
    """A path of the environment, relative to its root: relative paths start at the shell's
    current directory, absolute ones must be under the working directory."""
    cwd = context.session.state.cwd or WORKING_DIR
    full = posixpath.normpath(posixpath.join(cwd, path))
    if full != WORKING_DIR and not full.startswith(WORKING_DIR + "/"):
        raise MagicUsageError(f"{path!r} is outside the environment ({WORKING_DIR})")
    return posixpath.relpath(full, WORKING_DIR)


def _download_arguments(parser: _Parser) -> None:
    parser.add_argument(
        "path", nargs="?", help="a file of the environment (default: all of it, as .tgz)"
    )
    parser.add_argument("--uuid", help="another saved environment (default: the current one)")
    parser.add_argument("--to", default=".", help="local folder to save into (default: here)")
    parser.add_argument("--show", action="store_true", help="also show it below the cell")
    parser.add_argument("--force", action="store_true", help="overwrite an existing local file")


@magic(
    "sandbox_download",
    "save a file (or the whole environment) locally",
    arguments=_download_arguments,
)
def sandbox_download(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    uuid = args.uuid or context.session.environment
    if not uuid:
        raise MagicFailed("There is no environment yet: run a cell first, or give --uuid UUID.")
    remote = environment_path(context, args.path) if args.path else None
    name = posixpath.basename(remote) if remote and remote != "." else f"{uuid}.tgz"
    if remote == ".":
        remote = None
    target = local_target(context, args.to, name, args.force, "%sandbox_download --to")
    client = context.connection.background
    try:
        # What the server announces is all that is accepted: a server sending more is cut off.
        data = client.download(uuid, remote, max_bytes=client.check(uuid, remote)).getvalue()
    except SandboxError as error:
        raise _sandbox_error(f"download {args.path or 'the environment'}", error) from None
    write_new(target, data, args.force)
    bundles = [
        render.text(f"Saved {args.path or f'environment {uuid}'} ({len(data)} bytes) to {target}")
    ]
    if args.show and remote:
        bundles.append(_shown(name, data))
    return MagicResult(value=str(target), bundles=bundles)


def local_target(
    context: SandboxContext, folder: str, name: str, force: bool, purpose: str
) -> Path:
    """Where a download goes: ``name`` (a base name) directly in ``folder``, never elsewhere.

    The folder must be inside the notebook's folder (:meth:`SandboxContext.local_path`);
    ``purpose`` names the magic or button in a refusal.
    """
    base = context.local_path(folder, f"{purpose} would write into")
    if not base.is_dir():
        raise MagicFailed(f"{purpose} {folder}: no such local folder ({base}); create it first.")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise MagicUsageError(f"{name!r} cannot be a local file name")
    target = base / name
    if target.is_symlink():
        raise MagicFailed(f"{target} is a symbolic link: refusing to write through it.")
    if target.exists() and not force:
        raise MagicFailed(f"{target} already exists: add --force to overwrite it.")
    if target.exists() and not target.is_file():
        raise MagicFailed(f"{target} exists and is not a regular file: refusing to replace it.")
    return target


def write_new(target: Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``target``, a new file; with ``force``, replace it.

    Never through a symbolic link; a replaced file is swapped in whole (written beside it,
    then renamed over it), so that a hard link to a file elsewhere is never written through.
    """
    if not force:
        _write_file(target, data, exclusive_name=target)
        return
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    _write_file(partial, data, exclusive_name=target)
    try:
        os.replace(partial, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise MagicFailed(f"Cannot write {target}: {error}") from None


def _write_file(path: Path, data: bytes, exclusive_name: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise MagicFailed(
            f"{exclusive_name} already exists: add --force to overwrite it."
        ) from None
    except OSError as error:
        raise MagicFailed(f"Cannot write {exclusive_name}: {error}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except OSError as error:  # a full disk: no half-written file is left
        with contextlib.suppress(OSError):
            path.unlink()
        raise MagicFailed(f"Cannot write {exclusive_name}: {error}") from None


def _shown(name: str, data: bytes) -> render.Bundle:
    return render.file_bundle(name, mime_type(name), data)


def _upload_arguments(parser: _Parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="LOCAL", help="local files or folders")
    parser.add_argument("--as", dest="name", help="name in the environment (one LOCAL only)")


@magic(
    "sandbox_upload",
    "put local files or folders into the current environment",
    arguments=_upload_arguments,
)
def sandbox_upload(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    if args.name and len(args.paths) != 1:
        raise MagicUsageError("%sandbox_upload: --as names one file; give a single LOCAL path")
    local = [context.local_path(path, "%sandbox_upload would read") for path in args.paths]
    missing = [str(path) for path in local if not path.exists()]
    if missing:
        raise MagicFailed(f"No such local file or folder: {', '.join(missing)}")
    names = [args.name] if args.name else [path.name for path in local]
    try:
        archive = build_archive(local, names, reserved=(STATE_DIR,))
    except (ArchiveError, OSError) as error:
        raise MagicFailed(f"Cannot upload: {error}") from None
    session = context.session
    config: dict[str, Any] = {"commands": ["true"], "save": True}
    if session.environment:
        config["environment"] = session.environment
    try:
        answer = context.connection.client.execute(config, archive)
    except SandboxError as error:
        raise _sandbox_error("upload", error) from None
    environment, expire = answer.get("environment"), answer.get("expire")
    if not isinstance(environment, str) or not protocol.is_uuid(environment):
        raise MagicFailed(
            f"The sandbox at {context.connection.url} answered the upload without an environment "
            f"uuid (environment = {environment!r}): the files are not there. Check that it is a "
            "sandbox server, then upload again."
        )
    session.uploaded(environment, expire if isinstance(expire, str) else None)
    return MagicResult(
        value=names,
        bundles=[
            render.text(
                f"Uploaded {', '.join(names)}: there for the next cell "
                f"(environment {session.environment})."
            )
        ],
    )


# -- what every cell gets -------------------------------------------------------------------------


def _env_arguments(parser: _Parser) -> None:
    parser.add_argument("assignments", nargs="*", metavar="NAME=VALUE")
    parser.add_argument("--unset", action="append", default=[], metavar="NAME")


@magic("sandbox_env", "variables sent as environ with every cell", arguments=_env_arguments)
def sandbox_env(context: SandboxContext, args: argparse.Namespace, cell: str | None) -> MagicResult:
    environ = context.session.environ
    updates = {}
    for assignment in args.assignments:
        name, equals, value = assignment.partition("=")
        ok, reason = protocol.validate_config({"commands": ["true"], "environ": {name: value}})
        if not equals or not ok:
            raise MagicUsageError(
                f"%sandbox_env: {assignment!r}: write NAME=VALUE"
                + (f" ({reason})" if equals else "")
            )
        updates[name] = value
    environ.update(updates)
    for name in args.unset:
        environ.pop(name, None)
    rows = sorted(environ.items())
    bundle = (
        render.table(["name", "value"], rows, caption="Sent with every cell")
        if rows
        else (render.text("No variables are sent with the cells."))
    )
    return MagicResult(value=dict(environ), bundles=[bundle])


def _timeout_arguments(parser: _Parser) -> None:
    parser.add_argument("seconds", nargs="?", type=float, help="per-cell limit (default: show)")


@magic("sandbox_timeout", "the per-cell time limit", arguments=_timeout_arguments)
def sandbox_timeout(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    session = context.session
    server = session.server_timeout()
    if args.seconds is not None:
        if not (args.seconds > 0 and math.isfinite(args.seconds)):
            raise MagicUsageError("%sandbox_timeout: give a positive number of seconds")
        if server is not None and args.seconds > server:
            raise MagicFailed(
                f"The sandbox allows at most {server:g} s per request: that is its "
                "execute_timeout, set on the server (sandbox-kernel serve --execute-timeout "
                "SECONDS for the embedded one). The limit stays "
                f"{_timeout_text(session.timeout, server)}."
            )
        session.timeout = args.seconds
    limit = session.timeout if session.timeout is not None else server
    return MagicResult(
        value=limit,
        bundles=[render.text(f"Cell time limit: {_timeout_text(session.timeout, server)}.")],
    )


# -- the panel -------------------------------------------------------------------------------------


def _panel_arguments(parser: _Parser) -> None:
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between load refreshes (default 2)")  # fmt: skip


@magic("sandbox_panel", "a live panel: overview, specs, libraries, load, files",
       arguments=_panel_arguments)  # fmt: skip
def sandbox_panel(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    if not (0.5 <= args.interval <= 600):
        raise MagicUsageError("%sandbox_panel: --interval is between 0.5 and 600 seconds")
    from ..views.panel import SandboxPanel  # ipywidgets is only needed here

    return MagicResult(view=SandboxPanel(context, interval=args.interval))
