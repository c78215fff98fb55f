"""Where the cluster's Redis is, and how to log in: ``--cluster URL`` (design B2, B9).

``redis://[USER:]PASSWORD@HOST:PORT/DB`` or ``rediss://`` (TLS, across machines). A URL
without a password is refused: a student who reaches an open Redis can enqueue jobs or forge
answers, so the cluster never talks to one. The password never appears in a repr, a ``str``,
an error or a log line: only :meth:`RedisTarget.secret_url` and the client factories see it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    import redis
    import redis.asyncio

DEFAULT_PORT: Final = 6379
SCHEMES: Final = ("redis", "rediss")
#: A hostname (letters, digits, '.', '-', '_') or an IPv6 address in brackets.
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_FORM = "redis://[USER:]PASSWORD@HOST:PORT/DB (or rediss:// for TLS)"
#: Seconds to wait for a TCP connection: a Redis that cannot be reached is said so quickly.
CONNECT_TIMEOUT: Final = 2.0
#: A failed command is tried again this many times, 50 ms then 100 ms later. redis-py's
#: default (10 times, backing off up to 1 s) holds a command about 4 s, even for a refused
#: password: the heartbeat and a front's watcher run every 250 ms and retry on their own.
RETRIES: Final = 2


class ClusterURLError(ValueError):
    """A ``--cluster`` URL that cannot be used; the text says why, without the password."""


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """A parsed ``--cluster`` URL. Its repr and ``str`` mask the password."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str = dataclasses.field(repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def address(self) -> str:
        """``HOST:PORT`` as in the URL (an IPv6 host in brackets), for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def masked(self) -> str:
        """The URL with its password replaced by ``***``: safe to log and show."""
        user = quote(self.username, safe="") if self.username else ""
        return f"{self.scheme}://{user}:***@{self.address}/{self.db}"

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"RedisTarget({self.masked!r})"

    def secret_url(self) -> str:
        """The full URL, password included, for Celery's broker setting. Never log it."""
        user = quote(self.username, safe="") if self.username else ""
        secret = quote(self.password, safe="")
        return f"{self.scheme}://{user}:{secret}@{self.address}/{self.db}"

    def client_options(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` or ``redis.asyncio.Redis``."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_keepalive": True,
        }
        if self.tls:
            options["ssl"] = True
            options["ssl_cert_reqs"] = "required"
        options.update(overrides)
        return options

    def client(self, **overrides: Any) -> redis.Redis:
        """A synchronous client (the worker's heartbeat thread, Celery-side code)."""
        import redis
        import redis.retry

        options = {"retry": redis.retry.Retry(_backoff(), RETRIES), **overrides}
        return redis.Redis(**self.client_options(**options))

    def async_client(self, **overrides: Any) -> redis.asyncio.Redis:
        """A ``redis.asyncio`` client (fronts never block their event loop)."""
        import redis.asyncio
        import redis.asyncio.retry

        options = {"retry": redis.asyncio.retry.Retry(_backoff(), RETRIES), **overrides}
        return redis.asyncio.Redis(**self.client_options(**options))


def _backoff() -> Any:
    import redis.backoff

    return redis.backoff.ExponentialBackoff(cap=0.1, base=0.05)


def parse_redis_url(url: str) -> RedisTarget:
    """The :class:`RedisTarget` of ``url``, or :class:`ClusterURLError` saying what to fix.

    The URL is split by hand rather than by ``urllib``: a password with an unencoded ``/`` or
    ``#`` would otherwise end up in the host or the path, and from there in an error message.
    Everything up to the *last* ``@`` is the user part.
    """
    shown = mask_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ClusterURLError(
            f"The cluster URL {shown} must start with redis:// or rediss:// (TLS): give {_FORM}."
        )
    userinfo, at, location = rest.rpartition("@")
    username, _, password = userinfo.partition(":")
    if not at or not password:
        raise ClusterURLError(
            f"The cluster URL {shown} has no password: the cluster's Redis must require one, "
            "since anyone who reaches it can run jobs or forge answers. Set requirepass (or "
            f"an ACL user) in Redis and give {_FORM}."
        )
    if any(char in location for char in "?#"):
        raise ClusterURLError(
            f"The cluster URL {shown} has options after '?' or '#', which are not supported: "
            f"give {_FORM}."
        )
    host, port = _host_and_port(location.partition("/")[0], shown)
    return RedisTarget(
        scheme=scheme.lower(),
        host=host,
        port=port,
        db=_database(location.partition("/")[2], shown),
        username=unquote(username) or None,
        password=unquote(password),
    )


def _host_and_port(hostport: str, shown: str) -> tuple[str, int]:
    host, port_text = hostport, ""
    if hostport.startswith("["):
        end = hostport.find("]") + 1
        host, port_text = hostport[:end], hostport[end:].removeprefix(":")
    elif ":" in hostport:
        host, _, port_text = hostport.rpartition(":")
    if not host or not _HOST_RE.fullmatch(host):
        raise ClusterURLError(f"The cluster URL {shown} has no valid host: give {_FORM}.")
    if not port_text:
        port = DEFAULT_PORT
    elif port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise ClusterURLError(
            f"The cluster URL {shown} has an invalid port {port_text[:10]!r} "
            f"(1 to 65535): give {_FORM}."
        )
    return host.strip("[]"), port


def _database(path: str, shown: str) -> int:
    if not path:
        return 0
    if path.isdigit() and path.isascii() and len(path) <= 9:
        return int(path)
    raise ClusterURLError(
        f"The cluster URL {shown} names the database {path[:20]!r}: it must be a number "
        f"(0 unless Redis was configured with more): give {_FORM}."
    )


def mask_url(url: str) -> str:
    """``url`` with everything after the user name up to the last ``@`` replaced by ``***``:
    safe to show even when the URL is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else repr(url[:200])
    userinfo, at, location = rest.rpartition("@")
    if not at:
        return repr(url[:200])
    user = userinfo.partition(":")[0]
    return repr(f"{scheme[:20]}://{user[:100]}:***@{location[:200]}")


class ClusterUnreachable(RuntimeError):
    """The cluster's Redis cannot be used: not reached, or it refused the login."""


def unreachable(target: RedisTarget, error: Exception) -> ClusterUnreachable:
    """The error to show when talking to ``target`` failed with ``error``: what happened and
    what to do, with the URL masked (redis-py's own texts carry no password)."""
    import redis.exceptions

    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, redis.exceptions.AuthenticationError) or "WRONGPASS" in str(error):
        return ClusterUnreachable(
            f"Redis at {target.address} refused the login of {target.masked} ({detail}): "
            "check the user and password in --cluster against Redis's requirepass or ACL."
        )
    if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return ClusterUnreachable(
            f"Redis cannot be reached at {target.address} ({detail}): check that redis-server "
            f"runs there and that this machine may connect to it{' over TLS' * target.tls}."
        )
    return ClusterUnreachable(f"Redis at {target.address} answered an error: {detail}.")


def check(target: RedisTarget, client: redis.Redis) -> None:
    """``PING`` through ``client`` (made from ``target``), or :class:`ClusterUnreachable`."""
    import redis.exceptions

    try:
        client.ping()
    except redis.exceptions.RedisError as error:
        raise unreachable(target, error) from None


async def check_async(target: RedisTarget, client: redis.asyncio.Redis) -> None:
    """:func:`check` on a ``redis.asyncio`` client."""
    import redis.exceptions

    try:
        await client.ping()
    except redis.exceptions.RedisError as error:
        raise unreachable(target, error) from None
