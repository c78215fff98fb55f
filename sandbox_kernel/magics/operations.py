"""The sandbox magics. Each is registered once (see :mod:`.core`); both front-ends use them."""

from __future__ import annotations

import argparse
import math
import posixpath

from .. import protocol
from .._errors import SandboxError
from .._generations import CATEGORIES
from ..protocol import WORKING_DIR
from ..session import mime_type
from ..session.context import OperationFailed, SandboxContext
from ..views import render
from .core import REGISTRY, MagicFailed, MagicResult, MagicUsageError, _Parser, magic

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
    context.refuse_while_grading("%sandbox_connect")
    try:
        settings = context.connect(args.url, args.token)
        version = context.specs().sandbox_version
    except SandboxError as error:
        raise _sandbox_error(f"connect to {args.url}", error) from None
    about = f"sandbox {version}" if version else "a sandbox that does not tell its version"
    return MagicResult(
        value=settings.url,
        bundles=[
            render.text(
                f"Connected to {settings.url} ({about}); the next cell starts "
                "in a fresh environment there."
            )
        ],
    )


@magic("sandbox_status", "URL, environment uuid and expiry, isolation, limits")
def sandbox_status(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    settings, session = context.settings, context.session
    try:
        specs = context.specs()
        isolation = render.isolation_text(specs.isolation)
        server_timeout = specs.execute_timeout
    except SandboxError as error:
        isolation, server_timeout = f"not known (sandbox unreachable: {error})", None
    status = {
        "url": settings.url,
        "server": settings.describe(),
        "environment": session.environment or "none yet (the next cell starts a fresh one)",
        "lifetime": render.expires_text(session.expire) if session.environment else "",
        "isolation": isolation,
        "cell time limit": _timeout_text(session.timeout, server_timeout),
        "environ": ", ".join(f"{k}={v}" for k, v in session.environ.items()) or "none",
        "current directory": session.state.cwd or WORKING_DIR,
        "cells run": session.cells,
    }
    status = {name: value for name, value in status.items() if value != ""}
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
    context.refuse_while_grading("%sandbox_use")  # another student's environment, say
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
    # Only specifications/: the load is %sandbox_usage's (usages/ takes 2 s on the public
    # server, and a look at the specifications must not pay for it).
    try:
        specs = context.specs(refresh=args.refresh)
    except SandboxError as error:
        raise _sandbox_error("read the specifications", error) from None
    return MagicResult(value=specs, bundles=[render.specifications(context.url, specs)])


def _libraries_arguments(parser: _Parser) -> None:
    parser.add_argument("pattern", nargs="?", default="", help="part of a name, or a glob")
    parser.add_argument("--category", choices=list(CATEGORIES), help="only this category")


@magic("sandbox_libraries", "search what the sandbox has installed", arguments=_libraries_arguments)
def sandbox_libraries(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    try:
        rows = context.inventory().rows(args.category, args.pattern)
    except SandboxError as error:
        raise _sandbox_error("list the libraries", error) from None
    shown = rows[:_LIBRARY_ROWS]
    return MagicResult(value=rows, bundles=[render.libraries(shown, len(rows), _LIBRARY_ROWS)])


@magic("sandbox_usage", "the sandbox's load now: busy/total, CPU, memory")
def sandbox_usage(
    context: SandboxContext, args: argparse.Namespace, cell: str | None
) -> MagicResult:
    try:
        sample = context.load_sample()
    except SandboxError as error:
        raise _sandbox_error("read the load", error) from None
    bundles = [render.usage_line(sample.load)]
    if sample.workers is not None:  # a sandbox cluster: the load of each of its workers
        bundles.append(render.workers_table(sample.workers))
    if sample.load.users is not None:  # a teacher, on a sandbox that knows its users
        bundles.append(render.users_table(sample.load.users))
    return MagicResult(value=sample.load.fraction, bundles=bundles)


# -- the environment's files ---------------------------------------------------------------------


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
    context.refuse_while_grading("%sandbox_download")
    uuid = args.uuid or context.session.environment
    if not uuid:
        raise MagicFailed("There is no environment yet: run a cell first, or give --uuid UUID.")
    try:
        remote = context.remote_path(args.path) if args.path else None
    except OperationFailed as error:  # a path the user wrote: bad use, nothing was sent
        raise MagicUsageError(f"%sandbox_download: {error}") from None
    name = posixpath.basename(remote) if remote and remote != "." else f"{uuid}.tgz"
    if remote == ".":
        remote = None
    target = context.local_target(args.to, name, args.force, "%sandbox_download --to")
    try:
        data = context.fetch(remote, uuid)
    except SandboxError as error:
        raise _sandbox_error(f"download {args.path or 'the environment'}", error) from None
    context.save_locally(target, data, args.force)
    if args.show and remote:  # one output: the file itself
        return MagicResult(
            value=str(target), bundles=[render.file_bundle(name, mime_type(name), data)]
        )
    saved = f"Saved {args.path or f'environment {uuid}'} ({len(data)} bytes) to {target}"
    return MagicResult(value=str(target), bundles=[render.text(saved)])


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
    context.refuse_while_grading("%sandbox_upload")
    if args.name and len(args.paths) != 1:
        raise MagicUsageError("%sandbox_upload: --as names one file; give a single LOCAL path")
    try:
        environment, names, directory = context.upload(args.paths, args.name)
    except SandboxError as error:
        raise _sandbox_error("upload", error) from None
    told = f"Uploaded {', '.join(names)} to {directory}: there for the next cell "
    return MagicResult(value=names, bundles=[render.text(f"{told}(environment {environment}).")])


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
    try:
        server = context.specs().execute_timeout
    except SandboxError:
        server = None
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
