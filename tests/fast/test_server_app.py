"""The server's aiohttp application in-process, through aiohttp's test client: fast, no ports.

The application is assembled as ``serve()`` assembles it, from settings parsed by the real
``sandbox-kernel serve`` options, with the isolation the server would pick on this machine and
real runners: only the listening socket and its connection guard are aiohttp's test server's.
The protocol in depth stays in ``tests/test_server_protocol.py`` (a real process over loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import tarfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from sandbox_kernel import protocol
from sandbox_kernel.server import TokenSource, add_arguments, assembled_app, settings_from_args
from sandbox_kernel.server.runners import Isolation
from sandbox_kernel.server.settings import SERVE_EXECUTE_TIMEOUT, ServerSettings, setting_options

from ..helpers import descendants, living, wait_until

TOKEN = "in-process-token"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandbox-kernel serve")
    add_arguments(parser)
    return parser


@dataclasses.dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        assert self.status == 200, (self.status, self.text)
        return json.loads(self.body)


class InProcessServer:
    """The application behind aiohttp's test client, on an event loop of its own that each
    call runs until the request is answered (the tests stay plain functions)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: TestClient, isolation: Isolation):
        self.loop, self.client, self.isolation = loop, client, isolation

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = TOKEN,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return self.loop.run_until_complete(self._request(method, path, sent, data))

    def execute(self, config: dict[str, Any]) -> Answer:
        return self.loop.run_until_complete(self._execute(config))

    def gather(self, *configs: dict[str, Any]) -> list[Answer]:
        """Several execute/ requests at once."""

        async def all_at_once() -> list[Answer]:
            return list(await asyncio.gather(*(self._execute(config) for config in configs)))

        return self.loop.run_until_complete(all_at_once())

    async def _execute(self, config: dict[str, Any]) -> Answer:
        form = FormData()
        form.add_field("config", json.dumps(config))
        sent = {"Authorization": f"Bearer {TOKEN}"}
        return await self._request("POST", "/" + protocol.EXECUTE, sent, form)

    async def _request(self, method: str, path: str, headers: dict[str, str], data: Any) -> Answer:
        async with self.client.request(method, path, headers=headers, data=data) as response:
            return Answer(response.status, response.headers, await response.read())


@contextlib.asynccontextmanager
async def assembled(settings: ServerSettings) -> AsyncIterator[tuple[TestClient, Isolation]]:
    """The application ``serve()`` assembles, behind aiohttp's test server."""
    async with assembled_app(settings) as (app, isolation, _storage):
        client = TestClient(TestServer(app, handler_cancellation=True))
        await client.start_server()
        try:
            yield client, isolation
        finally:
            await client.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    data_dir = tmp_path_factory.mktemp("in-process") / "data"
    args = serve_parser().parse_args(["--workers", "2", "--data-dir", str(data_dir)])
    settings = settings_from_args(args, TokenSource(TOKEN))
    loop = asyncio.new_event_loop()
    parts = assembled(settings)
    # Other suites' servers and kernels may be children of this process too.
    others = set(descendants(os.getpid()))
    try:
        client, isolation = loop.run_until_complete(parts.__aenter__())
        yield InProcessServer(loop, client, isolation)
        runners = [pid for pid in descendants(os.getpid()) if pid not in others]
        assert runners, "the pool's runners are processes below this one"
        loop.run_until_complete(parts.__aexit__(None, None, None))
        assert wait_until(lambda: not living(runners)), f"runners left behind: {living(runners)}"
    finally:
        loop.close()


# -- the application -------------------------------------------------------------------------------


def test_specifications_have_the_3x_shape_and_the_servers_own_facts(app: InProcessServer) -> None:
    specs = app.request("GET", "/" + protocol.SPECIFICATIONS).json()
    assert set(specs) == {"host", "container", "extensions", "server_id"}
    assert {"cpu", "memory", "docker_version", "sandbox_version"} <= set(specs["host"])
    assert {"count", "cpu", "memory", "io", "process", "working_dir_device"} <= set(
        specs["container"]
    )
    container = specs["container"]
    assert (container["count"], container["execute_timeout"], container["expiration"]) == (
        2,
        SERVE_EXECUTE_TIMEOUT,
        86400,
    )
    assert container["isolation"] == app.isolation.describe()
    assert container["isolation"]["method"] == "bubblewrap", "auto picks bubblewrap when it works"


def test_the_token_is_required(app: InProcessServer) -> None:
    path = "/" + protocol.SPECIFICATIONS
    for token in (None, "", "wrong-token", TOKEN + "x", TOKEN.upper()):
        refused = app.request("GET", path, token=token)
        assert refused.status == 401, token
        assert "Authorization: Bearer <token>" in refused.text
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert app.request("GET", path, token=TOKEN).status == 200
    not_bearer = app.request("GET", path, token=None, headers={"Authorization": f"Basic {TOKEN}"})
    assert not_bearer.status == 401


def test_foreign_hosts_and_origins_are_refused(app: InProcessServer) -> None:
    path = "/" + protocol.SPECIFICATIONS
    for host in ("evil.example", "evil.example:7000", "127.0.0.1.evil.example", "[::2]:80"):
        refused = app.request("GET", path, headers={"Host": host})
        assert refused.status == 403, host
        assert "--allowed-host NAME" in refused.text, refused.text
    for host in ("localhost:1234", "127.0.0.1", "[::1]:7000", "LOCALHOST"):
        assert app.request("GET", path, headers={"Host": host}).status == 200, host
    origin = app.request("GET", path, headers={"Origin": "http://evil.example"})
    assert origin.status == 403 and "Origin 'http://evil.example'" in origin.text


def test_execute_with_save_gives_a_new_environment_and_stripped_output(
    app: InProcessServer,
) -> None:
    first = app.execute({"commands": ["echo hi", "echo '  x  ' > f.txt"], "save": True}).json()
    assert first["status"] == 0
    assert first["execution"][0]["stdout"] == "hi"
    assert UUID4.fullmatch(first["environment"]), first["environment"]
    assert first["expire"].endswith("+00:00")
    second = app.execute(
        {"commands": ["cat f.txt"], "environment": first["environment"], "save": True}
    ).json()
    assert second["execution"][0]["stdout"] == "x"
    assert second["environment"] != first["environment"]


def test_environment_and_file_downloads(app: InProcessServer) -> None:
    saved = app.execute({"commands": ["mkdir d; printf 'a b' > d/f.txt"], "save": True}).json()
    uuid = saved["environment"]
    archive_path = "/" + protocol.ENVIRONMENT.format(uuid=uuid)
    head = app.request("HEAD", archive_path)
    got = app.request("GET", archive_path)
    assert (head.status, got.status) == (200, 200)
    assert head.body == b""
    assert int(head.headers["Content-Length"]) == len(got.body) > 0
    assert got.headers["Content-Type"] == "application/gzip"
    assert f"filename={uuid}.tgz" in got.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(got.body)) as archive:
        assert {"d", "d/f.txt"} <= set(archive.getnames())
    file_path = "/" + protocol.FILE.format(uuid=uuid, path="d/f.txt")
    head, got = app.request("HEAD", file_path), app.request("GET", file_path)
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", "3")
    assert got.body == b"a b"


def test_an_unknown_environment_is_a_404_with_its_uuid(app: InProcessServer) -> None:
    unknown = "0b7bd2b4-5b41-4c55-9d40-8e9b3f6d6a5e"
    for path in (
        protocol.ENVIRONMENT.format(uuid=unknown),
        protocol.FILE.format(uuid=unknown, path="f.txt"),
    ):
        for method in ("GET", "HEAD"):
            answer = app.request(method, "/" + path)
            assert answer.status == 404, (method, path)
            if method == "GET":
                assert answer.text == f"No environment with UUID '{unknown}' found"
    based = app.execute({"commands": ["true"], "environment": unknown})
    assert (based.status, based.text) == (404, f"No environment with UUID '{unknown}' found")


def test_as_many_requests_as_slots_run_at_once_without_503(app: InProcessServer) -> None:
    answers = app.gather(*({"commands": [f"sleep 0.3; echo {n}"]} for n in range(2)))
    assert [a.status for a in answers] == [200, 200], [a.text for a in answers]
    assert protocol.OVERLOADED_TEXT not in "".join(a.text for a in answers)
    assert sorted(a.json()["execution"][0]["stdout"] for a in answers) == ["0", "1"]
    usage = app.request("GET", "/" + protocol.USAGES).json()
    assert usage["container"] == 0, "no slot stays busy once every answer is in"


def test_libraries_lists_the_protocols_categories(app: InProcessServer) -> None:
    inventory = app.request("GET", "/" + protocol.LIBRARIES).json()
    assert set(inventory) == {"libraries", protocol.EXECUTABLES}
    assert tuple(inventory["libraries"]) == protocol.LIBRARY_CATEGORIES
    assert "bash" in inventory[protocol.EXECUTABLES]
    assert inventory["libraries"]["system"], "dpkg lists the system's packages"


# -- the options of `sandbox-kernel serve` ---------------------------------------------------------


def test_options_reach_the_settings() -> None:
    args = serve_parser().parse_args(
        ["--no-token", "--host", "0.0.0.0", "--port", "0", "--workers", "3",
         "--execute-timeout", "2.5", "--data-dir", "/srv/sandbox", "--max-storage", "2G",
         "--allowed-host", "a.example", "--allowed-host", "b.example", "--isolation", "none",
         "--max-output", "3k", "--max-result", "4KiB", "--memory-limit", "1g",
         "--max-storage-inodes", "10", "--header-timeout", "0.5"]
    )  # fmt: skip
    settings = settings_from_args(args)
    expected = ServerSettings(
        host="0.0.0.0",
        port=0,
        workers=3,
        execute_timeout=2.5,
        data_dir=Path("/srv/sandbox"),
        max_storage=2 * 1024**3,
        allowed_hosts=["a.example", "b.example"],
        isolation="none",
        max_output=3 * 1024,
        max_result=4 * 1024,
        memory_limit=1024**3,
        max_storage_inodes=10,
        header_timeout=0.5,
    )
    assert settings == expected


def test_no_option_gives_the_default_settings_and_a_token() -> None:
    settings = settings_from_args(serve_parser().parse_args(["--data-dir", "/d"]))
    assert settings.token, "a random token by default"
    assert settings == dataclasses.replace(
        ServerSettings(), data_dir=Path("/d"), token=settings.token
    )


def test_help_lists_every_option_with_its_default() -> None:
    text = serve_parser().format_help()
    settings_options = [option.flag for _, option in setting_options()]
    assert len(settings_options) >= 20
    by_hand = ["--token-file", "--token", "--no-token", "--no-advertise", "--log-level"]
    for option in settings_options + by_hand:
        assert re.search(rf"^\s+{re.escape(option)}\b", text, re.MULTILINE), option
    flat = " ".join(text.split())
    for shown in ("(default 7000)", "(default 8)", "(default 10)", "(default 86400)",
                  "(default 10G)", "(default: auto)", "(default 100000)", "(default 1000000)",
                  "after JSON escaping (default 1M)", "(default 15)"):  # fmt: skip
        assert shown in flat, shown


def test_meaningless_values_are_refused_with_the_option_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = serve_parser()
    for option, value, said in [
        ("--workdir-inodes", "0", "0 is not a positive whole number"),
        ("--header-timeout", "-1", "-1 is not a positive number of seconds"),
        ("--max-storage", "lots", "invalid parse_size value: 'lots'"),
        ("--isolation", "docker", "invalid choice: 'docker'"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args([option, value])
        assert f"argument {option}: {said}" in capsys.readouterr().err
    for option, value, said in [
        ("--workers", "0", "--workers must be at least 1"),
        ("--execute-timeout", "0", "--execute-timeout must be a positive number of seconds"),
        ("--expiration", "-5", "--expiration must be a positive number of seconds"),
    ]:
        with pytest.raises(ValueError, match=re.escape(said)):
            settings_from_args(parser.parse_args(["--no-token", option, value]))
