"""Hostile streams: the live-cells extension (``execute/stream/``) attacked by class, from both
ends.

- A hostile client of the server: stdin sent faster than it is read, thousands of frames,
  frames nested without end, more streams at once than slots, a client gone mid-run with
  processes behind it. Each must end as the protocol's documented frame (413, 400, 503, a
  final object), with the server still serving and nothing of the run left alive.
- A hostile server of the kernel: ``stdin`` events without end, an end marker followed by
  megabytes, chunks far past ``max_output``. The kernel opens one input box at a time, shows
  at most ``max_output`` and ends the cell normally.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ..conftest import KernelSession, Server
from ..helpers import processes_matching, wait_until
from ..test_kernel_live import run_live
from .conftest import Hostile

OBSERVED = Path(__file__).parents[1] / "fixtures" / "observed" / "reference-3.0.3-responses.json"
MiB = 1 << 20


async def _stream(
    server: Server, config: dict[str, Any], send: Callable[[Any], Any] | None = None
) -> list[dict[str, Any]]:
    """Open ``execute/stream/``, send the config and an empty archive, then ``send(ws)``; the
    frames the server sent until it closed."""
    url = server.url.replace("http://", "ws://") + "execute/stream/"
    headers = {"Authorization": f"Bearer {server.token}"}
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        await ws.send_str(json.dumps(config))
        await ws.send_bytes(b"")
        if send is not None:
            await send(ws)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                frames.append(json.loads(message.data))
    return frames


def _stream_now(server: Server, config: dict[str, Any], send: Any = None) -> list[dict[str, Any]]:
    return asyncio.run(asyncio.wait_for(_stream(server, config, send), 60))


# -- a hostile client ------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_size", [64, 1024, 256 * 1024])
def test_stdin_faster_than_it_is_read_is_refused_at_a_mebibyte(
    trial: Callable[[Callable[[str], None]], None], hostile: Hostile, frame_size: int
) -> None:
    def case(marker: str) -> None:
        async def flood(ws: aiohttp.ClientWebSocketResponse) -> None:
            chunk = "y" * frame_size
            for _ in range(MiB // frame_size + 2):
                if ws.closed:
                    return
                await ws.send_str(json.dumps({"stdin": chunk}))

        frames = _stream_now(hostile.server, {"commands": [f"sleep 20; true {marker}"]}, flood)
        assert frames[-1].get("error") == 413, frames[-1]

    trial(case)


def test_thousands_of_frames_end_the_run_as_documented(
    trial: Callable[[Callable[[str], None]], None], hostile: Hostile
) -> None:
    def case(marker: str) -> None:
        async def many(ws: aiohttp.ClientWebSocketResponse) -> None:
            for index in range(3000):
                frame = [{"stdin": "x\n"}, {"eof": True}, {"stop": True}][index % 3]
                if ws.closed:
                    return
                await ws.send_str(json.dumps(frame))

        frames = _stream_now(
            hostile.server, {"commands": [f"cat > /dev/null; true {marker}"]}, many
        )
        assert "status" in frames[-1], frames[-1]  # the final object, stopped or not

    trial(case)


@pytest.mark.parametrize("depth", [100, 10_000, 100_000])
def test_frames_nested_without_end_are_a_400(
    trial: Callable[[Callable[[str], None]], None], hostile: Hostile, depth: int
) -> None:
    def case(marker: str) -> None:
        async def nested(ws: aiohttp.ClientWebSocketResponse) -> None:
            await ws.send_str("[" * depth + "]" * depth)

        frames = _stream_now(hostile.server, {"commands": [f"sleep 2; true {marker}"]}, nested)
        assert frames[-1].get("error") == 400, frames[-1]

    trial(case)


def test_more_streams_than_slots_are_answered_503_or_run(
    trial: Callable[[Callable[[str], None]], None], hostile: Hostile
) -> None:
    def case(marker: str) -> None:
        async def all_at_once() -> list[list[dict[str, Any]]]:
            config = {"commands": [f"sleep 1; true {marker}"]}
            return await asyncio.gather(*(_stream(hostile.server, config) for _ in range(16)))

        endings = [frames[-1] for frames in asyncio.run(asyncio.wait_for(all_at_once(), 60))]
        assert all("status" in end or end.get("error") == 503 for end in endings), endings
        assert any("status" in end for end in endings), "no stream ran at all"

    trial(case)


def test_a_client_gone_mid_run_leaves_no_process(
    trial: Callable[[Callable[[str], None]], None], hostile: Hostile
) -> None:
    def case(marker: str) -> None:
        async def leave(ws: aiohttp.ClientWebSocketResponse) -> None:
            await asyncio.sleep(1)
            await ws.close()

        command = f"(setsid sleep 60 {marker} &); sleep 60 {marker}"
        _stream_now(hostile.server, {"commands": [command]}, leave)
        assert wait_until(lambda: not processes_matching(marker), 10), "the run outlived its client"

    trial(case)


# -- a hostile server ----------------------------------------------------------------------------


class HostileStreamServer:
    """A real WebSocket server on loopback that names the stream extension and answers every
    streamed run with what ``script`` sends (then a final object)."""

    def __init__(self, script: Callable[[web.WebSocketResponse], Any]) -> None:
        self.script = script
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the hostile stream server did not start"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        specs = json.loads(OBSERVED.read_text())["specifications"]["body"]

        async def specifications(request: web.Request) -> web.Response:
            return web.json_response({**specs, "extensions": ["stream", "stdin"]})

        async def stream(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.receive()  # config
            await ws.receive()  # archive
            await self.script(ws)
            final = {"command": "x", "exit_code": 0, "stdout": "", "stderr": "", "time": 0.1}
            await ws.send_str(json.dumps({"status": 0, "execution": [final], "total_time": 0.1}))
            await ws.close()
            return ws

        app = web.Application()
        app.router.add_get("/specifications/", specifications)
        app.router.add_get("/execute/stream/", stream)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def hostile_stream_server() -> Iterator[Callable[..., HostileStreamServer]]:
    started: list[HostileStreamServer] = []

    def start(script: Callable[[web.WebSocketResponse], Any]) -> HostileStreamServer:
        started.append(HostileStreamServer(script))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.mark.parametrize("events", [2, 50, 2000])
def test_stdin_events_without_end_open_one_box_at_a_time(
    hostile_stream_server: Callable[..., HostileStreamServer],
    start_kernel: Callable[..., KernelSession],
    events: int,
) -> None:
    async def ask(ws: web.WebSocketResponse) -> None:
        for _ in range(events):
            await ws.send_str(json.dumps({"stdin": "wanted", "prompt": "again? "}))
        await asyncio.sleep(1)  # the one box is answered meanwhile

    fake = hostile_stream_server(ask)
    kernel = start_kernel(None, SANDBOX_URL=fake.url, SANDBOX_TOKEN="t")
    cell = run_live(kernel, "read x", answers=["first"], timeout=60)
    assert cell.reply["status"] == "ok", cell.reply
    assert len(cell.prompts) <= 2, f"{len(cell.prompts)} input boxes for {events} events"


@pytest.mark.parametrize(
    "tail",
    [
        "\x03" + "y" * (3 * MiB),  # an end marker, then megabytes: not the exit trap's
        "y" * (3 * MiB),  # no end marker at all
        ("\x03" + "y" * 1000) * 3000,  # end markers without end
    ],
    ids=["marker-then-megabytes", "no-marker", "many-markers"],
)
def test_output_past_max_output_is_cut_and_the_cell_ends(
    hostile_stream_server: Callable[..., HostileStreamServer],
    start_kernel: Callable[..., KernelSession],
    tail: str,
) -> None:
    async def flood(ws: web.WebSocketResponse) -> None:
        text = "\x02" + tail
        for start in range(0, len(text), 60_000):
            await ws.send_str(
                json.dumps({"stream": "stdout", "text": text[start : start + 60_000]})
            )

    fake = hostile_stream_server(flood)
    kernel = start_kernel(
        None, SANDBOX_URL=fake.url, SANDBOX_TOKEN="t", SANDBOX_MAX_OUTPUT="100000"
    )
    cell = run_live(kernel, "true", timeout=60)
    assert cell.reply["status"] == "ok", cell.reply
    assert len(cell.text("stdout")) <= 100_000
    assert "c.SandboxKernel.max_output" in cell.text("stderr")
