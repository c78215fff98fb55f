"""A stand-in for JupyterHub's API (``GET /hub/api/user``) and a ``serve --hub-auth`` started
against it as the Hub starts a managed service: for the tests of the server's JupyterHub side
(``tests/test_hub_server.py``, ``tests/hostile/test_hub.py``), which need users with chosen
scopes, or a Hub that answers garbage, at once. ``tests/hub/`` runs a real JupyterHub.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from sandbox_kernel.discovery import EmbeddedServer

PREFIX = "/services/sandbox/"
ACCESS = "access:services!service=sandbox"
USERS = {
    "alice-token": {"name": "alice", "scopes": [ACCESS]},
    "bob-token": {"name": "bob", "scopes": [ACCESS]},
    "teacher-token": {"name": "tess", "scopes": [ACCESS, "custom:sandbox:teacher"]},
    "outsider-token": {"name": "olga", "scopes": ["access:servers!user=olga"]},
}


#: What the stand-in answers for a token it is told about: status, body, seconds before.
Answer = tuple[int, bytes, float]
_UNKNOWN: Answer = (403, b'{"status": 403, "message": "no such token"}', 0.0)


class FakeHubAPI:
    """``GET /hub/api/user`` as the Hub answers it: the model of the token's user (``USERS``),
    403 for a token it does not know, or what a test put in ``answers`` (a hostile Hub's
    garbage, a slow Hub). Counts the requests (HubAuth caches the answers)."""

    def __init__(self) -> None:
        self.requests = 0
        self.answers: dict[str, Answer] = {
            token: (200, json.dumps(user).encode(), 0.0) for token, user in USERS.items()
        }
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests += 1
                token = self.headers.get("Authorization", "").removeprefix("token ")
                status, body, delay = hub.answers.get(token, _UNKNOWN)
                if self.path != "/hub/api/user":
                    status, body, delay = _UNKNOWN
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hub/api"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HubServed:
    def __init__(self, server: EmbeddedServer, run_log: Path) -> None:
        self.server = server
        self.run_log = run_log
        self.url = server.url

    def as_user(self, token: str) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        return session

    def execute(self, token: str, config: dict[str, Any], timeout: float = 60) -> requests.Response:
        return self.as_user(token).post(
            self.url + "execute/", files={"config": (None, json.dumps(config))}, timeout=timeout
        )

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.run_log.read_text().splitlines()]


def start_hub_server(hub: FakeHubAPI, tmp_path: Path, *args: str) -> EmbeddedServer:
    env = {
        **os.environ,
        "JUPYTERHUB_API_TOKEN": "service-token",
        "JUPYTERHUB_API_URL": hub.url,
        "JUPYTERHUB_SERVICE_NAME": "sandbox",
        "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
    }
    server = EmbeddedServer(
        "--hub-auth",
        "--run-log",
        str(tmp_path / "runs.jsonl"),
        *args,
        data_dir=tmp_path / "data",
        token="",
        env=env,
    )
    server.start()
    return server
