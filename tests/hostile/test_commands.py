"""Hostile commands: what a user can make ``execute/`` run.

Each command case runs after :meth:`Hostile.attack` (writes by absolute path to the host's
canary and to the read-only system, which must all fail) and is then checked by the harness:
no process left, nothing written outside, the server still serving.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ..conftest import processes_matching, wait_until
from .conftest import (
    CPU_LIMIT,
    EXECUTE_TIMEOUT,
    MAX_OUTPUT,
    MAX_PROCESSES,
    WORKDIR_QUOTA,
    Answer,
    Hostile,
    MiB,
    make_hostile,
    stop_and_check,
)

Check = Callable[[Answer, str], None]


def timed_out(seconds: float, commands: int = 1) -> Check:
    """The documented answer to a command killed by its own wall-clock timeout."""

    def check(answer: Answer, marker: str) -> None:
        assert answer.json["status"] == -2, answer.text
        assert len(answer.json["execution"]) == commands, "the run must stop at the timeout"
        entry = answer.entry()
        assert entry["exit_code"] == -2
        assert entry["stdout"] == ""
        assert entry["stderr"] == f"Command timed out after {seconds} seconds\n"
        assert entry["time"] <= seconds + 0.25, "the kill must be prompt"

    return check


def endless_output(answer: Answer, marker: str) -> None:
    entry = answer.entry()
    # Never SIGPIPE (141) for its output: `yes` runs on until its CPU limit kills it (137).
    assert entry["exit_code"] == 137, entry["stderr"]
    # The cap counts the answer's JSON text: each "\n" takes two characters there.
    assert MAX_OUTPUT - 1024 < len(json.dumps(entry["stdout"])) - 2 <= MAX_OUTPUT
    assert entry["stderr"].endswith(f"[sandbox] output cut after {MAX_OUTPUT} (--max-output)")
    assert entry["time"] < 2 * CPU_LIMIT + 1


def output_before_timeout(answer: Answer, marker: str) -> None:
    assert answer.json["status"] == -2
    entry = answer.entry()
    assert entry["stdout"] == f"before {marker}"
    assert entry["stderr"].endswith("Command timed out after 0.5 seconds\n")


def non_utf8_output(answer: Answer, marker: str) -> None:
    assert answer.json["status"] == 3
    entry = answer.entry()
    assert (entry["exit_code"], entry["stdout"], entry["stderr"]) == (
        3,
        "a\ufffd\ufffdb",
        "c\ufffd",
    )


def non_utf8_result(answer: Answer, marker: str) -> None:
    assert answer.json["status"] == -4
    assert "result" not in answer.json
    assert answer.entry()["exit_code"] == 0


def busy_loop(answer: Answer, marker: str) -> None:
    entry = answer.entry()
    # RLIMIT_CPU (--cpu-limit 1): SIGXCPU (152) or SIGKILL (137), long before the 3 s budget.
    assert entry["exit_code"] in (137, 152), entry
    assert answer.json["status"] == entry["exit_code"]
    assert 0.8 < entry["time"] < EXECUTE_TIMEOUT


def stopped_then_continued(answer: Answer, marker: str) -> None:
    first, second = answer.json["execution"]
    assert first["exit_code"] == -2
    assert first["stderr"] == "Command timed out after 0.5 seconds\n"
    assert (second["exit_code"], second["stdout"]) == (0, "after")
    assert answer.json["status"] == 0


def stdin_at_eof(answer: Answer, marker: str) -> None:
    assert answer.json["status"] == 0
    assert [entry["stdout"] for entry in answer.json["execution"]] == ["", "read=1", "0"]
    assert all(entry["time"] < 1 for entry in answer.json["execution"])


def huge_file(answer: Answer, marker: str) -> None:
    python, head, size = answer.json["execution"]
    assert python["exit_code"] == 1 and "File too large" in python["stderr"], python
    assert head["exit_code"] != 0, head  # SIGXFSZ
    assert int(size["stdout"]) == WORKDIR_QUOTA, "the file stops at the quota"


def tmp_is_capped(answer: Answer, marker: str) -> None:
    tmp, shm, listing = answer.json["execution"]
    for entry in (tmp, shm):
        assert entry["exit_code"] != 0
        assert "No space left on device" in entry["stderr"], entry
    assert listing["stdout"].split() == [str(3 * MiB)] * 2, "the first file fits"


def memory_hog(answer: Answer, marker: str) -> None:
    entry = answer.entry()
    assert entry["exit_code"] == 137, entry
    assert "memory limit of 64.0 MiB reached" in entry["stderr"]


def network_fails_fast(answer: Answer, marker: str) -> None:
    for entry in answer.json["execution"]:
        assert entry["exit_code"] != 0, entry
        assert entry["time"] < 1, entry
        assert "refused" in entry["stderr"] or "unreachable" in entry["stderr"], entry


def host_not_readable(answer: Answer, marker: str) -> None:
    entry = answer.entry()
    assert entry["exit_code"] != 0
    assert "No such file or directory" in entry["stderr"]


def budget_stops_many_commands(answer: Answer, marker: str) -> None:
    execution = answer.json["execution"]
    assert answer.json["status"] == -2
    assert execution[-1]["exit_code"] == -2
    assert all(entry["exit_code"] == 0 for entry in execution[:-1])
    assert answer.json["total_time"] < 4.5


@dataclasses.dataclass(frozen=True)
class Run:
    """One hostile run: ``commands`` (``{m}`` is the case's marker, ``{port}`` the server's),
    extra ``config`` keys, and the check of the documented answer."""

    name: str
    commands: list[Any]
    check: Check
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


RUNS = [
    Run("yes-endless-output", ["yes {m}"], endless_output),
    Run(
        "output-before-timeout",
        [{"command": "echo before {m}; sleep {m}", "timeout": 0.5}],
        output_before_timeout,
    ),
    Run("non-utf8-output", ["printf 'a\\xff\\xfeb'; printf 'c\\xc3' >&2; exit 3"], non_utf8_output),
    Run(
        "non-utf8-result-file",
        ["printf 'ok\\xff{m}' > result"],
        non_utf8_result,
        {"result_path": "result"},
    ),
    Run("busy-loop-cpu-limit", [": {m}; while :; do :; done"], busy_loop),
    Run("sleep-wall-timeout", [{"command": "sleep {m}", "timeout": 0.5}], timed_out(0.5)),
    Run(
        "fifo-nobody-writes",
        [{"command": "mkfifo f{m} && cat f{m}", "timeout": 0.5}, "echo never"],
        timed_out(0.5),
    ),
    Run(
        "kill-stop-0",
        [{"command": ": {m}; kill -STOP 0", "timeout": 0.5}, "echo never"],
        timed_out(0.5),
    ),
    Run(
        "kill-stop-0-then-next-command",
        [{"command": "-: {m}; kill -STOP 0", "timeout": 0.5}, "echo after"],
        stopped_then_continued,
    ),
    Run(
        "stdin-is-at-eof",
        ["cat", "read line; echo read=$?", "python3 -c 'import sys; print(len(sys.stdin.read()))'"],
        stdin_at_eof,
    ),
    Run(
        "one-huge-file",
        [
            "-python3 -c \"open('big{m}', 'wb').write(bytes(4 * 1024 * 1024 + 65536))\"",
            "-head -c 4160K /dev/zero > big{m}",
            "stat -c %s big{m}",
        ],
        huge_file,
    ),
    Run(
        "tmp-and-shm-are-capped",
        [
            "-head -c 3M /dev/zero > /tmp/a{m}; head -c 3M /dev/zero > /tmp/b{m}",
            "-head -c 3M /dev/zero > /dev/shm/a{m}; head -c 3M /dev/zero > /dev/shm/b{m}",
            "stat -c %s /tmp/a{m} /dev/shm/a{m}",
        ],
        tmp_is_capped,
    ),
    Run("memory-hog", ["python3 -c 'x = bytearray(80 * 1024 * 1024)' {m}"], memory_hog),
    Run(
        "network-to-127.0.0.1",
        [
            "-: {m}; echo > /dev/tcp/127.0.0.1/{port}",
            "-python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 5)\"",
        ],
        network_fails_fast,
    ),
    Run("read-the-host-canary", ["cat {canary}/canary.txt"], host_not_readable),
    Run("twenty-thousand-commands", ["true"] * 20000, budget_stops_many_commands),
]


def _format(item: Any, hostile: Hostile, marker: str) -> Any:
    values = {"m": marker, "port": hostile.port, "canary": hostile.canary}
    if isinstance(item, str):
        return item.format(**values)
    return {**item, "command": item["command"].format(**values)}


@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_hostile_run(hostile: Hostile, trial: Callable[..., None], run: Run) -> None:
    def case(marker: str) -> None:
        commands = [_format(item, hostile, marker) for item in run.commands]
        run.check(hostile.execute({"commands": commands, **run.config}, marker), marker)

    trial(case)


# -- cases that need more than one request -------------------------------------------------------


def test_fork_bomb(hostile: Hostile, trial: Callable[..., None]) -> None:
    """The pids cgroup holds: at most --max-processes at once, and the host can still fork."""

    def case(marker: str) -> None:
        peak = 0
        host_forks: list[int] = []
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(processes_matching(marker)))
                # While the bomb runs (a scan of /proc under load may see few of them).
                if len(host_forks) < 3 and peak > MAX_PROCESSES / 4:
                    host_forks.append(subprocess.run(["true"], timeout=5).returncode)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            bash = hostile.execute(
                {"commands": [{"command": f":(){{ :|:& }};:; sleep {marker}", "timeout": 1}]},
                marker,
            )
            python = hostile.execute(
                {
                    "commands": [
                        f"python3 -c 'import os\nwhile True: os.fork()' {marker}",
                    ]
                },
                marker,
            )
        finally:
            done.set()
            watcher.join(5)
        entry = bash.entry()
        assert entry["exit_code"] == -2, entry
        assert "fork: retry: Resource temporarily unavailable" in entry["stderr"]
        assert entry["time"] < 1.3
        # The Python bomb dies of the pids cap (its fork raises) or of the memory cap.
        stderr = python.entry()["stderr"]
        assert python.entry()["exit_code"] in (1, 137), python.entry()
        assert "BlockingIOError" in stderr or "memory limit" in stderr, stderr
        assert 0 < peak <= MAX_PROCESSES, f"{peak} processes of the bomb at once"
        assert host_forks and host_forks == [0] * len(host_forks), "the host could not fork"

    trial(case)


def test_daemons_do_not_survive_their_command(hostile: Hostile, trial: Callable[..., None]) -> None:
    """setsid, double fork, nohup and a stopped child: all running when the command ends, all
    gone by the time the answer arrives."""

    def case(marker: str) -> None:
        # Count, from inside, the processes whose argv is "sleep <marker>" (the bracket keeps
        # grep's own argv from matching), waiting until the four are there.
        count = f"cat /proc/[0-9]*/cmdline | tr '\\0' '\\n' | grep -cx '[{marker[0]}]{marker[1:]}'"
        command = f"""
            setsid bash -c 'bash -c "sleep {marker} &" &' </dev/null >/dev/null 2>&1
            (sleep {marker} &)
            nohup sleep {marker} >/dev/null 2>&1 &
            sleep {marker} & stopped=$!
            until [ "$(tr '\\0' ' ' < /proc/$stopped/cmdline)" = "sleep {marker} " ]; do
                sleep 0.01
            done
            kill -STOP $stopped
            for i in $(seq 200); do n=$({count}); [ "$n" = 4 ] && break; sleep 0.01; done
            echo running $n; grep State: /proc/$stopped/status
        """
        answer = hostile.execute({"commands": [command]}, marker)
        assert answer.entry()["stdout"] == "running 4\nState:\tT (stopped)", answer.entry()
        assert wait_until(lambda: not processes_matching(marker), 0.5), (
            f"daemons outlived the answer: {processes_matching(marker)}"
        )

    trial(case)


def test_daemon_writing_while_the_run_is_saved(
    hostile: Hostile, trial: Callable[..., None]
) -> None:
    """A daemon that keeps appending to a file cannot change the environment once saved."""

    def case(marker: str) -> None:
        command = (
            f"setsid bash -c 'while :; do echo {marker} >> log; sleep 0.01; done' "
            "</dev/null >/dev/null 2>&1 & until [ -s log ]; do sleep 0.01; done"
        )
        answer = hostile.execute({"commands": [command], "save": True}, marker)
        uuid = answer.json["environment"]
        first = hostile.server.get(f"files/{uuid}/log/")
        time.sleep(0.3)
        second = hostile.server.get(f"files/{uuid}/log/")
        assert first.status_code == 200 and first.content, first.text
        assert second.content == first.content, "the saved environment changed after the run"

    trial(case)


def test_tmp_shm_and_home_visibility(hostile: Hostile, trial: Callable[..., None]) -> None:
    """/tmp and /dev/shm are private to a run (not seen by a run going on at the same time, nor
    by the next, nor by environments made from the run); the working directory ($HOME)
    persists only in environments made from that run."""

    def case(marker: str) -> None:
        look = (
            f"for f in /tmp/t{marker} /dev/shm/s{marker} $HOME/h{marker}; do "
            'if [ -e "$f" ]; then echo "seen $f"; fi; done; echo checked'
        )
        other = hostile.execute({"commands": ["echo unrelated > u"], "save": True}, marker)
        writer: list[Answer] = []
        thread = threading.Thread(
            target=lambda: writer.append(
                hostile.execute(
                    {
                        "commands": [
                            f"echo t > /tmp/t{marker}; echo s > /dev/shm/s{marker}; "
                            f"echo h > ~/h{marker}; sleep 0.8; "
                            f"ls /tmp/t{marker} /dev/shm/s{marker} ~/h{marker}"
                        ],
                        "save": True,
                    },
                    marker,
                )
            ),
            daemon=True,
        )
        thread.start()
        try:
            time.sleep(0.4)
            meanwhile = hostile.execute({"commands": [look]}, marker)
        finally:
            thread.join(10)
        assert meanwhile.entry()["stdout"] == "checked", "a concurrent run saw the files"
        [written] = writer
        assert written.entry()["stdout"].split() == [
            f"/dev/shm/s{marker}",
            f"/home/student/h{marker}",
            f"/tmp/t{marker}",
        ]
        uuid = written.json["environment"]
        fresh = hostile.execute({"commands": [look]}, marker)
        assert fresh.entry()["stdout"] == "checked", "the next run saw the files"
        derived = hostile.execute({"commands": [look], "environment": uuid}, marker)
        assert derived.entry()["stdout"] == f"seen /home/student/h{marker}\nchecked"
        unrelated = hostile.execute(
            {"commands": [look], "environment": other.json["environment"]}, marker
        )
        assert unrelated.entry()["stdout"] == "checked"
        download = hostile.server.get(f"files/{uuid}/h{marker}/")
        assert download.content == b"h\n"

    trial(case)


def test_many_small_files_over_the_workdir_quota(
    hostile: Hostile, trial: Callable[..., None]
) -> None:
    """No single file is too big, together they are: caught at save time, 507, nothing saved
    (documented: the quota is checked, not enforced by the file system)."""

    def case(marker: str) -> None:
        before = hostile.saved_environments()
        command = f"for i in 1 2 3 4 5; do head -c 900K /dev/urandom > s{marker}-$i; done"
        answer = hostile.execute({"commands": [command], "save": True}, marker)
        assert answer.status == 507, answer.text
        assert "--workdir-quota" in answer.text and "Nothing was saved" in answer.text
        assert hostile.saved_environments() == before

    trial(case)


@pytest.fixture(scope="module")
def small_storage(
    start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """A server whose --max-storage (6M) is filled by two saves of 3.5 MB."""
    harness = make_hostile(start_server, tmp_path_factory, "--max-storage", "6M")
    yield harness
    stop_and_check(harness)


def test_filling_the_storage_quota(small_storage: Hostile) -> None:
    def case(marker: str) -> None:
        fill = f"head -c 3500K /dev/urandom > fill{marker}"
        first = small_storage.execute({"commands": [fill], "save": True}, marker)
        kept = first.json["environment"]
        second = small_storage.execute({"commands": [fill], "save": True}, marker)
        assert second.status == 507, second.text
        assert "--max-storage" in second.text and "nothing was evicted" in second.text
        # Nothing was evicted, and an environment that adds nothing can still be saved.
        assert small_storage.saved_environments() == {kept}
        download = small_storage.server.get(f"environments/{kept}/")
        assert download.status_code == 200
        again = small_storage.execute(
            {"commands": [f"test -s fill{marker}"], "environment": kept, "save": True}, marker
        )
        assert again.json["status"] == 0

    small_storage.trial("commands: filling_the_storage_quota", case)
