"""Notebooks on the Sandbox kernel in a real JupyterLab, driven by a real (headless) Chromium.

Nothing is mocked: a JupyterLab server runs as a process with the session's private Jupyter
directories, its kernels talk to the session's embedded sandbox server (``SANDBOX_URL`` and
``SANDBOX_TOKEN``), and Debian's Chromium is driven through Playwright for Python. Screenshots
go to ``tests/artifacts/`` (git-ignored).

Helper API for browser tests (see the section "Helper API" below)::

    write_notebook(lab, name, cells)        # an .ipynb on disk, kernelspec "sandbox"
    page = open_notebook(new_page(), lab, name)   # open in JupyterLab, wait for kernel idle
    run_all(page)                           # Run > Run All Cells, wait until all cells ran
    start_run_all(page); wait_until_run(page)     # the same in two steps (run in background)
    output_texts(page)                      # text of every output, in page order
    screenshot(page, "name")                # tests/artifacts/name.png

Each ``open_notebook`` uses its own JupyterLab workspace, so that several pages (tabs of one
browser context, made with ``new_page()``) can show different notebooks at the same time, e.g.
a panel in one tab while cells run in a notebook of another tab.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import Server, descendants, wait_until
from .helpers import free_port, kernel_env, living

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
KERNELSPEC = {"name": "sandbox", "display_name": "Sandbox (bash)", "language": "bash"}

# Timeouts in milliseconds (Playwright's unit). JupyterLab's first load can take 10-20 s.
LOAD_TIMEOUT = 60_000
KERNEL_TIMEOUT = 60_000
RUN_TIMEOUT = 60_000

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# JupyterLab user settings: no news, no update checks (no network, no notification toasts).
USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    # Every cell stays in the DOM (no virtual scrolling), so prompts and outputs can be read.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright (Python) is missing: /work/venv/bin/pip install playwright "
            "(no browser download needed: Debian's chromium is used)",
            pytrace=False,
        )
    return sync_playwright


def _require_jupyterlab() -> None:
    try:
        import jupyterlab  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as error:
        pytest.fail(
            f"{error.name} is missing: /work/venv/bin/pip install jupyterlab nbformat",
            pytrace=False,
        )


# -- fixtures ---------------------------------------------------------------------------------


class Lab:
    """A running JupyterLab: ``url`` (ending in /), ``token``, ``root`` (notebook directory)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, token: str, root: Path):
        self.process = process
        self.port = port
        self.token = token
        self.root = root
        self.url = f"http://127.0.0.1:{port}/"
        self.log = root.parent / "jupyterlab.log"

    def api(self, path: str) -> requests.Response:
        return requests.get(
            self.url + "api/" + path,
            headers={"Authorization": f"token {self.token}"},
            timeout=10,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory,
    jupyter_dirs: dict[str, str],
    kernelspec: str,
    server: Server,
) -> Iterator[Lab]:
    """JupyterLab on a free loopback port, its kernels on the session's sandbox server."""
    _require_jupyterlab()
    home = tmp_path_factory.mktemp("lab")
    root = home / "notebooks"
    settings = home / "user-settings"
    for relative, values in USER_SETTINGS.items():
        path = settings / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    root.mkdir()
    port = free_port()
    token = secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:  # containers and CI run as root; JupyterLab refuses without this
        command.append("--allow-root")
    env = kernel_env(server.url, server.token or "", **jupyter_dirs)
    log = (home / "jupyterlab.log").open("wb")
    process = subprocess.Popen(
        command, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    instance = Lab(process, port, token, root)

    def ready() -> bool:
        if process.poll() is not None:
            return True
        try:
            return instance.api("status").status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, timeout=60)
        if process.poll() is not None or not ready():
            pytest.fail(
                f"JupyterLab did not start ({' '.join(command)}):\n{instance.log_tail()}",
                pytrace=False,
            )
        yield instance
    finally:
        before = descendants(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        left = living(before)
        if left and not wait_until(lambda: not living(before), timeout=10):
            for pid in living(before):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.close()
        assert not living(before), f"processes left behind by JupyterLab: {living(before)}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through Playwright (no browser download)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium is missing: apt-get install -y chromium ({CHROMIUM})", pytrace=False)
    with _playwright()() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[[], Any]]:
    """``new_page()``: a new tab (all tabs of a test share one browser context and its cookies)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(LOAD_TIMEOUT)
    try:
        yield context.new_page
    finally:
        context.close()


# -- Helper API -------------------------------------------------------------------------------
# For browser tests of the Sandbox kernel and its panel (``%sandbox_panel``).


def write_notebook(lab: Lab, name: str, cells: list[str]) -> Path:
    """Write ``<lab.root>/<name>.ipynb`` with one code cell per source, on the Sandbox kernel."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata["language_info"] = {"name": "bash"}
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    path = lab.root / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def open_notebook(page: Any, lab: Lab, name: str, workspace: str | None = None) -> Any:
    """Open ``<name>.ipynb`` in JupyterLab in ``page``; return once its kernel is idle.

    Each page gets its own workspace (``workspace`` or the notebook name), so that two tabs
    never fight over JupyterLab's layout. Returns ``page``.
    """
    from playwright.sync_api import expect

    workspace = workspace or re.sub(r"[^A-Za-z0-9_-]", "-", name)
    page.goto(
        f"{lab.url}lab/workspaces/{workspace}/tree/{name}.ipynb?reset&token={lab.token}",
        timeout=LOAD_TIMEOUT,
    )
    panel = notebook_panel(page)
    expect(panel).to_be_visible(timeout=LOAD_TIMEOUT)
    expect(panel.locator(".jp-Cell").first).to_be_visible(timeout=LOAD_TIMEOUT)
    wait_for_kernel_idle(page)
    return page


def notebook_panel(page: Any) -> Any:
    """Locator of the notebook panel currently shown in the main area."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").first


def wait_for_kernel_idle(page: Any, timeout: float = KERNEL_TIMEOUT) -> None:
    """Wait until the notebook's kernel is connected and idle (toolbar indicator)."""
    from playwright.sync_api import expect

    panel = notebook_panel(page)
    expect(panel.locator(".jp-KernelName")).to_have_text(
        KERNELSPEC["display_name"], timeout=timeout
    )
    expect(panel.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
        "data-status", "idle", timeout=timeout
    )


def start_run_all(page: Any) -> None:
    """Click Run > Run All Cells and return at once (cells go on running)."""
    page.locator("#jp-MainMenu .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    menu = page.locator(".lm-Menu").last
    menu.locator(
        ".lm-Menu-item",
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")),
    ).click()


def wait_until_run(page: Any, timeout: float = RUN_TIMEOUT) -> None:
    """Wait until every code cell has an execution count and the kernel is idle again."""
    panel = notebook_panel(page)
    prompts = panel.locator(".jp-CodeCell .jp-InputPrompt")
    page.wait_for_function(
        """(panel) => {
            const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
            return prompts.length > 0
                && prompts.every((p) => /^\\[\\d+\\]:$/.test(p.textContent.trim()));
        }""",
        arg=panel.element_handle(),
        timeout=timeout,
    )
    assert prompts.count() > 0
    wait_for_kernel_idle(page, timeout)


def run_all(page: Any, timeout: float = RUN_TIMEOUT) -> None:
    """Run all cells of the open notebook and wait until they have all run."""
    start_run_all(page)
    wait_until_run(page, timeout)


def output_texts(page: Any) -> list[str]:
    """Visible text of every output of the open notebook, in page order."""
    texts: list[str] = notebook_panel(page).locator(".jp-OutputArea-output").all_inner_texts()
    return texts


def screenshot(page: Any, name: str) -> Path:
    """Save a screenshot of ``page`` to ``tests/artifacts/<name>.png``; return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


#: Where the documentation's screenshots live; the panel test refreshes them there when
#: SANDBOX_KERNEL_UPDATE_DOCS=1 (otherwise they go to tests/artifacts/ only, and a test run
#: leaves the repository unchanged).
DOCS = Path(__file__).resolve().parents[1] / "docs"


def photograph(element: Any, name: str) -> Path:
    """Screenshot one element (a cell with its output) as ``tests/artifacts/<name>.png``, and
    as ``docs/<name>.png`` when SANDBOX_KERNEL_UPDATE_DOCS=1; returns the artifact's path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    element.scroll_into_view_if_needed()
    element.screenshot(path=str(path), animations="disabled")
    if os.environ.get("SANDBOX_KERNEL_UPDATE_DOCS") == "1":
        (DOCS / f"{name}.png").write_bytes(path.read_bytes())
    return path


def hide_left_sidebar(page: Any) -> None:
    """Collapse JupyterLab's left sidebar (the file browser), so that the notebook, and the
    panel with it, takes the page's width."""
    current = page.locator("#jp-left-stack:not(.lm-mod-hidden)")
    if current.count():
        page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()
        current.wait_for(state="hidden")


# -- tests ------------------------------------------------------------------------------------


def test_notebook_runs_in_the_browser(lab: Lab, new_page: Callable[[], Any]) -> None:
    from playwright.sync_api import expect

    write_notebook(lab, "notebook", ["echo hello from the browser", "x=41; echo $((x+1))"])
    page = open_notebook(new_page(), lab, "notebook")
    try:
        run_all(page)
    finally:
        screenshot(page, "notebook")
    outputs = notebook_panel(page).locator(".jp-OutputArea-output")
    expect(outputs.filter(has_text="hello from the browser")).to_be_visible()
    expect(outputs.filter(has_text=re.compile(r"^\s*42\s*$"))).to_be_visible()
    assert [text.strip() for text in output_texts(page)] == ["hello from the browser", "42"]
    screenshot(page, "notebook")


def test_two_notebooks_in_two_tabs(lab: Lab, new_page: Callable[[], Any]) -> None:
    """A notebook runs in one tab while another tab runs its own: the harness for panel tests."""
    write_notebook(lab, "slow", ["sleep 3; echo slow done"])
    write_notebook(lab, "quick", ["echo quick done"])
    slow = open_notebook(new_page(), lab, "slow")
    quick = open_notebook(new_page(), lab, "quick")
    start_run_all(slow)
    notebook_panel(slow).locator(".jp-InputPrompt", has_text="[*]").wait_for()
    run_all(quick)
    assert [text.strip() for text in output_texts(quick)] == ["quick done"]
    assert output_texts(slow) == [], "the slow notebook finished before the quick one ran"
    wait_until_run(slow)
    assert [text.strip() for text in output_texts(slow)] == ["slow done"]
    screenshot(quick, "two-tabs-quick")
    screenshot(slow, "two-tabs-slow")


def test_panel_in_the_browser(lab: Lab, new_page: Callable[[], Any]) -> None:
    """%sandbox_panel in JupyterLab: every tab shows real values in human form, the Libraries
    tab starts on the tools and categories with its search box focused and filters as one
    types, and the load (gauge, chart) moves while another notebook runs a cell. Each tab is
    photographed (docs/panel-*.png with SANDBOX_KERNEL_UPDATE_DOCS=1)."""
    from playwright.sync_api import expect

    write_notebook(lab, "panel", ["mkdir -p project && cd project && echo seed > seed.txt",
                                  "%sandbox_panel --interval 0.5"])  # fmt: skip
    write_notebook(lab, "busy", ["sleep 8; echo busy done"])
    page = open_notebook(new_page(), lab, "panel")
    hide_left_sidebar(page)
    run_all(page)
    panel = notebook_panel(page)
    tabs = panel.locator(".lm-TabBar-tab, .p-TabBar-tab")
    tabs.first.wait_for(timeout=30_000)
    titles = [title.strip() for title in tabs.all_inner_texts()]
    assert titles == ["Overview", "Specifications", "Libraries", "Load", "Files"], titles
    cell = panel.locator(".jp-CodeCell").nth(1)
    assert panel.locator(".widget-hprogress, .widget-progress").count() == 1  # one gauge

    def show(title: str) -> Any:
        panel.locator(".lm-TabBar-tab, .p-TabBar-tab", has_text=title).first.click()
        # The visible page of the tab widget (the others stay in the DOM, hidden).
        return panel.locator(".widget-tab-contents > :not(.lm-mod-hidden):not(.p-mod-hidden)").first

    contents = show("Overview")
    expect(contents).to_contain_text("3.0.3+sandbox-kernel", timeout=20_000)
    expect(contents).to_contain_text("connected", timeout=20_000)
    expect(contents).to_contain_text("expires in 1 day")
    expect(contents).to_contain_text("/4 busy", timeout=20_000)
    expect(contents).not_to_contain_text("unknown")
    photograph(cell, "panel-overview")
    specifications = show("Specifications")
    expect(specifications).to_contain_text("bubblewrap", timeout=20_000)
    expect(specifications).to_contain_text("environments kept for")
    for absent in ("unknown", "Docker", "days ("):
        expect(specifications).not_to_contain_text(absent)
    photograph(cell, "panel-specifications")

    libraries = show("Libraries")
    search = libraries.locator("input[type=text]").first
    expect(search).to_be_focused(timeout=10_000)  # ready to type
    expect(libraries).to_contain_text("Main tools", timeout=30_000)
    expect(libraries).to_contain_text("entries installed")
    expect(libraries.locator(".widget-toggle-button", has_text="executables · ")).to_be_visible()
    photograph(cell, "panel-libraries")
    page.keyboard.type("gcc")
    expect(libraries.locator("caption").first).to_contain_text("matches", timeout=10_000)
    gcc = libraries.locator("tr", has=page.locator("td", has_text=re.compile("^executables$")))
    expect(gcc.filter(has=page.locator("td", has_text=re.compile(r"^gcc$")))).to_contain_text(
        re.compile(r"gcc\s*\d+\.\d+")
    )  # an executable with its version
    search.fill("bash")
    expect(libraries.locator("caption").first).not_to_contain_text("gcc", timeout=10_000)
    expect(libraries).to_contain_text("bash")
    expect(libraries).not_to_contain_text("?")

    files = show("Files")
    expect(files).to_contain_text("Files in /home/student/project", timeout=10_000)
    expect(files).to_contain_text("seed.txt")
    files.locator("select option", has_text="seed.txt").click()
    files.locator("button", has_text="Show").click()
    expect(files.locator("pre")).to_have_text("seed\n", timeout=10_000)
    photograph(cell, "panel-files")

    load = show("Load")
    expect(load).to_contain_text("0/4 busy", timeout=20_000)
    expect(load.locator("svg text", has_text="now")).to_be_visible()
    expect(load.locator("svg text", has_text="100%")).to_be_visible()
    busy = open_notebook(new_page(), lab, "busy")
    start_run_all(busy)
    page.bring_to_front()
    expect(load).to_contain_text("1/4 busy", timeout=20_000)
    expect(load.locator("svg text", has_text="1/4 busy")).to_be_visible()
    page.wait_for_timeout(3000)  # a few samples at 25 % in the chart
    photograph(cell, "panel-load")
    screenshot(page, "panel")
    wait_until_run(busy)
    expect(load).to_contain_text("0/4 busy", timeout=20_000)
