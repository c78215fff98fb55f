"""The asyncio client (``AsyncSandbox``) against the embedded server and against little real
loopback servers that misbehave on purpose (busy, slow, hostile, PremierLangage-shaped).

Where both clients can meet the same situation, the test asserts that they raise the same
class with the same words: the async client shares everything but the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sandbox_kernel.archive import build_archive
from sandbox_kernel.async_client import AsyncSandbox, LiveRun, Output, StdinWanted
from sandbox_kernel.client import (
    Sandbox,
    Sandbox400,
    Sandbox401,
    Sandbox404,
    Sandbox503,
    SandboxAnswerTooLarge,
    SandboxConnectionError,
    SandboxError,
    SandboxProtocolError,
    SandboxTimeout,
)
from sandbox_kernel.protocol import OVERLOADED_TEXT, STOPPED_NOTE

from .conftest import Server
from .helpers import processes_matching, wait_until

FIXTURES = Path(__file__).parent / "fixtures"
UNKNOWN_UUID = "e8c5995b-7049-4b04-8440-5d9d914360fc"


def fixture_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / name).read_text())["body"]
    return body


def run(coroutine: Awaitable[Any]) -> Any:
    """One event loop per test, as the kernel has one."""

    async def main() -> Any:
        return await coroutine

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def loopback(app: web.Application) -> AsyncIterator[str]:
    """A real HTTP server on 127.0.0.1 in this test's loop; its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """An execute answer without what differs between two runs (times, uuids)."""
    kept = {k: v for k, v in answer.items() if k not in ("total_time", "environment", "expire")}
    kept["execution"] = [
        {k: v for k, v in step.items() if k != "time"} for step in answer.get("execution", [])
    ]
    return kept


def same_words(first: str, second: str) -> tuple[str, str]:
    """A message with its numbers blurred (elapsed times, ports of two attempts)."""
    return re.sub(r"[0-9]+(\.[0-9]+)?", "N", first), re.sub(r"[0-9]+(\.[0-9]+)?", "N", second)


async def both_raise(
    sync_call: Callable[[], Any], async_call: Awaitable[Any]
) -> tuple[BaseException, BaseException]:
    """The errors the sync client (in a thread) and the async one raise for one situation."""
    sync_error = async_error = None
    try:
        await asyncio.to_thread(sync_call)
    except SandboxError as error:
        sync_error = error
    try:
        await async_call
    except SandboxError as error:
        async_error = error
    assert sync_error is not None and async_error is not None, (sync_error, async_error)
    return sync_error, async_error


# --- execute/ and files against the embedded server ----------------------------------------


def test_execute_round_trip_equals_the_sync_client(server: Server, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("41\n")
    upload = build_archive([tmp_path / "input.txt"]).getvalue()
    config = {
        "commands": ["echo $(( $(cat input.txt) + 1 )) | tee out.txt", "echo oops >&2; exit 3"],
        "save": True,
    }

    async def scenario() -> tuple[dict[str, Any], int, int, bytes]:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            answer = await sandbox.execute(config, upload)
            uuid = answer["environment"]
            size = await sandbox.check(uuid, "out.txt")
            missing = await sandbox.check(uuid, "missing.txt")
            content = await sandbox.download(uuid, "out.txt", max_bytes=size)
            return answer, size, missing, content

    answer, size, missing, content = run(scenario())
    assert answer["execution"][0]["stdout"] == "42"
    assert answer["execution"][1]["exit_code"] == 3 and answer["execution"][1]["stderr"] == "oops"
    assert (size, missing, content) == (3, 0, b"42\n")
    with Sandbox(server.url, token=server.token) as sync:
        assert comparable(sync.execute(config, upload)) == comparable(answer)


def test_many_executes_reuse_one_connection(server: Server) -> None:
    async def scenario() -> set[int]:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            ports = set()
            for _ in range(5):
                await sandbox.execute({"commands": ["true"]})
                session = sandbox._http()
                connector = session.connector
                assert connector is not None
                ports |= {
                    proto.transport.get_extra_info("sockname")[1]
                    for key in connector._conns
                    for proto, _ in connector._conns[key]
                    if proto.transport is not None
                }
            return ports

    assert len(run(scenario())) == 1


def test_http_errors_equal_the_sync_client(server: Server) -> None:
    """400, 404 and 401: the same class and the same message from both clients."""

    async def scenario() -> None:
        sync = Sandbox(server.url, token=server.token)
        wrong_sync = Sandbox(server.url, token="wrong")
        async with (
            AsyncSandbox(server.url, token=server.token) as sandbox,
            AsyncSandbox(server.url, token="wrong") as wrong,
        ):
            cases = [
                (
                    lambda: sync.execute({"commands": ["true"]}, b"not a tgz"),
                    sandbox.execute({"commands": ["true"]}, b"not a tgz"),
                    Sandbox400,
                ),
                (lambda: sync.download(UNKNOWN_UUID), sandbox.download(UNKNOWN_UUID), Sandbox404),
                (
                    lambda: sync.download(UNKNOWN_UUID, "a b/ü.txt"),
                    sandbox.download(UNKNOWN_UUID, "a b/ü.txt"),
                    Sandbox404,
                ),
                (lambda: wrong_sync.specs(), wrong.specs(), Sandbox401),
                (
                    lambda: wrong_sync.execute({"commands": ["true"]}),
                    wrong.execute({"commands": ["true"]}),
                    Sandbox401,
                ),
            ]
            for sync_call, async_call, expected in cases:
                sync_error, async_error = await both_raise(sync_call, async_call)
                assert type(async_error) is type(sync_error) is expected
                assert str(async_error) == str(sync_error)
            assert await sandbox.check(UNKNOWN_UUID) == 0
            assert await sandbox.check("not-a-uuid") == 0
        sync.close()
        wrong_sync.close()

    run(scenario())


def test_unreachable_server_equals_the_sync_client(start_server: Callable[..., Server]) -> None:
    gone = start_server("--workers", "1")
    url, token = gone.url, gone.token
    gone.stop()

    async def scenario() -> None:
        sync = Sandbox(url, token=token)
        async with AsyncSandbox(url, token=token) as sandbox:
            for sync_call, async_call in [
                (
                    lambda: sync.execute({"commands": ["true"]}),
                    sandbox.execute({"commands": ["true"]}),
                ),
                (lambda: sync.specs(), sandbox.specs()),
            ]:
                sync_error, async_error = await both_raise(sync_call, async_call)
                assert type(async_error) is type(sync_error) is SandboxConnectionError
                strip = re.compile(r" \([^()]*(\([^()]*\)[^()]*)*\)\. ")
                assert strip.sub(" ", str(async_error)) == strip.sub(" ", str(sync_error))
                assert url in str(async_error) and "sandbox-kernel serve" in str(async_error)

    run(scenario())


def test_cancelled_execute_kills_the_run(server: Server) -> None:
    marker = "31.4159"  # in the command line of `sleep 31.4159` (NUL-separated)

    async def scenario() -> None:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            task = asyncio.ensure_future(sandbox.execute({"commands": [f"sleep {marker}"]}))
            started = await asyncio.to_thread(wait_until, lambda: bool(processes_matching(marker)))
            assert started, "the command never started on the server"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gone = await asyncio.to_thread(wait_until, lambda: not processes_matching(marker))
            assert gone, f"the run survived its cancelled request: {processes_matching(marker)}"
            # The client stays usable.
            answer = await sandbox.execute({"commands": ["echo after"]})
            assert answer["execution"][0]["stdout"] == "after"

    run(scenario())


# --- Faults the embedded server cannot produce ----------------------------------------------


def busy_app(busy_answers: int, body: dict[str, Any]) -> tuple[web.Application, list[str]]:
    """``execute/`` answered 503 ``busy_answers`` times, then 200 with ``body``."""
    seen: list[str] = []

    async def execute(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append(str(form["config"]))
        if len(seen) <= busy_answers:
            return web.Response(status=503, text=OVERLOADED_TEXT)
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/execute/", execute)
    return app, seen


def test_busy_execute_is_retried_until_a_container_is_free() -> None:
    body = fixture_body("v3/execute_failing.json")

    async def scenario() -> None:
        app, seen = busy_app(2, body)
        async with loopback(app) as url, AsyncSandbox(url) as sandbox:
            calls: list[tuple[int, float, float]] = []
            answer = await sandbox.execute(
                {"commands": ["echo before"]},
                on_busy=lambda attempt, wait, elapsed: calls.append((attempt, wait, elapsed)),
            )
            assert answer == body
            assert [attempt for attempt, _, _ in calls] == [1, 2]
            assert all(0 < wait <= 3 for _, wait, _ in calls)
            assert len(seen) == 3 and len(set(seen)) == 1  # the same config each time

    run(scenario())


def test_busy_budget_spent_equals_the_sync_client() -> None:
    async def scenario() -> None:
        app, _ = busy_app(1000, {})
        async with loopback(app) as url, AsyncSandbox(url, busy_budget=0.6) as sandbox:
            sync = Sandbox(url, busy_budget=0.6)
            sync_error, async_error = await both_raise(
                lambda: sync.execute({"commands": ["true"]}),
                sandbox.execute({"commands": ["true"]}),
            )
            assert type(async_error) is type(sync_error) is Sandbox503
            first, second = same_words(str(async_error), str(sync_error))
            assert first == second
            assert "stayed busy" in str(async_error) and "no container became free" in first
            sync.close()

    run(scenario())


def test_slow_server_times_out_as_the_sync_client() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(50):
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/specifications/", slow)
        app.router.add_get("/environments/{uuid}/", trickle)
        async with loopback(app) as url, AsyncSandbox(url, timeout=0.5) as sandbox:
            sync = Sandbox(url, timeout=0.5)
            cases: list[tuple[Callable[[], Any], Awaitable[Any]]] = [
                (sync.specs, sandbox.specs()),
                (lambda: sync.download(UNKNOWN_UUID), sandbox.download(UNKNOWN_UUID)),
            ]
            for sync_call, async_call in cases:
                start = time.monotonic()
                sync_error, async_error = await both_raise(sync_call, async_call)
                assert time.monotonic() - start < 2 * 2.5  # two deadlines of 0.5 s, 5x each
                assert type(async_error) is type(sync_error) is SandboxTimeout
                assert str(async_error) == str(sync_error)
            sync.close()

    run(scenario())


def hostile_answers() -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Answers of ``execute/`` that no sandbox gives, by name."""

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy login</html>")

    async def not_object(request: web.Request) -> web.Response:
        return web.json_response([1, 2])

    async def wrong_type(request: web.Request) -> web.Response:
        return web.json_response({"status": 0, "execution": [{"exit_code": "x"}]})

    async def too_large(request: web.Request) -> web.Response:
        return web.json_response({"status": 0, "padding": "x" * 5000})

    async def too_large_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"status": 0, "padding": "' + b"x" * 5000 + b'"}')
        return response

    async def compressed(request: web.Request) -> web.Response:
        return web.Response(
            body=b"\x1f\x8b\x08\x00", headers={"Content-Encoding": "gzip"}, content_type="text/x"
        )

    return {
        "not_json": not_json,
        "not_object": not_object,
        "wrong_type": wrong_type,
        "too_large": too_large,
        "too_large_chunked": too_large_chunked,
        "compressed": compressed,
    }


@pytest.mark.parametrize("name", sorted(hostile_answers()))
def test_hostile_execute_answers_equal_the_sync_client(name: str) -> None:
    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/execute/", hostile_answers()[name])
        async with loopback(app) as url, AsyncSandbox(url, max_json=1000) as sandbox:
            sync = Sandbox(url, max_json=1000)
            sync_error, async_error = await both_raise(
                lambda: sync.execute({"commands": ["true"]}),
                sandbox.execute({"commands": ["true"]}),
            )
            assert type(async_error) is type(sync_error)
            assert isinstance(async_error, SandboxProtocolError)
            assert str(async_error) == str(sync_error)
            if name.startswith("too_large"):
                assert isinstance(async_error, SandboxAnswerTooLarge)
            sync.close()

    run(scenario())


# --- Specifications and extensions ------------------------------------------------------------


def test_specs_and_extensions_of_the_embedded_server(server: Server) -> None:
    async def scenario() -> None:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            specs = await sandbox.specs()
            assert specs.generation == 3 and specs.execute_timeout is not None
            with Sandbox(server.url, token=server.token) as sync:
                assert specs == sync.specs()
            assert await sandbox.specs() is specs  # cached
            assert await sandbox.specs(refresh=True) == specs
            assert await sandbox.extensions() == {"stream", "stdin", "causes"}

    run(scenario())


@pytest.mark.parametrize(
    ("fixture", "extensions", "expected"),
    [
        ("v3/specifications.json", None, frozenset()),
        ("v2/specifications.json", None, frozenset()),
        ("v3/specifications.json", ["stream"], frozenset({"stream"})),
        ("v3/specifications.json", "stream", frozenset()),
        ("v3/specifications.json", [1, "stream"], frozenset()),
        ("v3/specifications.json", {"stream": True}, frozenset()),
    ],
)
def test_extensions_of_other_servers(
    fixture: str, extensions: Any, expected: frozenset[str]
) -> None:
    """PremierLangage servers name no extension; a malformed list is none either."""
    body = fixture_body(fixture)
    if extensions is not None:
        body["extensions"] = extensions

    async def specifications(request: web.Request) -> web.Response:
        return web.json_response(body)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/specifications/", specifications)
        async with loopback(app) as url, AsyncSandbox(url) as sandbox:
            assert await sandbox.extensions() == expected
            with Sandbox(url) as sync:
                assert await sandbox.specs() == await asyncio.to_thread(sync.specs)

    run(scenario())


# --- Streamed runs against the embedded server -----------------------------------------------


async def collect(run_: LiveRun) -> list[Output | StdinWanted]:
    return [event async for event in run_]


def joined(events: list[Output | StdinWanted], stream: str) -> str:
    return "".join(e.text for e in events if isinstance(e, Output) and e.stream == stream)


def test_stream_gives_lines_as_they_are_printed(server: Server) -> None:
    config = {"commands": ["for i in 1 2 3; do echo $i; sleep 0.4; done"]}

    async def scenario() -> None:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            arrivals: list[tuple[float, str]] = []
            async with sandbox.open_stream(config) as live:
                async for event in live:
                    assert isinstance(event, Output) and event.stream == "stdout"
                    arrivals.append((time.monotonic(), event.text))
            ended = time.monotonic()
            assert "".join(text for _, text in arrivals) == "1\n2\n3\n"
            assert ended - arrivals[0][0] > 0.6, "the first line came only at the end"
            assert live.answer["execution"][0]["stdout"] == "1\n2\n3".strip()

    run(scenario())


def test_stream_keeps_the_order_of_stdout_and_stderr(server: Server) -> None:
    command = "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; echo err2 >&2"

    async def scenario() -> None:
        async with (
            AsyncSandbox(server.url, token=server.token) as sandbox,
            sandbox.open_stream({"commands": [command]}) as live,
        ):
            events = await collect(live)
        assert [(e.stream, e.text) for e in events if isinstance(e, Output)] == [
            ("stdout", "out1\n"),
            ("stderr", "err1\n"),
            ("stdout", "out2\n"),
            ("stderr", "err2\n"),
        ]

    run(scenario())


def test_stream_answer_equals_execute(server: Server, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("x\n")
    upload = build_archive([tmp_path / "data.txt"]).getvalue()
    config = {
        "commands": ["cat data.txt; echo two", "echo warn >&2", "false", "echo never"],
        "environ": {"GREETING": "hi"},
    }

    async def scenario() -> None:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            plain = await sandbox.execute(config, upload)
            for archive in (upload, None):
                async with sandbox.open_stream(config, archive) as live:
                    events = await collect(live)
                expected = plain if archive else await sandbox.execute(config)
                assert comparable(live.answer) == comparable(expected)
            assert joined(events, "stderr").startswith("cat: data.txt")

    run(scenario())


@pytest.mark.parametrize(
    ("command", "prompt"),
    [
        ('read name; echo "hello $name"', ""),
        ('python3 -c \'print("hello", input("name? "))\'', "name? "),
    ],
)
def test_stream_stdin_round_trip(server: Server, command: str, prompt: str) -> None:
    async def scenario() -> None:
        async with (
            AsyncSandbox(server.url, token=server.token) as sandbox,
            sandbox.open_stream({"commands": [command]}) as live,
        ):
            events = []
            async for event in live:
                events.append(event)
                if isinstance(event, StdinWanted):
                    assert event.prompt == prompt
                    assert await live.send_stdin("Ada\n")
        assert sum(isinstance(e, StdinWanted) for e in events) == 1
        assert joined(events, "stdout") == f"{prompt}hello Ada\n"
        assert live.answer["execution"][0]["stdout"] == f"{prompt}hello Ada"
        assert not await live.send_stdin("late\n")  # after the end: ignored

    run(scenario())


def test_stream_eof_ends_a_reader(server: Server) -> None:
    async def scenario() -> None:
        async with (
            AsyncSandbox(server.url, token=server.token) as sandbox,
            sandbox.open_stream({"commands": ["cat; echo done"]}) as live,
        ):
            async for event in live:
                if isinstance(event, StdinWanted):
                    await live.send_stdin("line\n") if not seen else await live.send_eof()
                    seen.append(event)
        assert len(seen) == 2
        assert live.answer["execution"][0]["stdout"] == "line\ndone"

    seen: list[StdinWanted] = []
    run(scenario())


def test_stream_stop_keeps_the_output_and_ends(server: Server) -> None:
    async def scenario() -> None:
        async with (
            AsyncSandbox(server.url, token=server.token) as sandbox,
            sandbox.open_stream({"commands": ["echo started; sleep 30", "echo never"]}) as live,
        ):
            start = time.monotonic()
            async for event in live:
                if isinstance(event, Output) and event.text == "started\n":
                    assert await live.stop()
        assert time.monotonic() - start < 5 * 2.5  # SIGINT, SIGKILL 2 s later at worst
        execution = live.answer["execution"]
        assert len(execution) == 1
        assert execution[0]["stdout"] == "started"
        assert execution[0]["exit_code"] == 130
        assert execution[0]["stderr"].endswith(STOPPED_NOTE)

    run(scenario())


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_leaving_a_stream_early_kills_the_run(server: Server, how: str) -> None:
    """Leaving the block before the final object (a break, or the task cancelled: the stop
    button's last resort) closes the socket; the server kills the run."""
    marker = "27.1828" if how == "break" else "28.1828"

    def running() -> bool:
        return bool(processes_matching(marker))

    async def follow(live: LiveRun) -> None:
        async for _ in live:
            assert await asyncio.to_thread(wait_until, running), "no run to kill"
            if how == "break":
                break
            asyncio.current_task().cancel()  # type: ignore[union-attr]

    async def scenario() -> None:
        async with AsyncSandbox(server.url, token=server.token) as sandbox:
            live = sandbox.open_stream({"commands": [f"echo go; sleep {marker}"]})
            task = asyncio.ensure_future(_enter_and(live, follow))
            if how == "cancel":
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await task
            gone = await asyncio.to_thread(wait_until, lambda: not running())
            assert gone, "the run survived its closed stream"
            with pytest.raises(SandboxError, match="not ended"):
                live.answer  # noqa: B018
            answer = await sandbox.execute({"commands": ["echo still usable"]})
            assert answer["execution"][0]["stdout"] == "still usable"

    run(scenario())


async def _enter_and(live: LiveRun, body: Callable[[LiveRun], Awaitable[None]]) -> None:
    async with live:
        await body(live)


def test_stream_refusals_raise_the_classes_of_execute(server: Server) -> None:
    async def scenario() -> None:
        async with (
            AsyncSandbox(server.url, token=server.token) as sandbox,
            AsyncSandbox(server.url, token="wrong") as wrong,
        ):
            with pytest.raises(Sandbox400, match="Invalid environment archive"):
                async with sandbox.open_stream({"commands": ["true"]}, b"not a tgz") as live:
                    await collect(live)
            with pytest.raises(Sandbox401):
                async with wrong.open_stream({"commands": ["true"]}) as live:
                    await collect(live)

    run(scenario())


# --- Streams from a hostile WebSocket server ---------------------------------------------------

FINAL = {"status": 0, "execution": [{"exit_code": 0, "stdout": "", "stderr": "", "time": 0.1}]}


#: Script steps of :func:`stream_app`: wait for a frame of the client; send nothing until
#: the client leaves.
RECEIVE, SILENCE = "<receive>", "<silence>"


def stream_app(scripts: list[list[str | bytes]], received: list[list[Any]]) -> web.Application:
    """A WebSocket ``execute/stream/`` that plays one script of frames per connection (then
    closes), and records what the client sent and its headers."""

    async def stream(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=0)
        await socket.prepare(request)
        got: list[Any] = [dict(request.headers)]
        received.append(got)
        got.append(await socket.receive_str())
        got.append(await socket.receive_bytes())
        for frame in scripts[min(len(received), len(scripts)) - 1]:
            if frame == RECEIVE:
                got.append(json.loads(await socket.receive_str()))
            elif frame == SILENCE:  # until the client leaves
                with contextlib.suppress(asyncio.TimeoutError):
                    await socket.receive(timeout=5)
            elif isinstance(frame, bytes):
                await socket.send_bytes(frame)
            else:
                await socket.send_str(frame)
        await socket.close()
        return socket

    app = web.Application()
    app.router.add_get("/execute/stream/", stream)
    return app


def play(
    scripts: list[list[str | bytes]], **client: Any
) -> tuple[list[Output | StdinWanted], LiveRun, list[list[Any]]]:
    received: list[list[Any]] = []

    async def scenario() -> tuple[list[Output | StdinWanted], LiveRun]:
        async with (
            loopback(stream_app(scripts, received)) as url,
            AsyncSandbox(
                url,
                token="secret",
                timeout=client.pop("timeout", 60),
                max_json=client.pop("max_json", 1000),
            ) as sandbox,
            sandbox.open_stream({"commands": ["true"]}, **client) as live,
        ):
            return await collect(live), live

    events, live = run(scenario())
    return events, live, received


def test_hostile_stream_well_formed_script_is_read() -> None:
    events, live, received = play(
        [
            [
                json.dumps({"stream": "stdout", "text": "a"}),
                json.dumps({"stdin": "wanted", "prompt": "?"}),
                json.dumps(FINAL),
            ]
        ]
    )
    assert events == [Output("stdout", "a"), StdinWanted("?")]
    assert live.answer == FINAL
    headers, config, archive = received[0]
    assert headers["Authorization"] == "Bearer secret"
    assert "Origin" not in headers
    assert json.loads(config) == {"commands": ["true"]} and archive == b""


@pytest.mark.parametrize(
    ("frame", "names"),
    [
        ({"stream": "stdout", "text": "a", "extra": 1}, "'extra'"),
        ({"stream": "stdout", "text": 7}, "'text'"),
        ({"stream": "stdout", "text": None}, "'text'"),
        ({"stream": "stdlog", "text": "a"}, "'stream'"),
        ({"stream": "stdout"}, "'text'"),
        ({"stdin": "please", "prompt": ""}, "'stdin'"),
        ({"stdin": "wanted", "prompt": ["x"]}, "'prompt'"),
        ({"error": "503", "text": "busy"}, "'error'"),
        ({"hello": 1}, "no frame"),
        ([1, 2], "not an object"),
        ("[not json", "not JSON"),
        (b"\x00binary", "binary"),
        ({"status": 0, "execution": [{"exit_code": "x"}]}, "execution[0].exit_code"),
        ({"status": "ok"}, "status"),
    ],
)
def test_hostile_stream_frames_are_refused(frame: Any, names: str) -> None:
    raw = frame if isinstance(frame, bytes | str) else json.dumps(frame)
    with pytest.raises(SandboxProtocolError) as caught:
        play([[json.dumps({"stream": "stdout", "text": "fine"}), raw, json.dumps(FINAL)]])
    assert names in str(caught.value)
    assert "Check that" in str(caught.value)


def test_hostile_stream_large_frame_is_cut() -> None:
    big = json.dumps({"stream": "stdout", "text": "x" * 5000})
    with pytest.raises(SandboxAnswerTooLarge, match="1000 bytes"):
        play([[big, json.dumps(FINAL)]])


def test_silent_stream_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(SandboxTimeout, match="did not answer"):
        play([[json.dumps({"stream": "stdout", "text": "a"}), SILENCE]], timeout=0.5)
    assert time.monotonic() - start < 2.5


def test_waiting_for_the_user_does_not_count_against_the_deadline() -> None:
    """The client's deadline stands still between a stdin event and the reply: a user may
    type for longer than the timeout (the server's own budget still applies)."""
    received: list[list[Any]] = []
    script: list[str | bytes] = [json.dumps({"stdin": "wanted", "prompt": ""}), RECEIVE]
    script += [json.dumps({"stream": "stdout", "text": "got it"}), json.dumps(FINAL)]

    async def scenario() -> list[Output | StdinWanted]:
        async with (
            loopback(stream_app([script], received)) as url,
            AsyncSandbox(url, timeout=0.5) as sandbox,
            sandbox.open_stream({"commands": ["true"]}) as live,
        ):
            events = []
            async for event in live:
                events.append(event)
                if isinstance(event, StdinWanted):
                    await asyncio.sleep(1.2)  # the user types
                    await live.send_stdin("typed\n")
            return events

    events = run(scenario())
    assert events == [StdinWanted(""), Output("stdout", "got it")]
    assert received[0][3] == {"stdin": "typed\n"}


def test_hostile_stream_closed_before_the_final_object() -> None:
    with pytest.raises(SandboxConnectionError, match="ended before the run's final answer"):
        play([[json.dumps({"stream": "stdout", "text": "a"})]])


def test_stream_error_frames_raise_the_classes_of_execute() -> None:
    with pytest.raises(Sandbox404, match="no such environment"):
        play([[json.dumps({"error": 404, "text": "no such environment"})]])
    busy = json.dumps({"error": 503, "text": OVERLOADED_TEXT})
    calls: list[int] = []
    events, live, received = play(
        [[busy], [busy], [json.dumps({"stream": "stderr", "text": "b"}), json.dumps(FINAL)]],
        on_busy=lambda attempt, wait, elapsed: calls.append(attempt),
    )
    assert calls == [1, 2] and len(received) == 3
    assert events == [Output("stderr", "b")] and live.answer == FINAL
    with pytest.raises(Sandbox503, match="stayed busy"):
        play([[busy]], busy_budget=0.5)
    # Once output came, the run had started: a 503 then is not retried.
    with pytest.raises(Sandbox503):
        play([[json.dumps({"stream": "stdout", "text": "a"}), busy], [json.dumps(FINAL)]])
