"""Fixtures of the cluster suites: a real S3 server (moto in server mode) on loopback.

``moto_server`` is one process for the whole session (ready in about 250 ms); every test gets
its own bucket (``bucket``), so tests never see each other's objects. ``counting_proxy`` puts
a real HTTP proxy between the store and moto, counting the requests by method and kind
(``PUT blob``, ``HEAD blob``, ``GET manifest``...): what a test asserts about uploads is what
went over the wire. It can also hold one request and drop it (``hold_next``): a worker killed
in the middle of an upload.

Every test runs with dummy AWS credentials and no AWS endpoint or profile of the developer's:
no test ever talks to a real AWS account.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid as uuid_module
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ..helpers import free_port

MOTO_INSTALL = "pip install 'moto[s3]>=5' flask flask-cors (or pip install -e '.[test]')"


class MotoServer:
    """``python -m moto.server`` on a free loopback port, stopped by :meth:`stop`."""

    def __init__(self, log: Path, environment: dict[str, str] | None = None) -> None:
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError as error:
            pytest.fail(f"{error.name} is missing for the S3 server of the tests: {MOTO_INSTALL}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(environment or {})},
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(
                    f"moto's S3 server exited with status {self.process.returncode}: "
                    f"{self.log.read_text(errors='replace')[-2000:]}\n(is it installed? "
                    f"{MOTO_INSTALL})"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1),
            ):
                return
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"moto's S3 server did not answer on {self.url} within {timeout:g} s")

    def client(self) -> Any:
        """A plain boto3 client, for what the tests do behind the store's back."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(autouse=True)
def _dummy_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer's AWS settings reach a test: dummy keys, no endpoint, no profile."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    """A new, empty bucket on the session's moto server."""
    name = f"sk-test-{uuid_module.uuid4().hex[:16]}"
    moto_server.client().create_bucket(Bucket=name)
    return name


class CountingProxy:
    """A real HTTP proxy in front of an S3 server, counting requests as ``"PUT blob"``,
    ``"HEAD blob"``, ``"GET manifest"``, ``"GET list"``... (the signature covers the Host the
    client sent, which is kept; moto checks no signature)."""

    def __init__(self, target_port: int) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        #: :meth:`hold_next`: the request to hold, and the events of its holding.
        self._hold: str | None = None
        self.held = threading.Event()
        self._released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                label = f"{self.command} {_kind(self.path)}"
                with proxy._lock:
                    proxy.counts[label] += 1
                    holding = proxy._hold == label
                    if holding:
                        proxy._hold = None
                if holding:  # before its body is read: the sender blocks mid-upload
                    proxy.held.set()
                    proxy._released.wait(120)
                    self.close_connection = True
                    return  # dropped: nothing reaches the S3 server, nothing is answered
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                announced = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", announced or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def hold_next(self, what: str) -> None:
        """Hold the next request of kind ``what`` (``"PUT manifest"``, ``"PUT blob"``...)
        before reading its body: :attr:`held` is set when it comes, and on :meth:`release`
        it is dropped unanswered, as if the network died with its sender."""
        with self._lock:
            self._hold = what
            self.held.clear()
            self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._hold = None
        self._released.set()

    def count(self, what: str) -> int:
        with self._lock:
            return self.counts[what]

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _kind(path: str) -> str:
    if "/blobs/" in path:
        return "blob"
    if "/envs/" in path:
        return "manifest"
    return "list" if "list-type" in path or "?" in path else "other"


@pytest.fixture
def counting_proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    proxy = CountingProxy(moto_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


# Cluster processes (tests/cluster/processes.py): a Redis per module, workers and fronts as real
# processes on it and on moto; every one stopped and checked at teardown.
from .processes import (  # noqa: E402
    cluster_place,
    processes,
    shared_cluster,
    start_front,
    start_worker,
)
from .redis_fixture import redis_acl_server, redis_server  # noqa: E402

__all__ = [  # fixtures, used by name
    "cluster_place",
    "processes",
    "redis_acl_server",
    "redis_server",
    "shared_cluster",
    "start_front",
    "start_worker",
]
