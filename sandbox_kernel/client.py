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

A server is not trusted to behave: every request has a deadline for the whole exchange, body
included (one watchdog thread shuts the socket of a request past it); every answer is read
within a cap (``max_json``, a download's ``max_bytes``); the fields of ``specifications/``,
``usages/`` and ``libraries/`` are type-checked where they are read; and a
:class:`Cancellation` ends an ``execute`` given it, or any request made in a
:func:`cancel_scope`, at any point.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import heapq
import http.client
import io
import itertools
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar, overload

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry
from urllib3.util.wait import wait_for_read

from . import _errors
from ._errors import *  # noqa: F403  (re-exports every Sandbox<STATUS> class)
from ._errors import (
    Advise,
    Sandbox503,
    SandboxCancelled,
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxProtocolError,
    SandboxTimeout,
    error_for_status,
)
from ._generations import (
    Inventory,
    Load,
    Specs,
    container_setting,
    needs_usages,
    read_inventory,
    read_load,
    read_specs,
)
from ._wire import (
    CONNECT_BACKOFF,
    CONNECT_RETRIES,
    DEFAULT_TIMEOUT_SETTING,
    ERROR_BODY_CAP,
    Cap,
    LoadSample,
    Part,
    WorkerLoad,
    announced_size,
    announced_too_large,
    busy_advice,
    busy_wait,
    check_identity,
    check_options,
    check_size,
    connect_timeout_message,
    connection_message,
    download_cap,
    execute_answer,
    execute_deadline,
    execute_form,
    facts_answer,
    failed_message,
    garbled_message,
    invalid_url_message,
    json_cap,
    normalise_url,
    raise_for_status,
    read_workers,
    resource,
    sent_past_length,
    sent_too_much,
    timeout_message,
)

# Defaults of the client's arguments: public names of this module since its first version.
from ._wire import DEFAULT_BUSY_BUDGET as DEFAULT_BUSY_BUDGET
from ._wire import DEFAULT_MAX_DOWNLOAD as DEFAULT_MAX_DOWNLOAD
from ._wire import DEFAULT_MAX_JSON as DEFAULT_MAX_JSON
from ._wire import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from ._wire import OnBusy as OnBusy
from .protocol import (
    EXECUTE,
    EXTENSION_QUEUE,
    LIBRARIES,
    SPECIFICATIONS,
    USAGES,
    is_uuid,
    validate_config,
)

__all__ = [
    "Cancellation",
    "Inventory",
    "LibrariesDict",
    "Load",
    "LoadSample",
    "OnBusy",
    "Sandbox",
    "Specs",
    "WorkerLoad",
    "cancel_scope",
    "scope_cancelled",
    "validate",
]
__all__ += _errors.__all__

#: Bytes read from the socket at a time.
_CHUNK: Final = 256 * 1024

_T = TypeVar("_T")


class _BinaryReadable(Protocol):
    """An open binary file, ``io.BytesIO``... anything whose ``read()`` gives bytes."""

    def read(self, size: int = -1, /) -> bytes: ...


class Cancellation:
    """Lets another thread cancel requests: an ``execute`` given it (``cancel=``), and every
    request made inside ``with cancel_scope(cancellation):`` (an interrupted cell, say).

    ``cancel()`` shuts the sockets of those requests down: the waiting thread gets
    :class:`SandboxCancelled` at once, whether it waits for the headers or reads the body, and
    a server that watches for disconnects (the embedded one) kills the command. It also ends
    the waits between 503 retries. Once cancelled, it stays so: later requests under it raise
    at once without sending anything.
    """

    def __init__(self) -> None:
        # Reentrant: cancel() may run in a signal handler of a thread that holds the lock.
        self._lock = threading.RLock()
        self._exchanges: set[_Exchange] = set()
        self._event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        """Safe from any thread, and from a signal handler."""
        self._event.set()
        with self._lock:
            exchanges = list(self._exchanges)
        for exchange in exchanges:
            exchange.cut()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when cancelled meanwhile."""
        return self._event.wait(seconds)

    def _enter(self, exchange: _Exchange) -> None:
        with self._lock:
            self._exchanges.add(exchange)

    def _leave(self, exchange: _Exchange) -> None:
        with self._lock:
            self._exchanges.discard(exchange)


#: The cancellations of the ``cancel_scope`` blocks this thread is in (innermost last).
_SCOPE: contextvars.ContextVar[tuple[Cancellation, ...]] = contextvars.ContextVar(
    "sandbox_cancel_scope", default=()
)


@contextlib.contextmanager
def cancel_scope(cancellation: Cancellation) -> Iterator[Cancellation]:
    """Every request this thread makes inside the block ends with :class:`SandboxCancelled`
    as soon as ``cancellation.cancel()`` is called (from another thread, or a signal handler),
    whether it is connecting, sending, waiting for the answer or reading its body.

    Scopes nest (any of them cancels), and combine with ``execute(..., cancel=...)``. A front-end
    wraps whatever an interrupt must end in it (a magic's downloads, uploads, look-ups).
    """
    token = _SCOPE.set((*_SCOPE.get(), cancellation))
    try:
        yield cancellation
    finally:
        _SCOPE.reset(token)


def scope_cancelled() -> bool:
    """Whether a ``cancel_scope`` this thread is in was cancelled (for a caller waiting on
    work done elsewhere, which must stop waiting at an interrupt too)."""
    return _any_cancelled(_SCOPE.get())


def _cancellations(extra: Cancellation | None) -> tuple[Cancellation, ...]:
    """The cancellations in effect for a request: the scopes', plus ``extra`` if given."""
    scope = _SCOPE.get()
    if extra is None or any(extra is given for given in scope):
        return scope
    return (*scope, extra)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _Exchange:
    """One request and its whole answer: its deadline, its cancellations, and the sockets it
    used (a redirect uses several). Expiring or cutting it shuts those sockets down, which
    ends any blocking connect, send or read at once; once finished, it never touches them
    again (they may be pooled and serve the next request).
    """

    __slots__ = ("_cut", "_lock", "_sockets", "cancellations", "deadline", "done", "expired")

    def __init__(self, deadline: float, cancellations: tuple[Cancellation, ...]) -> None:
        self.deadline = deadline
        self.cancellations = cancellations
        self._lock = threading.RLock()
        self._sockets: list[socket.socket] = []
        self._cut = False
        self.expired = False
        self.done = False
        for cancellation in cancellations:
            cancellation._enter(self)

    @property
    def cancelled(self) -> bool:
        return any(cancellation.cancelled for cancellation in self.cancellations)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def attach(self, sock: socket.socket | None) -> None:
        """``sock`` now carries this exchange (a new connection, or a pooled one reused)."""
        if sock is None:
            return
        with self._lock:
            if self.done or any(sock is known for known in self._sockets):
                return
            self._sockets.append(sock)
            if self._cut or self.expired:
                _shut(sock)

    def last_socket(self) -> socket.socket | None:
        """The socket of the final answer (after any redirect)."""
        with self._lock:
            return self._sockets[-1] if self._sockets else None

    def expire(self) -> None:
        """The deadline passed (the watchdog's call)."""
        self._end(expired=True)

    def cut(self) -> None:
        """A cancellation of this exchange was cancelled."""
        self._end(expired=False)

    def _end(self, *, expired: bool) -> None:
        with self._lock:
            if self.done:
                return
            if expired:
                self.expired = True
            else:
                self._cut = True
            for sock in self._sockets:
                _shut(sock)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._sockets.clear()
        for cancellation in self.cancellations:
            cancellation._leave(self)


class _Watchdog:
    """One daemon thread for the whole process that expires exchanges at their deadline.

    A timer per request would cost a thread start per request (~100 µs); here a request costs
    one push on a heap. The thread sleeps until the earliest deadline; finished exchanges are
    dropped lazily when they reach the top, and the heap is compacted now and then.
    """

    _COMPACT_EVERY: Final = 1024

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread does not survive fork

    def _reset(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Exchange]] = []
        self._order = itertools.count()
        self._started = False

    def watch(self, exchange: _Exchange) -> None:
        entry = (exchange.deadline, next(self._order), exchange)
        with self._condition:
            heapq.heappush(self._heap, entry)
            if entry[1] % self._COMPACT_EVERY == 0:
                self._heap = [kept for kept in self._heap if not kept[2].done]
                heapq.heapify(self._heap)
            if not self._started:
                self._started = True
                threading.Thread(
                    target=self._run, name="sandbox-client-deadlines", daemon=True
                ).start()
            elif self._heap[0] is entry:  # earlier than what the thread sleeps for
                self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                due = self._next_due()
            due.expire()

    def _next_due(self) -> _Exchange:
        """Wait (lock held) for the first unfinished exchange whose deadline has passed."""
        while True:
            heap = self._heap
            while heap and heap[0][2].done:
                heapq.heappop(heap)
            if not heap:
                self._condition.wait()
                continue
            delay = heap[0][0] - time.monotonic()
            if delay <= 0:
                return heapq.heappop(heap)[2]
            self._condition.wait(delay)


_WATCHDOG: Final = _Watchdog()

#: The exchange this thread is carrying out, seen by its connections.
_CURRENT_EXCHANGE: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar(
    "sandbox_exchange", default=None
)


class _WatchedMixin:
    """Hands the connection's socket to the current :class:`_Exchange` whenever it carries a
    request (a new connection or a pooled one), so that its deadline and cancellations reach
    every step: connect, send, headers and body. A connection is never given more time to
    open than its exchange has left.
    """

    sock: socket.socket | None
    timeout: float | None

    def connect(self) -> None:
        exchange = _CURRENT_EXCHANGE.get()
        if exchange is not None:
            remaining = exchange.remaining()
            if remaining <= 0:
                raise ConnectTimeoutError(self, "no time left to open a connection")
            if self.timeout is None or self.timeout > remaining:
                self.timeout = remaining
        super().connect()  # type: ignore[misc]
        if exchange is not None:
            exchange.attach(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        exchange = _CURRENT_EXCHANGE.get()
        if exchange is not None:
            exchange.attach(self.sock)  # a pooled connection; a new one attaches in connect()
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedConnection(_WatchedMixin, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedMixin, HTTPSConnection):
    pass


class _WatchedPool(HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Adapter(HTTPAdapter):
    """An adapter whose connections carry deadlines and cancellations, and which never reads
    the body of a redirect (``requests`` would read all of it, however long, to drop it)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedPool,
            "https": _WatchedHTTPSPool,
        }

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = super().build_response(req, resp)
        if response.is_redirect and req.method != "POST":  # followed: its body is not wanted
            response.raw.close()  # closes the connection: unread bytes are never pooled
            _keep_body(response, b"")
        return response


def validate(config: object) -> tuple[bool, str]:
    """``(True, "")`` when the server would accept ``config``, else ``(False, reason)``.

    Same rules as the server (``protocol.validate_config``), so a bad config is reported
    without a round trip.
    """
    return validate_config(config)


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


def _setting(key: str) -> Callable[[Mapping[str, Any]], Any]:
    """Reads a per-container setting as the server wrote it (a copy when it is an object)."""

    def read(specs: Mapping[str, Any]) -> Any:
        value = container_setting(specs, key)
        return copy.deepcopy(dict(value)) if isinstance(value, Mapping) else None

    return read


class _Fact(_Category[_T]):
    """An attribute taken from the typed :meth:`Sandbox.specs` (read once per answer)."""

    endpoint = SPECIFICATIONS

    def __init__(self, read: Callable[[Specs], _T], doc: str) -> None:
        super().__init__(doc)
        self._read = read

    def _value(self, instance: Sandbox) -> _T:
        return self._read(instance.specs())


class _Installed(_Category[_T]):
    """An attribute taken from the typed :meth:`Sandbox.inventory` (read once per answer;
    ``libraries/`` is slow: it starts a container, ~1 s)."""

    endpoint = LIBRARIES

    def __init__(self, read: Callable[[Inventory], _T], doc: str) -> None:
        super().__init__(doc)
        self._read = read

    def _value(self, instance: Sandbox) -> _T:
        return self._read(instance.inventory())


def _tool(name: str, doc: str) -> _Installed[str | None]:
    return _Installed(lambda inventory: inventory.tools.get(name), doc)


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
        libraries = answer.get("libraries")
        super().__init__(libraries if isinstance(libraries, Mapping) else {})
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

    ``timeout`` (seconds) is the deadline of every request, answer included: connecting,
    sending, the headers and the whole body (a server trickling its answer cannot hold a
    request longer). ``token``, when given, is sent as ``Authorization: Bearer <token>`` (the
    reference server has none, a proxy may want one); ``requests`` drops it on a redirect to
    another host. ``busy_budget`` and ``on_busy`` rule how ``execute`` waits for a free
    container (see there). ``max_json`` caps every JSON answer (``execute/``,
    ``specifications/``, ``libraries/``, ``usages/``) and ``max_download`` a ``download`` given
    no ``max_bytes``, so that a hostile server cannot fill the memory: past a cap the answer is
    cut and :class:`SandboxAnswerTooLarge` raised. ``advise``, given an answer of 300 or
    more, may return the advice its error gives instead of the status's own (the kernel names
    the Hub's settings when a sandbox refuses the user's JupyterHub token). One HTTP session
    is kept, so connections are reused: ``close()`` it, or use ``with Sandbox(url) as s:``.
    """

    sandbox_version = _Fact(lambda specs: specs.sandbox_version, "Version of the sandbox server.")
    docker_version = _Fact(lambda specs: specs.docker_version, "Version of Docker on the server.")
    memory = _Specification(
        _setting("memory"),
        "Memory limits of one container (bytes, -1 for none, on 3.x; '100m'-style on 2.x).",
    )
    cpu = _Specification(_setting("cpu"), "CPU limits of one container.")
    environ = _Specification(
        _setting("environ"),
        "Environment variables of the containers (2.x only, unless a 3.x server adds it).",
    )
    execute_timeout = _Fact(
        lambda specs: specs.execute_timeout,
        "Seconds an execute/ may run (2.x, or our embedded server).",
    )
    expiration = _Fact(
        lambda specs: specs.expiration,
        "Seconds a saved environment is kept (2.x, or our embedded server).",
    )
    isolation = _Specification(
        _setting("isolation"),
        "How our embedded server isolates commands (``container.isolation``); None elsewhere.",
    )

    python3 = _tool("python3", "Version of python3.")
    python2 = _tool("python2", "Version of python2.")
    java = _tool("java", "Version of Java.")
    gcc = _tool("gcc", "Version of gcc.")
    gpp = _tool("g++", "Version of g++.")
    perl = _tool("perl", "Version of perl.")
    postgres = _tool("postgres", "Version of PostgreSQL.")
    libraries = _LibrariesAttribute(LibrariesDict.__doc__ or "")
    bin = _Installed(
        lambda inventory: inventory.raw_executables,
        "Every executable on the containers' PATH (a list on 3.x).",
    )

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        *,
        busy_budget: float = DEFAULT_BUSY_BUDGET,
        on_busy: OnBusy | None = None,
        max_json: int = DEFAULT_MAX_JSON,
        max_download: int = DEFAULT_MAX_DOWNLOAD,
        timeout_setting: str = DEFAULT_TIMEOUT_SETTING,
        advise: Advise | None = None,
    ) -> None:
        check_options(timeout, token, max_json, max_download)
        self.url = normalise_url(url)
        #: Advice for the errors of answers it knows better about (see the class).
        self.advise = advise
        self.timeout = timeout
        #: How the user changes ``timeout``, named in the error of a request past it.
        self.timeout_setting = timeout_setting
        self.busy_budget = busy_budget
        self.on_busy = on_busy
        self.max_json = max_json
        self.max_download = max_download
        self._has_token = token is not None
        self._cache: dict[str, dict[str, Any]] = {}
        #: Typed facts of the cached answers, by endpoint: (the answer read, its facts).
        self._typed: dict[str, tuple[dict[str, Any], Any]] = {}
        self._http = _http_session(token)

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
        self._http.close()

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
        return self.specs().generation

    def usages(self) -> dict[str, Any]:
        """The answer of ``usages/`` (3.x only; ~2 s on the reference server, which samples).

        Checked like every answer read: a field of the wrong type (``"cpu": {"usage": "lots"}``)
        raises :class:`SandboxProtocolError` naming it, so the caller can use what it reads.
        """
        return self._get_json(USAGES)

    # --- Typed facts ---

    def specs(self, *, refresh: bool = False) -> Specs:
        """What the server tells of itself, the same for every generation (``None``: it does
        not tell). Fetched once and kept; ``refresh=True`` asks again."""
        if refresh:
            self._forget(SPECIFICATIONS)
        specs: Specs = self._typed_facts(SPECIFICATIONS, read_specs)
        return specs

    def load(self) -> Load:
        """The load now: busy/total containers, and the host's CPU and memory when told.

        Asked anew on every call: ``usages/`` on servers that tell the load there (3.x, ~2 s
        on the public server), else ``specifications/`` (2.x), whose answer is kept as well.
        """
        return self.load_sample().load

    def load_sample(self) -> LoadSample:
        """:meth:`load`, with the load of each worker when the server is a cluster front
        (``workers`` in its ``usages/``; None elsewhere), from the same one request."""
        fresh = SPECIFICATIONS not in self._cache
        specs = self._category(SPECIFICATIONS)
        if needs_usages(specs):
            usages = self.usages()
            return LoadSample(read_load(specs, usages), read_workers(usages, self.url))
        if not fresh:
            specs = self._cache[SPECIFICATIONS] = self._get_json(SPECIFICATIONS)
        return LoadSample(read_load(specs, None))

    def inventory(self, *, refresh: bool = False) -> Inventory:
        """What the sandbox has installed (``libraries/``: slow, it starts a container). Fetched
        once and kept; ``refresh=True`` asks again."""
        if refresh:
            self._forget(LIBRARIES)
        inventory: Inventory = self._typed_facts(LIBRARIES, read_inventory)
        return inventory

    @property
    def containers(self) -> dict[str, Any] | None:
        """``{"total", "running", "available"}`` containers, asked anew on every access
        (:meth:`load`)."""
        load = self.load()
        told = container_setting(self._cache[SPECIFICATIONS], "containers")
        if isinstance(told, Mapping) and not needs_usages(self._cache[SPECIFICATIONS]):
            return dict(told)  # 2.x tells all three itself
        if load.total is None and load.busy is None:
            return None
        known = load.total is not None and load.busy is not None
        available = max(load.total - load.busy, 0) if known else None  # type: ignore[operator]
        return {"total": load.total, "running": load.busy, "available": available}

    @containers.deleter
    def containers(self) -> None:
        self._forget(SPECIFICATIONS)

    def usage(self) -> float:
        """The load of the sandbox in [0, 1]: busy containers / containers (0.0 if unknown).

        Near 1, an ``execute`` is likely to wait for a free container.
        """
        return self.load().fraction or 0.0

    # --- Environments and files ---

    def download(
        self, uuid: str, path: str | None = None, *, max_bytes: int | None = None
    ) -> io.BytesIO:
        """A saved environment (a ``.tgz``), or one file of it when ``path`` is given.

        ``max_bytes``: the most the caller accepts, normally the size ``check()`` announced
        (default: the client's ``max_download``). The body is read as a stream and never
        beyond ``max_bytes`` + 1 bytes: an answer that announces or sends more, or sends more
        than its own ``Content-Length``, raises :class:`SandboxAnswerTooLarge` and nothing of
        it is kept. Raises ``Sandbox404`` when the environment or the file does not exist (or
        expired).
        """
        if max_bytes is not None:
            check_size("max_bytes", max_bytes)
        response = self._send(
            "GET", resource(uuid, path), cap=download_cap(self.max_download, max_bytes)
        )
        raise_for_status(response)
        return io.BytesIO(response.content)

    def check(self, uuid: str, path: str | None = None) -> int:
        """Size in bytes of a saved environment (or of one file of it), 0 when it does not
        exist. Only headers travel (HEAD).
        """
        if not is_uuid(uuid):
            return 0  # the server answers 404 to anything but a uuid (contract)
        # The reference server's development HEAD answers carry a body (contract, "observed"):
        # _send closes a HEAD answer unread, which closes its connection instead of pooling
        # it, so that those stray bytes are not read as the next answer.
        response = self._send("HEAD", resource(uuid, path))
        return announced_size(response, self.url)

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
        call then raises :class:`SandboxCancelled`. A ``cancel_scope`` around the call does the
        same.

        ``environ``: a ``.tgz`` to fill the working directory with (a binary file or bytes).
        An invalid config raises :class:`SandboxConfigError` and sends nothing. While the server
        answers 503 (no free container; nothing ran), the request is sent again after a growing,
        jittered wait, for at most ``busy_budget`` seconds (default: the client's), each wait
        reported to ``on_busy``. Nothing else is ever sent twice: the commands may have run.

        The deadline of each attempt (sending, waiting, reading the answer) is the client's
        ``timeout``, or the server's ``execute_timeout`` plus 10 s when the specifications were
        already fetched and that is longer. The answer is capped by ``max_json``.
        """
        form = _requests_form(execute_form(config, _read_archive(environ)))
        budget = self.busy_budget if busy_budget is None else busy_budget
        try:
            response = self._post_until_free(form, budget, on_busy or self.on_busy, cancel)
        except SandboxCancelled:
            raise
        except SandboxError as error:
            if _any_cancelled(_cancellations(cancel)):
                raise SandboxCancelled(_CANCELLED) from error
            raise
        return execute_answer(response, self.url)

    def _post_until_free(
        self,
        form: dict[str, Any],
        budget: float,
        on_busy: OnBusy | None,
        cancel: Cancellation | None,
    ) -> requests.Response:
        """POST ``execute/`` again while it is answered 503, within ``budget`` seconds."""
        cancellations = _cancellations(cancel)
        start = time.monotonic()
        attempt = 0
        while True:
            if _any_cancelled(cancellations):
                raise SandboxCancelled(_CANCELLED)
            attempt += 1
            response = self._send(
                "POST",
                EXECUTE,
                files=form,
                timeout=self._execute_read_timeout(),
                cancel=cancel,
                cap=self._json_cap,
            )
            if response.status_code != 503:
                return response
            elapsed = time.monotonic() - start
            wait = min(busy_wait(attempt), budget - elapsed)
            if wait <= 0:
                raise Sandbox503(response, busy_advice(response, elapsed, attempt))
            if on_busy is not None:
                on_busy(attempt, wait, elapsed)
            if _wait_cancelled(cancellations, wait):
                raise SandboxCancelled(_CANCELLED)

    def _raise_advised(self, response: requests.Response) -> None:
        """The error of an answer that ``advise`` knows better about (a 401 or 403, say),
        with its advice; nothing for any other answer, which its caller reads as usual."""
        if self.advise is None or response.status_code < 300:
            return
        advice = self.advise(response)
        if advice is not None:
            raise error_for_status(response.status_code)(response, advice)

    def _execute_read_timeout(self) -> float:
        """The deadline of one ``execute/``: also the queue's wait of a cluster front, when
        the specifications already fetched say the server is one (no request for it)."""
        if SPECIFICATIONS not in self._cache:
            return execute_deadline(self.timeout, None)
        specs = self.specs()
        queued = EXTENSION_QUEUE in specs.extensions
        return execute_deadline(self.timeout, specs.execute_timeout, queued=queued)

    # --- Transport ---

    def _category(self, endpoint: str) -> dict[str, Any]:
        """The cached answer of ``endpoint``, fetched on first use."""
        cached = self._cache.get(endpoint)
        if cached is None:
            cached = self._cache[endpoint] = self._get_json(endpoint)
        return cached

    def _typed_facts(self, endpoint: str, read: Callable[[dict[str, Any]], Any]) -> Any:
        """``read`` of the cached answer of ``endpoint``, computed once per answer."""
        answer = self._category(endpoint)
        known = self._typed.get(endpoint)
        if known is None or known[0] is not answer:
            known = self._typed[endpoint] = (answer, read(answer))
        return known[1]

    def _forget(self, endpoint: str) -> None:
        self._cache.pop(endpoint, None)
        self._typed.pop(endpoint, None)

    @property
    def _json_cap(self) -> Cap:
        return json_cap(self.max_json)

    def _get_json(self, endpoint: str) -> dict[str, Any]:
        """The answer of ``endpoint``, checked: fields of the wrong type raise here, naming
        the field, rather than as a ``TypeError`` in whatever displays them."""
        response = self._send("GET", endpoint, cap=self._json_cap)
        return facts_answer(endpoint, response, self.url)

    def _send(
        self,
        method: str,
        path: str,
        *,
        timeout: float | None = None,
        cancel: Cancellation | None = None,
        cap: Cap | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One exchange, answer included; any failure becomes a :class:`SandboxError`.

        ``timeout`` (default: the client's) is a deadline for all of it: connecting, sending,
        the headers and the body, which is read here, capped by ``cap`` (a 2xx answer) and
        kept in the response. A HEAD answer is closed unread. The cancellations of the
        ``cancel_scope`` blocks, and ``cancel``, end it at any point. Redirects are followed
        except for POST (``requests`` would turn it into a GET).
        """
        url = self.url + path
        limit = self.timeout if timeout is None else timeout
        exchange = _Exchange(time.monotonic() + limit, _cancellations(cancel))
        token = _CURRENT_EXCHANGE.set(exchange)
        try:
            if exchange.cancelled:
                raise SandboxCancelled(_cancelled_message(method, url))
            _WATCHDOG.watch(exchange)
            response = self._http.request(
                method, url, timeout=limit, allow_redirects=method != "POST", stream=True, **kwargs
            )
            _take_body(response, method, cap or self._json_cap, exchange, self.url)
            if exchange.cancelled or exchange.expired:  # an EOF it caused can look like an end
                raise _ended(exchange, method, url, limit, self.timeout_setting)
            self._raise_advised(response)
            return response
        except SandboxError:
            raise
        # ValueError: an SSL socket shut down under a read says "Read on closed ... socket".
        except (
            requests.RequestException,
            HTTPError,
            http.client.HTTPException,
            OSError,
            ValueError,
        ) as exc:
            if exchange.cancelled or exchange.expired:
                raise _ended(exchange, method, url, limit, self.timeout_setting) from exc
            raise _translate(exc, method, url, limit, self.timeout_setting) from exc
        finally:
            exchange.finish()
            _CURRENT_EXCHANGE.reset(token)


# --- Reading answers within caps ------------------------------------------------------------


def _take_body(
    response: requests.Response, method: str, cap: Cap, exchange: _Exchange, base: str
) -> None:
    """Reads the body of ``response`` into it (``response.content``): a 2xx one within
    ``cap``, an error's first 64 KiB (for its message). A HEAD answer is closed unread."""
    try:
        if method == "HEAD":
            response.close()
        elif response.status_code >= 300:
            data, whole = _read_up_to(response.raw, ERROR_BODY_CAP)
            if not whole:
                _drop(response)
            _keep_body(response, data)
        else:
            _keep_body(response, _read_answer(response, method, cap, exchange, base))
    except BaseException:
        _drop(response)
        raise


def _read_answer(
    response: requests.Response, method: str, cap: Cap, exchange: _Exchange, base: str
) -> bytes:
    """The body of a 2xx answer, never reading more than ``cap.limit`` + 1 bytes of it."""
    where = f"{method} {response.url}"
    check_identity(response.headers.get("Content-Encoding", "").strip().lower(), where, base)
    announced = _content_length(response)
    if announced is not None and announced > cap.limit:
        raise announced_too_large(where, announced, cap, base)
    data, whole = _read_up_to(response.raw, cap.limit)
    if not whole:
        raise sent_too_much(where, cap, base)
    if announced is not None and _bytes_waiting(exchange.last_socket()):
        raise sent_past_length(where, announced, base)
    return data


def _read_up_to(raw: Any, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` + 1 bytes of the raw (undecoded) body; whether it ended within
    ``limit``. The bytes beyond the first ``limit`` are dropped."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = raw.read(min(_CHUNK, limit + 1 - size), decode_content=False)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit], False


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if re.fullmatch(r"[0-9]{1,30}", value) else None


def _bytes_waiting(sock: socket.socket | None) -> bool:
    """Whether more bytes already wait on the connection after a whole answer (a server
    sending past its Content-Length). Plain sockets only: TLS records cannot be peeked."""
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return False
    try:
        return wait_for_read(sock, timeout=0.0) and bool(sock.recv(1, socket.MSG_PEEK))
    except (OSError, ValueError):  # closed meanwhile: nothing waits
        return False


def _keep_body(response: requests.Response, data: bytes) -> None:
    """Makes ``data`` the response's ``content`` (``requests`` then reads nothing more)."""
    response._content = data
    response._content_consumed = True  # type: ignore[attr-defined]


def _drop(response: requests.Response) -> None:
    """Closes the connection of an answer not read to its end: its unread bytes must never be
    taken for the next answer on a pooled connection."""
    with contextlib.suppress(Exception):
        response.raw.close()
    with contextlib.suppress(Exception):
        response.close()


def _any_cancelled(cancellations: tuple[Cancellation, ...]) -> bool:
    return any(cancellation.cancelled for cancellation in cancellations)


def _wait_cancelled(cancellations: tuple[Cancellation, ...], seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as one of ``cancellations`` is cancelled."""
    if len(cancellations) == 1:
        return cancellations[0].wait(seconds)
    end = time.monotonic() + seconds
    while not _any_cancelled(cancellations):
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.05))
    return True


def _ended(
    exchange: _Exchange, method: str, url: str, timeout: float, setting: str
) -> SandboxError:
    """The error of an exchange its cancellation or its deadline ended."""
    if exchange.cancelled:
        return SandboxCancelled(_cancelled_message(method, url))
    return SandboxTimeout(timeout_message(method, url, timeout, setting))


def _cancelled_message(method: str, url: str) -> str:
    if method == "POST":
        return _CANCELLED
    return (
        f"{method} {url} was cancelled (interrupted) and its connection closed; nothing of its "
        "answer was kept. Run it again if it is still needed."
    )


# --- Helpers of the transport ---------------------------------------------------------------


def _http_session(token: str | None) -> requests.Session:
    """One session per client: pooled connections, the token on every request, and quick
    retries of GET and HEAD when a connection cannot be opened.

    urllib3 retries a connection that could not be opened for any method (nothing was sent, so
    even a POST is safe); read errors are never retried (``read=False``), so a request that
    reached the server is never replayed.
    """
    retry = Retry(
        total=CONNECT_RETRIES,
        connect=CONNECT_RETRIES,
        read=False,
        status=0,
        other=0,
        backoff_factor=CONNECT_BACKOFF,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    adapter = _Adapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Compressed answers are refused: a small body could expand past any cap.
    session.headers["Accept-Encoding"] = "identity"
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _requests_form(parts: list[Part]) -> dict[str, Any]:
    """The form built by :func:`execute_form`, as ``requests`` takes it."""
    return {
        part.name: (part.filename, part.value, part.content_type)
        if part.filename
        else (None, part.value)
        for part in parts
    }


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


def _translate(
    exc: BaseException, method: str, url: str, timeout: float, setting: str
) -> SandboxError:
    """The :class:`SandboxError` telling what went wrong with ``method url`` and what to do.

    ``exc`` comes from ``requests``, or from urllib3 or the socket while the body was read.
    """
    cause = _root_cause(exc)
    if isinstance(
        exc,
        requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema,
    ):
        return SandboxConfigError(invalid_url_message(method, url, cause))
    if isinstance(exc, requests.exceptions.InvalidHeader):  # its text would show the token
        return SandboxConfigError(
            f"Cannot send {method} {url}: a header value is not valid HTTP. Check the token."
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return SandboxConnectionError(connect_timeout_message(url, timeout, cause))
    # A timeout while reading the body reaches us as a ConnectionError wrapping urllib3's.
    if isinstance(exc, requests.exceptions.Timeout) or _in_chain(exc, ReadTimeoutError):
        return SandboxTimeout(timeout_message(method, url, timeout, setting))
    if isinstance(
        exc,
        requests.exceptions.ChunkedEncodingError
        | requests.exceptions.ContentDecodingError
        | ProtocolError  # raised by urllib3 only while the body is read
        | http.client.HTTPException,
    ):
        return SandboxProtocolError(garbled_message(method, url, cause))
    if isinstance(exc, requests.exceptions.ConnectionError | HTTPError | OSError):
        return SandboxConnectionError(
            connection_message(method, url, cause, never_sent=_never_sent(exc))
        )
    return SandboxError(failed_message(method, url, cause))


_CANCELLED: Final = (
    "The execution was cancelled and its connection closed. A server that watches for "
    "disconnects (the embedded one) killed the command; a public sandbox server may run it "
    "until its own timeout."
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
