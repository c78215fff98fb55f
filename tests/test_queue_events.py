"""The client side of a sandbox cluster's protocol extension: queue events on
``execute/stream/?events=queue`` (asked only of a server naming ``queue``), the 502 of a run
the cluster lost (never sent again), and the workers of ``usages/`` in the panel.

The cluster's front is being written in parallel, and the single server cannot say "3 ahead of
you" nor lose a run: :class:`LittleFront` is a real aiohttp server on 127.0.0.1 that speaks as a
front does and relays every run to the real embedded server (fixture ``server``), so cells
really run, carry their environment and stream their output; what it adds is what a front adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sandbox_kernel._wire import QUEUE_ALLOWANCE, WorkerLoad, execute_deadline, stream_url
from sandbox_kernel.async_client import AsyncSandbox, Output
from sandbox_kernel.client import Sandbox, Sandbox502, SandboxProtocolError
from sandbox_kernel.protocol import (
    CLUSTER_LOST_STATUS,
    CLUSTER_LOST_TEXT,
    EXTENSION_QUEUE,
    QUEUE_EVENTS_QUERY,
    QUEUE_FIELD,
)
from sandbox_kernel.session.context import SandboxContext
from sandbox_kernel.views import render
from sandbox_kernel.views.panel import SandboxPanel

from .conftest import KernelSession, Server
from .test_panel import text_of, until, with_panel

StartKernel = Callable[..., KernelSession]

#: The queue positions the little front announces before each run (every ``GAP`` seconds).
POSITIONS = (3, 2, 1, 0)
GAP = 0.15
WORKERS: list[dict[str, Any]] = [
    {"name": "node-a-101", "slots": 2, "busy": 2, "cached_environments": 7},
    {"name": "node-b-202", "slots": 2, "busy": 1, "cached_environments": 0},
    {"name": "node-c-303", "slots": 4, "busy": 0, "cached_environments": 12},
]
#: What a proxy in between says when its upstream fails: a 502 that is not the cluster's.
PROXY_502 = "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"


class LittleFront:
    """A real HTTP and WebSocket server on 127.0.0.1, in a thread of its own, that answers as a
    cluster front: ``specifications/`` names ``queue`` and has ``cluster``, ``usages/`` has
    ``workers``, a stream opened with ``?events=queue`` gets ``{"queue": N}`` frames before its
    run. Runs are relayed to the real server (or lost, with the cluster's 502, in ``mode``
    ``"lost"``). Every request is recorded (method, path, query)."""

    def __init__(self, target: Server, *, advertise_queue: bool = True) -> None:
        self.target = target
        self.advertise_queue = advertise_queue
        #: ``"relay"``; ``"lost"`` (502 with the cluster's text, after the queue frames);
        #: ``"lost after output"`` (a chunk of output first); ``"proxy 502"`` (another 502).
        self.mode = "relay"
        #: The raw frames sent before a run: to a client that asked for them, or to any
        #: client when ``unsolicited``.
        self.queue_frames = [json.dumps({QUEUE_FIELD: n}) for n in POSITIONS]
        self.unsolicited = False
        #: A queue frame sent after the run's first frame (a front's race): stale.
        self.late_queue = False
        self.workers: Any = WORKERS
        self.requests: list[tuple[str, str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))

    def queries(self, path: str) -> list[str]:
        return [query for _, p, query in self.requests if p == path]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # -- the server ---------------------------------------------------------------------------

    async def _start(self) -> str:
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/specifications/", self._specifications)
        app.router.add_get("/usages/", self._usages)
        app.router.add_post("/execute/", self._execute)
        app.router.add_get("/execute/stream/", self._stream)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}/"

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._http.close()

    def _record(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path.lstrip("/"), request.query_string))

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        keep = ("Authorization", "Content-Type", "Accept-Encoding")
        return {name: request.headers[name] for name in keep if name in request.headers}

    async def _upstream_json(self, request: web.Request) -> dict[str, Any]:
        async with self._http.get(
            self.target.url + request.path.lstrip("/"), headers=self._upstream_headers(request)
        ) as answer:
            body: dict[str, Any] = await answer.json()
            return body

    async def _specifications(self, request: web.Request) -> web.Response:
        self._record(request)
        body = await self._upstream_json(request)
        if self.advertise_queue:
            body["extensions"] = [*body.get("extensions", []), EXTENSION_QUEUE]
            body["cluster"] = {"workers": 3, "slots": 8}
        return web.json_response(body)

    async def _usages(self, request: web.Request) -> web.Response:
        self._record(request)
        body = await self._upstream_json(request)
        if self.workers is not None:
            body["workers"] = self.workers
        return web.json_response(body)

    async def _execute(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.mode.startswith("lost"):
            return web.Response(status=CLUSTER_LOST_STATUS, text=CLUSTER_LOST_TEXT)
        if self.mode == "proxy 502":
            return web.Response(status=502, text=PROXY_502, content_type="text/html")
        return await self._relay(request)

    async def _forward(self, request: web.Request) -> web.Response:
        self._record(request)
        return await self._relay(request)

    async def _relay(self, request: web.Request) -> web.Response:
        async with self._http.request(
            request.method,
            self.target.url + request.path.lstrip("/"),
            data=await request.read(),
            headers=self._upstream_headers(request),
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            headers = {
                name: answer.headers[name]
                for name in ("Content-Type", "Content-Length")
                if name in answer.headers
            }
            return web.Response(status=answer.status, body=body, headers=headers)

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        socket = web.WebSocketResponse(max_msg_size=0)
        await socket.prepare(request)
        config = await socket.receive_str()
        archive = await socket.receive_bytes()
        asked = QUEUE_EVENTS_QUERY in request.query_string.split("&")
        if asked or self.unsolicited:
            for frame in self.queue_frames:
                await socket.send_str(frame)
                await asyncio.sleep(GAP)
        if self.mode == "lost after output":
            await socket.send_json({"stream": "stdout", "text": "partial\n"})
        if self.mode.startswith("lost"):
            await socket.send_json({"error": CLUSTER_LOST_STATUS, "text": CLUSTER_LOST_TEXT})
        elif self.mode == "proxy 502":
            await socket.send_json({"error": 502, "text": PROXY_502})
        else:
            await self._relay_stream(request, socket, config, archive)
        await socket.close()
        return socket

    async def _relay_stream(
        self, request: web.Request, client: web.WebSocketResponse, config: str, archive: bytes
    ) -> None:
        """The run on the real server's ``execute/stream/``: its frames to the client, the
        client's (stdin, eof, stop) to it, until it closes."""
        target = stream_url(self.target.url)
        headers = self._upstream_headers(request)
        async with self._http.ws_connect(target, headers=headers, max_msg_size=0) as upstream:
            await upstream.send_str(config)
            await upstream.send_bytes(archive)

            async def from_client() -> None:
                async for message in client:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await upstream.send_str(message.data)

            forward = asyncio.ensure_future(from_client())
            try:
                async for message in upstream:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await client.send_str(message.data)
                        if self.late_queue:
                            await client.send_json({QUEUE_FIELD: 5})
                            self.late_queue = False
            finally:
                forward.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await forward


@pytest.fixture
def front(server: Server) -> Iterator[LittleFront]:
    made = LittleFront(server)
    yield made
    made.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def streamed(
    url: str, token: str | None, command: str
) -> tuple[list[int], list[Output | Any], dict[str, Any]]:
    """One streamed run of ``command`` through a fresh client (specifications fetched first,
    as the kernel does): the queue positions told, the events, the final answer."""
    positions: list[int] = []
    async with AsyncSandbox(url, token=token) as sandbox:
        await sandbox.extensions()
        config = {"commands": [command]}
        async with sandbox.open_stream(config, on_queue=positions.append) as live:
            events = [event async for event in live]
            return positions, events, live.answer


# -- the client ------------------------------------------------------------------------------


def test_a_front_s_queue_positions_reach_on_queue_then_the_run_streams(
    front: LittleFront, server: Server
) -> None:
    positions, events, answer = run(streamed(front.url, server.token, "echo one; echo two"))
    assert positions == list(POSITIONS)
    assert all(isinstance(event, Output) for event in events), events
    assert "".join(event.text for event in events) == "one\ntwo\n"
    assert answer["status"] == 0 and answer["execution"][0]["stdout"] == "one\ntwo"
    assert front.queries("execute/stream/") == [QUEUE_EVENTS_QUERY]


def test_no_query_to_a_server_without_the_extension_which_works_unchanged(
    server: Server,
) -> None:
    """A server that does not name ``queue`` (the single server, seen through a relay that
    records the query; and the single server itself) never gets ``?events=queue``."""
    relay = LittleFront(server, advertise_queue=False)
    try:
        positions, events, answer = run(streamed(relay.url, server.token, "echo plain"))
        assert relay.queries("execute/stream/") == [""]
        assert positions == [] and answer["execution"][0]["stdout"] == "plain"
    finally:
        relay.close()
    positions, events, answer = run(streamed(server.url, server.token, "echo direct"))
    assert positions == [] and events == [Output("stdout", "direct\n")]
    assert answer["status"] == 0
    with Sandbox(server.url, token=server.token) as sync:
        assert EXTENSION_QUEUE not in sync.specs().extensions
        assert sync.execute({"commands": ["echo sync"]})["execution"][0]["stdout"] == "sync"


def test_a_position_told_after_the_run_started_is_ignored(
    front: LittleFront, server: Server
) -> None:
    front.late_queue = True
    positions, events, answer = run(streamed(front.url, server.token, "echo a; sleep 0.3; echo b"))
    assert positions == list(POSITIONS), "nothing told once the output came"
    assert "".join(event.text for event in events) == "a\nb\n"
    assert answer["status"] == 0 and not front.late_queue


def test_the_query_needs_known_specifications_and_adds_no_request(
    front: LittleFront, server: Server
) -> None:
    """The specifications already fetched decide: a client that has not fetched them does
    not ask (and fetches nothing for it); one that has asks on every run without a new
    ``specifications/``."""

    async def scenario() -> None:
        async with AsyncSandbox(front.url, token=server.token) as sandbox:
            async with sandbox.open_stream({"commands": ["true"]}) as live:
                [event async for event in live]
            assert front.count("GET", "specifications/") == 0
            await sandbox.extensions()
            for _ in range(2):
                async with sandbox.open_stream({"commands": ["true"]}) as live:
                    [event async for event in live]

    run(scenario())
    assert front.queries("execute/stream/") == ["", QUEUE_EVENTS_QUERY, QUEUE_EVENTS_QUERY]
    assert front.count("GET", "specifications/") == 1


@pytest.mark.parametrize(
    ("frame", "names"),
    [
        ({"queue": -1}, "-1"),
        ({"queue": "3"}, "'3'"),
        ({"queue": True}, "True"),
        ({"queue": 1.5}, "1.5"),
        ({"queue": None}, "None"),
        ({"queue": 2, "eta": 10}, "'eta'"),
    ],
)
def test_malformed_queue_frames_stop_the_run(
    front: LittleFront, server: Server, frame: Any, names: str
) -> None:
    front.queue_frames = [json.dumps({"queue": 1}), json.dumps(frame)]
    with pytest.raises(SandboxProtocolError) as caught:
        run(streamed(front.url, server.token, "echo never"))
    assert names in str(caught.value) and "'queue'" in str(caught.value)
    assert "Check that" in str(caught.value)


def test_queue_frames_the_client_did_not_ask_for_are_refused(server: Server) -> None:
    """A server that sends queue frames without naming ``queue`` (so, unasked) breaks the
    protocol: refused, as every frame an older client does not know."""
    rogue = LittleFront(server, advertise_queue=False)
    rogue.unsolicited = True
    try:
        with pytest.raises(SandboxProtocolError, match="did not ask for"):
            run(streamed(rogue.url, server.token, "echo never"))
    finally:
        rogue.close()


def test_a_front_s_deadline_allows_the_queue_wait() -> None:
    assert execute_deadline(60, 60, queued=True) == execute_deadline(60, 60) + QUEUE_ALLOWANCE
    assert execute_deadline(5, None, queued=True) == 5 + QUEUE_ALLOWANCE
    assert stream_url("http://h:1/", queue_events=True) == "ws://h:1/execute/stream/?events=queue"
    assert stream_url("https://h/") == "wss://h/execute/stream/"


# -- 502: lost, never sent again -------------------------------------------------------------


def assert_lost_said(error: BaseException) -> None:
    text = str(error)
    assert "the cluster lost this request; it may have run" in text
    assert "did not send it again" in text and "check what its commands did" in text


@pytest.mark.parametrize("mode", ["lost", "lost after output"])
def test_a_lost_stream_is_said_and_not_sent_again(
    front: LittleFront, server: Server, mode: str
) -> None:
    front.mode = mode
    with pytest.raises(Sandbox502) as caught:
        run(streamed(front.url, server.token, "echo once"))
    assert_lost_said(caught.value)
    assert front.count("GET", "execute/stream/") == 1
    assert front.count("POST", "execute/") == 0


def test_a_lost_execute_is_said_and_not_sent_again_by_either_client(
    front: LittleFront, server: Server
) -> None:
    front.mode = "lost"
    with Sandbox(front.url, token=server.token) as sync, pytest.raises(Sandbox502) as caught:
        sync.execute({"commands": ["echo once"]})
    assert_lost_said(caught.value)
    assert front.count("POST", "execute/") == 1

    async def scenario() -> None:
        async with AsyncSandbox(front.url, token=server.token) as sandbox:
            await sandbox.execute({"commands": ["echo once"]})

    with pytest.raises(Sandbox502) as caught:
        run(scenario())
    assert_lost_said(caught.value)
    assert front.count("POST", "execute/") == 2


def test_another_502_is_not_sent_again_either(front: LittleFront, server: Server) -> None:
    """A proxy's own 502 (not the cluster's text): not retried, and not worded as lost."""
    front.mode = "proxy 502"
    with Sandbox(front.url, token=server.token) as sync, pytest.raises(Sandbox502) as caught:
        sync.execute({"commands": ["echo once"]})
    assert "may have run" in str(caught.value) and "cluster lost" not in str(caught.value)
    with pytest.raises(Sandbox502):
        run(streamed(front.url, server.token, "echo once"))
    assert front.count("POST", "execute/") == 1
    assert front.count("GET", "execute/stream/") == 1


def test_the_sync_front_ends_say_a_lost_cell_and_keep_the_environment(
    front: LittleFront, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IPython's ``%%sandbox`` and ``run`` (the session's ``run_cell``, plain ``execute/``)."""
    context = context_on(front.url, server.token, tmp_path, monkeypatch)
    try:
        session = context.session
        assert session.run_cell("x=1; echo data > f").ok
        saved = session.environment
        front.mode = "lost"
        lost = session.run_cell("x=2; echo changed > f")
        assert lost.error is not None and lost.error.ename == "SandboxClusterLost"
        assert lost.error.evalue == CLUSTER_LOST_TEXT
        assert saved is not None and saved in " ".join(lost.error.advice)
        assert front.count("POST", "execute/") == 2, "the lost cell was sent once"
        assert session.environment == saved
        front.mode = "relay"
        after = session.run_cell("echo $x; cat f")
        assert after.ok and after.stdout == "1\ndata\n"
    finally:
        context.close()


# -- the kernel --------------------------------------------------------------------------------


def shown_lines(outputs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(message type, what it shows) of a cell's outputs, in order."""
    shown = []
    for message in outputs:
        kind, content = message["msg_type"], message["content"]
        if kind in ("display_data", "update_display_data"):
            shown.append((kind, content["data"].get("text/plain", "")))
        elif kind == "stream":
            shown.append((kind, content["text"]))
        else:
            shown.append((kind, ""))
    return shown


@pytest.mark.slow  # starts a kernel
def test_the_kernel_shows_ahead_of_you_then_the_output(
    front: LittleFront, server: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(None, SANDBOX_URL=front.url, SANDBOX_TOKEN=server.token or "")
    cell = kernel.run("echo hello")
    assert cell.status == "ok", cell.reply
    shown = shown_lines(cell.outputs)
    assert shown[:5] == [
        ("display_data", "[sandbox] 3 ahead of you in the queue…"),
        ("update_display_data", "[sandbox] 2 ahead of you in the queue…"),
        ("update_display_data", "[sandbox] 1 ahead of you in the queue…"),
        ("update_display_data", "[sandbox] next in the queue…"),
        ("clear_output", ""),
    ], shown
    assert shown[5:] == [("stream", "hello\n")], shown
    ids = {
        m["content"]["transient"]["display_id"] for m in cell.outputs if "display" in m["msg_type"]
    }
    assert len(ids) == 1, "one line, updated in place"
    assert front.queries("execute/stream/") == [QUEUE_EVENTS_QUERY]


@pytest.mark.slow  # starts a kernel
def test_the_kernel_says_a_lost_cell_and_keeps_the_last_saved_environment(
    front: LittleFront, server: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(None, SANDBOX_URL=front.url, SANDBOX_TOKEN=server.token or "")
    first = kernel.run("x=1; echo data > f")
    assert first.status == "ok", first.reply
    front.mode = "lost"
    streams_before = front.count("GET", "execute/stream/")
    lost = kernel.run("x=2; echo changed > f")
    assert lost.status == "error"
    assert lost.reply["ename"] == "SandboxClusterLost"
    assert lost.reply["evalue"] == CLUSTER_LOST_TEXT
    advice = " ".join(lost.reply["traceback"])
    assert "did not run the cell again" in advice and "environment of the last good cell" in advice
    assert front.count("GET", "execute/stream/") == streams_before + 1, "sent once"
    assert [m["content"]["ename"] for m in lost.outputs if m["msg_type"] == "error"] == [
        "SandboxClusterLost"
    ]
    assert not any(t == "display_data" and "ahead" in s for t, s in shown_lines(lost.outputs)[-1:])
    front.mode = "relay"
    after = kernel.run("echo $x; cat f")
    assert after.status == "ok", after.reply
    assert after.stdout == "1\ndata\n"


# -- the panel and %sandbox_usage ----------------------------------------------------------------


def context_on(url: str, token: str | None, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(folder)
    return SandboxContext(url, token)


def test_the_panel_shows_each_worker_and_the_total(
    front: LittleFront, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_on(front.url, server.token, tmp_path, monkeypatch)

    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: bool(panel.workers.value), what="the workers")
        shown = text_of(panel.workers.value)
        assert "Sandbox cluster: 3 workers, 3/8 slots busy" in shown
        for row in ("node-a-101 2/2 7", "node-b-202 1/2 0", "node-c-303 0/4 12",
                    "total (3 workers) 3/8 19"):  # fmt: skip
            assert row in shown, (row, shown)

    try:
        with_panel(context, scenario, interval=0.5)
        sample = context.load_sample()
        assert sample.workers == tuple(WorkerLoad(**worker) for worker in WORKERS)
    finally:
        context.close()


def test_the_panel_is_unchanged_on_a_single_server(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_on(server.url, server.token, tmp_path, monkeypatch)

    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: len(panel.history) >= 2, what="two load samples")
        assert panel.workers.value == ""

    try:
        with_panel(context, scenario, interval=0.3)
        assert context.load_sample().workers is None
    finally:
        context.close()


@pytest.mark.parametrize(
    ("workers", "names"),
    [
        ("three", "workers = 'three'"),
        ([["node", 2, 1, 0]], "workers[0] ="),
        ([{"name": 7, "slots": 2, "busy": 1, "cached_environments": 0}], "workers[0].name"),
        ([{"name": "n", "slots": 2, "busy": -1, "cached_environments": 0}], "workers[0].busy"),
        ([{"name": "n", "slots": "2", "busy": 1, "cached_environments": 0}], "workers[0].slots"),
        ([{"name": "n", "slots": 2, "busy": 1}], "workers[0].cached_environments"),
    ],
)
def test_malformed_workers_are_a_protocol_error_naming_the_field(
    front: LittleFront,
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: Any,
    names: str,
) -> None:
    front.workers = workers
    context = context_on(front.url, server.token, tmp_path, monkeypatch)
    try:
        with pytest.raises(SandboxProtocolError, match="usages/ answered") as caught:
            context.load_sample()
        assert names in str(caught.value)
    finally:
        context.close()


def test_many_workers_are_cut_in_the_table_but_counted_in_the_total() -> None:
    many = [WorkerLoad(f"w{i}", 2, 1, i) for i in range(render.WORKER_ROWS + 5)]
    shown = render.workers_table(many)["text/plain"]
    assert "w0 " in shown and f"w{render.WORKER_ROWS + 4}" not in shown
    assert "… 5 more" in shown
    total = render.WORKER_ROWS + 5
    assert f"total ({total} workers)  {total}/{2 * total}" in shown
    hostile = render.workers_table([WorkerLoad("<b>x</b>", 1, 0, 0)])["text/html"]
    assert "<b>x</b>" not in hostile and "&lt;b&gt;x&lt;/b&gt;" in hostile
