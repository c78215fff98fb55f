"""The sandbox panel: what every tab shows, the refresh loop, the event loop kept free, and the
comm wiring in both kernels, against real servers (the embedded one, a real proxy in front of
it, or a real little HTTP server answering like the public 3.x or an old 2.x server)."""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from sandbox_kernel._errors import SandboxConnectionError
from sandbox_kernel._generations import CATEGORIES, Load
from sandbox_kernel.session.context import SandboxContext
from sandbox_kernel.views import render
from sandbox_kernel.views.panel import Poller, SandboxPanel

from .conftest import KernelSession, Server
from .helpers import kernel_env, sandbox_environ
from .proxy import CountingProxy

StartKernel = Callable[..., KernelSession]
FIXTURES = Path(__file__).parent / "fixtures"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
#: Seconds the slow proxy holds ``libraries/`` (what the public server takes, measured).
SLOW_LIBRARIES = 1.5


# -- helpers -------------------------------------------------------------------------------------


def text_of(value: str) -> str:
    """What a reader sees of an HTML widget's value: tags dropped, entities decoded, spaces
    collapsed."""
    import html

    spaced = re.sub(
        r"</?(?:td|th|tr|p|div|br|caption|table|tbody|thead|svg|text)\b[^>]*>", " ", value
    )
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", spaced))).strip()


async def until(condition: Callable[[], bool], seconds: float = 10, what: str = "") -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not in {seconds} s: {what or 'the condition'}")
        await asyncio.sleep(0.02)


def with_panel(
    context: SandboxContext,
    scenario: Callable[[SandboxPanel], Awaitable[None]],
    interval: float = 0.5,
) -> None:
    """Open a panel on ``context`` inside a running event loop (as the kernel does), run
    ``scenario`` with it, close it."""

    async def run() -> None:
        panel = SandboxPanel(context, interval=interval)
        panel.start()
        try:
            await scenario(panel)
        finally:
            panel.close()

    asyncio.run(run())


async def filled(panel: SandboxPanel) -> None:
    """Until every tab shows what the server told (specifications, inventory, a load)."""
    await until(lambda: panel.specs is not None, what="the specifications")
    await until(lambda: panel.inventory is not None, 20, "the inventory")
    await until(lambda: bool(panel.history), what="a load sample")


def open_widgets(widget: Any) -> list[Any]:
    """The widgets of a tree (a panel's) still open: they keep a model in the front-end."""
    found = [widget] if widget.comm is not None else []
    for child in getattr(widget, "children", ()):
        found += open_widgets(child)
    return found


@pytest.fixture
def context(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SandboxContext]:
    """A context on the shared server, in a folder of its own (the notebook's folder)."""
    monkeypatch.chdir(tmp_path)
    made = SandboxContext(server.url, server.token)
    yield made
    made.close()


# -- the tabs on the embedded server -------------------------------------------------------------


def test_every_tab_says_what_the_server_tells_in_human_form(context: SandboxContext) -> None:
    assert context.session.run_cell("mkdir -p sub/deeper && cd sub && echo hi > notes.txt").ok

    async def scenario(panel: SandboxPanel) -> None:
        await filled(panel)
        overview = text_of(panel.overview.value)
        assert context.settings.describe() in overview
        assert context.url in overview
        assert f"{context.session.environment}, expires in 1 day" in overview  # kept 86400 s
        assert "connected" in overview and "/4 busy" in overview
        specs = text_of(panel.specifications.value)
        for row in ("time per run 1 min", "environments kept for 1 day", "runs at once 4",
                    "bubblewrap", "no network", "processes per run 256"):  # fmt: skip
            assert row in specs, (row, specs)
        for wrong in ("unknown", "Docker", "days", "86400"):  # no Docker on this server
            assert wrong not in specs, (wrong, specs)
        assert "?" not in text_of(panel.library_list.value)
        load = text_of(panel.load_text.value)
        assert re.fullmatch(r"\d+% \(0/4 busy\) · CPU \d+% · memory [\d.]+ \wiB / [\d.]+ GiB", load)
        assert panel.gauge.value == 0.0 and panel.gauge.bar_style == "success"
        heading = text_of(panel.files_heading.value)
        assert "Files in /home/student/sub, the shell's current directory" in heading
        assert "1 folder not listed" in heading
        assert panel.files.options == ("notes.txt",)
        assert "live" in panel.state.value

    with_panel(context, scenario)


def test_the_load_chart_has_a_time_axis_a_scale_and_the_figure(context: SandboxContext) -> None:
    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: len(panel.history) >= 3, 15, "three load samples")
        svg = panel.chart.value
        assert svg.startswith("<svg") and svg.endswith("</svg>")
        labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
        for percent in ("0%", "25%", "50%", "75%", "100%"):
            assert percent in labels, labels
        assert "now" in labels and "−1 min" in labels, labels  # the first minute is shown whole
        assert "0/4 busy" in labels
        assert svg.count("<polyline") == 2  # containers busy, host CPU
        points = re.search(r"<polyline points='([^']+)'", svg)
        assert points is not None and len(points.group(1).split()) == len(panel.history)
        assert re.search(r"<title>Load over the last 1 min: 0% \(0/4 busy\)", svg)

    with_panel(context, scenario, interval=0.5)


def test_the_libraries_tab_starts_on_the_tools_and_the_categories(
    context: SandboxContext,
) -> None:
    inventory = context.inventory()
    counts = inventory.counts()

    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: panel.inventory is not None, 20, "the inventory")
        labels = [label for label, _ in panel.category.options]
        assert labels[0] == f"all · {sum(counts.values())}"
        for category in CATEGORIES:
            assert f"{render.CATEGORY_LABELS[category]} · {counts[category]}" in labels
        start = text_of(panel.library_list.value)
        assert "Main tools" in start and f"python3 {inventory.tools['python3']}" in start
        assert f"executables {counts['bin']}" in start
        assert "matches" not in start  # not the first rows of the system packages

        panel.search.value = "gcc"
        found = text_of(panel.library_list.value)
        assert "matches" in found
        rows = panel.library_rows("gcc")
        assert rows[0].name == "gcc"  # the exact name first
        [executable] = [row for row in rows if row.category == "bin" and row.name == "gcc"]
        assert executable.version == inventory.tools["gcc"] and executable.version
        assert f"executables gcc {executable.version}" in found
        assert "?" not in found

        panel.search.value = "py*"
        assert all(row.name.lower().startswith("py") for row in panel.library_rows("py*"))
        panel.search.value = ""
        panel.category.value = "python"
        listed = text_of(panel.library_list.value)
        assert listed.startswith(f"{counts['python']} matches")
        assert "first 100 shown" in listed and "system packages" not in listed
        panel.category.value = "all"
        assert "Main tools" in text_of(panel.library_list.value)

    with_panel(context, scenario)


def test_the_files_tab_shows_and_downloads_next_to_the_notebook(
    context: SandboxContext, tmp_path: Path
) -> None:
    assert context.session.run_cell("mkdir -p work && cd work && printf 'a\\nb\\n' > data.txt").ok

    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: panel.files.options == ("data.txt",), what="the file list")
        panel.files.value = "data.txt"
        panel.show.click()
        await until(lambda: "<pre>" in panel.file_view.value, what="the file shown")
        assert panel.file_view.value == "<pre>a\nb\n</pre>"
        panel.download.click()
        await until(lambda: "Saved to" in panel.file_view.value, what="the download")
        assert (tmp_path / "data.txt").read_bytes() == b"a\nb\n"
        assert str(tmp_path / "data.txt") in text_of(panel.file_view.value)
        panel.download.click()  # a second time: refused, nothing overwritten
        await until(lambda: "already exists" in panel.file_view.value, what="the refusal")
        assert "--force" in panel.file_view.value
        assert context.session.run_cell("cd /tmp").ok
        panel.refresh_environment()
        heading = text_of(panel.files_heading.value)
        assert "The shell is in /tmp, outside the environment (/home/student)" in heading

    with_panel(context, scenario)


def test_the_files_tab_before_any_cell(context: SandboxContext) -> None:
    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: panel.specs is not None, what="the specifications")
        assert "No environment yet: run a cell" in panel.files_heading.value
        assert "none yet: the first cell makes one" in text_of(panel.overview.value)
        panel.show.click()
        assert "Choose a file first" in panel.file_view.value

    with_panel(context, scenario)


# -- the kernel's event loop stays free ------------------------------------------------------------


def test_the_event_loop_runs_while_libraries_is_slow(server: Server) -> None:
    """Opening the panel never waits for ``libraries/`` (1.5 s here, through a real proxy in
    front of the embedded server): the constructor and start() return at once, the loop runs
    other callbacks every few milliseconds meanwhile, and the tab fills when the answer
    comes."""
    proxy = CountingProxy(server.url)
    proxy.delays["/libraries/"] = SLOW_LIBRARIES
    context = SandboxContext(proxy.url, server.token)
    assert context.start() is None

    async def scenario() -> None:
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.get_running_loop().create_task(tick())
        began = time.monotonic()
        panel = SandboxPanel(context, interval=0.5)
        panel.start()
        opened = time.monotonic() - began
        try:
            await until(lambda: proxy.count("GET", "libraries/") == 1, 10, "libraries/ asked")
            assert panel.inventory is None and "Asking the sandbox" in panel.library_list.value
            await until(lambda: panel.inventory is not None, 20, "the inventory")
            filled_after = time.monotonic() - began
        finally:
            panel.close()
            ticker.cancel()
        during = [t for t in ticks if began <= t <= began + filled_after]
        longest = max(b - a for a, b in itertools.pairwise(during))
        assert opened < 0.3, f"opening the panel took {opened:.2f} s"
        assert filled_after >= SLOW_LIBRARIES  # the answer really was slow
        assert longest < 0.3, f"the event loop stood still for {longest:.2f} s"
        assert len(during) > 30, f"only {len(during)} callbacks ran in {filled_after:.1f} s"

    try:
        asyncio.run(scenario())
    finally:
        context.close()
        proxy.close()


def test_panels_share_the_context_s_specifications_and_inventory(server: Server) -> None:
    proxy = CountingProxy(server.url)
    context = SandboxContext(proxy.url, server.token)

    async def scenario() -> None:
        first, second = SandboxPanel(context, 0.5), SandboxPanel(context, 0.5)
        first.start()
        await filled(first)
        second.start()
        await filled(second)
        assert context.panels == [first, second]
        first.close()
        second.close()
        assert context.panels == []
        assert not first.poller.running and not second.poller.running
        assert open_widgets(first.widget) == [], "widgets left open by close()"

    try:
        asyncio.run(scenario())
        assert context.cached_inventory is not None  # the magics find it there
        assert proxy.count("GET", "libraries/") == 1
        assert proxy.count("GET", "specifications/") == 1
        assert proxy.count("GET", "usages/") >= 2
    finally:
        context.close()
        proxy.close()


# -- servers that tell less: no row for what they do not tell -------------------------------------


@pytest.mark.parametrize("generation", ["public 3.x", "2.x"])
def test_no_row_for_a_fact_the_server_does_not_tell(generation: str) -> None:
    from .hostile.test_page import FakeSandbox

    with FakeSandbox() as fake:
        if generation == "2.x":
            for name in ("specifications", "libraries"):
                body = json.loads((FIXTURES / "v2" / f"{name}.json").read_text())["body"]
                fake.answer(f"{name}/", body)
            fake.answer("usages/", b"not found", status=404, content_type="text/plain")
        context = SandboxContext(fake.url, "")

        async def scenario(panel: SandboxPanel) -> None:
            await filled(panel)
            specs, overview = text_of(panel.specifications.value), text_of(panel.overview.value)
            libraries = text_of(panel.library_list.value)
            for shown in (specs, overview, libraries, text_of(panel.load_text.value)):
                assert "unknown" not in shown and "?" not in shown, shown
                assert "isolation" not in shown, shown  # the embedded server's extension
            if generation == "2.x":
                assert "Docker version 18.09.7" in specs and "time per run 10 s" in specs
                assert "CPUs per run 1 (Intel(R) Core(TM) i7-8700K" in specs
                assert "memory per run 100.0 MiB + 200.0 MiB swap" in specs
                assert "(host)" not in specs  # 2.x does not describe its host
                assert text_of(panel.load_text.value) == "40% (2/5 busy)"  # no CPU, no memory
                assert "python2 2.7.16" in libraries
                assert fake.count("usages/") == 0
            else:
                assert "Docker version 28.2.2" in specs and "processes per run no limit" in specs
                assert "time per run" not in specs and "kept for" not in specs
                assert "CPU (host) 2 cores RAM" in specs  # no "up to" a frequency not told
                assert "postgres 15.13" in libraries

        try:
            with_panel(context, scenario)
        finally:
            context.close()


def test_a_failed_inventory_is_said_and_asked_again_from_the_tab() -> None:
    from .hostile.test_page import FakeSandbox

    with FakeSandbox() as fake:
        fake.answer("libraries/", b"<b>broken</b> inventory", status=500, content_type="text/plain")
        context = SandboxContext(fake.url, "")

        async def scenario(panel: SandboxPanel) -> None:
            await until(lambda: "Could not list" in panel.library_list.value, what="the error")
            assert "&lt;b&gt;broken&lt;/b&gt;" in panel.library_list.value  # escaped
            assert "Open this tab again to retry" in panel.library_list.value
            asked = fake.count("libraries/")
            fake.answer(
                "libraries/", json.loads((FIXTURES / "v3" / "libraries.json").read_text())["body"]
            )
            panel.tabs.selected_index = 2
            await until(lambda: panel.inventory is not None, what="the inventory, asked again")
            assert fake.count("libraries/") == asked + 1
            assert "Main tools" in panel.library_list.value

        try:
            with_panel(context, scenario)
        finally:
            context.close()


def test_unusable_settings_are_said_in_every_tab() -> None:
    """A malformed URL gives a panel that opens and says what is wrong, never an exception."""
    context = SandboxContext("localhost:7000")

    async def scenario(panel: SandboxPanel) -> None:
        await until(lambda: "Could not list" in panel.library_list.value, what="the error")
        await until(lambda: "cannot be used" in panel.state.value, what="the load's error")
        for widget in (panel.overview, panel.specifications, panel.library_list, panel.state):
            assert "is not a sandbox URL" in widget.value, widget.value
        assert ".." not in panel.library_list.value

    try:
        with_panel(context, scenario)
    finally:
        context.close()


# -- the refresh loop ------------------------------------------------------------------------------


@pytest.mark.slow  # starts servers
def test_poller_backs_off_while_unreachable_and_recovers(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = ("--port", port, "--workers", "1")
    server = start_server(*args, data_dir=tmp_path / "data", token="t-poll")
    context = SandboxContext(server.url, "t-poll", side_timeout=2)
    events: list[tuple[str, float]] = []
    failures: list[Exception] = []

    async def scenario() -> None:
        poller = Poller(
            lambda: asyncio.wrap_future(context.submit(context.load)),
            lambda sample, wait: events.append(("ok", wait)),
            lambda error, wait: (events.append(("error", wait)), failures.append(error)),
            interval=0.1,
        )
        poller.start()
        await until(lambda: len(events) >= 2)
        server.stop()
        await until(lambda: [e for e, _ in events].count("error") >= 3, 15)
        await asyncio.to_thread(start_server, *args, data_dir=tmp_path / "data", token="t-poll")
        await until(lambda: events[-1][0] == "ok", 30)
        poller.stop()
        polls = poller.polls
        await asyncio.sleep(0.5)
        assert poller.polls == polls and not poller.running  # stopped for good

    try:
        asyncio.run(scenario())
    finally:
        context.close()
    errors = [wait for kind, wait in events if kind == "error"]
    assert errors[:3] == sorted(errors[:3]) and errors[1] > errors[0]  # the wait grows
    assert isinstance(failures[0], SandboxConnectionError), failures[0]
    assert events[-1][0] == "ok"  # and it recovered by itself


def test_one_refresh_in_flight_and_the_interval_adapts() -> None:
    in_flight, most, waits = 0, 0, []

    async def slow_sample() -> Load:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.3)
        in_flight -= 1
        return Load(busy=1, total=2)

    async def scenario() -> None:
        poller = Poller(slow_sample, lambda s, wait: waits.append(wait), lambda e, w: None, 0.05)
        poller.start()
        await until(lambda: len(waits) >= 3)
        poller.paused = True
        poller.poke()
        await asyncio.sleep(0.5)
        paused_at = poller.polls
        await asyncio.sleep(0.5)
        assert poller.polls == paused_at  # paused: no request
        poller.stop()

    asyncio.run(scenario())
    assert most == 1
    assert all(wait >= 0.45 for wait in waits)  # 1.5 x the 0.3 s round trip, not 0.05 s


def test_poller_survives_any_error_and_keeps_polling() -> None:
    """Whatever a round raises (a malformed answer, a bug while showing the sample, a bug
    while showing the error), it is reported, the wait grows, and polling goes on."""
    problems: list[Exception] = [
        ValueError("a malformed answer"),
        KeyError("cpu"),
        TypeError("unsupported format string passed to str.__format__"),
    ]
    errors: list[tuple[str, float]] = []
    samples: list[float] = []
    show_fails = [True]

    async def sample() -> Load:
        if problems:
            raise problems.pop(0)
        return Load(busy=1, total=2)

    def on_sample(value: Load, wait: float) -> None:
        if show_fails:
            show_fails.pop()
            raise RuntimeError("showing the sample failed")
        samples.append(wait)

    def on_error(error: Exception, wait: float) -> None:
        errors.append((f"{type(error).__name__}: {error}", wait))
        if len(errors) == 2:
            raise RuntimeError("showing the error failed too")

    async def scenario() -> None:
        poller = Poller(sample, on_sample, on_error, interval=0.05)
        poller.start()
        await until(lambda: len(samples) >= 2, 15)
        assert poller.running
        poller.stop()

    asyncio.run(scenario())
    kinds = [text.split(":")[0] for text, _ in errors]
    assert kinds == ["ValueError", "KeyError", "TypeError", "RuntimeError"], errors
    waits = [wait for _, wait in errors]
    assert waits == sorted(waits) and waits[-1] > waits[0]  # backing off
    assert samples, "polling did not recover"


# -- the panel in the kernels (comms) --------------------------------------------------------------


def _messages(client: Any, seconds: float) -> list[dict[str, Any]]:
    found, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            found.append(client.get_iopub_msg(timeout=0.2))
        except queue.Empty:
            continue
    return found


def _states(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["content"]["data"].get("state", {}) for m in messages
            if m["msg_type"] in ("comm_open", "comm_msg")]  # fmt: skip


def _open_panel(kernel: Any, line: str = "%sandbox_panel --interval 0.5") -> dict[str, Any]:
    """Run the magic; returns the comm ids of the widgets by model name, and under "states"
    their initial states."""
    outputs: list[dict[str, Any]] = []
    reply = kernel.client.execute_interactive(line, output_hook=outputs.append, timeout=60)
    assert reply["content"]["status"] == "ok", reply["content"]
    [shown] = [m for m in outputs if m["msg_type"] == "display_data"]
    assert WIDGET_VIEW in shown["content"]["data"]
    models: dict[str, Any] = {"states": _states(outputs)}
    for message in outputs:
        if message["msg_type"] == "comm_open":
            state = message["content"]["data"]["state"]
            models.setdefault(state.get("_model_name"), []).append(message["content"]["comm_id"])
    return models


def _send(kernel: Any, comm_id: str, data: dict[str, Any]) -> None:
    client = kernel.client
    client.session.send(client.shell_channel.socket, "comm_msg", {"comm_id": comm_id, "data": data})


def _update(state: dict[str, Any]) -> dict[str, Any]:
    return {"method": "update", "state": state, "buffer_paths": []}


@pytest.mark.slow  # starts a kernel
def test_panel_in_the_sandbox_kernel(server: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(server)
    kernel.run("echo hi > notes.txt")
    models = _open_panel(kernel)
    assert "TabModel" in models and "ToggleButtonsModel" in models
    assert len(models["FloatProgressModel"]) == 1  # one gauge
    updates = models["states"] + _states(_messages(kernel.client, 3))
    values = [state["value"] for state in updates if isinstance(state.get("value"), str)]
    assert any("bubblewrap" in value for value in values)  # the specifications tab
    assert any("/4 busy" in value for value in values)  # the load, refreshed
    assert any("<svg" in value and "now" in value for value in values)  # the chart
    assert any("notes.txt" in str(state.get("_options_labels")) for state in updates)
    [search] = models["TextModel"]
    [tabs] = models["TabModel"]
    _send(kernel, tabs, _update({"selected_index": 2}))  # the Libraries tab focuses its search
    focus = [m for m in _messages(kernel.client, 1.5) if m["msg_type"] == "comm_msg"
             and m["content"]["comm_id"] == search
             and m["content"]["data"].get("content") == {"do": "focus"}]  # fmt: skip
    assert focus, "the search box was not focused"
    _send(kernel, search, _update({"value": "bash"}))
    found = [v for v in (s.get("value") for s in _states(_messages(kernel.client, 2)))
             if isinstance(v, str) and "matches" in v]  # fmt: skip
    assert found and "bash" in found[-1] and "python3" not in found[-1]
    cell = kernel.run("echo later > more.txt")
    assert cell.status == "ok"
    after = _states(cell.outputs) + _states(_messages(kernel.client, 1.5))
    assert any("more.txt" in str(state.get("_options_labels")) for state in after)
    close = [c for c in models["ButtonModel"]][-1]
    _send(kernel, close, {"method": "custom", "content": {"event": "click"}})
    after_close = _messages(kernel.client, 3)
    kinds = [m["msg_type"] for m in after_close]
    assert "comm_close" in kinds, "the panel did not close"
    last_close = len(kinds) - 1 - kinds[::-1].index("comm_close")
    assert "comm_msg" not in kinds[last_close:], "the panel kept polling after it was closed"


@pytest.mark.slow  # starts a kernel
def test_panel_in_the_python_kernel(server: Server, kernelspec: str) -> None:
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env=kernel_env(server.url, server.token or ""))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        kernel = type("K", (), {"client": client})()
        client.execute_interactive("%load_ext sandbox_kernel", timeout=60)
        models = _open_panel(kernel)
        assert "TabModel" in models
        values = [s.get("value") for s in _states(_messages(client, 3))]
        assert any(isinstance(v, str) and "busy" in v for v in values)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.mark.slow  # starts a kernel
def test_opening_the_panel_twice_fetches_specs_and_libraries_once(
    server: Server, start_kernel: StartKernel
) -> None:
    proxy = CountingProxy(server.url)
    try:
        kernel = start_kernel(None, SANDBOX_URL=proxy.url, SANDBOX_TOKEN=server.token or "")
        _open_panel(kernel)
        _messages(kernel.client, 2)
        _open_panel(kernel)
        _messages(kernel.client, 2)
        assert proxy.count("GET", "libraries/") == 1
        assert proxy.count("GET", "specifications/") <= 2  # the kernel's banner, the cache
        assert proxy.count("GET", "usages/") >= 2
    finally:
        proxy.close()


@pytest.mark.slow  # starts a kernel
def test_widget_state_is_saved_into_the_notebook(
    server: Server, kernelspec: str, tmp_path: Path
) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "sandbox", "display_name": "Sandbox (bash)",
                                       "language": "bash"}  # fmt: skip
    notebook.cells = [nbformat.v4.new_code_cell("%sandbox_panel --interval 1"),
                      nbformat.v4.new_code_cell("sleep 1; echo done")]  # fmt: skip
    with sandbox_environ(server.url, server.token):
        NotebookClient(notebook, timeout=60, kernel_name="sandbox",
                       store_widget_state=True).execute()  # fmt: skip
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    models = {entry["model_name"] for entry in state.values()}
    assert {"TabModel", "FloatProgressModel", "TextModel", "ToggleButtonsModel"} <= models
    assert notebook.cells[1].outputs[0]["text"] == "done\n"


@pytest.mark.slow  # starts a kernel
def test_a_malformed_load_is_said_in_the_panel_which_keeps_polling(
    kernelspec: str, tmp_path: Path
) -> None:
    from .hostile.test_page import FakeSandbox, FolderKernel, fixture_body

    with FakeSandbox() as fake:
        usages = fixture_body("usages.json")
        fake.answer("usages/", {**usages, "cpu": {"usage": "lots"}})
        kernel = FolderKernel(kernel_env(fake.url, ""), tmp_path)
        try:
            models = _open_panel(kernel, "%sandbox_panel --interval 0.5")
            assert "TabModel" in models
            messages = _messages(kernel.client, 2.5)
            said = [v for v in (s.get("value") for s in _states(messages)) if isinstance(v, str)]
            assert any("cpu.usage" in value and "&#x27;lots&#x27;" in value for value in said), said
            polled = fake.count("usages/")
            assert polled >= 2
            fake.answer("usages/", usages)
            recovered = []
            end = time.monotonic() + 20
            while time.monotonic() < end and not any("live" in v for v in recovered):
                states = _states(_messages(kernel.client, 1))
                recovered += [s["value"] for s in states if isinstance(s.get("value"), str)]
            assert any("live" in value for value in recovered), "the panel did not recover"
            assert any("10/40 busy" in value for value in recovered)
            assert fake.count("usages/") > polled
        finally:
            kernel.stop()


@pytest.mark.slow  # starts a kernel
def test_the_files_tab_shows_hostile_names_and_content_as_text(
    server: Server, kernelspec: str, tmp_path: Path
) -> None:
    from .hostile.test_host_paths import _panel_models, _panel_values, _select
    from .hostile.test_page import FolderKernel, own_html_problems

    kernel = FolderKernel(kernel_env(server.url, server.token), tmp_path)
    try:
        names = ['<img src=x onerror="alert(1)">.txt', "page.html", "drawing.svg", "logo.png"]
        cell = kernel.run(
            "printf '<script>alert(2)</script>' > '<img src=x onerror=\"alert(1)\">.txt'\n"
            "printf '<img src=x onerror=alert(3)>' > page.html\n"
            'printf \'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(4)"/>\' '
            "> drawing.svg\nprintf 'not really a png' > logo.png"
        )
        assert cell.status == "ok", cell.reply
        models = _panel_models(kernel)
        _send(kernel, models["Pause"], _update({"value": True}))  # no load refresh below
        _messages(kernel.client, 1)
        shown = []
        for name in names:
            _send(kernel, models["select"], _select(models["options"], name))
            _send(kernel, models["Show"], {"method": "custom", "content": {"event": "click"}})
            values = [v for v in _panel_values(_messages(kernel.client, 2)) if v]
            values = [v for v in values if not v.startswith("<i>Fetching")]
            assert values, f"nothing shown for {name}"
            shown.append(values[-1])
        assert "&lt;script&gt;alert(2)&lt;/script&gt;" in shown[0]
        assert "&lt;img src=x onerror=alert(3)&gt;" in shown[1]
        assert shown[2].startswith('<img alt="drawing.svg" src="data:image/svg+xml;base64,')
        for value in shown:
            assert own_html_problems(value) == [], value
    finally:
        kernel.stop()
