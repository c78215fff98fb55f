"""``sandbox-kernel grade`` run as a teacher runs it: a real subprocess, real kernels, a real
embedded server, on a class folder of submissions (bash programs written by cells tagged
``check:NAME``): right, wrong, crashing, untagged, not JSON, hanging, and hostile ones.

What a teacher checks: the CSV's rows and values, the statuses, that grading went on past the
broken ones, that a hostile submission gets 0 with each attempt refused in its cell, and that
nothing was written outside the expected places (the grades, and nothing at all in TMPDIR once
done). Plus the example folder of the README, a sandbox with one container (503s waited out),
a kernel killed mid-notebook, and Ctrl-C leaving no kernel behind.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from .conftest import Server
from .helpers import descendants, kernel_env, living, wait_until

CLI = [sys.executable, "-m", "sandbox_kernel.cli", "grade"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "grading"
#: What the kernel says of a refused magic (``SandboxContext.refuse_while_grading``).
REFUSED = "is disabled while grading"

SUM_TABLE = """\
run: ./sum.sh
cases:
  - {name: small, stdin: "2 3", expect: "5"}
  - {name: negative, stdin: "10 -4", expect: "6"}
  - {name: big, stdin: "1000000 2000000", expect: "3000000", points: 2, hidden: true}
"""
HELLO_TABLE = """\
run: ./hello.sh
cases:
  - {name: hello, expect: "hello"}
"""


def script(name: str, body: str) -> str:
    """A bash cell writing the executable ``name``."""
    return f"cat > {name} <<'EOF'\n#!/bin/bash\n{body}\nEOF\nchmod +x {name}"


RIGHT_SUM = script("sum.sh", "read a b; echo $((a + b))")
WRONG_SUM = script("sum.sh", "read a b; echo $((a - b))")
CRASHING_SUM = script("sum.sh", "kill -SEGV $$")
RIGHT_HELLO = script("hello.sh", "echo hello")


def code(source: str, *tags: str) -> Any:
    return new_code_cell(source, metadata={"tags": list(tags)})


def write_notebook(path: Path, *cells: Any, kernel: str = "sandbox") -> None:
    notebook = new_notebook(
        metadata={"kernelspec": {"name": kernel, "display_name": kernel, "language": "x"}}
    )
    notebook.cells = [new_markdown_cell(f"# {path.stem}"), *cells]
    nbformat.write(notebook, path)


@dataclasses.dataclass
class Graded:
    """A run of the command: its process, and the reports it wrote."""

    done: subprocess.CompletedProcess[str]
    root: Path
    seconds: float
    #: The class folder's files before grading (name: digest), when taken.
    before: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> dict[str, dict[str, str]]:
        with open(self.root / "grades.csv", newline="") as file:
            return {Path(row["notebook"]).name: row for row in csv.DictReader(file)}

    @property
    def header(self) -> list[str]:
        with open(self.root / "grades.csv", newline="") as file:
            return next(csv.reader(file))

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        document = json.loads((self.root / "grades.json").read_text())
        return {Path(entry["notebook"]).name: entry for entry in document["notebooks"]}


def grade(
    root: Path, notebooks: list[str], *options: str, env: dict[str, str], timeout: float = 600
) -> Graded:
    started = time.monotonic()
    done = subprocess.run(
        [*CLI, *notebooks, "--tests", "tests", "--output", "grades.csv", *options],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return Graded(done, root, time.monotonic() - started)


def grader_env(server: Server, scratch: Path) -> dict[str, str]:
    """The grader's environment: the server by SANDBOX_URL/TOKEN, and a private TMPDIR
    (which must be empty again when it is done)."""
    scratch.mkdir(exist_ok=True)
    return kernel_env(server.url, server.token or "", TMPDIR=str(scratch))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its content."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# -- a class: right, wrong, crashing, untagged, broken, hanging, hostile -----------------------


def hostile_cells(root: Path, server: Server) -> list[Any]:
    """Every way a submission might reach the grader's files or another sandbox; each must
    fail in its own cell. The last cells write a program that reads the hidden tables from
    the sandbox, and check it against a table of its own (which passes: never trusted)."""
    tests = root / "tests"
    return [
        code(f"%sandbox_upload {tests}"),
        code("%sandbox_upload ../tests/sum.yaml --as sum.yaml"),
        code("%sandbox_env X=1\n%sandbox_upload tests\necho after"),
        code(f"%sandbox_download --to {root} loot.txt"),
        code("%sandbox_download --to .. --force"),
        code("%sandbox_connect http://127.0.0.1:9/"),
        code(f"%sandbox_connect {server.url} --token stolen"),
        code(f"%%sandbox_check --tests {tests / 'sum.yaml'} ./sum.sh\n"),
        code("%%sandbox_check --tests ../tests/sum.yaml\n"),
        code('%%sandbox_check ./sum.sh\n- {stdin: "2 3", expect_file: ../tests/sum.yaml}\n'),
        code(f"%%python3 --check {tests / 'sum.yaml'}\nprint(5)"),
        code(
            script("sum.sh", f"cat {tests}/sum.yaml 2>/dev/null || echo no tests here"),
            "check:sum",
        ),
        code('%%sandbox_check ./sum.sh\n- {stdin: "2 3", expect: "no tests here", points: 9}\n'),
    ]


#: The refused cells of :func:`hostile_cells`, by their 1-based position (a title comes first)
#: and the feature named in the refusal.
HOSTILE_REFUSALS = {
    2: "%sandbox_upload", 3: "%sandbox_upload", 4: "%sandbox_upload",
    5: "%sandbox_download", 6: "%sandbox_download", 7: "%sandbox_connect",
    8: "%sandbox_connect", 9: "%%sandbox_check --tests", 10: "%%sandbox_check --tests",
    11: "expect_file", 12: "--check",
}  # fmt: skip


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory, server: Server) -> Graded:
    root = tmp_path_factory.mktemp("class")
    (root / "tests").mkdir()
    (root / "tests" / "sum.yaml").write_text(SUM_TABLE)
    (root / "tests" / "hello.yaml").write_text(HELLO_TABLE)
    write_notebook(
        root / "alice.ipynb",
        code("ls /no/such/folder"),  # fails: grading goes on
        code(WRONG_SUM, "check:sum"),  # checked, then checked again below: the last counts
        code(RIGHT_SUM, "check:sum"),
        code(RIGHT_HELLO, "check:hello"),
        kernel="python3",  # whatever it names, the Sandbox kernel runs it
    )
    write_notebook(root / "bob.ipynb", code(WRONG_SUM, "check:sum"), code(RIGHT_HELLO))
    write_notebook(root / "carol.ipynb", code(CRASHING_SUM, "check:sum"))
    (root / "dave.ipynb").write_text('{"cells": [{"cell_type": "code", "source": "echo')
    write_notebook(
        root / "erin.ipynb",
        code(RIGHT_HELLO, "check:hello"),
        code("sleep 1000"),
        code(RIGHT_SUM, "check:sum"),
    )
    write_notebook(root / "mallory.ipynb", *hostile_cells(root, server))
    before = snapshot(root)
    scratch = root.parent / f"{root.name}-scratch"
    names = ["alice.ipynb", "bob.ipynb", "carol.ipynb", "dave.ipynb", "erin.ipynb",
             "mallory.ipynb"]  # fmt: skip
    graded = grade(root, names, "--json", "grades.json", "--jobs", "3", "--timeout", "20",
                   env=grader_env(server, scratch))  # fmt: skip
    graded.before = before
    return graded


def test_grading_completes_with_a_row_per_notebook(classroom: Graded) -> None:
    assert classroom.done.returncode == 0, classroom.done.stderr
    assert classroom.header == ["notebook", "hello", "sum", "total", "max", "passed", "failed",
                                "status", "notes"]  # fmt: skip
    rows = classroom.rows
    assert list(rows) == [
        "alice.ipynb",
        "bob.ipynb",
        "carol.ipynb",
        "dave.ipynb",
        "erin.ipynb",
        "mallory.ipynb",
    ]  # fmt: skip  (the order given)
    assert "Grades written to grades.csv, details to grades.json" in classroom.done.stdout


def values(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[name] for name in ("hello", "sum", "total", "max", "passed", "failed",
                                        "status"))  # fmt: skip


def test_right_wrong_and_crashing_programs_are_scored(classroom: Graded) -> None:
    rows, details = classroom.rows, classroom.details
    assert values(rows["alice.ipynb"]) == ("1", "4", "5", "5", "4", "0", "ok")
    assert values(rows["bob.ipynb"]) == ("0", "0", "0", "5", "0", "4", "ok")
    assert "hello: no cell is tagged check:hello" in rows["bob.ipynb"]["notes"]
    assert values(rows["carol.ipynb"]) == ("0", "0", "0", "5", "0", "4", "ok")
    verdicts = {
        name: [(case["name"], case["verdict"]) for case in cases(details[name], "sum")]
        for name in ("alice.ipynb", "bob.ipynb", "carol.ipynb")
    }
    assert verdicts["alice.ipynb"] == [("small", "passed"), ("negative", "passed"),
                                       ("big", "passed")]  # fmt: skip
    assert verdicts["bob.ipynb"] == [("small", "wrong output"), ("negative", "wrong output"),
                                     ("big", "wrong output")]  # fmt: skip
    assert {verdict for _, verdict in verdicts["carol.ipynb"]} == {"runtime error"}
    assert details["carol.ipynb"]["questions"]["sum"]["cases"][0]["signal"] == "SIGSEGV"


def cases(entry: dict[str, Any], question: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = entry["questions"][question]["cases"]
    return found


def test_a_failing_cell_is_recorded_and_grading_goes_on(classroom: Graded) -> None:
    alice = classroom.details["alice.ipynb"]
    [failure] = alice["failed_cells"]
    assert failure["cell"] == 2  # after the title
    assert "1 cell failed (cell 2:" in classroom.rows["alice.ipynb"]["notes"]


def test_a_broken_notebook_gets_its_row(classroom: Graded) -> None:
    row = classroom.rows["dave.ipynb"]
    assert values(row) == ("0", "0", "0", "5", "0", "4", "invalid notebook")
    assert "not JSON" in row["notes"]


def test_a_hanging_notebook_is_stopped_with_what_was_graded(classroom: Graded) -> None:
    row = classroom.rows["erin.ipynb"]
    assert values(row) == ("1", "0", "1", "5", "1", "3", "timeout")
    assert "still running after 20 s" in row["notes"]
    assert "sum: its check did not run (timeout)" in row["notes"]
    assert 20 <= classroom.details["erin.ipynb"]["seconds"] < 100


def test_a_hostile_submission_gets_nothing_and_each_attempt_fails(classroom: Graded) -> None:
    row, mallory = classroom.rows["mallory.ipynb"], classroom.details["mallory.ipynb"]
    assert values(row) == ("0", "0", "0", "5", "0", "4", "ok")
    refused = {failure["cell"]: failure["evalue"] for failure in mallory["failed_cells"]}
    assert set(refused) == set(HOSTILE_REFUSALS)
    for cell, feature in HOSTILE_REFUSALS.items():
        assert feature in refused[cell] and REFUSED in refused[cell], (cell, refused[cell])
    # Its program could not read the hidden table from the sandbox: the case got its text.
    [small, *_] = mallory["questions"]["sum"]["cases"]
    assert small["verdict"] == "wrong output"
    assert "no tests here" in small["detail"]
    assert f"{len(HOSTILE_REFUSALS)} cells failed" in row["notes"]


def test_nothing_is_written_outside_the_expected_places(classroom: Graded) -> None:
    after = snapshot(classroom.root)
    assert sorted(set(after) - set(classroom.before)) == ["grades.csv", "grades.json"]
    assert {name: after[name] for name in classroom.before} == classroom.before
    assert list((classroom.root.parent / f"{classroom.root.name}-scratch").iterdir()) == []


def test_the_progress_says_how_far_it_is(classroom: Graded) -> None:
    lines = [line for line in classroom.done.stderr.splitlines() if "/6 notebooks" in line]
    assert len(lines) == 6
    assert lines[-1].startswith("6/6 notebooks · ")
    assert all(" left · " in line for line in lines[:3])  # an estimate once one is done


# -- the example folder of the README -------------------------------------------------------


def test_the_example_folder(tmp_path: Path, server: Server) -> None:
    root = tmp_path / "grading"
    shutil.copytree(EXAMPLES, root)
    names = sorted(path.name for path in root.glob("*.ipynb"))
    assert names == ["alice.ipynb", "bob.ipynb", "carol.ipynb"]
    graded = grade(root, names, "--jobs", "2", "--json", "grades.json",
                   env=grader_env(server, tmp_path / "scratch"))  # fmt: skip
    assert graded.done.returncode == 0, graded.done.stderr
    rows = graded.rows
    assert graded.header[:3] == ["notebook", "greet", "sum"]
    assert tuple(rows["alice.ipynb"][k] for k in ("greet", "sum", "total", "max")) == (
        "2", "4", "6", "6",
    )  # fmt: skip
    assert tuple(rows["bob.ipynb"][k] for k in ("greet", "sum", "total", "status")) == (
        "0", "2", "2", "ok",
    )  # fmt: skip
    assert tuple(rows["carol.ipynb"][k] for k in ("greet", "sum", "total", "status")) == (
        "0", "0", "0", "ok",
    )  # fmt: skip
    carol = graded.details["carol.ipynb"]["questions"]
    assert {case["verdict"] for case in carol["sum"]["cases"]} == {"runtime error"}
    assert carol["greet"]["detail"] == "no cell is tagged check:greet"


# -- a busy sandbox, a dead kernel, Ctrl-C --------------------------------------------------


def sleepy_class(root: Path, count: int) -> list[str]:
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "sum.yaml").write_text(SUM_TABLE)
    names = []
    for number in range(count):
        name = f"student{number}.ipynb"
        write_notebook(root / name, code("sleep 3"), code(RIGHT_SUM, "check:sum"))
        names.append(name)
    return names


def test_a_sandbox_with_one_container_is_waited_out(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    """Three kernels, one container: the server answers 503 after waiting 2 s for it, and
    the cells are sent again until it is free. Every notebook gets its full score."""
    lonely = start_server("--workers", "1")
    names = sleepy_class(tmp_path, 3)
    graded = grade(tmp_path, names, "--jobs", "3", "--json", "grades.json",
                   env=grader_env(lonely, tmp_path / "scratch"))  # fmt: skip
    assert graded.done.returncode == 0, graded.done.stderr
    assert [values_of(row) for row in graded.rows.values()] == [("4", "3", "0", "ok")] * 3
    assert all(entry["failed_cells"] == [] for entry in graded.details.values())
    assert graded.seconds > 9  # the three sleeps ran one after the other


def values_of(row: dict[str, str]) -> tuple[str, ...]:
    return (row["sum"], row["passed"], row["failed"], row["status"])


def kernels_of(pid: int) -> list[int]:
    """The Sandbox kernels below ``pid``."""
    found = []
    for child in descendants(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sandbox_kernel" in command and b"-f" in command:
            found.append(child)
    return found


def start_grading(root: Path, names: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *names, "--tests", "tests", "--output", "grades.csv"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_kernel_that_dies_gets_its_row_and_grading_goes_on(
    tmp_path: Path, server: Server
) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "sum.yaml").write_text(SUM_TABLE)
    write_notebook(tmp_path / "doomed.ipynb", code(RIGHT_SUM, "check:sum"), code("sleep 60"))
    write_notebook(tmp_path / "fine.ipynb", code(RIGHT_SUM, "check:sum"))
    process = start_grading(tmp_path, ["doomed.ipynb", "fine.ipynb"],
                            grader_env(server, tmp_path / "scratch"))  # fmt: skip
    try:
        assert wait_until(lambda: bool(kernels_of(process.pid)), timeout=60)
        [kernel] = kernels_of(process.pid)
        time.sleep(5)  # into its sleep
        os.kill(kernel, signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    with open(tmp_path / "grades.csv", newline="") as file:
        rows = {row["notebook"]: row for row in csv.DictReader(file)}
    assert rows["doomed.ipynb"]["status"] == "kernel died"
    assert "the kernel died (killed by SIGKILL" in rows["doomed.ipynb"]["notes"]
    assert rows["doomed.ipynb"]["sum"] == "4"  # checked before it died
    assert (rows["fine.ipynb"]["status"], rows["fine.ipynb"]["sum"]) == ("ok", "4")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_stopping_the_grader_leaves_no_kernel(
    tmp_path: Path, server: Server, stop: signal.Signals
) -> None:
    names = sleepy_class(tmp_path, 4)
    for name in names:  # hang, so that the kernels are there when the signal comes
        write_notebook(tmp_path / name, code("sleep 1000"))
    scratch = tmp_path / "scratch"
    process = start_grading(tmp_path, [*names, "--jobs", "2"], grader_env(server, scratch))
    try:
        assert wait_until(lambda: len(kernels_of(process.pid)) == 2, timeout=60)
        kernels = kernels_of(process.pid)
        time.sleep(2)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "grading stopped, kernels killed; no grades were written" in stderr
    assert wait_until(lambda: not living(kernels), timeout=10), living(kernels)
    assert not (tmp_path / "grades.csv").exists()
    assert list(scratch.iterdir()) == []


def test_kernels_end_with_a_grader_killed_outright(tmp_path: Path, server: Server) -> None:
    """SIGKILL cannot be caught: the kernels see their parent gone and stop themselves."""
    names = sleepy_class(tmp_path, 2)
    for name in names:
        write_notebook(tmp_path / name, code("sleep 1000"))
    process = start_grading(tmp_path, [*names, "--jobs", "2"],
                            grader_env(server, tmp_path / "scratch"))  # fmt: skip
    try:
        assert wait_until(lambda: len(kernels_of(process.pid)) == 2, timeout=60)
        kernels = kernels_of(process.pid)
        time.sleep(2)
    finally:
        process.kill()
        process.communicate(timeout=60)
    assert wait_until(lambda: not living(kernels), timeout=30), living(kernels)
