"""Client of the sandbox HTTP protocol: PremierLangage sandbox 2.x and 3.x, and our embedded server.

The contract is ``shared/reference/sandbox-protocol.md``. :class:`Sandbox` keeps the attribute
API of the ``sandbox-api`` package (``s.cpu``, ``s.python3``...) and maps both server
generations onto it: 2.x answers ``specifications/`` with a flat object, 3.x with a
``host``/``container`` one, and only 2.x names the versions of its main tools. What a server
does not tell is ``None``.

Failures are :class:`SandboxError` subclasses (see :mod:`sandbox_kernel._errors`); no
``requests`` exception escapes a public method. Retries are limited to what cannot run anything
twice: a request whose connection could not be opened (nothing was sent), and an ``execute/``
answered 503 (the server refuses before running anything when no container is free).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import io
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar, overload
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

from . import _errors
from ._errors import *  # noqa: F403  (re-exports every Sandbox<STATUS> class)
from ._errors import (
    Sandbox503,
    SandboxCancelled,
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxProtocolError,
    SandboxTimeout,
    body_snippet,
    error_for_status,
)
from .protocol import (
    EXECUTE,
    LIBRARIES,
    OVERLOADED_TEXT,
    SPECIFICATIONS,
    USAGES,
    environment_path,
    file_path,
    is_uuid,
    validate_config,
)

__all__ = ["Cancellation", "LibrariesDict", "OnBusy", "Sandbox", "validate"]
__all__ += _errors.__all__

#: Seconds to wait for any answer, unless an ``execute/`` needs longer (see ``Sandbox.execute``).
DEFAULT_TIMEOUT: Final = 60.0
#: Seconds ``execute`` keeps retrying an ``execute/`` answered 503 (no free container).
DEFAULT_BUSY_BUDGET: Final = 30.0

_BUSY_FIRST_WAIT: Final = 0.25
_BUSY_MAX_WAIT: Final = 3.0
#: Added to the server's ``execute_timeout`` for the read timeout of ``execute/``: the server
#: answers after the commands' budget, plus the time to prepare and save the environment.
_EXECUTE_MARGIN: Final = 10.0
#: Attempts to open a connection for a GET or HEAD; backoff 0, 0.1, 0.2 s (urllib3's formula).
_CONNECT_RETRIES: Final = 3
_CONNECT_BACKOFF: Final = 0.05

_T = TypeVar("_T")

#: ``on_busy(attempt, wait, elapsed)``: the ``attempt``-th ``execute/`` was answered 503, the
#: client now sleeps ``wait`` seconds; ``elapsed`` seconds have passed since the first attempt.
#: Raising from it (``KeyboardInterrupt``, say) abandons the execution: nothing ran yet.
OnBusy = Callable[[int, float, float], object]


class _BinaryReadable(Protocol):
    """An open binary file, ``io.BytesIO``... anything whose ``read()`` gives bytes."""

    def read(self, size: int = -1, /) -> bytes: ...


class Cancellation:
    """Lets another thread cancel one :meth:`Sandbox.execute` (an interrupted cell).

    ``cancel()`` shuts the request's socket down: the waiting thread gets
    :class:`SandboxCancelled` at once, and a server that watches for disconnects (the embedded
    one) kills the command. It also ends the waits between 503 retries.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        """Safe from any thread, and from a signal handler."""
        self._event.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when cancelled meanwhile."""
        return self._event.wait(seconds)

    def _attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.add(sock)
        if self.cancelled:
            _shut(sock)

    def _detach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sockets.discard(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


#: The cancellation of the ``execute`` running in this thread, seen by its connection.
_CURRENT_CANCELLATION: contextvars.ContextVar[Cancellation | None] = contextvars.ContextVar(
    "sandbox_cancellation", default=None
)


class _CancellableMixin:
    """Registers the socket with the current :class:`Cancellation` while an answer is awaited."""

    sock: socket.socket | None

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        cancellation = _CURRENT_CANCELLATION.get()
        if cancellation is None:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        sock = self.sock
        cancellation._attach(sock)
        try:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        finally:
            cancellation._detach(sock)


class _CancellableConnection(_CancellableMixin, HTTPConnection):
    pass


class _CancellableHTTPSConnection(_CancellableMixin, HTTPSConnection):
    pass


class _CancellablePool(HTTPConnectionPool):
    ConnectionCls = _CancellableConnection


class _CancellableHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CancellableHTTPSConnection


class _Adapter(HTTPAdapter):
    """An adapter whose connections a :class:`Cancellation` can shut down."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _CancellablePool,
            "https": _CancellableHTTPSPool,
        }


def validate(config: object) -> tuple[bool, str]:
    """``(True, "")`` when the server would accept ``config``, else ``(False, reason)``.

    Same rules as the server (``protocol.validate_config``), so a bad config is reported
    without a round trip.
    """
    return validate_config(config)


# --- Reading specifications/ and libraries/ answers of both generations ---------------------


def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


def _is_v3(specs: Mapping[str, Any]) -> bool:
    """3.x nests everything under ``host`` and ``container``; 2.x is flat (contract)."""
    return isinstance(specs.get("host"), Mapping) or isinstance(specs.get("container"), Mapping)


def _from_host(specs: Mapping[str, Any], key: str) -> Any:
    host = _section(specs, "host")
    return host[key] if key in host else specs.get(key)


def _from_container(specs: Mapping[str, Any], key: str) -> Any:
    """A per-container setting: under ``container`` on 3.x, at the top level on 2.x."""
    container = _section(specs, "container")
    return container[key] if key in container else specs.get(key)


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _mapping(value: object) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _integer(value: object) -> int | None:
    number = _number(value)
    return int(number) if number is not None and float(number).is_integer() else None


def _execute_timeout(specs: Mapping[str, Any]) -> float | None:
    return _number(_from_container(specs, "execute_timeout"))


def _bin(libs: Mapping[str, Any]) -> list[str] | dict[str, Any] | None:
    value = libs.get("bin")
    if isinstance(value, list):
        return [str(item) for item in value]
    return _mapping(value)


def _debian_upstream(version: object) -> str | None:
    """``"1:12.2.0-14+deb12u1"`` -> ``"12.2.0"``: drop the epoch, the Debian revision and any
    ``+``/``~`` suffix of the upstream version. ``"?"`` (unknown, contract) gives ``None``.
    """
    if not isinstance(version, str) or version.strip() in ("", "?"):
        return None
    upstream = re.sub(r"^\d+:", "", version.strip())
    if "-" in upstream:
        upstream = upstream.rsplit("-", 1)[0]
    match = re.match(r"\d+(?:\.\d+)*", upstream)
    return match.group(0) if match else upstream


def _version_reader(key: str, *packages: str) -> Callable[[Mapping[str, Any]], str | None]:
    """Reads the version of a tool: 2.x names it (``key``); 3.x only lists dpkg packages in
    ``libraries.system``, so the first package matching one of ``packages`` (regexes, in order
    of preference) gives it.
    """

    def read(libs: Mapping[str, Any]) -> str | None:
        given = _text(libs.get(key))
        if given is not None:
            return given
        system = _section(_section(libs, "libraries"), "system")
        for pattern in packages:
            for name, version in system.items():
                if re.fullmatch(pattern, name) and (found := _debian_upstream(version)):
                    return found
        return None

    return read


# --- Attribute descriptors ------------------------------------------------------------------


class _Category(Generic[_T]):
    """An attribute read from one endpoint's answer, fetched on the first access of any
    attribute of the same endpoint and then cached on the instance; ``del`` forgets the whole
    endpoint so that the next access fetches it again.
    """

    endpoint: str = ""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> _Category[_T]: ...
    @overload
    def __get__(self, instance: Sandbox, owner: type[Any]) -> _T: ...
    def __get__(self, instance: Sandbox | None, owner: type[Any]) -> _Category[_T] | _T:
        if instance is None:
            return self
        return self._value(instance)

    def __delete__(self, instance: Sandbox) -> None:
        instance._forget(self.endpoint)

    def _value(self, instance: Sandbox) -> _T:
        raise NotImplementedError


class _Field(_Category[_T]):
    """A value that ``read`` takes out of the endpoint's (cached) answer."""

    def __init__(self, read: Callable[[Mapping[str, Any]], _T], doc: str) -> None:
        super().__init__(doc)
        self._read = read

    def _value(self, instance: Sandbox) -> _T:
        return self._read(instance._category(self.endpoint))


class _Specification(_Field[_T]):
    """An attribute from ``specifications/`` (fast: ~20 ms on the reference server)."""

    endpoint = SPECIFICATIONS


class _Library(_Field[_T]):
    """An attribute from ``libraries/`` (slow: it starts a container, ~1 s)."""

    endpoint = LIBRARIES


class LibrariesDict(dict[str, Any]):
    """``Sandbox.libraries``: the ``libraries`` dict of the server (``system``, ``python``,
    ``perl``, ``c``), which can also be called: ``libraries()`` gives the whole answer of
    ``libraries/`` (with ``bin``, and the tool versions of 2.x).

    ``sandbox-api`` 0.x had the attribute, 1.x the method; one name cannot be both, so the
    value serves both. The answer comes from the same cached fetch as the other library
    attributes (``libraries/`` is slow: it starts a container); ``del s.libraries`` forgets it.
    Empty when the server tells nothing.
    """

    def __init__(self, answer: Mapping[str, Any]) -> None:
        super().__init__(_section(answer, "libraries"))
        self._answer = answer

    def __call__(self) -> dict[str, Any]:
        """The whole answer of ``libraries/`` (a copy: changing it changes no cache)."""
        return copy.deepcopy(dict(self._answer))


class _LibrariesAttribute(_Category[LibrariesDict]):
    """``libraries``: a :class:`LibrariesDict`, callable for the whole answer."""

    endpoint = LIBRARIES

    def _value(self, instance: Sandbox) -> LibrariesDict:
        return LibrariesDict(instance._category(self.endpoint))


# --- The client -----------------------------------------------------------------------------


class Sandbox:
    """A sandbox server at ``url``: its specifications and libraries as attributes, and the
    requests of the protocol as methods (``execute``, ``download``, ``check``, ``usage``...).

    ``timeout`` (seconds) bounds every request; ``token``, when given, is sent as
    ``Authorization: Bearer <token>`` (the reference server has none, a proxy may want one).
    ``busy_budget`` and ``on_busy`` rule how ``execute`` waits for a free container (see there).
    One HTTP session is kept, so connections are reused: ``close()`` it, or use
    ``with Sandbox(url) as s:``.
    """

    sandbox_version = _Specification(
        lambda s: _text(_from_host(s, "sandbox_version")), "Version of the sandbox server."
    )
    docker_version = _Specification(
        lambda s: _text(_from_host(s, "docker_version")), "Version of Docker on the server."
    )
    memory = _Specification(
        lambda s: _mapping(_from_container(s, "memory")),
        "Memory limits of one container (bytes, -1 for none, on 3.x; '100m'-style on 2.x).",
    )
    cpu = _Specification(
        lambda s: _mapping(_from_container(s, "cpu")), "CPU limits of one container."
    )
    environ = _Specification(
        lambda s: _mapping(_from_container(s, "environ")),
        "Environment variables of the containers (2.x only, unless a 3.x server adds it).",
    )
    execute_timeout = _Specification(
        _execute_timeout, "Seconds an execute/ may run (2.x, or our embedded server)."
    )
    expiration = _Specification(
        lambda s: _integer(_from_container(s, "expiration")),
        "Seconds a saved environment is kept (2.x, or our embedded server).",
    )
    isolation = _Specification(
        lambda s: _mapping(_from_container(s, "isolation")),
        "How our embedded server isolates commands (``container.isolation``); None elsewhere.",
    )

    python3 = _Library(_version_reader("python3", r"python3"), "Version of python3.")
    python2 = _Library(_version_reader("python2", r"python2", r"python2\.7"), "Version of python2.")
    java = _Library(
        _version_reader(
            "java", r"default-jdk", r"default-jre", r"openjdk-\d+-jdk.*", r"openjdk-\d+-jre.*"
        ),
        "Version of Java.",
    )
    gcc = _Library(_version_reader("gcc", r"gcc"), "Version of gcc.")
    gpp = _Library(_version_reader("g++", r"g\+\+"), "Version of g++.")
    perl = _Library(_version_reader("perl", r"perl"), "Version of perl.")
    postgres = _Library(
        _version_reader("postgres", r"postgresql", r"postgresql-\d+"), "Version of PostgreSQL."
    )
    libraries = _LibrariesAttribute(LibrariesDict.__doc__ or "")
    bin = _Library(_bin, "Every executable on the containers' PATH (a list on 3.x).")

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        *,
        busy_budget: float = DEFAULT_BUSY_BUDGET,
        on_busy: OnBusy | None = None,
    ) -> None:
        if not timeout > 0:
            raise SandboxConfigError(
                f"timeout must be a positive number of seconds, not {timeout!r}"
            )
        if token is not None and (
            not token or token.strip() != token or any(c in token for c in "\r\n")
        ):
            raise SandboxConfigError(
                "The token cannot travel in an HTTP header (it is empty, has surrounding "
                "spaces or line breaks). Give the token exactly as the server expects it."
            )
        self.url = _base_url(url)
        self.timeout = timeout
        self.busy_budget = busy_budget
        self.on_busy = on_busy
        self._has_token = token is not None
        self._cache: dict[str, dict[str, Any]] = {}
        self._session = _session(token)

    def __repr__(self) -> str:
        token = ", token='***'" if self._has_token else ""
        return f"{type(self).__name__}({self.url!r}, timeout={self.timeout!r}{token})"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    # --- Raw endpoints ---

    def specifications(self) -> dict[str, Any]:
        """The answer of ``specifications/`` as the server gives it (one GET, not cached)."""
        return self._get_json(SPECIFICATIONS)

    def cached_specifications(self) -> dict[str, Any]:
        """The answer of ``specifications/``, fetched once and kept (the attributes read it).

        ``del sandbox.cpu`` (or any specification attribute) makes the next call fetch again.
        """
        return self._category(SPECIFICATIONS)

    @property
    def has_specifications(self) -> bool:
        """Whether the specifications are cached already (reading them costs nothing)."""
        return SPECIFICATIONS in self._cache

    @property
    def generation(self) -> int:
        """3 for a server answering with ``host``/``container`` shapes, 2 for the flat ones."""
        return 3 if _is_v3(self._category(SPECIFICATIONS)) else 2

    def usages(self) -> dict[str, Any]:
        """The answer of ``usages/`` (3.x only; ~2 s on the reference server, which samples)."""
        return self._get_json(USAGES)

    @property
    def containers(self) -> dict[str, Any] | None:
        """``{"total", "running", "available"}`` containers, asked anew on every access.

        2.x tells it in ``specifications/``; 3.x only tells the count there and the busy
        containers in ``usages/``.
        """
        if not _is_v3(self._category(SPECIFICATIONS)):
            return _mapping(self.specifications().get("containers"))
        total = _integer(_section(self._category(SPECIFICATIONS), "container").get("count"))
        running = _integer(self.usages().get("container"))
        if total is None and running is None:
            return None
        available = None if total is None or running is None else max(total - running, 0)
        return {"total": total, "running": running, "available": available}

    @containers.deleter
    def containers(self) -> None:
        self._forget(SPECIFICATIONS)

    def usage(self) -> float:
        """The load of the sandbox in [0, 1]: busy containers / containers (0.0 if unknown).

        Near 1, an ``execute`` is likely to wait for a free container.
        """
        containers = self.containers or {}
        total, running = _number(containers.get("total")), _number(containers.get("running"))
        if not total or total <= 0 or running is None:
            return 0.0
        return min(1.0, max(0.0, running / total))

    # --- Environments and files ---

    def download(self, uuid: str, path: str | None = None) -> io.BytesIO:
        """A saved environment (a ``.tgz``), or one file of it when ``path`` is given.

        Raises ``Sandbox404`` when the environment or the file does not exist (or expired).
        """
        response = self._send("GET", _resource(uuid, path))
        _raise_for_status(response)
        return io.BytesIO(response.content)

    def check(self, uuid: str, path: str | None = None) -> int:
        """Size in bytes of a saved environment (or of one file of it), 0 when it does not
        exist. Only headers travel (HEAD).
        """
        if not is_uuid(uuid):
            return 0  # the server answers 404 to anything but a uuid (contract)
        response = self._send("HEAD", _resource(uuid, path), stream=True)
        # The reference server's development HEAD answers carry a body (contract, "observed"):
        # closing the unread response closes its connection instead of pooling it, so that
        # those stray bytes are not read as the next answer.
        response.close()
        if response.status_code == 404:
            return 0
        _raise_for_status(response)
        length = response.headers.get("Content-Length", "")
        if not length.isdigit():
            raise SandboxProtocolError(
                f"HEAD {response.url} answered {response.status_code} without a valid "
                f"Content-Length ({length!r}), which the protocol requires. Check that "
                f"{self.url} is a sandbox server and that no proxy strips the header."
            )
        return int(length)

    # --- Execution ---

    @staticmethod
    def validate(config: object) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)``: what the server would say of ``config``."""
        return validate_config(config)

    def execute(
        self,
        config: Mapping[str, Any],
        environ: _BinaryReadable | bytes | None = None,
        *,
        busy_budget: float | None = None,
        on_busy: OnBusy | None = None,
        cancel: Cancellation | None = None,
    ) -> dict[str, Any]:
        """Run ``config`` (see the contract) and return the server's JSON answer.

        ``cancel``: a :class:`Cancellation` another thread may use to abandon the request; this
        call then raises :class:`SandboxCancelled`.

        ``environ``: a ``.tgz`` to fill the working directory with (a binary file or bytes).
        An invalid config raises :class:`SandboxConfigError` and sends nothing. While the server
        answers 503 (no free container; nothing ran), the request is sent again after a growing,
        jittered wait, for at most ``busy_budget`` seconds (default: the client's), each wait
        reported to ``on_busy``. Nothing else is ever sent twice: the commands may have run.

        The read timeout is the client's ``timeout``, or the server's ``execute_timeout`` plus
        10 s when the specifications were already fetched and that is longer.
        """
        ok, reason = validate_config(config)
        if not ok:
            raise SandboxConfigError(
                f"Invalid execute config: {reason}. Nothing was sent; fix the config "
                "(Sandbox.validate(config) checks it)."
            )
        form = _form(_config_json(config), _read_archive(environ))
        budget = self.busy_budget if busy_budget is None else busy_budget
        cancellation = cancel or Cancellation()
        token = _CURRENT_CANCELLATION.set(cancellation)
        try:
            response = self._post_until_free(form, budget, on_busy or self.on_busy, cancellation)
        except SandboxError as error:
            if cancellation.cancelled:
                raise SandboxCancelled(_CANCELLED) from error
            raise
        finally:
            _CURRENT_CANCELLATION.reset(token)
        _raise_for_status(response)
        return _json_object(response, self.url)

    def _post_until_free(
        self,
        form: dict[str, Any],
        budget: float,
        on_busy: OnBusy | None,
        cancellation: Cancellation,
    ) -> requests.Response:
        """POST ``execute/`` again while it is answered 503, within ``budget`` seconds."""
        start = time.monotonic()
        attempt = 0
        while True:
            if cancellation.cancelled:
                raise SandboxCancelled(_CANCELLED)
            attempt += 1
            response = self._send("POST", EXECUTE, files=form, timeout=self._execute_read_timeout())
            if response.status_code != 503:
                return response
            elapsed = time.monotonic() - start
            wait = min(_busy_wait(attempt), budget - elapsed)
            if wait <= 0:
                raise Sandbox503(response, _busy_advice(response, elapsed, attempt))
            if on_busy is not None:
                on_busy(attempt, wait, elapsed)
            if cancellation.wait(wait):
                raise SandboxCancelled(_CANCELLED)

    def _execute_read_timeout(self) -> float:
        specs = self._cache.get(SPECIFICATIONS)
        limit = _execute_timeout(specs) if specs is not None else None
        return self.timeout if limit is None else max(self.timeout, limit + _EXECUTE_MARGIN)

    # --- Transport ---

    def _category(self, endpoint: str) -> dict[str, Any]:
        """The cached answer of ``endpoint``, fetched on first use."""
        cached = self._cache.get(endpoint)
        if cached is None:
            cached = self._cache[endpoint] = self._get_json(endpoint)
        return cached

    def _forget(self, endpoint: str) -> None:
        self._cache.pop(endpoint, None)

    def _get_json(self, endpoint: str) -> dict[str, Any]:
        response = self._send("GET", endpoint)
        _raise_for_status(response)
        return _json_object(response, self.url)

    def _send(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> requests.Response:
        """One exchange; any ``requests`` failure becomes a :class:`SandboxError`.

        Redirects are followed except for POST (``requests`` would turn it into a GET).
        """
        url = self.url + path
        limit = self.timeout if timeout is None else timeout
        try:
            return self._session.request(
                method, url, timeout=limit, allow_redirects=method != "POST", **kwargs
            )
        except requests.RequestException as exc:
            raise _translate(exc, method, url, limit) from exc


# --- Helpers of the transport ---------------------------------------------------------------


def _base_url(url: str) -> str:
    """``url`` with a trailing slash, so that endpoint paths can be appended (contract)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise SandboxConfigError(
            f"{url!r} is not a sandbox URL. Give its base address with the scheme, such as "
            "'http://127.0.0.1:8000/' (check SANDBOX_URL)."
        )
    return url.strip().rstrip("/") + "/"


def _session(token: str | None) -> requests.Session:
    """One session per client: pooled connections, the token on every request, and quick
    retries of GET and HEAD when a connection cannot be opened.

    urllib3 retries a connection that could not be opened for any method (nothing was sent, so
    even a POST is safe); read errors are never retried (``read=False``), so a request that
    reached the server is never replayed.
    """
    retry = Retry(
        total=_CONNECT_RETRIES,
        connect=_CONNECT_RETRIES,
        read=False,
        status=0,
        other=0,
        backoff_factor=_CONNECT_BACKOFF,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    adapter = _Adapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _resource(uuid: str, path: str | None) -> str:
    """Path of an environment or of one of its files, quoted so that any name travels."""
    uuid = quote(uuid, safe="")
    return environment_path(uuid) if path is None else file_path(uuid, quote(path, safe="/"))


def _raise_for_status(response: requests.Response) -> None:
    if response.status_code >= 300:
        raise error_for_status(response.status_code)(response)


def _json_object(response: requests.Response, base: str) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else breaks the protocol."""
    try:
        data = json.loads(response.content)
    except ValueError:  # not JSON, or not UTF-8
        data = None
    if isinstance(data, dict):
        return data
    method = response.request.method if response.request is not None else "request"
    what = "not JSON" if data is None else "JSON but not an object"
    raise SandboxProtocolError(
        f"{method} {response.url} answered {response.status_code} with a body that is {what}: "
        f"{body_snippet(response)!r}. Check that {base} is a sandbox server and that no proxy "
        "in between rewrites its answers."
    )


def _config_json(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(config), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SandboxConfigError(
            f"The config cannot be sent as JSON ({exc}). Nothing was sent; use only strings, "
            "numbers, booleans, lists and dicts in it."
        ) from exc


def _read_archive(environ: _BinaryReadable | bytes | None) -> bytes | None:
    """The upload as bytes, read once so that it can be sent again after a 503."""
    if environ is None:
        return None
    data = environ if isinstance(environ, bytes | bytearray | memoryview) else environ.read()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SandboxConfigError(
            f"environ must be a .tgz as bytes or as a binary file (open(path, 'rb')), not "
            f"something that reads {type(data).__name__}."
        )
    return bytes(data)


def _form(config: str, archive: bytes | None) -> dict[str, Any]:
    """The multipart form of ``execute/``: ``config`` as a plain field, the upload as a file."""
    form: dict[str, Any] = {"config": (None, config)}
    if archive is not None:
        form["environment"] = ("environment.tgz", archive, "application/gzip")
    return form


def _busy_wait(attempt: int) -> float:
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s... up to 3 s, each one 50-100 %."""
    ceiling = min(_BUSY_MAX_WAIT, _BUSY_FIRST_WAIT * 2.0 ** min(attempt - 1, 16))
    return ceiling * random.uniform(0.5, 1.0)


def _busy_advice(response: requests.Response, elapsed: float, attempts: int) -> str:
    busy = response.text.strip() == OVERLOADED_TEXT
    why = "no container became free" if busy else "the server stayed unavailable"
    return (
        f"the sandbox stayed busy for {elapsed:.1f} s ({attempts} attempts; {why}). Try again "
        "later, allow a longer wait (busy_budget=... on Sandbox or execute), or use a sandbox "
        "with more containers"
    )


def _translate(
    exc: requests.RequestException, method: str, url: str, timeout: float
) -> SandboxError:
    """The :class:`SandboxError` telling what went wrong with ``method url`` and what to do."""
    cause = _root_cause(exc)
    if isinstance(
        exc,
        requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema,
    ):
        return SandboxConfigError(
            f"Cannot send {method} {url}: {cause}. Give the sandbox's base URL, such as "
            "'http://127.0.0.1:8000/' (check SANDBOX_URL)."
        )
    if isinstance(exc, requests.exceptions.InvalidHeader):  # its text would show the token
        return SandboxConfigError(
            f"Cannot send {method} {url}: a header value is not valid HTTP. Check the token."
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return SandboxConnectionError(
            f"The sandbox at {url} did not accept a connection within {timeout:g} s ({cause}). "
            + _CHECK_SERVER
        )
    # A timeout while reading the body reaches us as a ConnectionError wrapping urllib3's.
    if isinstance(exc, requests.exceptions.Timeout) or _in_chain(exc, ReadTimeoutError):
        return SandboxTimeout(_timeout_message(method, url, timeout))
    if isinstance(
        exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
    ):
        return SandboxProtocolError(
            f"The answer to {method} {url} was cut short or garbled ({cause}). Retry; if it "
            "persists, check the server's log and any proxy in between."
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return SandboxConnectionError(_connection_message(exc, method, url, cause))
    return SandboxError(f"{method} {url} failed: {cause}. " + _CHECK_SERVER)


_CANCELLED: Final = (
    "The execution was cancelled and its connection closed. A server that watches for "
    "disconnects (the embedded one) killed the command; a public sandbox server may run it "
    "until its own timeout."
)

_CHECK_SERVER: Final = (
    "Check that the sandbox server is running (start one with `sandbox-kernel serve`) and that "
    "the URL given (or SANDBOX_URL) points to it."
)


def _connection_message(
    exc: requests.RequestException, method: str, url: str, cause: BaseException
) -> str:
    if method == "POST" and not _never_sent(exc):
        return (
            f"The connection to the sandbox broke during {method} {url} ({cause}). The commands "
            "may have run, so the request was not sent again: check the server's log, then "
            "retry if needed."
        )
    return f"Cannot reach the sandbox at {url} ({cause}). " + _CHECK_SERVER


def _timeout_message(method: str, url: str, timeout: float) -> str:
    text = f"The sandbox at {url} did not answer {method} within {timeout:g} s."
    if method == "POST":
        text += " The commands may still be running on the server, which cannot cancel them."
    return (
        text + " If the server is only slow, allow more time: Sandbox(url, timeout=...), or "
        "SANDBOX_TIMEOUT / c.SandboxKernel.timeout for the kernel (execute/ also gets the "
        "server's execute_timeout + 10 s once the specifications are known)."
    )


def _never_sent(exc: BaseException) -> bool:
    """Whether the failure happened while opening the connection: then nothing was sent."""
    return _in_chain(exc, NewConnectionError)


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(link, kind) for link in _chain(exc))


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a requests/urllib3 chain: the one whose text says what
    happened (``[Errno 111] Connection refused``), not the pool's wrapping."""
    return _chain(exc)[-1]


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps: urllib3 keeps them in ``reason``, in ``args`` or as
    ``__cause__``."""
    chain = [exc]
    while True:
        current = chain[-1]
        reason = getattr(current, "reason", None)
        inner = reason if isinstance(reason, BaseException) else None
        inner = inner or next((a for a in current.args if isinstance(a, BaseException)), None)
        inner = inner or current.__cause__
        if inner is None or any(inner is seen for seen in chain):
            return chain
        chain.append(inner)
