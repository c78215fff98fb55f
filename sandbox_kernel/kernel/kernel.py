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
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel
from traitlets import Bool, Float, Unicode
from traitlets.utils.importstring import import_item

from .. import __version__, magics
from .._errors import SandboxError
from ..client import Cancellation, cancel_scope
from ..magics.cells import split_cell
from ..session import CellError, CellOutcome, ShellState, records
from ..session.context import OperationFailed, SandboxContext, SandboxNotConfigured
from ..session.local_paths import KERNEL_SWITCH, HostPathRefused
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
#: Cells this many seconds apart at most are shown as one "busy" line update.
_BUSY_TEXT = "sandbox busy, waiting… (attempt {attempt}, {elapsed:.0f} s so far)"


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
        self._history: list[str] = []
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
            result = await self._run_magic_cancellable(magic, arguments, body)
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
        if result.script is not None:
            return await self._run_cell(result.script)
        return None

    async def _run_magic_cancellable(
        self, magic: magics.Magic, arguments: str, body: str | None
    ) -> magics.MagicResult | None:
        """Run a magic in a worker thread, every request of it cancelled by an interrupt;
        None when it was interrupted."""
        self._cancel = cancel = Cancellation()

        def run() -> magics.MagicResult:
            with cancel_scope(cancel):
                return magic.run(self.sandbox, arguments, body)

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
        """Run the cell in a worker thread; busy waits show one updating line."""
        loop = asyncio.get_running_loop()
        parent = self.get_parent()
        busy_shown = False

        def on_busy(attempt: int, wait: float, elapsed: float) -> None:
            nonlocal busy_shown
            text = _BUSY_TEXT.format(attempt=attempt, elapsed=elapsed)
            kind = "update_display_data" if busy_shown else "display_data"
            busy_shown = True
            content = {
                "data": {"text/plain": text},
                "metadata": {},
                "transient": {"display_id": f"sandbox-busy-{id(parent)}"},
            }
            loop.call_soon_threadsafe(self.send_response, self.iopub_socket, kind, content)

        self._cancel = cancel = Cancellation()

        def run() -> CellOutcome:  # the displays fetched after the execute are cancellable too
            with cancel_scope(cancel):
                return self.sandbox.session.run_cell(code, cancel=cancel, on_busy=on_busy)

        try:
            return await asyncio.to_thread(run)
        finally:
            self._cancel = None
            if busy_shown:  # the cell runs now: the busy line disappears
                self.send_response(self.iopub_socket, "clear_output", {"wait": False})

    def _publish(self, outcome: CellOutcome) -> None:
        for notice in outcome.notices:
            self._stream("stderr", notice.rstrip("\n") + "\n")
        if outcome.stdout:
            self._stream("stdout", outcome.stdout)
        if outcome.stderr:
            self._stream("stderr", outcome.stderr)
        for display in outcome.displays:
            self._display(render.file_bundle(display.name, display.mime, display.data))

    def _display(self, data: Bundle) -> None:
        self.send_response(self.iopub_socket, "display_data", {"data": data, "metadata": {}})

    def _stream(self, name: str, text: str) -> None:
        self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    # -- interrupts ----------------------------------------------------------------------------

    def _interrupt(self) -> None:
        cancel = self._cancel
        if cancel is not None:
            cancel.cancel()

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
        record = records.last_environment(notebook, self.sandbox.url)
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
            records.remember(notebook, self.sandbox.url, session.environment, session.expire)

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
        return editor.complete(code, cursor_pos, self._knowledge())

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
