"""Hostile inputs of ``serve --hub-auth`` (issue 16): what a client puts in ``Authorization``,
what the Hub answers about a token, and users pressing on their shares at once.

The server is real, the Hub is the stand-in of ``tests/fake_hub.py`` (a real HTTP server on
loopback), told to answer garbage, slowly, or for many users.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ..fake_hub import ACCESS, FakeHubAPI, HubServed, start_hub_server
from ..helpers import wait_until

TEACHER = "teacher-token"


# One Hub and one server for the module (each case uses tokens of its own): a server per
# case would cost more than the cases.
@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHubAPI]:
    stand_in = FakeHubAPI()
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hub-hostile")


@pytest.fixture(scope="module")
def served(hub: FakeHubAPI, place: Path) -> Iterator[HubServed]:
    server = start_hub_server(hub, place)
    yield HubServed(server, place / "runs.jsonl")
    server.stop()


def _logged(served: HubServed) -> list[dict[str, object]]:
    return served.log_lines() if served.run_log.exists() else []


def _alive(served: HubServed) -> None:
    answer = served.as_user("alice-token").get(served.url + "specifications/", timeout=10)
    assert answer.status_code == 200, "the server stopped answering"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic YWxpY2U6cHc=",
        "Digest alice-token",
        "alice-token",
        "Bearer " + "x" * 1025,
        "Bearer " + "x" * 7000,
        "Bearer tok\x01en",
        "Bearer tok\x7fen",
        "Bearer a\tb",
        "Bearer caf\xe9",
        "Bearer \u2028alice-token",
    ],
    ids=lambda header: repr(header[:20]) + f"+{len(header)}",
)
def test_tokens_no_hub_made_are_refused_without_asking_it(
    served: HubServed, hub: FakeHubAPI, header: str
) -> None:
    before = hub.requests
    answer = requests.get(
        served.url + "usages/",
        headers={"Authorization": header.encode("utf-8")},
        timeout=10,
    )
    assert answer.status_code in (400, 401), (answer.status_code, answer.text[:200])
    assert hub.requests == before, "a token no Hub could have made was sent to the Hub"
    _alive(served)


GARBAGE = {
    "not JSON": (200, b"<html>hello</html>", 0.0),
    "a list": (200, b'[{"name": "alice"}]', 0.0),
    "a string": (200, b'"alice"', 0.0),
    "no name": (200, json.dumps({"scopes": [ACCESS]}).encode(), 0.0),
    "a number for a name": (200, json.dumps({"name": 7, "scopes": [ACCESS]}).encode(), 0.0),
    "an empty name": (200, json.dumps({"name": "", "scopes": [ACCESS]}).encode(), 0.0),
    "a huge name": (200, json.dumps({"name": "n" * 10_000, "scopes": [ACCESS]}).encode(), 0.0),
    "a name with a newline": (
        200,
        json.dumps({"name": 'eve\n{"user": "alice"}', "scopes": [ACCESS]}).encode(),
        0.0,
    ),
    "a name with bidi control": (
        200,
        json.dumps({"name": "eve\u202ecilA", "scopes": [ACCESS]}).encode(),
        0.0,
    ),
    "scopes as one string": (200, json.dumps({"name": "eve", "scopes": ACCESS}).encode(), 0.0),
    "scopes of numbers": (200, json.dumps({"name": "eve", "scopes": [1, 2]}).encode(), 0.0),
    "a 500": (500, b"{}", 0.0),
    "a 404": (404, b'{"message": "gone"}', 0.0),
    "a deep JSON": (200, b"[" * 5000 + b"]" * 5000, 0.0),
}


@pytest.mark.parametrize("what", sorted(GARBAGE))
def test_a_hub_answer_that_is_not_a_user_is_refused_and_never_used(
    served: HubServed, hub: FakeHubAPI, what: str
) -> None:
    token = f"eve-{what}"
    hub.answers[token] = GARBAGE[what]
    before = len(_logged(served))
    answer = served.execute(token, {"commands": ["echo ran"], "save": True})
    assert answer.status_code == 502, (answer.status_code, answer.text[:200])
    assert "ran" not in answer.text
    assert "administrator" in answer.text
    lines = _logged(served)[before:]
    assert lines == [], f"a run was logged for a user the Hub did not name: {lines}"
    _alive(served)


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "a/b", "user-0123456789abcdef", "名前", "x" * 255, "@\"'`$(id)"]
)
def test_strange_but_valid_names_stay_what_they_are(
    served: HubServed, hub: FakeHubAPI, place: Path, name: str
) -> None:
    token = f"odd-{len(name)}-{name.encode().hex()[:40]}"
    hub.answers[token] = (200, json.dumps({"name": name, "scopes": [ACCESS]}).encode(), 0)
    saved = served.execute(token, {"commands": ["echo $((6*7)) > f"], "save": True})
    assert saved.status_code == 200, saved.text
    uuid = saved.json()["environment"]
    [line] = [line for line in _logged(served) if line["saved"] == uuid]
    assert line["user"] == name
    me = served.as_user(token).get(served.url + "usages/", timeout=10).json()["user"]
    assert me["name"] == name and me["stored_bytes"] > 0
    # Another user is still kept out of it, and nothing was written beside the data dir.
    assert (
        served.execute("alice-token", {"commands": ["true"], "environment": uuid}).status_code
        == 404
    )
    assert sorted(path.name for path in place.iterdir()) == ["data", "runs.jsonl"]


def test_a_slow_hub_holds_only_the_requests_that_wait_for_it(
    served: HubServed, hub: FakeHubAPI
) -> None:
    hub.answers["slow-token"] = (200, json.dumps({"name": "sloth", "scopes": [ACCESS]}).encode(), 3)
    _alive(served)  # alice's answer is cached from here on
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        slow = pool.submit(served.execute, "slow-token", {"commands": ["true"]})
        time.sleep(0.3)
        quick = served.execute("alice-token", {"commands": ["true"]})
        quick_seconds = time.monotonic() - started
        assert quick.status_code == 200
        assert quick_seconds < 2.5, f"alice waited {quick_seconds:.1f} s behind a slow Hub answer"
        assert slow.result().status_code == 200
        assert time.monotonic() - started >= 3


def _shares(served: HubServed) -> dict[str, dict[str, int]]:
    usage = served.as_user(TEACHER).get(served.url + "usages/", timeout=10).json()
    return {user["name"]: user for user in usage["users"]}


def test_many_users_at_once_get_every_answer_and_leave_their_shares_at_zero(
    served: HubServed, hub: FakeHubAPI
) -> None:
    tokens = [f"student{n}-token" for n in range(8)]
    for n, token in enumerate(tokens):
        hub.answers[token] = (
            200,
            json.dumps({"name": f"student{n}", "scopes": [ACCESS]}).encode(),
            0,
        )
    jobs = [(token, {"commands": [f"sleep 0.{n % 3}"]}) for n in range(5) for token in tokens]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: served.execute(*job), jobs))
    assert [answer.status_code for answer in answers] == [200] * len(jobs)
    shares = _shares(served)
    for n in range(8):
        assert shares[f"student{n}"]["running"] == 0 and shares[f"student{n}"]["queued"] == 0
    students = {f"student{n}" for n in range(8)}
    assert len([line for line in _logged(served) if line["user"] in students]) == len(jobs)


def test_a_client_gone_while_queued_leaves_no_ghost_in_its_share(served: HubServed) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = [
            pool.submit(served.execute, "alice-token", {"commands": ["sleep 3"]}) for _ in range(2)
        ]
        assert wait_until(lambda: _shares(served).get("alice", {}).get("running") == 2, 10)
        with pytest.raises(requests.Timeout):
            served.execute("alice-token", {"commands": ["echo late"]}, timeout=0.8)
        assert all(future.result().status_code == 200 for future in running)
    assert wait_until(
        lambda: (
            _shares(served)["alice"]["running"] == 0 and _shares(served)["alice"]["queued"] == 0
        ),
        10,
    ), _shares(served)

    def late() -> list[int]:
        return [line["status"] for line in served.log_lines() if line["commands"] == "echo late"]

    assert wait_until(lambda: late() == [499], 10), late()
