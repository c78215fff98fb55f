"""The embedded server against the contract (shared/reference/sandbox-protocol.md), rule by
rule, over real HTTP: shapes, execution semantics, odd parts, error answers, security."""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from sandbox_kernel import protocol
from sandbox_kernel.archive import build_archive

from .conftest import Server

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return sorted(archive.getnames())


# -- execute/: shapes and semantics ---------------------------------------------------------------


def test_trivial_execute_has_the_contract_shape(server: Server) -> None:
    answer = server.run("echo $((1+1))")
    assert set(answer) == {"status", "execution", "total_time"}
    assert answer["status"] == 0
    [entry] = answer["execution"]
    assert set(entry) == {"command", "exit_code", "stdout", "stderr", "time"}
    assert entry["command"] == "echo $((1+1))"
    assert (entry["exit_code"], entry["stdout"], entry["stderr"]) == (0, "2", "")
    assert answer["total_time"] >= entry["time"] > 0


def test_stdout_and_stderr_are_stripped(server: Server) -> None:
    [entry] = server.run("printf '\\n\\n  out  \\n\\n'; printf '\\n err \\n' >&2")["execution"]
    assert entry["stdout"] == "out"
    assert entry["stderr"] == "err"


def test_environ_is_set_and_values_are_converted_to_text(server: Server) -> None:
    answer = server.run('echo "$A|$B|$C"', environ={"A": "x y", "B": 3, "C": 1.5})
    assert answer["execution"][0]["stdout"] == "x y|3|1.5"


def test_commands_share_the_directory_but_not_shell_state(server: Server) -> None:
    answer = server.run("echo data > f; X=1; cd /tmp", 'cat f; echo "[$X]"; pwd')
    assert answer["execution"][1]["stdout"] == "data\n[]\n/home/student"


def test_failure_stops_the_run_with_its_exit_code(server: Server) -> None:
    answer = server.run("true", "echo oops >&2; exit 3", "echo never")
    assert answer["status"] == 3
    assert [e["exit_code"] for e in answer["execution"]] == [0, 3]
    assert answer["execution"][1]["stderr"] == "oops"


def test_dash_lets_a_command_fail_and_is_stripped(server: Server) -> None:
    answer = server.run("-exit 4", "echo after")
    assert answer["status"] == 0
    first, second = answer["execution"]
    assert (first["command"], first["exit_code"]) == ("exit 4", 4)
    assert second["stdout"] == "after"
    assert server.run("true", "-false")["status"] == 0  # the last failure was ignored


def test_timeout_message_time_and_type(server: Server) -> None:
    answer = server.run({"command": "sleep 5", "timeout": 0.2}, "echo never")
    assert answer["status"] == protocol.STATUS_TIMEOUT
    [entry] = answer["execution"]
    assert entry["exit_code"] == -2
    assert entry["stderr"] == "Command timed out after 0.2 seconds\n"
    assert entry["time"] <= 0.25
    [entry] = server.run({"command": "sleep 5", "timeout": 1})["execution"]
    assert entry["stderr"] == "Command timed out after 1 seconds\n"


def test_dash_command_that_times_out_lets_the_run_go_on(server: Server) -> None:
    answer = server.run({"command": "-sleep 5", "timeout": 0.2}, "echo after")
    assert answer["status"] == 0
    assert [e["exit_code"] for e in answer["execution"]] == [-2, 0]


def test_output_printed_before_a_timeout_is_kept(server: Server) -> None:
    [entry] = server.run({"command": "echo partial; sleep 5", "timeout": 0.3})["execution"]
    assert entry["stdout"] == "partial"
    assert entry["stderr"].endswith("Command timed out after 0.3 seconds\n")


@pytest.mark.slow  # a server of its own, kept busy for seconds
def test_budget_is_shared_by_the_commands(start_server: Callable[..., Server]) -> None:
    server = start_server("--execute-timeout", "1.5", "--workers", "1")
    answer = server.run("sleep 1", "sleep 5")
    first, second = answer["execution"]
    assert first["exit_code"] == 0 and second["exit_code"] == -2
    shown = float(re.search(r"after ([0-9.]+) seconds", second["stderr"]).group(1))  # type: ignore[union-attr]
    assert 0.0 < shown < 0.5  # what the first command left of the 1.5 s
    assert answer["total_time"] < 3.0
    [entry] = server.run("sleep 5")["execution"]
    assert entry["stderr"] == "Command timed out after 1.5 seconds\n"


def test_result_is_returned_unstripped(server: Server) -> None:
    answer = server.run("printf '  2\\n\\n' > out", result_path="out")
    assert answer["result"] == "  2\n\n"
    assert answer["status"] == 0


def test_missing_result_turns_status_to_minus_3_even_after_a_failure(server: Server) -> None:
    answer = server.run("exit 5", result_path="nothing")
    assert answer["status"] == protocol.STATUS_RESULT_NOT_FOUND
    assert answer["execution"][0]["exit_code"] == 5
    assert "result" not in answer


def test_non_utf8_result_is_minus_4(server: Server) -> None:
    answer = server.run("printf '\\xff\\xfe' > out", result_path="out")
    assert answer["status"] == protocol.STATUS_RESULT_NOT_UTF8
    assert "result" not in answer


def test_non_utf8_output_keeps_the_exit_code(server: Server) -> None:
    [entry] = server.run("printf 'a\\xffb'; exit 2")["execution"]
    assert entry["exit_code"] == 2
    assert entry["stdout"] == "a\ufffdb"


def test_save_returns_a_new_uuid_every_run_and_keeps_the_base(server: Server) -> None:
    first = server.run("echo one > f", save=True)
    assert UUID_RE.match(first["environment"])
    expire = first["expire"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$", expire)
    second = server.run("echo two >> f; cat f", save=True, environment=first["environment"])
    assert second["execution"][0]["stdout"] == "one\ntwo"
    assert second["environment"] != first["environment"]
    again = server.run("cat f", environment=first["environment"])  # the base is unchanged
    assert again["execution"][0]["stdout"] == "one"
    assert "environment" not in again and "expire" not in again


def test_save_keeps_the_directory_whatever_the_outcome(server: Server) -> None:
    failed = server.run("echo kept > f; exit 1", save=True)
    timed_out = server.run({"command": "echo kept > g; sleep 5", "timeout": 0.2}, save=True)
    for answer, name in ((failed, "f"), (timed_out, "g")):
        again = server.run(f"cat {name}", environment=answer["environment"])
        assert again["execution"][0]["stdout"] == "kept"


def test_upload_is_merged_and_its_files_win(server: Server, tmp_path: Any) -> None:
    base = server.run("echo saved > a; echo saved > b", save=True)["environment"]
    (tmp_path / "a").write_text("uploaded\n")
    upload = build_archive([tmp_path / "a"]).getvalue()
    answer = server.execute({"commands": ["cat a b"], "environment": base}, environment=upload)
    assert answer["execution"][0]["stdout"] == "uploaded\nsaved"


def test_archives_from_ordinary_tools_are_accepted(server: Server) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in ((".", None), ("./dir/", None), ("./dir/b", b"B"), ("./a.txt", b"A")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    answer = server.execute({"commands": ["cat a.txt dir/b"], "save": True}, buffer.getvalue())
    assert answer["execution"][0]["stdout"] == "AB"
    download = server.get(f"environments/{answer['environment']}/")
    assert members(download.content) == ["a.txt", "dir", "dir/b"]


def test_url_encoded_config_is_accepted(server: Server) -> None:
    response = server.http.post(
        server.url + "execute/", data={"config": json.dumps({"commands": ["echo hi"]})}
    )
    assert response.status_code == 200
    assert response.json()["execution"][0]["stdout"] == "hi"


# -- environments/ and files/ ---------------------------------------------------------------------


def test_environment_download_and_head(server: Server) -> None:
    uuid = server.run("mkdir dir; echo 1 > file1.txt; echo 2 > dir/file1.txt", save=True)[
        "environment"
    ]
    response = server.get(f"environments/{uuid}/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/gzip"
    assert response.headers["Content-Disposition"] == f"attachment; filename={uuid}.tgz"
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert members(response.content) == ["dir", "dir/file1.txt", "file1.txt"]
    head = server.http.head(server.url + f"environments/{uuid}/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == response.headers["Content-Length"]


def test_file_download_and_head(server: Server) -> None:
    uuid = server.run("mkdir -p d/e; printf 'x y' > d/e/f.txt", save=True)["environment"]
    response = server.get(f"files/{uuid}/d/e/f.txt/")
    assert response.status_code == 200 and response.content == b"x y"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"] == "attachment; filename=f.txt"
    head = server.http.head(server.url + f"files/{uuid}/d/e/f.txt/")
    assert (head.status_code, head.content, head.headers["Content-Length"]) == (200, b"", "3")


def test_unknown_environment_and_file_answer_404_with_the_contract_text(server: Server) -> None:
    unknown = "e8c5995b-7049-4b04-8440-5d9d914360fc"
    response = server.get(f"environments/{unknown}/")
    assert (response.status_code, response.text) == (
        404,
        f"No environment with UUID '{unknown}' found",
    )
    assert server.get("environments/not-a-uuid/").status_code == 404
    uuid = server.run("true", save=True)["environment"]
    response = server.get(f"files/{uuid}/missing.txt/")
    assert (response.status_code, response.text) == (
        404,
        f"The file 'missing.txt' could not be found in environment '{uuid}'",
    )
    response = server.post_execute({"commands": ["true"], "environment": unknown})
    assert (response.status_code, response.text) == (
        404,
        f"No environment with UUID '{unknown}' found",
    )


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ([], "config must be an object, not <class 'list'>"),
        ({}, "Missing field 'commands' in config"),
        ({"commands": "ls"}, "commands must be a list, not <class 'str'>"),
        ({"commands": []}, "Command list cannot be empty"),
        ({"commands": [3]}, "Command badly formatted : '3'"),
        ({"commands": [{"command": "ls", "timeout": "1"}]}, "Command badly formatted"),
        ({"commands": ["ls"], "environ": []}, "environ must be an object, not <class 'list'>"),
        ({"commands": ["ls"], "result_path": 1}, "result_path must be a string, not <class 'int'>"),
        ({"commands": ["ls"], "save": "yes"}, "save must be a boolean, not <class 'str'>"),
        ({"commands": ["echo \0"]}, "NUL byte"),
        ({"commands": ["ls"], "environ": {"A": None}}, "must be a string or a number"),
    ],
)
def test_bad_configs_answer_400_with_a_reason(server: Server, config: Any, text: str) -> None:
    response = server.post_execute(config)
    assert response.status_code == 400
    assert text in response.text


def test_config_missing_or_not_json_answers_400(server: Server) -> None:
    response = server.http.post(server.url + "execute/", files={"other": (None, "x")})
    assert (response.status_code, response.text) == (400, "Missing argument 'config'")
    for raw in ("{not json", '{"commands": [NaN]}', "[" * 10000 + "]" * 10000):
        response = server.http.post(server.url + "execute/", files={"config": (None, raw)})
        assert response.status_code == 400
        assert response.text.startswith("'config' json is invalid - ")


def test_wrong_methods_answer_405(server: Server) -> None:
    assert server.get("execute/").status_code == 405
    assert server.http.post(server.url + "specifications/").status_code == 405
    assert server.http.delete(server.url + "environments/x/").status_code == 405


def test_paths_end_with_a_slash(server: Server) -> None:
    assert server.get("specifications").status_code == 404


# -- specifications/, usages/, libraries/ ---------------------------------------------------------


def test_specifications_have_the_3x_shape_and_our_additions(server: Server) -> None:
    specs = server.get("specifications/").json()
    host, container = specs["host"], specs["container"]
    assert set(host) >= {"cpu", "memory", "docker_version", "sandbox_version"}
    assert set(host["cpu"]) == {"core", "logical", "freq_min", "freq_max"}
    assert host["sandbox_version"].startswith("3.")
    assert container["count"] == 4
    assert set(container) >= {"cpu", "memory", "io", "process", "working_dir_device"}
    assert container["execute_timeout"] == 60.0
    assert container["expiration"] == 86400
    assert container["isolation"]["isolated"] is True
    assert container["isolation"]["method"] == "bubblewrap"


@pytest.mark.slow  # a server of its own, kept busy for seconds
def test_usages_answer_at_once_with_busy_containers(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "2")
    thread = threading.Thread(target=server.run, args=("sleep 1.5",))
    thread.start()
    time.sleep(0.7)
    started = time.monotonic()
    usages = server.get("usages/").json()
    assert time.monotonic() - started < 0.5
    assert usages["container"] == 1
    assert set(usages) >= {"cpu", "memory", "io", "network", "process"}
    assert 0 <= usages["cpu"]["usage"] <= 1
    thread.join()
    assert server.get("usages/").json()["container"] == 0


def test_libraries_list_what_the_sandbox_has(server: Server) -> None:
    answer = server.get("libraries/").json()
    assert set(answer) == {"libraries", "bin"}
    assert set(answer["libraries"]) == {"system", "python", "perl", "c"}
    assert {"bash", "python3", "gcc"} <= set(answer["bin"])
    assert "bash" in answer["libraries"]["system"]
    assert "json" in answer["libraries"]["python"]
    started = time.monotonic()
    assert server.get("libraries/").json() == answer  # cached
    assert time.monotonic() - started < 0.5


# -- concurrency ---------------------------------------------------------------------------------


@pytest.mark.slow  # a server of its own, kept busy for seconds
def test_parallel_runs_and_503_when_full(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "2")
    results: list[float] = []

    def sleeper() -> None:
        started = time.monotonic()
        server.run("sleep 3")
        results.append(time.monotonic() - started)

    threads = [threading.Thread(target=sleeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    refused = server.post_execute({"commands": ["true"]})
    waited = time.monotonic() - started
    assert (refused.status_code, refused.text) == (503, protocol.OVERLOADED_TEXT)
    assert 1.8 <= waited <= 2.8
    for thread in threads:
        thread.join()
    assert max(results) < 4.0  # both ran at once
    assert server.run("echo free")["execution"][0]["stdout"] == "free"


# -- security --------------------------------------------------------------------------------------


def test_token_is_required(server: Server) -> None:
    bare = requests.get(server.url + "specifications/", timeout=10)
    assert bare.status_code == 401
    assert "Bearer" in bare.text
    wrong = requests.get(
        server.url + "specifications/", headers={"Authorization": "Bearer nope"}, timeout=10
    )
    assert wrong.status_code == 401


def test_foreign_origin_and_rebinding_host_are_refused(server: Server) -> None:
    origin = server.get("specifications/", headers={"Origin": "https://evil.example"})
    assert origin.status_code == 403 and "Origin" in origin.text
    local = server.get("specifications/", headers={"Origin": "http://localhost:8888"})
    assert local.status_code == 200
    host = server.get("specifications/", headers={"Host": "evil.example:80"})
    assert host.status_code == 403 and "--allowed-host" in host.text


def test_allowed_host_and_no_token(start_server: Callable[..., Server]) -> None:
    server = start_server("--no-token", "--allowed-host", "sandbox.test", token="")
    bare = requests.get(
        server.url + "specifications/", headers={"Host": "sandbox.test"}, timeout=10
    )
    assert bare.status_code == 200


def test_a_class_downloading_many_environments_at_once_gets_every_one(server: Server) -> None:
    """More environments downloaded together than the archive cache keeps (16): each
    download builds its archive and trims the cache while the others list and open theirs.
    Every one must arrive (a 500, from a file trimmed between a listing and its stat, did)."""
    uuids = [
        server.post_execute({"commands": [f"echo {n} > n; seq 30000 > s"], "save": True}).json()[
            "environment"
        ]
        for n in range(48)
    ]
    statuses: list[int] = []

    def download(uuid: str) -> None:
        statuses.append(
            server.http.get(server.url + f"environments/{uuid}/", timeout=60).status_code
        )

    threads = [threading.Thread(target=download, args=(uuid,)) for uuid in uuids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(uuids)
