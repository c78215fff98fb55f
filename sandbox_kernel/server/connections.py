"""Connection guards: a deadline for a request's headers, and descriptors no client can take.

aiohttp closes an idle keep-alive connection (``keepalive_timeout``) but gives a client all the
time it wants to send a request's headers: one header byte a second holds a connection, its
descriptor and a task forever (slowloris). Thousands of those, or thousands of connections that
never send anything, use up the process's file descriptors, and then the runners cannot make
pipes and an authenticated request fails. Two guards, built without patching aiohttp:

- :class:`ConnectionGuard` wraps aiohttp's protocol factory (``AppRunner.server``, the object an
  asyncio server calls once per accepted connection). Each connection gets a
  :class:`GuardedConnection` that forwards every transport event to aiohttp's protocol and
  runs a timer: the request line and headers must be complete within ``header_timeout``
  seconds of the connection opening, or of the first byte of the next request on a keep-alive
  connection (idle time between requests is aiohttp's ``keepalive_timeout``). "Complete" is
  seen by :meth:`ConnectionGuard.middleware`, which aiohttp runs once it has parsed the headers.
  While a request is handled or its answer still sits in the send buffer, no timer runs.
- Near the descriptor limit, new connections are refused at once (a short 503, then closed):
  an accepted socket gets the lowest free descriptor number, so a number at or above
  ``limit - reserve`` proves that ``limit - reserve`` descriptors are in use, and the
  ``reserve`` stays for runners, pipes and files. :func:`raise_descriptor_limit` first raises
  the soft limit to the hard one, so the reserve is rarely reached.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Connections asyncio accepts in one go (its ``backlog`` argument), before any is checked.
ACCEPT_BATCH = 16
#: Seconds between two "refusing connections" warnings in the log.
_REFUSAL_LOG_INTERVAL = 10.0
_NR_OPEN = Path("/proc/sys/fs/nr_open")
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard limit; return ``(before, after)``.

    The soft limit is often 1024 while the hard one is far higher: without this, a thousand
    idle connections would leave nothing for the runners. An unlimited hard limit is read as
    the kernel's ``fs.nr_open`` (setting the soft limit beyond it fails).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as error:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, target,
                        error)  # fmt: skip
            return soft, soft
        log.info("file descriptor limit raised from %d to %d", soft, target)
        return soft, target
    return soft, soft


def listen_backlog() -> int:
    """Connections the kernel may queue before the server accepts them: the kernel's
    ``somaxconn`` (at most 4096), so that a burst of connections does not leave a legitimate
    one waiting for SYN retransmissions."""
    try:
        return min(int(_SOMAXCONN.read_text()), 4096)
    except (OSError, ValueError):
        return 1024


def descriptor_reserve(limit: int, workers: int) -> int:
    """Descriptors kept free of connections: what the runners of ``workers`` slots, their
    replacements, uploads and storage need at once, plus the connections asyncio may accept
    in a burst before they are refused, with a margin; never more than half."""
    wanted = max(64 + 32 * workers, limit // 8) + 4 * ACCEPT_BATCH
    return min(wanted, 4096, limit // 2)


class ConnectionGuard:
    """The protocol factory given to ``loop.create_server`` in place of aiohttp's.

    Add :meth:`middleware` to the application, first, before ``AppRunner.setup()`` (so that the
    guard learns when a request's headers are complete); then :meth:`listen` with the runner's
    ``server``.
    """

    def __init__(self, header_timeout: float, workers: int) -> None:
        self.make_protocol: Callable[[], asyncio.Protocol] | None = None
        self.header_timeout = header_timeout
        self.workers = workers
        self.connections: dict[asyncio.BaseTransport, GuardedConnection] = {}
        self.refused = 0
        self.timed_out = 0
        self._last_refusal_log = -_REFUSAL_LOG_INTERVAL

    async def listen(
        self, make_protocol: Callable[[], asyncio.Protocol] | None, sock: socket.socket
    ) -> asyncio.Server:
        """Serve ``sock`` with aiohttp's protocol factory behind the guard. Closing the
        returned server stops accepting; ``AppRunner.cleanup()`` closes the connections."""
        if make_protocol is None:
            raise RuntimeError("AppRunner.setup() must run before the guard listens")
        self.make_protocol = make_protocol
        loop = asyncio.get_running_loop()
        # asyncio accepts up to ``backlog`` connections per wake-up, each a descriptor, before
        # the guard sees any of them: a small batch keeps that burst inside the reserve. The
        # kernel's queue, set by listen() after asyncio's own call, stays long.
        server = await loop.create_server(self, sock=sock, backlog=ACCEPT_BATCH)
        sock.listen(listen_backlog())
        return server

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp calls this once a request's line and headers are parsed: the deadline ends
        here, and no timer runs until the answer is sent."""
        transport = request.transport
        connection = self.connections.get(transport) if transport is not None else None
        if connection is None:
            return await handler(request)
        connection.request_started()
        try:
            return await handler(request)
        finally:
            connection.request_finished()

    # -- descriptors ----------------------------------------------------------------------------

    def threshold(self) -> int | None:
        """The first descriptor number a connection may not have (None: no limit)."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        return limit - descriptor_reserve(limit, self.workers)

    def must_refuse(self, transport: asyncio.BaseTransport) -> bool:
        sock = transport.get_extra_info("socket")
        threshold = self.threshold()
        return sock is not None and threshold is not None and sock.fileno() >= threshold

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        """Answer 503 without reading the request, and close: the client is told to retry
        instead of hanging, and the descriptor is free again at once."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            log.warning(
                "refusing new connections: %d open, near the file descriptor limit %s; "
                "%d refused so far. Raise the hard limit (ulimit -Hn, LimitNOFILE=) if "
                "this is legitimate load.",
                len(self.connections),
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                self.refused,
            )
        body = (
            b"The sandbox server has too many open connections and is near its file "
            b"descriptor limit; retry after a few seconds.\n"
        )
        head = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Retry-After: 2\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(head + body)
        transport.close()


class GuardedConnection(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, plus the header deadline."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.requests_in_progress = 0

    # -- asyncio's protocol interface, forwarded ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.guard.must_refuse(transport):
            self.guard.refuse(transport)
            return
        assert isinstance(transport, asyncio.Transport) and self.guard.make_protocol is not None
        self.transport = transport
        self.inner = self.guard.make_protocol()
        self.guard.connections[transport] = self
        self._start_deadline()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.requests_in_progress == 0 and self.timer is None:
            # The first byte of a request on a kept-alive connection: its headers have
            # header_timeout seconds from now.
            self._start_deadline()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        if self.inner is None:
            return
        if self.transport is not None:
            self.guard.connections.pop(self.transport, None)
        inner, self.inner = self.inner, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- the deadline ---------------------------------------------------------------------------

    def request_started(self) -> None:
        self.requests_in_progress += 1
        self._stop_deadline()

    def request_finished(self) -> None:
        self.requests_in_progress -= 1

    def _start_deadline(self) -> None:
        self._stop_deadline()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.header_timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _deadline_passed(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self.inner is None:
            return
        if self.requests_in_progress or transport.get_write_buffer_size():
            # Still handling or sending an answer (bytes of a request body or of a pipelined
            # request came meanwhile): not a client that is late with its headers.
            self._start_deadline()
            return
        self.guard.timed_out += 1
        log.debug("closing a connection whose request headers took over %.1f s",
                  self.guard.header_timeout)  # fmt: skip
        transport.close()
