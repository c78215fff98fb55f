"""A real JupyterHub with the sandbox as its managed service, and clients for it.

Shared by ``tests/hub/`` and ``bench/bench_hub.py``. What runs:

- ``jupyterhub`` (this Python's), loading ``examples/jupyterhub/jupyterhub_config.py`` as a
  site would, through a small file that then changes only what a test must: the
  authenticator (``DummyAuthenticator``), the spawner (``SimpleLocalProcessSpawner``, with
  ``--allow-root`` as root), the Hub's own ports, and where its files go (a scratch folder).
  The example's own knobs (public URL, ports of the proxy and of the sandbox, data dir, run
  log, teachers, kernelspec prefix) are set through its environment variables;
- ``configurable-http-proxy`` from npm, started by the Hub: ``build/hub-proxy`` (see
  :data:`PROXY_INSTALL`), else the ``PATH``;
- the sandbox (``sandbox-kernel serve --hub-auth``), started by the Hub from the example's
  ``c.JupyterHub.services``; users' servers (``jupyterhub-singleuser``) and their Sandbox
  kernels, started through the Hub's REST API and the servers' kernel API.

Everything is reached over loopback through the Hub's proxy, as a browser would: the Hub's
REST API with an admin service's token, the users' servers with the users' own tokens, and
kernels over the Jupyter kernel WebSocket (JSON messages, protocol 5.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "jupyterhub" / "jupyterhub_config.py"
PROXY_PREFIX = REPO / "build" / "hub-proxy"
#: How .ci/run (and the README's "For a class") installs the proxy; the tests look there first.
PROXY_INSTALL = "npm install --prefix build/hub-proxy configurable-http-proxy@5"
KERNEL_NAME = "sandbox"
SERVICE_NAME = "sandbox"

T = TypeVar("T")


class MissingPrerequisite(RuntimeError):
    """Something the Hub test needs is not installed; the message says how to install it."""


# -- prerequisites ---------------------------------------------------------------------------------


def find_proxy() -> Path:
    """configurable-http-proxy: the copy ``.ci/run`` installs under build/, else the PATH's;
    checked to run, since version 5 needs Node.js 20 or later."""
    local = PROXY_PREFIX / "node_modules" / ".bin" / "configurable-http-proxy"
    found = local if local.exists() else shutil.which("configurable-http-proxy")
    if found is None:
        raise MissingPrerequisite(
            "configurable-http-proxy is missing: run "
            f"'{PROXY_INSTALL}' in the repository (needs npm and Node.js 20 or later); "
            ".ci/run does this"
        )
    try:
        probe = subprocess.run(
            [str(found), "--version"], capture_output=True, text=True, timeout=30
        )
    except OSError as error:
        raise MissingPrerequisite(
            f"{found} does not start ({error}): reinstall it with '{PROXY_INSTALL}'"
        ) from error
    if probe.returncode != 0:
        node = shutil.which("node")
        version = (
            subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
            if node
            else "no node on the PATH"
        )
        raise MissingPrerequisite(
            f"{found} --version failed (Node.js {version}; configurable-http-proxy 5 needs "
            f"20.19 or later): {probe.stderr.strip()[-400:]}"
        )
    return Path(found)


def require_jupyterhub() -> None:
    """JupyterHub must be importable by this Python: the Hub, its singleuser server and the
    sandbox's ``--hub-auth`` run from it."""
    try:
        import jupyterhub  # noqa: F401
    except ImportError as error:
        raise MissingPrerequisite(
            f"jupyterhub is not installed in {sys.prefix} ({error}): "
            "pip install -e '.[test]' (or pip install jupyterhub); .ci/run does this"
        ) from error
    if shutil.which("jupyterhub-singleuser", path=_python_bin()) is None:
        raise MissingPrerequisite(
            f"jupyterhub-singleuser is not in {_python_bin()}: reinstall jupyterhub there"
        )


def _python_bin() -> str:
    return str(Path(sys.executable).parent)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together while they are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# -- the Hub ---------------------------------------------------------------------------------------

_OVERRIDE = '''\
"""tests/hub: the example's configuration, then only what the test changes."""

load_subconfig({example!r})

# Who logs in and how servers start: a test's, not a site's.
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {homes!r} + "/{{username}}"
c.Spawner.args.extend({spawner_args!r})
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180

# The Hub's own ports and files: free ports, and the test's scratch folder.
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.pid_file = {root!r} + "/proxy.pid"
c.JupyterHub.db_url = "sqlite:///" + {root!r} + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = {root!r} + "/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = {root!r} + "/jupyterhub.pid"

# The test drives the Hub through its REST API, as this admin service.
with open({admin_token_file!r}) as token_file:
    c.JupyterHub.services.append({{"name": "test-admin", "api_token": token_file.read()}})
c.JupyterHub.load_roles.append(
    {{
        "name": "test-admin",
        "scopes": ["admin:users", "admin:servers", "admin:groups", "tokens"],
        "services": ["test-admin"],
    }}
)
'''


@dataclasses.dataclass
class HubPlaces:
    """Where one Hub's files go: under ``root``, but for the users' homes."""

    root: Path

    #: The users' home folders: a short path of its own under /tmp, since each user's kernel
    #: sockets go into ``HOME/.local/share/jupyter/runtime`` (see the example's IPC
    #: transport), and pytest's scratch paths are too long for a Unix socket.
    homes: Path

    @property
    def run_log(self) -> Path:
        return self.root / "sandbox-runs.jsonl"

    @property
    def data_dir(self) -> Path:
        return self.root / "sandbox-data"

    @property
    def kernelspec_prefix(self) -> Path:
        return self.root / "kernelspec"

    @property
    def log(self) -> Path:
        return self.root / "jupyterhub.log"

    @property
    def override(self) -> Path:
        return self.root / "jupyterhub_config.py"

    @property
    def admin_token_file(self) -> Path:
        return self.root / "admin-token"


class Hub:
    """One JupyterHub process (and what it starts), on free loopback ports."""

    def __init__(
        self,
        root: Path,
        *,
        per_user_runs: int = 2,
        serve_args: Sequence[str] = (),
        teachers: Sequence[str] = ("teacher",),
    ) -> None:
        self.places = HubPlaces(root, Path(tempfile.mkdtemp(prefix="hub-", dir="/tmp")))
        self.per_user_runs = per_user_runs
        self.serve_args = list(serve_args)
        self.teachers = list(teachers)
        self.proxy_port, self.hub_port, self.proxy_api_port, self.service_port = free_ports(4)
        self.url = f"http://127.0.0.1:{self.proxy_port}/"
        self.admin_token = secrets.token_hex(24)
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def api(self) -> str:
        return self.url + "hub/api/"

    @property
    def sandbox_url(self) -> str:
        """The sandbox service, through the Hub's proxy, as kernels reach it."""
        return f"{self.url}services/{SERVICE_NAME}/"

    @property
    def run_log(self) -> Path:
        return self.places.run_log

    def environment(self, proxy: Path) -> dict[str, str]:
        """The Hub's environment: this one's without any SANDBOX_* variable, then the
        example's knobs (the ``SANDBOX_HUB_*`` variables its docstring lists)."""
        env = {name: value for name, value in os.environ.items() if not name.startswith("SANDBOX_")}
        env["PATH"] = os.pathsep.join([str(proxy.parent), _python_bin(), env.get("PATH", "")])
        env.update(
            SANDBOX_HUB_PUBLIC_URL=self.url,
            SANDBOX_HUB_BIND_URL=f"http://127.0.0.1:{self.proxy_port}/",
            SANDBOX_HUB_SERVICE_URL=f"http://127.0.0.1:{self.service_port}",
            SANDBOX_HUB_DATA_DIR=str(self.places.data_dir),
            SANDBOX_HUB_RUN_LOG=str(self.places.run_log),
            SANDBOX_HUB_PER_USER_RUNS=str(self.per_user_runs),
            SANDBOX_HUB_SERVE_ARGS=" ".join(self.serve_args),
            SANDBOX_HUB_TEACHERS=",".join(self.teachers),
            SANDBOX_HUB_KERNELSPEC_PREFIX=str(self.places.kernelspec_prefix),
        )
        return env

    def write_config(self, proxy: Path) -> None:
        places = self.places
        places.root.mkdir(parents=True, exist_ok=True)
        places.homes.mkdir(parents=True, exist_ok=True)
        places.admin_token_file.write_text(self.admin_token)
        places.admin_token_file.chmod(0o600)
        places.override.write_text(
            _OVERRIDE.format(
                example=str(EXAMPLE_CONFIG),
                homes=str(places.homes),
                spawner_args=["--allow-root"] if os.geteuid() == 0 else [],
                hub_port=self.hub_port,
                proxy_api_port=self.proxy_api_port,
                proxy=str(proxy),
                root=str(places.root),
                admin_token_file=str(places.admin_token_file),
            )
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start the Hub; return when its API answers and the sandbox service is up behind
        the proxy (it answers 401 to a request without a token)."""
        require_jupyterhub()
        proxy = find_proxy()
        self.write_config(proxy)
        self._log_file = self.places.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.places.override)],
            cwd=self.places.root,
            env=self.environment(proxy),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_until_up(timeout)

    def _wait_until_up(self, timeout: float) -> None:
        import requests

        end = time.monotonic() + timeout
        checks = [(self.api, 200), (self.sandbox_url + "specifications/", 401)]
        for url, wanted in checks:
            last = "no answer"
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError(f"jupyterhub exited while starting: {self.log_tail()}")
                try:
                    status = requests.get(url, timeout=5).status_code
                    if status == wanted:
                        break
                    last = f"status {status}"
                except requests.RequestException as error:
                    last = str(error)
                if time.monotonic() > end:
                    raise RuntimeError(
                        f"{url} did not answer {wanted} within {timeout:.0f} s ({last}): "
                        f"{self.log_tail()}"
                    )
                time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.places.log.read_text(errors="replace")
        except OSError:
            return "(no Hub log)"
        return f"the Hub's log ({self.places.log}) ends with:\n" + "\n".join(
            text.splitlines()[-lines:]
        )

    def processes(self) -> list[int]:
        """Every process below the Hub: proxy, sandbox, users' servers, kernels, runs."""
        from ..helpers import descendants

        return descendants(self.process.pid) if self.process is not None else []

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop the Hub (it stops the users' servers, the sandbox and the proxy); kill
        whatever is still alive after ``timeout``. Returns the processes that had to be
        killed (none, when the Hub cleaned up)."""
        from ..helpers import living, wait_until

        if self.process is None:
            shutil.rmtree(self.places.homes, ignore_errors=True)
            return []
        started = self.processes()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        wait_until(lambda: not living(started), timeout=10)
        leftovers = living(started)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
        self.process = None
        shutil.rmtree(self.places.homes, ignore_errors=True)
        return leftovers

    def run_log_lines(self) -> list[dict[str, Any]]:
        """The sandbox's run log, one dict per run (none when the file is not there yet)."""
        try:
            text = self.places.run_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- a background event loop -----------------------------------------------------------------------


class BackgroundLoop:
    """An asyncio loop in a thread of its own, kept for a whole test session: WebSockets and
    HTTP sessions opened in one test stay usable in the next."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def client_session() -> aiohttp.ClientSession:
    """An HTTP session for the Hub, the users' servers and the sandbox (call it in the loop
    that will use it).

    No kept-alive connections: a kernel WebSocket opened on a connection that had carried
    HTTP requests through configurable-http-proxy 5.3 failed at once, with aiohttp reading
    "frame with non-zero reserved bits" (seen with 20 kernels at once; a fresh connection per
    request avoids it, at a cost of well under a millisecond on loopback)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=300),
    )


# -- the Hub's REST API ----------------------------------------------------------------------------


class HubError(RuntimeError):
    pass


class HubAPI:
    """The Hub's REST API, as the admin service of the test's configuration."""

    def __init__(self, hub: Hub, http: aiohttp.ClientSession) -> None:
        self.hub = hub
        self.http = http
        self.headers = {"Authorization": f"token {hub.admin_token}"}

    async def request(
        self, method: str, path: str, body: Any = None, ok: Iterable[int] = (200, 201, 202, 204)
    ) -> Any:
        async with self.http.request(
            method, self.hub.api + path, json=body, headers=self.headers
        ) as response:
            text = await response.text()
            if response.status not in tuple(ok):
                raise HubError(f"{method} {path}: {response.status} {text[:500]}")
            return json.loads(text) if text.strip() else None

    async def create_users(self, names: Sequence[str]) -> None:
        existing = {user["name"] for user in await self.request("GET", "users?limit=1000") or []}
        missing = [name for name in names if name not in existing]
        if missing:
            await self.request("POST", "users", {"usernames": missing})

    async def token_for(self, user: str, scopes: Sequence[str] | None = None) -> str:
        """A new API token of ``user``: all their permissions, or only ``scopes``."""
        body: dict[str, Any] = {"note": "tests/hub", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = list(scopes)
        answer = await self.request("POST", f"users/{user}/tokens", body)
        return str(answer["token"])

    async def server_state(self, user: str) -> dict[str, Any] | None:
        model = await self.request("GET", f"users/{user}")
        server: dict[str, Any] | None = (model.get("servers") or {}).get("")
        return server

    async def start_server(self, user: str, timeout: float = 180.0) -> None:
        """Start ``user``'s default server and wait until the Hub says it is ready."""
        await self.request("POST", f"users/{user}/server", {}, ok=(201, 202, 400))
        await self._wait(user, lambda server: bool(server and server.get("ready")), timeout)

    async def stop_server(self, user: str, timeout: float = 60.0) -> None:
        await self.request("DELETE", f"users/{user}/server", ok=(202, 204, 400))
        await self._wait(user, lambda server: server is None, timeout)

    async def _wait(self, user: str, done: Any, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            server = await self.server_state(user)
            if done(server):
                return
            if time.monotonic() > end:
                raise HubError(
                    f"{user}'s server did not get there within {timeout:.0f} s: {server}; "
                    f"{self.hub.log_tail()}"
                )
            await asyncio.sleep(0.25)


# -- kernels through a user's server ---------------------------------------------------------------


@dataclasses.dataclass
class CellReply:
    """What a cell sent back over the WebSocket."""

    status: str
    stdout: str
    stderr: str
    #: Text of the other outputs (display_data, execute_result, error), in order.
    other: list[str]
    seconds: float

    @property
    def text(self) -> str:
        """Everything the user sees, in one string (for messages and loose checks)."""
        return "\n".join([self.stdout, self.stderr, *self.other])


class KernelConnection:
    """One kernel of one user's server, driven over Jupyter's kernel REST and WebSocket API."""

    def __init__(self, http: aiohttp.ClientSession, base: str, token: str, kernel_id: str) -> None:
        self.http = http
        self.base = base
        self.token = token
        self.kernel_id = kernel_id
        self.session_id = uuid.uuid4().hex
        self.socket: aiohttp.ClientWebSocketResponse[bool] | None = None
        self.lock = asyncio.Lock()

    @classmethod
    async def start(
        cls, http: aiohttp.ClientSession, hub: Hub, user: str, token: str
    ) -> KernelConnection:
        base = f"{hub.url}user/{user}/api/kernels"
        async with http.post(
            base, json={"name": KERNEL_NAME}, headers={"Authorization": f"token {token}"}
        ) as response:
            text = await response.text()
            if response.status != 201:
                raise HubError(
                    f"{user}: starting a {KERNEL_NAME} kernel: {response.status} {text[:500]}"
                )
            model = json.loads(text)
        kernel = cls(http, base, token, model["id"])
        await kernel.wait_ready()
        return kernel

    async def model(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/{self.kernel_id}", headers=self.headers) as response:
            text = await response.text()
            if response.status != 200:
                raise HubError(f"kernel {self.kernel_id}: {response.status} {text[:300]}")
            model: dict[str, Any] = json.loads(text)
            return model

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the kernel answers ``kernel_info_request`` over its WebSocket, as
        JupyterLab does before it sends a cell, reconnecting as JupyterLab does.

        A kernel may die as it starts and be restarted by its server: with 20 servers starting
        kernels at once, two picked the same free TCP port ("Address already in use", the port
        race of jupyter_client's TCP transport, where each server picks ports on its own). The
        server restarts it on new ports, and the proxy cuts the WebSocket opened before (it
        writes "HTTP/1.1 503" into the upgraded connection, which aiohttp reports as a frame
        with non-zero reserved bits)."""
        end = time.monotonic() + timeout
        failures: list[str] = []
        while True:
            try:
                socket = await self.connect()
                msg_id = uuid.uuid4().hex
                await socket.send_json(self._message("kernel_info_request", msg_id, {}))
                await asyncio.wait_for(self._reply(socket, msg_id), 10)
                return
            except (HubError, aiohttp.ClientError, asyncio.TimeoutError) as error:
                failures.append(f"{type(error).__name__}: {error}")
                await self.close()
            if time.monotonic() > end:
                state = (await self.model()).get("execution_state")
                raise HubError(
                    f"kernel {self.kernel_id} at {self.base} ({state}) never answered "
                    f"kernel_info_request: {failures[-3:]}"
                )
            await asyncio.sleep(0.5)

    async def _reply(
        self, socket: aiohttp.ClientWebSocketResponse[bool], msg_id: str
    ) -> dict[str, Any]:
        while True:
            data = await self._receive(socket)
            if (
                data.get("parent_header", {}).get("msg_id") == msg_id
                and data.get("channel") == "shell"
            ):
                return data

    async def _receive(self, socket: aiohttp.ClientWebSocketResponse[bool]) -> dict[str, Any]:
        message = await socket.receive()
        if message.type != aiohttp.WSMsgType.TEXT:
            raise HubError(
                f"the kernel's WebSocket ended ({message.type.name}: {message.data}; "
                f"{socket.exception()})"
            )
        data: dict[str, Any] = json.loads(message.data)
        return data

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def connect(self) -> aiohttp.ClientWebSocketResponse[bool]:
        if self.socket is None or self.socket.closed:
            url = f"{self.base}/{self.kernel_id}/channels?session_id={self.session_id}"
            self.socket = await self.http.ws_connect(
                url.replace("http://", "ws://", 1),
                headers=self.headers,
                max_msg_size=0,
                heartbeat=30,
            )
        return self.socket

    async def execute(self, code: str, timeout: float = 120.0) -> CellReply:
        """Run one cell; wait for its reply and for the kernel to be idle again."""
        async with self.lock:
            socket = await self.connect()
            msg_id = uuid.uuid4().hex
            await socket.send_json(self._message("execute_request", msg_id, self._execute(code)))
            started = time.monotonic()
            return await asyncio.wait_for(self._collect(socket, msg_id, started), timeout)

    @staticmethod
    def _execute(code: str) -> dict[str, Any]:
        return {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }

    def _message(self, msg_type: str, msg_id: str, content: dict[str, Any]) -> dict[str, Any]:
        return {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "tests-hub",
                "session": self.session_id,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": "shell",
            "buffers": [],
        }

    async def _collect(
        self, socket: aiohttp.ClientWebSocketResponse[bool], msg_id: str, started: float
    ) -> CellReply:
        stdout: list[str] = []
        stderr: list[str] = []
        other: list[str] = []
        status: str | None = None
        idle = False
        seconds = 0.0
        while status is None or not idle:
            data = await self._receive(socket)
            if data.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = data["msg_type"]
            content = data["content"]
            if kind == "execute_reply":
                status = content["status"]
                seconds = time.monotonic() - started
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "stream":
                (stdout if content["name"] == "stdout" else stderr).append(content["text"])
            elif kind in ("display_data", "execute_result", "update_display_data"):
                bundle = content.get("data", {})
                other.append(str(bundle.get("text/plain") or bundle.get("text/html") or bundle))
            elif kind == "error":
                other.append(
                    f"{content.get('ename')}: {content.get('evalue')}\n"
                    + "\n".join(content.get("traceback") or [])
                )
        return CellReply(status, "".join(stdout), "".join(stderr), other, seconds)

    async def interrupt(self) -> None:
        async with self.http.post(
            f"{self.base}/{self.kernel_id}/interrupt", headers=self.headers
        ) as response:
            await response.read()

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        self.socket = None

    async def shutdown(self) -> None:
        await self.close()
        async with self.http.delete(
            f"{self.base}/{self.kernel_id}", headers=self.headers
        ) as response:
            await response.read()


# -- the sandbox service, reached directly with a user's token -------------------------------------


class SandboxAsUser:
    """The sandbox's protocol through the Hub's proxy, with one user's Hub token."""

    def __init__(self, http: aiohttp.ClientSession, hub: Hub, token: str | None) -> None:
        self.http = http
        self.url = hub.sandbox_url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def get(self, path: str) -> tuple[int, bytes]:
        async with self.http.get(self.url + path, headers=self.headers) as response:
            return response.status, await response.read()

    async def execute(self, config: dict[str, Any]) -> tuple[int, bytes]:
        form = aiohttp.FormData()
        form.add_field("config", json.dumps(config))
        async with self.http.post(
            self.url + "execute/", data=form, headers=self.headers
        ) as response:
            return response.status, await response.read()


# -- the class's cells -----------------------------------------------------------------------------


async def quiet_cells(
    kernel: KernelConnection, seconds: float, label: str, think: float = 0.3
) -> list[float]:
    """Small cells (a carried variable, one line of output) with think times between them, as
    a student types, started for ``seconds``; their latencies, from the execute request to
    the reply. A phase is a time window, not a number of cells: a cell held up by a neighbour
    for the whole window counts as one slow cell, however few cells its student got to run.
    Raises when a cell fails or prints something else."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while True:
        await asyncio.sleep(random.uniform(0.5, 1.5) * think)
        if time.monotonic() >= end:
            return latencies
        reply = await kernel.execute(f"N=$((${{N:-0}} + 1)); echo {label}-$N")
        if reply.status != "ok" or not reply.stdout.startswith(f"{label}-"):
            raise HubError(f"a quiet cell failed: {reply.text}")
        latencies.append(reply.seconds)


def greedy_cell(deadline: int, loops: int = 1) -> str:
    """A cell of ``loops`` CPU-bound bash loops at once, until ``deadline`` (Unix time). bash's
    EPOCHSECONDS is a builtin: a loop forks nothing, it only burns CPU; a queued cell that
    starts after the deadline ends at once."""
    loop = f"while (( EPOCHSECONDS < {deadline} )); do :; done"
    if loops == 1:
        return f"{loop}; echo greedy-done"
    return f"for _ in $(seq {loops}); do ( {loop} ) & done; wait; echo greedy-done"


async def usages_of_everyone(teacher: SandboxAsUser) -> dict[str, dict[str, Any]]:
    """The ``users`` part of the sandbox's ``usages/``, by name, as a teacher sees it."""
    status, body = await teacher.get("usages/")
    if status != 200:
        raise HubError(f"usages/ as a teacher: {status} {body[:300]!r}")
    return {user["name"]: user for user in json.loads(body).get("users", [])}


# -- small tools -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that waits for every task even when one fails, then raises the
    first failure: no task keeps running behind a failed test."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]
