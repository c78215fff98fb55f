"""The WebSocket ``execute/stream/`` of the embedded server (docs/protocol-extensions.md), over
loopback with aiohttp's client, against real server processes: output arrives while the run
goes on, stdin reaches bash, Python and C programs when they ask for it, stop keeps what was
done, the output cap counts streamed text, a client that leaves kills its run, and the same
checks as ``execute/`` refuse the upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from .conftest import Server, processes_matching, wait_until
from .helpers import member, tgz

_T = TypeVar("_T")

#: Reading one frame never takes longer than this in these tests (the runs are short).
FRAME_TIMEOUT = 30.0

ADD_C = r"""
#include <stdio.h>
int main(void) {
    int a, b;
    printf("a b? ");
    if (scanf("%d %d", &a, &b) != 2) return 1;
    printf("%d\n", a + b);
    return 0;
}
"""

LINES_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (int i = 1; i <= 4; i++) { printf("line %d\n", i); usleep(400000); }
    return 0;
}
"""


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


class Stream:
    """One ``execute/stream/`` connection, seen from the client: every frame received, with
    the time it came (seconds since the config was sent)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        self.ws = ws
        self.started = time.monotonic()
        self.frames: list[tuple[float, dict[str, Any]]] = []

    async def next(self) -> dict[str, Any] | None:
        """The next frame, or None once the server closed the socket."""
        message = await self.ws.receive(timeout=FRAME_TIMEOUT)
        if message.type != aiohttp.WSMsgType.TEXT:
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
            return None
        frame: dict[str, Any] = json.loads(message.data)
        self.frames.append((time.monotonic() - self.started, frame))
        return frame

    async def until(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Frames up to the first one ``wanted`` accepts (which is returned)."""
        while (frame := await self.next()) is not None:
            if wanted(frame):
                return frame
        raise AssertionError(f"the socket closed before the awaited frame: {self.frames}")

    async def final(self) -> dict[str, Any]:
        """The final object (or error frame); the socket must then be closed with 1000."""
        frame = await self.until(lambda f: "status" in f or "error" in f)
        assert await self.next() is None, "nothing may follow the final object"
        assert self.ws.close_code == 1000
        return frame

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    def text(self, stream: str) -> str:
        return "".join(f["text"] for _, f in self.frames if f.get("stream") == stream)

    def time_of(self, wanted: Callable[[dict[str, Any]], bool]) -> float:
        return next(at for at, frame in self.frames if wanted(frame))

    def time_printed(self, text: str) -> float:
        """When stdout, as streamed so far, first contained ``text`` (a program may write a
        line in several pieces: unbuffered Python writes ``print``'s arguments one by one)."""
        so_far = ""
        for at, frame in self.frames:
            so_far += frame.get("text", "") if frame.get("stream") == "stdout" else ""
            if text in so_far:
                return at
        raise AssertionError(f"{text!r} never came: {self.frames}")


def auth(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"} if server.token else {}


@contextlib.asynccontextmanager
async def streaming(
    server: Server, config: Any, archive: bytes = b"", headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    """A streamed run of ``config`` on ``server``, its opening frames sent."""
    sent = auth(server) if headers is None else headers
    async with (
        aiohttp.ClientSession(headers=sent) as http,
        http.ws_connect(server.url + "execute/stream/") as ws,
    ):
        stream = Stream(ws)
        await ws.send_str(json.dumps(config))
        await ws.send_bytes(archive)
        yield stream


async def streamed(server: Server, config: Any) -> tuple[Stream, dict[str, Any]]:
    """A whole streamed run that needs no input: its frames and its final object."""
    async with streaming(server, config) as stream:
        return stream, await stream.final()


def is_stdin_event(frame: dict[str, Any]) -> bool:
    return frame.get("stdin") == "wanted"


def without_times(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between two identical runs (durations)."""
    kept = {k: v for k, v in answer.items() if k != "total_time"}
    kept["execution"] = [{k: v for k, v in e.items() if k != "time"} for e in answer["execution"]]
    return kept


def escaped_size(text: str) -> int:
    return len(json.dumps(text)) - 2


# -- output as it is written -----------------------------------------------------------------------


def test_a_bash_loop_streams_each_line_while_it_runs(server: Server) -> None:
    stream, final = run(
        streamed(server, {"commands": ["for i in 1 2 3 4 5; do echo $i; sleep 0.4; done"]})
    )
    end = stream.time_of(lambda f: "status" in f)
    first = stream.time_printed("1\n")
    assert first < 1.5, f"the first line came after {first:.2f} s"
    assert end - first > 1.2, f"the first line came {end - first:.2f} s before the end only"
    assert stream.text("stdout") == "1\n2\n3\n4\n5\n"
    assert len([f for _, f in stream.frames if "stream" in f]) >= 4, "one chunk per line"
    assert final["status"] == 0 and final["execution"][0]["stdout"] == "1\n2\n3\n4\n5"


def test_stdout_and_stderr_come_in_the_order_written(server: Server) -> None:
    script = "echo o1; sleep 0.2; echo e1 >&2; sleep 0.2; echo o2; sleep 0.2; echo e2 >&2"
    stream, final = run(streamed(server, {"commands": [script]}))
    chunks = [(f["stream"], f["text"]) for _, f in stream.frames if "stream" in f]
    assert chunks == [("stdout", "o1\n"), ("stderr", "e1\n"), ("stdout", "o2\n"),
                      ("stderr", "e2\n")]  # fmt: skip
    entry = final["execution"][0]
    assert (entry["stdout"], entry["stderr"]) == ("o1\no2", "e1\ne2")


def test_python_prints_arrive_live_without_flush(server: Server) -> None:
    program = "import time\nfor i in range(4):\n    print('py', i)\n    time.sleep(0.4)"
    stream, final = run(streamed(server, {"commands": [f"python3 -c {shell_quote(program)}"]}))
    end = stream.time_of(lambda f: "status" in f)
    first = stream.time_printed("py 0\n")
    assert end - first > 0.8, f"python's first line came {end - first:.2f} s before the end"
    assert final["execution"][0]["stdout"] == "py 0\npy 1\npy 2\npy 3"


def test_c_printf_lines_arrive_live(server: Server) -> None:
    config = {"commands": [write_file("lines.c", LINES_C), "gcc -o lines lines.c", "./lines"]}
    stream, final = run(streamed(server, config))
    assert final["status"] == 0, final
    end = stream.time_of(lambda f: "status" in f)
    first = stream.time_printed("line 1\n")
    assert end - first > 0.8, f"C's first line came {end - first:.2f} s before the end"


# -- stdin -----------------------------------------------------------------------------------------


def test_a_c_prompt_comes_before_the_stdin_event_and_scanf_gets_the_input(
    server: Server,
) -> None:
    async def session() -> tuple[Stream, dict[str, Any], dict[str, Any]]:
        config = {"commands": [write_file("add.c", ADD_C), "gcc -o add add.c", "./add"]}
        async with streaming(server, config) as stream:
            event = await stream.until(is_stdin_event)
            await stream.send({"stdin": "2 3\n"})
            return stream, event, await stream.final()

    stream, event, final = run(session())
    assert event["prompt"] == "a b? "
    asked = stream.time_of(is_stdin_event)
    prompted = stream.time_printed("a b? ")
    assert prompted <= asked, "the prompt is streamed before the stdin event"
    assert stream.text("stdout").endswith("a b? 5\n")
    assert final["status"] == 0 and final["execution"][-1]["stdout"] == "a b? 5"


def test_bash_read_and_python_input_get_what_is_typed(server: Server) -> None:
    async def session() -> tuple[Stream, list[dict[str, Any]], dict[str, Any]]:
        program = "print('got', input('n? '))"
        config = {
            "commands": [
                'read -r name; echo "hello $name"',
                f"python3 -c {shell_quote(program)}",
            ]
        }
        async with streaming(server, config) as stream:
            first = await stream.until(is_stdin_event)
            await stream.send({"stdin": "Ada Lovelace\n"})
            second = await stream.until(is_stdin_event)
            await stream.send({"stdin": "42\n"})
            return stream, [first, second], await stream.final()

    stream, events, final = run(session())
    assert [e["prompt"] for e in events] == ["", "n? "]
    assert [e["stdout"] for e in final["execution"]] == ["hello Ada Lovelace", "n? got 42"]
    assert len([f for _, f in stream.frames if is_stdin_event(f)]) == 2, "one event per wait"


def test_eof_ends_the_input_of_the_run(server: Server) -> None:
    async def session() -> dict[str, Any]:
        config = {"commands": ["cat; echo cat-done", "read -r x || echo eof-for-later-commands"]}
        async with streaming(server, config) as stream:
            await stream.until(is_stdin_event)
            await stream.send({"stdin": "line one\n"})
            await stream.until(is_stdin_event)
            await stream.send({"eof": True})
            return await stream.final()

    final = run(session())
    outputs = [entry["stdout"] for entry in final["execution"]]
    assert outputs == ["line one\ncat-done", "eof-for-later-commands"]


def test_stdin_sent_before_it_is_asked_waits_for_the_program(server: Server) -> None:
    async def session() -> tuple[Stream, dict[str, Any]]:
        async with streaming(server, {"commands": ["sleep 0.3; read -r x; echo x=$x"]}) as stream:
            await stream.send({"stdin": "early\n"})
            return stream, await stream.final()

    stream, final = run(session())
    assert final["execution"][0]["stdout"] == "x=early"
    assert not any(is_stdin_event(f) for _, f in stream.frames), "nothing was left to ask"


def test_plain_execute_still_gives_an_empty_stdin(server: Server) -> None:
    started = time.monotonic()
    answer = server.run("cat; read -r x || echo empty-stdin")
    assert answer["execution"][0]["stdout"] == "empty-stdin"
    assert time.monotonic() - started < 10


# -- stop ------------------------------------------------------------------------------------------


def test_stop_interrupts_keeps_output_and_saves_what_the_exit_trap_did(server: Server) -> None:
    script = (
        "trap 'echo from-trap > trap.txt' EXIT; echo made > kept.txt; echo before; "
        "sleep 30; echo never"
    )

    async def session() -> dict[str, Any]:
        config = {"commands": [script, "echo later-command"], "save": True}
        async with streaming(server, config) as stream:
            await stream.until(lambda f: f.get("text") == "before\n")
            # As a user would: not within the microseconds bash takes to fork `sleep` (a
            # process being forked may miss SIGINT; it is killed 2 s later, trap not run).
            await asyncio.sleep(0.3)
            await stream.send({"stop": True})
            return await stream.final()

    started = time.monotonic()
    final = run(session())
    assert time.monotonic() - started < 10, "SIGINT ends a sleeping bash at once"
    assert len(final["execution"]) == 1, "later commands do not run"
    entry = final["execution"][0]
    assert entry["exit_code"] == 130
    assert entry["stdout"] == "before"
    assert entry["stderr"].endswith("[sandbox] stopped on request")
    assert final["status"] == 130
    again = server.run("cat kept.txt trap.txt", environment=final["environment"])
    assert again["execution"][0]["stdout"] == "made\nfrom-trap"


def test_stop_kills_what_ignores_sigint_after_the_grace(server: Server) -> None:
    async def session() -> dict[str, Any]:
        config = {"commands": ["trap '' INT; echo deaf; sleep 30"]}
        async with streaming(server, config) as stream:
            await stream.until(lambda f: f.get("text") == "deaf\n")
            await stream.send({"stop": True})
            return await stream.final()

    started = time.monotonic()
    final = run(session())
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 12, f"SIGKILL comes 2 s after SIGINT, not after {elapsed:.1f} s"
    entry = final["execution"][0]
    assert entry["exit_code"] == 137 and entry["stderr"].endswith("[sandbox] stopped on request")


# -- the same run as execute/ ----------------------------------------------------------------------


def test_the_final_object_is_what_execute_answers(server: Server) -> None:
    config = {
        "commands": ["echo '  out  '; echo err >&2", "-false", "printf 'r\\n' > result.txt"],
        "result_path": "result.txt",
        "environ": {"GREETING": "hi"},
    }
    _, final = run(streamed(server, config))
    assert without_times(final) == without_times(server.execute(config))
    assert set(final) == {"status", "execution", "result", "total_time"}


def test_streamed_runs_get_terminal_buffering_and_the_config_environ_wins(
    server: Server,
) -> None:
    show = 'echo "$PYTHONUNBUFFERED|$LD_PRELOAD|$_STDBUF_I$_STDBUF_O$_STDBUF_E"'
    _, final = run(streamed(server, {"commands": [show]}))
    unbuffered, preload, modes = final["execution"][0]["stdout"].split("|")
    assert (unbuffered, modes) == ("1", "0LL")
    assert preload.endswith("/libstdbuf.so") and Path(preload).is_file()
    _, overridden = run(streamed(server, {"commands": [show], "environ": {"_STDBUF_O": "0"}}))
    assert overridden["execution"][0]["stdout"].endswith("|00L")
    plain = server.run(show)["execution"][0]["stdout"]
    assert plain == "||", "execute/ runs keep the programs' own buffering"


def test_a_missing_environment_is_the_404_error_frame(server: Server) -> None:
    missing = uuid.uuid4().hex
    _, final = run(streamed(server, {"commands": ["true"], "environment": missing}))
    assert final == {"error": 404, "text": f"No environment with UUID '{missing}' found"}


def test_an_invalid_config_or_archive_is_a_400_error_frame(server: Server) -> None:
    _, final = run(streamed(server, {"commands": "not a list"}))
    assert final["error"] == 400 and "commands" in final["text"]
    _, final = run(streamed(server, "{"))  # a JSON string that is not an object
    assert final["error"] == 400

    async def bad_archive() -> dict[str, Any]:
        async with streaming(server, {"commands": ["true"]}, archive=b"not a tgz") as stream:
            return await stream.final()

    final = run(bad_archive())
    assert final["error"] == 400 and final["text"].startswith("Invalid environment archive")


def test_an_archive_is_unpacked_as_for_execute(server: Server) -> None:
    async def session() -> dict[str, Any]:
        data = b"from the archive\n"
        archive = tgz((member("note.txt"), data))
        async with streaming(server, {"commands": ["cat note.txt"]}, archive=archive) as s:
            return await s.final()

    assert run(session())["execution"][0]["stdout"] == "from the archive"


def test_a_frame_out_of_protocol_stops_the_run_with_a_400(server: Server) -> None:
    async def session(frame: Any) -> dict[str, Any]:
        async with streaming(server, {"commands": ["echo up; sleep 30"]}) as stream:
            await stream.until(lambda f: f.get("text") == "up\n")
            if isinstance(frame, bytes):
                await stream.ws.send_bytes(frame)
            else:
                await stream.ws.send_str(frame)
            return await stream.final()

    for frame in (b"binary", "not json", '{"stdin": 3}', '{"stop": true, "eof": true}'):
        started = time.monotonic()
        final = run(session(frame))
        assert final["error"] == 400, (frame, final)
        assert time.monotonic() - started < 10, "the run is killed, not waited for"


def test_more_than_a_mebibyte_of_unread_stdin_is_refused(server: Server) -> None:
    async def session() -> dict[str, Any]:
        async with streaming(server, {"commands": ["sleep 30"]}) as stream:
            for _ in range(5):
                await stream.send({"stdin": "x" * 300_000})
            return await stream.final()

    final = run(session())
    assert final["error"] == 413 and "stdin" in final["text"]


# -- caps, limits and the client going away --------------------------------------------------------


@pytest.fixture(scope="module")
def capped(start_server: Callable[..., Server]) -> Server:
    """A server with small output and upload caps and a short header timeout."""
    return start_server(
        "--workers", "2", "--max-output", "64K", "--header-timeout", "1", "--max-upload", "1M"
    )  # fmt: skip


def test_max_output_counts_streamed_text_and_the_run_ends_normally(capped: Server) -> None:
    config = {"commands": ["yes | head -c 5M; echo still-running >&2", "echo next"]}
    stream, final = run(streamed(capped, config))
    streamed_size = sum(escaped_size(f["text"]) for _, f in stream.frames if "stream" in f)
    assert 60 * 1024 < streamed_size <= 64 * 1024
    assert final["status"] == 0 and len(final["execution"]) == 2
    first = final["execution"][0]
    assert first["stdout"] == stream.text("stdout").strip()
    assert first["stderr"].endswith("[sandbox] output cut after 65536 (--max-output)")
    assert "still-running" not in stream.text("stderr"), "nothing streams past the cap"


def test_frames_that_do_not_come_in_time_are_a_408(capped: Server) -> None:
    async def session() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(headers=auth(capped)) as http,
            http.ws_connect(capped.url + "execute/stream/") as ws,
        ):
            stream = Stream(ws)
            await ws.send_str(json.dumps({"commands": ["echo ran > ran.txt"]}))
            return await stream.final()  # no archive frame

    final = run(session())
    assert final["error"] == 408 and "--header-timeout" in final["text"]


def test_frames_over_the_caps_are_refused(capped: Server) -> None:
    async def session(config: Any, archive: bytes) -> tuple[dict[str, Any] | None, int | None]:
        async with streaming(capped, config, archive=archive) as stream:
            frame = await stream.next()
            return frame, stream.ws.close_code

    small = {"commands": ["echo ran"]}
    big_config = {"commands": ["true"], "environ": {"X": "x" * (1024**2 + 10)}}
    for config, archive in ((big_config, b""), (small, b"\0" * (1024**2 + 1))):
        frame, _ = run(session(config, archive))
        assert frame is not None and frame["error"] == 413, frame
        assert "--max-upload" in frame["text"]
    frame, code = run(session(small, b"\0" * (2 * 1024**2)))
    # 1009, or 1006 when the close comes while the client still sends (the connection drops).
    assert frame is None and code in (1009, 1006), "the WebSocket layer refuses a frame that big"


def test_a_client_that_goes_away_kills_the_run_and_saves_nothing(server: Server) -> None:
    marker = f"{time.time_ns() % 10**6}.25"  # a sleep argument no other process has

    async def session() -> None:
        config = {"commands": [f"echo started; sleep {marker}"], "save": True}
        async with streaming(server, config) as stream:
            await stream.until(lambda f: f.get("text") == "started\n")
            assert wait_until(lambda: bool(processes_matching(f"sleep\0{marker}"))), (
                "the run's sleep is running"
            )

    environments = set((server.data_dir / "environments").iterdir())
    run(session())
    assert wait_until(lambda: not processes_matching(f"sleep\0{marker}"), timeout=10), (
        "the run outlived its client"
    )
    time.sleep(0.5)
    assert set((server.data_dir / "environments").iterdir()) == environments


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Origin": "https://evil.example"}, 403),
        ({"Host": "evil.example"}, 403),
    ],
)
def test_the_upgrade_is_refused_as_execute_would_be(
    server: Server, headers: dict[str, str], status: int
) -> None:
    if "Authorization" not in headers:
        headers = {**headers, **(auth(server) if status == 403 else {})}

    async def session() -> None:
        async with streaming(server, {"commands": ["true"]}, headers=headers):
            raise AssertionError("the upgrade was accepted")

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        run(session())
    assert refused.value.status == status


def test_a_plain_get_is_told_to_use_a_websocket(server: Server) -> None:
    answer = server.get("execute/stream/")
    assert answer.status_code == 400 and "WebSocket" in answer.text


# -- without isolation -----------------------------------------------------------------------------


def test_unisolated_runs_stream_read_stdin_and_stop(start_server: Callable[..., Server]) -> None:
    plain = start_server("--isolation", "none", "--workers", "1")

    async def session() -> tuple[dict[str, Any], dict[str, Any]]:
        program = "print('got', input('n? '))"
        async with streaming(plain, {"commands": [f"python3 -c {shell_quote(program)}"]}) as s:
            event = await s.until(is_stdin_event)
            await s.send({"stdin": "7\n"})
            asked = await s.final()
        assert event["prompt"] == "n? "
        async with streaming(plain, {"commands": ["echo up; sleep 30", "echo never"]}) as s:
            await s.until(lambda f: f.get("text") == "up\n")
            await s.send({"stop": True})
            stopped = await s.final()
        return asked, stopped

    asked, stopped = run(session())
    assert asked["execution"][0]["stdout"] == "n? got 7"
    assert len(stopped["execution"]) == 1
    assert stopped["execution"][0]["stderr"].endswith("[sandbox] stopped on request")


# -- specifications --------------------------------------------------------------------------------


def test_specifications_advertise_the_extensions_and_a_stable_server_id(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    first = start_server("--workers", "1", data_dir=tmp_path / "data")
    specs = first.get("specifications/").json()
    assert specs["extensions"] == ["stream", "stdin", "causes"]
    assert re.fullmatch(r"[0-9a-f]{32}", specs["server_id"])
    first.stop()
    again = start_server("--workers", "1", data_dir=tmp_path / "data")
    assert again.get("specifications/").json()["server_id"] == specs["server_id"]
    other = start_server("--workers", "1", data_dir=tmp_path / "other")
    assert other.get("specifications/").json()["server_id"] != specs["server_id"]


def test_the_default_execute_timeout_is_a_minute(server: Server) -> None:
    assert server.get("specifications/").json()["container"]["execute_timeout"] == 60.0


# -- helpers ---------------------------------------------------------------------------------------


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def write_file(name: str, content: str) -> str:
    """A command writing ``content`` into ``name``."""
    return f"printf '%s' {shell_quote(content)} > {name}"
