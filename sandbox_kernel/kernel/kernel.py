"""The Sandbox kernel: every cell is bash run in a sandbox over HTTP.

A thin front-end over :class:`~sandbox_kernel.session.Session` (which carries environment and
shell state) built on ``ipykernel.kernelbase.Kernel``, whose message handlers it overrides
(``do_execute``, ``do_complete``...). The HTTP call runs in a worker thread, so the kernel's
event loop keeps handling comm messages (widgets) and interrupts while a cell runs.

Interrupts never raise ``KeyboardInterrupt`` here (ipykernel would then send no reply at all):
both an ``interrupt_request`` and a SIGINT cancel the running request, whose connection is
closed, and the cell ends with an error reply. Magics run under the same cancellation, so an
interrupt also ends a download, an upload or a look-up.

Magic lines run on the user's machine: local paths they read or write stay inside the folder
the kernel started in (the notebook's), unless ``c.SandboxKernel.allow_host_paths`` or
``SANDBOX_ALLOW_HOST_PATHS=1`` says otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel
from traitlets import Bool, Float, Int, Unicode, default
from traitlets.utils.importstring import import_item

from .. import __version__, magics, protocol
from .._errors import SandboxCancelled, SandboxError, SandboxStreamRefused
from ..async_client import AsyncSandbox, LiveRun, Output
from ..client import Cancellation, cancel_scope
from ..magics.cells import split_cell
from ..session import CellError, CellOutcome, ShellState, records
from ..session.cellscript import LiveFrames
from ..session.context import OperationFailed, SandboxContext, SandboxNotConfigured
from ..session.local_paths import KERNEL_SWITCH, HostPathRefused
from ..session.session import PreparedCell
from ..settings import KERNEL_NAMES
from ..views import render
from ..views.render import Bundle
from . import editor

log = logging.getLogger(__name__)

#: Seconds ``kernel_info`` waits for the specifications shown in the banner.
_BANNER_WAIT = 5.0
#: Where a kernel's settings are given, for a cell that cannot run without them.
KERNEL_SETTINGS_HELP = (
    "c.SandboxKernel.url / .token / .timeout in ipython_kernel_config.py, or SANDBOX_URL, "
    "SANDBOX_TOKEN, SANDBOX_TIMEOUT in the environment Jupyter starts the kernel with"
)
#: Characters of a streamed cell's output shown at most, by default.
_MAX_OUTPUT = 1024 * 1024
_NO_STREAM_NOTICE = (
    "Live output is off for this kernel: the sandbox's WebSocket could not be opened (the "
    "kernel log says why); cells now show their output when they end.\n"
)
#: Seconds a stopped streamed run has to send its final answer before its socket is closed.
_STOP_GRACE = 4.0
#: Seconds between two looks at the stdin socket while an input box is open.
_INPUT_POLL = 0.02
#: Cells this many seconds apart at most are shown as one "busy" line update.
_BUSY_TEXT = "sandbox busy, waiting… (attempt {attempt}, {elapsed:.0f} s so far)"
#: The same line while a sandbox cluster holds the run in its queue (its queue events).
_QUEUED_TEXT = "[sandbox] {ahead} ahead of you in the queue…"
_NEXT_TEXT = "[sandbox] next in the queue…"


class SandboxKernel(Kernel):
    """Bash cells run in a PremierLangage-protocol sandbox."""

    implementation = "sandbox_kernel"
    implementation_version = __version__
    language = "bash"
    language_version = "5"
    language_info: dict[str, object] = {  # noqa: RUF012 (ipykernel's declaration)
        "name": "bash",
        "mimetype": "text/x-sh",
        "codemirror_mode": "shell",
        "pygments_lexer": "bash",
        "file_extension": ".sh",
    }

    url = Unicode(
        None,
        allow_none=True,
        config=True,
        help="URL of the sandbox server (default: $SANDBOX_URL, then a local server "
        "advertised by `sandbox-kernel serve`, then a private embedded one).",
    )
    token = Unicode(
        None, allow_none=True, config=True, help="Sandbox token (default: $SANDBOX_TOKEN)."
    )
    timeout = Float(
        None,
        allow_none=True,
        config=True,
        help="Seconds to wait for the sandbox's answers (default: $SANDBOX_TIMEOUT, else 60; "
        "an execute/ also gets the server's execute_timeout + 10 s).",
    )
    side_timeout = Float(
        None,
        allow_none=True,
        config=True,
        help="Seconds to wait for requests made beside the cells: specifications, load, "
        "libraries, downloads, uploads (default: $SANDBOX_SIDE_TIMEOUT, else the timeout).",
    )
    allow_host_paths = Bool(
        False,
        config=True,
        help="Let magics (%sandbox_upload, %sandbox_download --to, the panel's Download) read "
        "and write local paths outside the folder the kernel started in (the notebook's "
        "folder). Off by default: a notebook from elsewhere could otherwise upload your keys "
        "or overwrite your files. SANDBOX_ALLOW_HOST_PATHS=1 turns it on too.",
    )

    max_output = Int(
        config=True,
        help="Characters of a streamed cell's output shown at most (default: "
        "$SANDBOX_MAX_OUTPUT, else 1 MiB); the rest is counted and dropped, so that a cell "
        "printing without end never floods the browser (the server's --max-output may cut "
        "it earlier).",
    )

    @default("max_output")
    def _max_output_default(self) -> int:
        value = os.environ.get("SANDBOX_MAX_OUTPUT", "")
        return int(value) if value.isdigit() and int(value) > 0 else _MAX_OUTPUT

    # ipykernel sleeps after each cell so that Python's captured prints reach the front-end;
    # this kernel sends its outputs itself, and that sleep would only add latency.
    _execute_sleep = Float(0.0)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The notebook's sandbox: the one façade of every operation (see SandboxContext).
        self.sandbox = SandboxContext(
            self.url,
            self.token,
            self.timeout,
            self.side_timeout,
            names=KERNEL_NAMES,
            allow_host_paths=self.allow_host_paths,  # SANDBOX_ALLOW_HOST_PATHS=1 is read there
            host_paths_switch=KERNEL_SWITCH,
        )
        # Resolve now (a private server starts here). Settings that cannot be used do not stop
        # the kernel: the banner and every cell say what is wrong.
        self.sandbox.start()
        self._cancel: Cancellation | None = None
        #: The kernel's own I/O: an asyncio client in its event loop (see _run_cell).
        self._aclient: AsyncSandbox | None = None
        self._aclient_settings: object = None
        #: The client whose server named the stream extension but refused the WebSocket.
        self._stream_refused_by: AsyncSandbox | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cell_task: asyncio.Future[dict[str, Any]] | None = None
        self._live_run: LiveRun | None = None
        self._input_task: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[object]] = set()
        self._history: list[str] = []
        self._environment_files = editor.EnvironmentFiles()
        self._pending_notices = self._reopened_notice()
        self._wire_comms()

    def _wire_comms(self) -> None:
        """Comms for widgets (the panel): a kernelbase.Kernel gets no comm handlers of its own.

        The same wiring as ipykernel's Python kernel: one CommManager, the comm package told
        to create ipykernel comms, and the three comm messages routed to the manager (which
        ipykernel 7 dispatches even while a cell runs).
        """
        import comm
        from ipykernel.comm import Comm, CommManager

        self.comm_manager = CommManager(parent=self, kernel=self)
        comm.create_comm = Comm
        comm.get_comm_manager = lambda: self.comm_manager
        for message in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[message] = getattr(self.comm_manager, message)

    # -- kernel_info -------------------------------------------------------------------------------

    @property
    def banner(self) -> str:  # type: ignore[override]
        problem = self.sandbox.problem
        if problem is not None:
            return f"Sandbox (bash) kernel {__version__}. {problem}"
        settings = self.sandbox.settings
        lines = [
            f"Sandbox (bash) kernel {__version__}: cells run as bash in the sandbox at "
            f"{settings.url}, {settings.describe()}."
        ]
        # kernel_info is answered on the event loop: wait a little for the specifications (the
        # context's worker fetches them), never a whole timeout.
        try:
            specs = self.sandbox.submit(self.sandbox.specs).result(timeout=_BANNER_WAIT)
        except SandboxError as error:
            return "\n".join([*lines, f"The sandbox does not answer yet: {error}"])
        except concurrent.futures.TimeoutError:
            return "\n".join([*lines, f"The sandbox did not answer within {_BANNER_WAIT:g} s."])
        if specs.sandbox_version:
            lines.append(f"Sandbox version {specs.sandbox_version}.")
        if specs.isolation is not None and specs.isolation.isolated is False:
            lines.append("NOT ISOLATED: commands can read and write the server's machine.")
        return "\n".join(lines)

    # -- execution -----------------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        if store_history:
            self._history.append(code)
        self._loop = asyncio.get_running_loop()
        self._allow_stdin = allow_stdin  # whether the front-end answers input_request
        for notice in self._pending_notices:
            self._stream("stderr", notice + "\n")
        self._pending_notices = []
        if not code.strip():
            return self._ok()
        try:
            outcome = await self._execute_cell(code, silent)
        except SandboxNotConfigured as problem:  # the banner says it too
            outcome = CellOutcome(
                error=CellError(
                    "SandboxNotConfigured",
                    str(problem),
                    [f"Fix the setting, then restart the kernel. Settings: {KERNEL_SETTINGS_HELP}"],
                )
            )
        except (magics.MagicUsageError, OperationFailed, HostPathRefused) as problem:
            name = "UsageError" if isinstance(problem, magics.MagicUsageError) else "MagicError"
            outcome = CellOutcome(error=CellError(name, str(problem)))
        except Exception as bug:  # a reply is owed whatever happens, or the cell hangs
            self.log.exception("internal error running a cell")
            outcome = CellOutcome(
                error=CellError(
                    "InternalError",
                    f"{type(bug).__name__}: {bug}",
                    [
                        "This is a bug of the Sandbox kernel, not of the cell; the kernel log has "
                        "the details. The kernel keeps running."
                    ],
                )
            )
        if self.sandbox.started:
            self.sandbox.cell_done()
        if outcome is None:
            return self._ok()
        if not silent:
            self._publish(outcome)
        self._remember_environment()
        if outcome.error is None:
            return self._ok()
        error = outcome.error
        traceback = [f"{error.ename}: {error.evalue}", *error.advice]
        if not silent:
            self.send_response(
                self.iopub_socket,
                "error",
                {"ename": error.ename, "evalue": error.evalue, "traceback": traceback},
            )
        return {
            "status": "error",
            "execution_count": self.execution_count,
            "ename": error.ename,
            "evalue": error.evalue,
            "traceback": traceback,
        }

    async def _execute_cell(self, code: str, silent: bool) -> CellOutcome | None:
        """Magics of the leading lines first (nothing runs after a bad one), then the bash."""
        split = split_cell(code)
        for name, arguments in split.line_magics:
            outcome = await self._run_magic(name, arguments, None, silent)
            if outcome is not None and outcome.error is not None:
                return outcome
        if split.cell_magic is not None:
            return await self._run_magic(*split.cell_magic, silent)
        if not split.code.strip():
            return None
        return await self._run_cell(split.code)

    async def _run_magic(
        self, name: str, arguments: str, body: str | None, silent: bool
    ) -> CellOutcome | None:
        magic = magics.find(name)
        if body is None and magic.kind == "cell":
            raise magics.MagicUsageError(f"%%{name} is a cell magic: put it on the first line")
        if body is not None and magic.kind == "line":
            raise magics.MagicUsageError(f"%{name} is a line magic: write it with one %")
        result: magics.MagicResult | None
        if name == "sandbox_panel":  # widgets are made on the event loop's thread
            result = magic.run(self.sandbox, arguments, body)
        else:
            result = await self._run_magic_cancellable(
                lambda: magic.run(self.sandbox, arguments, body)
            )
        if result is None:
            return CellOutcome(
                error=_interrupted_magic(f"%%{name}" if body is not None else f"%{name}")
            )
        if not silent:
            for bundle in result.bundles:
                self._display(bundle)
        if result.view is not None:
            self._display(result.view._repr_mimebundle_())
            result.view.start()
        if result.script is None:
            return None
        outcome = await self._run_cell(result.script)
        if result.then is None:
            return outcome
        return await self._follow_up(result.then, outcome, name, silent)

    async def _follow_up(
        self,
        then: Callable[[CellOutcome], magics.MagicResult],
        outcome: CellOutcome,
        name: str,
        silent: bool,
    ) -> CellOutcome | None:
        """What a magic does after its script (a teaching cell's ``--check``): its output
        replaces the script's outcome (a failed compilation is a verdict, not an error)."""
        if not outcome.ran:
            return outcome  # unreachable, interrupted: nothing to check
        if not silent:
            self._publish(outcome)  # the compiler's messages; its error is the verdicts'
        result = await self._run_magic_cancellable(lambda: then(outcome))
        if result is None:
            return CellOutcome(error=_interrupted_magic(f"%%{name}"))
        if not silent:
            for bundle in result.bundles:
                self._display(bundle)
        return None

    async def _run_magic_cancellable(
        self, work: Callable[[], magics.MagicResult]
    ) -> magics.MagicResult | None:
        """Run a magic's work in a worker thread, every request of it cancelled by an
        interrupt; None when it was interrupted."""
        self._cancel = cancel = Cancellation()

        def run() -> magics.MagicResult:
            with cancel_scope(cancel):
                return work()

        try:
            return await asyncio.to_thread(run)
        except (OperationFailed, SandboxError):
            if cancel.cancelled:
                return None
            raise
        finally:
            self._cancel = None

    def _ok(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": {},
        }

    async def _run_cell(self, code: str) -> CellOutcome:
        """Run the cell through the kernel's asyncio client: streamed when the server offers
        it (output shown as it comes, keyboard input asked for), else one ``execute/``."""
        session = self.sandbox.session
        client = self._async_client()
        streams = await self._server_streams(client)
        if not session.client.has_specifications:
            # The session reads them (the server's identity, its time limit) while it reads
            # the answer, in this loop: fetch them once beforehand, in the worker thread.
            with contextlib.suppress(SandboxError):
                await asyncio.wrap_future(self.sandbox.submit(session.client.specs))
        while True:
            cell = session.prepare(code)
            live = LiveFrames(self.max_output, cell.prologue_lines) if streams else None
            try:
                answer = await self._request(self._send(client, cell, live))
            except SandboxStreamRefused as refused:  # nothing ran: go on without streaming
                self.log.warning("%s", refused)
                self._stream("stderr", _NO_STREAM_NOTICE)
                self._stream_refused_by, streams = client, False
                continue
            except SandboxError as error:
                failed = session.failed(error)
                if failed is not None:
                    return failed
                # The environment is gone: once more in a fresh one (which cannot be lost).
                self._stream("stderr", session.lost_notice + "\n")
                continue
            outcome = session.finish(cell, answer, live)
            if outcome.pending_displays:
                await asyncio.wrap_future(self.sandbox.submit(session.fetch_displays, outcome))
            return outcome

    def _async_client(self) -> AsyncSandbox:
        """The client of the current settings (``%sandbox_connect`` replaces them)."""
        settings = self.sandbox.settings
        if self._aclient is None or self._aclient_settings is not settings:
            if self._aclient is not None:
                self._in_background(self._aclient.close())
            self._aclient = AsyncSandbox(
                settings.url,
                settings.timeout,
                settings.token,
                timeout_setting=settings.timeout_setting,
            )
            self._aclient_settings = settings
        return self._aclient

    async def _server_streams(self, client: AsyncSandbox) -> bool:
        """Whether the server offers the streaming extension (PremierLangage servers do not:
        they get plain ``execute/``, unchanged)."""
        if self._stream_refused_by is client:
            return False
        try:
            return protocol.EXTENSION_STREAM in await client.extensions()
        except SandboxError:  # the execute/ that follows says what is wrong
            return False

    async def _request(self, sending: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """Await ``sending`` as a task an interrupt can cancel (closing its connection: the
        embedded server then kills the run); a cancelled one raises SandboxCancelled."""
        task = asyncio.ensure_future(sending)
        self._cell_task = task
        try:
            await asyncio.wait({task})
        finally:
            self._cell_task = None
            if not task.done():  # this coroutine itself was cancelled (shutdown)
                task.cancel()
        if task.cancelled():
            raise SandboxCancelled("the cell was interrupted")
        return task.result()

    async def _send(
        self, client: AsyncSandbox, cell: PreparedCell, live: LiveFrames | None
    ) -> dict[str, Any]:
        on_busy = self._busy_line()
        try:
            if live is None:
                return await client.execute(cell.config, on_busy=on_busy)
            async with client.open_stream(
                cell.config, on_busy=on_busy, on_queue=on_busy.queued
            ) as run:
                self._live_run = run
                async for event in run:
                    on_busy.done()  # the run started: the busy line goes
                    if isinstance(event, Output):
                        text = live.feed(event.stream, event.text)
                        if text:
                            self._stream(event.stream, text)
                    else:  # the prompt it carries was streamed already: shown once
                        self._ask_input(run)
                return run.answer
        finally:
            self._live_run = None
            on_busy.done()
            if self._input_task is not None:  # a reply coming after the run is ignored
                self._input_task.cancel()
                self._input_task = None

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        """Run ``work`` as a task the kernel keeps (asyncio holds only weak references)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _busy_line(self) -> _BusyLine:
        return _BusyLine(self, self.get_parent())

    # -- keyboard input ----------------------------------------------------------------------

    def _ask_input(self, run: LiveRun) -> None:
        """Ask the front-end for a line (``input_request``) without blocking the event loop:
        output keeps streaming while the user types. Without a front-end able to answer
        (nbclient, ``demo``: ``allow_stdin`` false), the program reads end-of-file."""
        if not self._allow_stdin:
            self._in_background(run.send_eof())
            return
        if self._input_task is not None and not self._input_task.done():
            return  # one box at a time: the protocol asks again only after an answer
        self._input_task = asyncio.ensure_future(self._forward_input(run))

    async def _forward_input(self, run: LiveRun) -> None:
        value = await self._input_reply()
        # An empty submission is end-of-file (JupyterLab's box has no Ctrl-D); "\x04" too
        # (ipykernel's convention for EOF).
        if value in ("", "\x04"):
            await run.send_eof()
        else:
            await run.send_stdin(value + "\n")

    async def _input_reply(self) -> str:
        """One ``input_request`` on the stdin socket, and its reply, awaited by polling the
        socket without blocking (ipykernel's ``raw_input`` busy-waits the thread, which would
        freeze the stream). The prompt the program printed is already shown as output."""
        assert self.session is not None
        socket = self.stdin_socket
        while self.session.recv(socket, mode=zmq.NOBLOCK)[1] is not None:
            pass  # stale replies (a box answered after its cell ended)
        self.session.send(
            socket,
            "input_request",
            {"prompt": "", "password": False},
            self.get_parent("shell"),
            ident=self._parent_ident["shell"],
        )
        while True:
            _ident, reply = self.session.recv(socket, mode=zmq.NOBLOCK)
            if reply is not None:
                value = reply.get("content", {}).get("value", "")
                return value if isinstance(value, str) else ""
            await asyncio.sleep(_INPUT_POLL)

    def _publish(self, outcome: CellOutcome) -> None:
        if outcome.stdout:
            self._stream("stdout", outcome.stdout)
        if outcome.stderr:
            self._stream("stderr", outcome.stderr)
        for display in outcome.displays:
            self._display(render.file_bundle(display.name, display.mime, display.data))
        for notice in outcome.notices:  # after the cell's own output: they are about it
            self._stream("stderr", notice.rstrip("\n") + "\n")

    def _display(self, data: Bundle) -> None:
        self.send_response(self.iopub_socket, "display_data", {"data": data, "metadata": {}})

    def _stream(self, name: str, text: str) -> None:
        self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    # -- interrupts ----------------------------------------------------------------------------

    def _interrupt(self) -> None:
        """From any thread (the control channel's, a SIGINT handler): stop what runs."""
        cancel = self._cancel
        if cancel is not None:
            cancel.cancel()
        if self._cell_task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_cell)

    def _stop_cell(self) -> None:
        """A streamed run is asked to stop (its output so far, files and shell state are
        kept); past a grace, or for a plain request, the request is cancelled (connection
        closed: the embedded server kills the run)."""
        task, run = self._cell_task, self._live_run
        if task is None or task.done():
            return
        if run is not None:
            self._in_background(run.stop())
            assert self._loop is not None
            self._loop.call_later(_STOP_GRACE, task.cancel)
        else:
            task.cancel()

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Cancel the running cell (interrupt_mode "message"): no signal involved."""
        self._interrupt()
        if self.session is not None:
            self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    def pre_handler_hook(self) -> None:
        # A SIGINT (interrupt_mode "signal", or Ctrl-C in a console) cancels the request
        # instead of raising KeyboardInterrupt somewhere in the event loop.
        self.saved_sigint_handler = signal.signal(signal.SIGINT, lambda *_: self._interrupt())

    def post_handler_hook(self) -> None:
        signal.signal(signal.SIGINT, self.saved_sigint_handler)

    # -- notebooks reopened, environment remembered -----------------------------------------------

    def _reopened_notice(self) -> list[str]:
        notebook = os.environ.get("JPY_SESSION_NAME")
        if not notebook:
            return []
        if self.sandbox.problem is not None:
            return []
        record = records.last_environment(
            notebook, records.identity_of(self.sandbox.session.client)
        )
        if record is None:
            return []
        return [
            f"This notebook last used the sandbox environment {record['environment']}"
            f"{_lifetime(record.get('expire'))}. This kernel starts a fresh one; "
            f"to continue with those files and shell state, run: %sandbox_use "
            f"{record['environment']}"
        ]

    def _remember_environment(self) -> None:
        notebook = os.environ.get("JPY_SESSION_NAME")
        if not notebook or not self.sandbox.started:
            return
        session = self.sandbox.session
        if session.environment:
            records.remember(
                notebook, records.identity_of(session.client), session.environment, session.expire
            )

    # -- editor support ----------------------------------------------------------------------------

    def _knowledge(self) -> editor.Knowledge:
        """What completion and inspection know: the shell state, and the inventory once it is
        fetched (the first call starts fetching it in the background, 1 to 2 s on the public
        server; completion works without it meanwhile)."""
        inventory = self.sandbox.cached_inventory if self.sandbox.started else None
        if inventory is None and self.sandbox.started:
            self.sandbox.prefetch_inventory()
        session = self.sandbox.session if self.sandbox.started else None
        return editor.Knowledge(
            state=session.state if session else ShellState(),
            environ=session.environ if session else {},
            inventory=inventory,
        )

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        context = self.sandbox if self.sandbox.started else None
        knowledge = self._knowledge()
        return await self._environment_files.complete(context, code, cursor_pos, knowledge)

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        if self.sandbox.started and self.sandbox.cached_inventory is None:
            coming = asyncio.wrap_future(self.sandbox.prefetch_inventory())
            with contextlib.suppress(Exception):  # inspection works without it
                await asyncio.wait_for(asyncio.shield(coming), 5)
        return editor.inspect(code, cursor_pos, self._knowledge())

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        return await asyncio.to_thread(editor.is_complete, code)

    async def do_history(
        self,
        hist_access_type: str,
        output: bool,
        raw: bool,
        session: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        cells = [(0, number, code) for number, code in enumerate(self._history, start=1)]
        if hist_access_type == "tail":
            cells = cells[-n:] if n else cells
        elif hist_access_type == "range":
            cells = [c for c in cells if (start or 0) <= c[1] and (stop is None or c[1] < stop)]
        elif hist_access_type == "search":
            cells = [c for c in cells if fnmatch.fnmatch(c[2], pattern or "*")]
            if unique:
                seen: set[str] = set()
                cells = [c for c in cells if not (c[2] in seen or seen.add(c[2]))]  # type: ignore[func-returns-value]
            cells = cells[-n:] if n else cells
        history: list[Any] = [
            (s, line, (code, None)) if output else (s, line, code) for s, line, code in cells
        ]
        return {"status": "ok", "history": history}

    # -- shutdown ----------------------------------------------------------------------------------

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        self._interrupt()
        if self.sandbox.started and self.sandbox.session.environment:
            # Kept in the kernel's log: after a restart, %sandbox_use UUID goes back to it.
            self.log.warning(
                "%s: the notebook's sandbox environment was %s",
                "restarting" if restart else "shutting down",
                self.sandbox.session.environment,
            )
        for panel in list(self.sandbox.panels):  # their polling tasks live on this loop
            with contextlib.suppress(Exception):
                panel.close()
        if self._aclient is not None:
            await self._aclient.close()
        await asyncio.to_thread(self.sandbox.close)
        return {"status": "ok", "restart": restart}


def _lifetime(expire: object) -> str:
    """`` (expires in 23 h)`` from a recorded ``expire``; nothing when it is not known."""
    text = render.expires_text(expire if isinstance(expire, str) else None)
    return f" ({text})" if text else ""


def _interrupted_magic(written: str) -> CellError:
    return CellError(
        "Interrupted",
        f"{written} was interrupted",
        [
            "Its request to the sandbox was abandoned and its connection closed, so the magic "
            "did not finish: run it again when you want it."
        ],
    )


class _BusyLine:
    """``on_busy`` of a cell: one updating line while the server answers 503 (the client waits
    and retries), or while a sandbox cluster holds the run in its queue (``queued``, from its
    queue events: "3 ahead of you"); cleared when the cell runs."""

    def __init__(self, kernel: SandboxKernel, parent: Any) -> None:
        self.kernel, self.display_id = kernel, f"sandbox-busy-{id(parent)}"
        self.shown = False

    def __call__(self, attempt: int, wait: float, elapsed: float) -> None:
        self._show(_BUSY_TEXT.format(attempt=attempt, elapsed=elapsed))

    def queued(self, ahead: int) -> None:
        """``on_queue`` of a streamed run: ``ahead`` runs wait before this one."""
        self._show(_QUEUED_TEXT.format(ahead=ahead) if ahead else _NEXT_TEXT)

    def _show(self, text: str) -> None:
        content = {
            "data": {"text/plain": text},
            "metadata": {},
            "transient": {"display_id": self.display_id},
        }
        kind = "update_display_data" if self.shown else "display_data"
        self.shown = True
        self.kernel.send_response(self.kernel.iopub_socket, kind, content)

    def done(self) -> None:
        if self.shown:
            self.shown = False
            self.kernel.send_response(self.kernel.iopub_socket, "clear_output", {"wait": False})


class SandboxKernelApp(IPKernelApp):
    """The kernel application, without Python's stdout/stderr capture.

    Cells print in the sandbox, not in this process; what the kernel itself prints belongs to
    its log. ipykernel's capture would make every message a cross-thread flush round trip.
    """

    def init_io(self) -> None:
        # ipykernel keeps the execution count on the display hook; nothing else is needed.
        self.displayhook = import_item(str(self.displayhook_class))(self.session, self.iopub_socket)

    @classmethod
    def launch(cls) -> None:
        cls.launch_instance(kernel_class=SandboxKernel)
