"""Checks through the front-ends: the Sandbox kernel (jupyter_client, started in a notebook's
folder) and IPython with the extension, against the embedded server.

What a notebook shows (text, HTML and the JSON of ``application/vnd.sandbox-kernel.check+json``)
and how the cell ends: failing cases are a result (status ``ok``), bad use an error.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sandbox_kernel.checking import CHECK_MIME, CheckResult

from .conftest import Cell, KernelSession, Server
from .helpers import kernel_env, processes_matching, sandbox_ipython, wait_until
from .hostile.test_page import FolderKernel

SUM_C = (
    "#include <stdio.h>\nint main(void) {\n    long a, b;\n"
    '    if (scanf("%ld %ld", &a, &b) != 2) return 3;\n'
    "    if (a == 99) { volatile int *p = 0; *p = 1; }\n"
    '    printf("%ld\\n", a + b);\n    return 0;\n}'
)
SUM_TABLE = """
- {stdin: "2 3", expect: 5}
- {name: negative, stdin: "10 -4", expect: 6, points: 2}
- {name: crash, stdin: "99 1", expect: 100, hidden: true}
"""


@pytest.fixture
def kernel(server: Server, kernelspec: str, tmp_path: Path) -> Iterator[KernelSession]:
    """A kernel started in a fresh folder (the notebook's), with a tests/ folder beside."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "sum.yaml").write_text(SUM_TABLE)
    session = FolderKernel(kernel_env(server.url, server.token), tmp_path)
    try:
        assert session.run("true").status == "ok"
        yield session
    finally:
        session.stop()


def checks(cell: Cell) -> list[dict[str, Any]]:
    """The JSON of each check the cell displayed."""
    return [d["data"][CHECK_MIME] for d in cell.of_type("display_data") if CHECK_MIME in d["data"]]


def shown_text(cell: Cell) -> str:
    return "\n".join(d["data"].get("text/plain", "") for d in cell.of_type("display_data"))


def everything(cell: Cell) -> str:
    """Every byte the front-end got for the cell: outputs of every kind and the reply."""
    return json.dumps([cell.outputs, cell.reply], default=str)


def test_teaching_cells_check(kernel: KernelSession) -> None:
    good = kernel.run("%%c --check tests/sum.yaml\n" + SUM_C)
    assert good.status == "ok", good.reply
    [result] = checks(good)
    assert [c["verdict"] for c in result["cases"]] == ["passed", "passed", "runtime error"]
    assert result["cases"][2]["signal"] == "SIGSEGV"
    assert (result["score"], result["total"]) == (3, 4)
    assert "3/4 points" in shown_text(good)
    assert good.stdout == "", "the program ran once outside the table"
    broken = kernel.run("%%c --check tests/sum.yaml\nint main(void) {\n    return missing;\n}")
    assert broken.status == "ok", broken.reply
    [result] = checks(broken)
    assert {c["verdict"] for c in result["cases"]} == {"compilation error"}
    assert "main.c:3:" in broken.stderr and "missing" in broken.stderr
    assert "0/4 points" in shown_text(broken)
    python = kernel.run(
        "%%python3 --check tests/sum.yaml\na, b = map(int, input().split())\n"
        "if a == 99: import ctypes; ctypes.string_at(0)\nprint(a + b)"
    )
    assert python.status == "ok", python.reply
    [result] = checks(python)
    assert [c["verdict"] for c in result["cases"]] == ["passed", "passed", "runtime error"]
    nested = kernel.run("%%c --file src/sum.c --check tests/sum.yaml\n" + SUM_C)
    assert [c["verdict"] for c in checks(nested)[0]["cases"]] == [
        "passed",
        "passed",
        "runtime error",
    ]
    assert kernel.run("pwd").stdout == "/home/student\n"
    both = kernel.run("%%c --check tests/sum.yaml --stdin '1 2'\n" + SUM_C)
    assert both.status == "error" and "--stdin" in both.reply["evalue"]


def test_failing_cases_are_ok_and_bad_use_is_an_error(
    kernel: KernelSession, tmp_path: Path
) -> None:
    assert kernel.run("printf 'echo 4\\n' > four.sh").status == "ok"
    failing = kernel.run("%%sandbox_check bash four.sh\n- {expect: 5}")
    assert failing.status == "ok" and checks(failing)[0]["passed"] is False
    (tmp_path.parent / "outside.out").write_text("4\n")
    for body, said in [
        ("%%sandbox_check bash four.sh\n- {expect: 4, expcet: 5}", "'expcet'"),
        ("%%sandbox_check bash four.sh\n- {expect: [unclosed", "not valid YAML"),
        ("%%sandbox_check\n- {expect: 4}", "first line"),
        ("%%sandbox_check bash four.sh", "--tests"),
        ("%%sandbox_check --tests nowhere.yaml bash four.sh", "nowhere.yaml"),
        ("%%sandbox_check bash four.sh\n- {expect_file: ../outside.out}", "allow_host_paths"),
        ("%%sandbox_check --tests ../outside.out bash four.sh", "allow_host_paths"),
    ]:
        cell = kernel.run(body)
        assert cell.status == "error", (body, cell.reply)
        assert said in cell.reply["evalue"], (body, cell.reply["evalue"])
        assert not checks(cell)


def test_hidden_cases_never_show_their_data(kernel: KernelSession, tmp_path: Path) -> None:
    tokens = {
        name: f"{name}-{secrets.token_hex(8)}"
        for name in ("stdin", "arg", "env", "file", "expected", "expfile", "regex", "stderr")
    }
    (tmp_path / "tests" / "hidden.out").write_text(tokens["expfile"] + "\n")
    script = (
        'cat; printf "%s\\n" "$@"; echo "$SECRET"; cat data.txt 2>/dev/null; '
        f'echo {tokens["stderr"]} >&2; exit "${{CODE:-0}}"'
    )
    (tmp_path / "tests" / "hidden.yaml").write_text(
        f"""
- name: open
  stdin: visible-{tokens["stdin"][-4:]}
  expect: shown to all
- name: secret one
  hidden: true
  stdin: {tokens["stdin"]}
  args: [{tokens["arg"]}]
  env: {{SECRET: {tokens["env"]}}}
  files: {{data.txt: {tokens["file"]}}}
  expect: {tokens["expected"]}
- name: secret two
  hidden: true
  env: {{CODE: "3"}}
  expect_file: hidden.out
- name: secret three
  hidden: true
  expect_regex: "{tokens["regex"]}"
"""
    )
    assert kernel.run(f"cat > show.sh <<'EOF'\n{script}\nEOF").status == "ok"
    cell = kernel.run("%%sandbox_check --tests tests/hidden.yaml bash show.sh")
    assert cell.status == "ok", cell.reply
    [result] = checks(cell)
    assert [c["verdict"] for c in result["cases"]] == [
        "wrong output", "wrong output", "runtime error", "wrong output"
    ]  # fmt: skip
    sent = everything(cell)
    for name, token in tokens.items():
        assert token not in sent, f"the hidden {name} was shown"
    # The same data of a visible case is shown: the search above would have found it.
    assert f"visible-{tokens['stdin'][-4:]}" in sent and "shown to all" in sent
    for mime in ("text/plain", "text/html"):
        assert all("secret one" in d["data"][mime] for d in cell.of_type("display_data"))


def test_a_forged_record_still_gives_a_reply_and_verdicts(kernel: KernelSession) -> None:
    """A submission appends lines to its own record (it can; the README says so): whatever
    it writes, the cell still ends with verdicts that Jupyter can carry."""
    forge = (
        "for f in ~/.sandbox_check/*/result; do "
        """printf '{"case":0,"begin":-1e999}\\n{"case":0,"killed":"nope"}\\n' >> "$f"; """
        "done; echo 5"
    )
    assert kernel.run(f"cat > forge.sh <<'EOF'\n{forge}\nEOF").status == "ok"
    cell = kernel.run("%%sandbox_check bash forge.sh\n- {expect: 5}\n- {expect: 5}", timeout=30)
    # json.loads reads 1e999 as inf: a time that is not finite is no time (Jupyter's packer
    # refuses infinities).
    assert cell.status == "ok", cell.reply
    [result] = checks(cell)
    assert result["cases"][1]["verdict"] == "passed"
    time = result["cases"][0]["time"]
    assert time is None or (isinstance(time, (int, float)) and 0 <= time < 60), time
    assert kernel.run("echo alive").stdout == "alive\n"


def test_the_check_changes_nothing_in_the_session(kernel: KernelSession) -> None:
    kernel.run("mkdir -p work && cd work && export GREETING=exported && private=1 && echo x > f")
    kernel.run(
        'printf \'pwd; echo "${GREETING:-unset} ${private:-unset}"; '
        "touch from-the-check; cd /; export GREETING=changed\\n' > ../where.sh"
    )
    cell = kernel.run(
        '%%sandbox_check bash ../where.sh\n- {expect: "/home/student/work\\nexported unset"}'
    )
    assert checks(cell)[0]["passed"] is True, checks(cell)
    after = kernel.run("pwd; echo $GREETING $private; ls")
    assert after.stdout == "/home/student/work\nexported 1\nf\n", after.stdout


def test_an_interrupt_ends_a_long_check(kernel: KernelSession) -> None:
    marker = f"2{secrets.randbelow(10**6)}.5"
    table = "- {timeout: 25}\n- {timeout: 25}\n- {timeout: 5, expect: x}"
    threading.Timer(1.5, kernel.manager.interrupt_kernel).start()
    cell = kernel.run(f"%%sandbox_check sleep {marker}\n{table}", timeout=90)
    assert cell.status == "error" and cell.reply["ename"] == "Interrupted", cell.reply
    assert cell.seconds < 10, f"the interrupt took {cell.seconds:.1f} s"
    assert wait_until(lambda: not processes_matching(f"sleep {marker}"), 10)
    assert kernel.run("echo after").stdout == "after\n"


# -- IPython -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    folder = tmp_path_factory.mktemp("ipython-check")
    (folder / "sum.yaml").write_text(SUM_TABLE)
    with sandbox_ipython(server.url, server.token, folder) as ip:
        yield ip


def test_ipython_names_the_magic_sandbox_check(shell: InteractiveShell) -> None:
    # Only teaching cells get the "sandbox_" prefix (%%c is %%sandbox_c).
    assert shell.find_cell_magic("sandbox_check") is not None, sorted(
        name for name in shell.magics_manager.magics["cell"] if "check" in name
    )


def test_ipython_underscore_is_the_result(shell: InteractiveShell) -> None:
    built = shell.run_cell(f"%%sandbox\ncat > sum.c <<'EOF'\n{SUM_C}\nEOF\ngcc -o sum sum.c")
    assert built.success, built
    name = "sandbox_check"
    ran = shell.run_cell(f"%%{name} ./sum\n{SUM_TABLE}")
    assert ran.success, ran.error_in_exec
    result = shell.user_ns["_"]
    assert isinstance(result, CheckResult)
    assert (result.score, result.total, result.passed) == (3, 4, False)
    assert [c.verdict for c in result.cases] == ["passed", "passed", "runtime error"]
    crash = result.cases[2]
    assert crash.signal == "SIGSEGV" and crash.exit_code == 139 and crash.time is not None
    assert result.cases[0].exit_code == 0 and 0 <= (result.cases[0].time or -1) < 2
    assert "3/4 points" in repr(result)
    teaching = shell.run_cell("%%sandbox_c --check sum.yaml\n" + SUM_C)
    assert teaching.success, teaching.error_in_exec
    assert isinstance(shell.user_ns["_"], CheckResult) and shell.user_ns["_"].score == 3
    bad = shell.run_cell(f"%%{name} ./sum\n- {{expect: 1, bogus: 2}}")
    assert not bad.success


def test_ipython_reads_hidden_tables_with_tests(shell: InteractiveShell) -> None:
    """IPython refuses a cell magic with an empty body ("the cell body is empty"), so a table
    of ``--tests`` needs the line form: ``%sandbox_check --tests sum.yaml ./sum``."""
    built = shell.run_cell(f"%%sandbox\ncat > sum.c <<'EOF'\n{SUM_C}\nEOF\ngcc -o sum sum.c")
    assert built.success, built
    ran = shell.run_cell("%sandbox_check --tests sum.yaml ./sum")
    assert ran.success, ran.error_before_exec or ran.error_in_exec
    result = shell.user_ns["_"]
    assert isinstance(result, CheckResult) and (result.score, result.total) == (3, 4)
