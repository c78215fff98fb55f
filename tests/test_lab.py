"""``sandbox-kernel lab`` as a well-kept launcher, run as a user runs it: a real process with
its own HOME and Jupyter directories, JupyterLab, a kernel started through JupyterLab's REST
API, and real signals.

The copy rules of the demo notebooks are also checked in-process (fast tier) on real files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox_kernel.lab import (
    ANNOUNCEMENTS_PLUGIN,
    DEMO_NOTEBOOKS,
    STARTED_BY,
    copy_notebooks,
    demo_notebooks_folder,
)

from .helpers import descendants, is_alive, kernel_env, living, wait_until

CLI = [sys.executable, "-m", "sandbox_kernel.cli"]
REPOSITORY = Path(__file__).parent.parent
URL_LINE = re.compile(r"^JupyterLab: (http://127\.0\.0\.1:(\d+)/)lab\?token=(\w+)(.*)$")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"

#: Seconds for JupyterLab to answer (its first start on a loaded 2-core machine is slow).
START_TIMEOUT = 180


# -- a lab process ------------------------------------------------------------------------------


class Lab:
    """A running ``sandbox-kernel lab`` and what it printed (read by a thread, line by line)."""

    def __init__(self, root: Path, args: list[str], env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.process = subprocess.Popen(
            [*CLI, "lab", "--no-browser", *args], cwd=root, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.url, self.port, self.token, self.url_note = self._wait_for_url()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<end of output>")
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if match := pattern.match(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or "<end of output>" in self.lines:
                    pytest.fail(f"lab never printed {pattern.pattern!r}:\n{self.output}")
                self._changed.wait(left)

    def _wait_for_url(self) -> tuple[str, int, str, str]:
        match = self.wait_for_line(URL_LINE, START_TIMEOUT)
        # The whole announcement is one write, but the reader thread may wake us between its
        # lines: wait for its last one.
        self.wait_for_line(re.compile(r"^Ctrl-C \(or SIGTERM, SIGHUP\) stops "), 30)
        return match[1], int(match[2]), match[3], match[4]

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"token {self.token}"}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.env["JUPYTER_RUNTIME_DIR"])

    @property
    def data_dir(self) -> Path:
        return Path(self.env["JUPYTER_DATA_DIR"])

    @property
    def temp_dir(self) -> Path:
        return Path(self.env["TMPDIR"])

    def children(self, marker: str) -> list[int]:
        """Processes under lab whose command line holds ``marker``."""
        return [pid for pid in descendants(self.process.pid) if marker in _cmdline(pid)]

    def stop(self, signum: int = signal.SIGINT, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"lab still ran {timeout} s after {signal.Signals(signum).name}")

    def kill_everything(self) -> None:
        """Teardown after a failed test: nothing of it may outlive the test."""
        tree = descendants(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {name.decode(): value.decode() for name, value in pairs}


@contextlib.contextmanager
def public_temp_dir() -> Iterator[Path]:
    """A TMPDIR of its own that others may traverse, as /tmp: the server makes the folder of
    its isolation probe there, for the sandbox user (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-kernel-test-tmp-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def lab_env(root: Path, temp: Path) -> dict[str, str]:
    """A user of their own: HOME and Jupyter directories under ``root``, TMPDIR ``temp``."""
    names = ("HOME", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR")
    dirs = {name: root / name.lower() for name in names}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return kernel_env(TMPDIR=str(temp), **{name: str(path) for name, path in dirs.items()})


@pytest.fixture
def temp_dir() -> Iterator[Path]:
    with public_temp_dir() as path:
        yield path


@pytest.fixture
def start_lab(tmp_path: Path, temp_dir: Path) -> Iterator[Callable[..., Lab]]:
    """``start_lab(*args, env=None)``: a lab started with ``--no-browser``, killed with all
    its processes at the end if the test left it running."""
    started: list[Lab] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Lab:
        lab = Lab(tmp_path, list(args), env or lab_env(tmp_path, temp_dir))
        started.append(lab)
        return lab

    yield start
    for lab in started:
        if lab.process.poll() is None:
            lab.kill_everything()


def start_kernel(lab: Lab) -> int:
    """A Sandbox kernel started through JupyterLab's REST API (as opening a notebook does),
    once it answers on its connection file: its pid."""
    from jupyter_client.blocking import BlockingKernelClient

    response = lab.api("POST", "api/kernels", json={"name": "sandbox"})
    assert response.status_code == 201, response.text
    kernel_id = response.json()["id"]
    connection = lab.runtime_dir / f"kernel-{kernel_id}.json"
    assert wait_until(connection.exists, 60), f"no connection file {connection}"
    client = BlockingKernelClient()
    client.load_connection_file(str(connection))
    client.start_channels()
    try:
        client.wait_for_ready(timeout=90)
    finally:
        client.stop_channels()
    [kernel] = lab.children(kernel_id)  # its command line names its connection file
    return kernel


# -- stopping -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "Ctrl-C"])  # fmt: skip
def test_a_stop_signal_stops_jupyterlab_its_kernels_and_the_server(
    start_lab: Callable[..., Lab], signum: int
) -> None:
    lab = start_lab("--port", "0")
    kernel = start_kernel(lab)
    [jupyterlab] = lab.children("-m jupyterlab")
    [server] = lab.children("-m sandbox_kernel.server")
    tree = descendants(lab.process.pid)
    assert kernel in tree and jupyterlab in tree and server in tree
    # The server lab started is advertised as lab's while it runs, and the kernel uses it.
    [advert] = lab.runtime_dir.glob("sandbox-kernel-server-*.json")
    info = json.loads(advert.read_text())
    assert (info["started_by"], info["pid"]) == (STARTED_BY, lab.process.pid)
    assert _environ_of(kernel)["SANDBOX_URL"] == info["url"]
    [token_file] = lab.temp_dir.glob("sandbox-kernel-lab-*/jupyterlab-token")

    started = time.monotonic()
    assert lab.stop(signum) == 0, lab.output
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    assert f"{name}: stopping JupyterLab, its kernels" in lab.output
    # Generous bound: JupyterLab shuts its kernels down in a few seconds here.
    assert wait_until(lambda: not living(tree), 30), (
        f"left running {time.monotonic() - started:.0f} s after {name}: "
        + "; ".join(f"{pid} {_cmdline(pid)[:80]}" for pid in living(tree))
    )
    assert not is_alive(kernel) and not is_alive(jupyterlab) and not is_alive(server)
    leftovers = [*lab.runtime_dir.glob("sandbox-kernel-server-*.json"),
                 *lab.runtime_dir.glob("jpserver-*.json"), token_file]  # fmt: skip
    assert not [path for path in leftovers if path.exists()]
    # In TMPDIR, only lab's logs stay: no scratch directory, no token, no config.
    [logs] = lab.temp_dir.iterdir()
    assert logs == token_file.parent
    assert sorted(path.name for path in logs.iterdir()) == ["jupyterlab.log", "sandbox-server.log"]


# -- a lab on a taken port, with a changed notebook -----------------------------------------


@pytest.fixture(scope="module")
def taken_port_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, int]]:
    """A lab asked for a port that something else holds, for a user who changed their copy
    of the quickstart (recorded as copied by an earlier lab)."""
    with contextlib.ExitStack() as stack:
        yield from _taken_port_lab(tmp_path_factory, stack)


def _taken_port_lab(
    tmp_path_factory: pytest.TempPathFactory, stack: contextlib.ExitStack
) -> Iterator[tuple[Lab, int]]:
    root = tmp_path_factory.mktemp("lab")
    temp = stack.enter_context(public_temp_dir())
    env = lab_env(root, temp)
    work = Path(env["JUPYTER_DATA_DIR"]) / "sandbox-kernel" / "notebooks"
    work.mkdir(parents=True)
    original = (REPOSITORY / "notebooks" / DEMO_NOTEBOOKS[0]).read_bytes()
    (work / DEMO_NOTEBOOKS[0]).write_bytes(original.replace(b"Hello", b"Bonjour"))
    manifest = {"copies": {DEMO_NOTEBOOKS[0]: hashlib.sha256(original).hexdigest()}}
    (work.parent / "notebooks-copied.json").write_text(json.dumps(manifest))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lab = Lab(root, ["--port", str(port)], env)
        try:
            yield lab, port
        finally:
            if lab.process.poll() is None:
                lab.stop(signal.SIGINT)
            if lab.process.poll() is None:
                lab.kill_everything()


@pytest.mark.slow
def test_the_printed_url_is_the_one_jupyterlab_bound(taken_port_lab: tuple[Lab, int]) -> None:
    lab, taken = taken_port_lab
    assert lab.port != taken
    assert lab.url_note == f" (port {taken} was taken)"
    # Printed once JupyterLab answers: the first request after reading it succeeds.
    status = lab.api("GET", "api/status")
    assert status.status_code == 200, status.text
    [runtime] = lab.runtime_dir.glob("jpserver-*.json")
    assert json.loads(runtime.read_text())["port"] == lab.port
    assert sum(line.startswith("JupyterLab: http") for line in lab.lines) == 1


@pytest.mark.slow
def test_news_and_update_prompts_are_off(taken_port_lab: tuple[Lab, int]) -> None:
    lab, _ = taken_port_lab
    page = lab.api("GET", "lab")
    assert page.status_code == 200
    match = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                      page.text, re.S)  # fmt: skip
    assert match, "no page config in JupyterLab's page"
    config = json.loads(match[1])
    # The plugin that asks "Would you like to get notified about official Jupyter news?"
    # and checks for updates is not loaded by the page.
    assert ANNOUNCEMENTS_PLUGIN in config["disabledExtensions"]
    assert config["news"] == {"disabled": True}
    assert lab.api("GET", "lab/api/news").json() == {"news": []}
    assert lab.api("GET", "lab/api/update").json() == {"notification": None}


@pytest.mark.slow
def test_a_browser_shows_no_news_question(taken_port_lab: tuple[Lab, int]) -> None:
    """What the class sees on the projector: JupyterLab without "Would you like to get
    notified about official Jupyter news?" (shown within seconds when only
    ``LabApp.news_url=None`` is given)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium is missing: apt-get install -y chromium ({CHROMIUM})", pytrace=False)
    try:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (Python) is missing: pip install playwright", pytrace=False)
    lab, _ = taken_port_lab
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{lab.url}lab?token={lab.token}")
            page.wait_for_selector(".jp-Launcher", timeout=90_000)
            question = page.get_by_text("official Jupyter news")
            with contextlib.suppress(PlaywrightTimeout):
                question.wait_for(timeout=10_000)  # well past when it would show
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "lab-launcher.png"))
            assert question.count() == 0, "JupyterLab asks about Jupyter news"
        finally:
            browser.close()


@pytest.mark.slow
def test_lab_works_on_copies_of_the_demo_notebooks(taken_port_lab: tuple[Lab, int]) -> None:
    lab, _ = taken_port_lab
    work = lab.data_dir / "sandbox-kernel" / "notebooks"
    root = lab.api("GET", "api/contents/").json()
    assert sorted(entry["name"] for entry in root["content"]) == sorted([*DEMO_NOTEBOOKS, "tests"])
    assert f"notebooks:  {work}" in lab.lines
    # The user's change stays, and lab says so; the others are exact copies.
    assert b"Bonjour" in (work / DEMO_NOTEBOOKS[0]).read_bytes()
    assert f"kept your changed {DEMO_NOTEBOOKS[0]}" in lab.output
    assert "copied 4 demo notebooks and 3 of their files" in lab.output
    for name in DEMO_NOTEBOOKS[1:]:
        assert (work / name).read_bytes() == (REPOSITORY / "notebooks" / name).read_bytes()
    # A notebook saved through JupyterLab lands in the copies, not in the project.
    saved = {"type": "notebook", "content": json.loads((work / DEMO_NOTEBOOKS[1]).read_text())}
    assert lab.api("PUT", "api/contents/mine.ipynb", json=saved).status_code == 201
    assert (work / "mine.ipynb").exists()
    assert not (REPOSITORY / "notebooks" / "mine.ipynb").exists()


# -- an advertised server, and --dir ------------------------------------------------------------


@pytest.mark.slow
def test_lab_uses_an_advertised_server_and_leaves_it_running(
    start_lab: Callable[..., Lab], tmp_path: Path, temp_dir: Path
) -> None:
    env = lab_env(tmp_path, temp_dir)
    runtime = Path(env["JUPYTER_RUNTIME_DIR"])
    serve = subprocess.Popen([*CLI, "serve", "--port", "0", "--workers", "1"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_until(lambda: bool(list(runtime.glob("sandbox-kernel-server-*.json"))), 60)
        [advert] = runtime.glob("sandbox-kernel-server-*.json")
        served = json.loads(advert.read_text())["url"].rstrip("/") + "/"
        course = tmp_path / "course"
        course.mkdir()
        empty = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        (course / "week1.ipynb").write_text(json.dumps(empty))
        lab = start_lab("--port", "0", "--dir", str(course), env=env)
        assert f"sandbox:    {served} (a local server started by `sandbox-kernel serve`" in (
            lab.output
        )
        assert "not the sandbox server, which lab did not start" in lab.output
        assert not lab.children("-m sandbox_kernel.server")  # no server of its own
        root = lab.api("GET", "api/contents/").json()
        assert [entry["name"] for entry in root["content"]] == ["week1.ipynb"]
        assert not (lab.data_dir / "sandbox-kernel" / "notebooks").exists()  # nothing copied
        kernel = start_kernel(lab)
        assert _environ_of(kernel)["SANDBOX_URL"] == served
        assert lab.stop(signal.SIGTERM) == 0, lab.output
        assert wait_until(lambda: not is_alive(kernel), 30)
        assert serve.poll() is None, "lab stopped a server it did not start"
        assert advert.exists()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)


# -- the copy rules (in-process, real files) ----------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A source folder of two notebooks, an empty work folder and its manifest path."""
    source = tmp_path / "source"
    write(source / "a.ipynb", "a, first version")
    write(source / "b.ipynb", "b, first version")
    return source, tmp_path / "work", tmp_path / "copied.json"


def test_the_first_copy_takes_everything_and_a_second_changes_nothing(
    demo: tuple[Path, Path, Path],
) -> None:
    source, work, manifest = demo
    first = copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    assert first.copied == ["a.ipynb", "b.ipynb"]
    assert (work / "a.ipynb").read_text() == "a, first version"
    again = copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    assert (again.copied, again.updated, again.kept) == ([], [], [])


def test_a_changed_copy_is_never_overwritten(demo: tuple[Path, Path, Path]) -> None:
    source, work, manifest = demo
    copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    write(work / "a.ipynb", "a, the user's work")
    write(source / "a.ipynb", "a, second version")
    write(source / "b.ipynb", "b, second version")
    report = copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    assert report.kept == ["a.ipynb"] and report.updated == ["b.ipynb"]
    assert (work / "a.ipynb").read_text() == "a, the user's work"
    assert (work / "b.ipynb").read_text() == "b, second version"  # unchanged: follows
    assert any(f"kept your changed a.ipynb; the current version: {source / 'a.ipynb'}" in line
               for line in report.lines(source))  # fmt: skip
    # Still the user's next time, said once per version of the demo they could have had.
    again = copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    assert (again.copied, again.updated, again.kept) == ([], [], [])
    write(source / "a.ipynb", "a, third version")
    assert copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest).kept == ["a.ipynb"]
    assert (work / "a.ipynb").read_text() == "a, the user's work"


def test_a_file_lab_never_wrote_counts_as_the_users(demo: tuple[Path, Path, Path]) -> None:
    source, work, manifest = demo
    write(work / "a.ipynb", "a notebook of the user's with the same name")
    report = copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    assert (report.kept, report.copied) == (["a.ipynb"], ["b.ipynb"])
    assert (work / "a.ipynb").read_text() == "a notebook of the user's with the same name"
    manifest.write_text("{not json")  # a damaged manifest errs on the safe side too
    write(source / "b.ipynb", "b, second version")
    report = copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    assert report.kept == ["a.ipynb", "b.ipynb"]
    assert (work / "b.ipynb").read_text() == "b, first version"


def test_a_deleted_copy_comes_back_fresh(demo: tuple[Path, Path, Path]) -> None:
    source, work, manifest = demo
    copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest)
    write(work / "a.ipynb", "changed, then given up")
    (work / "a.ipynb").unlink()
    assert copy_notebooks(source, work, ["a.ipynb", "b.ipynb"], manifest).copied == ["a.ipynb"]
    assert (work / "a.ipynb").read_text() == "a, first version"


def test_the_demo_notebooks_are_the_tracked_ones() -> None:
    """What lab copies and demo runs is what git tracks: a notebook saved into notebooks/
    (by an older lab) is not a demo notebook, and never runs in the tests."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "notebooks/*.ipynb"], cwd=REPOSITORY, capture_output=True,
            text=True, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.fail(f"git ls-files is needed to list the tracked notebooks: {error}")
    assert sorted(Path(path).name for path in tracked) == sorted(DEMO_NOTEBOOKS)
    assert demo_notebooks_folder() == REPOSITORY / "notebooks"
