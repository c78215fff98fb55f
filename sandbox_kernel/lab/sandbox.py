"""The sandbox ``lab`` gives its kernels: found as every front-end finds one, or an embedded
server started and advertised while ``lab`` runs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from .._wire import normalise_url
from ..discovery import EmbeddedServer, advertisement_path, read_server_info, write_advertisement
from ..settings import COMMAND_NAMES, SandboxSettings, Source, resolve

#: How ``lab`` signs the advertisement of the server it starts.
STARTED_BY = "sandbox-kernel lab"


@dataclasses.dataclass
class LabSandbox:
    """The sandbox ``lab`` gives its kernels: one found by :func:`resolve`, or an embedded
    server started now (``server``) and advertised while ``lab`` runs."""

    settings: SandboxSettings
    server: EmbeddedServer | None = None

    def describe(self) -> list[str]:
        """Where things are, for the user."""
        url = self.settings.url
        if self.server is None:
            return [f"sandbox:    {url} ({self.settings.describe()})"]
        return [
            f"sandbox:    {url} (embedded, started now and advertised to local clients "
            f"as started by `{STARTED_BY}`; stopped with it)",
            f"            log: {self.server.log_path}",
        ]

    def kernel_environment(self) -> dict[str, str]:
        """What the kernels get: the sandbox's URL and token in their environment, which only
        their user (and root) can read, unlike a command line."""
        env = dict(os.environ)
        env["SANDBOX_URL"] = self.settings.url
        env["SANDBOX_TOKEN"] = self.settings.token or ""
        return env


def found_sandbox(url: str | None, token: str | None) -> SandboxSettings | None:
    """The configured or advertised sandbox (:func:`resolve`'s order), None when there is
    none. SandboxConfigError names a malformed setting."""
    try:
        return resolve(url, token, names=COMMAND_NAMES, start_embedded=False).settings
    except LookupError:
        return None


def start_advertised_server(logs: Path, stack: contextlib.ExitStack) -> LabSandbox:
    """An embedded server that ``stack`` stops, after removing its advertisement.

    The server itself stays private (``--no-advertise``): ``lab`` advertises it itself,
    with ``started_by``, under its own pid (a ``lab`` killed outright leaves a file that
    clients skip, its pid being dead, and its server stops with it)."""
    server = EmbeddedServer(log_path=logs / "sandbox-server.log")
    stack.callback(server.stop)
    info = server.start()
    url = normalise_url(info.url)
    advertisement = advertisement_path(os.getpid())
    stack.callback(advertisement.unlink, missing_ok=True)
    write_advertisement(advertisement, url, server.token, started_by=STARTED_BY)
    settings = SandboxSettings(url, server.token, source=Source.EMBEDDED,
                               advertised=read_server_info(advertisement))  # fmt: skip
    return LabSandbox(settings, server)
