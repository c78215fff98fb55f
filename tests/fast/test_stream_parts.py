"""The parts of a streamed run that need no server: incremental decoding and the output cap of
streamed chunks, the stdin pipe and how a process blocked reading it is recognised (with real
processes), the stdbuf library, and the server's identity file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.server.executor import _LiveOutput
from sandbox_kernel.server.runners import StdinPipe, _waits_on_pipe, stdbuf_library
from sandbox_kernel.server.storage import _server_id


def live(limit: int = 1 << 20) -> tuple[_LiveOutput, list[tuple[str, str]]]:
    sent: list[tuple[str, str]] = []
    return _LiveOutput(limit, lambda stream, text: sent.append((stream, text))), sent


def test_a_character_split_between_reads_is_sent_whole() -> None:
    output, sent = live()
    kept = output.feed("stdout", "café".encode()[:-1])
    kept += output.feed("stdout", "café\n".encode()[-2:])
    assert sent == [("stdout", "caf"), ("stdout", "é\n")]
    assert kept.decode() == "café\n"


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    output, sent = live()
    output.feed("stderr", b"a\xffb")
    output.feed("stderr", b"\xc3")  # a character cut by the end of the command
    output.flush("stderr")
    assert "".join(text for _, text in sent) == "a\ufffdb\ufffd"


def test_streams_decode_independently() -> None:
    output, sent = live()
    output.feed("stdout", b"\xc3")
    output.feed("stderr", b"err")
    output.feed("stdout", b"\xa9")
    assert sent == [("stderr", "err"), ("stdout", "é")]


def test_the_cap_counts_escaped_text_and_cuts_at_a_character() -> None:
    output, sent = live(limit=10)
    kept = output.feed("stdout", ('a"b\n' + "x" * 20).encode())  # '"' and '\n' cost 2
    assert sent == [("stdout", 'a"b\nxxxx')]
    assert output.take_dropped() and not output.take_dropped()
    assert output.feed("stdout", b"more") == b"" and sent[1:] == []
    assert output.take_dropped(), "output past the cap is counted as dropped"
    assert kept.decode() == sent[0][1]
    accented, sent = live(limit=13)  # the answer is ASCII JSON: "\u00e9" costs 6
    accented.feed("stderr", "ééé".encode())
    assert sent == [("stderr", "éé")]


@pytest.fixture
def pipe() -> Iterator[StdinPipe]:
    made = StdinPipe()
    yield made
    made.close()


def reader(pipe: StdinPipe, *argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=pipe.read_fd, stdout=subprocess.DEVNULL)


def waits(process: subprocess.Popen[bytes], pipe: StdinPipe, seconds: float = 5.0) -> bool:
    """Whether ``process`` is seen blocked on ``pipe`` within ``seconds``."""
    assert pipe.inode is not None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if _waits_on_pipe(process.pid, pipe.inode):
            return True
        time.sleep(0.02)
    return False


def test_a_process_blocked_reading_the_pipe_is_seen(pipe: StdinPipe) -> None:
    for argv in (["cat"], ["bash", "-c", "read -r x"], ["python3", "-c", "input()"]):
        process = reader(pipe, *argv)
        try:
            assert waits(process, pipe), argv
        finally:
            process.kill()
            process.wait()


def test_a_process_that_reads_another_pipe_or_sleeps_is_not_seen(pipe: StdinPipe) -> None:
    other = StdinPipe()
    busy = [
        subprocess.Popen(["cat"], stdin=other.read_fd, stdout=subprocess.DEVNULL),
        reader(pipe, "sleep", "30"),
    ]
    try:
        assert waits(busy[0], other), "the other pipe's reader is seen on its own pipe"
        assert not any(waits(process, pipe, seconds=0.3) for process in busy)
    finally:
        for process in busy:
            process.kill()
            process.wait()
        other.close()


def test_stdin_is_written_without_blocking_and_ended() -> None:
    async def scenario() -> tuple[int, bytes]:
        pipe = StdinPipe()
        try:
            pipe.feed(b"x" * (1 << 20))  # more than a pipe holds: the rest waits here
            waiting = pipe.unread()
            process = await asyncio.create_subprocess_exec(
                "wc", "-c", stdin=pipe.read_fd, stdout=subprocess.PIPE
            )
            pipe.end()
            out, _ = await asyncio.wait_for(process.communicate(), 10)
            return waiting, out
        finally:
            pipe.close()

    waiting, out = asyncio.run(scenario())
    assert waiting == 1 << 20
    assert out.strip() == str(1 << 20).encode()


def test_stdbuf_library_is_found_where_coreutils_put_it() -> None:
    library = stdbuf_library()
    assert library is not None, "coreutils' libstdbuf.so is missing (apt-get install coreutils)"
    assert os.path.isfile(library) and library.startswith("/usr/")


def test_the_server_id_is_kept_and_a_damaged_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "server-id"
    made = _server_id(path)
    assert len(made) == 32 and _server_id(path) == made
    path.write_text("not an id\n")
    replaced = _server_id(path)
    assert replaced != made and _server_id(path) == replaced
    assert [p.name for p in tmp_path.iterdir()] == ["server-id"], "no temporary file is left"
