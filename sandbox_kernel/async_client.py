"""The sandbox protocol over asyncio (aiohttp): the transport of the kernel's event loop.

:class:`AsyncSandbox` is :class:`sandbox_kernel.client.Sandbox` with another transport: it
builds its requests and reads its answers with :mod:`sandbox_kernel._wire`, raises the
exceptions of :mod:`sandbox_kernel._errors` with the same words for the same situation, and
types ``specifications/`` with :mod:`sandbox_kernel._generations`. What differs is only how
bytes travel: one ``aiohttp.ClientSession`` per client (its own connector, kept-alive
connections, no DNS look-up for an IP address), so a cell costs the kernel one exchange on a
warm connection and never blocks its event loop.

Cancellation is asyncio's: cancelling the task that awaits :meth:`AsyncSandbox.execute` (or
iterates a :class:`LiveRun`) closes the connection, which makes the embedded server kill the
run; the ``CancelledError`` propagates unchanged, as asyncio requires, so the sync client's
:class:`~sandbox_kernel._errors.SandboxCancelled` (a reply to its own ``Cancellation``) is never
raised here.

Servers that advertise the ``stream`` extension (``docs/protocol-extensions.md``) also take a
WebSocket at ``execute/stream/``: :meth:`AsyncSandbox.open_stream` runs a config there and gives
its output as it is written, asks for stdin when the run waits for it, and ends with the same
checked answer as ``execute/``. Every frame the server sends is checked before use (by
:func:`sandbox_kernel._wire.read_frame`, whose events this module re-exports for the kernel).
A cluster front also names the ``queue`` extension: its streams are then opened with
``?events=queue``, and its ``{"queue": N}`` frames (runs ahead of this one, before it starts)
go to the ``on_queue`` callback; the client never asks a server that does not name it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import urllib.request
from collections.abc import Callable, Mapping
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ._errors import (
    Answer,
    Sandbox503,
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxProtocolError,
    SandboxStreamRefused,
    SandboxTimeout,
)
from ._generations import Specs, read_specs
from ._wire import (
    CONNECT_BACKOFF,
    CONNECT_RETRIES,
    DEFAULT_BUSY_BUDGET,
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_JSON,
    DEFAULT_TIMEOUT,
    DEFAULT_TIMEOUT_SETTING,
    ERROR_BODY_CAP,
    STREAM_METHOD,
    Cap,
    ErrorFrame,
    Event,
    OnBusy,
    Part,
    Queued,
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
    frame_error,
    frame_too_large,
    garbled_message,
    http_error,
    invalid_url_message,
    json_cap,
    normalise_url,
    raise_for_status,
    read_frame,
    resource,
    sent_too_much,
    stream_url,
    timeout_message,
)

# The events of a streamed run, for the kernel: ``from ..async_client import Output``.
from ._wire import Output as Output
from ._wire import StdinWanted as StdinWanted
from .protocol import EXECUTE, EXTENSION_QUEUE, SPECIFICATIONS, is_uuid

__all__ = [
    "AioAnswer",
    "AsyncSandbox",
    "Event",
    "LiveRun",
    "OnQueue",
    "Output",
    "StdinWanted",
]

#: ``on_queue(ahead)``: a cluster front holds the streamed run in its queue, ``ahead`` runs
#: before it (each time that changes, until the run starts).
OnQueue = Callable[[int], object]

#: Bytes read from a body at a time.
_CHUNK: Final = 256 * 1024
#: Seconds to wait for the server's reply to our close frame before dropping the socket.
_WS_CLOSE_WAIT: Final = 1.0


# --- Answers of aiohttp, as _wire reads them ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Request:
    """What :class:`_errors.Answer` calls ``request``: only its method is read."""

    method: str


class AioAnswer:
    """An aiohttp answer whose body was read (within a cap), with the attributes of
    :class:`sandbox_kernel._errors.Answer` that ``_wire`` and the errors read."""

    __slots__ = ("_encoding", "content", "headers", "reason", "request", "status_code", "url")

    def __init__(
        self,
        status: int,
        reason: str | None,
        url: str,
        content: bytes,
        headers: Mapping[str, str],
        method: str,
        encoding: str | None = None,
    ) -> None:
        self.status_code = status
        self.reason = reason
        self.url = url
        self.content = content
        self.headers = headers
        self.request = _Request(method)
        self._encoding = encoding

    @property
    def encoding(self) -> str | None:
        return self._encoding

    @property
    def text(self) -> str:
        try:
            return self.content.decode(self._encoding or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")

    @classmethod
    def of(cls, response: aiohttp.ClientResponse, method: str, content: bytes) -> AioAnswer:
        return cls(
            response.status,
            response.reason,
            str(response.url),
            content,
            response.headers,
            method,
            response.charset,
        )


def _status_answer(status: int, url: str, method: str, text: str = "") -> AioAnswer:
    """The answer of a refused stream (an upgrade refused, an ``error`` frame)."""
    try:
        reason: str | None = HTTPStatus(status).phrase
    except ValueError:
        reason = None
    return AioAnswer(status, reason, url, text.encode(), CIMultiDictProxy(CIMultiDict()), method)


# --- The client ----------------------------------------------------------------------------


class AsyncSandbox:
    """A sandbox server at ``url``, for asyncio code (the kernel's event loop).

    The same arguments, defaults, checks and errors as :class:`sandbox_kernel.client.Sandbox`:
    ``timeout`` is the deadline of a whole exchange (body included; ``execute/`` gets the
    server's ``execute_timeout`` + 10 s once the specifications are known), ``token`` travels
    as ``Authorization: Bearer``, ``busy_budget`` bounds the retries of a busy ``execute/``,
    ``max_json`` and ``max_download`` cap what is read. The HTTP session is made on first use
    in the running loop and bound to it; ``await close()`` it, or use ``async with``.
    """

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        *,
        busy_budget: float = DEFAULT_BUSY_BUDGET,
        max_json: int = DEFAULT_MAX_JSON,
        max_download: int = DEFAULT_MAX_DOWNLOAD,
        timeout_setting: str = DEFAULT_TIMEOUT_SETTING,
    ) -> None:
        check_options(timeout, token, max_json, max_download)
        self.url = normalise_url(url)
        self.timeout = timeout
        self.timeout_setting = timeout_setting
        self.busy_budget = busy_budget
        self.max_json = max_json
        self.max_download = max_download
        self._headers = {"Accept-Encoding": "identity"}  # a compressed body could pass any cap
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._proxy = _environment_proxy(self.url)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._specifications: dict[str, Any] | None = None
        self._specs: Specs | None = None

    def __repr__(self) -> str:
        token = ", token='***'" if "Authorization" in self._headers else ""
        return f"{type(self).__name__}({self.url!r}, timeout={self.timeout!r}{token})"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the kept-alive connections (and the session: a later request opens anew)."""
        session, self._session, self._loop = self._session, None, None
        if session is not None:
            await session.close()

    # --- Facts ---

    async def specs(self, refresh: bool = False) -> Specs:
        """What the server tells of itself (typed as the sync client's ``specs()``). Fetched
        once and kept, since ``execute`` reads its ``execute_timeout``; ``refresh`` asks again."""
        if refresh or self._specs is None:
            answer = await self._send("GET", SPECIFICATIONS, cap=self._json_cap)
            specifications = facts_answer(SPECIFICATIONS, answer, self.url)
            self._specs = read_specs(specifications)
            self._specifications = specifications
        return self._specs

    async def extensions(self) -> frozenset[str]:
        """The protocol extensions the server offers (``{"stream", "stdin", "causes"}`` for the
        embedded one); empty for a server that names none, never an error for it."""
        return (await self.specs()).extensions

    # --- Environments and files ---

    async def check(self, uuid: str, path: str | None = None) -> int:
        """Size in bytes of a saved environment or of one of its files, 0 when it does not
        exist (HEAD: only headers travel)."""
        if not is_uuid(uuid):
            return 0  # the server answers 404 to anything but a uuid (contract)
        return announced_size(await self._send("HEAD", resource(uuid, path)), self.url)

    async def download(
        self, uuid: str, path: str | None = None, *, max_bytes: int | None = None
    ) -> bytes:
        """A saved environment (``.tgz``) or one file of it, never read beyond ``max_bytes``
        (default ``max_download``) + 1 bytes: more raises :class:`SandboxAnswerTooLarge`."""
        if max_bytes is not None:
            check_size("max_bytes", max_bytes)
        cap = download_cap(self.max_download, max_bytes)
        answer = await self._send("GET", resource(uuid, path), cap=cap)
        raise_for_status(answer)
        return answer.content

    # --- Execution ---

    async def execute(
        self,
        config: Mapping[str, Any],
        archive: bytes | None = None,
        *,
        busy_budget: float | None = None,
        on_busy: OnBusy | None = None,
    ) -> dict[str, Any]:
        """Run ``config`` and return the server's checked answer, as ``Sandbox.execute``.

        An invalid config raises :class:`SandboxConfigError` and sends nothing. A 503 (no free
        container; nothing ran) is retried after a growing, jittered wait, reported to
        ``on_busy(attempt, wait, elapsed)``, within ``busy_budget`` seconds; nothing else is
        sent twice. Cancel the awaiting task to abandon the run: its connection is closed,
        and the embedded server kills the commands.
        """
        body, content_type = multipart(execute_form(config, archive))
        budget = self.busy_budget if busy_budget is None else busy_budget
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            answer = await self._send(
                "POST",
                EXECUTE,
                data=body,
                headers={"Content-Type": content_type},
                timeout=self._execute_deadline(),
                cap=self._json_cap,
            )
            if answer.status_code != 503:
                return execute_answer(answer, self.url)
            await _wait_busy(answer, attempt, start, budget, on_busy)

    def open_stream(
        self,
        config: Mapping[str, Any],
        archive: bytes | None = None,
        *,
        busy_budget: float | None = None,
        on_busy: OnBusy | None = None,
        on_queue: OnQueue | None = None,
    ) -> LiveRun:
        """A streamed run of ``config`` (servers whose ``extensions()`` has ``"stream"``):
        ``async with sandbox.open_stream(config) as run: async for event in run: ...``, then
        ``run.answer``. The config is checked here: an invalid one sends nothing.

        ``on_queue(ahead)``: called while a cluster front (``"queue"`` in ``extensions()``,
        already fetched: no request is added for it) holds the run in its queue."""
        parts = execute_form(config, archive)
        upload = parts[1].value if len(parts) > 1 else b""
        assert isinstance(parts[0].value, str) and isinstance(upload, bytes)
        budget = self.busy_budget if busy_budget is None else busy_budget
        return LiveRun(self, parts[0].value, upload, budget, on_busy, on_queue)

    # --- Transport ---

    @property
    def _json_cap(self) -> Cap:
        return json_cap(self.max_json)

    @property
    def _queues(self) -> bool:
        """Whether the server is known (from the specifications already fetched) to hold runs
        in a queue: a cluster front, naming the ``queue`` extension."""
        return self._specs is not None and EXTENSION_QUEUE in self._specs.extensions

    def _execute_deadline(self) -> float:
        known = self._specs.execute_timeout if self._specs is not None else None
        return execute_deadline(self.timeout, known, queued=self._queues)

    def _http(self) -> aiohttp.ClientSession:
        """The session of the running loop, made on first use (aiohttp binds it to a loop)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=16, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
            self._loop = loop
        elif self._loop is not loop:
            raise SandboxConfigError(
                f"{self!r} is used from another event loop than the one it first ran in; "
                "make one AsyncSandbox per loop (or close() it before changing loops)."
            )
        return self._session

    async def _send(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cap: Cap | None = None,
    ) -> AioAnswer:
        """One exchange, its body read (a 2xx within ``cap``, an error's first 64 KiB, a
        HEAD's not at all); any failure becomes the :class:`SandboxError` the sync client
        raises for it. A connection that cannot be opened is tried again, as the sync client
        does (nothing was sent)."""
        url = self.url + path
        limit = self.timeout if timeout is None else timeout
        session = self._http()
        retries = 0
        while True:
            try:
                return await self._exchange(session, method, url, data, headers, limit, cap)
            except aiohttp.ClientConnectorError as exc:
                if retries >= CONNECT_RETRIES or isinstance(exc, aiohttp.ClientSSLError):
                    raise _translate(exc, method, url, limit, self.timeout_setting) from exc
                await asyncio.sleep(0 if retries == 0 else CONNECT_BACKOFF * 2**retries)
                retries += 1
            except SandboxError:
                raise
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                raise _translate(exc, method, url, limit, self.timeout_setting) from exc

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        data: bytes | None,
        headers: Mapping[str, str] | None,
        limit: float,
        cap: Cap | None,
    ) -> AioAnswer:
        async with session.request(
            method,
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=limit),
            allow_redirects=method != "POST",
            proxy=self._proxy,
        ) as response:
            try:
                content = await _take_body(response, method, cap or self._json_cap, self.url)
            except BaseException:
                response.close()  # unread bytes must never be taken for the next answer
                raise
            return AioAnswer.of(response, method, content)


async def _wait_busy(
    answer: Answer, attempt: int, start: float, budget: float, on_busy: OnBusy | None
) -> None:
    """Sleep before sending a 503-answered run again, or raise ``Sandbox503`` once the
    budget is spent (the sync client's rule and words)."""
    elapsed = time.monotonic() - start
    wait = min(busy_wait(attempt), budget - elapsed)
    if wait <= 0:
        raise Sandbox503(answer, busy_advice(answer, elapsed, attempt))
    if on_busy is not None:
        on_busy(attempt, wait, elapsed)
    await asyncio.sleep(wait)


# --- Streamed runs ---------------------------------------------------------------------------


#: Statuses the embedded server itself answers an upgrade with (token, Host/Origin, busy):
#: the same errors as for ``execute/``. Any other status comes from something in between.
_ANSWERED_BY_THE_SERVER = frozenset({401, 403, 503})


class LiveRun:
    """One run on ``execute/stream/``: an async context manager and an async iterator of
    :class:`Output` and :class:`StdinWanted` events, then :attr:`answer`.

    Entering it connects and sends the config and the archive; leaving it before the final
    object closes the socket, which kills the run on the server (nothing is saved). A 503
    (no free container; nothing ran) is retried while no event has come, as ``execute/``;
    nothing else is sent twice (a cluster's 502, "lost; it may have run", above all).
    The deadline is the one of ``execute/``, not counting the time the run waits for stdin
    (a user typing). On a cluster front, the stream asks for queue events: each
    ``{"queue": N}`` goes to ``on_queue`` (not yielded) and moves the deadline to a whole
    budget from then, since the run has not started.
    """

    def __init__(
        self,
        sandbox: AsyncSandbox,
        config: str,
        archive: bytes,
        budget: float,
        on_busy: OnBusy | None,
        on_queue: OnQueue | None = None,
    ) -> None:
        self._sandbox = sandbox
        self._config = config
        self._archive = archive
        self._budget = budget
        self._on_busy = on_busy
        self._on_queue = on_queue
        #: Asked of cluster fronts only (known from the specifications already fetched): a
        #: server without the extension never sees the query.
        self._queue_events = sandbox._queues
        self.url = stream_url(sandbox.url, queue_events=self._queue_events)
        self._socket: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._answer: dict[str, Any] | None = None
        self._events = 0
        self._attempt = 0
        self._start = 0.0
        self._limit = 0.0
        self._deadline = 0.0
        #: When the last StdinWanted came and no stdin or eof was sent since: the deadline
        #: stands still meanwhile.
        self._waiting_since: float | None = None

    @property
    def answer(self) -> dict[str, Any]:
        """The final object, checked as ``execute/``'s answer (once iteration has ended)."""
        if self._answer is None:
            raise SandboxError(
                "The streamed run has not ended: iterate over it to its end (async for) "
                "before reading its answer."
            )
        return self._answer

    async def __aenter__(self) -> LiveRun:
        self._start = time.monotonic()
        await self._connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close()

    def __aiter__(self) -> LiveRun:
        return self

    async def __anext__(self) -> Event:
        while self._answer is None:
            frame = await self._next_frame()
            if isinstance(frame, Output | StdinWanted):
                self._events += 1
                if isinstance(frame, StdinWanted):
                    self._waiting_since = time.monotonic()
                return frame
            if isinstance(frame, ErrorFrame):
                await self._refused(frame)
                continue
            if isinstance(frame, Queued):
                self._queued(frame)
                continue
            self._answer = frame
            await self._close()
        raise StopAsyncIteration

    def _queued(self, frame: Queued) -> None:
        """The run waits in a cluster's queue: it has not started, so its whole budget is
        still ahead (the front ends the wait itself, with 503, after its --queue-wait). A
        position told after the run started (a front's late frame) is stale: ignored, so that
        no "ahead of you" shows up among the run's output."""
        if self._events:
            return
        self._deadline = max(self._deadline, time.monotonic() + self._limit)
        if self._on_queue is not None:
            self._on_queue(frame.ahead)

    async def send_stdin(self, text: str) -> bool:
        """Write ``text`` to the run's stdin (add the newline a line needs). False, and
        nothing sent, when the run has ended (a late reply of the user is ignored)."""
        return await self._send({"stdin": text})

    async def send_eof(self) -> bool:
        """Close the run's stdin: a program reading it gets end-of-file."""
        return await self._send({"eof": True})

    async def stop(self) -> bool:
        """Stop the run as Ctrl-C would; its final object still comes (iterate on)."""
        return await self._send({"stop": True})

    async def _send(self, message: dict[str, Any]) -> bool:
        socket = self._socket
        if socket is None or socket.closed or self._answer is not None:
            return False
        if self._waiting_since is not None:  # the run goes on: so does its clock
            self._deadline += time.monotonic() - self._waiting_since
            self._waiting_since = None
        try:
            await socket.send_str(json.dumps(message))
        except (aiohttp.ClientError, OSError):  # the run ended meanwhile
            return False
        return True

    async def _connect(self) -> None:
        """Open the socket and send the config and the archive (a new attempt after a 503)."""
        sandbox = self._sandbox
        self._attempt += 1
        self._limit = sandbox._execute_deadline()
        self._deadline = time.monotonic() + self._limit
        self._waiting_since = None
        try:
            self._socket = socket = await asyncio.wait_for(self._open(), sandbox.timeout)
            await socket.send_str(self._config)
            await socket.send_bytes(self._archive)
        except aiohttp.WSServerHandshakeError as exc:
            await self._close()
            # The config goes only once the socket is open: whatever broke the handshake,
            # nothing ran.
            if exc.status not in _ANSWERED_BY_THE_SERVER:
                raise SandboxStreamRefused(
                    f"The sandbox at {sandbox.url} names the stream extension, but opening "
                    f"{self.url} failed (HTTP {exc.status}: {exc.message}): a proxy in between "
                    "may not pass WebSockets. Nothing ran; plain execute/ works."
                ) from exc
            await self._refused(ErrorFrame(exc.status, ""), method="GET")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            await self._close()
            # Named by the sandbox's own URL (the one the user gave), not the socket's.
            raise _translate(
                exc, "GET", sandbox.url, sandbox.timeout, sandbox.timeout_setting
            ) from exc

    async def _open(self) -> aiohttp.ClientWebSocketResponse[bool]:
        sandbox = self._sandbox
        return await sandbox._http().ws_connect(
            self.url,
            proxy=sandbox._proxy,
            max_msg_size=sandbox.max_json,
            timeout=aiohttp.ClientWSTimeout(ws_close=_WS_CLOSE_WAIT),
            compress=0,  # a deflated frame could expand past any cap
            decode_text=True,
        )

    async def _refused(self, frame: ErrorFrame, method: str = STREAM_METHOD) -> None:
        """An ``error`` frame (or a refused upgrade): 503 before any event is waited out and
        tried again; anything else raises ``Sandbox<STATUS>`` as ``execute/`` would."""
        await self._close()
        answer = _status_answer(frame.status, self.url, method, frame.text)
        if frame.status < 300:  # "upgraded" with 200: not a WebSocket server
            raise SandboxProtocolError(
                f"GET {self.url} answered {frame.status} instead of opening a WebSocket. Check "
                f"that {self._sandbox.url} offers the stream extension (AsyncSandbox.extensions) "
                "and that no proxy in between drops WebSocket upgrades."
            )
        if frame.status != 503 or self._events:
            raise http_error(answer)  # a cluster's 502 with its advice: never sent again
        await _wait_busy(answer, self._attempt, self._start, self._budget, self._on_busy)
        await self._connect()

    async def _next_frame(self) -> Event | Queued | ErrorFrame | dict[str, Any]:
        socket = self._socket
        if socket is None:
            raise SandboxError(
                "This streamed run is not open: enter it once with `async with` and iterate "
                "it there (after an error or a close it cannot go on; open a new one)."
            )
        if self._waiting_since is None:
            remaining: float | None = self._deadline - time.monotonic()
        else:
            remaining = None  # the run waits for the user
        try:
            message = await socket.receive(timeout=remaining)
        except asyncio.TimeoutError as exc:
            await self._close()
            raise SandboxTimeout(
                timeout_message(STREAM_METHOD, self.url, self._limit, self._sandbox.timeout_setting)
            ) from exc
        if message.type == aiohttp.WSMsgType.TEXT:
            try:
                return read_frame(
                    message.data, self.url, self._sandbox.url, queue_events=self._queue_events
                )
            except SandboxError:
                await self._close()
                raise
        await self._close()
        raise self._broken(message.type, message.data)

    def _broken(self, kind: aiohttp.WSMsgType, data: object) -> SandboxError:
        """The error of a frame that is not a text frame: binary, too large, a close."""
        base = self._sandbox.url
        if kind == aiohttp.WSMsgType.BINARY:
            size = len(data) if isinstance(data, bytes) else "?"
            return frame_error(self.url, base, f"a binary frame ({size} bytes)")
        if kind == aiohttp.WSMsgType.ERROR and _too_big(data):
            return frame_too_large(self.url, self._sandbox.max_json, base)
        if kind == aiohttp.WSMsgType.ERROR:
            cause = data
        else:
            cause = f"closed with code {self._socket.close_code if self._socket else None}"
        return SandboxConnectionError(
            f"The stream of {self.url} ended before the run's final answer ({cause}). The "
            "commands may have run, so the run was not sent again: check the server's log, "
            "then retry if needed."
        )

    async def _close(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None and not socket.closed:
            await socket.close()


def _too_big(error: object) -> bool:
    return (
        isinstance(error, aiohttp.WebSocketError)
        and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    )


# --- Helpers of the transport ---------------------------------------------------------------


def multipart(parts: list[Part]) -> tuple[bytes, str]:
    """The body and ``Content-Type`` of a ``multipart/form-data`` form, built in one join
    (aiohttp's ``FormData`` costs more than the rest of a warm ``execute/``)."""
    boundary = os.urandom(16).hex()
    chunks: list[bytes] = []
    for part in parts:
        _check_header_words(part.name, part.filename or "", part.content_type or "")
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{part.name}"'
        if part.filename is not None:
            head += f'; filename="{part.filename}"'
        if part.content_type is not None:
            head += f"\r\nContent-Type: {part.content_type}"
        value = part.value.encode() if isinstance(part.value, str) else part.value
        chunks += [head.encode(), b"\r\n\r\n", value, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _check_header_words(*words: str) -> None:
    if any(char in '"\r\n\\' for word in words for char in word):
        raise SandboxConfigError(f"A form field cannot carry {words!r} in its header.")


async def _take_body(response: aiohttp.ClientResponse, method: str, cap: Cap, base: str) -> bytes:
    """The body of an answer: none for HEAD (its connection is closed, as the reference
    server's development HEAD answers carry a body), an error's first 64 KiB, a 2xx one
    within ``cap``."""
    if method == "HEAD":
        response.close()
        return b""
    if response.status >= 300:
        data, whole = await _read_up_to(response, ERROR_BODY_CAP)
        if not whole:
            response.close()
        return data
    where = f"{method} {response.url}"
    check_identity(response.headers.get("Content-Encoding", "").strip().lower(), where, base)
    announced = response.content_length
    if announced is not None and announced > cap.limit:
        raise announced_too_large(where, announced, cap, base)
    if announced is not None:
        return await response.read()  # the parser never gives more than Content-Length
    data, whole = await _read_up_to(response, cap.limit)
    if not whole:
        raise sent_too_much(where, cap, base)
    return data


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` + 1 bytes of the body; whether it ended within ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await response.content.read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit], False


def _environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP_PROXY``, ``NO_PROXY``...), read
    once: the sync client (``requests``) honours them too, so both reach the server alike."""
    scheme = url.split("://", 1)[0]
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy is None or urllib.request.proxy_bypass(url.split("://", 1)[1].split("/", 1)[0]):
        return None
    return proxy


def _translate(
    exc: BaseException, method: str, url: str, timeout: float, setting: str
) -> SandboxError:
    """The sync client's error for the same failure (see ``client._translate``)."""
    cause = _root_cause(exc)
    if isinstance(exc, aiohttp.InvalidURL):
        return SandboxConfigError(invalid_url_message(method, url, cause))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return SandboxConnectionError(connect_timeout_message(url, timeout, cause))
    if isinstance(exc, asyncio.TimeoutError):
        return SandboxTimeout(timeout_message(method, url, timeout, setting))
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return SandboxProtocolError(garbled_message(method, url, cause))
    if isinstance(exc, aiohttp.ClientError | OSError):
        never_sent = isinstance(exc, aiohttp.ClientConnectorError)
        return SandboxConnectionError(connection_message(method, url, cause, never_sent=never_sent))
    return SandboxError(failed_message(method, url, cause))


def _root_cause(exc: BaseException) -> object:
    """What says what happened: the OS error of a refused connection (``[Errno 111] ...``),
    else the exception itself (its class name when it has no text)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if error.errno:  # asyncio words it "Connect call failed (...)": say it as the OS does
            return f"[Errno {error.errno}] {os.strerror(error.errno)}"
        return error
    inner = exc.__cause__
    if isinstance(inner, OSError) and str(inner):
        return inner
    return exc if str(exc) else type(exc).__name__
