"""Which sandbox a front-end talks to, and the session it carries there.

Both front-ends (the kernel, the IPython extension) hold one :class:`SandboxContext`: the
connection (URL, token, clients, and the private embedded server when nothing was configured)
and the :class:`Session` of the notebook. ``%sandbox_connect`` replaces both.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .._errors import SandboxError
from ..client import Sandbox
from ..discovery import EmbeddedServer, open_sandbox
from .session import Session


class Connection:
    """A sandbox URL with its clients; owns the private embedded server if it started one."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout: float | None = None
    ) -> None:
        info, self.server = open_sandbox(url, token)
        self.url = info.url
        self.token = info.token
        self.timeout = timeout or _timeout_from_environment()
        self.client = Sandbox(info.url, timeout=self.timeout, token=info.token)
        # Look-ups made beside a running cell (specifications, libraries, load) get their own
        # client: a requests session is not meant to be shared between threads.
        self.background = Sandbox(info.url, timeout=10, token=info.token)

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


class SandboxContext:
    """The connection and session of one notebook, created on first use."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout: float | None = None
    ) -> None:
        self._settings = (url, token)
        self._timeout = timeout
        self._connection: Connection | None = None
        self._session: Session | None = None
        #: Where local files are read and written (downloads, uploads): the notebook's folder.
        self.local_dir = Path.cwd()
        #: How this front-end names teaching cells: ``%%c`` in the kernel, ``%%sandbox_c``
        #: in IPython, where ``%%python3`` and friends already run locally.
        self.teaching_prefix = ""
        #: Open panels (``%sandbox_panel``): told after each cell, closed with the context.
        self.panels: list[Any] = []

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(*self._settings, timeout=self._timeout)
        return self._connection

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

        The new sandbox is checked first, so that a typo keeps the current connection.
        """
        candidate = Connection(url, token, timeout=self._timeout)
        try:
            candidate.background.specifications()
        except SandboxError:
            candidate.close()
            raise
        self.close()
        self._settings = (url, token)
        self._connection = candidate
        self._session = Session(candidate.client)
        return candidate

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
