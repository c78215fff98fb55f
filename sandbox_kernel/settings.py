"""Which sandbox to use, and how long to wait for it: resolved once, checked at the edge.

Every front-end (the kernel, the IPython extension, ``sandbox-kernel run``, ``lab`` and
``demo``) calls :func:`resolve` with what its user gave explicitly; the rest comes, in this
order, from the environment (``SANDBOX_URL``, ``SANDBOX_TOKEN``, ``SANDBOX_TIMEOUT``,
``SANDBOX_SIDE_TIMEOUT``), from JupyterHub (below), from a local server advertised by
``sandbox-kernel serve`` or ``lab``, and last from a private embedded server started for the
caller. A malformed value raises :class:`~sandbox_kernel.SandboxConfigError` naming the
setting it came from.

In a JupyterHub single-user server (``JUPYTERHUB_API_TOKEN`` is set) without ``SANDBOX_URL``,
the sandbox is the Hub's service: ``{origin}{JUPYTERHUB_BASE_URL}services/sandbox/``, the
origin being the one of ``JUPYTERHUB_PUBLIC_URL`` (else ``JUPYTERHUB_PUBLIC_HUB_URL``), which
JupyterHub 5+ gives its servers when ``c.JupyterHub.public_url`` is set; ``SANDBOX_HUB_SERVICE``
names another service. The user's JupyterHub token is the token of this startup sandbox
(``SANDBOX_URL`` or that service) when ``SANDBOX_TOKEN`` is not set, and of no other: a URL
given later (``%sandbox_connect``) gets it only when it is that very URL again, since the Hub's
origin also serves every other user's server.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from ._errors import Answer, SandboxConfigError
from ._wire import normalise_url
from .discovery import EmbeddedServer, ServerInfo, advertised_servers

#: Seconds to wait for an answer when nothing says otherwise.
DEFAULT_TIMEOUT = 60.0

#: The user's JupyterHub API token, in a single-user server's environment (and its kernels').
HUB_TOKEN_VARIABLE: Final = "JUPYTERHUB_API_TOKEN"
#: The Hub's public URLs (JupyterHub 5+, when ``c.JupyterHub.public_url`` is set), in the
#: order their origin is taken.
HUB_PUBLIC_VARIABLES: Final = ("JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_PUBLIC_HUB_URL")
#: The name of the Hub's sandbox service, when it is not :data:`DEFAULT_HUB_SERVICE`.
HUB_SERVICE_VARIABLE: Final = "SANDBOX_HUB_SERVICE"
DEFAULT_HUB_SERVICE: Final = "sandbox"
#: A JupyterHub service name that can stand in a URL path and a scope as it is.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Source(enum.Enum):
    """Where the sandbox's URL came from."""

    EXPLICIT = "explicit"
    ENVIRONMENT = "environment"
    ADVERTISED = "advertised"
    EMBEDDED = "embedded"
    #: The Hub's sandbox service, its URL derived from the single-user server's environment.
    JUPYTERHUB = "jupyterhub"


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
    #: The JupyterHub service whose scope the token needs, when the token is the user's
    #: JupyterHub token (``JUPYTERHUB_API_TOKEN``): then it goes to this sandbox only, and a
    #: refusal says what the Hub's administrator must set (:meth:`refusal_advice`).
    hub_service: str | None = None

    def describe(self) -> str:
        """Which server this is, truthfully, for ``%sandbox_status`` and banners."""
        own = ", with your JupyterHub token" if self.hub_service is not None else ""
        return self._which() + own

    def _which(self) -> str:
        if self.source is Source.EMBEDDED:
            return "a private embedded server (started for this session, stopped with it)"
        if self.source is Source.JUPYTERHUB:
            service = self.hub_service or _service_in_path(self.url) or DEFAULT_HUB_SERVICE
            return (
                f"the JupyterHub service '{service}', found from the Hub's public URL "
                "(SANDBOX_URL names another sandbox)"
            )
        local = self.advertised
        if local is not None:
            who = local.started_by or "sandbox-kernel serve"
            pid = f", pid {local.pid}" if local.pid else ""
            how = {Source.ADVERTISED: "found advertised", Source.ENVIRONMENT: "from SANDBOX_URL"}
            return f"a local server started by `{who}`{pid} ({how.get(self.source, 'given')})"
        if self.source is Source.ENVIRONMENT:
            return "the server given by SANDBOX_URL"
        return "the server given in the configuration"

    def refusal_advice(self, answer: Answer) -> str | None:
        """What to do about a 401 or 403 of this sandbox when it was sent the user's
        JupyterHub token (the Hub's settings to change, named); None otherwise, and for any
        other answer: the status's own advice then applies."""
        if self.hub_service is None:
            return None
        return hub_refusal_advice(self.hub_service, answer)


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
        startup_token, service = _startup_token(token, env, normal)
        return Resolved(SandboxSettings(normal, startup_token, source=Source.ENVIRONMENT,
                                        advertised=_advertised(normal), hub_service=service,
                                        **times))  # type: ignore[arg-type]  # fmt: skip
    if in_jupyterhub(env):
        normal = hub_sandbox_url(env)
        startup_token, service = _startup_token(token, env, normal)
        return Resolved(SandboxSettings(normal, startup_token, source=Source.JUPYTERHUB,
                                        hub_service=service, **times))  # type: ignore[arg-type]  # fmt: skip
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


# -- JupyterHub ---------------------------------------------------------------------------------


def in_jupyterhub(env: Mapping[str, str]) -> bool:
    """Whether this runs in a JupyterHub single-user server (or a kernel it started): the Hub
    gives those its user's API token."""
    return bool(env.get(HUB_TOKEN_VARIABLE, "").strip())


def hub_service_name(env: Mapping[str, str], url: str | None = None) -> str:
    """The Hub's sandbox service: ``SANDBOX_HUB_SERVICE``, else the ``NAME`` of a
    ``.../services/NAME/`` URL, else ``sandbox``. A name that cannot stand in a URL path is
    an error naming the variable."""
    told = env.get(HUB_SERVICE_VARIABLE, "").strip()
    if not told:
        return (_service_in_path(url) if url else None) or DEFAULT_HUB_SERVICE
    if not _SERVICE_NAME.fullmatch(told):
        raise SandboxConfigError(
            f"{HUB_SERVICE_VARIABLE}={told[:80]!r} is not a JupyterHub service name (letters, "
            "digits, '.', '_' and '-', as in c.JupyterHub.services). Fix it, or remove it for "
            f"the service '{DEFAULT_HUB_SERVICE}'."
        )
    return told


def hub_sandbox_url(env: Mapping[str, str]) -> str:
    """``{origin}{JUPYTERHUB_BASE_URL}services/{name}/``: the Hub's sandbox service as the
    user's browser reaches it, the origin being the one of the Hub's public URL. Without a
    public URL, a :class:`SandboxConfigError` says which setting gives one."""
    origin = None
    for variable in HUB_PUBLIC_VARIABLES:
        public = env.get(variable, "").strip()
        if public:
            origin = _origin(public, variable)
            break
    if origin is None:
        raise SandboxConfigError(
            "This kernel runs in a JupyterHub server (JUPYTERHUB_API_TOKEN is set) but does not "
            "know the Hub's public address, so it cannot find the Hub's sandbox service: the "
            "Hub's administrator must set c.JupyterHub.public_url (JupyterHub 5 or later then "
            "gives JUPYTERHUB_PUBLIC_URL to every server), or set SANDBOX_URL to the service's "
            "URL (in c.Spawner.environment), such as "
            f"'https://hub.example.org/services/{hub_service_name(env)}/'."
        )
    inner = env.get("JUPYTERHUB_BASE_URL", "").strip().strip("/")
    base = f"/{inner}/" if inner else "/"
    url = f"{origin}{base}services/{hub_service_name(env)}/"
    return normalise_url(url, "JUPYTERHUB_BASE_URL and " + " or ".join(HUB_PUBLIC_VARIABLES))


def _origin(url: str, variable: str) -> str:
    """``scheme://host[:port]`` of a public URL (no user, path or query), checked."""
    normal = normalise_url(url.split("?", 1)[0].split("#", 1)[0], variable)
    parts = urlsplit(normal)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _service_in_path(url: str) -> str | None:
    """``NAME`` when ``url``'s path ends with ``/services/NAME/``."""
    try:
        found = re.search(r"/services/([^/]+)/?$", urlsplit(url).path)
    except ValueError:
        return None
    name = found.group(1) if found else None
    return name if name is not None and _SERVICE_NAME.fullmatch(name) else None


def _startup_token(
    given: str | None, env: Mapping[str, str], url: str
) -> tuple[str | None, str | None]:
    """The token of the sandbox configured at startup, and the Hub service it is the token
    for when it is the user's JupyterHub token: the token given, else ``SANDBOX_TOKEN``
    when set at all (an empty one means none: ``grade`` and ``lab`` set it so), else the
    JupyterHub token in a single-user server."""
    if given:
        return given, None
    if "SANDBOX_TOKEN" in env:
        return env["SANDBOX_TOKEN"] or None, None
    if in_jupyterhub(env):
        return env[HUB_TOKEN_VARIABLE].strip(), hub_service_name(env, url)
    return None, None


def hub_refusal_advice(service: str, answer: Answer) -> str | None:
    """What to do when the sandbox service refused the user's JupyterHub token: a 401 (the
    Hub does not know it), a 403 (it lacks the service's scope, or the service refused the
    Hub's host name); None for any other answer."""
    if answer.status_code == 401:
        return _HUB_UNKNOWN_TOKEN
    if answer.status_code != 403:
        return None
    text = answer.text.lstrip()
    if text.startswith(("Host '", "Origin '")):
        host = urlsplit(answer.url).hostname or "the Hub's public host name"
        return (
            f"the sandbox service refused the Hub's public host name: the Hub's administrator "
            f"must start it with --allowed-host {host} (in its command in "
            "c.JupyterHub.services, as examples/jupyterhub/jupyterhub_config.py does)"
        )
    scope = f"access:services!service={service}"
    return (
        f"your JupyterHub token (JUPYTERHUB_API_TOKEN, which this kernel sends to the sandbox) "
        f"lacks the scope {scope}. The Hub's administrator must grant {scope} to the 'user' "
        "role (c.JupyterHub.load_roles) AND add it to c.Spawner.server_token_scopes (the "
        "token a server and its kernels get carries only those scopes), as "
        "examples/jupyterhub/jupyterhub_config.py does; then restart your server from the "
        "Hub's control panel (File > Hub Control Panel: Stop My Server, then Start My Server)"
    )


_HUB_UNKNOWN_TOKEN: Final = (
    "the Hub does not know the JupyterHub token this kernel sends (JUPYTERHUB_API_TOKEN): it "
    "expired or was revoked, as happens when your server was stopped while this kernel kept "
    "running. Restart your server from the Hub's control panel (File > Hub Control Panel: Stop "
    "My Server, then Start My Server) and open the notebook again"
)


# -- timeouts ---------------------------------------------------------------------------------


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
