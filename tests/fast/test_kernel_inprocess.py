"""The Sandbox kernel's message handlers in-process, against a real embedded server.

As ipykernel's own ``tests/test_kernel_direct.py`` does: a kernel object in this process,
real Jupyter messages (signed and serialised by a ``jupyter_client`` session) dispatched
through its shell and control handlers, and only the ZMQ streams replaced, by streams that
keep what the kernel sends. Everything below the streams is real: ipykernel's dispatch, the
kernel's handlers, the session and client, HTTP over loopback to the module's server, bash in
its sandbox. Kernels started as processes through ``jupyter_client`` are in ``test_kernel.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import comm
import pytest
import zmq
from jupyter_client.session import Session
from tornado.ioloop import IOLoop
from zmq.eventloop.zmqstream import ZMQStream

from sandbox_kernel.kernel import SandboxKernel

from ..conftest import Cell, Server
from ..helpers import processes_matching


class CapturingStream(ZMQStream):
    """A shell, control or IOPub stream that keeps the messages the kernel sends, decoded.

    A ``ZMQStream`` by type (the kernel's traits check it), without a socket: ``jupyter_client``'s
    ``Session.send`` serialises and signs each message and hands it to ``send_multipart``,
    which decodes it back with the same session (checking the signature)."""

    def __init__(self, session: Session, io_loop: IOLoop) -> None:  # no socket: nothing sent
        self.session = session
        self.io_loop = io_loop
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send_multipart(self, msg_parts: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        frames = [bytes(part) for part in msg_parts]
        _identities, rest = self.session.feed_identities(frames, copy=True)
        message = self.session.deserialize(rest, content=True, copy=True)
        with self._lock:
            self.messages.append(message)

    def answers_to(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages sent on behalf of ``request`` (by their parent header)."""
        with self._lock:
            sent = list(self.messages)
        msg_id = request["header"]["msg_id"]
        return [m for m in sent if m["parent_header"].get("msg_id") == msg_id]

    def flush(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def close(self, linger: int | None = None) -> None:
        pass


def make_kernel(
    server: Server, session: Session, streams: dict[str, CapturingStream]
) -> SandboxKernel:
    """The kernel on ``server``: the one place that knows how it is built (``url`` and
    ``token`` traits, as ``c.SandboxKernel.url`` / ``token`` set them)."""
    return SandboxKernel(
        url=server.url,
        token=server.token,
        session=session,
        shell_stream=streams["shell"],
        control_stream=streams["control"],
        iopub_socket=streams["iopub"],
        log=logging.getLogger("sandbox_kernel.tests.inprocess"),  # as IPKernelApp gives its own
    )


@dataclasses.dataclass
class Exchange:
    """A request, its reply and the IOPub messages published for it, in order."""

    request: dict[str, Any]
    reply: dict[str, Any]
    published: list[dict[str, Any]]

    @property
    def content(self) -> dict[str, Any]:
        return dict(self.reply["content"])

    def cell(self, seconds: float = 0.0) -> Cell:
        """As ``conftest.Cell`` (the jupyter_client tests' view): outputs without status and
        execute_input."""
        outputs = [m for m in self.published if m["msg_type"] not in ("status", "execute_input")]
        return Cell(self.reply, outputs, seconds)


@dataclasses.dataclass
class Pending:
    """A message handed to the kernel, and the task that ends when the kernel has handled it."""

    channel: str
    request: dict[str, Any]
    task: asyncio.Task[None]


class InProcessKernel:
    """The kernel and its event loop, driven message by message."""

    def __init__(self, server: Server) -> None:
        self.loop = asyncio.new_event_loop()
        # The kernel wires the process-wide `comm` functions to itself, as a kernel process
        # does; they are given back in close(), so the other tests' widgets are unaffected.
        self._comm_functions = (comm.create_comm, comm.get_comm_manager)
        self.session = Session()
        io_loop = self.loop.run_until_complete(_current_io_loop())
        self.streams = {
            name: CapturingStream(self.session, io_loop) for name in ("shell", "control", "iopub")
        }
        self.kernel = make_kernel(server, self.session, self.streams)
        self.kernel.io_loop = io_loop  # as Kernel.start() sets it; start() also listens: not here

    def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> Pending:
        """Hand a message to the kernel's shell or control dispatcher (as the kernel's
        streams do when a message arrives); the loop runs it in :meth:`finish`."""
        request = self.session.msg(msg_type, content)
        frames = [zmq.Frame(part) for part in self.session.serialize(request)]
        dispatch = self.kernel.dispatch_shell if channel == "shell" else self.kernel.process_control
        return Pending(channel, request, self.loop.create_task(dispatch(frames)))

    def finish(self, pending: Pending, settle: bool = True) -> Exchange:
        """Run the loop until the kernel has handled ``pending``; the reply and what it
        published on IOPub."""
        self.loop.run_until_complete(pending.task)
        if settle:
            # A real kernel's loop keeps running between messages: what a handler scheduled
            # (ipykernel ends its "abort after an error" state so) runs before the next one.
            self.loop.run_until_complete(asyncio.sleep(0.01))
        request = pending.request
        replies = self.streams[pending.channel].answers_to(request)
        assert len(replies) == 1, f"{request['header']['msg_type']}: replies {replies}"
        return Exchange(request, replies[0], self.streams["iopub"].answers_to(request))

    def request(self, channel: str, msg_type: str, content: dict[str, Any]) -> Exchange:
        return self.finish(self.send(channel, msg_type, content))

    def execute(self, code: str) -> Cell:
        started = time.monotonic()
        exchange = self.request("shell", "execute_request", {"code": code, "silent": False})
        return exchange.cell(time.monotonic() - started)

    def run_loop_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Let the loop run (a cell in flight goes on) until ``predicate`` holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            self.loop.run_until_complete(asyncio.sleep(0.05))
        return bool(predicate())

    def close(self) -> None:
        try:
            pending = self.send("control", "shutdown_request", {"restart": False})
            # No settling: the shutdown handler stops the loop once it has replied.
            shutdown = self.finish(pending, settle=False)
            assert shutdown.content == {"status": "ok", "restart": False}
        finally:
            self.loop.close()
            comm.create_comm, comm.get_comm_manager = self._comm_functions


async def _current_io_loop() -> IOLoop:
    return IOLoop.current()


@pytest.fixture(scope="module")
def kernel(server: Server) -> Iterator[InProcessKernel]:
    harness = InProcessKernel(server)
    yield harness
    harness.close()


# -- kernel_info ----------------------------------------------------------------------------------


def test_kernel_info_names_the_language_and_the_sandbox(
    kernel: InProcessKernel, server: Server
) -> None:
    exchange = kernel.request("shell", "kernel_info_request", {})
    assert exchange.reply["msg_type"] == "kernel_info_reply"
    info = exchange.content
    assert info["status"] == "ok"
    assert info["implementation"] == "sandbox_kernel"
    assert info["language_info"]["name"] == "bash"
    assert info["language_info"]["file_extension"] == ".sh"
    assert server.url.rstrip("/") in info["banner"], info["banner"]
    assert "NOT ISOLATED" not in info["banner"]
    states = [
        m["content"]["execution_state"] for m in exchange.published if m["msg_type"] == "status"
    ]
    assert states == ["busy", "idle"]


# -- execution ------------------------------------------------------------------------------------


def test_a_cell_prints_in_a_stream_message(kernel: InProcessKernel) -> None:
    exchange = kernel.request("shell", "execute_request", {"code": "echo hi", "silent": False})
    assert exchange.reply["msg_type"] == "execute_reply"
    assert exchange.content["status"] == "ok"
    kinds = [m["msg_type"] for m in exchange.published]
    assert kinds == ["status", "execute_input", "stream", "status"], kinds
    [stream] = [m["content"] for m in exchange.published if m["msg_type"] == "stream"]
    assert stream == {"name": "stdout", "text": "hi\n"}
    assert exchange.published[1]["content"]["code"] == "echo hi"
    assert (
        exchange.content["execution_count"] == exchange.published[1]["content"]["execution_count"]
    )


def test_shell_state_and_files_carry_to_the_next_cell(kernel: InProcessKernel) -> None:
    assert (
        kernel.execute("carried=41; mkdir -p inproc && cd inproc && echo data > f").status == "ok"
    )
    after = kernel.execute('echo $((carried + 1)); pwd; cat f; cd "$HOME"')
    assert after.stdout == "42\n/home/student/inproc\ndata\n"


def test_a_failing_cell_gets_an_error_reply_and_the_next_one_runs(kernel: InProcessKernel) -> None:
    cell = kernel.execute("echo partial\nno_such_command_here")
    assert cell.status == "error"
    assert (cell.reply["ename"], cell.reply["evalue"]) == (
        "ExitCode",
        "command exited with status 127",
    )
    assert cell.stdout == "partial\n"
    assert "line 2: no_such_command_here: command not found" in cell.stderr, (
        "bash's line numbers are the cell's own"
    )
    [error] = cell.of_type("error")
    assert error["traceback"][0] == "ExitCode: command exited with status 127"
    assert kernel.execute("echo still here").stdout == "still here\n"


def test_a_magic_changes_what_the_next_cells_get(kernel: InProcessKernel) -> None:
    kernel.execute("A=from-the-state")
    assert kernel.execute("%sandbox_env A=1").status == "ok"
    assert kernel.execute("echo $A").stdout == "1\n", "sent variables win over the shell state"
    both = kernel.execute("%sandbox_env B=two\necho $A $B")
    assert both.stdout == "1 two\n"
    unknown = kernel.execute("%no_such_magic")
    assert unknown.status == "error" and "no_such_magic" in unknown.reply["evalue"]


def test_an_interrupt_on_the_control_channel_ends_the_cell(kernel: InProcessKernel) -> None:
    kernel.execute("before_interrupt=kept")
    marker = f"29.{time.monotonic_ns() % 100000}"
    started = time.monotonic()
    cell_task = kernel.send(
        "shell", "execute_request", {"code": f"sleep {marker}", "silent": False}
    )
    assert kernel.run_loop_until(lambda: bool(processes_matching(f"sleep {marker}")), 15), (
        "the command never started in the sandbox"
    )
    interrupt = kernel.request("control", "interrupt_request", {})
    assert interrupt.content == {"status": "ok"}
    cell = kernel.finish(cell_task).cell()
    assert cell.status == "error" and cell.reply["ename"] == "Interrupted", cell.reply
    assert time.monotonic() - started < 10, "the interrupt did not end the cell at once"
    assert kernel.run_loop_until(lambda: not processes_matching(f"sleep {marker}"), 5), (
        "the command outlived its interrupted cell"
    )
    assert kernel.execute("echo ${before_interrupt:-lost}").stdout == "kept\n"


# -- editor support -------------------------------------------------------------------------------


def test_completion_uses_the_carried_state(kernel: InProcessKernel) -> None:
    kernel.execute("my_variable=1; my_function() { :; }; touch notes-one.txt notes-two.txt")
    files = kernel.request("shell", "complete_request", {"code": "cat note", "cursor_pos": 8})
    assert files.reply["msg_type"] == "complete_reply"
    assert files.content["matches"] == ["notes-one.txt", "notes-two.txt"]
    assert (files.content["cursor_start"], files.content["cursor_end"]) == (4, 8)
    variables = kernel.request(
        "shell", "complete_request", {"code": "echo $my_v", "cursor_pos": 10}
    )
    assert variables.content["matches"] == ["$my_variable"]
    commands = kernel.request("shell", "complete_request", {"code": "my_f", "cursor_pos": 4})
    assert "my_function" in commands.content["matches"]


def test_is_complete_asks_bash(kernel: InProcessKernel) -> None:
    incomplete = kernel.request("shell", "is_complete_request", {"code": "for i in 1 2; do"})
    assert incomplete.content == {"status": "incomplete", "indent": "    "}
    assert kernel.request("shell", "is_complete_request", {"code": "echo )"}).content == {
        "status": "invalid"
    }


def test_history_lists_the_cells_run(kernel: InProcessKernel) -> None:
    kernel.execute("echo history-mark")
    exchange = kernel.request(
        "shell",
        "history_request",
        {"hist_access_type": "tail", "n": 1, "output": False, "raw": True},
    )
    [(_session, _line, code)] = exchange.content["history"]
    assert code == "echo history-mark"
