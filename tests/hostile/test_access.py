"""Hostile callers: a web page of another origin, a DNS-rebinding host name, no token, a wrong
token.

Documented answers: 403 for a foreign ``Origin`` or a ``Host`` that is not loopback (or
``--allowed-host``), 401 with ``WWW-Authenticate: Bearer`` without the right bearer token; and
nothing runs: every refused ``execute/`` would ``sleep <marker>``, which the harness would
find in the process table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from .conftest import Hostile, multipart

ORIGIN = "only pages served from this machine may call the sandbox"
REBINDING = "DNS rebinding protection"
TOKEN = "Missing or wrong token"


@dataclasses.dataclass(frozen=True)
class Caller:
    """A request's headers (``{token}``, ``{port}`` filled in; None drops a default header),
    on ``GET specifications/`` and ``POST execute/``, and the answer both must get."""

    name: str
    headers: dict[str, str | bytes | None]
    status: int
    text: str


CALLERS = [
    Caller("no-token", {"Authorization": None}, 401, TOKEN),
    Caller("empty-bearer", {"Authorization": "Bearer "}, 401, TOKEN),
    Caller("wrong-token", {"Authorization": "Bearer not-the-token"}, 401, TOKEN),
    Caller("token-plus-one-character", {"Authorization": "Bearer {token}x"}, 401, TOKEN),
    Caller("token-minus-one-character", {"Authorization": "Bearer {token_short}"}, 401, TOKEN),
    Caller("token-with-basic-scheme", {"Authorization": "Basic {token}"}, 401, TOKEN),
    Caller("token-without-scheme", {"Authorization": "{token}"}, 401, TOKEN),
    Caller("token-in-a-cookie", {"Authorization": None, "Cookie": "token={token}"}, 401, TOKEN),
    Caller("token-not-ascii", {"Authorization": b"Bearer {token}\xc3\xa9"}, 401, TOKEN),
    Caller("foreign-origin", {"Origin": "https://evil.example"}, 403, ORIGIN),
    Caller("null-origin", {"Origin": "null"}, 403, ORIGIN),
    Caller("origin-localhost-lookalike", {"Origin": "http://localhost.evil.example"}, 403, ORIGIN),
    Caller("origin-127-lookalike", {"Origin": "http://127.0.0.1.evil.example:80"}, 403, ORIGIN),
    Caller("origin-with-userinfo", {"Origin": "http://127.0.0.1@evil.example"}, 403, ORIGIN),
    Caller("origin-file", {"Origin": "file://"}, 403, ORIGIN),
    Caller(
        "foreign-origin-without-token",
        {"Origin": "https://evil.example", "Authorization": None},
        403,
        ORIGIN,
    ),
    Caller("rebinding-host", {"Host": "evil.example:{port}"}, 403, REBINDING),
    Caller("host-localhost-lookalike", {"Host": "localhost.evil.example:{port}"}, 403, REBINDING),
    Caller("host-127-lookalike", {"Host": "127.0.0.1.nip.io:{port}"}, 403, REBINDING),
    Caller("host-any-address", {"Host": "0.0.0.0:{port}"}, 403, REBINDING),
    Caller("host-empty", {"Host": ""}, 403, REBINDING),
    Caller("host-missing", {"Host": None}, 400, "Missing 'Host' header"),
    # Controls: loopback pages and names are let in.
    Caller("control-local-origin", {"Origin": "http://localhost:8888"}, 200, ""),
    Caller("control-ipv6-loopback-origin", {"Origin": "http://[::1]:8888"}, 200, ""),
    Caller("control-localhost-host", {"Host": "LOCALHOST:{port}"}, 200, ""),
]


def fill(value: str | bytes | None, hostile: Hostile) -> str | bytes | None:
    token = hostile.server.token or ""
    values = {"token": token, "token_short": token[:-1], "port": str(hostile.port)}
    if isinstance(value, str):
        return value.format(**values)
    if isinstance(value, bytes):
        return value.replace(b"{token}", token.encode())
    return None


@pytest.mark.parametrize("caller", CALLERS, ids=[caller.name for caller in CALLERS])
def test_hostile_caller(hostile: Hostile, trial: Callable[..., None], caller: Caller) -> None:
    def case(marker: str) -> None:
        headers = {name: fill(value, hostile) for name, value in caller.headers.items()}
        specifications = hostile.raw("GET", "/specifications/", headers)
        boundary = "hostile"
        command = "echo ok" if caller.status == 200 else f"sleep {marker}"
        body = multipart([("config", json.dumps({"commands": [command]}).encode(), None)], boundary)
        execute = hostile.raw(
            "POST",
            "/execute/",
            {**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            body,
        )
        for answer in (specifications, execute):
            assert answer.status == caller.status, f"{answer.status} {answer.text[:300]}"
            assert caller.text in answer.text, answer.text[:300]
            if caller.status == 401:
                assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer")
        if caller.status == 200:
            assert json.loads(execute.body)["execution"][0]["stdout"] == "ok"

    trial(case)


def test_preflight_from_a_foreign_origin(hostile: Hostile, trial: Callable[..., None]) -> None:
    """A CORS preflight gets no Access-Control-Allow-Origin: the browser will not send."""

    def case(marker: str) -> None:
        answer = hostile.raw(
            "OPTIONS",
            "/execute/",
            {
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
                "Authorization": None,
            },
        )
        assert answer.status == 403, answer.text
        assert not any(name.lower().startswith("access-control-") for name in answer.headers)

    trial(case)
