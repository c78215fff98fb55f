"""A private, real ``redis-server`` for the cluster tests (design A1, B10).

Each server listens on a free loopback port, requires a password (``--requirepass``) or an ACL
user (fed on stdin: ACL users cannot be given on argv), and persists nothing (``--save ''
--appendonly no``), so that :meth:`RedisServer.restart` loses every key, the worst case a
cluster must survive. A missing ``redis-server`` or redis-py fails, naming what to install.

Fixtures: ``redis_server`` (a password) and ``redis_acl_server`` (the default user off, an ACL
user ``sk``), one per test module. A conftest can use them with
``from .redis_fixture import redis_server, redis_acl_server  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from ..helpers import free_port

READY_SECONDS = 10.0
#: Characters a URL must percent-encode, in every password: the parsing is tested for real.
_AWKWARD = "@/:#%"


def require_redis() -> str:
    """The path of ``redis-server``, or a test failure naming what to install."""
    program = shutil.which("redis-server")
    if program is None:
        pytest.fail(
            "redis-server is missing: install the Debian package redis-server "
            "(apt-get install -y redis-server); .ci/run does this",
            pytrace=False,
        )
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.fail(
            "redis-py is missing: pip install 'celery[redis]' (or redis>=5) into the venv",
            pytrace=False,
        )
    return program


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, authenticated."""

    def __init__(self, directory: Path, *, acl_user: str | None = None) -> None:
        self.program = require_redis()
        self.directory = directory
        self.username = acl_user
        self.password = secrets.token_urlsafe(12) + _AWKWARD
        if acl_user is not None:  # an ACL password is given after '>' on a config line
            self.password = secrets.token_urlsafe(12) + "@/:%"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        """The ``--cluster`` URL, password included (percent-encoded)."""
        user = quote(self.username, safe="") if self.username else ""
        return f"redis://{user}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def client(self, **options: Any) -> Any:
        """A ``redis.Redis`` logged in as the server expects."""
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            username=self.username,
            password=self.password,
            socket_connect_timeout=2,
            **options,
        )

    def start(self, *, same_port: bool = False) -> None:
        """Start, and return once an authenticated ``PING`` is answered. A new port is
        tried if another process took the free one first (unless ``same_port``)."""
        for _attempt in range(5):
            if not same_port or not self.port:
                self.port = free_port()
            if self._start_once():
                return
            if same_port:
                break
        pytest.fail(f"redis-server did not start on port {self.port}: {self._log_tail()}")

    def _start_once(self) -> bool:
        config = [
            f"port {self.port}",
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {self.directory}",
            "loglevel warning",
            f"logfile {self.log}",
        ]
        argv = [self.program]
        if self.username is None:
            argv += ["-", "--requirepass", self.password]
        else:
            config += ["user default off", f"user {self.username} on >{self.password} ~* &* +@all"]
            argv += ["-"]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert self.process.stdin is not None
        self.process.stdin.write(("\n".join(config) + "\n").encode())
        self.process.stdin.close()
        return self._wait_ready()

    def _wait_ready(self) -> bool:
        import redis

        deadline = time.monotonic() + READY_SECONDS
        client = self.client(socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return True
                time.sleep(0.005)
        finally:
            client.close()
        return False

    def stop(self) -> None:
        """Stop (SIGTERM, then SIGKILL after 5 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """``kill -9``: the worst way Redis can go."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Kill and start again on the same port: every key is gone (nothing persisted)."""
        self.kill()
        self.start(same_port=True)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:] or "(empty log)"
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_redis(directory: Path, *, acl_user: str | None = None) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped at the end."""
    server = RedisServer(directory, acl_user=acl_user)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server with a password, for one test module."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def redis_acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server whose only user is the ACL user ``sk``."""
    with running_redis(tmp_path_factory.mktemp("redis-acl"), acl_user="sk") as server:
        yield server
