"""The client against hostile or broken servers (issue 10, section 6).

Each server here is a real little HTTP server on a loopback address, written with raw sockets
so that it can do what no honest server does: send more than it announced, trickle its answer
a byte at a time, never end a body, lie in ``Content-Length``, answer fields of the wrong type,
redirect elsewhere. Nothing is mocked: the client talks to these servers over TCP.

What a user checks:

- a download or an answer is capped by what was asked (``max_bytes``, ``max_json``), however
  much the server sends: the call ends at once with ``SandboxAnswerTooLarge``;
- no request outlives its timeout, however slowly the server answers (headers or body, GET,
  HEAD or POST, on a new or a pooled connection);
- ``Cancellation.cancel()`` ends a request made in ``cancel_scope`` at once, body included;
- a malformed answer raises one ``SandboxProtocolError`` naming the endpoint and the field;
- the token never follows a redirect to another host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.client import (
    Cancellation,
    Sandbox,
    Sandbox307,
    Sandbox500,
    SandboxAnswerTooLarge,
    SandboxCancelled,
    SandboxError,
    SandboxProtocolError,
    SandboxTimeout,
    cancel_scope,
)

from ..conftest import Server

UUID = "e9c28df3-5b06-4deb-a494-61f687cb22ba"
ENVIRONMENT = f"/environments/{UUID}/"
FILE = f"/files/{UUID}/big.bin/"
FIXTURES = Path(__file__).parent.parent / "fixtures"
MiB = 1024**2
#: The client's timeout in the deadline cases; the servers trickle one byte every TRICKLE s.
TIMEOUT = 3.0
TRICKLE = 2.0
#: How long a trickling or endless server keeps going if the client does not give up: far
#: beyond every bound asserted, so that a client without a deadline fails the assertion.
PATIENCE = 45.0
#: Generous bound on how late after its timeout (or its cancel) a request may end.
MARGIN = 5.0
#: Bound on how long a capped answer may take to be refused (it should be milliseconds).
QUICK = 5.0
TOKEN = "hostile-test-token"


# -- a raw HTTP server ---------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    connection: int  # which accepted connection carried it (1, 2...)


class Reply:
    """The raw socket of one request, with pacing that stops when the test ends."""

    def __init__(self, conn: socket.socket, stop: threading.Event) -> None:
        self.conn = conn
        self.stop = stop
        self.closed = False

    def send(self, data: bytes) -> bool:
        """All of ``data``; False when the client went away or the test ended."""
        view = memoryview(data)
        while view and not self.stop.is_set():
            try:
                sent = self.conn.send(view)
            except TimeoutError:
                continue
            except OSError:
                self.closed = True
                return False
            view = view[sent:]
        return not view

    def trickle(self, data: bytes, every: float = TRICKLE) -> None:
        """One byte every ``every`` seconds, for at most PATIENCE seconds."""
        end = time.monotonic() + PATIENCE
        for index in range(len(data)):
            if time.monotonic() > end or not self.send(data[index : index + 1]):
                return
            if self.stop.wait(every):
                return

    def endless(self, chunk: bytes = b"x" * 65536, *, chunked: bool = False) -> None:
        """``chunk`` again and again (in HTTP chunks if ``chunked``) until the client leaves."""
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
        end = time.monotonic() + PATIENCE
        while time.monotonic() < end and self.send(frame):
            pass

    def hold(self) -> None:
        """Keep the connection open, silent, until the client closes it (all it sent being
        read) or the test ends."""
        end = time.monotonic() + PATIENCE
        while time.monotonic() < end and not self.stop.wait(0.05):
            if isinstance(self.conn, ssl.SSLSocket):
                continue  # cannot peek under TLS: held until the test ends
            if select.select([self.conn], [], [], 0)[0]:
                try:
                    if self.conn.recv(1, socket.MSG_PEEK) == b"":
                        return
                except OSError:
                    return

    def answer(self, status: str, headers: dict[str, str], body: bytes = b"") -> None:
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.send(head.encode() + b"\r\n" + body)

    def json(self, data: Any, status: str = "200 OK") -> None:
        body = json.dumps(data).encode()
        self.answer(
            status,
            {"Content-Type": "application/json", "Content-Length": str(len(body))},
            body,
        )

    def close(self) -> None:
        self.closed = True


Handler = Callable[[Request, Reply], None]


class RawServer:
    """Accepts connections on ``host`` and hands every request to ``handler``.

    Requests are read head and body (by Content-Length), unless ``read_bodies`` is False; a
    connection serves requests until the handler closes it or the client leaves.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        read_bodies: bool = True,
        tls: ssl.SSLContext | None = None,
    ):
        self.handler = handler
        self.read_bodies = read_bodies
        self.tls = tls
        self.seen: list[Request] = []
        self.stop = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._count = 0
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/"

    def paths(self) -> list[str]:
        return [f"{request.method} {request.path}" for request in self.seen]

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._accepting.join(5)
        self._listener.close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        assert not any(thread.is_alive() for thread in self._threads), "a handler hung"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._count += 1
            self._connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn, self._count), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        if self.tls is not None:
            conn.settimeout(5)
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
            self._connections.append(conn)
        conn.settimeout(0.5)
        buffer = b""
        with conn:
            while not self.stop.is_set():
                head, buffer = self._read_head(conn, buffer)
                if head is None:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if self.read_bodies:
                    length = int(headers.get("content-length", "0"))
                    while len(buffer) < length and not self.stop.is_set():
                        data = self._recv(conn)
                        if not data:
                            return
                        buffer += data
                    buffer = buffer[length:]
                self.seen.append(Request(method, path, headers, number))
                reply = Reply(conn, self.stop)
                self.handler(self.seen[-1], reply)
                if reply.closed:
                    return

    def _read_head(self, conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        while b"\r\n\r\n" not in buffer:
            if self.stop.is_set():
                return None, b""
            data = self._recv(conn)
            if not data:
                return None, b""
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        return head, rest

    def _recv(self, conn: socket.socket) -> bytes | None:
        while not self.stop.is_set():
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return b""


@contextlib.contextmanager
def serving(handler: Handler, **options: Any) -> Iterator[RawServer]:
    with RawServer(handler, **options) as server:
        yield server


def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    """Seconds ``call`` took, and what it raised (None if it returned)."""
    started = time.monotonic()
    try:
        call()
    except BaseException as error:  # the test inspects it
        return time.monotonic() - started, error
    return time.monotonic() - started, None


def specifications_v3() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "v3" / "specifications.json").read_text())
    return dict(data["body"])


# -- 1. answers are capped by what the client asked for ------------------------------------------

#: What HEAD announces in the "more than HEAD announced" cases.
ANNOUNCED = 100


def head_then(get: Handler) -> Handler:
    """HEAD announces ANNOUNCED bytes, GET does ``get``; ``/ok/`` answers ``{}`` (to check the
    client still works afterwards)."""

    def handle(request: Request, reply: Reply) -> None:
        if request.path == "/specifications/":
            reply.json({})
        elif request.method == "HEAD":
            reply.answer("200 OK", {"Content-Length": str(ANNOUNCED)})
        else:
            get(request, reply)

    return handle


def announce_huge(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": str(50 * MiB)})
    reply.endless()


def endless_chunked(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Transfer-Encoding": "chunked"})
    reply.endless(chunked=True)


def endless_until_close(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Connection": "close"})
    reply.endless()
    reply.close()


def past_content_length(request: Request, reply: Reply) -> None:
    # Says what HEAD said, then sends a megabyte more on the same connection.
    reply.answer("200 OK", {"Content-Length": str(ANNOUNCED)}, b"a" * ANNOUNCED + b"b" * MiB)
    reply.hold()


@pytest.mark.parametrize(
    ("get", "expected"),
    [
        (announce_huge, f"announced {50 * MiB} bytes"),
        (endless_chunked, f"sent more than the {ANNOUNCED} bytes"),
        (endless_until_close, f"sent more than the {ANNOUNCED} bytes"),
        (past_content_length, f"more bytes than its own Content-Length ({ANNOUNCED})"),
    ],
    ids=["announces-more", "chunked-endless", "endless-until-close", "past-content-length"],
)
def test_get_sending_more_than_head_announced_is_cut_and_reported(
    get: Handler, expected: str
) -> None:
    with serving(head_then(get)) as server, Sandbox(server.url, timeout=30) as client:
        size = client.check(UUID, "big.bin")
        assert size == ANNOUNCED
        seconds, error = timed(lambda: client.download(UUID, "big.bin", max_bytes=size))
        assert isinstance(error, SandboxAnswerTooLarge), error
        assert seconds < QUICK, f"took {seconds:.1f} s to refuse"
        message = str(error)
        assert expected in message and FILE in message, message
        assert f"check that {server.url} is a sandbox server" in message, message
        # Nothing of the cut answer is read as the next one.
        assert client.specifications() == {}


def exact_size(size: int, chunked: bool) -> Handler:
    def handle(request: Request, reply: Reply) -> None:
        body = b"z" * size
        if chunked:
            frame = f"{size:x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            reply.answer("200 OK", {"Transfer-Encoding": "chunked"}, frame)
        else:
            reply.answer("200 OK", {"Content-Length": str(size)}, body)

    return handle


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_max_bytes_is_a_cap_and_the_cap_itself_fits(chunked: bool) -> None:
    with serving(exact_size(1000, chunked)) as server, Sandbox(server.url) as client:
        assert client.download(UUID, "f", max_bytes=1000).getvalue() == b"z" * 1000
        assert client.download(UUID, "f", max_bytes=5000).getvalue() == b"z" * 1000
        with pytest.raises(SandboxAnswerTooLarge, match="999 "):
            client.download(UUID, "f", max_bytes=999)
        with pytest.raises(SandboxAnswerTooLarge, match=r"\b0 "):
            client.download(UUID, "f", max_bytes=0)


def test_download_without_max_bytes_is_capped_by_max_download() -> None:
    with serving(endless_chunked) as server:
        client = Sandbox(server.url, timeout=30, max_download=2 * MiB)
        seconds, error = timed(lambda: client.download(UUID))
        assert isinstance(error, SandboxAnswerTooLarge), error
        assert seconds < QUICK
        assert f"{2 * MiB} bytes" in str(error) and "max_download" in str(error)
        assert "max_bytes=" in str(error)


def test_invalid_caps_are_refused_before_sending() -> None:
    with serving(endless_chunked) as server:
        for bad in (-1, 1.5, "10", True):
            with pytest.raises(SandboxError, match="whole number of bytes"):
                Sandbox(server.url, max_json=bad)  # type: ignore[arg-type]
            with pytest.raises(SandboxError, match="max_bytes"):
                Sandbox(server.url).download(UUID, max_bytes=bad)  # type: ignore[arg-type]
        assert server.seen == []


def short_and_closed(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": "1000"}, b"only ten b")
    reply.close()


def short_and_silent(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": "1000"}, b"only ten b")
    reply.hold()


def json_past_length(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": "2"}, b"{}" + b'{"junk": 1}' * 100_000)
    reply.hold()


def test_content_length_lies_are_reported() -> None:
    with serving(short_and_closed) as server, Sandbox(server.url) as client:
        with pytest.raises(SandboxProtocolError, match="cut short") as caught:
            client.download(UUID, max_bytes=1000)
        assert not isinstance(caught.value, SandboxAnswerTooLarge)
    with serving(short_and_silent) as server, Sandbox(server.url, timeout=TIMEOUT) as client:
        seconds, error = timed(lambda: client.download(UUID, max_bytes=1000))
        assert isinstance(error, SandboxTimeout), error
        assert seconds < TIMEOUT + MARGIN
    with (
        serving(json_past_length) as server,
        Sandbox(server.url) as client,
        pytest.raises(SandboxAnswerTooLarge, match=r"its own Content-Length \(2\)"),
    ):
        client.specifications()


def endless_json(chunked: bool) -> Handler:
    def handle(request: Request, reply: Reply) -> None:
        if chunked:
            reply.answer("200 OK", {"Transfer-Encoding": "chunked"}, b'5\r\n{"a":\r\n')
            reply.endless(b'"' + b"x" * 65534 + b'"', chunked=True)
        else:
            reply.answer("200 OK", {"Connection": "close"}, b'{"a": "')
            reply.endless()
            reply.close()

    return handle


def announced_json(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": str(100 * MiB)}, b'{"a": "')
    reply.endless()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.specifications(),
        lambda s: s.usages(),
        lambda s: s.python3,
        lambda s: s.execute({"commands": ["true"]}),
    ],
    ids=["specifications", "usages", "libraries", "execute"],
)
@pytest.mark.parametrize("handler", [endless_json(True), endless_json(False), announced_json])
def test_huge_json_answers_are_cut_at_max_json(
    call: Callable[[Sandbox], object], handler: Handler
) -> None:
    with serving(handler) as server:
        client = Sandbox(server.url, timeout=30, max_json=MiB)
        seconds, error = timed(lambda: call(client))
        assert isinstance(error, SandboxAnswerTooLarge), error
        assert seconds < QUICK
        assert str(MiB) in str(error) and "max_json=" in str(error)


def test_the_default_json_cap_holds() -> None:
    with serving(endless_json(True)) as server, Sandbox(server.url, timeout=60) as client:
        seconds, error = timed(client.specifications)
        assert isinstance(error, SandboxAnswerTooLarge), error
        assert f"more than the {64 * MiB} bytes" in str(error)
        assert seconds < 20  # 64 MiB over loopback


def gzip_bomb(request: Request, reply: Reply) -> None:
    import gzip

    body = gzip.compress(b'{"a": "' + b"0" * (64 * MiB) + b'"}')
    reply.answer("200 OK", {"Content-Encoding": "gzip", "Content-Length": str(len(body))}, body)


def test_compressed_answers_are_refused() -> None:
    with serving(gzip_bomb) as server, Sandbox(server.url) as client:
        with pytest.raises(SandboxProtocolError, match="Content-Encoding 'gzip'"):
            client.specifications()
        assert server.seen[0].headers["accept-encoding"] == "identity"


def endless_error(request: Request, reply: Reply) -> None:
    reply.answer("500 Internal Server Error", {"Transfer-Encoding": "chunked"}, b"4\r\noops\r\n")
    reply.endless(chunked=True)


def endless_redirect(request: Request, reply: Reply) -> None:
    if request.path == "/specifications/":
        reply.answer("302 Found", {"Location": "/elsewhere/", "Transfer-Encoding": "chunked"})
        reply.endless(chunked=True)
    else:
        reply.json({"sandbox_version": "9"})


def test_error_and_redirect_bodies_are_not_read_to_their_end() -> None:
    with serving(endless_error) as server, Sandbox(server.url, timeout=30) as client:
        seconds, error = timed(client.specifications)
        assert isinstance(error, Sandbox500), error
        assert seconds < QUICK and "oops" in str(error)
    with serving(endless_redirect) as server, Sandbox(server.url, timeout=30) as client:
        seconds, error = timed(lambda: client.sandbox_version)
        assert error is None, error
        assert seconds < QUICK and client.sandbox_version == "9"


# -- 2. every request has a total deadline -------------------------------------------------------

HEAD_BYTES = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def trickled_head(request: Request, reply: Reply) -> None:
    reply.trickle(HEAD_BYTES + b" " * 100)


def trickled_body(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": "200"}, b"{")
    reply.trickle(b'"a": "' + b"x" * 190)


def trickled_chunks(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Transfer-Encoding": "chunked"})
    reply.trickle(b"".join(f"1\r\n{c}\r\n".encode() for c in '{"a": "' + "x" * 100))


@pytest.mark.parametrize(
    ("handler", "call", "method"),
    [
        (trickled_head, lambda s: s.specifications(), "GET"),
        (trickled_head, lambda s: s.check(UUID), "HEAD"),
        (trickled_head, lambda s: s.execute({"commands": ["true"]}), "POST"),
        (trickled_body, lambda s: s.download(UUID), "GET"),
        (trickled_body, lambda s: s.execute({"commands": ["true"]}), "POST"),
        (trickled_chunks, lambda s: s.usages(), "GET"),
    ],
    ids=["headers-get", "headers-head", "headers-post", "body-get", "body-post", "chunks-get"],
)
def test_a_trickling_server_cannot_hold_a_request_past_its_timeout(
    handler: Handler, call: Callable[[Sandbox], object], method: str
) -> None:
    with serving(handler) as server, Sandbox(server.url, timeout=TIMEOUT) as client:
        seconds, error = timed(lambda: call(client))
        assert isinstance(error, SandboxTimeout), error
        assert TIMEOUT - 0.5 < seconds < TIMEOUT + MARGIN, f"ended after {seconds:.1f} s"
        assert f"did not answer {method} within {TIMEOUT:g} s" in str(error)
        assert "timeout=" in str(error)


def pooled_then_trickled(request: Request, reply: Reply) -> None:
    if request.path == "/specifications/":
        reply.json(specifications_v3())
    else:
        reply.answer("200 OK", {"Content-Length": "100"}, b'{"container": ')
        reply.trickle(b"1" * 86)


def test_the_deadline_holds_on_a_pooled_connection() -> None:
    with serving(pooled_then_trickled) as server, Sandbox(server.url, timeout=TIMEOUT) as client:
        assert client.generation == 3
        seconds, error = timed(client.usages)
        assert isinstance(error, SandboxTimeout), error
        assert seconds < TIMEOUT + MARGIN
        assert [request.connection for request in server.seen] == [1, 1]  # one connection


def never_reads(request: Request, reply: Reply) -> None:
    reply.hold()


def test_the_deadline_holds_while_the_server_does_not_read_the_upload() -> None:
    upload = b"\0" * (48 * MiB)  # more than the socket buffers hold
    with (
        serving(never_reads, read_bodies=False) as server,
        Sandbox(server.url, timeout=TIMEOUT) as client,
    ):
        seconds, error = timed(lambda: client.execute({"commands": ["true"]}, upload))
        assert isinstance(error, SandboxTimeout), error
        assert seconds < TIMEOUT + MARGIN, f"ended after {seconds:.1f} s"


def test_one_watchdog_thread_serves_every_request() -> None:
    with serving(lambda request, reply: reply.json({})) as server, Sandbox(server.url) as client:
        for _ in range(50):
            client.specifications()
    watchdogs = [t for t in threading.enumerate() if t.name == "sandbox-client-deadlines"]
    assert len(watchdogs) == 1


# -- 3. an interrupt ends any request, body included ---------------------------------------------


def half_then_trickle(request: Request, reply: Reply) -> None:
    reply.answer("200 OK", {"Content-Length": str(2 * MiB)}, b"h" * MiB)
    reply.trickle(b"t" * 100, every=0.5)


def busy(request: Request, reply: Reply) -> None:
    reply.answer("503 Service Unavailable", {"Content-Length": "4"}, b"busy")


def cancel_after(cancellation: Cancellation, seconds: float) -> threading.Thread:
    thread = threading.Timer(seconds, cancellation.cancel)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("handler", "call"),
    [
        (half_then_trickle, lambda s: s.download(UUID)),
        (never_reads, lambda s: s.check(UUID)),
        (never_reads, lambda s: s.specifications()),
        (never_reads, lambda s: s.execute({"commands": ["true"]}, b"\0" * (48 * MiB))),
        (busy, lambda s: s.execute({"commands": ["true"]}, busy_budget=60)),
    ],
    ids=["get-mid-body", "head-headers", "get-headers", "post-upload", "busy-waits"],
)
def test_cancel_scope_ends_a_request_at_once(
    handler: Handler, call: Callable[[Sandbox], object]
) -> None:
    cancellation = Cancellation()
    with (
        serving(handler, read_bodies=handler is not never_reads) as server,
        Sandbox(server.url, timeout=30) as client,
    ):
        timer = cancel_after(cancellation, 0.5)
        with cancel_scope(cancellation):
            seconds, error = timed(lambda: call(client))
        timer.join()
        assert isinstance(error, SandboxCancelled), error
        assert seconds < 0.5 + MARGIN, f"ended {seconds:.1f} s after the start"
        assert "cancelled" in str(error)


def test_a_cancelled_scope_sends_nothing_and_ends_with_its_block() -> None:
    cancellation = Cancellation()
    cancellation.cancel()
    with serving(lambda request, reply: reply.json({})) as server, Sandbox(server.url) as client:
        with cancel_scope(cancellation):
            with pytest.raises(SandboxCancelled):
                client.specifications()
            with pytest.raises(SandboxCancelled):
                client.execute({"commands": ["true"]})
        assert server.seen == []
        assert client.specifications() == {}  # outside the block: not cancelled


def test_a_scope_is_the_thread_s_own() -> None:
    cancellation = Cancellation()
    other: list[object] = []

    def slow(request: Request, reply: Reply) -> None:
        time.sleep(1.0)
        reply.json({"slow": True})

    with (
        serving(slow) as server,
        Sandbox(server.url, timeout=30) as client,
        Sandbox(server.url, timeout=30) as elsewhere,
    ):
        thread = threading.Thread(target=lambda: other.append(elsewhere.specifications()))
        thread.start()
        timer = cancel_after(cancellation, 0.3)
        with cancel_scope(cancellation), pytest.raises(SandboxCancelled):
            client.specifications()
        thread.join(10)
        timer.join()
        assert other == [{"slow": True}]  # the other thread's request was not cancelled


def test_execute_cancel_keeps_working_and_combines_with_scopes() -> None:
    with serving(never_reads) as server, Sandbox(server.url, timeout=30) as client:
        own = Cancellation()
        timer = cancel_after(own, 0.3)
        seconds, error = timed(lambda: client.execute({"commands": ["true"]}, cancel=own))
        timer.join()
        assert isinstance(error, SandboxCancelled) and seconds < 0.3 + MARGIN, error
        assert "The execution was cancelled" in str(error)
        scope, other = Cancellation(), Cancellation()
        timer = cancel_after(scope, 0.3)
        with cancel_scope(scope):
            seconds, error = timed(lambda: client.execute({"commands": ["true"]}, cancel=other))
        timer.join()
        assert isinstance(error, SandboxCancelled) and seconds < 0.3 + MARGIN, error


# -- 2 and 3 over TLS: the same deadline, cancel and caps on an SSL socket ---------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    folder = tmp_path_factory.mktemp("tls")
    command = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.fail(f"the TLS cases need the openssl command (apt-get install openssl): {error}")
    return folder


@pytest.fixture
def tls(certificate: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server-side TLS context; the client trusts its certificate (REQUESTS_CA_BUNDLE)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate / "cert.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    return context


def test_tls_answers_are_served(tls: ssl.SSLContext) -> None:
    # The control: the TLS cases below fail for what they test, not for the handshake.
    with serving(exact_size(10, False), tls=tls) as server, Sandbox(server.url) as client:
        assert server.url.startswith("https://")
        assert client.download(UUID, max_bytes=10).getvalue() == b"z" * 10


def test_tls_trickled_body_ends_at_the_deadline(tls: ssl.SSLContext) -> None:
    with (
        serving(trickled_body, tls=tls) as server,
        Sandbox(server.url, timeout=TIMEOUT) as client,
    ):
        seconds, error = timed(lambda: client.download(UUID))
        assert isinstance(error, SandboxTimeout), error
        assert TIMEOUT - 0.5 < seconds < TIMEOUT + MARGIN, f"ended after {seconds:.1f} s"


def test_tls_cancel_ends_a_body_at_once(tls: ssl.SSLContext) -> None:
    cancellation = Cancellation()
    with serving(half_then_trickle, tls=tls) as server, Sandbox(server.url, timeout=30) as client:
        timer = cancel_after(cancellation, 0.5)
        with cancel_scope(cancellation):
            seconds, error = timed(lambda: client.download(UUID))
        timer.join()
        assert isinstance(error, SandboxCancelled), error
        assert seconds < 0.5 + MARGIN


def test_tls_endless_body_is_cut(tls: ssl.SSLContext) -> None:
    with serving(endless_chunked, tls=tls) as server, Sandbox(server.url, timeout=30) as client:
        seconds, error = timed(lambda: client.download(UUID, max_bytes=MiB))
        assert isinstance(error, SandboxAnswerTooLarge), error
        assert seconds < QUICK


# -- 4. malformed answers name the endpoint and the field ----------------------------------------

V3_SPECS = {"host": {"cpu": {"core": 2}}, "container": {"count": 4}}


def answering(routes: dict[str, bytes]) -> Handler:
    def handle(request: Request, reply: Reply) -> None:
        body = routes.get(request.path, b"{}")
        reply.answer("200 OK", {"Content-Length": str(len(body))}, body)

    return handle


def dumped(data: Any) -> bytes:
    return json.dumps(data).encode()


MALFORMED = [
    ("usages/", b'{"cpu": {"usage": "lots"}}', "usages", "cpu.usage = 'lots'", "a number"),
    ("usages/", b'{"cpu": {"usage": NaN}}', "usages", "cpu.usage = nan", "a number"),
    ("usages/", b'{"cpu": "busy"}', "usages", "cpu = 'busy'", "an object"),
    ("usages/", b'{"container": "x"}', "usage", "container = 'x'", "a whole number"),
    ("usages/", b'{"container": 2.5}', "containers", "container = 2.5", "a whole number"),
    ("usages/", b'{"memory": {"ram": "lots"}}', "usages", "memory.ram = 'lots'", "a number"),
    ("usages/", b'{"cpu": {"usage_avg": [0.1, "x"]}}', "usages", "cpu.usage_avg", "numbers"),
    ("specifications/", b'{"container": "x"}', "cached", "container = 'x'", "an object"),
    ("specifications/", b'{"host": []}', "specifications", "host = []", "an object"),
    (
        "specifications/",
        b'{"host": {"memory": {"ram": "16G"}}}',
        "specifications",
        "host.memory.ram = '16G'",
        "a number",
    ),
    (
        "specifications/",
        b'{"host": {"memory": {"storage": {"/dev/sda": "big"}}}}',
        "cached",
        "host.memory.storage./dev/sda = 'big'",
        "a number",
    ),
    ("specifications/", b'{"container": {"count": "many"}}', "usage", "container.count", "whole"),
    ("specifications/", b'{"containers": {"total": "5"}}', "usage", "containers.total", "whole"),
    ("specifications/", b'{"memory": 100}', "memory", "memory = 100", "an object"),
    ("specifications/", b'{"container": {"cpu": "fast"}}', "cpu", "container.cpu", "an object"),
    ("libraries/", b'{"libraries": {"python": "x"}}', "libraries", "libraries.python", "object"),
    ("libraries/", b'{"bin": [1, 2]}', "bin", "bin = [1, 2]", "a list of names"),
]

CALLS: dict[str, Callable[[Sandbox], object]] = {
    "usages": lambda s: s.usages(),
    "usage": lambda s: s.usage(),
    "containers": lambda s: s.containers,
    "cached": lambda s: s.cached_specifications(),
    "specifications": lambda s: s.specifications(),
    "memory": lambda s: s.memory,
    "cpu": lambda s: s.cpu,
    "libraries": lambda s: s.libraries,
    "bin": lambda s: s.bin,
}


@pytest.mark.parametrize(
    ("endpoint", "body", "call", "field", "expected"),
    MALFORMED,
    ids=[f"{index}-{case[0]}{case[3].split(' ')[0]}" for index, case in enumerate(MALFORMED)],
)
def test_a_malformed_answer_names_its_endpoint_and_field(
    endpoint: str, body: bytes, call: str, field: str, expected: str
) -> None:
    routes = {"/specifications/": dumped(V3_SPECS), f"/{endpoint}": body}
    with serving(answering(routes)) as server, Sandbox(server.url) as client:
        with pytest.raises(SandboxProtocolError) as caught:
            CALLS[call](client)
        message = str(caught.value)
        assert message.startswith(f"{endpoint} answered {field}"), message
        assert f"which is not {expected}" in message or expected in message, message
        assert f"check that {server.url} is a sandbox server" in message.lower(), message


def test_a_long_malformed_value_is_shortened_in_the_message() -> None:
    routes = {"/usages/": dumped({"cpu": {"usage": "x" * 10_000}})}
    with serving(answering(routes)) as server, Sandbox(server.url) as client:
        with pytest.raises(SandboxProtocolError) as caught:
            client.usages()
        assert len(str(caught.value)) < 500 and "cpu.usage = 'xxx" in str(caught.value)


@pytest.mark.parametrize(
    "name",
    [
        "v2/specifications",
        "v2/libraries",
        "v3/specifications",
        "v3/specifications_embedded",
        "v3/usages",
        "v3/libraries",
    ],
)
def test_recorded_answers_of_real_servers_pass_the_checks(name: str) -> None:
    recorded = json.loads((FIXTURES / f"{name}.json").read_text())
    endpoint = name.split("/")[1].removesuffix("_embedded") + "/"
    routes = {f"/{endpoint}": dumped(recorded["body"])}
    with serving(answering(routes)) as server, Sandbox(server.url) as client:
        answer = {
            "specifications/": client.specifications,
            "usages/": client.usages,
            "libraries/": lambda: client.libraries(),
        }[endpoint]()
        assert answer == recorded["body"]


def test_the_embedded_server_s_answers_pass_the_checks(server: Server) -> None:
    with Sandbox(server.url, token=server.token) as client:
        assert client.generation == 3
        assert client.specifications()["container"]["count"] >= 1
        assert isinstance(client.usages().get("container"), int)
        assert 0.0 <= client.usage() <= 1.0
        assert client.libraries() is not None


# -- 5. the token does not follow a redirect to another host -------------------------------------


def redirecting(target: str, status: str = "302 Found") -> Handler:
    def handle(request: Request, reply: Reply) -> None:
        location = target + request.path.lstrip("/")
        reply.answer(status, {"Location": location, "Content-Length": "0"})

    return handle


def landing(request: Request, reply: Reply) -> None:
    if request.method == "HEAD":
        reply.answer("200 OK", {"Content-Length": "7"})
    else:
        reply.json({"sandbox_version": "elsewhere"})


@pytest.mark.parametrize(
    ("host", "named"),
    [("127.0.0.2", "127.0.0.2"), ("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1")],
    ids=["other-address", "other-name", "other-port"],
)
@pytest.mark.parametrize("status", ["302 Found", "307 Temporary Redirect"])
def test_a_redirect_to_another_host_does_not_carry_the_token(
    host: str, named: str, status: str
) -> None:
    with RawServer(landing, host=host) as other:
        target = f"http://{named}:{other.port}/"
        with (
            serving(redirecting(target, status)) as first,
            Sandbox(first.url, token=TOKEN) as client,
        ):
            assert client.specifications() == {"sandbox_version": "elsewhere"}
            assert client.check(UUID) == 7
            assert [r.headers.get("authorization") for r in first.seen] == [f"Bearer {TOKEN}"] * 2
            assert other.paths() == ["GET /specifications/", f"HEAD {ENVIRONMENT}"]
            assert [r.headers.get("authorization") for r in other.seen] == [None, None]


def test_a_redirect_on_the_same_host_keeps_the_token() -> None:
    # The control: the recording above would see a token if one were sent.
    def same(request: Request, reply: Reply) -> None:
        if request.path.startswith("/moved/"):
            reply.json({"sandbox_version": "same-host"})
        else:
            reply.answer("302 Found", {"Location": "/moved" + request.path, "Content-Length": "0"})

    with serving(same) as server, Sandbox(server.url, token=TOKEN) as client:
        assert client.specifications() == {"sandbox_version": "same-host"}
        assert [r.headers.get("authorization") for r in server.seen] == [f"Bearer {TOKEN}"] * 2


def test_an_execute_is_never_redirected() -> None:
    with RawServer(landing, host="127.0.0.2") as other:
        handler = redirecting(other.url, "307 Temporary Redirect")
        with serving(handler) as first, Sandbox(first.url, token=TOKEN) as client:
            with pytest.raises(Sandbox307):
                client.execute({"commands": ["true"]})
            assert other.seen == []
