"""Malformed ``config``: missing, not JSON, absurdly nested, NaN, wrong types, empty and huge
commands, NUL bytes, odd ``environ`` values.

Documented answers: 400 with the reason in plain text (the public server's sentence where it has
one) and nothing run; 413 past the config cap (1 MiB); ``environ`` numbers and booleans are
converted with ``str()``. Every refused config would ``sleep <marker>``: the harness finds the
process if the server ran it anyway.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import MAX_CONFIG, Hostile


@dataclasses.dataclass(frozen=True)
class Config:
    """The raw ``config`` text (``{m}``: the case's marker), the HTTP status and a fragment
    of the answer's text."""

    name: str
    raw: str
    status: int
    text: str


SLEEP = '["sleep {m}"]'
BAD = "Command badly formatted"
INVALID = "'config' json is invalid - "


def cmd(command: str) -> str:
    return '{"commands": [' + json.dumps(command) + "]}"


def nested(depth: int) -> str:
    return '{"commands": ' + SLEEP + ', "deep": ' + "[" * depth + "]" * depth + "}"


CONFIGS = [
    Config("empty", "", 400, INVALID),
    Config("not-json", "{commands: sleep {m}", 400, INVALID),
    Config("truncated-json", '{"commands": ["sleep {m}"', 400, INVALID),
    Config("trailing-garbage", '{"commands": ' + SLEEP + "} x", 400, INVALID),
    Config("arrays-nested-100000", "[" * 100_000 + "]" * 100_000, 400, "nested deeper than 64"),
    Config(
        "objects-nested-50000", '{"a":' * 50_000 + "1" + "}" * 50_000, 400, "nested deeper than 64"
    ),
    Config("nested-65-beside-commands", nested(65), 400, "nested deeper than 64"),
    Config("nan-timeout", '{"commands": [{"command": "sleep {m}", "timeout": NaN}]}', 400, "NaN"),
    Config(
        "infinity-timeout",
        '{"commands": [{"command": "sleep {m}", "timeout": Infinity}]}',
        400,
        "Infinity",
    ),
    Config(
        "minus-infinity-in-environ",
        '{"commands": ' + SLEEP + ', "environ": {"A": -Infinity}}',
        400,
        "-Infinity",
    ),
    Config(
        "overflowing-timeout-1e999",
        '{"commands": [{"command": "sleep {m}", "timeout": 1e999}]}',
        400,
        BAD,
    ),
    Config(
        "integer-of-5000-digits",
        '{"commands": ' + SLEEP + ', "environ": {"A": 1' + "0" * 5000 + "}}",
        400,
        INVALID,
    ),
    Config("config-is-a-list", SLEEP, 400, "config must be an object, not <class 'list'>"),
    Config("config-is-a-string", '"sleep {m}"', 400, "config must be an object, not <class 'str'>"),
    Config("config-is-a-number", "12", 400, "config must be an object, not <class 'int'>"),
    Config("config-is-null", "null", 400, "config must be an object, not <class 'NoneType'>"),
    Config("commands-missing", '{"command": ' + SLEEP + "}", 400, "Missing field 'commands'"),
    Config("commands-a-string", '{"commands": "sleep {m}"}', 400, "commands must be a list"),
    Config("commands-an-object", '{"commands": {"a": "sleep {m}"}}', 400, "must be a list"),
    Config("commands-null", '{"commands": null}', 400, "commands must be a list"),
    Config("commands-empty", '{"commands": []}', 400, "Command list cannot be empty"),
    Config("command-a-number", '{"commands": [3, "sleep {m}"]}', 400, BAD),
    Config("command-null", '{"commands": ["sleep {m}", null]}', 400, BAD),
    Config("command-a-list", '{"commands": [["sleep", "{m}"]]}', 400, BAD),
    Config("command-object-without-command", '{"commands": [{"timeout": 1}]}', 400, BAD),
    Config("command-object-command-a-number", '{"commands": [{"command": 1}]}', 400, BAD),
    Config(
        "command-object-extra-key",
        '{"commands": [{"command": "sleep {m}", "user": "root"}]}',
        400,
        BAD,
    ),
    Config(
        "timeout-a-string", '{"commands": [{"command": "sleep {m}", "timeout": "1"}]}', 400, BAD
    ),
    Config("timeout-zero", '{"commands": [{"command": "sleep {m}", "timeout": 0}]}', 400, BAD),
    Config("timeout-negative", '{"commands": [{"command": "sleep {m}", "timeout": -1}]}', 400, BAD),
    Config("timeout-a-bool", '{"commands": [{"command": "sleep {m}", "timeout": true}]}', 400, BAD),
    Config("empty-command", '{"commands": ["sleep {m}", ""]}', 400, BAD),
    Config("blank-command", '{"commands": ["sleep {m}", " \\t\\n "]}', 400, BAD),
    Config("dash-only-command", '{"commands": ["sleep {m}", "-"]}', 400, BAD),
    Config("nul-in-command", '{"commands": ["sleep {m}\\u0000; id"]}', 400, "NUL byte"),
    Config(
        "nul-in-command-object", '{"commands": [{"command": "sleep {m}\\u0000"}]}', 400, "NUL byte"
    ),
    Config(
        "nul-in-environ-value",
        '{"commands": ' + SLEEP + ', "environ": {"A": "x\\u0000y"}}',
        400,
        "contains a NUL byte",
    ),
    Config(
        "nul-in-environ-name",
        '{"commands": ' + SLEEP + ', "environ": {"A\\u0000B": "x"}}',
        400,
        "is not a valid variable name",
    ),
    Config(
        "environ-name-with-equals",
        '{"commands": ' + SLEEP + ', "environ": {"LD_PRELOAD=/x.so A": "x"}}',
        400,
        "is not a valid variable name",
    ),
    Config(
        "environ-name-empty",
        '{"commands": ' + SLEEP + ', "environ": {"": "x"}}',
        400,
        "is not a valid variable name",
    ),
    Config(
        "environ-a-list", '{"commands": ' + SLEEP + ', "environ": ["A=1"]}', 400, "environ must be"
    ),
    Config(
        "environ-a-string", '{"commands": ' + SLEEP + ', "environ": "A=1"}', 400, "environ must be"
    ),
    Config(
        "environ-value-null",
        '{"commands": ' + SLEEP + ', "environ": {"A": null}}',
        400,
        "must be a string or a number",
    ),
    Config(
        "environ-value-a-list",
        '{"commands": ' + SLEEP + ', "environ": {"A": ["x"]}}',
        400,
        "must be a string or a number",
    ),
    Config(
        "environ-value-an-object",
        '{"commands": ' + SLEEP + ', "environ": {"A": {"x": 1}}}',
        400,
        "must be a string or a number",
    ),
    Config(
        "result-path-a-number",
        '{"commands": ' + SLEEP + ', "result_path": 1}',
        400,
        "result_path must be a string",
    ),
    Config(
        "result-path-a-list",
        '{"commands": ' + SLEEP + ', "result_path": ["x"]}',
        400,
        "result_path must be a string",
    ),
    Config(
        "save-a-string",
        '{"commands": ' + SLEEP + ', "save": "yes"}',
        400,
        "save must be a boolean",
    ),
    Config(
        "save-a-number", '{"commands": ' + SLEEP + ', "save": 1}', 400, "save must be a boolean"
    ),
    Config(
        "environment-a-number",
        '{"commands": ' + SLEEP + ', "environment": 1}',
        400,
        "environment must be a string",
    ),
    Config(
        "command-over-the-config-cap",
        cmd("sleep {m} #" + "x" * MAX_CONFIG),
        413,
        "Request too large",
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[config.name for config in CONFIGS])
def test_malformed_config(hostile: Hostile, trial: Callable[..., None], config: Config) -> None:
    def case(marker: str) -> None:
        raw = config.raw.replace("{m}", marker)
        response = hostile.server.http.post(
            hostile.server.url + "execute/", files={"config": (None, raw)}, timeout=10
        )
        assert response.status_code == config.status, response.text[:300]
        assert config.text in response.text, response.text[:300]
        assert response.headers["Content-Type"].startswith("text/plain")

    trial(case)


def test_config_missing(hostile: Hostile, trial: Callable[..., None]) -> None:
    def case(marker: str) -> None:
        response = hostile.server.http.post(
            hostile.server.url + "execute/",
            files={"other": (None, f'{{"commands": ["sleep {marker}"]}}')},
            timeout=10,
        )
        assert (response.status_code, response.text) == (400, "Missing argument 'config'")

    trial(case)


# -- configs that run ------------------------------------------------------------------------------


def test_environ_values_are_converted_with_str(
    hostile: Hostile, trial: Callable[..., None]
) -> None:
    def case(marker: str) -> None:
        environ: dict[str, Any] = {"B": True, "I": 3, "F": 1.5, "E": 1e300, "S": marker}
        answer = hostile.execute(
            {"commands": ['echo "$B|$I|$F|$E|$S"'], "environ": environ}, marker
        )
        assert answer.entry()["stdout"] == f"True|3|1.5|1e+300|{marker}"

    trial(case)


@pytest.mark.parametrize("where", ["command", "environ"])
def test_huge_command_within_the_config_cap(
    hostile: Hostile, trial: Callable[..., None], where: str
) -> None:
    """200 KB is within the config cap, but more than Linux takes for one argument or
    variable (128 KiB): the command cannot start, and says so (bash's 126)."""

    def case(marker: str) -> None:
        huge = "x" * 200_000
        config: dict[str, Any] = {"commands": [f"sleep {marker} # {huge}"]}
        if where == "environ":
            config = {"commands": [f"sleep {marker}"], "environ": {"HUGE": huge}}
        answer = hostile.execute(config, marker)
        entry = answer.entry()
        assert (answer.json["status"], entry["exit_code"]) == (126, 126), entry["stderr"]
        assert "Argument list too long" in entry["stderr"]

    trial(case)
