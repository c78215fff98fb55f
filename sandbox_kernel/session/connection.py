"""Which sandbox a front-end talks to, the session it carries there, and which local paths
its magics may touch.

Both front-ends (the kernel, the IPython extension) hold one :class:`SandboxContext`: the
connection (URL, token, clients, and the private embedded server when nothing was configured)
and the :class:`Session` of the notebook. ``%sandbox_connect`` replaces both.

Magic lines run on the user's machine, and a notebook may come from anyone: every local path a
magic reads or writes goes through :meth:`SandboxContext.local_path`, which keeps it inside the
folder the front-end started in (Jupyter starts a kernel in the notebook's folder). A URL named
by the notebook (``%sandbox_connect``) gets only the token given with it, or the configured
token when it is the configured sandbox's origin: never the local server's token.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._errors import SandboxError
from ..client import Sandbox
from ..discovery import EmbeddedServer, configured_sandbox, open_sandbox
from .session import Session

#: The environment variable that lets magics read and write local files anywhere.
ALLOW_HOST_PATHS_VARIABLE = "SANDBOX_ALLOW_HOST_PATHS"
#: How to lift the restriction, as each front-end says it.
KERNEL_SWITCH = (
    "c.SandboxKernel.allow_host_paths = True (in ipython_kernel_config.py of the IPython "
    f"profile, ~/.ipython/profile_default/) or {ALLOW_HOST_PATHS_VARIABLE}=1 in the "
    "environment Jupyter starts the kernel with, then restart the kernel"
)
IPYTHON_SWITCH = (
    f"{ALLOW_HOST_PATHS_VARIABLE}=1 in this Python kernel's environment "
    f"(%env {ALLOW_HOST_PATHS_VARIABLE}=1)"
)


class HostPathRefused(PermissionError):
    """A magic was asked to read or write a local path outside the notebook's folder; the
    message names the path, the folder, and the switch that allows it. Nothing was sent and
    nothing was written."""


def host_paths_allowed_by_environment() -> bool:
    """``SANDBOX_ALLOW_HOST_PATHS=1`` (or true/yes)."""
    value = os.environ.get(ALLOW_HOST_PATHS_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes")


class Connection:
    """A sandbox URL with its clients; owns the private embedded server if it started one."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float | None = None,
        server: EmbeddedServer | None = None,
    ) -> None:
        self.server = server
        self.url = url
        self.token = token
        self.timeout = timeout or _timeout_from_environment()
        self.client = Sandbox(url, timeout=self.timeout, token=token)
        # Look-ups made beside a running cell (specifications, libraries, load) get their own
        # client: a requests session is not meant to be shared between threads.
        self.background = Sandbox(url, timeout=10, token=token)

    @classmethod
    def configured(
        cls, url: str | None = None, token: str | None = None, timeout: float | None = None
    ) -> Connection:
        """The sandbox of the configuration (settings, environment, an advertised local server),
        else a private embedded server started now."""
        info, server = open_sandbox(url, token)
        try:
            return cls(info.url, info.token, timeout, server)
        except Exception:
            if server is not None:
                server.stop()
            raise

    @property
    def private(self) -> bool:
        return self.server is not None

    def close(self) -> None:
        self.client.close()
        self.background.close()
        server: EmbeddedServer | None = self.server
        self.server = None
        if server is not None:
            server.stop()


def _timeout_from_environment() -> float:
    """``SANDBOX_TIMEOUT``: seconds to wait for the sandbox's answers (default 60)."""
    try:
        value = float(os.environ.get("SANDBOX_TIMEOUT", "") or 60)
    except ValueError:
        return 60.0
    return value if value > 0 else 60.0


def same_origin(first: str, second: str) -> bool:
    """Scheme, host and port equal (the default port of the scheme when none is given)."""
    try:
        a, b = urlsplit(first.strip()), urlsplit(second.strip())
        ports = {"http": 80, "https": 443}
        return (
            a.scheme.lower() == b.scheme.lower()
            and (a.hostname or "") == (b.hostname or "")
            and (a.port or ports.get(a.scheme.lower())) == (b.port or ports.get(b.scheme.lower()))
        )
    except ValueError:  # a port that is not a number
        return False


class SandboxContext:
    """The connection and session of one notebook, created on first use.

    ``allow_host_paths``: magics may read and write local paths outside the folder the
    front-end started in (``SANDBOX_ALLOW_HOST_PATHS=1`` allows it too). ``host_paths_switch``
    is how a refusal tells the user to allow it, in the words of the front-end.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
        *,
        allow_host_paths: bool = False,
        host_paths_switch: str = IPYTHON_SWITCH,
    ) -> None:
        self._settings = (url, token)
        #: ``(url, token)`` of a sandbox named by ``%sandbox_connect``: no configured fallback.
        self._explicit: tuple[str, str | None] | None = None
        self._timeout = timeout
        self._connection: Connection | None = None
        self._session: Session | None = None
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

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            if self._explicit is not None:
                self._connection = Connection(*self._explicit, timeout=self._timeout)
            else:
                self._connection = Connection.configured(*self._settings, timeout=self._timeout)
        return self._connection

    # -- local paths -------------------------------------------------------------------------

    @property
    def host_paths_allowed(self) -> bool:
        return self.allow_host_paths or host_paths_allowed_by_environment()

    def local_path(self, path: str | os.PathLike[str], purpose: str) -> Path:
        """The local path ``path`` names, resolved (``~`` expanded, relative to the notebook's
        folder, symlinks followed), refused outside that folder unless host paths are allowed.

        Every magic that reads or writes a local file calls this first; ``purpose`` says what
        for in the refusal (``"%sandbox_upload reads"``). Raises :class:`HostPathRefused`.
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

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.connection.client)
        return self._session

    @property
    def started(self) -> bool:
        return self._connection is not None

    def connect(self, url: str, token: str | None) -> Connection:
        """Switch to another sandbox (``%sandbox_connect``): a fresh session there.

        The URL comes from the notebook, so it gets ``token`` and nothing else: no
        ``SANDBOX_TOKEN``, no advertised server's token. Only the configured sandbox's own
        origin may reuse the configured token. The new sandbox is checked first, so that a typo
        keeps the current connection.
        """
        if token is None:
            token = self._configured_token_for(url)
        candidate = Connection(url, token, timeout=self._timeout)
        try:
            candidate.background.specifications()
        except SandboxError:
            candidate.close()
            raise
        self.close()
        self._explicit = (url, token)
        self._connection = candidate
        self._session = Session(candidate.client)
        return candidate

    def _configured_token_for(self, url: str) -> str | None:
        """The configured sandbox's token when ``url`` is that sandbox's origin, else None."""
        configured: tuple[str, str | None] | None = None
        if self._connection is not None and self._explicit is None:
            configured = (self._connection.url, self._connection.token)
        else:
            info = configured_sandbox(*self._settings)
            configured = (info.url, info.token) if info is not None else None
        if configured is not None and same_origin(url, configured[0]):
            return configured[1]
        return None

    def cell_done(self) -> None:
        """After each cell: open panels show the new environment."""
        for panel in list(self.panels):
            with contextlib.suppress(Exception):
                panel.refresh_environment()

    def close(self) -> None:
        for panel in list(self.panels):
            with contextlib.suppress(Exception):
                panel.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
        self._connection = self._session = None
