"""A fault-injecting HTTP proxy on loopback, between a client (the kernel) and a sandbox server.

A real server over real sockets, never a mock of ``requests``: it forwards every request to the
target and, when told, disturbs the ``execute/`` exchanges (or others, see ``paths``):

========== ===================================================================================
fault      what the proxy does
========== ===================================================================================
none       forwards
refuse     stops listening and closes every connection: connections are refused
500        forwards (the commands run), then answers 500 with a plain-text body
503        answers 503 "Sandbox overloaded, retry after a few seconds." without forwarding
hang       reads the request, does not forward, answers nothing until released (then closes)
not-json   answers 200 with an HTML page, without forwarding
cut        forwards, then sends the answer's headers and half of its body, and closes
env-404    answers an ``execute/`` that carries ``config.environment`` with the reference
           server's 404 "No environment with UUID '<uuid>' found"; forwards the others
404-page   answers 404 with a web server's HTML page (a misrouted reverse proxy), without
           forwarding: nothing says that the environment is unknown
========== ===================================================================================

``times=N`` limits a fault to its first N uses (a burst of 503s, one lost environment); then
the proxy forwards again. The proxy listens on a fixed port, so that it can be stopped and
started again (``restart``) at the same URL. Every request is recorded as an
:class:`Exchange`, so that a test can count the ``execute/`` POSTs a client sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from ..helpers import free_port

NONE = "none"
REFUSE = "refuse"
ERROR_500 = "500"
BUSY_503 = "503"
HANG = "hang"
NOT_JSON = "not-json"
CUT = "cut"
ENV_404 = "env-404"
NOT_FOUND = "404-page"
FAULTS = (NONE, REFUSE, ERROR_500, BUSY_503, HANG, NOT_JSON, CUT, ENV_404, NOT_FOUND)

OVERLOADED = "Sandbox overloaded, retry after a few seconds."
ERROR_500_BODY = "Internal Server Error: the worker crashed"
HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n"
    "<body><h1>Welcome to nginx!</h1><p>If you see this page, the web server is "
    "successfully installed.</p></body></html>\n"
)
NOT_FOUND_PAGE = (
    "<html><head><title>404 Not Found</title></head>\n<body><center><h1>404 Not Found</h1>"
    "</center><hr><center>nginx</center></body></html>\n"
)
EXECUTE = "execute/"
#: The longest a hung request waits for ``release`` (a safety net: tests release it).
_HANG_LIMIT = 300.0
_ENVIRONMENT = re.compile(rb'"environment":\s*"([0-9a-fA-F-]{36})"')


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request the proxy received, and what it did with it."""

    method: str
    path: str
    #: ``config.environment`` of an ``execute/`` (None when absent, or not an execute).
    environment: str | None
    #: ``"forwarded"``, or the fault it got (``"500"``, ``"503"``, ``"hang"``...).
    outcome: str


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class FaultProxy:
    """Forwards to ``target`` from ``http://127.0.0.1:<port>/``, with a switchable fault."""

    def __init__(self, target: str, port: int | None = None) -> None:
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._fault = NONE
        self._times: int | None = None
        self._paths: tuple[str, ...] = (EXECUTE,)
        self._released = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    # -- controls ------------------------------------------------------------------------------

    @property
    def fault(self) -> str:
        return self._fault

    @property
    def listening(self) -> bool:
        return self._server is not None

    def set(self, fault: str, *, times: int | None = None, paths: tuple[str, ...] = ()) -> None:
        """Turn ``fault`` on (for its first ``times`` uses; on ``paths``, default execute/).

        ``refuse`` stops listening; any other fault (``none`` included) listens again, and
        releases the requests held by an earlier ``hang``.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        with self._lock:
            self._fault, self._times, self._paths = fault, times, paths or (EXECUTE,)
        if fault == REFUSE:
            self.stop()
            return
        if fault != HANG:
            self.release()
        if not self.listening:
            self.start()

    def clear(self) -> None:
        """No fault any more: listening, forwarding, hung requests released."""
        self.set(NONE)

    def release(self) -> None:
        """End the requests held by ``hang``: their connections close with no answer."""
        with self._lock:
            released, self._released = self._released, threading.Event()
        released.set()

    def start(self) -> None:
        """Listen on the proxy's port (the same one after a stop)."""
        if self._server is not None:
            return
        self._server = _Server(("127.0.0.1", self.port), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close every open connection (held ones included)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.release()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def restart(self) -> None:
        """Stop, then listen again on the same port: clients find the same URL."""
        self.stop()
        self.start()

    def close(self) -> None:
        with self._lock:
            self._fault = NONE
        self.stop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what happened -------------------------------------------------------------------------

    def mark(self) -> int:
        """A point in the record: ``executes(since=mark)`` counts what came after it."""
        with self._lock:
            return len(self.exchanges)

    def executes(self, since: int = 0) -> list[Exchange]:
        """The ``POST execute/`` requests received (since ``mark``)."""
        with self._lock:
            return [
                e for e in self.exchanges[since:] if e.method == "POST" and e.path == "/" + EXECUTE
            ]

    def wait_for(self, outcome: str, since: int = 0, timeout: float = 10.0) -> bool:
        """Wait until a request (after ``since``) got ``outcome``; False if none came in time."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if any(e.outcome == outcome for e in self.exchanges[since:]):
                    return True
            time.sleep(0.02)
        return False

    # -- the proxy itself ----------------------------------------------------------------------

    def _decide(self, method: str, path: str, environment: str | None) -> str:
        """The fault this request gets (``none``: forward), counting it against ``times``."""
        with self._lock:
            fault = self._fault
            if fault in (NONE, REFUSE) or self._times == 0:
                return NONE
            if not any(path.lstrip("/").startswith(p) for p in self._paths):
                return NONE
            if fault == ENV_404 and (path.lstrip("/") != EXECUTE or environment is None):
                return NONE
            if self._times is not None:
                self._times -= 1
            return fault

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def _track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                proxy._track(self.connection, True)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    proxy._track(self.connection, False)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                environment = None
                if self.command == "POST" and self.path == "/" + EXECUTE:
                    found = _ENVIRONMENT.search(body)
                    environment = found.group(1).decode() if found else None
                fault = proxy._decide(self.command, self.path, environment)
                proxy._record(
                    Exchange(
                        self.command,
                        self.path,
                        environment,
                        "forwarded" if fault == NONE else fault,
                    )
                )
                if fault == HANG:
                    with proxy._lock:
                        released = proxy._released
                    released.wait(_HANG_LIMIT)
                    self.close_connection = True  # no answer at all
                elif fault == BUSY_503:
                    self._answer(503, "text/plain; charset=utf-8", OVERLOADED.encode())
                elif fault == NOT_JSON:
                    self._answer(200, "text/html; charset=utf-8", HTML_PAGE.encode())
                elif fault == NOT_FOUND:
                    self._answer(404, "text/html; charset=utf-8", NOT_FOUND_PAGE.encode())
                elif fault == ENV_404:
                    text = f"No environment with UUID '{environment}' found"
                    self._answer(404, "text/plain; charset=utf-8", text.encode())
                else:
                    status, headers, data = self._forward(body)
                    if fault == ERROR_500:
                        self._answer(500, "text/plain; charset=utf-8", ERROR_500_BODY.encode())
                    elif fault == CUT:
                        self._send_head(status, headers, len(data))
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True  # fewer bytes than announced, then EOF
                    else:
                        self._send_head(status, headers, _length(self.command, headers, data))
                        if self.command != "HEAD":
                            self.wfile.write(data)

            do_GET = do_POST = do_HEAD = _handle

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection(
                    proxy.target_host, proxy.target_port, timeout=120
                )
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = f"{proxy.target_host}:{proxy.target_port}"
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    return answer.status, answer.getheaders(), data
                finally:
                    upstream.close()

            def _send_head(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in (
                        "transfer-encoding",
                        "connection",
                        "content-length",
                        "date",
                        "server",
                    ):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _answer(self, status: int, content_type: str, data: bytes) -> None:
                self._send_head(status, [("Content-Type", content_type)], len(data))
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler


def _length(method: str, headers: list[tuple[str, str]], data: bytes) -> int:
    """The Content-Length to pass on: a HEAD answer has no body but announces the GET's."""
    if method == "HEAD":
        for name, value in headers:
            if name.lower() == "content-length" and value.isdigit():
                return int(value)
    return len(data)
