"""The embedded server's sandbox, checked from outside over real loopback HTTP.

What a user of the sandbox relies on: commands cannot see or harm the host (unprivileged, no
network, read-only system, private /tmp), nothing they start survives the request, caps on
processes, memory, CPU, output and disk hold, uploads and paths cannot escape the working
directory, storage is bounded and deduplicated, environments expire, and a stopped server
leaves nothing behind. Small caps and short timeouts keep the whole file fast.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import secrets
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from sandbox_kernel.archive import build_archive
from sandbox_kernel.discovery import advertisement_path

from .conftest import Server, descendants, processes_matching, wait_until
from .helpers import living

MAIN_ARGS = (
    "--workers",
    "4",
    "--execute-timeout",
    "3",
    "--max-processes",
    "40",
    "--memory-limit",
    "64M",
    "--workdir-quota",
    "5M",
    "--max-output",
    "64K",
    "--cpu-limit",
    "1",
    "--max-upload",
    "1M",
    "--max-archive-entries",
    "20",
    "--max-archive-bytes",
    "1M",
    "--max-storage",
    "3M",
)
HOME = "/home/student"


# -- helpers ----------------------------------------------------------------------------------


def start(start_server: Callable[..., Server], *args: str, data_dir: Path | None = None) -> Server:
    """``start_server`` with a random token (given to the server in its token file)."""
    return start_server(*args, token=secrets.token_urlsafe(24), data_dir=data_dir)


@pytest.fixture(scope="module")
def main(start_server: Callable[..., Server]) -> Server:
    """The server most tests share: small caps, four slots."""
    return start(start_server, *MAIN_ARGS)


@pytest.fixture(scope="module")
def single(start_server: Callable[..., Server]) -> Server:
    """One execution slot, to see whether a slot is given back."""
    return start(start_server, "--workers", "1", "--execute-timeout", "3")


def marker() -> str:
    """A ``sleep`` argument no other process on the machine has: ``300.<random digits>``."""
    return f"300.{random.randrange(10**8, 10**9)}"


def port_of(server: Server) -> int:
    port = urlsplit(server.url).port
    assert port is not None
    return port


def gone(marker_text: str, timeout: float) -> bool:
    return wait_until(lambda: not processes_matching(marker_text), timeout)


def entry(response: dict[str, Any], index: int = 0) -> dict[str, Any]:
    execution: list[dict[str, Any]] = response["execution"]
    return execution[index]


def tgz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A gzip-compressed tar of hand-made members (for hostile archives)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = int(time.time())
    return info


def tar_members(data: bytes) -> dict[str, bytes | None]:
    """``name -> content`` (None for non-files) of a downloaded environment."""
    found: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for info in archive:
            extracted = archive.extractfile(info) if info.isreg() else None
            found[info.name] = extracted.read() if extracted else None
    return found


def staging_entries(server: Server) -> list[str]:
    """What uploads left under ``staging/`` (a server's own empty ``staging/<pid>/`` aside)."""
    staging = server.data_dir / "staging"
    left = []
    for root, directories, files in os.walk(staging):
        for name in directories + files:
            path = Path(root, name)
            relative = str(path.relative_to(staging))
            if not (path.parent == staging and name.isdigit() and path.is_dir()):
                left.append(relative)
    return sorted(left)


# -- 1. isolation -----------------------------------------------------------------------------


def test_commands_run_unprivileged_without_capabilities(main: Server) -> None:
    response = main.run(
        "id -u", "grep '^CapEff:' /proc/self/status", "grep '^CapPrm:' /proc/self/status"
    )
    assert response["status"] == 0, response
    assert entry(response, 0)["stdout"] != "0"
    assert entry(response, 1)["stdout"].split() == ["CapEff:", "0000000000000000"]
    assert entry(response, 2)["stdout"].split() == ["CapPrm:", "0000000000000000"]


def test_network_to_the_host_fails_fast(main: Server) -> None:
    command = f"bash -c 'echo > /dev/tcp/127.0.0.1/{port_of(main)}'"
    started = time.monotonic()
    response = main.run(command)
    assert time.monotonic() - started < 1.5
    assert response["status"] != 0, response
    assert entry(response)["time"] < 1


def test_system_is_read_only(main: Server) -> None:
    response = main.run("-touch /usr/x", "-touch /etc/x", "-touch /bin/x", "test ! -e /usr/x")
    assert response["status"] == 0, response
    for index in range(3):
        assert entry(response, index)["exit_code"] != 0, response
        assert "Read-only file system" in entry(response, index)["stderr"]
    assert not Path("/usr/x").exists() and not Path("/etc/x").exists()


def test_only_home_tmp_and_shm_are_writable(main: Server) -> None:
    """The sandbox's own root (and /home beside the working directory) is not writable either:
    files there would escape --workdir-quota and the size of /tmp."""
    response = main.run(
        "-touch /x", "-mkdir /newdir", "-touch /home/x", "touch /tmp/x /dev/shm/x ~/x"
    )
    assert entry(response, 3)["exit_code"] == 0, response
    written = [item["command"] for item in response["execution"][:3] if item["exit_code"] == 0]
    assert written == [], f"writable outside /home/student, /tmp and /dev/shm: {written}"


def test_working_directory_is_home(main: Server) -> None:
    response = main.run("pwd", "echo $HOME", "touch here && ls")
    assert [item["stdout"] for item in response["execution"]] == [HOME, HOME, "here"]


def test_tmp_and_shm_are_private_to_a_run(main: Server) -> None:
    first = main.run("echo t > /tmp/t && echo s > /dev/shm/s && echo w > w", save=True)
    assert first["status"] == 0, first
    check = (
        "for f in /tmp/t /dev/shm/s w; do if [ -e $f ]; then echo yes $f; else echo no $f; fi; done"
    )
    second = main.run(check, environment=first["environment"])
    assert entry(second)["stdout"].splitlines() == ["no /tmp/t", "no /dev/shm/s", "yes w"]


def test_saved_environment_is_immutable(main: Server) -> None:
    a = main.run("echo one > f", save=True)
    b = main.run("echo two >> f && cat f", save=True, environment=a["environment"])
    assert entry(b)["stdout"] == "one\ntwo"
    assert a["environment"] != b["environment"]
    download_a = main.get(f"environments/{a['environment']}/")
    assert download_a.status_code == 200
    assert tar_members(download_a.content)["f"] == b"one\n"
    assert main.get(f"files/{a['environment']}/f/").content == b"one\n"
    assert main.get(f"files/{b['environment']}/f/").content == b"one\ntwo\n"
    again = main.run("cat f", environment=a["environment"])
    assert entry(again)["stdout"] == "one"


# -- 2. kills and no survivors ----------------------------------------------------------------


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; its result (or exception) lands in the returned list."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize(
    "template",
    [
        "sleep {m} &",
        "setsid bash -c 'bash -c \"sleep {m} &\" &' </dev/null >/dev/null 2>&1",
        "sleep {m} & sleep 0.1; kill -STOP $!; grep State: /proc/$!/status >&2",
    ],
    ids=["background", "setsid-daemon", "stopped"],
)
def test_nothing_a_command_starts_survives_it(main: Server, template: str) -> None:
    mark = marker()
    # Count, from inside, the processes whose argv holds the marker (the bracket keeps grep's
    # own argv from matching): the command really left one behind when it ended.
    count = f"cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -cx '[3]00\\.{mark[4:]}'"
    response = main.run(template.format(m=mark) + f"\nsleep 0.2; echo started $({count})")
    assert entry(response)["stdout"] == "started 1", response
    if "STOP" in template:
        assert "(stopped)" in entry(response)["stderr"], response
    assert gone(mark, 0.5), f"left running after the response: {processes_matching(mark)}"


def test_timeout_kills_the_whole_tree(main: Server) -> None:
    mark = marker()
    command = f"sleep {mark} & setsid sleep {mark} & (sleep {mark} &); sleep {mark}"
    started = time.monotonic()
    thread, outcome = in_background(lambda: main.run({"command": command, "timeout": 1}))
    assert wait_until(lambda: len(processes_matching(mark)) >= 4, 1), "the command never started"
    thread.join(10)
    assert time.monotonic() - started < 2
    response = outcome[0]
    assert isinstance(response, dict), response
    assert response["status"] == -2, response
    assert entry(response)["stderr"] == "Command timed out after 1 seconds\n"
    assert gone(mark, 2), f"survived the timeout: {processes_matching(mark)}"


def test_client_disconnect_kills_the_run_and_frees_the_slot(single: Server) -> None:
    mark = f"30.{random.randrange(10**8, 10**9)}"
    headers = {"Authorization": f"Bearer {single.token}"}
    files = {"config": (None, f'{{"commands": ["sleep {mark}"]}}')}
    thread, outcome = in_background(
        lambda: requests.post(single.url + "execute/", files=files, headers=headers, timeout=(5, 1))
    )
    assert wait_until(lambda: bool(processes_matching(mark)), 1), "the command never started"
    thread.join(5)
    assert isinstance(outcome[0], requests.exceptions.ReadTimeout), outcome
    assert gone(mark, 4), f"the run went on after the client left: {processes_matching(mark)}"
    started = time.monotonic()
    response = single.post_execute({"commands": ["echo ok"]})
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 1.5
    assert entry(response.json())["stdout"] == "ok"


# -- 3. caps ----------------------------------------------------------------------------------


def test_fork_bomb_is_contained(main: Server) -> None:
    started = time.monotonic()
    response = main.run({"command": ":(){ :|:& };:; sleep 5", "timeout": 1})
    assert time.monotonic() - started < 3
    assert response["status"] != 0, response
    assert "fork" in entry(response)["stderr"], response  # the pids cap was hit
    assert entry(main.run("echo alive"))["stdout"] == "alive"


def test_output_is_cut_at_max_output(main: Server) -> None:
    """--max-output bounds the answer's text (JSON-escaped: "y\\n" takes three characters);
    past it output is dropped, and `yes` is not killed for it: it runs on until its CPU limit
    (1 s here) kills it, never by SIGPIPE (141)."""
    started = time.monotonic()
    response = main.run("yes")
    elapsed = time.monotonic() - started
    item = entry(response)
    escaped = len(json.dumps(item["stdout"])) - 2
    assert 60 * 1024 < escaped <= 64 * 1024
    assert item["exit_code"] == 137, item["stderr"]
    assert item["stderr"].endswith("[sandbox] output cut after 65536 (--max-output)")
    assert elapsed < 3 + 1.5, f"yes held its slot {elapsed:.1f} s"


def test_output_before_a_timeout_is_kept(main: Server) -> None:
    response = main.run({"command": "echo before; sleep 10", "timeout": 0.5})
    assert response["status"] == -2
    assert entry(response)["stdout"] == "before"
    assert entry(response)["stderr"].endswith("Command timed out after 0.5 seconds\n")


def test_memory_hog_is_killed(main: Server) -> None:
    response = main.run('python3 -c "x = bytearray(200*1024*1024)"')
    assert response["status"] != 0, response
    assert "memory limit" in entry(response)["stderr"], response


def test_busy_loop_is_killed_by_the_cpu_limit(main: Server) -> None:
    started = time.monotonic()
    response = main.run("while :; do :; done")
    assert time.monotonic() - started < 2.5
    assert entry(response)["exit_code"] in (137, 152), response


def test_file_beyond_workdir_quota_fails(main: Server) -> None:
    response = main.run("trap '' XFSZ; head -c 6M /dev/zero > big")
    assert response["status"] != 0, response
    assert "File too large" in entry(response)["stderr"], response
    python = main.run("""python3 -c "open('big', 'wb').write(bytes(6 * 1024 * 1024))" """)
    assert "File too large" in entry(python)["stderr"], python


def test_stdin_is_at_eof(main: Server) -> None:
    response = main.run("cat", "read line; echo $?")
    assert response["status"] == 0, response
    assert entry(response, 0)["time"] < 0.5
    assert entry(response, 1)["stdout"] == "1"


def test_no_core_files(main: Server) -> None:
    response = main.run("ulimit -c", "-bash -c 'kill -SEGV $$'", "ls -A")
    assert entry(response, 0)["stdout"] == "0"
    assert entry(response, 1)["exit_code"] == 139
    assert entry(response, 2)["stdout"] == ""


# -- 4. uploads and archives ------------------------------------------------------------------


def test_upload_over_max_upload_is_413(main: Server) -> None:
    try:
        response = main.post_execute({"commands": ["true"]}, os.urandom(1536 * 1024))
    except requests.ConnectionError as error:
        pytest.fail(f"the server dropped the connection instead of answering 413: {error}")
    assert response.status_code == 413, response.text
    assert "--max-upload" in response.text
    assert staging_entries(main) == []


def _hostile_archives() -> dict[str, bytes]:
    good = tgz((member("a.txt"), b"a"))
    return {
        "dotdot": tgz((member("../x"), b"x")),
        "dotdot-nested": tgz((member("dir/../../x"), b"x")),
        "absolute": tgz((member("/tmp/sk-absolute"), b"x")),
        "symlink-out": tgz((member("link", tarfile.SYMTYPE, "/etc/passwd"), None)),
        "hardlink-out": tgz((member("hard", tarfile.LNKTYPE, "/etc/passwd"), None)),
        "device": tgz((member("dev", tarfile.CHRTYPE), None)),
        "fifo": tgz((member("fifo", tarfile.FIFOTYPE), None)),
        "too-many-entries": tgz(*((member(f"f{i}"), b"") for i in range(25))),
        "too-many-bytes": tgz((member("zeros"), bytes(1536 * 1024))),
        "truncated-gzip": good[: len(good) // 2],
        "not-gzip": b"this is not an archive\n" * 10,
        "gzip-not-tar": gzip.compress(b"this is not a tar archive\n" * 40),
    }


@pytest.mark.parametrize("name", sorted(_hostile_archives()))
def test_hostile_archive_is_refused(main: Server, name: str) -> None:
    archive = _hostile_archives()[name]
    response = main.post_execute({"commands": ["ls -A"]}, archive)
    assert response.status_code == 400, response.text
    assert response.text.strip(), "a 400 must say why"
    assert "archive" in response.text.lower() or "environment" in response.text.lower()
    assert staging_entries(main) == []
    assert not Path("/tmp/sk-absolute").exists()


def test_archive_made_by_tar_is_accepted(main: Server, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "dir").mkdir(parents=True)
    (source / "a.txt").write_text("A")
    (source / "dir" / "b").write_text("B")
    archive = tmp_path / "env.tgz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(source), "."], check=True)
    listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True)
    assert set(listing.stdout.split()) == {"./", "./a.txt", "./dir/", "./dir/b"}
    response = main.execute(
        {"commands": ["cat a.txt dir/b", "find . | sort"]}, archive.read_bytes()
    )
    assert response["status"] == 0, response
    assert entry(response, 0)["stdout"] == "AB"
    assert entry(response, 1)["stdout"].splitlines() == [".", "./a.txt", "./dir", "./dir/b"]


def test_upload_files_win_over_the_saved_environment(main: Server, tmp_path: Path) -> None:
    base = main.run("echo old > f && mkdir -p d && echo old > d/g && echo keep > k", save=True)
    (tmp_path / "f").write_text("new\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "g").write_text("new\n")
    upload = build_archive([tmp_path / "f", tmp_path / "d"]).getvalue()
    response = main.execute(
        {"commands": ["cat f d/g k"], "environment": base["environment"]}, upload
    )
    assert entry(response)["stdout"] == "new\nnew\nkeep"


# -- 5. confinement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result_path", ["../x", "/etc/passwd", "link", "d", "d/", "missing", "d/../../x"]
)
def test_result_path_is_confined(main: Server, result_path: str) -> None:
    response = main.run("ln -s /etc/passwd link && mkdir d", result_path=result_path)
    assert response["status"] == -3, response
    assert "result" not in response


def test_result_path_inside_is_read(main: Server) -> None:
    response = main.run("mkdir d && printf 'x\\n' > d/r", result_path="d/r")
    assert response["status"] == 0 and response["result"] == "x\n", response


@pytest.fixture(scope="module")
def env_with_link(main: Server) -> str:
    response = main.run("ln -s /etc/passwd link && ln -s / root && echo ok > ok", save=True)
    assert response["status"] == 0, response
    uuid: str = response["environment"]
    return uuid


@pytest.mark.parametrize(
    "raw_path",
    [
        "%2e%2e/%2e%2e/etc/passwd",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "..%2f..%2fetc%2fpasswd",
        "%2fetc%2fpasswd",
        "link",
        "root/etc/passwd",
    ],
)
def test_file_download_is_confined(main: Server, env_with_link: str, raw_path: str) -> None:
    assert main.get(f"files/{env_with_link}/ok/").content == b"ok\n"
    request = requests.Request("GET", f"{main.url}files/{env_with_link}/{raw_path}/")
    prepared = main.http.prepare_request(request)
    prepared.url = f"{main.url}files/{env_with_link}/{raw_path}/"  # sent exactly as written
    response = main.http.send(prepared, timeout=10)
    assert response.status_code == 404, (response.status_code, response.text[:200])
    assert b"root:" not in response.content


# -- 6. storage -------------------------------------------------------------------------------


def test_max_storage_refuses_without_evicting(main: Server) -> None:
    earlier = main.run("echo kept > kept", save=True)
    response = main.post_execute({"commands": ["head -c 4M /dev/urandom > big"], "save": True})
    assert response.status_code == 507, response.text
    assert "--max-storage" in response.text
    download = main.get(f"environments/{earlier['environment']}/")
    assert download.status_code == 200
    assert tar_members(download.content)["kept"] == b"kept\n"


def test_unchanged_files_are_stored_once(main: Server) -> None:
    first = main.run("head -c 2M /dev/urandom > data && echo 0 > log", save=True)
    uuids = [first["environment"]]
    for index in range(5):
        response = main.run(f"echo {index} >> log", save=True, environment=uuids[-1])
        assert response["status"] == 0, response
        uuids.append(response["environment"])
    seen: set[int] = set()
    total = 0
    for uuid in uuids:
        for root, directories, files in os.walk(main.data_dir / "environments" / uuid):
            for name in directories + files:
                info = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(info.st_mode) and info.st_ino not in seen:
                    seen.add(info.st_ino)
                    total += info.st_size
    assert total < 2.5 * 1024**2, f"{total} bytes stored for six environments over one 2 MB file"
    last = main.get(f"files/{uuids[-1]}/log/")
    assert last.content == b"0\n0\n1\n2\n3\n4\n"


def test_environments_expire(start_server: Callable[..., Server]) -> None:
    server = start(start_server, "--expiration", "2", "--execute-timeout", "3", "--workers", "1")
    uuid = server.run("echo x > x", save=True)["environment"]
    assert server.get(f"environments/{uuid}/").status_code == 200
    time.sleep(3)
    assert server.get(f"environments/{uuid}/").status_code == 404
    assert server.get(f"files/{uuid}/x/").status_code == 404
    response = server.post_execute({"commands": ["true"], "environment": uuid})
    assert response.status_code == 404
    assert response.text == f"No environment with UUID '{uuid}' found"
    server.stop()
    restarted = start(start_server, "--expiration", "2", data_dir=server.data_dir)
    assert not (restarted.data_dir / "environments" / uuid).exists()
    assert not (restarted.data_dir / "environments" / f"{uuid}.json").exists()
    assert restarted.get(f"environments/{uuid}/").status_code == 404


# -- 7. shutdown ------------------------------------------------------------------------------


def test_shutdown_kills_running_commands(start_server: Callable[..., Server]) -> None:
    server = start(start_server, "--execute-timeout", "30", "--workers", "2")
    pid = server.pid
    info_file = server.embedded._scratch / "server.json"
    assert info_file.exists()
    mark = f"30.{random.randrange(10**8, 10**9)}"
    outcome: list[Any] = []

    def execute() -> None:
        try:
            outcome.append(server.post_execute({"commands": [f"sleep {mark}"]}))
        except requests.RequestException as error:
            outcome.append(error)

    client = threading.Thread(target=execute, daemon=True)
    client.start()
    assert wait_until(lambda: bool(processes_matching(mark)), 5), "the command never started"
    tree = descendants(pid)
    assert tree
    process = server.embedded.process
    assert process is not None
    # Server.stop(): SIGTERM, then SIGKILL if the server is still there after 10 s.
    stopper = threading.Thread(target=server.stop, daemon=True)
    started = time.monotonic()
    stopper.start()
    marker_gone = gone(mark, 5)
    marker_time = time.monotonic() - started
    stopper.join(15)
    exit_time = time.monotonic() - started

    problems = []
    if not marker_gone:
        problems.append(f"the command still ran {marker_time:.1f} s after SIGTERM")
    if process.returncode != 0 or exit_time >= 5:
        problems.append(
            f"the server ended {exit_time:.1f} s after SIGTERM with status {process.returncode}"
            " (negative: killed by Server.stop's SIGKILL fallback)"
        )
    if not wait_until(lambda: not living(tree), 5):
        problems.append(f"processes of the server's tree left behind: {living(tree)}")
    if info_file.exists() or advertisement_path(pid).exists():
        problems.append("the info / advertisement file was not removed")
    assert not problems, "; ".join(problems)
    client.join(10)
    assert outcome, "the client never got an answer"


def test_not_isolated_root_launcher_ignores_the_requests_environment(
    start_server: Any, tmp_path: Path
) -> None:
    """With --isolation none, a request's PATH, LD_PRELOAD or launcher variables never reach
    the part that runs as root."""
    plain = start_server("--isolation", "none", "--workers", "1")
    target = tmp_path / "must-stay-empty"
    target.write_text("")
    answer = plain.run(
        "id -u; echo $MARKER",
        environ={
            "PATH": ".:/usr/bin:/bin",
            "SK_CGROUP_PROCS": str(target),
            "LD_PRELOAD": "/nonexistent.so",
            "MARKER": "seen",
        },
    )
    lines = answer["execution"][0]["stdout"].splitlines()
    assert lines[0] != "0" and lines[1] == "seen"
    assert target.read_text() == ""
    killed = plain.run("kill -9 $$")
    assert killed["execution"][0]["exit_code"] == 137


def test_permissions_taken_away_by_a_command_do_not_break_the_environment(
    server: Any,
) -> None:
    first = server.run("echo x > f; chmod 000 f; mkdir d; touch d/in; chmod 000 d", save=True)
    again = server.run("chmod 700 d; ls d; echo ok", environment=first["environment"], save=True)
    assert again["execution"][0]["stdout"] == "in\nok"
    assert server.get(f"environments/{again['environment']}/").status_code == 200


def test_isolation_holds_with_a_private_temporary_folder(tmp_path: Path) -> None:
    """A ``TMPDIR`` the sandbox user cannot enter (pytest's own, mode 0700 under root) must not
    stop the bubblewrap probe: the server starts isolated, not "NOT ISOLATED"."""
    from sandbox_kernel.discovery import EmbeddedServer

    private = tmp_path / "private-tmp"
    private.mkdir(mode=0o700)
    env = {**os.environ, "TMPDIR": str(private)}
    with EmbeddedServer("--isolation", "bwrap", data_dir=tmp_path / "data", env=env) as server:
        specs = requests.get(
            server.url + "specifications/",
            headers={"Authorization": f"Bearer {server.token}"},
            timeout=30,
        ).json()
    assert specs["container"]["isolation"]["isolated"] is True
