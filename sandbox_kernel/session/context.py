"""The one façade the front-ends call: the kernel, the IPython magics and the panel.

A :class:`SandboxContext` is one notebook's view of its sandbox: the settings resolved once
(:mod:`sandbox_kernel.settings`), the :class:`Session` that carries environment and shell state,
the typed facts of the server (specifications, load, inventory), its files (download,
upload) and the local paths magics may touch. Each operation is written here once; front-ends
only adapt what it returns.

Threads: cells use the session's client, in the front-end's worker thread. Every other request
(facts, files, uploads) goes through one worker thread owned by the context, with its own
client, since a ``requests`` session is not meant to be shared between threads. Blocking
methods may be called from any thread except an event loop's; an event loop uses
:meth:`SandboxContext.submit` and awaits the future. The inventory (``libraries/``, 1 to 2 s on
the public server) is fetched once, in the background, and kept.

Magic lines run on the user's machine, and a notebook may come from anyone: every local path a
magic reads or writes goes through :meth:`SandboxContext.local_path`, which keeps it inside the
folder the front-end started in (Jupyter starts a kernel in the notebook's folder). A URL named
by the notebook (``%sandbox_connect``) gets only the token given with it, or the configured
token when it is the configured sandbox's origin: never the local server's token. The user's
JupyterHub token, when it is the configured token, goes back to the configured sandbox's exact
URL only: the Hub's origin serves every other user's server too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import os
import posixpath
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .._errors import SandboxCancelled, SandboxConfigError, SandboxError
from .._generations import Inventory, Load, Specs
from .._units import format_size
from .._wire import normalise_url
from ..archive import ArchiveError, build_archive
from ..client import LoadSample, Sandbox, scope_cancelled
from ..protocol import WORKING_DIR
from ..settings import (
    COMMAND_NAMES,
    Resolved,
    SandboxSettings,
    SettingNames,
    resolve,
    same_origin,
)
from .cellscript import STATE_DIR
from .local_paths import IPYTHON_SWITCH, HostPathRefused, host_paths_allowed_by_environment
from .session import Session

_T = TypeVar("_T")
#: Seconds between two looks at an interrupt while waiting for the worker.
_POLL = 0.05
#: The user's timeouts, kept across ``%sandbox_connect``.
_TIMEOUT_VARIABLES = ("SANDBOX_TIMEOUT", "SANDBOX_SIDE_TIMEOUT")
#: Set to 1 in the environment of the kernels ``sandbox-kernel grade`` starts: the notebook is
#: a submission, and magics that touch local files or change the sandbox are refused.
GRADING_VARIABLE = "SANDBOX_GRADING"


class OperationFailed(Exception):
    """An operation was asked right but could not be done (a file exists, the sandbox said
    no); the message says what happened and what to do. Nothing was lost."""


class SandboxNotConfigured(OperationFailed):
    """The settings name no usable sandbox (a malformed URL or timeout, a private server that
    did not start): every operation says so, until ``%sandbox_connect`` names one."""


class Connection:
    """Settings with their two clients: one for cells, one for the context's worker thread."""

    def __init__(self, resolved: Resolved) -> None:
        self.resolved = resolved
        settings = self.settings = resolved.settings
        self.client = Sandbox(settings.url, timeout=settings.timeout, token=settings.token,
                              timeout_setting=settings.timeout_setting,
                              advise=settings.refusal_advice)  # fmt: skip
        self.side = Sandbox(settings.url, timeout=settings.side_timeout, token=settings.token,
                            timeout_setting=settings.side_timeout_setting,
                            advise=settings.refusal_advice)  # fmt: skip

    def close(self) -> None:
        self.client.close()
        self.side.close()
        self.resolved.close()


class SandboxContext:
    """The sandbox of one notebook: connection, session, facts, files and local paths.

    ``url``, ``token``, ``timeout``, ``side_timeout``: what the front-end's user gave
    explicitly (``names`` says how, for errors); the rest is resolved by
    :func:`sandbox_kernel.settings.resolve` on first use. A setting that cannot be used does
    not raise here: :attr:`problem` says what is wrong, and every operation raises
    :class:`OperationFailed` with that text, so that a kernel still starts and tells it.

    ``allow_host_paths``: magics may read and write local paths outside the folder the
    front-end started in (``SANDBOX_ALLOW_HOST_PATHS=1`` allows it too). ``host_paths_switch``
    is how a refusal tells the user to allow it, in the words of the front-end.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
        side_timeout: float | None = None,
        *,
        names: SettingNames = COMMAND_NAMES,
        allow_host_paths: bool = False,
        host_paths_switch: str = IPYTHON_SWITCH,
    ) -> None:
        self._given = (url, token, timeout, side_timeout)
        self._names = names
        self._connection: Connection | None = None
        #: The settings of the configuration (not of a ``%sandbox_connect``): their origin
        #: alone may get the configured token back.
        self._configured: SandboxSettings | None = None
        #: The private embedded server's connection after ``%sandbox_connect`` went elsewhere:
        #: kept (with its environments) so that the notebook can come back to it.
        self._private: Connection | None = None
        self._session: Session | None = None
        self._problem: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sandbox-side"
        )
        self._worker_thread: int | None = None
        self._inventory: concurrent.futures.Future[Inventory] | None = None
        #: The only local folder magics read and write in (symlinks resolved): the folder the
        #: front-end started in, which Jupyter makes the notebook's.
        self.local_dir = Path.cwd().resolve()
        self.allow_host_paths = allow_host_paths
        self.host_paths_switch = host_paths_switch
        #: How this front-end names teaching cells: ``%%c`` in the kernel, ``%%sandbox_c``
        #: in IPython, where ``%%python3`` and friends already run locally.
        self.teaching_prefix = ""
        #: Open panels (``%sandbox_panel``): told after each cell, closed with the context.
        self.panels: list[Any] = []
        #: The notebook is a submission being graded (``SANDBOX_GRADING=1``, set by
        #: ``sandbox-kernel grade``): see :meth:`refuse_while_grading`.
        self.grading = os.environ.get(GRADING_VARIABLE, "").strip() == "1"

    # -- connection --------------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The connection, resolved on first use; :class:`SandboxNotConfigured` if the
        settings cannot be used (:attr:`problem`)."""
        with self._lock:
            if self._connection is None:
                if self._closed:  # never start a server for a context that was closed
                    raise OperationFailed("This notebook's sandbox connection was closed.")
                if self._problem is not None:
                    raise SandboxNotConfigured(self._problem)
                try:
                    self._connection = Connection(resolve(*self._given, names=self._names))
                    self._configured = self._connection.settings
                except (SandboxConfigError, RuntimeError, OSError) as error:  # OSError: no
                    # private server could even be started (no temporary folder, no Python)
                    self._problem = f"The sandbox is not usable: {error}"
                    raise SandboxNotConfigured(self._problem) from None
            return self._connection

    def start(self) -> str | None:
        """Resolve the settings now (a private server starts here); the problem, if any."""
        with contextlib.suppress(OperationFailed):
            self.connection  # noqa: B018
        return self._problem

    @property
    def problem(self) -> str | None:
        """What is wrong with the settings, once :meth:`start` or an operation found it."""
        return self._problem

    @property
    def started(self) -> bool:
        return self._connection is not None

    @property
    def settings(self) -> SandboxSettings:
        return self.connection.settings

    @property
    def url(self) -> str:
        """The sandbox's URL, normalised: the one shown everywhere."""
        return self.settings.url

    @property
    def session(self) -> Session:
        """The sandbox session of this notebook (replaced by :meth:`connect`)."""
        connection = self.connection
        with self._lock:
            if self._session is None:
                self._session = Session(connection.client)
            return self._session

    def connect(self, url: str, token: str | None) -> SandboxSettings:
        """Switch to another sandbox (``%sandbox_connect``): a fresh session there.

        The URL comes from the notebook, so it gets ``token`` and nothing else: no
        ``SANDBOX_TOKEN``, no advertised server's token. Only the configured sandbox's own
        origin may reuse the configured token, and only its very URL the user's JupyterHub
        token. The new sandbox is checked first, so that a typo keeps the current connection.
        """
        names = dataclasses.replace(
            self._names, url="%sandbox_connect URL", token="%sandbox_connect --token"
        )
        hub_service = None
        if token is None:
            token, hub_service = self._configured_token_for(url)
        # The URL and token are the notebook's; the timeouts stay the user's.
        timeouts = {name: os.environ[name] for name in _TIMEOUT_VARIABLES if name in os.environ}
        resolved = resolve(url, token, *self._given[2:], names=names, environ=timeouts)
        if hub_service is not None:  # back to the Hub's sandbox: refusals name its settings
            resolved.settings = dataclasses.replace(resolved.settings, hub_service=hub_service)
        candidate = Connection(resolved)
        try:
            self._on_worker(candidate.side.specs)
        except SandboxError:
            candidate.close()
            raise
        with self._lock:  # in one step: no one sees "no connection" and resolves anew
            previous, self._connection, self._problem = self._connection, candidate, None
            self._session, self._inventory = Session(candidate.client), None
        if previous is not None and previous.resolved.server is not None:
            self._private = previous  # its server runs on until the context closes
        elif previous is not None:
            with contextlib.suppress(Exception):
                previous.close()
        return candidate.settings

    def _configured_token_for(self, url: str) -> tuple[str | None, str | None]:
        """The configured sandbox's token when ``url`` is that sandbox's origin, else None
        (never the token of a sandbox named by an earlier ``%sandbox_connect``); and the Hub
        service when that token is the user's JupyterHub token, which only the configured
        sandbox's very URL gets back: another path of the Hub's origin may be another user's
        server."""
        configured = self._configured
        if configured is None:  # not connected yet: what the configuration names, if any
            try:
                found = resolve(*self._given, names=self._names, start_embedded=False)
            except (LookupError, SandboxConfigError):
                return None, None
            configured = found.settings
        if configured.hub_service is not None:
            if _same_url(url, configured.url):
                return configured.token, configured.hub_service
            return None, None
        return (configured.token if same_origin(url, configured.url) else None), None

    # -- the worker thread -------------------------------------------------------------------

    def submit(self, function: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        """Run ``function(*args)`` in the context's worker thread (with the caller's context
        variables: an interrupt's cancel scope reaches it). For event loops:
        ``await asyncio.wrap_future(context.submit(context.load))``."""
        run = self._mark_worker(function)
        return self._worker.submit(contextvars.copy_context().run, run, *args)

    def _mark_worker(self, function: Callable[..., _T]) -> Callable[..., _T]:
        def run(*args: Any) -> _T:
            self._worker_thread = threading.get_ident()
            return function(*args)

        return run

    def _on_worker(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` in the worker thread, waited for (directly when already there)."""
        if threading.get_ident() == self._worker_thread:
            return function(*args)
        return _wait(self.submit(function, *args), owned=True)

    # -- facts -------------------------------------------------------------------------------

    def specs(self, *, refresh: bool = False) -> Specs:
        """The server's specifications (cached; ``refresh`` asks again)."""
        side = self.connection.side
        return self._on_worker(lambda: side.specs(refresh=refresh))

    def load(self) -> Load:
        """The load now (never cached)."""
        return self._on_worker(self.connection.side.load)

    def load_sample(self) -> LoadSample:
        """The load now and, from a cluster front, each worker's (never cached; one request,
        as :meth:`load`)."""
        return self._on_worker(self.connection.side.load_sample)

    def inventory(self, *, refresh: bool = False) -> Inventory:
        """What the sandbox has installed, fetched once (``refresh`` asks again)."""
        if threading.get_ident() == self._worker_thread:  # waiting for itself would hang
            return self.connection.side.inventory(refresh=refresh)
        return _wait(self.prefetch_inventory(refresh=refresh), owned=False)

    def prefetch_inventory(self, *, refresh: bool = False) -> concurrent.futures.Future[Inventory]:
        """Start fetching the inventory in the worker thread, unless it is known or coming;
        never blocks. A failed fetch is tried again by the next call."""
        side = self.connection.side
        with self._lock:
            future = self._inventory
            failed = future is not None and future.done() and future.exception() is not None
            if future is None or failed or refresh:
                future = self._inventory = self.submit(lambda: side.inventory(refresh=refresh))
            return future

    @property
    def cached_inventory(self) -> Inventory | None:
        """The inventory if it is known already (no request, no wait)."""
        future = self._inventory
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    # -- the environment's files ---------------------------------------------------------------

    def remote_path(self, path: str) -> str:
        """A path of the environment, relative to its root: relative paths start at the
        shell's current directory, absolute ones must be under the working directory."""
        cwd = self.session.state.cwd or WORKING_DIR
        full = posixpath.normpath(posixpath.join(cwd, path))
        if full != WORKING_DIR and not full.startswith(WORKING_DIR + "/"):
            raise OperationFailed(f"{path!r} is outside the environment ({WORKING_DIR})")
        return posixpath.relpath(full, WORKING_DIR)

    def fetch(self, remote: str | None, uuid: str | None = None, limit: int | None = None) -> bytes:
        """A file of the environment (the whole environment as ``.tgz`` when ``remote`` is
        None), no larger than the server announced (a server sending more is cut off) nor
        than ``limit`` (:class:`OperationFailed` beyond it, before anything is fetched)."""
        environment = uuid or self.session.environment
        if not environment:
            raise OperationFailed("There is no environment yet: run a cell first.")
        side = self.connection.side

        def fetch() -> bytes:
            size = side.check(environment, remote)
            if limit is not None and size > limit:
                raise OperationFailed(
                    f"{remote or 'the environment'} is {format_size(size)}, more than the "
                    f"{format_size(limit)} shown here: download it instead (%sandbox_download)."
                )
            return side.download(environment, remote, max_bytes=size).getvalue()

        return self._on_worker(fetch)

    def upload(
        self, paths: Sequence[str | os.PathLike[str]], as_name: str | None = None
    ) -> tuple[str, list[str], str]:
        """Put local files or folders into the current environment, under their own names (or
        ``as_name``, for one path), in :meth:`upload_directory`; the next cell continues from
        the environment this makes. Returns its uuid, the names given and that directory."""
        if as_name is not None and len(paths) != 1:
            raise OperationFailed("--as names one file: give a single local path")
        local = [self.local_path(path, "%sandbox_upload would read") for path in paths]
        missing = [str(path) for path in local if not path.exists()]
        if missing:
            raise OperationFailed(f"No such local file or folder: {', '.join(missing)}")
        names = [as_name] if as_name is not None else [path.name for path in local]
        directory = self.upload_directory()
        inside = posixpath.relpath(directory, WORKING_DIR)
        members = [name if inside == "." else f"{inside}/{name}" for name in names]
        try:
            archive = build_archive(local, members, reserved=(STATE_DIR,))
        except (ArchiveError, OSError) as error:
            raise OperationFailed(f"Cannot upload: {error}") from None
        session = self.session
        config: dict[str, Any] = {"commands": ["true"], "save": True}
        if session.environment:
            config["environment"] = session.environment
        side = self.connection.side
        answer = self._on_worker(side.execute, config, archive)
        if not session.adopt(answer):
            raise OperationFailed(
                f"The sandbox at {self.url} answered the upload without an environment uuid "
                f"(environment = {answer.get('environment')!r}): the files are not there. "
                "Check that it is a sandbox server, then upload again."
            )
        return session.environment or "", names, directory

    def upload_directory(self) -> str:
        """Where uploads go: the shell's current directory, as a user typing ``cp`` there
        expects, when it is under the working directory (the only part of the sandbox that
        carries between cells); otherwise, and inside the kernel's own ``.sandbox_kernel/``,
        the working directory itself."""
        cwd = posixpath.normpath(self.session.state.cwd or WORKING_DIR)
        inside = posixpath.relpath(cwd, WORKING_DIR)
        if inside == ".." or inside.startswith("../") or inside.split("/")[0] == STATE_DIR:
            return WORKING_DIR
        return cwd

    # -- local paths -------------------------------------------------------------------------

    def refuse_while_grading(self, what: str) -> None:
        """Raise :class:`OperationFailed` when grading: a submission may not read or write the
        grader's files (the hidden tests among them) nor send its cells to another sandbox,
        which could answer anything. ``what`` names the refused feature (``"%sandbox_upload"``).
        """
        if self.grading:
            raise OperationFailed(
                f"{what} is disabled while grading: a submitted notebook may not read or write "
                "the grader's files, change the sandbox or take another environment. Remove it "
                "from the notebook."
            )

    @property
    def host_paths_allowed(self) -> bool:
        return self.allow_host_paths or host_paths_allowed_by_environment()

    def local_path(self, path: str | os.PathLike[str], purpose: str) -> Path:
        """The local path ``path`` names, resolved (``~`` expanded, relative to the notebook's
        folder, symlinks followed), refused outside that folder unless host paths are allowed.

        Every operation that reads or writes a local file calls this first; ``purpose`` says
        what for in the refusal (``"%sandbox_upload reads"``). Raises :class:`HostPathRefused`.
        """
        shown = os.fspath(path)
        try:
            resolved = (self.local_dir / os.path.expanduser(shown)).resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a NUL byte, a symlink loop
            raise HostPathRefused(
                f"{purpose} {shown!r}: not a usable local path ({error})."
            ) from None
        if self.host_paths_allowed or resolved.is_relative_to(self.local_dir):
            return resolved
        where = "" if str(resolved) == shown else f" (that is {resolved})"
        raise HostPathRefused(
            f"{purpose} {shown}{where}, which is outside the notebook's folder "
            f"{self.local_dir}: magics read and write local files only there, so that a "
            "notebook from elsewhere cannot take or overwrite your files. Nothing was sent or "
            "written. Use a path inside that folder, or, if you trust this notebook, allow "
            f"any local path with {self.host_paths_switch}."
        )

    def local_target(self, folder: str, name: str, force: bool, purpose: str) -> Path:
        """Where a download goes: ``name`` (a base name) directly in ``folder``, never
        elsewhere; the folder must be inside the notebook's folder (:meth:`local_path`)."""
        base = self.local_path(folder, f"{purpose} would write into")
        if not base.is_dir():
            raise OperationFailed(
                f"{purpose} {folder}: no such local folder ({base}); create it first."
            )
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise OperationFailed(f"{name!r} cannot be a local file name")
        target = base / name
        if target.is_symlink():
            raise OperationFailed(f"{target} is a symbolic link: refusing to write through it.")
        if target.exists() and not force:
            raise OperationFailed(f"{target} already exists: add --force to overwrite it.")
        if target.exists() and not target.is_file():
            raise OperationFailed(
                f"{target} exists and is not a regular file: refusing to replace it."
            )
        return target

    def save_locally(self, target: Path, data: bytes, force: bool) -> None:
        """Write ``data`` to ``target`` (from :meth:`local_target`), a new file; with
        ``force``, replace it. Never through a symbolic link; a replaced file is swapped in
        whole (written beside it, then renamed over it), so that a hard link to a file
        elsewhere is never written through."""
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
            raise OperationFailed(f"Cannot write {target}: {error}") from None

    # -- life cycle ----------------------------------------------------------------------------

    def cell_done(self) -> None:
        """After each cell: open panels show the new environment."""
        for panel in list(self.panels):
            with contextlib.suppress(Exception):
                panel.refresh_environment()

    def _drop_connection(self) -> None:
        with self._lock:
            connection, self._connection, self._session = self._connection, None, None
            self._inventory = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        for panel in list(self.panels):
            with contextlib.suppress(Exception):
                panel.close()
        self._closed = True
        self._drop_connection()
        private, self._private = self._private, None
        if private is not None:
            with contextlib.suppress(Exception):
                private.close()
        self._worker.shutdown(wait=False, cancel_futures=True)


def _same_url(given: str, configured: str) -> bool:
    """``given`` is the (normalised) ``configured`` URL: same origin, same path."""
    try:
        return same_origin(given, configured) and (
            urlsplit(normalise_url(given)).path == urlsplit(configured).path
        )
    except SandboxConfigError:  # not a URL: resolve() says so, naming the magic
        return False


def _wait(future: concurrent.futures.Future[_T], *, owned: bool) -> _T:
    """The future's result, or :class:`SandboxCancelled` as soon as an interrupt cancels the
    caller's ``cancel_scope``: a magic waiting behind another request (a panel's refresh, a
    prefetch) must end at once too. ``owned``: the caller's own job, dropped if not started."""
    while True:
        try:
            return future.result(timeout=_POLL)
        except concurrent.futures.TimeoutError:
            if scope_cancelled():
                if owned:
                    future.cancel()
                raise SandboxCancelled(
                    "Interrupted while waiting for the sandbox's answer; nothing more is "
                    "waited for."
                ) from None


def _write_file(path: Path, data: bytes, exclusive_name: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise OperationFailed(
            f"{exclusive_name} already exists: add --force to overwrite it."
        ) from None
    except OSError as error:
        raise OperationFailed(f"Cannot write {exclusive_name}: {error}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except OSError as error:  # a full disk: no half-written file is left
        with contextlib.suppress(OSError):
            path.unlink()
        raise OperationFailed(f"Cannot write {exclusive_name}: {error}") from None
