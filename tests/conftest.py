"""Shared fixtures: the embedded server as a real process on a free loopback port.

Every server gets temporary data and runtime directories, and its process table is checked
when it stops: no command it ran may survive it.

Two tiers: ``pytest -m "not slow"`` runs the fast one (pure modules, the server's application
and the kernel's handlers in-process, the protocol over loopback, one kernel cell and one
interrupt through jupyter_client); plain ``pytest`` runs everything. The suites marked
``slow`` start many processes: the suites of :data:`SLOW_SUITES` (below), and single tests
marked ``pytest.mark.slow`` where they are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox_kernel.discovery import EmbeddedServer

# Re-exported: the suites import these from here (one definition, in helpers.py).
from .helpers import descendants as descendants
from .helpers import kernel_env, living, patched_environ
from .helpers import processes_matching as processes_matching
from .helpers import wait_until as wait_until
from .proxy import CountingProxy

#: Suites (folders and files under tests/) whose every test is slow: each test starts servers,
#: kernels, JupyterLab, a browser, or attacks the sandbox with many processes of its own.
#: The one list: files do not mark themselves, so that the fast tier does not import them.
SLOW_SUITES = frozenset(
    {
        "hostile",
        "faults",
        "cluster",
        "deploy",
        "hub",
        "load",
        "test_cli.py",
        "test_kernel_suite.py",
        "test_magics_kernel.py",
        "test_notebooks.py",
        "test_panel_browser.py",
        "test_server_isolation.py",
        "test_server_stream.py",
        "test_verdicts.py",
        "test_async_client.py",
        "test_kernel_live.py",
        "test_live_browser.py",
        "test_grade.py",
        "test_check.py",
        "test_check_kernel.py",
    }
)


def _suite(path: Path) -> str | None:
    """The folder or file directly under tests/ that ``path`` belongs to."""
    try:
        return path.relative_to(Path(__file__).parent).parts[0]
    except (ValueError, IndexError):
        return None


def _fast_tier_only(config: pytest.Config) -> bool:
    """Whether the run is exactly ``-m "not slow"``, the fast tier."""
    return " ".join(str(config.getoption("markexpr") or "").split()) == "not slow"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The fast tier does not even import the slow suites (importing JupyterLab, Playwright
    and the hostile harness took 6 s of its minute); any other run collects them."""
    if _fast_tier_only(config) and _suite(collection_path) in SLOW_SUITES:
        return True
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`SLOW_SUITES` ``slow``."""
    for item in items:
        if _suite(item.path) in SLOW_SUITES:
            item.add_marker(pytest.mark.slow)


def _require(program: str, package: str) -> None:
    if shutil.which(program) is None:
        pytest.fail(
            f"{program} is missing: install the Debian package {package} "
            f"(apt-get install -y {package}); .ci/run does this",
            pytrace=False,
        )


class Server:
    """A running embedded server and raw HTTP helpers to talk to it."""

    def __init__(self, embedded: EmbeddedServer, data_dir: Path, runtime_dir: Path) -> None:
        self.embedded = embedded
        self.data_dir = data_dir
        self.runtime_dir = runtime_dir
        self.url = embedded.url
        self.token = embedded.token
        self.http = requests.Session()
        if self.token:
            self.http.headers["Authorization"] = f"Bearer {self.token}"

    @property
    def pid(self) -> int:
        assert self.embedded.process is not None
        return self.embedded.process.pid

    @property
    def work_area(self) -> Path:
        """Where this server keeps its runners' working directories (``storage._work_area``):
        ``work/<pid>`` of its data dir, or a private ``sandbox-kernel-work-<tag>-<pid>-*``
        folder in /var/tmp (or /tmp) when the sandbox user cannot reach the data dir. The tag
        is this data dir's: a killed server of another test may have left a folder with a pid
        that is this server's now (pids are reused)."""
        pid = self.pid
        tag = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        candidates = [
            self.data_dir / "work" / str(pid),
            *Path("/var/tmp").glob(f"sandbox-kernel-work-{tag}-{pid}-*"),
            *Path("/tmp").glob(f"sandbox-kernel-work-{tag}-{pid}-*"),
        ]
        found = [path for path in candidates if path.is_dir() and not path.is_symlink()]
        assert len(found) == 1, f"the working directories of server {pid}: {found}"
        return found[0]

    def post_execute(
        self, config: Any, environment: bytes | None = None, **kwargs: Any
    ) -> requests.Response:
        files: dict[str, Any] = {"config": (None, json.dumps(config))}
        if environment is not None:
            files["environment"] = ("environment.tgz", environment, "application/gzip")
        return self.http.post(self.url + "execute/", files=files, timeout=60, **kwargs)

    def execute(self, config: Any, environment: bytes | None = None) -> dict[str, Any]:
        response = self.post_execute(config, environment)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def run(self, *commands: Any, **config: Any) -> dict[str, Any]:
        return self.execute({"commands": list(commands), **config})

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=60, **kwargs)

    def stop(self) -> None:
        self.embedded.stop()


@pytest.fixture(scope="session", autouse=True)
def _prerequisites() -> None:
    _require("bwrap", "bubblewrap")


@pytest.fixture(scope="session")
def jupyter_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Private Jupyter directories for the whole session: nothing lands in the user's."""
    root = tmp_path_factory.mktemp("jupyter")
    env = {
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
    }
    with patched_environ(**env, SANDBOX_URL=None, SANDBOX_TOKEN=None):
        yield env


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory, jupyter_dirs: dict[str, str]
) -> Iterator[Callable[..., Server]]:
    """``start_server(*serve_args)``: a new server; stopped (and checked) at the end."""
    started: list[Server] = []

    def start(*args: str, token: str | None = None, data_dir: Path | None = None) -> Server:
        root = tmp_path_factory.mktemp("server")
        data_dir = data_dir or root / "data"
        embedded = EmbeddedServer(*args, data_dir=data_dir, token=token)
        embedded.start()
        server = Server(embedded, data_dir, Path(jupyter_dirs["JUPYTER_RUNTIME_DIR"]))
        started.append(server)
        return server

    yield start
    for server in started:
        process = server.embedded.process
        before = descendants(process.pid) if process is not None else []
        server.stop()
        assert wait_until(lambda pids=before: not living(pids)), (
            f"processes left behind by the server: {living(before)}"
        )


@pytest.fixture(scope="session")
def server(start_server: Callable[..., Server]) -> Server:
    """One shared server with the default settings (and a token), for read-mostly tests."""
    return start_server("--workers", "4")


# -- kernels ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kernelspec(jupyter_dirs: dict[str, str]) -> str:
    """The Sandbox kernelspec, installed into the session's private Jupyter data dir."""
    from sandbox_kernel.install import install

    install(user=True)
    return "sandbox"


class Cell:
    """What a cell sent back: the reply and every output message, in order."""

    def __init__(self, reply: dict[str, Any], outputs: list[dict[str, Any]], seconds: float):
        self.reply = reply["content"]
        self.outputs = outputs
        self.seconds = seconds

    @property
    def status(self) -> str:
        return str(self.reply["status"])

    def stream(self, name: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [m["content"] for m in self.outputs if m["msg_type"] == msg_type]


class KernelSession:
    """A Sandbox kernel started through jupyter_client, as a notebook front-end does."""

    def __init__(self, env: dict[str, str], cwd: Path | None = None) -> None:
        from jupyter_client.manager import KernelManager

        self.manager = KernelManager(kernel_name="sandbox")
        # Jupyter starts a kernel in its notebook's folder: the only local folder its magics
        # may read and write (unless allow_host_paths).
        self.manager.start_kernel(env=env, cwd=str(cwd) if cwd is not None else None)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> Cell:
        outputs: list[dict[str, Any]] = []

        def keep(message: dict[str, Any]) -> None:
            if message["msg_type"] not in ("status", "execute_input"):
                outputs.append(message)

        started = time.monotonic()
        reply = self.client.execute_interactive(code, output_hook=keep, timeout=timeout)
        return Cell(reply, outputs, time.monotonic() - started)

    def stop(self) -> None:
        if self.manager.has_kernel:
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=False)


@pytest.fixture
def start_kernel(kernelspec: str) -> Iterator[Callable[..., KernelSession]]:
    """``start_kernel(server=None, cwd=None, **env)``: a kernel on ``server`` (or its embedded
    default), started in the folder ``cwd`` (the notebook's folder)."""
    kernels: list[KernelSession] = []

    def start(server: Server | None = None, cwd: Path | None = None, **extra: str) -> KernelSession:
        if server is None:
            env = kernel_env(**extra)
        else:
            env = kernel_env(server.url, server.token or "", **extra)
        kernel = KernelSession(env, cwd)
        kernels.append(kernel)
        return kernel

    yield start
    for kernel in kernels:
        kernel.stop()


@pytest.fixture
def counting_proxy(server: Server) -> Iterator[CountingProxy]:
    """A real proxy on loopback in front of :func:`server`, counting (and delaying, with its
    ``delays``) the requests that pass."""
    proxy = CountingProxy(server.url)
    yield proxy
    proxy.close()
