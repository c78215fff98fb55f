"""The client against recorded answers of sandbox servers 2.x and 3.x, over real loopback HTTP.

A small ``ThreadingHTTPServer`` answers with the fixtures of ``tests/fixtures/v2`` and
``tests/fixtures/v3`` (each one a recorded response: status, headers, body) or with scripted
misbehaviour (503 then 200, a connection closed without answer, a body cut short, a hang), and
records every request it receives so that tests can count them. Nothing is mocked.
"""

from __future__ import annotations

import gzip
import http
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import client
from sandbox_kernel.client import (
    Sandbox,
    Sandbox400,
    Sandbox404,
    Sandbox500,
    Sandbox503,
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxHTTPError,
    SandboxProtocolError,
    SandboxTimeout,
    error_for_status,
    validate,
)
from sandbox_kernel.protocol import OVERLOADED_TEXT
from sandbox_kernel.session import Session

FIXTURES = Path(__file__).parent / "fixtures"
UUID = "e9c28df3-5b06-4deb-a494-61f687cb22ba"
UNKNOWN_UUID = "00000000-0000-4000-8000-000000000000"
SPEC_ATTRIBUTES = (
    "sandbox_version",
    "docker_version",
    "memory",
    "cpu",
    "environ",
    "execute_timeout",
    "expiration",
    "isolation",
)
LIBRARY_ATTRIBUTES = ("python3", "python2", "java", "gcc", "gpp", "perl", "postgres", "bin")


def fixture(generation: str, name: str) -> dict[str, Any]:
    """A recorded response: ``{"status", "headers", "body"}`` (plus a ``note``)."""
    data: dict[str, Any] = json.loads((FIXTURES / generation / f"{name}.json").read_text())
    return data


def reply(status: int = 200, body: Any = "", **extra: Any) -> dict[str, Any]:
    return {"status": status, "headers": {}, "body": body, **extra}


# --- A real HTTP server answering scripted replies ------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class FakeSandbox:
    """Routes ``(method, path)`` to a list of replies, served in order, the last one repeated.

    A reply is a fixture dict; extra keys script misbehaviour: ``close`` (close the connection
    without answering), ``hang`` (seconds to wait before answering), ``cut`` (announce more
    bytes than sent, then close), ``head_body`` (send the body even to a HEAD).
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def on(self, method: str, path: str, *replies: dict[str, Any]) -> None:
        self.routes[(method, path)] = list(replies)

    def count(self, method: str, path: str) -> int:
        return sum(1 for seen in self.seen if (seen.method, seen.path) == (method, path))

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def answer(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        key = (handler.command, handler.path)
        with self._lock:
            port = handler.client_address[1]
            self.seen.append(Seen(handler.command, handler.path, dict(handler.headers), body, port))
            replies = self.routes.get(key) or [reply(404, "no route in the test server")]
            scripted = replies.pop(0) if len(replies) > 1 else replies[0]
        if scripted.get("hang"):
            self.release.wait(scripted["hang"])
        if scripted.get("stall"):  # headers and half the body, then nothing
            _write(handler, {**scripted, "cut": True}, half=True)
            handler.wfile.flush()
            self.release.wait(scripted["stall"])
            return
        if scripted.get("close"):
            handler.close_connection = True
            return
        _write(handler, scripted)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeSandbox) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (timeout tests) is expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: exercises connection reuse
    server: _Server

    def do_GET(self) -> None:
        self.server.fake.answer(self)

    do_HEAD = do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _write(handler: BaseHTTPRequestHandler, scripted: dict[str, Any], half: bool = False) -> None:
    body = scripted.get("body", "")
    if isinstance(body, dict | list):
        payload = json.dumps(body).encode()
    elif isinstance(body, bytes):
        payload = body
    else:
        payload = str(body).encode()
    headers = {"Content-Type": "text/html; charset=utf-8", **scripted.get("headers", {})}
    headers.setdefault("Content-Length", str(len(payload) + (50 if scripted.get("cut") else 0)))
    handler.send_response(scripted["status"])
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD" or scripted.get("head_body"):
        handler.wfile.write(payload[: len(payload) // 2] if half else payload)
    if scripted.get("cut"):
        handler.close_connection = True


@pytest.fixture
def fake() -> Iterator[FakeSandbox]:
    server = FakeSandbox()
    yield server
    server.stop()


def serve(fake: FakeSandbox, generation: str, **names: str) -> None:
    """Route the GET endpoints of a generation to its fixtures (``names`` override)."""
    endpoints = {"specifications": "specifications", "libraries": "libraries"}
    if generation == "v3":
        endpoints["usages"] = "usages"
    endpoints.update(names)
    for endpoint, name in endpoints.items():
        fake.on("GET", f"/{endpoint}/", fixture(generation, name))


def sandbox(fake: FakeSandbox, **kwargs: Any) -> Sandbox:
    return Sandbox(fake.url, **kwargs)


# --- Attributes -----------------------------------------------------------------------------


def test_v2_specification_attributes(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    body = fixture("v2", "specifications")["body"]
    s = sandbox(fake)
    assert s.sandbox_version == "2.0.3"
    assert s.docker_version == "18.09.7"
    assert s.cpu == body["cpu"]
    assert s.memory == {"ram": "100m", "swap": "200m", "storage": "host"}
    assert s.environ == {"LANG": "C.UTF-8"}
    assert s.execute_timeout == 10.0
    assert s.expiration == 86400
    assert s.isolation is None
    assert s.containers == {"total": 5, "running": 2, "available": 3}


def test_v3_specification_attributes(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    container = fixture("v3", "specifications")["body"]["container"]
    s = sandbox(fake)
    assert s.sandbox_version == "3.0.3"
    assert s.docker_version == "28.2.2"
    assert s.cpu == container["cpu"]
    assert s.memory == {"ram": 100000000, "swap": 100000000, "storage": -1}
    # What 3.x does not tell is None.
    assert (s.environ, s.execute_timeout, s.expiration, s.isolation) == (None, None, None, None)
    assert s.containers == {"total": 40, "running": 10, "available": 30}


def test_embedded_server_extras(fake: FakeSandbox) -> None:
    serve(fake, "v3", specifications="specifications_embedded")
    s = sandbox(fake)
    assert s.docker_version is None  # the embedded server runs no Docker
    assert s.sandbox_version == "3.0.3+sandbox-kernel.0.1.0"
    assert s.execute_timeout == 10.0
    assert s.expiration == 86400
    assert s.isolation is not None and s.isolation["method"] == "bubblewrap"
    assert s.containers == {"total": 4, "running": 10, "available": 0}
    assert s.usage() == 1.0  # more busy than containers: clamped


def test_v2_library_attributes(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    body = fixture("v2", "libraries")["body"]
    s = sandbox(fake)
    versions = (s.python3, s.python2, s.java, s.gcc, s.gpp, s.perl, s.postgres)
    assert versions == ("3.7.3", "2.7.16", "JDK 11.0", "8.3.0", "8.3.0", "5.28.1", "11.5")
    assert s.libraries == body["libraries"]
    assert s.libraries["python"]["sympy"] == "1.4"
    assert s.bin == body["bin"]
    assert fake.count("GET", "/libraries/") == 1


def test_v3_library_versions_come_from_dpkg(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    body = fixture("v3", "libraries")["body"]
    s = sandbox(fake)
    assert s.python3 == "3.11.2"
    assert s.python2 is None  # Debian 12 has no python2
    assert s.java == "17.0.15"
    assert (s.gcc, s.gpp) == ("12.2.0", "12.2.0")
    assert s.perl == "5.36.0"
    assert s.postgres == "15.13"  # postgresql-15, not postgresql-client-15
    assert s.libraries == body["libraries"]
    assert isinstance(s.bin, list) and "python3" in s.bin


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (
            {"python2.7": "2.7.18-8", "default-jdk": "2:1.17-74", "postgresql": "15+248"},
            {"python2": "2.7.18", "java": "1.17", "postgres": "15"},
        ),
        (
            {"python2": "2.7.18-3", "openjdk-11-jre": "11.0.22+7-2", "gcc": "?"},
            {"python2": "2.7.18", "java": "11.0.22", "gcc": None},
        ),
        ({"g++": "1:12.2.0-14+deb12u1", "perl": "weird"}, {"gpp": "12.2.0", "perl": "weird"}),
    ],
)
def test_v3_version_alternatives(
    fake: FakeSandbox, system: dict[str, str], expected: dict[str, str | None]
) -> None:
    fake.on("GET", "/libraries/", reply(200, {"libraries": {"system": system}, "bin": []}))
    s = sandbox(fake)
    assert {name: getattr(s, name) for name in expected} == expected


def test_minimal_answers_give_none_not_a_crash(fake: FakeSandbox) -> None:
    fake.on("GET", "/specifications/", reply(200, {}))
    fake.on("GET", "/libraries/", reply(200, {}))
    s = sandbox(fake)
    for name in (*SPEC_ATTRIBUTES, *LIBRARY_ATTRIBUTES, "containers"):
        assert getattr(s, name) is None, name
    assert s.libraries == {}
    assert s.usage() == 0.0


def test_null_fields_give_none(fake: FakeSandbox) -> None:
    told = {"host": {"sandbox_version": None}, "container": {"cpu": None, "count": None}}
    fake.on("GET", "/specifications/", reply(200, told))
    fake.on("GET", "/usages/", reply(200, {"container": None}))
    s = sandbox(fake)
    assert (s.sandbox_version, s.cpu, s.containers) == (None, None, None)
    assert s.usage() == 0.0


@pytest.mark.parametrize(
    ("odd", "field"),
    [
        ({"host": {"sandbox_version": ["3"]}}, "host.sandbox_version = ['3']"),
        ({"container": {"cpu": "fast"}}, "container.cpu = 'fast'"),
        ({"container": {"count": "many"}}, "container.count = 'many'"),
    ],
)
def test_unexpected_types_are_reported_with_their_field(
    fake: FakeSandbox, odd: dict[str, Any], field: str
) -> None:
    # Once given None (and a TypeError later, in whatever displayed them); now the answer is
    # refused at once, naming the field (tests/hostile/test_client.py has more variants).
    fake.on("GET", "/specifications/", reply(200, odd))
    with pytest.raises(SandboxProtocolError, match="specifications/ answered") as caught:
        _ = sandbox(fake).cpu
    assert field in str(caught.value) and "sandbox server" in str(caught.value)


# --- Caching --------------------------------------------------------------------------------


def test_each_category_is_fetched_once(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    s = sandbox(fake)
    for _ in range(3):
        for name in (*SPEC_ATTRIBUTES, *LIBRARY_ATTRIBUTES, "libraries"):
            getattr(s, name)
    assert fake.count("GET", "/specifications/") == 1
    assert fake.count("GET", "/libraries/") == 1


def test_containers_are_fresh_on_every_access(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    s = sandbox(fake)
    assert s.cpu is not None
    for _ in range(3):
        assert s.containers is not None
    assert fake.count("GET", "/specifications/") == 4  # the cached one + one per access


def test_v3_containers_ask_usages_each_time(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    s = sandbox(fake)
    assert s.containers == s.containers
    assert fake.count("GET", "/usages/") == 2
    assert fake.count("GET", "/specifications/") == 1


def test_del_fetches_the_category_again(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    s = sandbox(fake)
    assert s.cpu is not None and s.python3 == "3.7.3"
    del s.cpu
    assert fake.count("GET", "/specifications/") == 1  # nothing fetched by del itself
    assert s.memory is not None and s.cpu is not None
    assert fake.count("GET", "/specifications/") == 2
    assert s.perl == "5.28.1"
    assert fake.count("GET", "/libraries/") == 1  # the other category stays cached
    del s.libraries
    assert s.gcc == "8.3.0"
    assert fake.count("GET", "/libraries/") == 2


def test_raw_methods_each_do_one_get(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    s = sandbox(fake)
    assert s.specifications() == fixture("v3", "specifications")["body"]
    assert s.usages()["container"] == 10
    assert [seen.path for seen in fake.seen] == ["/specifications/", "/usages/"]


def test_libraries_is_also_callable(fake: FakeSandbox) -> None:
    # sandbox-api 0.x had the attribute, 1.x the method returning the whole answer.
    serve(fake, "v3")
    s = sandbox(fake)
    answer = s.libraries()
    assert answer == fixture("v3", "libraries")["body"]
    answer["bin"].clear()  # a copy
    assert s.libraries()["bin"] and s.libraries["c"]["libc"] == "6"
    assert fake.count("GET", "/libraries/") == 1  # slow endpoint: fetched once, as the others


# --- usage() --------------------------------------------------------------------------------


def test_usage_v2(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    assert sandbox(fake).usage() == pytest.approx(2 / 5)


def test_usage_v3(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    s = sandbox(fake)
    assert s.usage() == pytest.approx(10 / 40)
    assert s.usage() == pytest.approx(10 / 40)
    assert fake.count("GET", "/usages/") == 2  # the load is asked anew


@pytest.mark.parametrize(("total", "running", "load"), [(0, 0, 0.0), (4, 9, 1.0)])
def test_usage_is_clamped(fake: FakeSandbox, total: int, running: int, load: float) -> None:
    containers = {"total": total, "running": running, "available": total - running}
    fake.on("GET", "/specifications/", reply(200, {"containers": containers}))
    assert sandbox(fake).usage() == load


def test_a_negative_count_is_a_malformed_answer(fake: FakeSandbox) -> None:
    """One rule for every reader of the load: a count below zero is not a sandbox's answer."""
    containers = {"total": 4, "running": -1, "available": 5}
    fake.on("GET", "/specifications/", reply(200, {"containers": containers}))
    with pytest.raises(SandboxProtocolError, match=r"containers\.running = -1"):
        sandbox(fake).usage()


# --- Environments and files -----------------------------------------------------------------


def make_tgz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_download_file_and_environment(fake: FakeSandbox) -> None:
    tgz = make_tgz({"result.txt": b"hello\n"})
    fake.on("GET", f"/files/{UUID}/result.txt/", fixture("v3", "file_get"))
    fake.on("GET", f"/environments/{UUID}/", reply(200, tgz))
    s = sandbox(fake)
    assert s.download(UUID, "result.txt").read() == b"hello\n"
    downloaded = s.download(UUID)
    assert isinstance(downloaded, io.BytesIO)
    with tarfile.open(fileobj=downloaded, mode="r:gz") as archive:
        assert archive.getnames() == ["result.txt"]


def test_download_missing_raises_404(fake: FakeSandbox) -> None:
    fake.on("GET", f"/files/{UUID}/nope.txt/", fixture("v3", "file_missing"))
    with pytest.raises(Sandbox404) as caught:
        sandbox(fake).download(UUID, "nope.txt")
    error = caught.value
    assert isinstance(error, SandboxHTTPError) and isinstance(error, SandboxError)
    assert error.response.status_code == 404 and error.status_code == 404
    message = str(error)
    assert "404 Not Found" in message and "GET" in message
    assert f"{fake.url}/files/{UUID}/nope.txt/" in message
    assert "could not be found in environment" in message


def test_file_path_is_quoted(fake: FakeSandbox) -> None:
    fake.on("GET", f"/files/{UUID}/dir/a%20b%3F.txt/", reply(200, b"x"))
    assert sandbox(fake).download(UUID, "/dir/a b?.txt").read() == b"x"


def test_check(fake: FakeSandbox) -> None:
    fake.on("HEAD", f"/environments/{UUID}/", fixture("v3", "env_head"))
    fake.on("HEAD", f"/files/{UUID}/result.txt/", fixture("v3", "file_get"))
    fake.on("HEAD", f"/environments/{UNKNOWN_UUID}/", fixture("v3", "env_unknown"))
    s = sandbox(fake)
    assert s.check(UUID) == 226
    assert s.check(UUID, "result.txt") == 6
    assert s.check(UNKNOWN_UUID) == 0
    assert s.check("unknown") == 0  # not a uuid: 404 on every server, so not even asked
    assert [seen.method for seen in fake.seen] == ["HEAD", "HEAD", "HEAD"]


def test_check_raises_other_errors(fake: FakeSandbox) -> None:
    fake.on("HEAD", f"/environments/{UUID}/", reply(500, "boom"))
    with pytest.raises(Sandbox500):
        sandbox(fake).check(UUID)


def test_head_answer_with_a_body_does_not_spoil_the_next_request(fake: FakeSandbox) -> None:
    # The reference development server sends a body with HEAD answers (contract, "observed").
    head = {**fixture("v3", "file_get"), "head_body": True}
    fake.on("HEAD", f"/files/{UUID}/result.txt/", head)
    serve(fake, "v3")
    s = sandbox(fake)
    for _ in range(5):
        assert s.check(UUID, "result.txt") == 6
        assert s.specifications()["host"]["sandbox_version"] == "3.0.3"


# --- Errors ---------------------------------------------------------------------------------


def test_every_http_status_has_its_class() -> None:
    for status in http.HTTPStatus:
        if status >= 300:
            cls = getattr(client, f"Sandbox{status.value}")
            assert issubclass(cls, SandboxHTTPError) and cls.__name__ == f"Sandbox{status.value}"
            assert error_for_status(status.value) is cls
            assert f"Sandbox{status.value}" in client.__all__
    assert error_for_status(599) is SandboxHTTPError
    assert issubclass(SandboxHTTPError, SandboxError)
    assert issubclass(SandboxConfigError, ValueError)


def test_error_body_is_cut_to_200_characters(fake: FakeSandbox) -> None:
    fake.on("GET", "/specifications/", reply(502, "x" * 1000))
    with pytest.raises(SandboxHTTPError) as caught:
        sandbox(fake).specifications()
    assert "x" * 200 in str(caught.value) and "x" * 201 not in str(caught.value)


def test_bad_request_shows_the_server_reason(fake: FakeSandbox) -> None:
    fake.on("POST", "/execute/", fixture("v3", "error_bad_command"))
    with pytest.raises(Sandbox400, match="Command badly formatted"):
        sandbox(fake).execute({"commands": ["true"]})


def test_non_json_answer_is_a_protocol_error(fake: FakeSandbox) -> None:
    fake.on("GET", "/specifications/", reply(200, "<html>a proxy's page</html>"))
    fake.on("GET", "/libraries/", reply(200, ["a", "list"]))
    fake.on("POST", "/execute/", reply(200, "not json"))
    s = sandbox(fake)
    with pytest.raises(SandboxProtocolError, match=r"specifications/.*a proxy's page"):
        _ = s.cpu
    with pytest.raises(SandboxProtocolError, match="not an object"):
        _ = s.python3
    with pytest.raises(SandboxProtocolError, match="execute/"):
        s.execute({"commands": ["true"]})


def test_body_cut_short_is_a_protocol_error(fake: FakeSandbox) -> None:
    fake.on("GET", "/specifications/", reply(200, '{"sandbox_version": "3', cut=True))
    with pytest.raises(SandboxProtocolError, match="cut short"):
        sandbox(fake).specifications()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    s = Sandbox(url)
    for call in (lambda: s.sandbox_version, lambda: s.execute({"commands": ["true"]})):
        with pytest.raises(SandboxConnectionError) as caught:
            call()
        message = str(caught.value)
        assert url in message and "refused" in message.lower()
        assert "sandbox-kernel serve" in message and "SANDBOX_URL" in message


def test_read_timeout(fake: FakeSandbox) -> None:
    fake.on("GET", "/specifications/", reply(200, {}, hang=5))
    s = sandbox(fake, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(SandboxTimeout) as caught:
        s.specifications()
    assert time.monotonic() - start < 2  # not retried
    assert fake.url in str(caught.value) and "0.3 s" in str(caught.value)
    assert "timeout=" in str(caught.value)


def test_timeout_while_reading_the_body(fake: FakeSandbox) -> None:
    fake.on("GET", f"/environments/{UUID}/", reply(200, b"x" * 1000, stall=5))
    with pytest.raises(SandboxTimeout, match=r"0\.3 s"):
        sandbox(fake, timeout=0.3).download(UUID)


def test_invalid_url() -> None:
    for url in ("localhost:8000", "127.0.0.1", "ftp://host/", ""):
        with pytest.raises(SandboxConfigError, match="SANDBOX_URL"):
            Sandbox(url)


@pytest.mark.parametrize("token", ["two\nlines", " padded", ""])
def test_unsendable_token_is_refused_and_not_shown(token: str) -> None:
    with pytest.raises(SandboxConfigError, match="token") as caught:
        Sandbox("http://127.0.0.1:1", token=token)
    assert not token.strip() or token.strip() not in str(caught.value)


# --- execute --------------------------------------------------------------------------------


def parse_form(seen: Seen) -> dict[str, tuple[str | None, bytes]]:
    """``name -> (filename, content)`` of a multipart/form-data request."""
    head = f"Content-Type: {seen.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=policy.default).parsebytes(head + seen.body)
    assert isinstance(message, EmailMessage) and message.is_multipart()
    form = {}
    for part in message.iter_parts():
        assert isinstance(part, EmailMessage)
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(content, bytes)
        form[name] = (part.get_filename(), content)
    return form


def test_execute_sends_config_and_environment(fake: FakeSandbox) -> None:
    fake.on("POST", "/execute/", fixture("v2", "execute"))
    config = {"commands": ["echo $((2+2))"], "environ": {"A": 1}}
    tgz = make_tgz({"a.txt": b"a"})
    answer = sandbox(fake).execute(config, io.BytesIO(tgz))
    assert answer == fixture("v2", "execute")["body"]
    form = parse_form(fake.seen[0])
    assert json.loads(form["config"][1]) == config and form["config"][0] is None
    assert form["environment"] == ("environment.tgz", tgz)
    assert gzip.decompress(form["environment"][1])  # what was read is the archive itself


def test_execute_without_environment(fake: FakeSandbox) -> None:
    fake.on("POST", "/execute/", fixture("v3", "execute_save_result"))
    answer = sandbox(fake).execute({"commands": ["echo hello > result.txt"], "save": True})
    assert answer["environment"] == UUID
    assert set(parse_form(fake.seen[0])) == {"config"}


def test_execute_busy_then_success(fake: FakeSandbox) -> None:
    busy = reply(503, OVERLOADED_TEXT)
    fake.on("POST", "/execute/", busy, busy, fixture("v3", "execute_failing"))
    calls: list[tuple[int, float, float]] = []
    tgz = make_tgz({"a.txt": b"a"})
    s = sandbox(fake, on_busy=lambda *args: calls.append(args))
    answer = s.execute({"commands": ["echo before"]}, io.BytesIO(tgz))
    assert answer["status"] == 3
    assert [attempt for attempt, _, _ in calls] == [1, 2]
    (_, first, elapsed1), (_, second, elapsed2) = calls
    assert 0.125 <= first <= 0.25 and 0.25 <= second <= 0.5
    assert 0 <= elapsed1 < elapsed2
    assert fake.count("POST", "/execute/") == 3
    # The upload is sent again, whole, with every attempt.
    assert all(parse_form(seen)["environment"][1] == tgz for seen in fake.seen)


def test_execute_busy_budget_exhausted(fake: FakeSandbox) -> None:
    fake.on("POST", "/execute/", reply(503, OVERLOADED_TEXT))
    waits: list[float] = []
    s = sandbox(fake, busy_budget=60)
    start = time.monotonic()
    with pytest.raises(Sandbox503) as caught:
        s.execute(
            {"commands": ["true"]}, b"", busy_budget=0.6, on_busy=lambda a, w, e: waits.append(w)
        )
    assert time.monotonic() - start < 1.5
    assert fake.count("POST", "/execute/") >= 3
    assert len(waits) == fake.count("POST", "/execute/") - 1
    assert sum(waits) <= 0.6 + 1e-6
    error = caught.value
    assert error.status_code == 503 and isinstance(error, SandboxHTTPError)
    assert "stayed busy" in str(error) and "busy_budget" in str(error)
    assert "no container became free" in str(error)


def test_execute_500_is_not_retried(fake: FakeSandbox) -> None:
    fake.on("POST", "/execute/", reply(500, "internal error"), fixture("v2", "execute"))
    with pytest.raises(Sandbox500):
        sandbox(fake).execute({"commands": ["true"]})
    assert fake.count("POST", "/execute/") == 1


def test_execute_closed_connection_is_not_retried(fake: FakeSandbox) -> None:
    fake.on("POST", "/execute/", reply(close=True), fixture("v2", "execute"))
    with pytest.raises(SandboxConnectionError, match="may have run") as caught:
        sandbox(fake).execute({"commands": ["true"]})
    assert fake.url in str(caught.value)
    assert fake.count("POST", "/execute/") == 1


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"commands": []},
        {"commands": ["true"], "save": "yes"},
        {"commands": ["true"], "environ": ["A=1"]},
        {"commands": ["true"], "environment": 5},
        {"commands": [{"timeout": 1}]},
        ["true"],
    ],
)
def test_invalid_config_is_refused_before_any_request(fake: FakeSandbox, config: Any) -> None:
    ok, reason = validate(config)
    assert not ok and reason
    assert Sandbox.validate(config) == (ok, reason)
    with pytest.raises(SandboxConfigError, match="Nothing was sent") as caught:
        sandbox(fake).execute(config)
    assert isinstance(caught.value, ValueError) and reason in str(caught.value)
    assert fake.seen == []


def test_unreadable_environ_is_refused(fake: FakeSandbox) -> None:
    with pytest.raises(SandboxConfigError, match="binary file"):
        sandbox(fake).execute({"commands": ["true"]}, io.StringIO("text"))  # type: ignore[arg-type]
    assert fake.seen == []


def test_validate_accepts_a_good_config() -> None:
    assert validate({"commands": ["true", {"command": "-false", "timeout": 1}]}) == (True, "")


# --- Transport ------------------------------------------------------------------------------


def test_bearer_token_on_every_request(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    fake.on("POST", "/execute/", fixture("v2", "execute"))
    fake.on("HEAD", f"/environments/{UUID}/", fixture("v3", "env_head"))
    s = sandbox(fake, token="s3cret")
    s.specifications()
    s.check(UUID)
    s.execute({"commands": ["true"]})
    assert [seen.headers.get("Authorization") for seen in fake.seen] == ["Bearer s3cret"] * 3
    assert "s3cret" not in repr(s)


def test_no_token_no_header(fake: FakeSandbox) -> None:
    serve(fake, "v2")
    sandbox(fake).specifications()
    assert "Authorization" not in fake.seen[0].headers


def test_url_repr_and_context_manager(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    with Sandbox(fake.url + "//", timeout=5) as s:
        assert s.url == fake.url + "/"
        assert repr(s) == f"Sandbox({fake.url + '/'!r}, timeout=5)"
        assert s.sandbox_version == "3.0.3"
    assert fake.seen[0].path == "/specifications/"


def test_connections_are_reused(fake: FakeSandbox) -> None:
    serve(fake, "v3")
    s = sandbox(fake)
    for _ in range(3):
        s.specifications()
    assert len({seen.client_port for seen in fake.seen}) == 1


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({"status": 0, "execution": [{"exit_code": "x"}]}, r"execution\[0\]\.exit_code"),
        ({"status": 0, "execution": "abc"}, "execution"),
        ({"status": 0, "execution": ["abc"]}, r"execution\[0\]"),
        ({"status": "ok", "execution": []}, "status"),
        ({"status": 0, "environment": 5.5}, "environment"),
    ],
)
def test_a_malformed_execute_answer_names_its_field(
    fake: FakeSandbox, answer: dict[str, Any], field: str
) -> None:
    """What reads an execute/ answer (the session, run) can trust its types: a wrong one is
    one SandboxProtocolError naming the field, not a ValueError in a cell."""
    fake.on("POST", "/execute/", reply(200, answer))
    with pytest.raises(SandboxProtocolError, match=f"execute/ answered {field}"):
        sandbox(fake).execute({"commands": ["true"]})
    session = Session(sandbox(fake))
    outcome = session.run_cell("true")
    assert outcome.error is not None and "execute/ answered" in outcome.error.evalue
    assert outcome.error.ename != "InternalError" and session.environment is None
