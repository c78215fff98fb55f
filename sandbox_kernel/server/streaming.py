"""``execute/stream/``: one run over a WebSocket, its output sent as it is written and its
stdin fed by the client (docs/protocol-extensions.md, "WebSocket execute/stream/").

The run itself is the executor's (:class:`.executor.Runs`), with the hooks of its
:class:`.live.LiveControl`: the config is validated, the archive staged and unpacked, the slots,
time budget, output cap and ``save`` applied exactly as for ``execute/``; this module only moves
frames. Four tasks make a session once the two opening frames are in: the run, a listener for
the client's frames (stdin, end-of-file, stop; a close kills the run), the controls' watcher
(which tells the client when the run waits for input), and a sender that writes every frame in
order (chunks are queued from the pipes' read callbacks, which cannot wait for the socket). On a
cluster front the same session relays to a worker; with ``?events=queue`` it also sends the
front's ``{"queue": N}`` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import WSMsgType, web

from .. import protocol
from .executor import RUN_REFUSALS, refusal_answer
from .live import LiveControl, Refusal, RunHooks
from .uploads import Upload

if TYPE_CHECKING:
    from .executor import Runs
    from .settings import ServerSettings


class Front(Protocol):
    """What a stream needs of the HTTP application (:class:`~.app.SandboxApp`): the same
    admission of configs and archives as ``execute/``."""

    settings: ServerSettings
    executor: Runs

    def new_upload(self) -> Upload: ...
    def admit_config(self, raw_config: str) -> dict[str, Any] | web.Response: ...
    def too_large(self) -> web.Response: ...
    async def run(
        self,
        request: web.Request,
        config: dict[str, Any],
        archive: Path | None,
        hooks: RunHooks | None = None,
    ) -> dict[str, Any]: ...


log = logging.getLogger(__name__)

#: Room for a frame's own overhead beyond the config and archive caps.
_FRAME_SLACK = 64 * 1024


class StreamSession:
    """One ``execute/stream/`` connection, from the upgrade to the close."""

    def __init__(self, app: Front, request: web.Request) -> None:
        self.app = app
        self.request = request
        settings = app.settings
        self.ws = web.WebSocketResponse(
            max_msg_size=max(settings.max_upload, settings.max_config_bytes) + _FRAME_SLACK
        )
        self.outgoing: asyncio.Queue[str | None] = asyncio.Queue()
        #: Whether the client asked for ``{"queue": N}`` frames (a cluster front's).
        self.queue_events = protocol.QUEUE_EVENTS_QUERY in request.query_string.split("&")

    async def serve(self) -> web.StreamResponse:
        if not self.ws.can_prepare(self.request).ok:
            return web.Response(
                status=400,
                text="execute/stream/ is a WebSocket: connect with a WebSocket client "
                "(docs/protocol-extensions.md), or POST to execute/ instead.",
                content_type="text/plain",
            )
        await self.ws.prepare(self.request)
        upload = self.app.new_upload()
        try:
            opening = await self._opening(upload)
            if isinstance(opening, dict):
                await self._run(opening, upload)
            else:
                await self._send_now({"error": opening[0], "text": opening[1]})
        finally:
            await upload.discard()
            await self.ws.close()
        return self.ws

    # -- the two opening frames -----------------------------------------------------------------

    async def _opening(self, upload: Upload) -> dict[str, Any] | Refusal:
        """The checked config (its archive staged in ``upload``), or why nothing runs."""
        timeout = self.app.settings.header_timeout
        try:
            return await asyncio.wait_for(self._read_opening(upload), timeout)
        except asyncio.TimeoutError:  # the builtin one only from Python 3.11
            return (
                408,
                f"The config and archive frames did not come within {timeout:g} s "
                "(--header-timeout): nothing was run. Send both right after connecting.",
            )

    async def _read_opening(self, upload: Upload) -> dict[str, Any] | Refusal:
        settings = self.app.settings
        first = await self.ws.receive()
        if first.type != WSMsgType.TEXT:
            return _frame_refusal("The first frame must be the config", first)
        raw_config: str = first.data
        if len(raw_config.encode("utf-8", "surrogatepass")) > settings.max_config_bytes:
            return _refusal_of(self.app.too_large())
        config = self.app.admit_config(raw_config)
        if isinstance(config, web.Response):
            return _refusal_of(config)
        # The archive frame is held in memory until saved: it needs a staging place first.
        if not upload.reserve():
            return 503, protocol.OVERLOADED_TEXT
        second = await self.ws.receive()
        if second.type != WSMsgType.BINARY:
            return _frame_refusal("The second frame must be the environment archive", second)
        archive: bytes = second.data
        if len(archive) > settings.max_upload:
            return _refusal_of(self.app.too_large())
        if not archive:
            await upload.discard()
            return config
        path = upload.stage()
        assert path is not None  # reserved above
        await asyncio.to_thread(path.write_bytes, archive)
        return config

    # -- the run ----------------------------------------------------------------------------------

    async def _run(self, config: dict[str, Any], upload: Upload) -> None:
        live = self.app.executor.live(self._queue)
        if self.queue_events:
            live.hooks.on_queue = self._on_queue
        run = asyncio.ensure_future(self.app.run(self.request, config, upload.archive, live.hooks))
        listener = asyncio.ensure_future(self._listen(live))
        watcher = asyncio.ensure_future(live.watch())
        sender = asyncio.ensure_future(self._send_queued())
        try:
            await asyncio.wait({run, listener}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                self._queue(_final_message(run))
            else:  # the client went away or broke the protocol: the run is killed
                run.cancel()
                problem = listener.result()
                if problem is not None:
                    self._queue({"error": problem[0], "text": problem[1]})
            self.outgoing.put_nowait(None)
            await sender
        finally:
            for task in (run, listener, watcher, sender):
                task.cancel()
            await asyncio.gather(run, listener, watcher, sender, return_exceptions=True)

    def _on_queue(self, ahead: int) -> None:
        self._queue({protocol.QUEUE_FIELD: ahead})

    # -- frames from the client -----------------------------------------------------------------

    async def _listen(self, live: LiveControl) -> Refusal | None:
        """Until the client closes (None) or sends what it may not (the refusal)."""
        async for message in self.ws:
            if message.type != WSMsgType.TEXT:
                return _frame_refusal("After the archive, frames must be JSON text", message)
            problem = _client_frame(message.data, live)
            if problem is not None:
                return problem
        return None

    # -- frames to the client -------------------------------------------------------------------

    def _queue(self, message: dict[str, Any]) -> None:
        self.outgoing.put_nowait(json.dumps(message))

    async def _send_queued(self) -> None:
        while (frame := await self.outgoing.get()) is not None:
            if self.ws.closed:
                continue
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(frame)

    async def _send_now(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(json.dumps(message))


def _client_frame(data: str, live: LiveControl) -> Refusal | None:
    """One frame of the client after the archive, handed to the run's controls."""
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):  # a frame nested without end is no frame either
        frame = None
    if isinstance(frame, dict) and len(frame) == 1:
        if isinstance(frame.get("stdin"), str):
            return live.give_stdin(frame["stdin"].encode("utf-8", "replace"))
        if frame.get("eof") is True:
            live.end_stdin()
            return None
        if frame.get("stop") is True:
            live.stop()
            return None
    return (
        400,
        f"Unknown frame {data[:80]!r}: after the archive, send only "
        '{"stdin": "TEXT"}, {"eof": true} or {"stop": true}. The run was stopped.',
    )


def _final_message(run: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
    """The final object of a finished run: what ``execute/`` answers, or its error status."""
    error = run.exception()
    if error is None:
        return run.result()
    if isinstance(error, RUN_REFUSALS):
        status, text = refusal_answer(error)
        return {"error": status, "text": text}
    log.error("a streamed run failed", exc_info=error)
    return {"error": 500, "text": "The server failed while running the request; see its log."}


def _refusal_of(answer: web.Response) -> Refusal:
    return answer.status, answer.text or ""


def _frame_refusal(expected: str, message: Any) -> Refusal:
    kind = getattr(message.type, "name", str(message.type)).lower()
    return (
        400,
        f"{expected}, not a {kind} frame (docs/protocol-extensions.md): nothing more was run.",
    )
