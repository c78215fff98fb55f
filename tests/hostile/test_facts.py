"""Hostile facts: what the one-source-of-truth change reads from outside, attacked by class.

- numbers a JSON answer may hold but a float cannot (``10**400``), in every checked answer and
  in a request's config;
- sizes, dates and names of any length or shape (2.x Docker sizes, ``expire``);
- advertisement files of the wrong shape, size or content;
- sandbox URLs that are not ones.

Each must end as the protocol's own refusal (a 400, a ``SandboxProtocolError`` naming the
field, a skipped advertisement, a ``SandboxConfigError`` naming the setting), never as a
Python error in whatever reads it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import SandboxConfigError, SandboxProtocolError
from sandbox_kernel._generations import checked, read_inventory, read_specs
from sandbox_kernel.discovery import advertised_servers, advertisement_path, write_advertisement
from sandbox_kernel.protocol import EXECUTE, LIBRARIES, SPECIFICATIONS, USAGES, validate_config
from sandbox_kernel.settings import resolve
from sandbox_kernel.views import render

from ..conftest import Server

HUGE = 10**400  # valid JSON, beyond any float
BASE = "http://127.0.0.1:1/"


@pytest.mark.parametrize(
    ("endpoint", "answer", "field"),
    [
        (SPECIFICATIONS, {"container": {"count": HUGE}}, "container.count"),
        (SPECIFICATIONS, {"host": {"memory": {"ram": HUGE}}}, "host.memory.ram"),
        (SPECIFICATIONS, {"host": {"memory": {"storage": {"/dev/x": -HUGE}}}}, "host.memory"),
        (SPECIFICATIONS, {"execute_timeout": HUGE}, "execute_timeout"),
        (SPECIFICATIONS, {"containers": {"running": HUGE}}, "containers.running"),
        (USAGES, {"cpu": {"usage_avg": [0.1, HUGE]}}, "cpu.usage_avg"),
        (USAGES, {"container": HUGE}, "container"),
        (EXECUTE, {"status": HUGE}, "status"),
        (EXECUTE, {"execution": [{"exit_code": 0}, {"exit_code": -HUGE}]}, "execution[1]"),
        (EXECUTE, {"execution": [{"time": HUGE}]}, "execution[0].time"),
        (LIBRARIES, {"python3": HUGE}, "python3"),
    ],
)
def test_numbers_beyond_a_float_are_malformed_fields(
    endpoint: str, answer: dict[str, Any], field: str
) -> None:
    with pytest.raises(SandboxProtocolError, match=re.escape(field)):
        checked(endpoint, answer, BASE)


@pytest.mark.parametrize("depth", [1, 50, 500])
def test_deep_and_numerous_execution_entries_are_checked_one_by_one(depth: int) -> None:
    entries: list[Any] = [{"exit_code": 0, "stdout": "x" * depth}] * depth
    assert checked(EXECUTE, {"execution": entries}, BASE)["execution"] == entries
    with pytest.raises(SandboxProtocolError, match=rf"execution\[{depth}\]"):
        checked(EXECUTE, {"execution": [*entries, "not an object"]}, BASE)


@pytest.mark.parametrize(
    "timeout", [HUGE, -HUGE, 1e309, float("nan"), float("-inf"), 0, -1, True, "10", [1]]
)
def test_a_config_timeout_of_any_shape_is_refused_the_same_way(
    server: Server, timeout: Any
) -> None:
    config = {"commands": [{"command": "true", "timeout": timeout}]}
    ok, reason = validate_config(config)
    assert not ok and "badly formatted" in reason
    # NaN and infinities too: Python's JSON reader (the server's) accepts those tokens.
    answer = server.post_execute({"config": (None, json.dumps(config))})
    assert answer.status_code == 400, answer.text  # never a 500
    assert server.get("specifications/").status_code == 200  # and the server serves on


@pytest.mark.parametrize(
    "ram", ["9" * 400 + "m", "1e9m", "-5m", "m", "12.5.3g", "host", "9" * 5000, " 100 m "]
)
def test_docker_sizes_of_any_shape(ram: str) -> None:
    specs = read_specs({"memory": {"ram": ram}})  # 2.x: Docker's '100m' style
    assert specs.limits.ram is None or isinstance(specs.limits.ram, int)
    render.specifications(BASE, specs)  # shown without failing


@pytest.mark.parametrize(
    "expire",
    [
        "x" * 10_000,
        "9999-12-31T23:59:59+00:00",
        "0001-01-01T00:00:00+00:00",
        "2026-11-28T10:00:00+99:99",
        "2026-11-28T10:00:00." + "9" * 10_000,
        "２０２６-11-28T10:00:00Z",  # fullwidth digits
        "2026-02-30T10:00:00Z",
        "2026-11-28T10:00:00\x00<script>",
        "",
    ],
)
def test_an_expire_of_any_shape_reads_as_a_short_line(expire: str) -> None:
    now = datetime.datetime(2026, 11, 28, tzinfo=datetime.timezone.utc)
    text = render.expires_text(expire, now)
    assert len(text) <= 120 and "\n" not in text
    assert "<script>" not in render.table(["", "v"], [("lifetime", text)])["text/html"]


def test_tool_versions_of_any_size_stay_text() -> None:
    system = {f"python3-{i}": "1:" + "9" * 500 + "-1" for i in range(2000)}
    inventory = read_inventory({"libraries": {"system": {"python3": "?", **system}}})
    assert inventory.tools["python3"] is None
    assert len(inventory.rows("system", "python3-1*")) == 1111


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"url": 7}',
        b'{"url": "http://127.0.0.1:9/", "token": 5}',
        b'{"url": "http://127.0.0.1:9/", "pid": "1"}',
        b'{"url": "http://127.0.0.1:9/", "pid": 100000000000000000000000}',
        b'{"url": "http://127.0.0.1:9/", "pid": true}',
        b'{"url": "http://127.0.0.1:9/", "pid": -1}',
        b" " * (1 << 20) + b'{"url": "http://127.0.0.1:9/"}',
        b"\xff\xfe",
    ],
)
def test_a_malformed_advertisement_is_skipped(
    content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "sandbox-kernel-server-1.json").write_bytes(content)
    assert advertised_servers() == []
    with pytest.raises(LookupError):
        resolve(environ={}, start_embedded=False)


@pytest.mark.parametrize(
    "started_by", ["x" * 10_000, "lab\nNOT ISOLATED", "<b>lab</b>\x1b[31m", 42, ["lab"], ""]
)
def test_who_started_a_server_is_shown_only_as_a_short_line(
    started_by: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    path = advertisement_path(os.getpid())
    path.write_text(json.dumps({"url": BASE, "token": None, "pid": os.getpid(),
                                "started_by": started_by}))  # fmt: skip
    [info] = advertised_servers()
    described = resolve(environ={}).settings.describe()
    assert "\n" not in described and len(described) < 250
    if isinstance(started_by, str) and started_by.isprintable() and 0 < len(started_by) <= 100:
        assert info.started_by == started_by
    else:
        assert info.started_by is None and "sandbox-kernel serve" in described


def test_a_well_formed_advertisement_is_still_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks above refuse shapes, not servers (the control case)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    write_advertisement(advertisement_path(os.getpid()), BASE, "t", "sandbox-kernel lab")
    [info] = advertised_servers()
    assert (info.url, info.token, info.started_by) == (BASE, "t", "sandbox-kernel lab")


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a" * 100_000 + "/",
        "http://127.0.0.1:7000/\r\nX-Evil: 1",
        "http://127.0.0.1:99999/",
        "http://[::1/",
        "http://127.0.0.1:7000/?token=x",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "http:// 127.0.0.1/",
        "\x00",
    ],
)
def test_a_url_that_is_not_one_names_its_setting(url: str) -> None:
    with pytest.raises(SandboxConfigError, match="check SANDBOX_URL") as refused:
        resolve(environ={"SANDBOX_URL": url})
    assert len(str(refused.value)) < 600  # the message quotes it shortened
