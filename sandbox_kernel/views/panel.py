"""The sandbox panel (``%sandbox_panel``): an ipywidgets view of the sandbox that stays live.

Tabs: Overview (which server, the environment and when it expires), Specifications,
Libraries (the main tools and the categories at a glance, then search as you type), Load (one
gauge and a chart of the last minutes, refreshed in the background; on a sandbox cluster,
the load of each worker and the total) and Files (the shell's
directory: show or download a file).

Every request goes through the notebook's :class:`SandboxContext`, in its one worker thread;
the panel only awaits the futures, so the kernel's event loop never waits for the sandbox
(``libraries/`` takes 1 to 2 s: the panel opens at once and fills the tab when it comes). The
inventory and the specifications are the context's, fetched once and shared with the magics
and other panels. The panel imports the façade and :mod:`.render`, never the magics.

Polling keeps at most one request in flight: the next one starts after the previous one
answered, and the interval stretches to 1.5 times the last round trip (``usages/`` takes 2 s
on the public server). While the sandbox is unreachable the wait doubles up to a minute, the
panel says so, and it recovers by itself. Polling stops when the panel is closed and when the
kernel shuts down. Whatever a round raises (a malformed answer included) is shown and the
polling goes on.

HTML widgets render their value as markup in the notebook page, which holds the user's Jupyter
credentials: every string that comes from the server or the sandbox (specifications, library
names, file names and contents, errors) is HTML-escaped before it goes into one.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import html
import logging
import posixpath
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import ipywidgets as widgets

from .._errors import SandboxConnectionError, SandboxError, SandboxTimeout
from .._generations import CATEGORIES, Inventory, Library, Load, Specs
from .._wire import LoadSample
from ..protocol import WORKING_DIR
from ..session import mime_type
from ..session.cellscript import LISTED_ENTRIES
from ..session.context import OperationFailed, SandboxContext
from . import render

log = logging.getLogger(__name__)

__all__ = ["Poller", "SandboxPanel", "file_html", "ranked"]

_T = TypeVar("_T")

#: The value of the "every category" choice of the Libraries tab.
ALL = "all"
TITLES = ("Overview", "Specifications", "Libraries", "Load", "Files")
_LIBRARIES_TAB = TITLES.index("Libraries")
#: Rows shown at once in the Libraries tab (the caption says when there are more).
_ROWS = 100
_HISTORY_SECONDS = 300.0
_MAX_BACKOFF = 60.0
#: The largest file the Files tab shows (a bigger one is downloaded instead).
_MAX_SHOWN = 5 * 1024**2
#: Errors that mean the sandbox is not reachable (as opposed to answering wrongly).
_UNREACHABLE = (SandboxConnectionError, SandboxTimeout, OSError)
_BUSY_STYLES = ((0.5, "success"), (0.8, "warning"), (float("inf"), "danger"))


class Poller(Generic[_T]):
    """Awaits ``sample()`` again and again, one at a time, until stopped.

    ``interval`` is the wish; the real wait is at least 1.5 times the last round trip, and
    doubles (up to a minute) while ``sample`` fails. Whatever goes wrong in a round (a
    malformed answer, a bug in showing it) goes to ``on_error`` and the polling goes on: a
    live view must never stop silently.
    """

    def __init__(
        self,
        sample: Callable[[], Awaitable[_T]],
        on_sample: Callable[[_T, float], None],
        on_error: Callable[[Exception, float], None],
        interval: float = 2.0,
    ) -> None:
        self.sample, self.on_sample, self.on_error = sample, on_sample, on_error
        self.interval = interval
        self.paused = False
        self.failures = 0
        self.polls = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def poke(self) -> None:
        """Re-evaluate now (resumed, interval changed)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if self.paused:
                await self._sleep(3600)
                continue
            wait = await self._round()
            self.polls += 1
            await self._sleep(wait)

    async def _round(self) -> float:
        """One sample, shown; returns how long to wait before the next one."""
        started = time.monotonic()
        try:
            sample = await self.sample()
            wait = max(self.interval, 1.5 * (time.monotonic() - started))
            self.on_sample(sample, wait)
        except Exception as error:  # anything: shown, then the next round after a longer wait
            self.failures += 1
            wait = min(_MAX_BACKOFF, self.interval * 2.0 ** min(self.failures, 16))
            try:
                self.on_error(error, wait)
            except Exception:  # showing the error failed too: the log keeps it
                log.exception("the panel could not show a refresh error: %r", error)
            return wait
        self.failures = 0
        return wait

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)


class SandboxPanel:
    """The widgets and the live refresh of one panel on ``context``.

    The constructor makes no request and never waits; :meth:`start` (on the kernel's event
    loop) begins the background work. After each cell the context calls
    :meth:`refresh_environment`; :meth:`close` stops everything.
    """

    def __init__(self, context: SandboxContext, interval: float = 2.0) -> None:
        self.context = context
        self.history: collections.deque[Load] = collections.deque()
        self.inventory: Inventory | None = None
        self.specs: Specs | None = None
        self.connected: bool | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inventory_task: asyncio.Task[None] | None = None
        self._make_widgets(interval)
        self.poller: Poller[LoadSample] = Poller(
            self._sample, self._on_sample, self._on_error, interval
        )
        self._wire()
        self.refresh_environment()

    def _make_widgets(self, interval: float) -> None:
        self.overview = widgets.HTML()
        self.specifications = widgets.HTML(
            value="<i>Asking the sandbox for its specifications…</i>"
        )
        self.search = widgets.Text(placeholder="a name, or a glob such as py*",
                                   description="Search", continuous_update=True)  # fmt: skip
        self.category = widgets.ToggleButtons(options=_category_options(None), value=ALL,
                                              style={"button_width": "auto"})  # fmt: skip
        self.library_list = widgets.HTML(
            value="<i>Asking the sandbox what it has installed (it starts a container for "
            "that: a second or two)…</i>"
        )
        self.gauge = widgets.FloatProgress(min=0.0, max=1.0, description="Load",
                                           bar_style="success")  # fmt: skip
        self.load_text = widgets.HTML(value="<i>Measuring the load…</i>")
        self.chart = widgets.HTML()
        #: A sandbox cluster's load worker by worker; empty for a single server.
        self.workers = widgets.HTML()
        self.state = widgets.HTML()
        self.interval = widgets.BoundedFloatText(value=interval, min=0.5, max=600.0, step=0.5,
                                                 description="Every (s)")  # fmt: skip
        self.pause = widgets.ToggleButton(value=False, description="Pause", icon="pause")
        self.files_heading = widgets.HTML()
        self.files = widgets.Select(options=[], rows=8, description="Files")
        self.download = widgets.Button(description="Download", icon="download",
                                       tooltip="Save the file next to the notebook")  # fmt: skip
        self.show = widgets.Button(description="Show", icon="eye", tooltip="Show it below")
        self.file_view = widgets.HTML()
        self.close_button = widgets.Button(description="Close panel", icon="times")
        self.tabs = widgets.Tab(children=[
            self.overview,
            self.specifications,
            widgets.VBox([self.search, self.category, self.library_list]),
            widgets.VBox([widgets.HBox([self.gauge, self.load_text]), self.chart, self.workers,
                          widgets.HBox([self.interval, self.pause]), self.state]),
            widgets.VBox([self.files_heading, self.files, widgets.HBox([self.download, self.show]),
                          self.file_view]),
        ])  # fmt: skip
        self.tabs.titles = TITLES
        self.widget = widgets.VBox([self.tabs, self.close_button])

    def _wire(self) -> None:
        self.search.observe(lambda _: self._filter(), names="value")
        self.category.observe(lambda _: self._filter(), names="value")
        self.tabs.observe(self._tab_changed, names="selected_index")
        self.interval.observe(self._interval_changed, names="value")
        self.pause.observe(self._pause_changed, names="value")
        self.download.on_click(lambda _: self._file_action(save=True))
        self.show.on_click(lambda _: self._file_action(save=False))
        self.close_button.on_click(lambda _: self.close())

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin the background work; call on the kernel's event loop. Returns at once."""
        self._spawn(self._show_specifications())
        self._inventory_task = self._spawn(self._show_inventory())
        self.poller.start()
        self.context.panels.append(self)

    def close(self) -> None:
        self.poller.stop()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(ValueError):
            self.context.panels.remove(self)
        _close_tree(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _in_worker(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` in the context's worker thread, awaited without blocking."""
        return await asyncio.wrap_future(self.context.submit(function, *args))

    # -- overview -----------------------------------------------------------------------------

    def refresh_environment(self) -> None:
        """After each cell: the environment, its expiry and the Files tab. Makes no request."""
        self.overview.value = self._overview_html()
        self._refresh_files()

    def _overview_html(self) -> str:
        if not self.context.started:
            problem = self.context.problem
            if problem:
                return f"<b>{html.escape(problem)}</b>"
            return "<i>Connecting to the sandbox…</i>"
        settings, session, specs = self.context.settings, self.context.session, self.specs
        environment = session.environment
        if environment:
            expiry = render.expires_text(session.expire)
            environment += f", {expiry}" if expiry else ""
        rows = [
            ("server", settings.describe()),
            ("URL", settings.url),
            ("sandbox version", specs.sandbox_version if specs else None),
            ("isolation", render.isolation_text(specs.isolation) if specs and specs.isolation
             else None),
            ("environment", environment or "none yet: the first cell makes one"),
            ("connection", {None: "checking…", True: "connected", False: "unreachable"}[
                self.connected]),
            ("load", render.load_figures(self.history[-1]) if self.history else None),
        ]  # fmt: skip
        told = [(name, value) for name, value in rows if value]
        return str(render.key_values(told)["text/html"])

    # -- specifications and libraries ------------------------------------------------------------

    async def _show_specifications(self) -> None:
        try:
            self.specs = await self._in_worker(self.context.specs)
            bundle = render.specifications(self.context.settings.url, self.specs)
            self.specifications.value = bundle["text/html"]
            self.refresh_environment()
        except Exception as error:  # shown in the tab, never lost in the event loop
            self.specifications.value = (
                f"<b>Could not read the specifications:</b> {_error_html(error)}"
            )
            self.overview.value = self._overview_html()

    async def _show_inventory(self) -> None:
        try:
            await self._in_worker(self.context.start)  # resolved once; instant when it is
            self.inventory = await asyncio.wrap_future(self.context.prefetch_inventory())
        except Exception as error:
            self.library_list.value = (
                f"<b>Could not list what the sandbox has installed:</b> {_sentence_html(error)} "
                "Open this tab again to retry."
            )
            return
        index = self.category.index
        self.category.options = _category_options(self.inventory)
        self.category.index = index
        self._filter()

    def library_rows(self, pattern: str, category: str = ALL) -> list[Library]:
        """Rows of the inventory for a search, best matches first; empty until it is known."""
        if self.inventory is None:
            return []
        return ranked(self.inventory.rows(None if category == ALL else category, pattern), pattern)

    def _filter(self) -> None:
        if self.inventory is None:
            return
        pattern, category = self.search.value.strip(), self.category.value
        if not pattern and category == ALL:
            self.library_list.value = render.inventory_summary(self.inventory)["text/html"]
            return
        rows = self.library_rows(pattern, category)
        self.library_list.value = render.libraries(rows[:_ROWS], len(rows), _ROWS)["text/html"]

    def _tab_changed(self, change: dict[str, Any]) -> None:
        if change["new"] != _LIBRARIES_TAB:
            return
        # Text has no autofocus: the view exists once its tab is shown, and focus() reaches it.
        self.search.focus()
        task = self._inventory_task
        if self.inventory is None and (task is None or task.done()):  # the last fetch failed
            self.library_list.value = "<i>Asking the sandbox again what it has installed…</i>"
            self._inventory_task = self._spawn(self._show_inventory())

    # -- load -----------------------------------------------------------------------------------

    async def _sample(self) -> LoadSample:
        return await self._in_worker(self.context.load_sample)

    def _on_sample(self, sample: LoadSample, wait: float) -> None:
        self.connected = True
        load = sample.load
        tables = [] if sample.workers is None else [render.workers_table(sample.workers)]
        if load.users is not None:  # a teacher: every user's share
            tables.append(render.users_table(load.users))
        self.workers.value = "".join(table["text/html"] for table in tables)
        self.history.append(load)
        while self.history and self.history[0].at < load.at - _HISTORY_SECONDS:
            self.history.popleft()
        fraction = load.fraction
        self.gauge.value = fraction or 0.0
        self.gauge.bar_style = next(s for limit, s in _BUSY_STYLES if (fraction or 0.0) < limit)
        self.load_text.value = (
            f"<span style='font-size:1.25em'>{html.escape(render.load_figures(load))}</span>"
        )
        self.chart.value = render.load_chart(list(self.history))
        self.state.value = f"live · next refresh in {render.human_duration(wait)}"
        self.overview.value = self._overview_html()  # the connection, the expiry countdown

    def _on_error(self, error: Exception, wait: float) -> None:
        if isinstance(error, _UNREACHABLE):
            what = "sandbox unreachable"
            changed = self.connected is not False
            self.connected = False
        elif isinstance(error, SandboxError):
            what = "the sandbox's answer could not be used"
            changed = False
        elif isinstance(error, OperationFailed):
            what = "the sandbox cannot be used"
            changed = False
        else:
            what = "the load could not be shown"
            changed = False
        self.state.value = (
            f"<b>{what}</b> ({_error_html(error, 300)}); retrying in {render.human_duration(wait)}"
        )
        if changed:
            self.refresh_environment()
        else:
            self.overview.value = self._overview_html()

    def _interval_changed(self, change: dict[str, Any]) -> None:
        self.poller.interval = float(change["new"])
        self.poller.poke()

    def _pause_changed(self, change: dict[str, Any]) -> None:
        self.poller.paused = bool(change["new"])
        self.pause.description = "Resume" if self.poller.paused else "Pause"
        self.pause.icon = "play" if self.poller.paused else "pause"
        self.state.value = "paused" if self.poller.paused else "resuming…"
        self.poller.poke()

    # -- files ----------------------------------------------------------------------------------

    def _refresh_files(self) -> None:
        """The shell's directory, named, and its files (folders are counted, not listed)."""
        if not self.context.started:
            return
        session = self.context.session
        entries = session.state.files
        files = [name for name in entries if not name.endswith("/")]
        selected = self.files.value
        self.files.options = files
        if selected in files:
            self.files.value = selected
        self.files_heading.value = _files_heading(
            session.environment, session.state.cwd, len(entries) - len(files), len(entries)
        )

    def _file_action(self, save: bool) -> None:
        name = self.files.value
        if not name:
            self.file_view.value = "<i>Choose a file first.</i>"
            return
        self._spawn(self._fetch_file(name, save))

    async def _fetch_file(self, name: str, save: bool) -> None:
        self.file_view.value = f"<i>Fetching {html.escape(name)}…</i>"
        try:
            if save:
                # Checked before anything is fetched: the notebook's folder, no overwriting.
                target = self.context.local_target(".", posixpath.basename(name), False,
                                                   "The panel's Download")  # fmt: skip
                data = await self._in_worker(self._download, name, None)
                self.context.save_locally(target, data, force=False)
                self.file_view.value = (
                    f"Saved to {html.escape(str(target))} ({render.human_bytes(len(data))})"
                )
            else:
                data = await self._in_worker(self._download, name, _MAX_SHOWN)
                self.file_view.value = file_html(name, data)
        except Exception as error:  # shown in the panel, never raised into the event loop
            self.file_view.value = f"<b>{_error_html(error)}</b>"

    def _download(self, name: str, limit: int | None) -> bytes:
        """A file of the shell's directory, no larger than the server announced (a server
        sending more is cut off, as for ``%sandbox_download``) nor than ``limit``. Blocking:
        the panel runs it in the context's worker thread."""
        return self.context.fetch(self.context.remote_path(name), limit=limit)


def _close_tree(widget: widgets.Widget) -> None:
    """Close a widget and every widget inside it (their models leave the front-end)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def ranked(rows: Sequence[Library], pattern: str) -> list[Library]:
    """Search results as people expect them: the exact name first, then names starting with
    the pattern, then the rest (each group in category, then name, order). A glob keeps the
    order it has."""
    if not pattern or any(char in pattern for char in "*?["):
        return list(rows)
    wanted = pattern.lower()
    return sorted(
        rows, key=lambda r: (r.name.lower() != wanted, not r.name.lower().startswith(wanted))
    )


def _category_options(inventory: Inventory | None) -> list[tuple[str, str]]:
    """The category buttons, with how many entries each holds once the inventory is known."""
    names = [(ALL, "all"), *((name, render.CATEGORY_LABELS.get(name, name)) for name in CATEGORIES)]
    if inventory is None:
        return [(label, value) for value, label in names]
    counts = inventory.counts()
    counts[ALL] = sum(counts.values())
    return [(f"{label} · {counts.get(value, 0)}", value) for value, label in names]


def _files_heading(environment: str | None, cwd: str | None, folders: int, listed: int) -> str:
    """What the Files tab lists: the shell's current directory, named."""
    if not environment:
        return "<i>No environment yet: run a cell, and the files it leaves show here.</i>"
    directory = cwd or WORKING_DIR
    where = "the shell's current directory" if cwd else "the working directory"
    if directory != WORKING_DIR and not directory.startswith(WORKING_DIR + "/"):
        return (
            f"The shell is in <code>{html.escape(directory)}</code>, outside the environment "
            f"(<code>{WORKING_DIR}</code>): only files under it are kept. "
            "<code>cd</code> back there in a cell to list them."
        )
    notes = []
    if folders:
        notes.append(
            f"{folders} folder{'s' if folders != 1 else ''} not listed: download the whole "
            "environment with %sandbox_download"
        )
    if listed >= LISTED_ENTRIES:
        notes.append(f"only the first {LISTED_ENTRIES} entries are listed")
    note = f" <span style='opacity:0.75'>({'; '.join(notes)})</span>" if notes else ""
    return f"Files in <code>{html.escape(directory)}</code>, {where}{note}"


def _error_html(error: BaseException, limit: int = 2000) -> str:
    """An error's message for a widget's HTML value: escaped (it may hold a server's text)."""
    return html.escape(str(error)[:limit] or type(error).__name__)


def _sentence_html(error: BaseException) -> str:
    """:func:`_error_html` ending with one full stop, for a sentence that goes on."""
    text = _error_html(error)
    return text if text.endswith((".", "!", "?")) else text + "."


def file_html(name: str, data: bytes) -> str:
    """A file shown inside the panel (an HTML widget, which renders its value as HTML): images
    as ``<img>`` from base64 data (SVG included: an image runs no script), anything else as
    escaped text. The file's name and content never become markup."""
    mime = mime_type(name)
    if mime.startswith("image/"):
        encoded = base64.b64encode(data).decode("ascii")
        return f'<img alt="{html.escape(name, quote=True)}" src="data:{mime};base64,{encoded}"/>'
    return f"<pre>{html.escape(data.decode('utf-8', errors='replace')[:100_000])}</pre>"
