"""One request or one user cannot exhaust the server: the whole answer's output, the result
file, inodes as well as bytes, the time a request may hold a slot, trees of any depth, uploads
waiting for a slot, the work area, and full matches of validated strings.

Each case runs through the hostile harness (:meth:`Hostile.trial`): after it, the server still
serves, nothing is left behind and nothing was written outside.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox_kernel.server import trees

from ..conftest import Server, processes_matching, wait_until
from .conftest import (
    EXECUTE_TIMEOUT,
    MAX_OUTPUT,
    Hostile,
    KiB,
    make_hostile,
    stop_and_check,
)

WORKDIR_INODES = 300
MAX_RESULT = 16 * KiB
CUT_LINE = f"[sandbox] output cut after {MAX_OUTPUT} (--max-output)"


def escaped(text: str) -> int:
    """The characters ``text`` takes in a JSON answer."""
    return len(json.dumps(text)) - 2


@pytest.fixture(scope="module")
def tight(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """The hostile caps, with few inodes per run and a small result file."""
    harness = make_hostile(
        start_server, tmp_path_factory,
        "--workdir-inodes", str(WORKDIR_INODES), "--max-result", f"{MAX_RESULT // KiB}K",
    )  # fmt: skip
    yield harness
    stop_and_check(harness)


# -- the output of a whole request ---------------------------------------------------------------


def output_total(answer: dict[str, Any]) -> int:
    return sum(escaped(e["stdout"]) + escaped(e["stderr"]) for e in answer["execution"])


OUTPUT_RUNS = {
    # 60 commands of 1 MiB of bytes that are not UTF-8: 6 characters each once escaped.
    "many-commands-of-invalid-utf8": [
        "-head -c 1048576 /dev/zero | tr '\\0' '\\377'; head -c 1048576 /dev/zero | "
        "tr '\\0' '\\376' >&2"
    ]
    * 60,
    "control-characters": ["head -c 300000 /dev/zero"],
    "stdout-and-stderr-interleaved": ["for i in $(seq 30000); do echo out$i; echo err$i >&2; done"],
    "one-huge-line-then-more-commands": ["-head -c 5000000 /dev/zero | tr '\\0' a", "echo after"],
}


@pytest.mark.parametrize("name", list(OUTPUT_RUNS))
def test_output_of_the_whole_answer_is_bounded(
    tight: Hostile, name: str, request: pytest.FixtureRequest
) -> None:
    def case(marker: str) -> None:
        started = time.monotonic()
        answer = tight.execute({"commands": OUTPUT_RUNS[name]}, marker)
        data = answer.json
        assert output_total(data) <= MAX_OUTPUT + len(data["execution"]) * (len(CUT_LINE) + 60)
        assert len(answer.text) < MAX_OUTPUT + 64 * KiB, "the answer itself is bounded"
        cut = [e for e in data["execution"] if e["stderr"].endswith(CUT_LINE)]
        assert cut, "the command where the cut happened says so, last in its stderr"
        assert time.monotonic() - started < 4 * EXECUTE_TIMEOUT

    tight.trial(f"resources: output_{name}", case)


def test_output_under_the_cap_is_not_cut(tight: Hostile) -> None:
    def case(marker: str) -> None:
        half = MAX_OUTPUT // 2 - 100
        answer = tight.execute({"commands": [f"head -c {half} /dev/zero | tr '\\0' x"]}, marker)
        entry = answer.entry()
        assert len(entry["stdout"]) == half and CUT_LINE not in entry["stderr"]

    tight.trial("resources: output_under_the_cap", case)


def test_flooding_program_is_never_killed_for_its_output(tight: Hostile) -> None:
    """Past the cap output is read and dropped: the program runs to its end (no SIGPIPE)."""

    def case(marker: str) -> None:
        flood = (
            "python3 -c \"import sys; sys.stdout.write('x' * 4000000); sys.stdout.flush(); "
            f"open('done{marker}', 'w').write('finished')\""
        )
        answer = tight.execute({"commands": [flood, f"cat done{marker}"]}, marker)
        first, second = answer.json["execution"]
        assert first["exit_code"] == 0, first["stderr"]
        assert first["stderr"] == CUT_LINE
        assert second["stdout"] == "", "nothing is kept after the cap, not even a short line"
        assert second["stderr"] == CUT_LINE

    tight.trial("resources: flooding_program_not_killed", case)


@pytest.mark.parametrize(("size", "status"), [(MAX_RESULT, 0), (MAX_RESULT + 1, -1)])
def test_result_file_has_its_own_bound(tight: Hostile, size: int, status: int) -> None:
    """``result`` is not counted with the output; past ``--max-result`` it is not returned."""

    def case(marker: str) -> None:
        config = {
            "commands": [f"head -c {size} /dev/zero | tr '\\0' r > result{marker}"],
            "result_path": f"result{marker}",
        }
        data = tight.execute(config, marker).json
        assert data["status"] == status
        assert (len(data.get("result", "")) == size) == (status == 0)

    tight.trial(f"resources: result_file_of_{size}_bytes", case)


# -- inodes ---------------------------------------------------------------------------------------

INODE_RUNS = {
    "empty-files": f"touch f{{1..{WORKDIR_INODES + 50}}}",
    "folders": f"mkdir d{{1..{WORKDIR_INODES + 50}}}",
    "symlinks": f"for i in $(seq {WORKDIR_INODES + 50}); do ln -s nowhere l$i; done",
    "nested-folders": f"mkdir -p $(printf 'a/%.0s' $(seq {WORKDIR_INODES + 50}))",
}


@pytest.mark.parametrize("name", list(INODE_RUNS))
def test_workdir_inodes(tight: Hostile, name: str) -> None:
    def case(marker: str) -> None:
        before = tight.saved_environments()
        answer = tight.execute({"commands": [INODE_RUNS[name]], "save": True}, marker)
        assert answer.status == 507, answer.text
        assert "--workdir-inodes" in answer.text and "Nothing was saved" in answer.text
        assert tight.saved_environments() == before

    tight.trial(f"resources: workdir_inodes_{name}", case)


def test_workdir_inodes_control(tight: Hostile) -> None:
    def case(marker: str) -> None:
        answer = tight.execute(
            {"commands": [f"touch f{{1..{WORKDIR_INODES - 20}}}"], "save": True}, marker
        )
        assert answer.json["status"] == 0 and answer.json["environment"]

    tight.trial("resources: workdir_inodes_under_the_quota", case)


@pytest.fixture(scope="module")
def few_inodes(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """A server whose --max-storage-inodes (900) is filled by two saves of 500 files."""
    harness = make_hostile(start_server, tmp_path_factory, "--max-storage-inodes", "900",
                           "--workdir-inodes", "1000")  # fmt: skip
    yield harness
    stop_and_check(harness)


def test_storage_inodes(few_inodes: Hostile) -> None:
    def case(marker: str) -> None:
        fill = f"mkdir d{marker} && touch d{marker}/f{{1..500}}"
        first = few_inodes.execute({"commands": [fill], "save": True}, marker)
        kept = first.json["environment"]
        second = few_inodes.execute({"commands": [fill], "save": True}, marker)
        assert second.status == 507, second.text
        assert "--max-storage-inodes" in second.text and "nothing was evicted" in second.text
        assert few_inodes.saved_environments() == {kept}
        # Linked, unchanged files cost no new inodes but their folders: still within room.
        again = few_inodes.execute(
            {"commands": ["true"], "environment": kept, "save": True}, marker
        )
        assert again.status == 507 or again.json["status"] == 0

    few_inodes.trial("resources: storage_inodes", case)


# -- the time a request holds a slot ------------------------------------------------------------

BUDGET_RUNS = {
    "1500-tiny-timeouts": [{"command": "-sleep 5", "timeout": 0.001}] * 1500,
    "300-stopped-shells": [{"command": "-kill -STOP $$", "timeout": 0.01}] * 300,
    "200-short-sleeps": [{"command": "-sleep 1", "timeout": 0.05}] * 200,
}


@pytest.mark.parametrize("name", list(BUDGET_RUNS))
def test_time_budget_includes_what_commands_cause(tight: Hostile, name: str) -> None:
    """Each timeout replaces the sandbox; that counts against the budget too, so a request
    cannot hold its slot past execute_timeout + a few seconds."""

    def case(marker: str) -> None:
        started = time.monotonic()
        answer = tight.execute({"commands": BUDGET_RUNS[name]}, marker)
        elapsed = time.monotonic() - started
        assert elapsed < EXECUTE_TIMEOUT + 5, f"the request held its slot {elapsed:.1f} s"
        entries = answer.json["execution"]
        assert len(entries) == len(BUDGET_RUNS[name])
        assert all(entry["exit_code"] == -2 for entry in entries)

    tight.trial(f"resources: time_budget_{name}", case)


# -- trees of any depth ----------------------------------------------------------------------------

DEEP = {
    "1500-levels": "import os\nfor _ in range(1500):\n    os.mkdir('d'); os.chdir('d')\n"
    "open('bottom', 'w').write('deep')",
    # 300 levels of 200 characters: a path of 60,000 characters, far beyond PATH_MAX.
    "300-long-names": "import os\nfor _ in range(300):\n"
    "    os.mkdir('n' * 200); os.chdir('n' * 200)\n"
    "open('bottom', 'w').write('deep'); os.symlink('bottom', 'link')",
}


@pytest.fixture(scope="module")
def roomy(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    harness = make_hostile(start_server, tmp_path_factory, "--workdir-inodes", "5000")
    yield harness
    stop_and_check(harness)
    # Its deep environments: pytest's own clean-up of old temporary folders would recurse.
    trees.remove_quietly(harness.server.data_dir)


def make_deep(hostile: Hostile, marker: str, name: str) -> str:
    script = DEEP[name].replace("'", "'\\''")
    answer = hostile.execute({"commands": [f"python3 -c '{script}'"], "save": True}, marker)
    assert answer.json["status"] == 0, answer.text
    uuid: str = answer.json["environment"]
    return uuid


@pytest.mark.parametrize("name", list(DEEP))
def test_deep_trees_are_saved_carried_downloaded_and_removed(roomy: Hostile, name: str) -> None:
    def case(marker: str) -> None:
        uuid = make_deep(roomy, marker, name)
        count = "find . -name bottom | wc -l; find . -depth | wc -l"
        again = roomy.execute({"commands": [count], "environment": uuid, "save": True}, marker)
        assert again.entry()["stdout"].split()[0] == "1"
        download = roomy.server.get(f"environments/{uuid}/")
        assert download.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
            names = archive.getnames()
        assert any(n.endswith("/bottom") for n in names) and max(map(len, names)) > 3000

    roomy.trial(f"resources: deep_tree_{name}", case)


def test_deep_tree_in_tmp(roomy: Hostile) -> None:
    def case(marker: str) -> None:
        script = DEEP["300-long-names"].replace("'", "'\\''")
        answer = roomy.execute({"commands": [f"cd /tmp && python3 -c '{script}'"]}, marker)
        assert answer.json["status"] == 0

    roomy.trial("resources: deep_tree_in_tmp", case)


def _deep_tree(root: Path, levels: int, name: str) -> None:
    """A tree of ``levels`` folders under ``root``, made by descriptor (paths too long)."""
    root.mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)


def test_server_with_deep_trees_in_its_data_dir(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """A data dir holding 1,500-level trees (an expired environment, a crashed server's
    working and staging folders): the server starts, serves, sweeps them and stops."""
    data = tmp_path / "data"
    dead_pid = "999999999"
    expired = "0e8c5995-7049-4b04-8440-5d9d914360fc"
    _deep_tree(data / "environments" / expired, 1500, "e" * 100)
    (data / "environments" / f"{expired}.json").write_text(json.dumps({"expire": 1}))
    _deep_tree(data / "staging" / dead_pid / "x", 1500, "s")
    _deep_tree(data / "work" / dead_pid / "w", 1500, "w" * 50)
    try:
        server = start_server("--workers", "1", data_dir=data)
        answer = server.run("echo alive")
        assert answer["execution"][0]["stdout"] == "alive"
        for gone in (f"environments/{expired}", f"staging/{dead_pid}", f"work/{dead_pid}"):
            assert not (data / gone).exists(), f"{gone} was not removed"
        process = server.embedded.process
        server.stop()
        assert process is not None and process.returncode == 0
    finally:  # pytest's own clean-up recurses, and would fail on what is left
        for left in (f"environments/{expired}", f"staging/{dead_pid}", f"work/{dead_pid}"):
            trees.remove_quietly(data / left)


# -- uploads wait for a slot ---------------------------------------------------------------


def small_archive(marker: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(f"up{marker}")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"up\n"))
    return buffer.getvalue()


def test_uploads_are_unpacked_only_in_a_slot(tight: Hostile) -> None:
    """Both slots busy: uploads wait on disk (at most two per slot) and are not unpacked;
    more get 503 at once, before anything is unpacked."""

    def case(marker: str) -> None:
        url = tight.server.url + "execute/"
        headers = {"Authorization": f"Bearer {tight.server.token}"}

        def post(config: dict[str, Any], archive: bytes | None = None) -> tuple[int, float]:
            files: dict[str, Any] = {"config": (None, json.dumps(config))}
            if archive is not None:
                files["environment"] = ("e.tgz", archive, "application/gzip")
            started = time.monotonic()
            response = requests.post(url, files=files, headers=headers, timeout=30)
            return response.status_code, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            hold = {"commands": [f"sleep 2.5; true {marker}"]}
            busy = [pool.submit(post, hold) for _ in range(2)]
            assert wait_until(lambda: len(processes_matching(marker)) >= 2, 5)
            uploads = [
                pool.submit(post, {"commands": ["true"]}, small_archive(marker)) for _ in range(8)
            ]
            unpacking_seen = False
            # Watched while both holding commands run: once one ends, its slot is given back
            # a moment before its answer reaches this client, and an upload may go in.
            while len(processes_matching(marker)) >= 2:
                unpacking_seen |= bool(processes_matching("unpacker.py"))
                time.sleep(0.02)
            answers = [f.result() for f in uploads]
        assert [f.result()[0] for f in busy] == [200, 200]
        assert not unpacking_seen, "an upload was unpacked while every slot was busy"
        assert all(status in (200, 503) for status, _ in answers), answers
        refused_at_once = [took for status, took in answers if status == 503 and took < 1.0]
        assert len(refused_at_once) >= 8 - tight.workers * 2, answers

    tight.trial("resources: uploads_wait_for_a_slot", case)


# -- the work area ------------------------------------------------------------------------------


def test_work_area_taken_by_another_user(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """Folders and links another user made in advance where the work area goes (in /var/tmp,
    world-writable) never stop the server, and are neither used nor removed."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    tag = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:12]
    traps = [
        Path(f"/var/tmp/sandbox-kernel-work-{tag}"),
        Path(f"/var/tmp/sandbox-kernel-work-{tag}-999999999-trap"),
        Path(f"/var/tmp/sandbox-kernel-work-{tag}-{os.getpid()}-trap"),
    ]
    link = Path(f"/var/tmp/sandbox-kernel-work-{tag}-999999998-link")
    try:
        for trap in traps:
            trap.mkdir(mode=0o777)
            os.chown(trap, 65534, 65534)
        link.symlink_to("/etc")
        os.lchown(link, 65534, 65534)
        server = start_server("--workers", "1", data_dir=data)
        assert server.run("echo alive")["execution"][0]["stdout"] == "alive"
        saved = server.run("echo x > f", save=True)["environment"]
        assert server.run("cat f", environment=saved)["execution"][0]["stdout"] == "x"
        for trap in traps:
            assert trap.is_dir() and os.listdir(trap) == [] and trap.stat().st_uid == 65534
        assert link.is_symlink()
        server.stop()
    finally:
        for trap in traps:
            with contextlib.suppress(OSError):
                trap.rmdir()
        link.unlink(missing_ok=True)


# -- full matches --------------------------------------------------------------------------------

BAD_CONFIGS = {
    "environ-name-with-a-newline": {"commands": ["true"], "environ": {"FOO\n": "1"}},
    "environ-name-newline-then-more": {"commands": ["true"], "environ": {"FOO\nBAR": "1"}},
    "environ-name-trailing-space": {"commands": ["true"], "environ": {"FOO ": "1"}},
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_validated_strings_match_whole(tight: Hostile, name: str) -> None:
    def case(marker: str) -> None:
        response = tight.post(BAD_CONFIGS[name])
        assert response.status_code == 400, response.text
        assert "is not a valid variable name" in response.text

    tight.trial(f"resources: full_match_{name}", case)


@pytest.mark.parametrize("suffix", ["\n", "%0a", "%0A"])
def test_uuid_with_a_newline_is_unknown(tight: Hostile, suffix: str) -> None:
    def case(marker: str) -> None:
        uuid = tight.post({"commands": ["echo k > k"], "save": True}).json()["environment"]
        response = tight.post({"commands": ["cat k"], "environment": uuid + "\n"})
        assert response.status_code == 404, response.text
        assert tight.server.get(f"files/{uuid}{suffix}/k/").status_code == 404
        assert tight.server.get(f"environments/{uuid}{suffix}/").status_code == 404

    tight.trial(f"resources: uuid_with_newline_{suffix!r}", case)


@pytest.mark.parametrize("value", ["1M\n", "1M\nx", "\n"])
def test_size_options_match_whole(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sandbox_kernel.server", "--max-output", value, "--port", "0",
         "--no-advertise"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--max-output" in done.stderr
