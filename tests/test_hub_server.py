"""``sandbox-kernel serve --hub-auth`` (issue 16) against a stand-in for the Hub's API.

The server is the real one, started as JupyterHub starts a managed service (its
``JUPYTERHUB_*`` environment); the Hub's ``/hub/api/user`` is a real little HTTP server on
loopback that knows a few tokens, since what a test needs here is users with chosen scopes, at
once. ``tests/hub/`` runs the same server under a real JupyterHub.
"""

from __future__ import annotations

import concurrent.futures
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox_kernel.server.cgroups import CGROUP_ROOT, server_group_name

from .fake_hub import ACCESS, PREFIX, FakeHubAPI, HubServed, start_hub_server
from .helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def hub_api() -> Iterator[FakeHubAPI]:
    hub = FakeHubAPI()
    yield hub
    hub.close()


@pytest.fixture
def served(hub_api: FakeHubAPI, tmp_path: Path) -> Iterator[HubServed]:
    server = start_hub_server(hub_api, tmp_path, "--per-user-storage", "100K")
    yield HubServed(server, tmp_path / "runs.jsonl")
    server.stop()


def test_the_url_is_under_the_service_prefix_and_tokens_are_the_hubs(
    served: HubServed, hub_api: FakeHubAPI
) -> None:
    assert served.url.endswith(PREFIX)
    alice = served.as_user("alice-token")
    specifications = alice.get(served.url + "specifications/")
    assert specifications.status_code == 200 and "users" in specifications.json()["extensions"]
    root = served.url.removesuffix(PREFIX.lstrip("/"))
    assert alice.get(root + "specifications/").status_code == 404

    missing = requests.get(served.url + "specifications/")
    assert missing.status_code == 401 and "JUPYTERHUB_API_TOKEN" in missing.text
    unknown = served.as_user("forged").get(served.url + "specifications/")
    assert unknown.status_code == 401 and "does not know this token" in unknown.text
    for hostile in ("x" * 5000, "tok en\tx", "caf\u00e9"):
        answer = requests.get(
            served.url + "specifications/",
            headers={"Authorization": ("Bearer " + hostile).encode()},
        )
        assert answer.status_code == 401, (hostile[:20], answer.status_code)
    outsider = served.as_user("outsider-token").get(served.url + "specifications/")
    assert outsider.status_code == 403
    assert ACCESS in outsider.text and "c.Spawner.server_token_scopes" in outsider.text
    # "token" is JupyterHub's own scheme: accepted too.
    scheme = requests.get(served.url + "usages/", headers={"Authorization": "token bob-token"})
    assert scheme.status_code == 200 and scheme.json()["user"]["name"] == "bob"
    before = hub_api.requests
    for _ in range(5):
        assert alice.get(served.url + "usages/").status_code == 200
    assert hub_api.requests == before, "every request asked the Hub (HubAuth's cache unused)"


def _archive_of(response: requests.Response) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        return archive.getnames()


def test_an_environment_is_its_owners_alone(served: HubServed) -> None:
    saved = served.execute("alice-token", {"commands": ["echo secret > notes"], "save": True})
    uuid = saved.json()["environment"]
    alice, bob = served.as_user("alice-token"), served.as_user("bob-token")
    mine = served.execute("alice-token", {"commands": ["cat notes"], "environment": uuid})
    assert mine.json()["execution"][0]["stdout"] == "secret"
    assert "notes" in " ".join(_archive_of(alice.get(served.url + f"environments/{uuid}/")))
    assert alice.get(served.url + f"files/{uuid}/notes/").content == b"secret\n"

    theirs = served.execute("bob-token", {"commands": ["cat notes"], "environment": uuid})
    assert theirs.status_code == 404 and uuid in theirs.text
    for path in (f"environments/{uuid}/", f"files/{uuid}/notes/"):
        answer = bob.get(served.url + path)
        assert answer.status_code == 404 and b"secret" not in answer.content


def test_a_user_over_their_share_waits_and_the_others_do_not(served: HubServed) -> None:
    alice = served.as_user("alice-token")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [
            pool.submit(served.execute, "alice-token", {"commands": ["sleep 3"]}) for _ in range(3)
        ]

        def share() -> dict[str, Any]:
            return dict(alice.get(served.url + "usages/").json()["user"])

        assert wait_until(lambda: share()["running"] == 2 and share()["queued"] == 1, 10), share()
        started = time.monotonic()
        quick = served.execute("bob-token", {"commands": ["true"]})
        bob_waited = time.monotonic() - started
        assert quick.status_code == 200
        assert bob_waited < 2.5, f"bob waited {bob_waited:.1f} s behind alice's queue"
        assert all(future.result().status_code == 200 for future in slow)


def test_usages_show_the_callers_share_and_teachers_see_the_class(served: HubServed) -> None:
    served.execute("alice-token", {"commands": ["head -c 1000 /dev/zero > f"], "save": True})
    alice = served.as_user("alice-token").get(served.url + "usages/").json()
    assert alice["user"]["name"] == "alice" and alice["user"]["stored_bytes"] >= 1000
    assert {"running", "queued"} <= set(alice["user"]) and "users" not in alice
    teacher = served.as_user("teacher-token").get(served.url + "usages/").json()
    names = [user["name"] for user in teacher["users"]]
    assert "alice" in names and teacher["user"]["name"] == "tess"


def test_the_per_user_storage_cap_names_its_option(served: HubServed) -> None:
    too_big = served.execute(
        "alice-token", {"commands": ["head -c 200000 /dev/urandom > big"], "save": True}
    )
    assert too_big.status_code == 507 and "--per-user-storage" in too_big.text
    # Another user's share is untouched.
    fine = served.execute(
        "bob-token", {"commands": ["head -c 50000 /dev/urandom > f"], "save": True}
    )
    assert fine.status_code == 200, fine.text


def test_the_run_log_names_the_user_of_every_run(served: HubServed) -> None:
    first = served.execute("alice-token", {"commands": ["echo a"], "save": True}).json()
    served.execute("bob-token", {"commands": ["exit 3"]})
    served.execute("alice-token", {"commands": ["cat x"], "environment": first["environment"]})
    lines = served.log_lines()
    assert [(line["user"], line["status"]) for line in lines] == [
        ("alice", 0),
        ("bob", 3),
        ("alice", 1),
    ]
    assert lines[0]["saved"] == first["environment"] and lines[0]["commands"] == "echo a"
    assert lines[2]["environment"] == first["environment"] and lines[2]["saved"] is None
    assert all(isinstance(line["duration"], float) for line in lines)
    # A kernel's run: a long prologue, then the cell (kept), and commands with a timeout.
    prologue = "true # " + "p" * 6000
    served.execute("bob-token", {"commands": [prologue, {"command": "echo cell", "timeout": 5}]})
    logged = served.log_lines()[-1]["commands"]
    assert logged.endswith("\necho cell") and "bytes ...]" in logged
    assert len(logged.encode()) < 4200
    assert (served.run_log.stat().st_mode & 0o777) == 0o600


def test_each_users_runs_share_one_cpu_group(served: HubServed) -> None:
    parent = CGROUP_ROOT / "cpu" / server_group_name(served.server.process.pid)  # type: ignore[union-attr]
    assert parent.is_dir(), f"no per-user cpu groups under {parent}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(served.execute, "alice-token", {"commands": ["sleep 2"]})

        def alices_group() -> list[Path]:
            return [g for g in parent.glob("user-*") if (g / "cgroup.procs").read_text().split()]

        assert wait_until(lambda: len(alices_group()) == 1, 10)
        [group] = alices_group()
        assert (group / "cpu.shares").read_text().strip() == "1024"
        assert running.result().status_code == 200
