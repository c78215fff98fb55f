"""Which sandbox to use, and how long to wait for it: resolved once, checked at the edge.

Every front-end (the kernel, the IPython extension, ``sandbox-kernel run``, ``lab`` and
``demo``) calls :func:`resolve` with what its user gave explicitly; the rest comes, in this
order, from the environment (``SANDBOX_URL``, ``SANDBOX_TOKEN``, ``SANDBOX_TIMEOUT``,
``SANDBOX_SIDE_TIMEOUT``), from a local server advertised by ``sandbox-kernel serve`` or
``lab``, and last from a private embedded server started for the caller. A malformed value
raises :class:`~sandbox_kernel.SandboxConfigError` naming the setting it came from.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from ._errors import SandboxConfigError
from ._wire import normalise_url
from .discovery import EmbeddedServer, ServerInfo, advertised_servers

#: Seconds to wait for an answer when nothing says otherwise.
DEFAULT_TIMEOUT = 60.0


class Source(enum.Enum):
    """Where the sandbox's URL came from."""

    EXPLICIT = "explicit"
    ENVIRONMENT = "environment"
    ADVERTISED = "advertised"
    EMBEDDED = "embedded"


@dataclasses.dataclass(frozen=True)
class SettingNames:
    """How a front-end's user sets each value, named in errors (``c.SandboxKernel.url``)."""

    url: str = "the url given"
    token: str = "the token given"
    timeout: str = "the timeout given"
    side_timeout: str = "the side timeout given"


IPYTHON_NAMES = SettingNames(
    "SANDBOX_URL", "SANDBOX_TOKEN", "%env SANDBOX_TIMEOUT=SECONDS (before the first magic)",
    "%env SANDBOX_SIDE_TIMEOUT=SECONDS (before the first magic)",
)  # fmt: skip
KERNEL_NAMES = SettingNames(
    "c.SandboxKernel.url", "c.SandboxKernel.token", "c.SandboxKernel.timeout",
    "c.SandboxKernel.side_timeout",
)  # fmt: skip
COMMAND_NAMES = SettingNames("--url", "--token / --token-file", "--timeout", "--side-timeout")


@dataclasses.dataclass(frozen=True)
class SandboxSettings:
    """The sandbox a front-end talks to. ``url`` is normalised (one trailing slash) and is the
    one shown everywhere."""

    url: str
    token: str | None
    #: Seconds for any answer (``execute/`` also gets the server's budget + 10 s).
    timeout: float = DEFAULT_TIMEOUT
    #: Seconds for requests made beside the cells: specifications, load, libraries, downloads.
    side_timeout: float = DEFAULT_TIMEOUT
    source: Source = Source.EXPLICIT
    #: How the user changes ``timeout`` (named in the error of a request past it).
    timeout_setting: str = "SANDBOX_TIMEOUT"
    #: How the user changes ``side_timeout``.
    side_timeout_setting: str = "SANDBOX_SIDE_TIMEOUT or SANDBOX_TIMEOUT"
    #: The advertised server, when the URL is one (``started_by`` says who started it).
    advertised: ServerInfo | None = None

    def describe(self) -> str:
        """Which server this is, truthfully, for ``%sandbox_status`` and banners."""
        if self.source is Source.EMBEDDED:
            return "a private embedded server (started for this session, stopped with it)"
        local = self.advertised
        if local is not None:
            who = local.started_by or "sandbox-kernel serve"
            pid = f", pid {local.pid}" if local.pid else ""
            how = {Source.ADVERTISED: "found advertised", Source.ENVIRONMENT: "from SANDBOX_URL"}
            return f"a local server started by `{who}`{pid} ({how.get(self.source, 'given')})"
        if self.source is Source.ENVIRONMENT:
            return "the server given by SANDBOX_URL"
        return "the server given in the configuration"


@dataclasses.dataclass
class Resolved:
    """Settings, and the private embedded server started for them (the caller stops it with
    :meth:`close`)."""

    settings: SandboxSettings
    server: EmbeddedServer | None = None

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


def resolve(
    url: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
    side_timeout: float | None = None,
    *,
    names: SettingNames = COMMAND_NAMES,
    environ: Mapping[str, str] | None = None,
    start_embedded: bool = True,
) -> Resolved:
    """The sandbox to use: explicit > environment > advertised local server > a private
    embedded server (started now unless ``start_embedded`` is false, then
    :class:`LookupError`). Raises :class:`SandboxConfigError` naming a malformed setting."""
    env = os.environ if environ is None else environ
    timeout_value, timeout_setting = _timeout(timeout, names.timeout, env, "SANDBOX_TIMEOUT")
    side_value, side_setting = _timeout(
        side_timeout, names.side_timeout, env, "SANDBOX_SIDE_TIMEOUT"
    )
    times = {
        "timeout": timeout_value or DEFAULT_TIMEOUT,
        "side_timeout": side_value or timeout_value or DEFAULT_TIMEOUT,
        "timeout_setting": timeout_setting,
        # Side requests follow the timeout unless they have their own.
        "side_timeout_setting": side_setting if side_value is not None else timeout_setting,
    }
    given_token = token or env.get("SANDBOX_TOKEN") or None  # "" means no token
    if url:
        normal = normalise_url(url, names.url)
        return Resolved(SandboxSettings(normal, given_token, source=Source.EXPLICIT,
                                        advertised=_advertised(normal), **times))  # type: ignore[arg-type]  # fmt: skip
    if env.get("SANDBOX_URL"):
        normal = normalise_url(env["SANDBOX_URL"], "SANDBOX_URL")
        return Resolved(SandboxSettings(normal, given_token, source=Source.ENVIRONMENT,
                                        advertised=_advertised(normal), **times))  # type: ignore[arg-type]  # fmt: skip
    for info in advertised_servers():
        try:
            normal = normalise_url(info.url, "an advertisement file")
        except SandboxConfigError:
            continue  # a broken advertisement is skipped, not fatal
        return Resolved(SandboxSettings(normal, info.token, source=Source.ADVERTISED,
                                        advertised=info, **times))  # type: ignore[arg-type]  # fmt: skip
    if not start_embedded:
        raise LookupError("no sandbox is configured and no local server is advertised")
    server = EmbeddedServer()
    started = server.start()
    settings = SandboxSettings(normalise_url(started.url), server.token, source=Source.EMBEDDED,
                               **times)  # type: ignore[arg-type]  # fmt: skip
    return Resolved(settings, server)


def _timeout(
    given: float | None, name: str, env: Mapping[str, str], variable: str
) -> tuple[float | None, str]:
    """A timeout and the setting it came from; a value that is not a positive number of
    seconds is an error naming that setting."""
    if given is not None:
        value, where = given, name
    elif env.get(variable, "").strip():
        text = env[variable].strip()
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        where = f"{variable}={text}"
    else:
        return None, f"{variable} (now the default, {DEFAULT_TIMEOUT:g} s) or {name}"
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise SandboxConfigError(
            f"{where}: a timeout is a positive number of seconds, not {value!r}. Fix it, or "
            "remove it for the default of 60 s."
        )
    return float(value), where


def _advertised(url: str) -> ServerInfo | None:
    """The advertised local server at ``url``, if it is one."""
    for info in advertised_servers():
        try:
            if normalise_url(info.url) == url:
                return info
        except SandboxConfigError:
            continue
    return None


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
