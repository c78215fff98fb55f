"""The embedded sandbox server: the PremierLangage sandbox protocol (3.x shapes) on aiohttp.

Started by ``sandbox-kernel serve`` (or ``python -m sandbox_kernel.server``). It shares only the
protocol definitions (:mod:`sandbox_kernel.protocol`, :mod:`sandbox_kernel.archive`) with the
client side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from ..discovery import advertisement_path, default_data_dir, write_advertisement
from .app import SandboxApp
from .executor import Executor
from .libraries import LibraryCache
from .runners import Isolation, IsolationError, RunnerPool
from .settings import ServerSettings, parse_size
from .storage import Storage
from .sysinfo import UsageSampler

__all__ = ["ServerSettings", "add_arguments", "main", "serve", "settings_from_args"]

log = logging.getLogger("sandbox_kernel.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sandbox-kernel serve``."""
    defaults = ServerSettings()
    add = parser.add_argument
    add("--host", default=defaults.host, help="address to bind (default: loopback only)")
    add("--port", type=int, default=defaults.port, help="port, 0 for a free one (default 7000)")
    add("--workers", type=int, default=defaults.workers, help="parallel executions (default 8)")
    add(
        "--execute-timeout",
        type=float,
        default=defaults.execute_timeout,
        help="time budget of one execute/ request, seconds (default 10)",
    )
    add(
        "--expiration",
        type=int,
        default=defaults.expiration,
        help="lifetime of a saved environment, seconds (default 86400)",
    )
    add(
        "--data-dir",
        type=Path,
        help="where environments live (default: sandbox-kernel/ under the Jupyter data directory)",
    )
    add(
        "--max-storage",
        type=parse_size,
        default=defaults.max_storage,
        help="bound on stored environments, e.g. 10G (default 10G)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="bearer token clients must send (default: random)")
    tokens.add_argument("--no-token", action="store_true", help="accept requests without token")
    add(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host/Origin name to accept besides loopback ones (repeatable)",
    )
    add(
        "--isolation",
        choices=["auto", "bwrap", "none"],
        default="auto",
        help="bwrap: require bubblewrap; none: run commands unconfined (default: auto)",
    )
    caps = parser.add_argument_group("caps")
    caps.add_argument("--workdir-quota", type=parse_size, default=defaults.workdir_quota)
    caps.add_argument("--max-upload", type=parse_size, default=defaults.max_upload)
    caps.add_argument("--max-archive-entries", type=int, default=defaults.max_archive_entries)
    caps.add_argument("--max-archive-bytes", type=parse_size, default=defaults.max_archive_bytes)
    caps.add_argument(
        "--max-output",
        type=parse_size,
        default=defaults.max_output,
        help="captured bytes per stream and command",
    )
    caps.add_argument("--max-processes", type=int, default=defaults.max_processes)
    caps.add_argument("--memory-limit", type=parse_size, default=defaults.memory_limit)
    caps.add_argument(
        "--cpu-limit", type=int, default=defaults.cpu_limit, help="CPU seconds per process"
    )
    caps.add_argument("--max-parts", type=int, default=defaults.max_parts)
    add("--info-file", type=Path, help=argparse.SUPPRESS)
    add("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    add(
        "--no-advertise",
        action="store_true",
        help="do not write the server's URL and token into the Jupyter runtime directory",
    )
    add("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    token = None if args.no_token else (args.token or secrets.token_urlsafe(24))
    return ServerSettings(
        host=args.host,
        port=args.port,
        workers=args.workers,
        execute_timeout=args.execute_timeout,
        expiration=args.expiration,
        data_dir=args.data_dir or default_data_dir(),
        token=token,
        allowed_hosts=args.allowed_host,
        isolation=args.isolation,
        max_storage=args.max_storage,
        workdir_quota=args.workdir_quota,
        max_upload=args.max_upload,
        max_archive_entries=args.max_archive_entries,
        max_archive_bytes=args.max_archive_bytes,
        max_output=args.max_output,
        max_processes=args.max_processes,
        memory_limit=args.memory_limit,
        cpu_limit=args.cpu_limit,
        max_parts=args.max_parts,
    )


async def serve(
    settings: ServerSettings,
    advertise: bool = True,
    info_file: Path | None = None,
    exit_with_parent: bool = False,
) -> None:
    """Run until SIGTERM or SIGINT; then kill every job and remove what was advertised."""
    assert settings.data_dir is not None
    # Bind first: a busy port fails at once, before any sandbox is started.
    sock = _listen(settings.host, settings.port)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(sock.close)
        isolation = await Isolation.probe(settings)
        if isolation.cgroups is not None:
            cleanup.push_async_callback(asyncio.to_thread, isolation.cgroups.remove)
        storage = Storage(settings, settings.data_dir)
        await asyncio.to_thread(storage.open, isolation.uid)
        cleanup.push_async_callback(asyncio.to_thread, storage.close)
        pool = RunnerPool(isolation, storage.work, settings.workers)
        cleanup.push_async_callback(pool.close)
        pool.fill()
        sampler = UsageSampler(storage.root)
        sampler.start()
        cleanup.push_async_callback(sampler.stop)
        libraries = LibraryCache(pool)
        cleanup.push_async_callback(libraries.close)
        executor = Executor(settings, storage, isolation, pool)
        app = SandboxApp(settings, storage, isolation, executor, libraries, sampler).build()
        # handler_cancellation: a client that disconnects mid-execute cancels its handler,
        # whose cleanup kills the run (aiohttp does not cancel handlers by default).
        # shutdown_timeout: at SIGTERM, requests still running are cancelled (and their jobs
        # killed) after half a second instead of aiohttp's default minute.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        cleanup.push_async_callback(runner.cleanup)
        await web.SockSite(runner, sock).start()
        url = _url_of(sock, settings.host)
        published = [p for p in (info_file, advertisement_path() if advertise else None) if p]
        for path in published:
            write_advertisement(path, url, settings.token)
            cleanup.callback(_unlink, path)
        _announce(url, settings, isolation, published)
        await _wait_for_stop(storage, settings, exit_with_parent)
        log.info("stopping: killing running jobs")


async def _wait_for_stop(
    storage: Storage, settings: ServerSettings, exit_with_parent: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    background = [loop.create_task(_sweep_forever(storage, settings.sweep_interval))]
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
        sock.listen(128)
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


def _announce(url: str, settings: ServerSettings, isolation: Isolation, files: list[Path]) -> None:
    lines = [f"sandbox-kernel: serving the sandbox protocol on {url}"]
    if isolation.isolated:
        cgroups = isolation.cgroups.describe() if isolation.cgroups else "rlimits only"
        lines.append(f"  isolation: bubblewrap, {cgroups}, commands run as an unprivileged user")
    else:
        lines.append(
            "  isolation: NONE - commands are NOT ISOLATED and can read and write "
            "this machine as the server's user"
        )
    lines.append(f"  data dir: {settings.data_dir}")
    if settings.token:
        lines.append(f"  token: {settings.token}")
    else:
        lines.append("  token: none (--no-token): anyone who can reach the port can run commands")
    lines += [f"  advertised in: {path}" for path in files]
    for line in lines:
        print(line, flush=True)
        log.debug(line)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A private server stops when the process that started it is gone (killed, say)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.info("the process that started this server is gone: stopping")
    stop.set()


async def _sweep_forever(storage: Storage, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await asyncio.to_thread(storage.sweep)
        except OSError:
            log.exception("sweeping expired environments failed")
            continue
        if removed:
            log.info("removed %d expired environments", removed)


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
        settings = settings_from_args(args)
        asyncio.run(
            serve(
                settings,
                advertise=not args.no_advertise,
                info_file=args.info_file,
                exit_with_parent=args.exit_with_parent,
            )
        )
    except (IsolationError, ValueError) as error:
        print(f"sandbox-kernel serve: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"sandbox-kernel serve: cannot start: {error}. Is the port already in use? "
            "Try --port 0 for a free one.",
            file=sys.stderr,
        )
        return 1
    return 0
