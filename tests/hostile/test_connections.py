"""Connections that try to hold the server: half-open and slow ones, idle keep-alive ones, and
more connections than the server has file descriptors.

Documented behaviour: a request's line and headers must arrive within ``--header-timeout``
seconds of the connection (or of the request's first byte on a kept-alive connection), else
the connection is closed; an idle kept-alive connection is closed after
``--keepalive-timeout``; the server raises its descriptor soft limit to the hard limit at
start, and near the limit it answers new connections 503 and closes them, keeping descriptors
for its runners. None of it stops an authenticated request, and legitimate slow or long
requests are not cut.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests

from sandbox_kernel.discovery import read_server_info, write_token_file

from ..conftest import Server, descendants, wait_until
from ..helpers import living
from .conftest import Hostile, make_hostile, stop_and_check

HEADER_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 7.0
#: Seconds between two bytes of a slow client.
TRICKLE = 0.2


@pytest.fixture(scope="module")
def hostile(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """The module's server: small caps, a one-second header deadline, seven seconds of
    keep-alive (beyond 5x the header deadline: aiohttp's own keep-alive timer, which also
    closes a connection whose headers never end, cannot pass for the header deadline)."""
    timeouts = ("--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout",
                str(KEEPALIVE_TIMEOUT))  # fmt: skip
    harness = make_hostile(start_server, tmp_path_factory, *timeouts)
    yield harness
    stop_and_check(harness)


# -- a raw client ---------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """``select`` for any descriptor number (``select.select`` stops at 1024)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset), reading any answer it sent."""
    while readable(sock):
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True
    return False


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", limit: float = 30.0) -> float:
    """Send ``trickle`` one byte every :data:`TRICKLE` seconds (nothing if empty) until the
    server closes the connection; the seconds that took (``inf`` past ``limit``)."""
    started = time.monotonic()
    position = 0
    while time.monotonic() - started < limit:
        if readable(sock, TRICKLE) and closed_by_server(sock):
            return time.monotonic() - started
        if trickle:
            try:
                sock.sendall(trickle[position % len(trickle) : position % len(trickle) + 1])
            except OSError:
                return time.monotonic() - started
            position += 1
    return float("inf")


def request_head(hostile: Hostile, method: str, path: str, **headers: str) -> bytes:
    fields = {"Host": f"127.0.0.1:{hostile.port}",
              "Authorization": f"Bearer {hostile.server.token}", **headers}  # fmt: skip
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Answers:
    """Answers read one after the other from a kept-alive connection (one buffer for all, so
    that bytes of the next answer are not lost)."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def next(self) -> tuple[int, bytes]:
        """The status and body of the next answer (aiohttp sends a Content-Length)."""
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), f"no answer: {status_line!r}"
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), self.file.read(length)


def assert_about(seconds: float, target: float) -> None:
    """Closed near ``target``: not before half of it, and well before 5x it (plus a second
    for a loaded machine)."""
    assert seconds != float("inf"), f"never closed (expected after about {target} s)"
    assert target / 2 <= seconds <= target * 5 + 1, f"closed after {seconds:.2f} s, not ~{target} s"


# -- slow clients ---------------------------------------------------------------------------------


def test_silent_connection_is_closed(hostile: Hostile, trial: Callable[..., None]) -> None:
    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            assert_about(seconds_until_closed(sock), HEADER_TIMEOUT)

    trial(case)


def test_request_line_never_finished(hostile: Hostile, trial: Callable[..., None]) -> None:
    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            sock.sendall(f"GET /specifications/?m={marker}".encode())
            assert_about(seconds_until_closed(sock, b"x"), HEADER_TIMEOUT)

    trial(case)


def test_headers_trickled_byte_by_byte(hostile: Hostile, trial: Callable[..., None]) -> None:
    """Slowloris: the headers never end, one byte at a time."""

    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            started = time.monotonic()
            assert_about(
                seconds_until_closed(sock, request_head(hostile, "GET", "/specifications/")[:-2]
                                     + f"X-Slow-{marker}: ".encode() + b"a" * 1000),
                HEADER_TIMEOUT,
            )  # fmt: skip
            assert time.monotonic() - started < 5 * HEADER_TIMEOUT + 1

    trial(case)


def test_one_header_line_every_interval(hostile: Hostile, trial: Callable[..., None]) -> None:
    """Each line is complete, the block never is."""

    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            sock.sendall(b"GET /specifications/ HTTP/1.1\r\n")
            started = time.monotonic()
            closed = float("inf")
            for number in range(100):
                if readable(sock, TRICKLE) and closed_by_server(sock):
                    closed = time.monotonic() - started
                    break
                try:
                    sock.sendall(f"X-Line-{number}-{marker}: a\r\n".encode())
                except OSError:
                    closed = time.monotonic() - started
                    break
            assert_about(closed, HEADER_TIMEOUT)

    trial(case)


def test_idle_keepalive_is_closed(hostile: Hostile, trial: Callable[..., None]) -> None:
    """After a first answer, a silent kept-alive connection lasts about --keepalive-timeout
    (not the shorter header deadline: it is not a slow request)."""

    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            sock.sendall(request_head(hostile, "GET", "/specifications/"))
            assert Answers(sock).next()[0] == 200
            assert_about(seconds_until_closed(sock), KEEPALIVE_TIMEOUT)

    trial(case)


def test_keepalive_then_trickled_headers(hostile: Hostile, trial: Callable[..., None]) -> None:
    """After a first answer, the next request's headers have --header-timeout from its first
    byte."""

    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            sock.sendall(request_head(hostile, "GET", "/specifications/"))
            assert Answers(sock).next()[0] == 200
            slow = request_head(hostile, "GET", "/usages/")[:-2] + f"X-{marker}: ".encode()
            assert_about(seconds_until_closed(sock, slow + b"b" * 1000), HEADER_TIMEOUT)

    trial(case)


def test_slow_but_timely_headers_are_answered(hostile: Hostile, trial: Callable[..., None]) -> None:
    def case(marker: str) -> None:
        head = request_head(hostile, "GET", "/specifications/", Connection="close")
        with connect(hostile.port) as sock:
            pieces = [
                head[i : i + len(head) // 4 + 1] for i in range(0, len(head), len(head) // 4 + 1)
            ]
            for piece in pieces:  # all of it within half the deadline
                sock.sendall(piece)
                time.sleep(HEADER_TIMEOUT / 2 / len(pieces))
            assert Answers(sock).next()[0] == 200

    trial(case)


def test_long_request_and_keepalive_are_not_cut(
    hostile: Hostile, trial: Callable[..., None]
) -> None:
    """A request running longer than the header deadline, then another one on the same
    connection after a pause shorter than --keepalive-timeout: both answered."""

    def case(marker: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", hostile.port, timeout=30)
        headers = {"Authorization": f"Bearer {hostile.server.token}",
                   "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
        config = json.dumps({"commands": [f"sleep 2.{marker[:6]}; echo slow"]})
        body = "config=" + quote(config)
        try:
            connection.request("POST", "/execute/", body=body, headers=headers)
            first = connection.getresponse()
            data = json.loads(first.read())
            assert first.status == 200 and data["execution"][0]["stdout"] == "slow", data
            sock = connection.sock
            time.sleep(KEEPALIVE_TIMEOUT / 2)
            connection.request("GET", "/specifications/", headers=headers)
            second = connection.getresponse()
            second.read()
            assert second.status == 200
            assert connection.sock is sock, "the connection was not kept"
        finally:
            connection.close()

    trial(case)


SLOW_BODIES = {
    # A multipart body whose upload part never ends: it holds a staging place meanwhile.
    "upload-trickled": (
        b'--b\r\nContent-Disposition: form-data; name="config"\r\n\r\n'
        b'{"commands": ["true"]}\r\n--b\r\nContent-Disposition: form-data; '
        b'name="environment"; filename="e.tgz"\r\n\r\n' + bytes(4096),
        "multipart/form-data; boundary=b",
    ),
    "config-trickled": (
        b'--b\r\nContent-Disposition: form-data; name="config"\r\n\r\n{"commands": [' + b" " * 4096,
        "multipart/form-data; boundary=b",
    ),
    "urlencoded-trickled": (b"config=" + b"%20" * 2000, "application/x-www-form-urlencoded"),
}


@pytest.mark.parametrize("name", list(SLOW_BODIES))
def test_slow_body_is_given_up(hostile: Hostile, trial: Callable[..., None], name: str) -> None:
    """Headers in time, then a body at a few bytes a second: answered 408 once its grace
    (the header deadline) has passed and it is below 16 KiB/s; nothing ran, nothing staged."""

    def case(marker: str) -> None:
        body, content_type = SLOW_BODIES[name]
        head = request_head(hostile, "POST", "/execute/", **{
            "Content-Type": content_type, "Content-Length": str(len(body) + 10_000)})  # fmt: skip
        with connect(hostile.port) as sock:
            sock.sendall(head)
            started = time.monotonic()
            position = 0
            while not readable(sock, TRICKLE) and time.monotonic() - started < 30:
                sock.sendall(body[position : position + 8])
                position += 8
            took = time.monotonic() - started
            status, text = Answers(sock).next()
        assert status == 408, text
        assert b"too slowly" in text
        assert_about(took, HEADER_TIMEOUT + 1)

    trial(case)


def test_pipelined_requests_are_all_answered(hostile: Hostile, trial: Callable[..., None]) -> None:
    def case(marker: str) -> None:
        with connect(hostile.port) as sock:
            head = request_head(hostile, "GET", "/specifications/")
            sock.sendall(head * 3)
            answers = Answers(sock)
            statuses = [answers.next()[0] for _ in range(3)]
            assert statuses == [200, 200, 200]

    trial(case)


# -- many connections -----------------------------------------------------------------------------


@dataclasses.dataclass
class LimitedServer:
    """A server started under ``prlimit --nofile=SOFT:HARD``."""

    process: subprocess.Popen[bytes]
    url: str
    token: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_descriptors(self) -> int:
        """The descriptor count once it has not changed for half a second (the runners are
        ready)."""
        last, since = -1, time.monotonic()
        deadline = since + 20
        while time.monotonic() < deadline:
            count = self.descriptors()
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= 0.5:
                return count
            time.sleep(0.05)
        raise AssertionError(f"the server's descriptors never settled ({last})")

    def descriptor_limits(self) -> tuple[int, int]:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise AssertionError("no 'Max open files' in /proc/PID/limits")

    def execute(self, command: str, timeout: float = 30) -> requests.Response:
        return requests.post(
            self.url + "execute/",
            files={"config": (None, json.dumps({"commands": [command]}))},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
        )


@contextlib.contextmanager
def limited_server(tmp_path: Path, soft: int, hard: int, *args: str) -> Iterator[LimitedServer]:
    """A real server process whose descriptor limits start at ``soft:hard``."""
    if not any(Path(d, "prlimit").exists() for d in os.environ.get("PATH", "").split(":")):
        pytest.fail("prlimit is missing: install the Debian package util-linux", pytrace=False)
    token = "t" + os.urandom(16).hex()
    token_file, info_file, log = tmp_path / "token", tmp_path / "info.json", tmp_path / "log"
    write_token_file(token_file, token)
    command = [
        "prlimit", f"--nofile={soft}:{hard}", "--",
        sys.executable, "-m", "sandbox_kernel.server", "--port", "0", "--no-advertise",
        "--info-file", str(info_file), "--token-file", str(token_file),
        "--data-dir", str(tmp_path / "data"), *args,
    ]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        started = wait_until(lambda: info_file.exists() or process.poll() is not None, 60)
        info = read_server_info(info_file)
        assert started and info is not None, f"the server did not start: {log.read_text()}"
        yield LimitedServer(process, info.url, token, log)
    finally:
        tree = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.returncode == 0, f"the server ended with {process.returncode}"
        assert wait_until(lambda: not living(tree), 10)


def own_descriptors(needed: int) -> None:
    """Raise this process's soft limit so that it can hold ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"the test needs {needed} descriptors; the hard limit is {hard} "
                    "(ulimit -Hn)", pytrace=False)  # fmt: skip
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


HALF_OPEN = 3000


def half_open(port: int, count: int) -> list[socket.socket]:
    """``count`` connections: a third silent, a third with half a request line, a third with
    a request line and unfinished headers."""
    partial = [
        b"",
        b"POST /execute/ HTT",
        b"GET /specifications/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-",
    ]
    sockets = []
    for number in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(sock)
        if partial[number % 3]:
            sock.sendall(partial[number % 3])
    return sockets


def test_half_open_connections_do_not_stop_an_execute(tmp_path: Path) -> None:
    header_timeout = 5.0
    own_descriptors(HALF_OPEN + 500)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if hard < 2 * HALF_OPEN:
        pytest.fail(f"a hard descriptor limit of {2 * HALF_OPEN} is needed, not {hard}",
                    pytrace=False)  # fmt: skip
    # The soft limit starts at 1024, below the number of connections: the server must raise it.
    args = ("--workers", "2", "--header-timeout", str(header_timeout), "--keepalive-timeout", "60")
    with limited_server(tmp_path, 1024, hard, *args) as server:
        assert server.descriptor_limits() == (hard, hard), "the soft limit was not raised"
        idle = server.settled_descriptors()
        opened = time.monotonic()
        sockets = half_open(server.port, HALF_OPEN)
        try:
            assert wait_until(lambda: server.descriptors() >= idle + HALF_OPEN - 10, 10), (
                f"the server holds {server.descriptors()} descriptors, {idle} when idle"
            )
            started = time.monotonic()
            response = server.execute("echo served")
            took = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert response.json()["execution"][0]["stdout"] == "served"
            assert took < 5, f"the execute took {took:.1f} s beside {HALF_OPEN} idle connections"
            still_open = sum(not closed_by_server(sock) for sock in sockets)
            if time.monotonic() - opened < header_timeout / 2:
                assert still_open == HALF_OPEN, "connections closed before their deadline"

            def all_closed() -> bool:
                return all(closed_by_server(sock) for sock in sockets)

            assert wait_until(all_closed, header_timeout * 5), (
                f"{sum(not closed_by_server(s) for s in sockets)} of {HALF_OPEN} connections "
                f"still open {time.monotonic() - opened:.0f} s after they opened"
            )
            assert time.monotonic() - opened >= header_timeout / 2
        finally:
            for sock in sockets:
                sock.close()
        assert wait_until(lambda: server.descriptors() <= idle + 5, 10), (
            f"the server holds {server.descriptors()} descriptors, {idle} before"
        )
        assert server.execute("echo after").json()["execution"][0]["stdout"] == "after"


def _read_refusal(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(OSError):
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            received += chunk
    return received


#: The low descriptor limit (soft and hard) of the server below: the commands' own limit
#: (1024, ``ulimit -n`` in the runner) must fit under it.
LOW_LIMIT = 1200


def test_descriptor_limit_refuses_cleanly_and_serves_again(tmp_path: Path) -> None:
    flood = LOW_LIMIT + 300
    own_descriptors(flood + 200)
    args = ("--workers", "2", "--header-timeout", "60", "--keepalive-timeout", "60")
    with limited_server(tmp_path, LOW_LIMIT, LOW_LIMIT, *args) as server:
        assert server.descriptor_limits() == (LOW_LIMIT, LOW_LIMIT)
        idle = server.settled_descriptors()
        running: list[requests.Response | Exception] = []

        def execute_meanwhile() -> None:
            try:
                running.append(server.execute("sleep 2; echo finished"))
            except Exception as error:  # reported by the assertion below
                running.append(error)

        worker = threading.Thread(target=execute_meanwhile)
        worker.start()
        time.sleep(0.5)  # the execute holds a runner when the flood comes
        sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                   for _ in range(flood)]  # fmt: skip
        try:
            time.sleep(1)
            refused = [sock for sock in sockets if closed_by_server_peek(sock)]
            kept = len(sockets) - len(refused)
            assert refused, f"no connection was refused at a {LOW_LIMIT}-descriptor limit"
            assert kept > LOW_LIMIT // 2, f"only {kept} connections were accepted"
            answers = [_read_refusal(sock) for sock in refused[:5]]
            assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in answers), answers
            assert b"retry after a few seconds" in answers[0]
            assert server.descriptors() < LOW_LIMIT
            worker.join(30)
            [outcome] = running
            assert isinstance(outcome, requests.Response), f"the running execute failed: {outcome}"
            assert outcome.status_code == 200, outcome.text
            assert outcome.json()["execution"][0]["stdout"] == "finished"
        finally:
            for sock in sockets:
                sock.close()
            worker.join(30)
        assert wait_until(lambda: server.descriptors() <= idle + 5, 10), (
            f"the server holds {server.descriptors()} descriptors, {idle} before"
        )
        response = server.execute("echo served again")
        assert response.status_code == 200, response.text
        assert response.json()["execution"][0]["stdout"] == "served again"
        assert "refusing new connections" in server.log.read_text()


def closed_by_server_peek(sock: socket.socket) -> bool:
    """Whether the server answered or closed ``sock`` already (without consuming the
    answer)."""
    if not readable(sock):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) is not None
    except OSError as error:
        return error.errno in (errno.ECONNRESET, errno.EPIPE)
