"""Clients against a front, on one shared cluster (2 workers of 2 slots, 1 front): what
PremierLangage sends (``tests/test_server_protocol.py``'s requests, a representative set,
table-driven), our own :class:`sandbox_kernel.client.Sandbox`, streaming through the front
(chunks, stdin, stop, the stdin caps, a client that goes away), and a worker whose caps differ
from the front's (design B7, B8, B10).

Everything is a real process (redis-server, moto, ``sandbox-kernel worker`` twice and
``sandbox-kernel serve --cluster``), started once for the module: these tests only read and
run, and leave the cluster idle. Destructive tests (kill, restart) are in
``test_front_failures.py`` and ``test_front_cluster.py``, on clusters of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from sandbox_kernel import protocol
from sandbox_kernel.archive import build_archive, extract_archive
from sandbox_kernel.client import Sandbox, Sandbox404
from sandbox_kernel.server.live import MAX_STDIN_WAITING, stdin_flood

from ..helpers import wait_until
from .processes import Front, SharedCluster

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")
UNKNOWN = "e8c5995b-7049-4b04-8440-5d9d914360fc"


def run(front: Front, *commands: Any, **config: Any) -> dict[str, Any]:
    """``execute/`` as PremierLangage sends it (multipart, ``config`` as a JSON part)."""
    answer = front.post_execute({"commands": list(commands), **config})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return sorted(archive.getnames())


def busy(front: Front) -> int:
    return int(front.get("usages/").json()["container"])


# -- PremierLangage-shaped requests, one table -----------------------------------------------------
# Each case is a request (or a few) of tests/test_server_protocol.py and what the single server
# answers, word for word: a front must answer the same.

PL_CASES: dict[str, Callable[[Front], None]] = {}


def pl_case(check: Callable[[Front], None]) -> Callable[[Front], None]:
    PL_CASES[check.__name__] = check
    return check


@pl_case
def shape_and_stripped_output(front: Front) -> None:
    answer = run(front, "echo $((1+1))")
    assert set(answer) == {"status", "execution", "total_time"}
    [entry] = answer["execution"]
    assert set(entry) == {"command", "exit_code", "stdout", "stderr", "time"}
    assert (entry["command"], entry["exit_code"], entry["stdout"]) == ("echo $((1+1))", 0, "2")
    [entry] = run(front, "printf '\\n\\n  out  \\n\\n'; printf '\\n err \\n' >&2")["execution"]
    assert (entry["stdout"], entry["stderr"]) == ("out", "err")


@pl_case
def environ_values_become_text(front: Front) -> None:
    answer = run(front, 'echo "$A|$B|$C"', environ={"A": "x y", "B": 3, "C": 1.5})
    assert answer["execution"][0]["stdout"] == "x y|3|1.5"


@pl_case
def commands_share_the_folder_not_the_shell(front: Front) -> None:
    answer = run(front, "echo data > f; X=1; cd /tmp", 'cat f; echo "[$X]"; pwd')
    assert answer["execution"][1]["stdout"] == "data\n[]\n/home/student"


@pl_case
def a_failure_stops_the_run_and_dash_lets_it_go_on(front: Front) -> None:
    failed = run(front, "true", "echo oops >&2; exit 3", "echo never")
    assert failed["status"] == 3
    assert [e["exit_code"] for e in failed["execution"]] == [0, 3]
    dashed = run(front, "-exit 4", "echo after")
    assert dashed["status"] == 0
    first, second = dashed["execution"]
    assert (first["command"], first["exit_code"], second["stdout"]) == ("exit 4", 4, "after")


@pl_case
def a_timeout_is_status_minus_2_with_the_contract_text(front: Front) -> None:
    answer = run(front, {"command": "echo partial; sleep 5", "timeout": 0.3}, "echo never")
    assert answer["status"] == protocol.STATUS_TIMEOUT == -2  # the contract's timeout status
    [entry] = answer["execution"]
    assert entry["exit_code"] == -2 and entry["stdout"] == "partial"
    assert entry["stderr"].endswith("Command timed out after 0.3 seconds\n")
    dashed = run(front, {"command": "-sleep 5", "timeout": 0.2}, "echo after")
    assert dashed["status"] == 0
    assert [e["exit_code"] for e in dashed["execution"]] == [-2, 0]


@pl_case
def result_path_unstripped_missing_and_not_utf8(front: Front) -> None:
    answer = run(front, "printf '  2\\n\\n' > out", result_path="out")
    assert (answer["status"], answer["result"]) == (0, "  2\n\n")
    missing = run(front, "exit 5", result_path="nothing")
    assert missing["status"] == protocol.STATUS_RESULT_NOT_FOUND and "result" not in missing
    binary = run(front, "printf '\\xff\\xfe' > out", result_path="out")
    assert binary["status"] == protocol.STATUS_RESULT_NOT_UTF8 and "result" not in binary


@pl_case
def every_save_is_a_new_uuid_and_the_base_stays(front: Front) -> None:
    first = run(front, "echo one > f", save=True)
    assert UUID_RE.match(first["environment"]) and ISO_RE.match(first["expire"])
    second = run(front, "echo two >> f; cat f", save=True, environment=first["environment"])
    assert second["execution"][0]["stdout"] == "one\ntwo"
    assert second["environment"] != first["environment"]
    again = run(front, "cat f", environment=first["environment"])
    assert again["execution"][0]["stdout"] == "one"
    assert "environment" not in again and "expire" not in again
    failed = run(front, "echo kept > g; exit 1", save=True)
    timed_out = run(front, {"command": "echo kept > h; sleep 5", "timeout": 0.2}, save=True)
    for answer, name in ((failed, "g"), (timed_out, "h")):
        kept = run(front, f"cat {name}", environment=answer["environment"])
        assert kept["execution"][0]["stdout"] == "kept"


@pl_case
def an_upload_is_merged_over_the_base(front: Front) -> None:
    base = run(front, "echo saved > a; echo saved > b", save=True)["environment"]
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        data = b"uploaded\n"
        info = tarfile.TarInfo("./a")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    answer = front.post_execute(
        {"commands": ["cat a b"], "environment": base}, environment=archive.getvalue()
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["execution"][0]["stdout"] == "uploaded\nsaved"


@pl_case
def a_url_encoded_config_is_accepted(front: Front) -> None:
    config = json.dumps({"commands": ["echo hi"]})
    response = front.http.post(front.url + "execute/", data={"config": config}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["execution"][0]["stdout"] == "hi"


@pl_case
def environments_and_files_with_get_and_head(front: Front) -> None:
    uuid = run(
        front,
        "mkdir -p dir d/e; echo 1 > file1.txt; echo 2 > dir/file1.txt",
        "printf 'x y' > d/e/f.txt",
        save=True,
    )["environment"]
    tgz = front.get(f"environments/{uuid}/")
    assert tgz.status_code == 200
    assert tgz.headers["Content-Type"] == "application/gzip"
    assert tgz.headers["Content-Disposition"] == f"attachment; filename={uuid}.tgz"
    assert int(tgz.headers["Content-Length"]) == len(tgz.content)
    assert members(tgz.content) == ["d", "d/e", "d/e/f.txt", "dir", "dir/file1.txt", "file1.txt"]
    head = front.http.head(front.url + f"environments/{uuid}/", timeout=60)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["Content-Length"] == tgz.headers["Content-Length"]
    file = front.get(f"files/{uuid}/d/e/f.txt/")
    assert (file.status_code, file.content) == (200, b"x y")
    assert file.headers["Content-Type"] == "application/octet-stream"
    assert file.headers["Content-Disposition"] == "attachment; filename=f.txt"
    head = front.http.head(front.url + f"files/{uuid}/d/e/f.txt/", timeout=60)
    assert (head.status_code, head.content, head.headers["Content-Length"]) == (200, b"", "3")


@pl_case
def unknown_environments_and_files_are_404_with_the_contract_text(front: Front) -> None:
    response = front.get(f"environments/{UNKNOWN}/")
    assert (response.status_code, response.text) == (
        404,
        f"No environment with UUID '{UNKNOWN}' found",
    )
    assert front.get("environments/not-a-uuid/").status_code == 404
    head = front.http.head(front.url + f"environments/{UNKNOWN}/", timeout=60)
    assert head.status_code == 404
    uuid = run(front, "true", save=True)["environment"]
    response = front.get(f"files/{uuid}/missing.txt/")
    assert (response.status_code, response.text) == (
        404,
        f"The file 'missing.txt' could not be found in environment '{uuid}'",
    )
    response = front.post_execute({"commands": ["true"], "environment": UNKNOWN})
    assert (response.status_code, response.text) == (
        404,
        f"No environment with UUID '{UNKNOWN}' found",
    )


@pl_case
def bad_configs_answer_400_with_the_reason(front: Front) -> None:
    for config, reason in (
        ([], "config must be an object, not <class 'list'>"),
        ({}, "Missing field 'commands' in config"),
        ({"commands": []}, "Command list cannot be empty"),
        ({"commands": [3]}, "Command badly formatted : '3'"),
        ({"commands": ["ls"], "save": "yes"}, "save must be a boolean, not <class 'str'>"),
    ):
        response = front.post_execute(config)
        assert response.status_code == 400 and reason in response.text, (config, response.text)
    response = front.http.post(front.url + "execute/", files={"other": (None, "x")}, timeout=60)
    assert (response.status_code, response.text) == (400, "Missing argument 'config'")
    response = front.http.post(front.url + "execute/", files={"config": (None, "{no")}, timeout=60)
    assert response.status_code == 400
    assert response.text.startswith("'config' json is invalid - ")


@pl_case
def paths_end_with_a_slash_and_methods_are_checked(front: Front) -> None:
    assert front.get("specifications").status_code == 404
    assert front.get("execute/").status_code == 405
    assert front.http.post(front.url + "specifications/", timeout=60).status_code == 405
    assert front.http.delete(front.url + f"environments/{UNKNOWN}/", timeout=60).status_code == 405


@pl_case
def the_token_is_required(front: Front) -> None:
    bare = requests.get(front.url + "specifications/", timeout=30)
    assert bare.status_code == 401 and "Bearer" in bare.text


@pl_case
def specifications_count_the_whole_cluster(front: Front) -> None:
    specs = front.get("specifications/").json()
    assert specs["host"]["sandbox_version"].startswith("3.")
    assert specs["container"]["count"] == 4  # 2 workers of 2 slots
    assert specs[protocol.CLUSTER_FIELD] == {"workers": 2, "slots": 4}
    assert specs["container"]["isolation"]["method"] == "bubblewrap"


@pytest.mark.parametrize("case", sorted(PL_CASES))
def test_premierlangage_shaped_requests_get_the_single_servers_answers(
    shared_cluster: SharedCluster, case: str
) -> None:
    PL_CASES[case](shared_cluster.front)


def test_a_sessions_cells_spread_over_both_workers_stay_one_session(
    shared_cluster: SharedCluster,
) -> None:
    """Cells of many sessions at once land on both workers; each session's file is whole."""
    front = shared_cluster.front
    before = [worker.jobs_ran() for worker in shared_cluster.workers]
    sessions = [run(front, f"echo {s}:0 > log", save=True)["environment"] for s in range(4)]
    for cell in range(1, 3):
        for index, uuid in enumerate(sessions):
            sessions[index] = run(
                front, f"echo {index}:{cell} >> log", environment=uuid, save=True
            )["environment"]
    for index, uuid in enumerate(sessions):
        log = run(front, "cat log", environment=uuid)["execution"][0]["stdout"]
        assert log == "\n".join(f"{index}:{cell}" for cell in range(3))
    after = [worker.jobs_ran() for worker in shared_cluster.workers]
    assert sum(after) - sum(before) == 16  # each cell ran once


# -- our own client ------------------------------------------------------------------------------


def test_the_sandbox_client_works_against_a_front(
    shared_cluster: SharedCluster, tmp_path: Path
) -> None:
    front = shared_cluster.front
    with Sandbox(front.url, token=front.token) as sandbox:
        assert sandbox.sandbox_version is not None and sandbox.sandbox_version.startswith("3.")
        assert wait_until(lambda: busy(front) == 0)
        assert sandbox.containers == {"total": 4, "running": 0, "available": 4}
        (tmp_path / "input.txt").write_text("41\n")
        first = sandbox.execute(
            {"commands": ["echo $(( $(cat input.txt) + 1 )) > out.txt"], "save": True},
            build_archive([tmp_path / "input.txt"]),
        )
        assert first["status"] == 0, first
        carried = sandbox.execute(
            {"commands": ["cat out.txt; echo 43 >> out.txt"], "environment": first["environment"],
             "save": True}
        )  # fmt: skip
        assert carried["execution"][0]["stdout"] == "42"
        uuid = carried["environment"]
        assert sandbox.download(uuid, "out.txt").read() == b"42\n43\n"
        assert sandbox.check(uuid, "out.txt") == 6
        assert sandbox.check(uuid, "missing.txt") == 0
        assert sandbox.check(uuid) > 0
        unpacked = tmp_path / "unpacked"
        assert sorted(extract_archive(sandbox.download(uuid), unpacked)) == [
            "input.txt",
            "out.txt",
        ]
        assert (unpacked / "out.txt").read_text() == "42\n43\n"
        with pytest.raises(Sandbox404):
            sandbox.download(UNKNOWN)
        assert sandbox.usage() == 0.0


# -- stdin through a front: the 413 of a worker, the 1 MiB cap ----------------------------------


WebSocket = aiohttp.ClientWebSocketResponse[Any]
Feed = Callable[[WebSocket, asyncio.Event], Any]


async def _stream(front: Front, config: dict[str, Any], feed: Feed) -> list[dict[str, Any]]:
    """The frames of a streamed run; ``feed(ws, started)`` sends the client's frames, and
    ``started`` is set by the run's first output (it runs on a worker by then)."""
    headers = {"Authorization": f"Bearer {front.token}"}
    frames: list[dict[str, Any]] = []
    started = asyncio.Event()
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.ws_connect(front.url + "execute/stream/", max_msg_size=0) as ws,
    ):
        await ws.send_str(json.dumps(config))
        await ws.send_bytes(b"")
        sender = asyncio.ensure_future(feed(ws, started))
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                frames.append(json.loads(message.data))
                if "stream" in frames[-1]:
                    started.set()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return frames


def stream(front: Front, config: dict[str, Any], feed: Feed) -> list[dict[str, Any]]:
    return asyncio.run(asyncio.wait_for(_stream(front, config, feed), 90))


def _cancelled(cluster: SharedCluster) -> int:
    return sum(w.log_text().count("cancelled by its front") for w in cluster.workers)


@pytest.mark.parametrize(
    ("frame_size", "paced"), [(1024, True), (64 * 1024, True), (300_000, True), (300_000, False)]
)
def test_stdin_flooding_a_run_behind_a_front_is_refused_413(
    shared_cluster: SharedCluster, frame_size: int, paced: bool
) -> None:
    """More than 1 MiB of unread stdin gets the single server's 413 as the final frame, and
    the slot is free again. Sent at a pace the front relays (``paced``), it
    is the worker's run that refuses it, relayed by the front; sent in a burst faster than
    the front hands it to Redis (on a loaded machine, even 1 KiB frames can be), the front
    may refuse it first (the same 413)."""
    front = shared_cluster.front
    cancelled = _cancelled(shared_cluster)
    ran = sum(w.jobs_ran() for w in shared_cluster.workers)

    async def flood(ws: WebSocket, started: asyncio.Event) -> None:
        await started.wait()  # claimed: the front relays, the worker's run counts
        chunk, unpaced = "y" * frame_size, 0
        for _ in range(MAX_STDIN_WAITING // frame_size + 2):
            if ws.closed:
                return
            await ws.send_str(json.dumps({"stdin": chunk}))
            unpaced += frame_size
            if paced and unpaced >= 64 * 1024:  # let the front hand it to Redis
                await asyncio.sleep(0.05)
                unpaced = 0

    started = time.monotonic()
    frames = stream(front, {"commands": ["echo up; sleep 30", "echo never"]}, flood)
    assert frames[-1] == {"error": 413, "text": stdin_flood()[1]}, frames[-1]
    assert time.monotonic() - started < 20, "the run was stopped, not waited for"
    assert wait_until(lambda: busy(front) == 0, timeout=10)
    if paced:
        # The worker ended the run itself (a refusal at the front would cancel it there).
        assert wait_until(lambda: sum(w.jobs_ran() for w in shared_cluster.workers) == ran + 1)
        assert _cancelled(shared_cluster) == cancelled


def test_stdin_up_to_the_cap_reaches_a_run_behind_a_front_whole(
    shared_cluster: SharedCluster,
) -> None:
    """Just under 1 MiB sent at once (unread until the command starts), then more as it is
    read: every byte arrives, in order, across the front's 64 KiB relay pieces."""
    front = shared_cluster.front
    first = MAX_STDIN_WAITING - 1000
    pieces = ["a" * first, "b" * 500_000, "c" * 700_000]

    async def feed(ws: WebSocket, _started: asyncio.Event) -> None:
        await ws.send_str(json.dumps({"stdin": pieces[0]}))
        await asyncio.sleep(1.5)  # read meanwhile: room for more
        await ws.send_str(json.dumps({"stdin": pieces[1]}))
        await asyncio.sleep(1.0)
        await ws.send_str(json.dumps({"stdin": pieces[2]}))
        await ws.send_str(json.dumps({"eof": True}))

    command = "sleep 0.5; sha256sum | cut -c1-64; echo done"
    frames = stream(front, {"commands": [command]}, feed)
    final = frames[-1]
    assert final.get("status") == 0, final
    expected = hashlib.sha256("".join(pieces).encode()).hexdigest()
    assert final["execution"][0]["stdout"] == f"{expected}\ndone"


# -- streaming through a front ---------------------------------------------------------------------


async def _replying(
    front: Front, config: dict[str, Any], replies: Callable[[dict[str, Any]], list[str]]
) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {front.token}"}
    frames = []
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.ws_connect(front.url + "execute/stream/") as ws,
    ):
        await ws.send_str(json.dumps(config))
        await ws.send_bytes(b"")
        async for message in ws:
            frame = json.loads(message.data)
            frames.append(frame)
            for reply in replies(frame):
                await ws.send_str(reply)
    return frames


def test_streaming_through_a_front(shared_cluster: SharedCluster) -> None:
    front = shared_cluster.front
    script = "for i in 1 2 3; do echo $i; sleep 0.2; echo e$i >&2; done"
    frames = asyncio.run(_replying(front, {"commands": [script]}, lambda f: []))
    chunks = [(f["stream"], f["text"]) for f in frames if "stream" in f]
    assert chunks == [
        ("stdout", "1\n"), ("stderr", "e1\n"), ("stdout", "2\n"), ("stderr", "e2\n"),
        ("stdout", "3\n"), ("stderr", "e3\n"),
    ]  # fmt: skip
    assert frames[-1]["status"] == 0
    assert frames[-1]["execution"][0]["stdout"] == "1\n2\n3"

    def answer(frame: dict[str, Any]) -> list[str]:
        if frame.get("stdin") == "wanted":
            return [json.dumps({"stdin": "Ada\n"}), json.dumps({"eof": True})]
        return []

    asked = 'printf "name? "; read name; echo "hello $name"; cat; echo done'
    frames = asyncio.run(_replying(front, {"commands": [asked]}, answer))
    wanted = [f for f in frames if f.get("stdin") == "wanted"]
    assert wanted and wanted[0]["prompt"] == "name? "
    assert frames[-1]["execution"][0]["stdout"] == "name? hello Ada\ndone"

    def stop(frame: dict[str, Any]) -> list[str]:
        return [json.dumps({"stop": True})] if frame.get("text") == "started\n" else []

    frames = asyncio.run(
        _replying(front, {"commands": ["echo started; sleep 20", "echo never"]}, stop)
    )
    final = frames[-1]
    assert final["status"] == 130, final
    assert protocol.STOPPED_NOTE in final["execution"][0]["stderr"]
    assert len(final["execution"]) == 1


def test_a_client_that_goes_away_kills_its_run_on_the_worker(
    shared_cluster: SharedCluster,
) -> None:
    front = shared_cluster.front
    environment = run(front, "echo start >> f", save=True)["environment"]
    config = {"commands": ["sleep 30; echo late >> f"], "environment": environment, "save": True}
    files = {"config": (None, json.dumps(config))}
    with contextlib.suppress(requests.Timeout):
        front.http.post(front.url + "execute/", files=files, timeout=1.5)
    gone = time.monotonic()
    assert wait_until(lambda: busy(front) == 0, timeout=10)
    assert time.monotonic() - gone < 3, "the run outlived its client"

    async def streamed_and_dropped() -> None:
        headers = {"Authorization": f"Bearer {front.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            ws = await http.ws_connect(front.url + "execute/stream/")
            await ws.send_str(json.dumps(config))
            await ws.send_bytes(b"")
            await asyncio.sleep(1.0)
            await ws.close()

    asyncio.run(streamed_and_dropped())
    gone = time.monotonic()
    assert wait_until(lambda: busy(front) == 0, timeout=10)
    assert time.monotonic() - gone < 3
    time.sleep(1)
    log = front.post_execute({"commands": ["cat f"], "environment": environment}).json()
    assert log["execution"][0]["stdout"] == "start"


# -- caps that differ ------------------------------------------------------------------------------


def test_a_worker_whose_caps_differ_from_the_fronts_says_so(
    shared_cluster: SharedCluster,
) -> None:
    """The front published its caps at start; a worker started with others logs a WARNING
    naming each differing option; the workers with the front's caps log nothing."""
    odd = shared_cluster.processes.start_worker(
        "w-odd",
        "--max-upload", "2M", "--execute-timeout", "30", "--max-output", "2M",
        workers=1,
    )  # fmt: skip
    try:
        assert wait_until(lambda: "other caps than front" in odd.log_text(), timeout=15), (
            odd.log_text()[-3000:]
        )
        line = next(x for x in odd.log_text().splitlines() if "other caps than front" in x)
        assert "WARNING" in line
        found = re.search(r"other caps than front '([^']+)': (.*?)\. Start every worker", line)
        assert found is not None, line
        differences = sorted(found.group(2).split("; "))
        assert [item.split()[0] for item in differences] == [
            "--execute-timeout",
            "--max-output",
            "--max-upload",
        ], line
        assert "--max-upload 2097152 here, 268435456 at the front" in differences
        assert "--execute-timeout 30 here, 60 at the front" in differences
    finally:
        assert odd.stop() == 0
    for worker in shared_cluster.workers:
        assert "other caps than front" not in worker.log_text()
