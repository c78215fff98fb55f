"""A streamed run's controls, whatever carries its frames (docs/protocol-extensions.md,
"WebSocket execute/stream/"): the hooks that make :meth:`.executor.Executor.execute` hand over
output as it is read, and what the client may do to the run (stdin, end of file, stop).

The single server's WebSocket session (:mod:`.streaming`) and a cluster worker (which carries
the frames over Redis) both drive a :class:`LiveRun`; a cluster front relays the same controls
(:class:`LiveControl`) to the worker that runs the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from .runners import Runner

#: How often the processes of a run are looked at for a blocked read of stdin.
STDIN_POLL_SECONDS = 0.05
#: Bytes of stdin that may wait unread (sent by the client, not read by the run).
MAX_STDIN_WAITING = 1 << 20
#: Characters of the last unfinished stdout line sent as a ``stdin`` event's prompt.
PROMPT_CHARS = 200
#: A refusal: the HTTP status ``execute/`` would answer, and its text.
Refusal = tuple[int, str]


@dataclasses.dataclass
class RunHooks:
    """What a streamed run (``execute/stream/``) adds to :meth:`Executor.execute`; the
    plain ``execute/`` passes none.

    Everything is called from the event loop, synchronously: a hook must not block.
    """

    #: Each chunk of output as it is read: ``("stdout" | "stderr", text)``, decoded as UTF-8
    #: (a character never split), within ``--max-output``.
    on_output: Callable[[str, str], None]
    #: Before each command, with the runner it runs in: its :attr:`Runner.input` is the
    #: run's stdin (the stdin source), :meth:`Runner.stdin_wanted` says when it is waited on.
    #: A sandbox replaced after a timeout is a new runner.
    on_command: Callable[[Runner], None]
    #: Set by the client: the running command is interrupted, later commands do not run.
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: A cluster front's queue: how many jobs are ahead of this one, each time it changes
    #: before the run starts. Set only for a client that asked for queue events; the single
    #: server never calls it (its runs wait for a slot, never in a queue).
    on_queue: Callable[[int], None] | None = None


class LiveControl(Protocol):
    """One streamed run's controls, whatever carries its frames: what the client may do to
    the run (stdin, end of file, stop), and the hooks that make :meth:`Runs.execute` stream.

    The single server and a cluster's worker use :class:`LiveRun`; a cluster's front relays
    the same controls to the worker that runs the job.
    """

    hooks: RunHooks

    def give_stdin(self, data: bytes) -> Refusal | None:
        """Input for the run; a refusal (413) if too much of it waits unread."""
        ...

    def end_stdin(self) -> None: ...
    def stop(self) -> None: ...

    async def watch(self) -> None:
        """Until cancelled: tell the client (``send``) when the run waits for input."""
        ...


class LiveRun:
    """A streamed run in this process's sandboxes, transport-free: its frames go to
    ``send`` (called from the loop; it must not block), which a WebSocket session or a
    cluster worker carries to the client.

    Frames sent: ``{"stream": "stdout" | "stderr", "text": TEXT}`` as output is read, and
    ``{"stdin": "wanted", "prompt": TEXT}`` once per wait for input.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.hooks = RunHooks(on_output=self._on_output, on_command=self._on_command)
        #: The sandbox of the running command (None before the first).
        self.runner: Runner | None = None
        #: stdin sent before the first command started, and whether end-of-file was sent.
        self.early_stdin = bytearray()
        self.eof = False
        #: Whether the next wait for input is told (once per wait: re-armed by stdin/eof).
        self.armed = True
        #: stdout of the current command after its last newline.
        self.prompt = ""

    def _on_output(self, stream: str, text: str) -> None:
        """A chunk of the running command's output (:attr:`RunHooks.on_output`)."""
        self.send({"stream": stream, "text": text})
        if stream == "stdout":
            line = text.rpartition("\n")[2] if "\n" in text else self.prompt + text
            self.prompt = line[-PROMPT_CHARS:]

    def _on_command(self, runner: Runner) -> None:
        """A command starts (:attr:`RunHooks.on_command`): its stdin is the client's."""
        self.prompt = ""
        if runner is self.runner:
            return
        self.runner = runner
        if self.early_stdin:
            runner.input.feed(bytes(self.early_stdin))
            self.early_stdin.clear()
        if self.eof:
            runner.input.end()

    def give_stdin(self, data: bytes) -> Refusal | None:
        runner = self.runner
        waiting = len(self.early_stdin) + (runner.input.unread() if runner else 0)
        if waiting + len(data) > MAX_STDIN_WAITING:
            return stdin_flood()
        if runner is None:
            self.early_stdin += data
        else:
            runner.input.feed(data)
        self.armed = True
        return None

    def end_stdin(self) -> None:
        self.eof = self.armed = True
        if self.runner is not None:
            self.runner.input.end()

    def stop(self) -> None:
        self.hooks.stop.set()

    async def watch(self) -> None:
        """Tell the client, once per wait, when a process of the run waits for input."""
        while True:
            await asyncio.sleep(STDIN_POLL_SECONDS)
            runner = self.runner
            if runner is None or not self.armed or not runner.stdin_wanted():
                continue
            if runner.stdout.sink is not None:
                runner.stdout.read_available()  # the prompt goes out before the event
            self.armed = False
            self.send({"stdin": "wanted", "prompt": self.prompt})


def stdin_flood() -> Refusal:
    """The refusal of stdin sent faster than the run reads it."""
    return (
        413,
        f"More than {MAX_STDIN_WAITING // 1024} KiB of stdin waited unread: the run "
        "was stopped. Send input when the run asks for it.",
    )
