"""The kernel in a JupyterHub single-user server: which sandbox it uses, which token goes
where, and what a refusal tells.

The rules (``sandbox_kernel.settings``): without ``SANDBOX_URL``, the sandbox is the Hub's
service on the Hub's public origin; the user's JupyterHub token (``JUPYTERHUB_API_TOKEN``) is
the token of that startup sandbox only, unless ``SANDBOX_TOKEN`` is set; a 401 or 403 it gets
names what the Hub's administrator or the user must do. Settings are resolved in-process from
environments given as dictionaries; tokens and refusals go over loopback to :class:`HubStandIn`,
a little HTTP server standing in for the Hub's proxy and a ``--hub-auth`` sandbox service (its
answers written from the server's interface: the embedded server cannot give them without the
Hub), which records every request it gets.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sandbox_kernel import SandboxConfigError
from sandbox_kernel._errors import Sandbox401, Sandbox403, SandboxHTTPError
from sandbox_kernel.client import Sandbox
from sandbox_kernel.session.context import SandboxContext
from sandbox_kernel.session.session import Session
from sandbox_kernel.settings import Source, resolve

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: What a ``--hub-auth`` sandbox service answers (sandbox_kernel/server/hub.py's words): no
#: token, a token the Hub does not know, a token without the service's scope.
MISSING_TOKEN_TEXT = (
    "Missing JupyterHub token: send 'Authorization: Bearer <token>' with your JupyterHub API "
    "token (JUPYTERHUB_API_TOKEN in your server's environment)."
)
UNKNOWN_TOKEN_TEXT = (
    "JupyterHub does not know this token (expired, or revoked): restart your server from the "
    "Hub's control panel to get a new one."
)
NO_SCOPE_TEXT = (
    "Your JupyterHub token lacks the scope access:services!service=sandbox. The Hub's "
    "administrator must grant it to the 'user' role (c.JupyterHub.load_roles) and add it to "
    "c.Spawner.server_token_scopes, then you restart your server "
    "(examples/jupyterhub/jupyterhub_config.py does both)."
)
#: Words of the kernel's own advice about a refused JupyterHub token, never in the server's.
HUB_SCOPE_ADVICE = "which this kernel sends to the sandbox"
HOST_TEXT = (
    "Host '127.0.0.1' is not allowed (DNS rebinding protection). Use a loopback address, or "
    "start the server with --allowed-host NAME."
)
#: How the stand-in refuses the user's token, by mode.
REFUSALS = {
    "unknown token": (401, UNKNOWN_TOKEN_TEXT),
    "no scope": (403, NO_SCOPE_TEXT),
    "host": (403, HOST_TEXT),
}


def fixture_body(name: str) -> Any:
    return json.loads((FIXTURES / "v3" / name).read_text())["body"]


class HubStandIn:
    """A Hub's origin on 127.0.0.1: ``{base}services/sandbox/`` is the sandbox service, which
    wants the user's JupyterHub token (``token``) and refuses as ``mode`` says (``"ok"`` or
    a key of :data:`REFUSALS`); any other path is another sandbox on the same origin (another
    user's server, say), which wants nothing. Both answer like a sandbox: forwarded to
    ``upstream`` (``(url, token)`` of a real server) when given, else the public 3.x server's
    recorded answers. ``usages/`` gets ``user`` and ``users`` when set, ``container``
    (busy) when ``busy`` is set. Every request is recorded: path and Authorization header.

    The ``stream`` extension is hidden (a plain HTTP stand-in does not pass WebSockets): a
    kernel then runs its cells with plain ``execute/``.
    """

    def __init__(
        self, upstream: tuple[str, str | None] | None = None, base: str = "/", host: str = ""
    ) -> None:
        self.token = secrets.token_urlsafe(24)
        self.base = base
        self.mode = "ok"
        self.user: dict[str, Any] | None = None
        self.users: list[dict[str, Any]] | None = None
        self.busy: int | None = None
        #: (Host header, path, Authorization header, the raw request) of every request.
        self.requests: list[tuple[str, str, str | None, bytes]] = []
        self._upstream = upstream
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, kind, data, extra = stand_in._answer(self, body)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        #: The Hub's public URL, as ``c.JupyterHub.public_url`` gives it.
        self.url = f"http://{host or '127.0.0.1'}:{self.port}{base}"
        self.service_url = f"{self.url}services/sandbox/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # -- what it answers ----------------------------------------------------------------------

    def _answer(
        self, request: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, str, bytes, dict[str, str]]:
        path = request.path.split("?", 1)[0]
        authorization = request.headers.get("Authorization")
        host = (request.headers.get("Host") or "").rsplit(":", 1)[0]
        raw = f"{request.requestline}\r\n{request.headers}".encode() + body
        with self._lock:
            self.requests.append((host, path, authorization, raw))
            mode = self.mode
        service = f"{self.base}services/sandbox/"
        if path.startswith(service):
            if authorization is None:
                return 401, "text/plain", MISSING_TOKEN_TEXT.encode(), {}
            if authorization not in (f"Bearer {self.token}", f"token {self.token}"):
                return 401, "text/plain", UNKNOWN_TOKEN_TEXT.encode(), {}
            if mode in REFUSALS:
                status, text = REFUSALS[mode]
                return status, "text/plain", text.encode(), {}
            endpoint = path[len(service) :]
        else:  # another sandbox on the Hub's origin: the rest of the path is its endpoint
            endpoint = path.split("/sandbox/", 1)[-1] if "/sandbox/" in path else path[1:]
        return self._as_sandbox(request, endpoint, body)

    def _as_sandbox(
        self, request: BaseHTTPRequestHandler, endpoint: str, body: bytes
    ) -> tuple[int, str, bytes, dict[str, str]]:
        if endpoint.startswith("execute/stream/"):
            return 404, "text/plain", b"Not Found", {}
        if self._upstream is None:
            names = {"specifications/": "specifications.json", "usages/": "usages.json",
                     "libraries/": "libraries.json"}  # fmt: skip
            if endpoint not in names:
                return 404, "text/plain", b"not found", {}
            status, kind, data, headers = 200, "application/json", b"", dict[str, str]()
            answer = fixture_body(names[endpoint])
        else:
            status, kind, data, headers = self._forward(request, endpoint, body)
            if status != 200 or endpoint not in ("specifications/", "usages/"):
                return status, kind, data, headers
            answer = json.loads(data)
        if endpoint == "specifications/":
            answer["extensions"] = [e for e in answer.get("extensions", []) if e != "stream"]
        if endpoint == "usages/":
            with self._lock:
                told = {"user": self.user, "users": self.users, "container": self.busy}
            answer.update({key: value for key, value in told.items() if value is not None})
        return status, "application/json", json.dumps(answer).encode(), {}

    def _forward(
        self, request: BaseHTTPRequestHandler, endpoint: str, body: bytes
    ) -> tuple[int, str, bytes, dict[str, str]]:
        assert self._upstream is not None
        url, token = self._upstream
        target = urlsplit(url)
        headers = {"Host": f"127.0.0.1:{target.port}"}
        if request.headers.get("Content-Type"):
            headers["Content-Type"] = request.headers["Content-Type"]
        if token:
            headers["Authorization"] = f"Bearer {token}"
        upstream = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
        try:
            upstream.request(request.command, "/" + endpoint, body=body or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            kept = {"Content-Length"} if request.command == "HEAD" else set()
            extra = {k: v for k, v in answer.getheaders() if k in kept}
            kind = answer.getheader("Content-Type") or "application/octet-stream"
            return answer.status, kind, data, extra
        finally:
            upstream.close()

    # -- what it saw --------------------------------------------------------------------------

    def authorizations(self, under: str, host: str = "127.0.0.1") -> list[str | None]:
        """The Authorization header of every request to ``host`` whose path starts with
        ``under``."""
        with self._lock:
            return [
                given
                for to, path, given, _ in self.requests
                if to == host and path.startswith(under)
            ]

    def carrying(self, token: str) -> list[str]:
        """Where requests carried ``token`` anywhere (head or body), other than to this
        stand-in's own service under its own name: ``host/path`` of each."""
        service = f"{self.base}services/sandbox/"
        with self._lock:
            return [
                f"{to}{path}"
                for to, path, _, raw in self.requests
                if token.encode() in raw and not (to == "127.0.0.1" and path.startswith(service))
            ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HubStandIn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def hub_env(stand_in: HubStandIn | None = None, /, **extra: str) -> dict[str, str]:
    """A single-user server's environment, as JupyterHub 5+ spawners make it."""
    env = {
        "JUPYTERHUB_API_TOKEN": stand_in.token if stand_in else "hub-token-of-ann",
        "JUPYTERHUB_BASE_URL": stand_in.base if stand_in else "/",
        "JUPYTERHUB_PUBLIC_URL": f"{stand_in.url}user/ann/" if stand_in else "",
        "JUPYTERHUB_PUBLIC_HUB_URL": f"{stand_in.url}hub/" if stand_in else "",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/ann/",
    }
    env.update(extra)
    return env


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Jupyter runtime directory (nothing advertised), in a folder of its own."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


# -- which sandbox, which token ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("told", "expected"),
    [
        # A server's own public URL: only its origin counts.
        ({"JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/user/ann/"},
         "https://hub.example.org/services/sandbox/"),
        # JupyterHub under a prefix, the Hub's URL only, a port of its own.
        ({"JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org:8443/jhub/hub/",
          "JUPYTERHUB_BASE_URL": "/jhub/"}, "https://hub.example.org:8443/jhub/services/sandbox/"),
        # The server's public URL comes first (with user subdomains, the Hub's is elsewhere).
        ({"JUPYTERHUB_PUBLIC_URL": "https://ann.hub.example.org/user/ann/",
          "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/hub/"},
         "https://ann.hub.example.org/services/sandbox/"),
        # Another service name; a base URL written without its slashes.
        ({"JUPYTERHUB_PUBLIC_URL": "http://10.0.0.5:8000/", "SANDBOX_HUB_SERVICE": "grader",
          "JUPYTERHUB_BASE_URL": "course"}, "http://10.0.0.5:8000/course/services/grader/"),
        # A user name and password in the public URL never travel.
        ({"JUPYTERHUB_PUBLIC_URL": "https://admin:secret@hub.example.org/"},
         "https://hub.example.org/services/sandbox/"),
    ],
)  # fmt: skip
def test_in_jupyterhub_the_sandbox_is_the_hub_service_with_the_user_token(
    runtime: Path, told: dict[str, str], expected: str
) -> None:
    settings = resolve(environ=hub_env(**told), start_embedded=False).settings
    assert (settings.url, settings.token, settings.source) == (
        expected, "hub-token-of-ann", Source.JUPYTERHUB,
    )  # fmt: skip
    service = told.get("SANDBOX_HUB_SERVICE", "sandbox")
    assert settings.hub_service == service
    assert f"JupyterHub service '{service}'" in settings.describe()
    assert settings.describe().endswith(", with your JupyterHub token")


def test_sandbox_url_gets_the_hub_token_and_sandbox_token_wins(runtime: Path) -> None:
    """``SANDBOX_URL`` is the startup sandbox too; ``SANDBOX_TOKEN``, when set at all (an
    empty one means no token: ``grade`` and ``lab`` set it so), is its token instead."""
    url = "https://hub.example.org/services/grader/"
    settings = resolve(environ=hub_env(SANDBOX_URL=url), start_embedded=False).settings
    assert (settings.url, settings.token, settings.source) == (
        url, "hub-token-of-ann", Source.ENVIRONMENT,
    )  # fmt: skip
    assert settings.hub_service == "grader"  # from the URL's path: the scope it needs
    for token, expected in [("own", "own"), ("", None)]:
        derived = hub_env(JUPYTERHUB_PUBLIC_URL="https://hub.example.org/", SANDBOX_TOKEN=token)
        for env in (hub_env(SANDBOX_URL=url, SANDBOX_TOKEN=token), derived):
            settings = resolve(environ=env, start_embedded=False).settings
            assert (settings.token, settings.hub_service) == (expected, None)
            assert "JupyterHub token" not in settings.describe()
    given = resolve(None, "given", environ=hub_env(SANDBOX_URL=url)).settings
    assert (given.token, given.hub_service) == ("given", None)


def test_an_explicit_url_never_gets_the_hub_token(runtime: Path) -> None:
    """A URL given by the caller (``--url``, ``c.SandboxKernel.url``, ``%sandbox_connect``
    resolves through here too) is not the startup sandbox of the Hub's environment."""
    settings = resolve("https://elsewhere.example.org/", environ=hub_env()).settings
    assert (settings.token, settings.hub_service) == (None, None)


def test_without_a_public_url_the_error_names_both_settings(runtime: Path) -> None:
    with pytest.raises(SandboxConfigError) as raised:
        resolve(environ=hub_env(), start_embedded=False)
    told = str(raised.value)
    assert "c.JupyterHub.public_url" in told and "SANDBOX_URL" in told
    assert "JUPYTERHUB_API_TOKEN is set" in told
    assert "https://hub.example.org/services/sandbox/" in told  # what SANDBOX_URL looks like


@pytest.mark.parametrize(
    ("told", "named"),
    [
        ({"JUPYTERHUB_PUBLIC_URL": "hub.example.org"}, "JUPYTERHUB_PUBLIC_URL"),
        ({"JUPYTERHUB_PUBLIC_HUB_URL": "ftp://hub.example.org/"}, "JUPYTERHUB_PUBLIC_HUB_URL"),
        ({"JUPYTERHUB_PUBLIC_URL": "http://h/", "SANDBOX_HUB_SERVICE": "a/b"},
         "SANDBOX_HUB_SERVICE"),
        ({"JUPYTERHUB_PUBLIC_URL": "http://h/", "SANDBOX_HUB_SERVICE": "../x"},
         "SANDBOX_HUB_SERVICE"),
    ],
)  # fmt: skip
def test_a_malformed_hub_setting_is_named(runtime: Path, told: dict[str, str], named: str) -> None:
    with pytest.raises(SandboxConfigError, match=named):
        resolve(environ=hub_env(**told), start_embedded=False)


@pytest.mark.parametrize("hub_token", [None, "", "  "])
def test_outside_jupyterhub_nothing_changes(runtime: Path, hub_token: str | None) -> None:
    """No (or an empty) JupyterHub token: no Hub service is looked for, whatever the public
    URLs say; the embedded default comes last as before (here: not started, so LookupError)."""
    env = {"JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/"}
    if hub_token is not None:
        env["JUPYTERHUB_API_TOKEN"] = hub_token
    with pytest.raises(LookupError):
        resolve(environ=env, start_embedded=False)
    settings = resolve(environ={**env, "SANDBOX_URL": "http://127.0.0.1:7000"}).settings
    assert (settings.token, settings.hub_service) == (None, None)


# -- where the token goes --------------------------------------------------------------------------


def test_the_hub_token_goes_back_to_the_startup_sandbox_only(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``%sandbox_connect`` elsewhere on the Hub's origin (another user's server), or to
    another host, carries no token; back to the startup URL, the token goes again; a token
    given with the URL is the only one sent there."""
    with HubStandIn() as hub, HubStandIn() as other:
        for name, value in hub_env(hub).items():
            monkeypatch.setenv(name, value)
        context = SandboxContext()
        try:
            assert context.url == hub.service_url
            context.specs()
            mallory = f"{hub.url}user/mallory/sandbox/"
            for url in (mallory, other.url):
                context.connect(url, None)
                context.specs(refresh=True)
                context.load()
            # The very service, under another name of the host: not the startup URL.
            with pytest.raises(Sandbox401):
                context.connect(f"http://localhost:{hub.port}/services/sandbox/", None)
            context.connect(mallory, "given")
            context.specs(refresh=True)
            context.connect(hub.service_url.rstrip("/"), None)  # the same URL, normalised
            context.load()
            assert context.settings.hub_service == "sandbox"
        finally:
            context.close()
        bearer = f"Bearer {hub.token}"
        assert set(hub.authorizations("/services/sandbox/")) == {bearer}
        assert len(hub.authorizations("/services/sandbox/")) >= 3
        assert hub.authorizations("/", host="localhost") == [None]
        seen = hub.authorizations("/user/mallory/")
        assert seen[:3] == [None] * 3 and set(seen[3:]) == {"Bearer given"}, seen
        assert set(other.authorizations("/")) == {None}
        assert hub.carrying(hub.token) == [] and other.carrying(hub.token) == []


# -- what a refusal says -------------------------------------------------------------------------


def test_a_refused_hub_token_names_what_the_hub_must_grant(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the side client (magics, panel, banner) and for a file's HEAD: the 403 names
    the scope, the ``user`` role, ``c.Spawner.server_token_scopes`` and the example, with the
    server's own text; a 401 says to restart the server from the Hub's control panel; a 403
    for the Host header names --allowed-host."""
    with HubStandIn() as hub:
        for name, value in hub_env(hub).items():
            monkeypatch.setenv(name, value)
        context = SandboxContext()
        try:
            hub.mode = "no scope"
            with pytest.raises(Sandbox403) as refused:
                context.specs()
            told = str(refused.value)
            for words in ("access:services!service=sandbox", "'user' role", HUB_SCOPE_ADVICE,
                          "AND add it to c.Spawner.server_token_scopes", "jupyterhub_config.py",
                          "Hub Control Panel", NO_SCOPE_TEXT[:60]):  # fmt: skip
                assert words in told, told
            with pytest.raises(Sandbox403, match=HUB_SCOPE_ADVICE):
                context.connection.side.check("e8c5995b-7049-4b04-8440-5d9d914360fc")
            hub.mode = "unknown token"
            with pytest.raises(Sandbox401) as unknown:
                context.load()
            assert "expired or was revoked" in str(unknown.value)
            assert "Stop My Server, then Start My Server" in str(unknown.value)
            hub.mode = "host"
            with pytest.raises(Sandbox403, match=r"--allowed-host 127\.0\.0\.1") as host:
                context.specs(refresh=True)
            assert HUB_SCOPE_ADVICE not in str(host.value)
        finally:
            context.close()


def test_a_refusal_of_another_token_keeps_the_usual_advice(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``SANDBOX_TOKEN`` set, the token sent is the administrator's choice, not the
    user's JupyterHub token: a refusal keeps the status's own advice."""
    with HubStandIn() as hub:
        for name, value in hub_env(hub, SANDBOX_TOKEN="other").items():
            monkeypatch.setenv(name, value)
        context = SandboxContext()
        try:
            with pytest.raises(Sandbox401) as unknown:
                context.specs()
            assert "pass the right token" in str(unknown.value)
            assert "Hub Control Panel" not in str(unknown.value)
        finally:
            context.close()
        monkeypatch.setenv("SANDBOX_TOKEN", hub.token)
        hub.mode = "no scope"
        context = SandboxContext()
        try:
            with pytest.raises(Sandbox403) as refused:
                context.specs()
            assert "check the token given" in str(refused.value)
            assert HUB_SCOPE_ADVICE not in str(refused.value)
        finally:
            context.close()


def test_a_cell_refused_through_another_client_gets_the_advice(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's cells go through its asyncio client: the session gives their errors the
    advice of its own client (here, an error of a client given no advice)."""
    with HubStandIn() as hub:
        for name, value in hub_env(hub).items():
            monkeypatch.setenv(name, value)
        context = SandboxContext()
        hub.mode = "no scope"
        try:
            with (
                Sandbox(hub.service_url, token=hub.token) as plain,
                pytest.raises(SandboxHTTPError) as raised,
            ):
                plain.execute({"commands": ["true"]})
            assert HUB_SCOPE_ADVICE not in str(raised.value)
            session: Session = context.session
            outcome = session.failed(raised.value)
            assert outcome is not None and outcome.error is not None
            assert outcome.error.ename == "SandboxHTTP403"
            assert "AND add it to c.Spawner.server_token_scopes" in outcome.error.evalue
            assert "Your JupyterHub token lacks the scope" in outcome.error.evalue
        finally:
            with contextlib.suppress(Exception):
                context.close()
