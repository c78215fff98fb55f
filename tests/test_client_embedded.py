"""The client against the embedded server (3.x shapes), over real HTTP."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox_kernel.archive import build_archive, extract_archive
from sandbox_kernel.client import (
    Sandbox,
    Sandbox401,
    Sandbox404,
    Sandbox503,
    SandboxConnectionError,
    SandboxError,
)

from .conftest import Server


@pytest.fixture
def sandbox(server: Server) -> Sandbox:
    return Sandbox(server.url, token=server.token)


def test_specification_attributes(sandbox: Sandbox) -> None:
    assert sandbox.sandbox_version is not None and sandbox.sandbox_version.startswith("3.")
    assert sandbox.execute_timeout == 60.0
    assert sandbox.expiration == 86400
    assert sandbox.containers == {"total": 4, "running": 0, "available": 4}
    assert sandbox.memory is not None and sandbox.memory["storage"] > 0
    assert sandbox.cpu is not None
    assert sandbox.isolation is not None and sandbox.isolation["isolated"] is True
    assert sandbox.docker_version is None  # the embedded server has no Docker: None, no crash


def test_library_attributes(sandbox: Sandbox) -> None:
    assert sandbox.bin is not None and "bash" in sandbox.bin
    assert sandbox.python3 is not None and sandbox.python3.startswith("3.")
    assert sandbox.gcc is not None and sandbox.gcc[0].isdigit()
    assert sandbox.perl is not None and sandbox.perl.startswith("5.")
    assert "json" in sandbox.libraries["python"]


@pytest.mark.slow  # a server of its own, kept busy for seconds
def test_usage_counts_busy_runs(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "2")
    sandbox = Sandbox(server.url, token=server.token)
    assert sandbox.usage() == 0.0
    thread = threading.Thread(target=sandbox.execute, args=({"commands": ["sleep 1.5"]},))
    thread.start()
    time.sleep(0.6)
    assert Sandbox(server.url, token=server.token).usage() == 0.5
    thread.join()


def test_execute_with_upload_download_and_check(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("41\n")
    upload = build_archive([tmp_path / "input.txt"])
    answer = sandbox.execute(
        {"commands": ["echo $(( $(cat input.txt) + 1 )) > out.txt"], "save": True}, upload
    )
    uuid = answer["environment"]
    assert sandbox.download(uuid, "out.txt").read() == b"42\n"
    assert sandbox.check(uuid, "out.txt") == 3
    assert sandbox.check(uuid, "missing.txt") == 0
    assert sandbox.check(uuid) > 0
    target = tmp_path / "unpacked"
    assert sorted(extract_archive(sandbox.download(uuid), target)) == ["input.txt", "out.txt"]
    assert (target / "out.txt").read_text() == "42\n"
    with tarfile.open(fileobj=io.BytesIO(sandbox.download(uuid).getvalue())) as archive:
        assert sorted(archive.getnames()) == ["input.txt", "out.txt"]


def test_http_errors_are_typed(sandbox: Sandbox, server: Server) -> None:
    with pytest.raises(Sandbox404) as caught:
        sandbox.download("e8c5995b-7049-4b04-8440-5d9d914360fc")
    assert isinstance(caught.value, SandboxError)
    assert caught.value.response.status_code == 404
    with pytest.raises(Sandbox401):
        Sandbox(server.url, token="wrong").specifications()


@pytest.mark.slow  # a server of its own, kept busy for seconds
def test_busy_server_is_retried_within_the_budget(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "1")
    waits: list[float] = []
    with (
        Sandbox(server.url, token=server.token) as busy,
        Sandbox(server.url, token=server.token) as patient,
    ):
        thread = threading.Thread(target=busy.execute, args=({"commands": ["sleep 3"]},))
        thread.start()
        time.sleep(0.3)
        answer = patient.execute(
            {"commands": ["echo finally"]},
            busy_budget=20,
            on_busy=lambda attempt, wait, elapsed: waits.append(wait),
        )
        thread.join()
        assert answer["execution"][0]["stdout"] == "finally"
        assert waits, "on_busy was never called"
        thread = threading.Thread(target=busy.execute, args=({"commands": ["sleep 3"]},))
        thread.start()
        time.sleep(0.3)
        with pytest.raises(Sandbox503):
            patient.execute({"commands": ["true"]}, busy_budget=0)
        thread.join()


def test_unreachable_server_names_the_url(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "1")
    url = server.url
    server.stop()
    with pytest.raises(SandboxConnectionError) as caught:
        Sandbox(url, token=server.token).execute({"commands": ["true"]})
    assert url.rstrip("/") in str(caught.value)
