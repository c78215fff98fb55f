"""The I/O-free parts of the asyncio client: frames of ``execute/stream/``, the WebSocket
address and the words of its errors (in ``_wire``, shared with the sync client), the multipart
body and the answer adapter. (The client itself is exercised over loopback in
``tests/test_async_client.py``.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sandbox_kernel._errors import Sandbox404, SandboxConfigError, SandboxProtocolError
from sandbox_kernel._generations import Specs, read_specs
from sandbox_kernel._generations._schema import checked
from sandbox_kernel._wire import (
    STREAM_METHOD,
    Cap,
    ErrorFrame,
    Output,
    StdinWanted,
    announced_too_large,
    download_cap,
    execute_form,
    json_cap,
    json_object,
    raise_for_status,
    read_frame,
    stream_url,
    timeout_message,
)
from sandbox_kernel.async_client import AioAnswer, AsyncSandbox, multipart
from sandbox_kernel.protocol import EXECUTE_STREAM, SPECIFICATIONS

BASE = "http://127.0.0.1:1/"
OBSERVED = Path(__file__).parents[1] / "fixtures" / "observed" / "reference-3.0.3-responses.json"


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"stream": "stdout", "text": "a\n"}, Output("stdout", "a\n")),
        ({"stream": "stderr", "text": ""}, Output("stderr", "")),
        ({"stdin": "wanted", "prompt": "n? "}, StdinWanted("n? ")),
        ({"error": 503, "text": "busy"}, ErrorFrame(503, "busy")),
        ({"status": 0, "execution": []}, {"status": 0, "execution": []}),
    ],
)
def test_frames_of_the_protocol_are_read(frame: dict[str, Any], expected: object) -> None:
    assert read_frame(json.dumps(frame), "ws://x/", BASE) == expected


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ('{"stream": "stdout", "text": "a", "color": "red"}', "'color'"),
        ('{"stream": "stdout", "text": 1}', "'text'"),
        ('{"stream": "stdout", "text": {"a": 1}}', "'text'"),
        ('{"stream": 1, "text": "a"}', "'stream'"),
        ('{"stream": "stdin", "text": "a"}', "'stream'"),
        ('{"stdin": "wanted"}', "'prompt'"),
        ('{"stdin": true, "prompt": ""}', "'stdin'"),
        ('{"error": true, "text": ""}', "'error'"),
        ('{"error": 200, "text": ""}', "'error'"),
        ('{"error": 503, "text": 5}', "'text'"),
        ('{"error": 503}', "'text'"),
        ('{"status": 0, "execution": [{"stdout": 5}]}', "execution[0].stdout"),
        ('{"status": 0.5}', "status"),
        ('{"nothing": 1}', "no frame"),
        ("[]", "not an object"),
        ("null", "not an object"),
        ("{", "not JSON"),
        ('{"stream": "stdout", "text": NaN}', "'text'"),
    ],
)
def test_hostile_frames_name_what_is_wrong(raw: str, named: str) -> None:
    with pytest.raises(SandboxProtocolError) as caught:
        read_frame(raw, "ws://x/", BASE)
    assert named in str(caught.value)
    assert BASE in str(caught.value)


def test_a_long_hostile_frame_is_quoted_short() -> None:
    with pytest.raises(SandboxProtocolError) as caught:
        read_frame("[" + "1," * 10_000 + "1]", "ws://x/", BASE)
    assert len(str(caught.value)) < 600


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/execute/stream/"),
        ("https://sandbox.example/", "wss://sandbox.example/execute/stream/"),
        ("https://example.org/sandbox/", "wss://example.org/sandbox/execute/stream/"),
        ("http://[::1]:9/", "ws://[::1]:9/execute/stream/"),
    ],
)
def test_stream_url_follows_the_scheme(base: str, expected: str) -> None:
    assert stream_url(base) == expected
    assert stream_url(base).endswith(EXECUTE_STREAM)  # the path the server routes


@pytest.mark.parametrize(
    ("told", "expected"),
    [
        (None, frozenset()),
        (["stream", "stdin"], frozenset({"stream", "stdin"})),
        ("stream", frozenset()),
        ([1], frozenset()),
        ({"stream": 1}, frozenset()),
    ],
)
def test_extensions_absent_or_malformed_are_none(told: object, expected: frozenset[str]) -> None:
    specifications = {} if told is None else {"extensions": told}
    assert _specs(specifications).extensions == expected


@pytest.mark.parametrize(
    ("told", "expected"),
    [
        (None, None),
        ("0123456789abcdef", "0123456789abcdef"),
        ("../../x", None),
        ("short", None),
        (["0123456789abcdef"], None),
        ("x" * 200, None),
    ],
)
def test_a_server_id_is_a_token_or_nothing(told: object, expected: str | None) -> None:
    specifications = {} if told is None else {"server_id": told}
    assert _specs(specifications).server_id == expected


def _specs(extra: dict[str, object]) -> Specs:
    """Typed facts of the public server's observed specifications/ plus ``extra``."""
    observed = json.loads(OBSERVED.read_text())["specifications"]["body"]
    return read_specs(checked(SPECIFICATIONS, {**observed, **extra}, BASE))


def test_multipart_body_is_read_by_aiohttp_as_the_server_does() -> None:
    archive = bytes(range(256)) * 4 + b"\r\n--"
    body, content_type = multipart(execute_form({"commands": ["echo é"]}, archive))
    seen: dict[str, Any] = {}

    async def execute(request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["environment"]
        assert isinstance(upload, web.FileField)
        seen.update(
            config=form["config"],
            archive=upload.file.read(),
            name=upload.filename,
            type=upload.content_type,
        )
        return web.json_response({"status": 0})

    async def scenario() -> dict[str, Any]:
        app = web.Application()
        app.router.add_post("/execute/", execute)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
            async with AsyncSandbox(url) as sandbox:
                return await sandbox.execute({"commands": ["echo é"]}, archive)
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()) == {"status": 0}
    assert json.loads(seen["config"]) == {"commands": ["echo é"]}
    assert seen["archive"] == archive
    assert (seen["name"], seen["type"]) == ("environment.tgz", "application/gzip")
    assert content_type.startswith("multipart/form-data; boundary=")
    assert body.endswith(b"--\r\n")


def test_answer_adapter_gives_the_errors_their_words() -> None:
    answer = AioAnswer(404, "Not Found", BASE + "files/x/", b"gone\n", {}, "GET", "latin-1")
    with pytest.raises(Sandbox404) as caught:
        raise_for_status(answer)
    assert str(caught.value).startswith(f"The sandbox answered 404 Not Found to GET {BASE}files/x/")
    assert "'gone'" in str(caught.value)
    assert AioAnswer(200, None, BASE, b"\xe9", {}, "GET", "x-unknown").text == "\ufffd"


@pytest.mark.parametrize(
    "arguments",
    [
        {"url": "localhost:7000"},
        {"url": BASE, "token": " spaced "},
        {"url": BASE, "token": "a\nb"},
        {"url": BASE, "timeout": 0},
        {"url": BASE, "max_json": -1},
    ],
)
def test_unusable_arguments_are_refused_before_any_request(arguments: dict[str, Any]) -> None:
    with pytest.raises(SandboxConfigError):
        AsyncSandbox(**arguments)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b"null", "JSON but not an object"),
        (b"[]", "JSON but not an object"),
        (b'"ok"', "JSON but not an object"),
        (b"5", "JSON but not an object"),
        (b"<html>nginx</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"", "not JSON"),
    ],
)
def test_a_body_that_is_no_json_object_says_which(body: bytes, what: str) -> None:
    answer = AioAnswer(200, "OK", BASE + "specifications/", body, {}, "GET")
    with pytest.raises(SandboxProtocolError) as caught:
        json_object(answer, BASE)
    message = str(caught.value)
    assert f"a body that is {what}:" in message
    assert f"GET {BASE}specifications/ answered 200" in message and "proxy" in message


def test_a_streamed_run_past_its_deadline_reads_as_a_run() -> None:
    url = stream_url(BASE)
    message = timeout_message(STREAM_METHOD, url, 2.5, "SANDBOX_TIMEOUT")
    assert message.startswith(f"The streamed run at {url} did not answer within 2.5 s")
    assert "waited for stdin" in message and "stopped" in message
    assert "allow more time: SANDBOX_TIMEOUT" in message
    assert STREAM_METHOD not in message  # no "did not answer WebSocket within"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_requests_past_their_deadline_keep_their_words(method: str) -> None:
    message = timeout_message(method, BASE, 3, "SETTING")
    assert message.startswith(f"The sandbox at {BASE} did not answer {method} within 3 s")
    assert "allow more time: SETTING" in message
    assert ("cannot cancel them" in message) == (method == "POST")


@pytest.mark.parametrize(
    ("cap", "advice"),
    [
        (json_cap(100), "max_json=..."),
        (download_cap(100, None), "max_download=..."),
        (download_cap(7, 100), "download it again"),
    ],
)
def test_a_cap_names_its_limit_and_its_advice(cap: Cap, advice: str) -> None:
    message = str(announced_too_large(f"GET {BASE}x/", 10**9, cap, BASE))
    assert f"announced {10**9} bytes" in message and f"more than the {cap.limit}" in message
    assert advice in message
    assert "{base}" not in message and BASE in message


def test_the_asyncio_transport_stands_on_wire_alone() -> None:
    """The kernel's transport does not load the sync client (nor ``requests``): both sit on
    ``_wire``, and the kernel's imports keep working."""
    probe = (
        "import sys\n"
        "from sandbox_kernel.async_client import AsyncSandbox, LiveRun, Output, StdinWanted\n"
        "from sandbox_kernel import _wire\n"
        "assert Output is _wire.Output and StdinWanted is _wire.StdinWanted\n"
        "print(sorted(m for m in sys.modules if m in ('requests', 'sandbox_kernel.client')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
