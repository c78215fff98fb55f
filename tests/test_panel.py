"""The sandbox panel: the data behind every tab, the refresh loop, and the comm wiring in both
kernels, against real servers."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from sandbox_kernel.client import Sandbox
from sandbox_kernel.views.panel import LoadSample, Poller, history_svg, sample_load

from .conftest import KernelSession, Server
from .proxy import CountingProxy

StartKernel = Callable[..., KernelSession]
FIXTURES = Path(__file__).parent / "fixtures"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_load_sample_on_a_3x_server(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "2")
    client = Sandbox(server.url, token=server.token)
    idle = sample_load(client)
    assert (idle.busy, idle.total, idle.load) == (0, 2, 0.0)
    assert idle.cpu is not None and idle.memory_used and idle.memory_total
    runner = threading.Thread(target=client.execute, args=({"commands": ["sleep 1.5"]},))
    runner.start()
    time.sleep(0.5)
    busy = sample_load(Sandbox(server.url, token=server.token))
    runner.join()
    assert (busy.busy, busy.load) == (1, 0.5)
    assert "1/2 busy" in busy.line()["text/plain"]


def test_load_sample_on_a_2x_server() -> None:
    """2.x has no usages/: the load comes from the containers of specifications/."""
    specs = json.loads((FIXTURES / "v2" / "specifications.json").read_text())
    specs["containers"] = {"total": 5, "running": 2, "available": 3}
    body = json.dumps(specs).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200 if self.path == "/specifications/" else 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    legacy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=legacy.serve_forever, daemon=True).start()
    try:
        sample = sample_load(Sandbox(f"http://127.0.0.1:{legacy.server_address[1]}/"))
    finally:
        legacy.shutdown()
    assert (sample.busy, sample.total, sample.load, sample.cpu) == (2, 5, 0.4, None)


def test_poller_backs_off_while_unreachable_and_recovers(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = ("--port", port, "--workers", "1")
    server = start_server(*args, data_dir=tmp_path / "data", token="t-poll")
    client = Sandbox(server.url, token="t-poll", timeout=2)
    events: list[tuple[str, float]] = []

    async def scenario() -> Poller:
        poller = Poller(
            lambda: sample_load(client),
            lambda sample, wait: events.append(("ok", wait)),
            lambda error, wait: events.append(("error", wait)),
            interval=0.1,
        )
        poller.start()
        await _until(lambda: len(events) >= 2)
        server.stop()
        await _until(lambda: [e for e, _ in events].count("error") >= 3, 15)
        await asyncio.to_thread(start_server, *args, data_dir=tmp_path / "data", token="t-poll")
        await _until(lambda: events[-1][0] == "ok", 30)
        poller.stop()
        polls = poller.polls
        await asyncio.sleep(0.5)
        assert poller.polls == polls and not poller.running  # stopped for good
        return poller

    asyncio.run(scenario())
    errors = [wait for kind, wait in events if kind == "error"]
    assert errors[:3] == sorted(errors[:3]) and errors[1] > errors[0]  # the wait grows
    assert events[-1][0] == "ok"  # and it recovered by itself


def test_one_refresh_in_flight_and_the_interval_adapts() -> None:
    in_flight, most, waits = 0, 0, []

    def slow_sample() -> LoadSample:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        time.sleep(0.3)
        in_flight -= 1
        return LoadSample(busy=1, total=2)

    async def scenario() -> None:
        poller = Poller(slow_sample, lambda s, wait: waits.append(wait), lambda e, w: None, 0.05)
        poller.start()
        await _until(lambda: len(waits) >= 3)
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


def test_history_plot() -> None:
    assert history_svg([]) == ""
    svg = history_svg([(0.0, 0.0), (60.0, 0.5), (120.0, 1.0)])
    assert "<polyline" in svg and "2.0 min" in svg


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


def test_panel_in_the_sandbox_kernel(server: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(server)
    kernel.run("echo hi > notes.txt")
    models = _open_panel(kernel)
    assert "TabModel" in models and "FloatProgressModel" in models
    updates = models["states"] + _states(_messages(kernel.client, 3))
    values = [state["value"] for state in updates if isinstance(state.get("value"), str)]
    assert any("bubblewrap" in value for value in values)  # the specifications tab
    assert any("/4 busy" in value for value in values)  # the load, refreshed
    assert any("notes.txt" in str(state.get("_options_labels")) for state in updates)
    [search] = models["TextModel"]
    _send(kernel, search, {"method": "update", "state": {"value": "bash"}, "buffer_paths": []})
    found = [v for v in (s.get("value") for s in _states(_messages(kernel.client, 2)))
             if isinstance(v, str) and "matches" in v]  # fmt: skip
    assert found and "bash" in found[-1] and "python3" not in found[-1]
    cell = kernel.run("echo later > more.txt")
    assert cell.status == "ok"
    after = _states(cell.outputs) + _states(_messages(kernel.client, 1.5))
    assert any("more.txt" in str(state.get("_options_labels")) for state in after)
    close = models["ButtonModel"][-1]
    _send(kernel, close, {"method": "custom", "content": {"event": "click"}})
    after_close = _messages(kernel.client, 3)
    kinds = [m["msg_type"] for m in after_close]
    assert "comm_close" in kinds, "the panel did not close"
    last_close = len(kinds) - 1 - kinds[::-1].index("comm_close")
    assert "comm_msg" not in kinds[last_close:], "the panel kept polling after it was closed"


def test_panel_in_the_python_kernel(server: Server, kernelspec: str) -> None:
    import os

    manager = KernelManager(kernel_name="python3")
    env = {**os.environ, "SANDBOX_URL": server.url, "SANDBOX_TOKEN": server.token or ""}
    manager.start_kernel(env=env)
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


def test_widget_state_is_saved_into_the_notebook(
    server: Server, kernelspec: str, tmp_path: Path
) -> None:
    import os

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "sandbox", "display_name": "Sandbox (bash)",
                                       "language": "bash"}  # fmt: skip
    notebook.cells = [nbformat.v4.new_code_cell("%sandbox_panel --interval 1"),
                      nbformat.v4.new_code_cell("sleep 1; echo done")]  # fmt: skip
    saved = {name: os.environ.get(name) for name in ("SANDBOX_URL", "SANDBOX_TOKEN")}
    os.environ["SANDBOX_URL"], os.environ["SANDBOX_TOKEN"] = server.url, server.token or ""
    try:
        NotebookClient(notebook, timeout=60, kernel_name="sandbox",
                       store_widget_state=True).execute()  # fmt: skip
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    models = {entry["model_name"] for entry in state.values()}
    assert {"TabModel", "FloatProgressModel", "TextModel"} <= models
    assert notebook.cells[1].outputs[0]["text"] == "done\n"


async def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- a panel that never dies silently ----------------------------------------------------------


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

    def sample() -> LoadSample:
        if problems:
            raise problems.pop(0)
        return LoadSample(busy=1, total=2)

    def on_sample(value: LoadSample, wait: float) -> None:
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
        await _until(lambda: len(samples) >= 2, 15)
        assert poller.running
        poller.stop()

    asyncio.run(scenario())
    kinds = [text.split(":")[0] for text, _ in errors]
    assert kinds == ["ValueError", "KeyError", "TypeError", "RuntimeError"], errors
    waits = [wait for _, wait in errors]
    assert waits == sorted(waits) and waits[-1] > waits[0]  # backing off
    assert samples, "polling did not recover"


def test_a_malformed_load_is_said_in_the_panel_which_keeps_polling(
    kernelspec: str, tmp_path: Path
) -> None:
    from .hostile.test_page import FakeSandbox, FolderKernel, fixture_body, kernel_env

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


def test_the_files_tab_shows_hostile_names_and_content_as_text(
    server: Server, kernelspec: str, tmp_path: Path
) -> None:
    from .hostile.test_host_paths import _panel_models, _panel_values, _select
    from .hostile.test_page import FolderKernel, kernel_env, own_html_problems

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
        pause = {"method": "update", "state": {"value": True}, "buffer_paths": []}
        _send(kernel, models["Pause"], pause)  # no load refresh among the values read below
        _messages(kernel.client, 1)
        shown = []
        for name in names:
            _send(kernel, models["select"], _select(models["options"], name))
            _send(kernel, models["Show"], {"method": "custom", "content": {"event": "click"}})
            values = [v for v in _panel_values(_messages(kernel.client, 2)) if v]
            assert values, f"nothing shown for {name}"
            shown.append(values[-1])
        assert "&lt;script&gt;alert(2)&lt;/script&gt;" in shown[0]
        assert "&lt;img src=x onerror=alert(3)&gt;" in shown[1]
        assert shown[2].startswith('<img alt="drawing.svg" src="data:image/svg+xml;base64,')
        for value in shown:
            assert own_html_problems(value) == [], value
    finally:
        kernel.stop()
