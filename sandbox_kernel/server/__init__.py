"""The embedded sandbox server: the PremierLangage sandbox protocol (3.x shapes) on aiohttp.

Started by ``sandbox-kernel serve`` (or ``python -m sandbox_kernel.server``). It shares only the
protocol definitions (:mod:`sandbox_kernel.protocol`, :mod:`sandbox_kernel.archive`) with the
client side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from aiohttp import web

from ..discovery import (
    advertisement_path,
    default_data_dir,
    default_token_path,
    new_token,
    read_token_file,
    write_advertisement,
    write_token_file,
)
from .app import SandboxApp
from .connections import ConnectionGuard, listen_backlog, raise_descriptor_limit
from .executor import Executor
from .hub import resolve_hub_settings
from .libraries import LibraryCache
from .runners import Isolation, IsolationError, RunnerPool
from .settings import ServerSettings, add_setting_options
from .storage import Storage
from .sysinfo import UsageSampler

__all__ = [
    "Parts",
    "Served",
    "ServerSettings",
    "TokenSource",
    "add_arguments",
    "add_worker_arguments",
    "assembled_app",
    "assembled_parts",
    "assembled_served",
    "main",
    "resolve_token",
    "serve",
    "settings_from_args",
]

log = logging.getLogger("sandbox_kernel.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sandbox-kernel serve``: one per setting (see :class:`ServerSettings`),
    then the ones that are not settings."""
    add_setting_options(parser, by_hand={"token": _add_token_options})
    add = parser.add_argument
    add("--info-file", type=Path, help=argparse.SUPPRESS)
    add("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    add(
        "--no-advertise",
        action="store_true",
        help="do not write the server's URL and token into the Jupyter runtime directory",
    )
    _add_log_level(parser)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sandbox-kernel worker``: the settings of ``serve`` (caps, limits,
    ``--workers``, ``--data-dir``, the cluster's), which a worker applies to its runs. A
    worker listens on no port and checks no token: the fronts do."""
    add_setting_options(parser)
    _add_log_level(parser)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)"
    )


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    """Three ways to give the one ``token`` setting (see :func:`resolve_token`)."""
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file holding the bearer token clients must send; if it does not exist, a random "
        "token is written there (mode 0600). Default: a random token, written only to the "
        "0600 file the server advertises in the Jupyter runtime directory",
    )
    tokens.add_argument(
        "--token",
        help="the bearer token itself. WARNING: every local user sees a command line (ps); "
        "prefer --token-file",
    )
    tokens.add_argument("--no-token", action="store_true", help="accept requests without token")


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """The server's token and where a local client can read it."""

    token: str | None
    #: The file holding it (``--token-file``); None for ``--token``, ``--no-token`` and the
    #: default, whose token goes into the files :func:`serve` publishes.
    file: Path | None = None


def resolve_token(args: argparse.Namespace) -> TokenSource:
    """``--no-token``, ``--token``, ``--token-file`` (read, or created with a random token),
    else a random token. Raises ValueError with what to do when the file cannot be used."""
    if args.no_token:
        return TokenSource(None)
    if args.token:
        return TokenSource(args.token)
    if args.token_file is not None:
        return TokenSource(_load_or_create_token(args.token_file), args.token_file)
    return TokenSource(new_token())


def _load_or_create_token(path: Path) -> str:
    if not os.path.lexists(path):
        token = new_token()
        try:
            write_token_file(path, token)
            return token
        except FileExistsError:
            pass  # made meanwhile: read it
        except OSError as error:
            raise ValueError(
                f"cannot create the token file {path}: {error.strerror}. Create its directory, "
                "or give another --token-file"
            ) from None
    return read_token_file(path)


def settings_from_args(
    args: argparse.Namespace, token: TokenSource | None = None
) -> ServerSettings:
    """The settings ``args`` describe; ``token`` if already resolved (see :func:`resolve_token`)."""
    token = token or resolve_token(args)
    return ServerSettings.from_args(
        args, token=token.token, data_dir=args.data_dir or default_data_dir()
    )


@dataclasses.dataclass(frozen=True)
class Parts:
    """What runs requests on this machine: a single server's, or a cluster worker's."""

    isolation: Isolation
    storage: Storage
    pool: RunnerPool
    executor: Executor


@contextlib.asynccontextmanager
async def assembled_parts(
    settings: ServerSettings, storage_type: Callable[[ServerSettings, Path], Storage] = Storage
) -> AsyncIterator[Parts]:
    """Isolation, storage (of ``storage_type``: a cluster worker's publishes its saves),
    runners and executor, started in order and stopped in the reverse one."""
    assert settings.data_dir is not None
    async with contextlib.AsyncExitStack() as cleanup:
        isolation = await Isolation.probe(settings)
        if isolation.cgroups is not None:
            cleanup.push_async_callback(asyncio.to_thread, isolation.cgroups.remove)
        if isolation.cpu_shares is not None:
            cleanup.push_async_callback(asyncio.to_thread, isolation.cpu_shares.remove)
        storage = storage_type(settings, settings.data_dir)
        await asyncio.to_thread(storage.open, isolation.uid)
        cleanup.push_async_callback(asyncio.to_thread, storage.close)
        pool = RunnerPool(isolation, storage.work, settings.workers)
        cleanup.push_async_callback(pool.close)
        pool.fill()
        yield Parts(isolation, storage, pool, Executor(settings, storage, isolation, pool))


@dataclasses.dataclass(frozen=True)
class Served:
    """An application :func:`serve` puts behind its socket, and what it says about it."""

    app: web.Application
    #: Printed when the server starts, after the URL: isolation, data dir...
    lines: list[str]
    #: Removes what expired (in a thread, every ``--sweep-interval``); how many went.
    sweep: Callable[[], int] | None = None


@contextlib.asynccontextmanager
async def assembled_app(
    settings: ServerSettings,
) -> AsyncIterator[tuple[web.Application, Isolation, Storage]]:
    """The single server's application and the parts it runs on (:func:`assembled_parts`,
    load sampler, library cache). ``serve`` puts it behind a socket; tests may put it behind
    aiohttp's test server."""
    async with contextlib.AsyncExitStack() as cleanup:
        parts = await cleanup.enter_async_context(assembled_parts(settings))
        sampler = UsageSampler(parts.storage.root)
        sampler.start()
        cleanup.push_async_callback(sampler.stop)
        libraries = LibraryCache(parts.pool)
        cleanup.push_async_callback(libraries.close)
        app = SandboxApp(
            settings, parts.storage, parts.isolation, parts.executor, libraries, sampler
        ).build()
        yield app, parts.isolation, parts.storage


@contextlib.asynccontextmanager
async def assembled_served(settings: ServerSettings) -> AsyncIterator[Served]:
    """The single server as :func:`serve` runs it."""
    async with assembled_app(settings) as (app, isolation, storage):
        lines = [isolation_line(isolation), f"  data dir: {settings.data_dir}"]
        yield Served(app, lines, storage.sweep)


async def serve(
    settings: ServerSettings,
    advertise: bool = True,
    info_file: Path | None = None,
    exit_with_parent: bool = False,
    token_file: Path | None = None,
    assemble: Callable[[ServerSettings], AbstractAsyncContextManager[Served]] = assembled_served,
) -> None:
    """Run until SIGTERM or SIGINT; then kill every job and remove what was advertised.

    ``assemble`` makes the application: the single server's by default, a cluster front's
    with ``--cluster`` (:func:`.cluster.front.assembled_front`).

    ``token_file`` is where the token already is (``--token-file``); without it the token is
    written only into the 0600 files published here (a token file of its own in the runtime
    directory if nothing is advertised), and the path is printed, never the token.
    """
    assert settings.data_dir is not None
    # Before anything opens descriptors or starts runners: connections must not starve them.
    raise_descriptor_limit()
    # Bind first: a busy port fails at once, before any sandbox is started.
    sock = _listen(settings.host, settings.port)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(sock.close)
        served = await cleanup.enter_async_context(assemble(settings))
        app = served.app
        guard = ConnectionGuard(settings.header_timeout, settings.workers)
        # First, so that the header deadline ends as soon as aiohttp has parsed the headers,
        # whatever the other middlewares answer.
        app.middlewares.insert(0, guard.middleware)
        # handler_cancellation: a client that disconnects mid-execute cancels its handler,
        # whose cleanup kills the run (aiohttp does not cancel handlers by default).
        # shutdown_timeout: at SIGTERM, requests still running are cancelled (and their jobs
        # killed) after half a second instead of aiohttp's default minute.
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=0.5,
            keepalive_timeout=settings.keepalive_timeout,
        )
        await runner.setup()
        cleanup.push_async_callback(runner.cleanup)
        # Served through the guard, not a SockSite: it wraps aiohttp's protocol factory.
        listener = await guard.listen(runner.server, sock)
        cleanup.callback(listener.close)
        url = _url_of(sock, settings.host) + (settings.base_path or "/").removeprefix("/")
        published = [p for p in (info_file, advertisement_path() if advertise else None) if p]
        for path in published:
            write_advertisement(path, url, settings.token)
            cleanup.callback(_unlink, path)
        if settings.token and token_file is None and not published:
            token_file = default_token_path()
            token_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _unlink(token_file)  # left by a crashed server with our pid
            write_token_file(token_file, settings.token)
            cleanup.callback(_unlink, token_file)
        _announce(url, settings, served.lines, published, token_file)
        await _wait_for_stop(served.sweep, settings, exit_with_parent)
        log.info("stopping: killing running jobs")


async def _wait_for_stop(
    sweep: Callable[[], int] | None, settings: ServerSettings, exit_with_parent: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    background = []
    if sweep is not None:
        background.append(loop.create_task(_sweep_forever(sweep, settings.sweep_interval)))
    if exit_with_parent:
        background.append(loop.create_task(_watch_parent(os.getppid(), stop)))
    try:
        await stop.wait()
    finally:
        for task in background:
            task.cancel()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(listen_backlog())
    except OSError:
        sock.close()
        raise
    return sock


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _announce(
    url: str,
    settings: ServerSettings,
    about: list[str],
    files: list[Path],
    token_file: Path | None,
) -> None:
    lines = [f"sandbox-kernel: serving the sandbox protocol on {url}", *about]
    if settings.hub_auth:
        lines.append(
            f"  users: JupyterHub's (--hub-auth), with the scope "
            f"access:services!service={settings.hub_service_name}; "
            f"{settings.per_user_runs} runs each at a time"
        )
    else:
        lines.append(f"  token: {_where_the_token_is(settings, files, token_file)}")
    lines += [f"  advertised in: {path}" for path in files]
    for line in lines:
        print(line, flush=True)
        log.debug(line)


def isolation_line(isolation: Isolation) -> str:
    """How commands are isolated, as the start banner says it."""
    if isolation.isolated:
        cgroups = isolation.cgroups.describe() if isolation.cgroups else "rlimits only"
        return f"  isolation: bubblewrap, {cgroups}, commands run as an unprivileged user"
    return (
        "  isolation: NONE - commands are NOT ISOLATED and can read and write "
        "this machine as the server's user"
    )


def _where_the_token_is(
    settings: ServerSettings, files: list[Path], token_file: Path | None
) -> str:
    """Where a client finds the token: never the token itself, which would land in logs."""
    if not settings.token:
        return "none (--no-token): anyone who can reach the port can run commands"
    if token_file is not None:
        return f"in {token_file} (readable by you only)"
    if files:
        return f'in {files[0]} (its "token"; readable by you only)'
    return "the one given with --token (every local user can see it with ps)"


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A private server stops when the process that started it is gone (killed, say)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.info("the process that started this server is gone: stopping")
    stop.set()


async def _sweep_forever(sweep: Callable[[], int], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await asyncio.to_thread(sweep)
        except OSError:
            log.exception("sweeping expired environments failed")
            continue
        if removed:
            log.info("removed %d expired environments", removed)


def _assembler(
    settings: ServerSettings,
) -> Callable[[ServerSettings], AbstractAsyncContextManager[Served]]:
    """The single server's application, or with ``--cluster`` a front's: imported only then,
    since the cluster's libraries (Redis, boto3, Celery) cost every private server's start."""
    if not settings.cluster:
        return assembled_served
    from .cluster.front import assembled_front

    return assembled_front


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sandbox-kernel serve", description="Run the embedded sandbox server."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Entry point shared by ``sandbox-kernel serve`` and ``python -m sandbox_kernel.server``."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        token = resolve_token(args)
        settings = settings_from_args(args, token)
        if settings.hub_auth:  # the Hub's users, not a token, say who may run
            resolve_hub_settings(settings, os.environ)
            settings.token = None
            args.no_advertise = True
        asyncio.run(
            serve(
                settings,
                advertise=not args.no_advertise,
                info_file=args.info_file,
                exit_with_parent=args.exit_with_parent,
                token_file=token.file,
                assemble=_assembler(settings),
            )
        )
    except (IsolationError, ValueError) as error:
        print(f"sandbox-kernel serve: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        advice = {
            errno.EADDRINUSE: " Is the port already in use? Try --port 0 for a free one.",
            errno.EADDRNOTAVAIL: " Is --host an address of this machine?",
            errno.EMFILE: " Raise the file descriptor limit (ulimit -Hn, LimitNOFILE=).",
        }.get(error.errno or 0, "")
        print(f"sandbox-kernel serve: {error}.{advice}", file=sys.stderr)
        return 1
    return 0
