"""The sandbox panel (``%sandbox_panel``): an ipywidgets view of the sandbox that stays live.

Tabs: Overview, Specifications, Libraries (search as you type), Load (gauge, CPU, memory and
a small history, refreshed in the background) and Files (download or show a file).

Everything slow happens off the kernel's event loop, in worker threads, with the panel's own
client (a requests session is not meant to be shared between threads). Polling keeps at most
one request in flight: the next one starts after the previous one answered, and the interval
stretches to 1.5 times the last round trip (``usages/`` takes 2 s on the public server). While
the sandbox is unreachable the wait doubles up to a minute, the panel says so, and it recovers
by itself. Polling stops when the panel is closed and when the kernel shuts down. Whatever a
round raises (a malformed answer included) is shown and the polling goes on.

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
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from .._errors import SandboxConnectionError, SandboxError, SandboxTimeout
from ..client import Sandbox
from ..magics import operations
from ..magics.operations import (
    LoadSample,
    environment_path,
    library_rows,
    local_target,
    matches,
    sample_load,
    write_new,
)
from ..session import mime_type
from ..session.connection import SandboxContext
from . import render

log = logging.getLogger(__name__)

__all__ = ["LoadSample", "Poller", "SandboxPanel", "file_html", "history_svg", "sample_load"]

CATEGORIES = ["all", *operations.CATEGORIES]
_ROWS = 100
_HISTORY_SECONDS = 300.0
_MAX_BACKOFF = 60.0
#: The largest file the Files tab shows (a bigger one is downloaded instead).
_MAX_SHOWN = 5 * 1024**2
#: Errors that mean the sandbox is not reachable (as opposed to answering wrongly).
_UNREACHABLE = (SandboxConnectionError, SandboxTimeout, OSError)


class Poller:
    """Calls ``sample`` in a worker thread, one call at a time, until stopped.

    ``interval`` is the wish; the real wait is at least 1.5 times the last round trip, and
    doubles (up to a minute) while ``sample`` fails. Whatever goes wrong in a round (a
    malformed answer, a bug in showing it) goes to ``on_error`` and the polling goes on: a
    live view must never stop silently.
    """

    def __init__(
        self,
        sample: Callable[[], LoadSample],
        on_sample: Callable[[LoadSample, float], None],
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
            sample = await asyncio.to_thread(self.sample)
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
    """The widgets and the live refresh of one panel."""

    def __init__(self, context: SandboxContext, interval: float = 2.0) -> None:
        self.context = context
        connection = context.connection
        # Specifications and libraries come from the connection's cache (fetched once, shared
        # with the magics and with other panels); the load is polled with this panel's client.
        self.cache = connection.background
        self.client = Sandbox(connection.url, timeout=10, token=connection.token)
        self.history: collections.deque[tuple[float, float]] = collections.deque()
        self._libraries: dict[str, Any] | None = None
        self.overview = widgets.HTML()
        self.specifications = widgets.HTML(value="<i>Loading the specifications…</i>")
        self.search = widgets.Text(placeholder="search libraries…", continuous_update=True,
                                   description="Search")  # fmt: skip
        self.category = widgets.Dropdown(options=CATEGORIES, value="all", description="Category")
        self.library_list = widgets.HTML(value="<i>Loading the library list…</i>")
        self.gauge = widgets.FloatProgress(min=0.0, max=1.0, description="Load")
        self.load_text = widgets.HTML()
        self.plot = widgets.HTML()
        self.state = widgets.HTML()
        self.interval = widgets.BoundedFloatText(value=interval, min=0.5, max=600.0, step=0.5,
                                                 description="Every (s)")  # fmt: skip
        self.pause = widgets.ToggleButton(value=False, description="Pause", icon="pause")
        self.files = widgets.Select(options=[], rows=8, description="Files")
        self.download = widgets.Button(description="Download", icon="download")
        self.show = widgets.Button(description="Show", icon="eye")
        self.file_view = widgets.HTML()
        self.close_button = widgets.Button(description="Close panel", icon="times")
        self.tabs = widgets.Tab(children=[
            self.overview,
            self.specifications,
            widgets.VBox([widgets.HBox([self.search, self.category]), self.library_list]),
            widgets.VBox([self.gauge, self.load_text, self.plot,
                          widgets.HBox([self.interval, self.pause]), self.state]),
            widgets.VBox([self.files, widgets.HBox([self.download, self.show]), self.file_view]),
        ])  # fmt: skip
        self.tabs.titles = ("Overview", "Specifications", "Libraries", "Load", "Files")
        self.widget = widgets.VBox([self.tabs, self.close_button])
        self.poller = Poller(self._sample, self._on_sample, self._on_error, interval)
        self.connected: bool | None = None
        self._wire()
        self.refresh_environment()

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin the background work; call on the kernel's event loop."""
        self._static = asyncio.get_running_loop().create_task(self._load_static())
        self.poller.start()
        self.context.panels.append(self)

    def close(self) -> None:
        self.poller.stop()
        with contextlib.suppress(ValueError):
            self.context.panels.remove(self)
        self.client.close()
        for value in vars(self).values():
            if isinstance(value, widgets.Widget):
                value.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _wire(self) -> None:
        self.search.observe(lambda _: self._filter(), names="value")
        self.category.observe(lambda _: self._filter(), names="value")
        self.interval.observe(self._interval_changed, names="value")
        self.pause.observe(self._pause_changed, names="value")
        self.download.on_click(lambda _: self._file_action(save=True))
        self.show.on_click(lambda _: self._file_action(save=False))
        self.close_button.on_click(lambda _: self.close())

    # -- overview, specifications, libraries --

    def refresh_environment(self) -> None:
        """After each cell: the environment uuid, its expiry and the file list."""
        session = self.context.session
        facts = self._facts()
        rows = [
            ("URL", self.client.url),
            ("sandbox version", facts.get("sandbox_version") or render.UNKNOWN),
            ("isolation", render.isolation_text(facts.get("isolation"))),
            ("execute timeout", render.human_seconds(facts.get("execute_timeout"))),
            ("expiration", render.human_seconds(facts.get("expiration"))),
            ("environment", session.environment or "none yet"),
            ("expires", session.expire or render.UNKNOWN),
            ("connection", {None: "checking…", True: "connected", False: "unreachable"}[
                self.connected]),
        ]  # fmt: skip
        self.overview.value = render.table(["", "value"], rows)["text/html"]
        files = [name for name in session.state.files if not name.endswith("/")]
        self.files.options = files

    def _facts(self) -> dict[str, Any]:
        """The cached specification attributes; empty until they are fetched."""
        if not self.cache.has_specifications:
            return {}
        with contextlib.suppress(SandboxError):
            return {name: getattr(self.cache, name) for name in (
                "sandbox_version", "isolation", "execute_timeout", "expiration")}  # fmt: skip
        return {}

    async def _load_static(self) -> None:
        try:
            specs = await asyncio.to_thread(self.cache.cached_specifications)
            facts = await asyncio.to_thread(self._all_facts)
            self.specifications.value = render.specifications(self.client.url, specs, facts)[
                "text/html"
            ]
            self.refresh_environment()
        except Exception as error:  # shown in the tab, never lost in the event loop
            self.specifications.value = (
                f"<b>Could not read the specifications:</b> {_error_html(error)}"
            )
        try:
            self._libraries = await asyncio.to_thread(self.cache.libraries)
            self._filter()
        except Exception as error:
            self.library_list.value = f"<b>Could not list libraries:</b> {_error_html(error)}"

    def _all_facts(self) -> dict[str, Any]:
        return {name: getattr(self.cache, name) for name in (
            "sandbox_version", "docker_version", "containers", "memory", "cpu",
            "execute_timeout", "expiration", "isolation")}  # fmt: skip

    def library_rows(self, pattern: str, category: str) -> list[tuple[str, str, str]]:
        if self._libraries is None:
            return []
        chosen = None if category == "all" else category
        rows = library_rows(self._libraries.get("libraries") or {},
                             self._libraries.get("bin") or [], chosen)  # fmt: skip
        return [row for row in rows if matches(row[1], pattern)]

    def _filter(self) -> None:
        if self._libraries is None:
            return
        rows = self.library_rows(self.search.value, self.category.value)
        self.library_list.value = render.libraries(rows[:_ROWS], len(rows), _ROWS)["text/html"]

    # -- load --

    def _sample(self) -> LoadSample:
        return sample_load(self.client, self.cache.cached_specifications())

    def _on_sample(self, sample: LoadSample, wait: float) -> None:
        first = self.connected is not True
        self.connected = True
        self.gauge.value = sample.load
        self.load_text.value = html.escape(sample.line()["text/plain"])
        self.history.append((sample.at, sample.load))
        while self.history and self.history[0][0] < sample.at - _HISTORY_SECONDS:
            self.history.popleft()
        self.plot.value = history_svg(list(self.history))
        self.state.value = f"live; next refresh in {wait:.1f} s"
        if first:
            self.refresh_environment()

    def _on_error(self, error: Exception, wait: float) -> None:
        if isinstance(error, _UNREACHABLE):
            what = "sandbox unreachable"
            changed = self.connected is not False
            self.connected = False
        elif isinstance(error, SandboxError):
            what = "the sandbox's answer could not be used"
            changed = False
        else:
            what = "the load could not be shown"
            changed = False
        self.state.value = f"<b>{what}</b> ({_error_html(error, 300)}); retrying in {wait:.0f} s"
        if changed:
            self.refresh_environment()

    def _interval_changed(self, change: dict[str, Any]) -> None:
        self.poller.interval = float(change["new"])
        self.poller.poke()

    def _pause_changed(self, change: dict[str, Any]) -> None:
        self.poller.paused = bool(change["new"])
        self.pause.description = "Resume" if self.poller.paused else "Pause"
        self.pause.icon = "play" if self.poller.paused else "pause"
        self.state.value = "paused" if self.poller.paused else "resuming…"
        self.poller.poke()

    # -- files --

    def _file_action(self, save: bool) -> None:
        name = self.files.value
        if not name:
            self.file_view.value = "<i>Choose a file first.</i>"
            return
        self._fetching = asyncio.get_running_loop().create_task(self._fetch_file(name, save))

    async def _fetch_file(self, name: str, save: bool) -> None:
        try:
            if save:
                # Checked before anything is fetched: the notebook's folder, no overwriting.
                target = local_target(self.context, ".", name.rsplit("/", 1)[-1], False,
                                      "The panel's Download")  # fmt: skip
                data = await asyncio.to_thread(self._download, name, None)
                write_new(target, data, force=False)
                self.file_view.value = f"Saved to {html.escape(str(target))}"
            else:
                data = await asyncio.to_thread(self._download, name, _MAX_SHOWN)
                self.file_view.value = file_html(name, data)
        except Exception as error:  # shown in the panel, never raised into the event loop
            self.file_view.value = f"<b>{_error_html(error)}</b>"

    def _download(self, name: str, limit: int | None) -> bytes:
        """The file, no larger than the server announced (a server sending more is cut
        off, as for ``%sandbox_download``) nor than ``limit``."""
        environment = self.context.session.environment or ""
        remote = environment_path(self.context, name)
        size = self.client.check(environment, remote)
        if limit is not None and size > limit:
            raise ValueError(
                f"{name} is {render.human_bytes(size)}, too large to show here (up to "
                f"{render.human_bytes(limit)}): use Download, or %sandbox_download."
            )
        return self.client.download(environment, remote, max_bytes=size).getvalue()


def _error_html(error: BaseException, limit: int = 2000) -> str:
    """An error's message for a widget's HTML value: escaped (it may hold a server's text)."""
    return html.escape(str(error)[:limit] or type(error).__name__)


def file_html(name: str, data: bytes) -> str:
    """A file shown inside the panel (an HTML widget, which renders its value as HTML): images
    as ``<img>`` from base64 data (SVG included: an image runs no script), anything else as
    escaped text. The file's name and content never become markup."""
    mime = mime_type(name)
    if mime.startswith("image/"):
        encoded = base64.b64encode(data).decode("ascii")
        return f'<img alt="{html.escape(name, quote=True)}" src="data:{mime};base64,{encoded}"/>'
    return f"<pre>{html.escape(data.decode('utf-8', errors='replace')[:100_000])}</pre>"


def history_svg(points: list[tuple[float, float]], width: int = 320, height: int = 60) -> str:
    """The load history as a small inline SVG line (last minutes, 0 to 1)."""
    if not points:
        return ""
    start, end = points[0][0], max(points[-1][0], points[0][0] + 1)
    coordinates = " ".join(
        f"{(t - start) / (end - start) * width:.1f},{height - load * height:.1f}"
        for t, load in points
    )
    minutes = (end - start) / 60
    return (
        f"<svg width='{width}' height='{height}' style='border:1px solid #ccc'>"
        f"<polyline fill='none' stroke='#c28a1e' stroke-width='2' points='{coordinates}'/>"
        f"</svg><div style='font-size:smaller'>load over the last {minutes:.1f} min</div>"
    )
