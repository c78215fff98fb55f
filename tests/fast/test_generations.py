"""Typed facts from each server generation's answers (the contract's fixtures), and the
sans-I/O request layer, without any I/O: what a second transport would reuse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import SandboxConfigError, SandboxProtocolError
from sandbox_kernel._errors import Sandbox404, Sandbox503
from sandbox_kernel._generations import (
    NO_LIMIT,
    checked,
    read_inventory,
    read_load,
    read_specs,
)
from sandbox_kernel._wire import (
    announced_size,
    busy_advice,
    execute_answer,
    execute_deadline,
    execute_form,
    facts_answer,
    normalise_url,
    resource,
)
from sandbox_kernel.protocol import (
    EXECUTE,
    LIBRARIES,
    LIBRARY_CATEGORIES,
    OVERLOADED_TEXT,
    SPECIFICATIONS,
    USAGES,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASE = "http://127.0.0.1:1/"


def body(generation: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / generation / name).read_text())["body"]
    return data


def test_a_3x_server() -> None:
    specs = read_specs(body("v3", "specifications.json"))
    assert (specs.generation, specs.sandbox_version, specs.docker_version) == (3, "3.0.3", "28.2.2")
    assert specs.containers == 40
    assert specs.execute_timeout is None and specs.expiration is None  # 3.x does not tell
    assert (specs.limits.ram, specs.limits.storage, specs.limits.processes) == (
        100_000_000, NO_LIMIT, NO_LIMIT,
    )  # fmt: skip
    assert specs.host is not None and specs.host.cores == 2 and specs.host.max_mhz is None
    load = read_load(body("v3", "specifications.json"), body("v3", "usages.json"))
    assert (load.busy, load.total, load.fraction) == (10, 40, 0.25)
    assert load.memory_total == 25276514304


def test_a_2x_server() -> None:
    specs = read_specs(body("v2", "specifications.json"))
    assert (specs.generation, specs.sandbox_version, specs.containers) == (2, "2.0.3", 5)
    assert (specs.execute_timeout, specs.expiration) == (10.0, 86400)
    assert (specs.limits.ram, specs.limits.swap, specs.limits.storage) == (
        100 * 1024**2, 200 * 1024**2, NO_LIMIT,
    )  # fmt: skip
    assert specs.limits.cpu_name and specs.limits.cpu_name.startswith("Intel")
    load = read_load(body("v2", "specifications.json"), None)  # 2.x: no usages/
    assert (load.busy, load.total) == (2, 5)
    inventory = read_inventory(body("v2", "libraries.json"))
    assert inventory.tools["python3"] == "3.7.3" and inventory.tools["g++"] == "8.3.0"


def test_a_3x_shape_with_top_level_keys_reads_as_sandbox_api_did() -> None:
    answer = {"host": {"cpu": {"core": 1}}, "container": {"count": 2}, "sandbox_version": "x",
              "execute_timeout": 7, "isolation": {"method": "docker"}}  # fmt: skip
    specs = read_specs(answer)
    assert (specs.sandbox_version, specs.execute_timeout) == ("x", 7.0)
    assert specs.isolation is not None and specs.isolation.isolated is None  # not told


def test_an_unknown_tool_version_is_none() -> None:
    inventory = read_inventory({"python3": "?", "gcc": "", "libraries": {}, "bin": ["python3"]})
    assert inventory.tools["python3"] is None and inventory.tools["gcc"] is None
    assert [row.version for row in inventory.rows("bin")] == [None]


def test_an_inventory() -> None:
    inventory = read_inventory(body("v3", "libraries.json"))
    assert list(inventory.libraries) == list(LIBRARY_CATEGORIES)
    counts = inventory.counts()
    assert list(counts) == [*LIBRARY_CATEGORIES, "bin"] and all(counts.values())
    assert inventory.tools["python3"]  # derived from the dpkg package
    found = inventory.rows(pattern="python3")
    assert any(row.category == "bin" and row.version == inventory.tools["python3"] for row in found)
    assert all(row.version != "?" for row in inventory.rows())
    assert [row.name for row in inventory.rows("bin", "ap?-g*")] == ["apt-get"]


@pytest.mark.parametrize(
    ("endpoint", "answer", "field"),
    [
        (SPECIFICATIONS, {"host": {"cpu": {"core": "two"}}}, "host.cpu.core"),
        (SPECIFICATIONS, {"container": {"count": -1}}, "container.count"),
        (SPECIFICATIONS, {"containers": {"running": 1.5}}, "containers.running"),
        (SPECIFICATIONS, {"container": {"isolation": {"isolated": "yes"}}}, "isolated"),
        (SPECIFICATIONS, {"host": "big"}, "host"),
        (LIBRARIES, {"libraries": {"python": {"numpy": ["1"]}}}, "libraries.python.numpy"),
        (LIBRARIES, {"bin": [1, 2]}, "bin"),
    ],
)
def test_a_malformed_answer_raises_one_error_naming_the_field(
    endpoint: str, answer: dict[str, Any], field: str
) -> None:
    with pytest.raises(SandboxProtocolError, match=field.replace(".", r"\.")):
        checked(endpoint, answer, "http://127.0.0.1:1/")


# --- The sans-I/O layer, with answers a second transport would make -------------------------


@dataclasses.dataclass
class Request:
    method: str


@dataclasses.dataclass
class Answer:
    """An answer as any transport can build it (not a requests.Response)."""

    status_code: int
    content: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    url: str = "http://127.0.0.1:1/x/"
    reason: str | None = None
    encoding: str | None = "utf-8"
    request: Request = dataclasses.field(default_factory=lambda: Request("GET"))

    @property
    def text(self) -> str:
        return self.content.decode()


def test_answers_read_without_io() -> None:
    base = "http://127.0.0.1:1/"
    specs = body("v3", "specifications.json")
    assert facts_answer(SPECIFICATIONS, Answer(200, json.dumps(specs).encode()), base) == specs
    with pytest.raises(SandboxProtocolError, match="not JSON"):
        execute_answer(Answer(200, b"<html>"), base)
    with pytest.raises(Sandbox404):
        execute_answer(Answer(404, b"No environment with UUID 'x' found"), base)
    assert announced_size(Answer(200, headers={"Content-Length": "12"}), base) == 12
    assert announced_size(Answer(404), base) == 0
    with pytest.raises(SandboxProtocolError, match="Content-Length"):
        announced_size(Answer(200, headers={"Content-Length": "²"}), base)
    busy = Answer(503, OVERLOADED_TEXT.encode())
    assert "no container became free" in busy_advice(busy, 3.0, 4)
    assert isinstance(Sandbox503(busy), Sandbox503)


def test_requests_built_without_io() -> None:
    form = execute_form({"commands": ["echo hi"]}, b"tgz")
    assert [(part.name, part.filename) for part in form] == [
        ("config", None), ("environment", "environment.tgz"),
    ]  # fmt: skip
    with pytest.raises(SandboxConfigError, match="Nothing was sent"):
        execute_form({"commands": []}, None)
    assert resource("u", "a b/c") == "files/u/a%20b/c/"
    assert execute_deadline(60, None) == 60 and execute_deadline(5, 30) == 40
    assert normalise_url(" http://h:1// ") == "http://h:1/"
    with pytest.raises(SandboxConfigError, match="check SANDBOX_URL"):
        normalise_url("h:1")


# --- The public server as observed (a copy of shared/reference/observed/) --------------------

OBSERVED = FIXTURES / "observed" / "reference-3.0.3-responses.json"


def observed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(OBSERVED.read_text())
    return data


def test_every_observed_answer_of_the_public_server_is_accepted() -> None:
    """A PremierLangage 3.0.3 server, without any of our extensions: every answer it gave
    passes the checks (execute/ included) and reads as typed facts, with "not told" where it
    does not tell."""
    answers = observed()
    executes = [k for k, v in answers.items() if k.startswith("execute") and v["status"] < 300]
    assert len(executes) >= 10
    for name in executes:
        assert checked(EXECUTE, answers[name]["body"], BASE) == answers[name]["body"], name
    specs_answer = checked(SPECIFICATIONS, answers["specifications"]["body"], BASE)
    specs = read_specs(specs_answer)
    assert (specs.generation, specs.containers, specs.sandbox_version) == (3, 40, "3.0.3")
    assert specs.execute_timeout is None and specs.isolation is None  # extensions absent
    load = read_load(specs_answer, checked(USAGES, answers["usages"]["body"], BASE))
    assert (load.busy, load.total) == (0, 40) and load.memory_total == 25276514304
    inventory = read_inventory(checked(LIBRARIES, answers["libraries"]["body"], BASE))
    assert all(inventory.counts().values())
    assert all(row.version != "?" for row in inventory.rows())
