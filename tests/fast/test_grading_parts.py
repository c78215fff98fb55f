"""The parts of ``sandbox-kernel grade`` that need no kernel: reading submissions and their
``check:NAME`` tags, the questions of ``--tests``, what is kept of a check result, the CSV and
JSON written, the progress line and its estimate, the kernel's environment, and the bad uses
that stop the command (status 2) before anything starts."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sandbox_kernel import cli
from sandbox_kernel.checking.table import load_table, parse_table
from sandbox_kernel.grading import notebooks
from sandbox_kernel.grading.notebooks import InvalidNotebook, check_names, read_submission
from sandbox_kernel.grading.progress import Progress, estimate_left, format_duration
from sandbox_kernel.grading.questions import BadTests, load_questions
from sandbox_kernel.grading.report import csv_text, json_document, write_atomically
from sandbox_kernel.grading.results import (
    CaseResult,
    CellFailure,
    NotebookResult,
    Question,
    Status,
)
from sandbox_kernel.grading.runner import kernel_command, kernel_environment, read_check
from sandbox_kernel.settings import SandboxSettings

#: nbformat warns about cells without ids (a test writes one on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:Cell is missing an id field")

SUM = Question("sum", 4.0, ("small", "negative", "big"), '{"run": "./sum", "cases": []}')
GREET = Question("greet", 2.0, ("one", "two"), '{"run": "./greet", "cases": []}')


def write_notebook(path: Path, *cells: object) -> Path:
    notebook = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Py"}})
    notebook.cells = list(cells)
    nbformat.write(notebook, path)
    return path


# -- tags and submissions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "names"),
    [
        (["check:sum"], ("sum",)),
        (["solution", " check: sum ", "check:greet"], ("sum", "greet")),
        (["check:", "checked:sum", "Check:sum"], ()),  # no name, another word, another case
        ("check:sum", ()),  # a string, not a list: not tags
        ([1, None, {"check": "sum"}, "check:x"], ("x",)),  # the strings only
        (None, ()),
    ],
)
def test_check_tags_name_the_questions(tags: object, names: tuple[str, ...]) -> None:
    assert check_names(tags) == names


def test_a_submission_gives_its_code_cells_in_order_with_their_checks(tmp_path: Path) -> None:
    path = write_notebook(
        tmp_path / "alice.ipynb",
        new_markdown_cell("# Alice"),
        new_code_cell("echo one"),
        new_code_cell("gcc sum.c -o sum", metadata={"tags": ["check:sum", "check:greet"]}),
        new_markdown_cell("the end"),
        new_code_cell("echo three", metadata={"tags": ["keep"]}),
    )
    cells = read_submission(path)
    assert [(cell.position, cell.source, cell.checks) for cell in cells] == [
        (2, "echo one", ()),
        (3, "gcc sum.c -o sum", ("sum", "greet")),
        (5, "echo three", ()),
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "the JSON is not an object"),
        (b'{"nbformat": 3, "nbformat_minor": 0, "worksheets": []}', "not an nbformat 4"),
        (b'{"cells": "none", "metadata": {}, "nbformat": 4, "nbformat_minor": 5}', "nbformat"),
        (b'{"nbformat": 4, "nbformat_minor": 5}', "not valid nbformat"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_what_is_not_a_notebook_is_said_briefly(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "broken.ipynb"
    path.write_bytes(content)
    with pytest.raises(InvalidNotebook) as raised:
        read_submission(path)
    assert reason in str(raised.value)
    assert len(str(raised.value)) < 400


def test_a_cell_that_breaks_the_schema_is_invalid(tmp_path: Path) -> None:
    notebook = json.loads(nbformat.writes(new_notebook(cells=[new_code_cell("echo")])))
    notebook["cells"][0]["source"] = {"not": "text"}
    path = tmp_path / "odd.ipynb"
    path.write_text(json.dumps(notebook))
    with pytest.raises(InvalidNotebook, match="not valid nbformat at cells/0"):
        read_submission(path)


def test_a_huge_file_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notebooks, "MAX_NOTEBOOK_BYTES", 1000)
    path = write_notebook(tmp_path / "big.ipynb", new_code_cell("echo " + "x" * 2000))
    with pytest.raises(InvalidNotebook, match="larger than 1000 B"):
        read_submission(path)


# -- questions ------------------------------------------------------------------------------


def test_questions_are_the_tables_of_the_folder_sorted(tmp_path: Path) -> None:
    (tmp_path / "sum.yaml").write_text(
        "run: ./sum\ncases:\n- {stdin: '1 2', expect: '3'}\n- {name: big, expect: '9', points: 2}\n"
    )
    (tmp_path / "greet.yaml").write_text("run: python3 main.py\ncases:\n- {expect: hi}\n")
    (tmp_path / "notes.txt").write_text("not a table")
    questions = load_questions(tmp_path)
    assert [(q.name, q.points, len(q.case_names)) for q in questions] == [
        ("greet", 1.0, 1),
        ("sum", 3.0, 2),
    ]
    assert questions[1].check_code.startswith("%%sandbox_check\n")
    assert "./sum" in questions[1].check_code


def test_expected_files_are_inlined_in_the_check(tmp_path: Path) -> None:
    (tmp_path / "big.out").write_text("4000000000\n")
    (tmp_path / "sum.yaml").write_text(
        "run: ./sum\ncases:\n- {stdin: '1 2', expect_file: big.out}\n"
    )
    [question] = load_questions(tmp_path)
    assert "4000000000" in question.table_text
    assert "big.out" not in question.table_text


def test_the_check_sent_reads_back_as_the_same_table(tmp_path: Path) -> None:
    """The kernel parses the grader's check cell as any table: every case and value must come
    back (a number written in a way YAML reads as text would fail every submission)."""
    (tmp_path / "expected.out").write_text("3\n")
    (tmp_path / "sum.yaml").write_text(
        "run: ./sum\nstop_on_failure: true\ncases:\n"
        "- {name: a, stdin: '1 2', expect_file: expected.out, compare: float, tolerance: 0.001}\n"
        "- {name: b, args: [-x, 'two words'], expect_regex: '^[0-9]+$', points: 2.5,"
        " hidden: true, timeout: 0.5, memory: 64, env: {LANG: C}}\n"
    )
    [question] = load_questions(tmp_path)

    def no_local_file(name: str) -> Path:
        raise AssertionError(f"the inlined table names a local file: {name}")

    again = parse_table(question.table_text, source="the check", resolve=no_local_file)
    table = load_table(tmp_path / "sum.yaml")
    # The same, but for the file's name: its content came inlined.
    assert again == dataclasses.replace(
        table, cases=tuple(dataclasses.replace(case, expect_file=None) for case in table.cases)
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no *.yaml table"),
        ({"sum.yaml": "- {expect: '3'}\n"}, "the table has no 'run'"),
        ({"sum.yaml": "run: ./sum\ncases:\n- {expected: '3'}\n"}, "expected"),
        ({"sum.yaml": "run: ./sum\ncases: [\n"}, "sum.yaml"),
        ({"a.yaml": "run: ./a\ncases:\n- {expect: x}\n", "b.yaml": "- {stdin: 1}\n"}, "b.yaml"),
        ({"total.yaml": "run: ./a\ncases:\n- {expect: x}\n"}, "a column of grades.csv"),
        ({"a.yaml": "run: ./a\ncases: [{expect: x}]", "b.yml": "run: ./b"}, "b.yml"),
    ],
)
def test_a_bad_table_stops_everything(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BadTests) as raised:
        load_questions(tmp_path)
    assert message in str(raised.value)


def test_a_table_this_sandbox_cannot_run_stops_everything(tmp_path: Path) -> None:
    from sandbox_kernel.grading.questions import fit_budget

    (tmp_path / "slow.yaml").write_text("run: ./main\ncases:\n- {expect: '2', timeout: 30}\n")
    questions = load_questions(tmp_path)
    fit_budget(questions, 60.0, tmp_path)  # fits the embedded server's 60 s
    with pytest.raises(BadTests, match=r"slow\.yaml: case 'case 1': its timeout of 30 s"):
        fit_budget(questions, 10.0, tmp_path)
    with pytest.raises(BadTests, match=r"at most 8\.85 s"):  # the public server's 10 s, untold
        fit_budget(questions, None, tmp_path)


def test_tests_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(BadTests, match="no such folder"):
        load_questions(tmp_path / "nowhere")


# -- check results --------------------------------------------------------------------------


def test_a_check_result_is_read_field_by_field() -> None:
    data = {
        "score": 3.5,
        "cases": [
            {"name": "small", "verdict": "passed", "points": 1, "score": 1, "time": 0.01,
             "exit_code": 0, "signal": None, "hidden": False, "detail": ""},
            {"name": "big", "verdict": "runtime error", "points": 2, "score": 0, "time": None,
             "exit_code": None, "signal": "SIGSEGV", "hidden": True, "detail": "x" * 10_000},
        ],
    }  # fmt: skip
    score, cases = read_check(data, points=4.0)
    assert score == 3.5
    assert [(c.name, c.verdict, c.passed, c.signal, c.hidden) for c in cases] == [
        ("small", "passed", True, None, False),
        ("big", "runtime error", False, "SIGSEGV", True),
    ]
    assert len(cases[1].detail) <= 2000  # a case's diff is kept short


@pytest.mark.parametrize(
    ("data", "score", "count"),
    [
        ({"score": 99, "cases": []}, 4.0, 0),  # never more than the question's points
        ({"score": -1, "cases": []}, 0.0, 0),
        ({"score": "4", "cases": "all"}, 0.0, 0),  # wrong types are dropped
        ({"score": float("nan"), "cases": [1, "x", None]}, 0.0, 0),
        ({"score": True, "cases": [{"verdict": 3, "exit_code": "0", "hidden": "yes"}]}, 0.0, 1),
    ],
)
def test_odd_check_results_are_not_trusted(
    data: dict[str, object], score: float, count: int
) -> None:
    got, cases = read_check(data, points=4.0)
    assert (got, len(cases)) == (score, count)
    for case in cases:
        assert (case.verdict, case.exit_code, case.hidden, case.passed) == ("", None, False, False)


# -- reports --------------------------------------------------------------------------------


def graded_rows() -> list[NotebookResult]:
    alice = NotebookResult.empty("subs/alice.ipynb", [GREET, SUM])
    alice.questions["sum"].score, alice.questions["sum"].checked = 4.0, True
    alice.questions["sum"].cases = [
        CaseResult("small", "passed", 1, 1), CaseResult("negative", "passed", 1, 1),
        CaseResult("big", "passed", 2, 2, hidden=True),
    ]  # fmt: skip
    alice.questions["greet"].score, alice.questions["greet"].checked = 1.5, True
    alice.questions["greet"].cases = [
        CaseResult("one", "passed", 1, 1.5), CaseResult("two", "wrong output", 1, 0),
    ]  # fmt: skip
    hung = NotebookResult.empty("subs/hung.ipynb", [GREET, SUM])
    hung.status, hung.problem = Status.TIMEOUT, "still running after 20 s (--timeout): stopped"
    hung.questions["greet"].detail = "no cell is tagged check:greet"
    hung.cell_failures = [CellFailure(3, "MagicError", "%sandbox_upload is disabled")]
    broken = NotebookResult.empty("subs/broken.ipynb", [GREET, SUM])
    broken.status, broken.problem = Status.INVALID, "invalid notebook: not JSON"
    return [alice, hung, broken]


def test_the_csv_has_a_row_per_notebook_and_a_column_per_question() -> None:
    rows = list(csv.reader(io.StringIO(csv_text(graded_rows(), [GREET, SUM]))))
    assert rows[0] == ["notebook", "greet", "sum", "total", "max", "passed", "failed", "status",
                       "notes"]  # fmt: skip
    assert rows[1][:8] == ["subs/alice.ipynb", "1.5", "4", "5.5", "6", "4", "1", "ok"]
    assert rows[1][8] == "greet: 1 wrong output"  # what was not passed, by verdict
    # Nothing checked: every case of every table counts as failed.
    assert rows[2][:8] == ["subs/hung.ipynb", "0", "0", "0", "6", "0", "5", "timeout"]
    assert "still running after 20 s" in rows[2][8]
    assert "greet: no cell is tagged check:greet" in rows[2][8]
    assert "1 cell failed (cell 3: MagicError: %sandbox_upload is disabled)" in rows[2][8]
    assert rows[3][:8] == ["subs/broken.ipynb", "0", "0", "0", "6", "0", "5", "invalid notebook"]
    assert len(rows) == 4


def test_a_submission_cannot_put_a_formula_in_the_csv() -> None:
    [row] = graded_rows()[:1]
    row.notebook = '=HYPERLINK("http://x")'
    rows = list(csv.reader(io.StringIO(csv_text([row], [GREET, SUM]))))
    assert rows[1][0] == '\'=HYPERLINK("http://x")'


def test_notes_stay_one_short_line() -> None:
    [row] = graded_rows()[1:2]
    row.cell_failures = [CellFailure(n, "Error", "line\n" * 500) for n in range(1, 50)]
    notes = row.notes()
    assert len(notes) <= 300
    assert "\n" not in notes
    assert "49 cells failed" in notes


def test_the_json_has_every_case(tmp_path: Path) -> None:
    document = json_document(graded_rows(), [GREET, SUM], tmp_path / "tests")
    assert document["max"] == 6.0
    assert document["questions"]["sum"] == {"points": 4.0, "cases": ["small", "negative", "big"]}
    alice, hung, broken = document["notebooks"]
    assert [case["verdict"] for case in alice["questions"]["greet"]["cases"]] == [
        "passed",
        "wrong output",
    ]
    assert alice["questions"]["sum"]["cases"][2] == {
        "name": "big", "verdict": "passed", "points": 2, "score": 2, "time": None,
        "exit_code": None, "signal": None, "hidden": True, "detail": "",
    }  # fmt: skip
    assert (hung["status"], hung["score"], hung["failed"]) == ("timeout", 0.0, 5)
    assert hung["failed_cells"] == [
        {"cell": 3, "ename": "MagicError", "evalue": "%sandbox_upload is disabled"}
    ]
    assert (broken["status"], broken["problem"]) == (
        "invalid notebook",
        "invalid notebook: not JSON",
    )
    json.dumps(document)  # plain JSON, nothing else


def test_reports_replace_the_file_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "grades.csv"
    target.write_text("old grades\n")
    write_atomically(target, "new grades\n")
    assert target.read_text() == "new grades\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grades.csv"]


# -- progress -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (0.2, "1 s"), (45, "45 s"), (60, "1 min"), (80, "1 min 20 s"),
     (3600, "1 h"), (7500, "2 h 5 min")],
)  # fmt: skip
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_estimate_uses_the_mean_and_the_jobs() -> None:
    assert estimate_left([], 40, 4) is None  # nothing to go by yet
    assert estimate_left([10.0, 20.0], 28, 1) == 15.0 * 28
    assert estimate_left([10.0, 20.0], 28, 4) == 15.0 * 7
    assert estimate_left([10.0], 3, 4) == 10.0  # three left, four at once: one round
    assert estimate_left([10.0], 5, 4) == 20.0  # two rounds
    assert estimate_left([10.0], 0, 4) == 0.0


def finished(name: str, seconds: float, status: Status = Status.OK) -> NotebookResult:
    result = NotebookResult.empty(name, [SUM])
    result.seconds, result.status = seconds, status
    return result


def test_without_a_terminal_one_line_per_notebook() -> None:
    stream, now = io.StringIO(), [0.0]
    progress = Progress(40, 2, stream, terminal=False, clock=lambda: now[0])
    progress.start()
    for number in range(12):
        now[0] += 5
        status = Status.TIMEOUT if number == 11 else Status.OK
        progress.done(finished(f"n{number}.ipynb", 10.0, status))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 12
    assert lines[0] == "1/40 notebooks · 3 min 20 s left · n0.ipynb: 0/4"  # 20 rounds of 10 s
    assert lines[-1] == "12/40 notebooks · 2 min 20 s left · n11.ipynb: 0/4, timeout"
    assert "\r" not in stream.getvalue()


def test_on_a_terminal_the_line_is_redrawn_and_counts_down() -> None:
    stream, now = io.StringIO(), [0.0]
    progress = Progress(3, 1, stream, terminal=True, clock=lambda: now[0])
    progress.start()
    now[0] = 60.0
    progress.done(finished("alice.ipynb", 60.0))
    now[0] = 90.0
    progress.tick()
    progress.done(finished("bob.ipynb", 60.0))
    progress.done(finished("carol.ipynb", 60.0))
    progress.finish()
    frames = stream.getvalue().split("\r")[1:]
    assert frames[0] == "0/3 notebooks\x1b[K"
    assert frames[1] == "1/3 notebooks · 2 min left · last: alice.ipynb: 0/4\x1b[K"
    assert frames[2] == "1/3 notebooks · 1 min 30 s left · last: alice.ipynb: 0/4\x1b[K"
    assert frames[-1] == "3/3 notebooks · last: carol.ipynb: 0/4\x1b[K\n"


# -- the kernel's command and environment ---------------------------------------------------


def test_a_graded_kernel_gets_the_grading_flag_and_no_host_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDBOX_ALLOW_HOST_PATHS", "1")
    monkeypatch.setenv("SANDBOX_URL", "http://elsewhere.example/")
    monkeypatch.setenv("SANDBOX_TOKEN", "the-other-token")
    settings = SandboxSettings("http://127.0.0.1:5000/", "secret-token")
    env = kernel_environment(settings)
    assert env["SANDBOX_GRADING"] == "1"
    assert (env["SANDBOX_URL"], env["SANDBOX_TOKEN"]) == ("http://127.0.0.1:5000/", "secret-token")
    assert "SANDBOX_ALLOW_HOST_PATHS" not in env
    assert env["PATH"] == os.environ["PATH"]
    command = kernel_command(settings)
    assert "--SandboxKernel.url=http://127.0.0.1:5000/" in command
    assert "--SandboxKernel.allow_host_paths=False" in command
    assert not any("secret-token" in word for word in command)  # never on a command line


# -- bad use: status 2 before anything starts ------------------------------------------------


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "sum.yaml").write_text(
        "run: ./sum\ncases:\n- {stdin: 1 2, expect: '3'}\n"
    )
    write_notebook(tmp_path / "alice.ipynb", new_code_cell("echo hi"))
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["{root}/missing.ipynb"], "no such notebook: {root}/missing.ipynb"),
        (["--tests", "{root}/nowhere"], "no such folder"),
        (["--tests", "{root}/bad"], "the table has no 'run'"),
        (["--output", "{root}/no/grades.csv"], "the folder {root}/no does not exist"),
        (["--json", "{root}/tests"], "is a folder"),
        (["--token-file", "{root}/token"], "token file"),
    ],
)
def test_bad_use_stops_before_grading(
    class_folder: Path, capsys: pytest.CaptureFixture[str], change: list[str], message: str
) -> None:
    (class_folder / "bad").mkdir()
    (class_folder / "bad" / "q.yaml").write_text("- {expect: '3'}\n")
    (class_folder / "token").write_text("secret")
    (class_folder / "token").chmod(0o644)
    root = str(class_folder)
    args = [str(class_folder / "alice.ipynb"), "--tests", f"{root}/tests",
            "--output", f"{root}/grades.csv"]  # fmt: skip
    extra = [word.format(root=root) for word in change]
    if extra[0].endswith(".ipynb"):
        args = [*extra, *args[1:]]
    else:
        args += extra
    assert cli.main(["grade", *args]) == 2
    assert message.format(root=root) in capsys.readouterr().err
    assert not (class_folder / "grades.csv").exists()


@pytest.mark.parametrize("option", [["--jobs", "0"], ["--jobs", "two"], ["--timeout", "-5"],
                                    ["--timeout", "inf"]])  # fmt: skip
def test_bad_numbers_are_bad_use(
    class_folder: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["grade", str(class_folder / "alice.ipynb"), "--tests", str(class_folder),
                  *option])  # fmt: skip
    assert exited.value.code == 2
    assert option[0] in capsys.readouterr().err
